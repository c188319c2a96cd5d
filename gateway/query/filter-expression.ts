/**
 * The `where` filter of the pull and replay API: a small boolean expression
 * over the fields of a JSON payload, parsed by recursive descent and compiled
 * to a predicate (RocketMQ's SQL92 filter, in miniature). Pure; no I/O.
 *
 * Grammar (keywords are case-insensitive):
 *
 *     expression := or
 *     or         := and ( "or" and )*
 *     and        := unary ( "and" unary )*
 *     unary      := "not" unary | "(" expression ")" | comparison
 *     comparison := operand ( "=" | "!=" | "<" | "<=" | ">" | ">=" ) operand
 *     operand    := path | string | number | "true" | "false" | "null"
 *     path       := segment ( "." segment )*
 *     segment    := [A-Za-z_][A-Za-z0-9_]* | [0-9]+ | `any text` (backquoted; `` for a backquote)
 *     string     := "…" | '…'   (escapes \" \' \\ \/ \n \r \t \uXXXX)
 *     number     := -?[0-9]+(.[0-9]+)?([eE][+-]?[0-9]+)?
 *
 * Semantics — two-valued, no coercion:
 * - A path walks the payload's objects by key and its arrays by index
 *   (`readings.0.value`). A missing field, or a payload that is not JSON,
 *   reads as null.
 * - `a = b` holds when both are the same JSON type and equal; null equals
 *   null (so `site = null` selects records without a site). Objects and
 *   arrays equal nothing. `a != b` is `not (a = b)`.
 * - `<` `<=` `>` `>=` hold only between two numbers or two strings (strings
 *   compare by UTF-16 code units); anything else, null included, is false.
 * - `not` binds tighter than `and`, which binds tighter than `or`.
 *
 * A bad expression raises {@link FilterExpressionError} with the position
 * (0-based character index) where parsing failed.
 */

export type JsonScalar = string | number | boolean | null
export type ComparisonOperator = '=' | '!=' | '<' | '<=' | '>' | '>='

export type FilterNode =
  | { readonly kind: 'or' | 'and', readonly left: FilterNode, readonly right: FilterNode }
  | { readonly kind: 'not', readonly operand: FilterNode }
  | { readonly kind: 'compare', readonly op: ComparisonOperator, readonly left: Operand, readonly right: Operand }

export type Operand =
  | { readonly kind: 'path', readonly path: readonly string[] }
  | { readonly kind: 'literal', readonly value: JsonScalar }

/** Longest expression accepted, in characters. */
export const MAX_EXPRESSION_LENGTH = 4096
/** Deepest nesting of parentheses and `not`, so a hostile expression cannot exhaust the stack. */
export const MAX_EXPRESSION_DEPTH = 64

export class FilterExpressionError extends Error {
  override readonly name = 'FilterExpressionError'
  readonly code = 'FILTER_SYNTAX'
  /** 0-based index into the expression where the problem was found. */
  readonly position: number

  constructor (message: string, position: number) {
    super(`${message} at position ${position}`)
    this.position = position
  }
}

type Keyword = 'and' | 'or' | 'not' | 'true' | 'false' | 'null'
type Token =
  | { readonly type: 'op', readonly value: ComparisonOperator, readonly at: number }
  | { readonly type: '(' | ')' | 'end', readonly at: number }
  | { readonly type: 'keyword', readonly value: Keyword, readonly at: number, readonly text: string }
  | { readonly type: 'string', readonly value: string, readonly at: number }
  | { readonly type: 'number', readonly value: number, readonly at: number, readonly text: string }
  | { readonly type: 'path', readonly value: readonly string[], readonly at: number, readonly text: string }

const KEYWORDS: ReadonlySet<string> = new Set<Keyword>(['and', 'or', 'not', 'true', 'false', 'null'])
const IDENT_START = /[A-Za-z_]/
const IDENT_PART = /[A-Za-z0-9_]/
const DIGIT = /[0-9]/
const NUMBER = /-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y
const ESCAPES: Readonly<Record<string, string>> = { '"': '"', "'": "'", '\\': '\\', '/': '/', n: '\n', r: '\r', t: '\t' }

function describeToken (token: Token): string {
  switch (token.type) {
    case 'end': return 'the end of the expression'
    case 'op': return `"${token.value}"`
    case '(': case ')': return `"${token.type}"`
    case 'string': return `the string ${JSON.stringify(token.value)}`
    case 'number': case 'keyword': case 'path': return `"${token.text}"`
  }
}

function tokenize (text: string): Token[] {
  const tokens: Token[] = []
  let i = 0
  const readString = (quote: string, start: number): string => {
    let out = ''
    let k = start + 1
    for (;;) {
      const c = text[k]
      if (c === undefined) throw new FilterExpressionError(`unterminated string starting with ${quote}`, start)
      if (c === quote) { i = k + 1; return out }
      if (c === '\\') {
        const e = text[k + 1]
        if (e === 'u') {
          const hex = text.slice(k + 2, k + 6)
          if (!/^[0-9A-Fa-f]{4}$/.test(hex)) throw new FilterExpressionError('\\u needs four hex digits', k)
          out += String.fromCharCode(parseInt(hex, 16))
          k += 6
          continue
        }
        const mapped = e === undefined ? undefined : ESCAPES[e]
        if (mapped === undefined) throw new FilterExpressionError(`unknown escape \\${e ?? ''} in a string`, k)
        out += mapped
        k += 2
        continue
      }
      out += c
      k++
    }
  }
  const readSegment = (): string => {
    const start = i
    const c = text[i]
    if (c === '`') {
      let out = ''
      let k = i + 1
      for (;;) {
        const d = text[k]
        if (d === undefined) throw new FilterExpressionError('unterminated `quoted` field name', start)
        if (d === '`') {
          if (text[k + 1] === '`') { out += '`'; k += 2; continue }
          break
        }
        out += d
        k++
      }
      if (out.length === 0) throw new FilterExpressionError('empty `quoted` field name', start)
      i = k + 1
      return out
    }
    if (c !== undefined && IDENT_START.test(c)) {
      while (i < text.length && IDENT_PART.test(text[i] as string)) i++
      return text.slice(start, i)
    }
    if (c !== undefined && DIGIT.test(c)) {
      while (i < text.length && DIGIT.test(text[i] as string)) i++
      return text.slice(start, i)
    }
    throw new FilterExpressionError('expected a field name after "."', start)
  }
  while (i < text.length) {
    const c = text[i] as string
    const at = i
    if (c === ' ' || c === '\t' || c === '\n' || c === '\r') { i++; continue }
    if (c === '(' || c === ')') { tokens.push({ type: c, at }); i++; continue }
    if (c === '=') { tokens.push({ type: 'op', value: '=', at }); i++; continue }
    if (c === '!') {
      if (text[i + 1] !== '=') throw new FilterExpressionError('"!" must be followed by "=" (use "not" to negate)', at)
      tokens.push({ type: 'op', value: '!=', at }); i += 2; continue
    }
    if (c === '<' || c === '>') {
      const eq = text[i + 1] === '='
      tokens.push({ type: 'op', value: (eq ? `${c}=` : c) as ComparisonOperator, at })
      i += eq ? 2 : 1
      continue
    }
    if (c === '"' || c === "'") { tokens.push({ type: 'string', value: readString(c, at), at }); continue }
    if (DIGIT.test(c) || (c === '-' && DIGIT.test(text[i + 1] ?? ''))) {
      NUMBER.lastIndex = i
      const m = NUMBER.exec(text) as RegExpExecArray
      const after = text[i + m[0].length]
      if (after !== undefined && (IDENT_PART.test(after) || after === '.')) {
        throw new FilterExpressionError(`malformed number ${JSON.stringify(text.slice(i, i + m[0].length + 1))}`, at)
      }
      tokens.push({ type: 'number', value: Number(m[0]), at, text: m[0] })
      i += m[0].length
      continue
    }
    if (IDENT_START.test(c) || c === '`') {
      const segments = [readSegment()]
      const word = text.slice(at, i)
      if (c !== '`' && KEYWORDS.has(word.toLowerCase()) && text[i] !== '.') {
        tokens.push({ type: 'keyword', value: word.toLowerCase() as Keyword, at, text: word })
        continue
      }
      while (text[i] === '.') { i++; segments.push(readSegment()) }
      tokens.push({ type: 'path', value: segments, at, text: text.slice(at, i) })
      continue
    }
    throw new FilterExpressionError(`unexpected character ${JSON.stringify(c)}`, at)
  }
  tokens.push({ type: 'end', at: text.length })
  return tokens
}

class Parser {
  #pos = 0
  #depth = 0
  constructor (private readonly tokens: readonly Token[]) {}

  get #peek (): Token { return this.tokens[this.#pos] as Token }

  #isKeyword (word: 'and' | 'or' | 'not'): boolean {
    const t = this.#peek
    return t.type === 'keyword' && t.value === word
  }

  parse (): FilterNode {
    const t = this.#peek
    if (t.type === 'end') throw new FilterExpressionError('empty expression', t.at)
    const node = this.#or()
    const rest = this.#peek
    if (rest.type !== 'end') {
      throw new FilterExpressionError(`unexpected ${describeToken(rest)}: expected "and", "or" or the end of the expression`, rest.at)
    }
    return node
  }

  #or (): FilterNode {
    let left = this.#and()
    while (this.#isKeyword('or')) { this.#pos++; left = { kind: 'or', left, right: this.#and() } }
    return left
  }

  #and (): FilterNode {
    let left = this.#unary()
    while (this.#isKeyword('and')) { this.#pos++; left = { kind: 'and', left, right: this.#unary() } }
    return left
  }

  #unary (): FilterNode {
    const t = this.#peek
    if (++this.#depth > MAX_EXPRESSION_DEPTH) throw new FilterExpressionError(`expression nested deeper than ${MAX_EXPRESSION_DEPTH} levels`, t.at)
    try {
      if (this.#isKeyword('not')) { this.#pos++; return { kind: 'not', operand: this.#unary() } }
      if (t.type === '(') {
        this.#pos++
        const inner = this.#or()
        const close = this.#peek
        if (close.type !== ')') throw new FilterExpressionError(`expected ")" to close the "(" at position ${t.at}, found ${describeToken(close)}`, close.at)
        this.#pos++
        return inner
      }
      return this.#comparison()
    } finally {
      this.#depth--
    }
  }

  #comparison (): FilterNode {
    const left = this.#operand('a field, a value, "not" or "("')
    const op = this.#peek
    if (op.type !== 'op') {
      const after = describeToken(this.tokens[this.#pos - 1] as Token)
      throw new FilterExpressionError(`expected a comparison (=, !=, <, <=, >, >=) after ${after}, found ${describeToken(op)}`, op.at)
    }
    this.#pos++
    const right = this.#operand(`a field or a value after "${op.value}"`)
    return { kind: 'compare', op: op.value, left, right }
  }

  #operand (expected: string): Operand {
    const t = this.#peek
    switch (t.type) {
      case 'path': this.#pos++; return { kind: 'path', path: t.value }
      case 'string': case 'number': this.#pos++; return { kind: 'literal', value: t.value }
      case 'keyword':
        if (t.value === 'true' || t.value === 'false' || t.value === 'null') {
          this.#pos++
          return { kind: 'literal', value: t.value === 'null' ? null : t.value === 'true' }
        }
        break
      default:
        break
    }
    throw new FilterExpressionError(`expected ${expected}, found ${describeToken(t)}`, t.at)
  }
}

/** Parses an expression into its syntax tree; throws FilterExpressionError. */
export function parseFilterExpression (text: string): FilterNode {
  if (typeof text !== 'string') throw new FilterExpressionError('the expression must be a string', 0)
  if (text.length > MAX_EXPRESSION_LENGTH) throw new FilterExpressionError(`expression longer than ${MAX_EXPRESSION_LENGTH} characters`, MAX_EXPRESSION_LENGTH)
  return new Parser(tokenize(text)).parse()
}

/** A missing field or a non-JSON payload: compares like null. */
function lookup (doc: unknown, path: readonly string[]): unknown {
  let v = doc
  for (const segment of path) {
    if (Array.isArray(v)) {
      if (!/^[0-9]+$/.test(segment)) return null
      v = v[Number(segment)]
    } else if (v !== null && typeof v === 'object' && Object.hasOwn(v, segment)) {
      v = (v as Record<string, unknown>)[segment]
    } else {
      return null
    }
    if (v === undefined) return null
  }
  return v
}

function equal (a: unknown, b: unknown): boolean {
  if (a === null || b === null) return a === b
  if (typeof a === 'object' || typeof b === 'object') return false
  return a === b
}

function ordered (a: unknown, b: unknown): boolean {
  return (typeof a === 'number' && typeof b === 'number') || (typeof a === 'string' && typeof b === 'string')
}

type Evaluate = (doc: unknown) => boolean
type Read = (doc: unknown) => unknown

function compileOperand (operand: Operand): Read {
  if (operand.kind === 'literal') { const value = operand.value; return () => value }
  const path = operand.path
  return (doc) => lookup(doc, path)
}

function compileNode (node: FilterNode): Evaluate {
  switch (node.kind) {
    case 'or': { const l = compileNode(node.left); const r = compileNode(node.right); return (d) => l(d) || r(d) }
    case 'and': { const l = compileNode(node.left); const r = compileNode(node.right); return (d) => l(d) && r(d) }
    case 'not': { const o = compileNode(node.operand); return (d) => !o(d) }
    case 'compare': {
      const l = compileOperand(node.left)
      const r = compileOperand(node.right)
      switch (node.op) {
        case '=': return (d) => equal(l(d), r(d))
        case '!=': return (d) => !equal(l(d), r(d))
        case '<': return (d) => { const a = l(d); const b = r(d); return ordered(a, b) && (a as number) < (b as number) }
        case '<=': return (d) => { const a = l(d); const b = r(d); return ordered(a, b) && (a as number) <= (b as number) }
        case '>': return (d) => { const a = l(d); const b = r(d); return ordered(a, b) && (a as number) > (b as number) }
        case '>=': return (d) => { const a = l(d); const b = r(d); return ordered(a, b) && (a as number) >= (b as number) }
      }
    }
  }
}

/** Parses and compiles an expression into a predicate over a parsed JSON document. */
export function compileFilterExpression (text: string): (doc: unknown) => boolean {
  return compileNode(parseFilterExpression(text))
}

const utf8 = new TextDecoder('utf-8', { fatal: true })

/** The payload as JSON, or null when it is not valid UTF-8 JSON (every field then reads as null). */
export function parseJsonPayload (payload: Uint8Array): unknown {
  try {
    return JSON.parse(utf8.decode(payload)) as unknown
  } catch {
    return null
  }
}
