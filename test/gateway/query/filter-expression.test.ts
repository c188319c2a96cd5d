/**
 * The `where` expression of the pull API: grammar, semantics and the
 * position of every syntax error.
 */
import { describe, expect, it } from 'vitest'
import {
  compileFilterExpression, FilterExpressionError, MAX_EXPRESSION_DEPTH, MAX_EXPRESSION_LENGTH, parseFilterExpression, parseJsonPayload,
} from '../../../gateway/query/filter-expression.ts'

const matches = (expr: string, doc: unknown): boolean => compileFilterExpression(expr)(doc)

describe('filter expressions: semantics', () => {
  const reading = { temp: 31.5, site: 'a', ok: true, note: null, dev: { id: 'd-1', fw: { major: 2 } }, values: [10, 20, { v: 3 }], 'site-id': 7 }

  it('compares fields with literals, and combines with and / or / not', () => {
    expect(matches('temp > 30 and site = "a"', reading)).toBe(true)
    expect(matches('temp > 30 and site = "b"', reading)).toBe(false)
    expect(matches('temp > 40 or site = \'a\'', reading)).toBe(true)
    expect(matches('not site = "a"', reading)).toBe(false)
    expect(matches('not (temp < 0 or site != "a")', reading)).toBe(true)
    for (const [expr, want] of [
      ['temp = 31.5', true], ['temp != 31.5', false], ['temp < 31.5', false], ['temp <= 31.5', true],
      ['temp > 31.5', false], ['temp >= 31.5', true], ['31.5 = temp', true], ['-1 < temp', true], ['temp < 3.2e1', true],
    ] as const) expect(matches(expr, reading), expr).toBe(want)
  })

  it('binds not tighter than and, and and tighter than or', () => {
    // a or (b and c)
    expect(matches('site = "a" or temp < 0 and ok = false', reading)).toBe(true)
    // (not a) and b
    expect(matches('not site = "b" and ok = true', reading)).toBe(true)
    expect(matches('(site = "a" or temp < 0) and ok = false', reading)).toBe(false)
    expect(matches('NOT site = "b" AND ok = TRUE Or temp > 100', reading)).toBe(true)
  })

  it('walks dotted paths through objects and arrays; backquotes name any field', () => {
    expect(matches('dev.id = "d-1" and dev.fw.major >= 2', reading)).toBe(true)
    expect(matches('values.1 = 20 and values.2.v = 3', reading)).toBe(true)
    expect(matches('`site-id` = 7', reading)).toBe(true)
    expect(matches('`a``b` = 1', { 'a`b': 1 })).toBe(true)
    expect(matches('`and` = 1', { and: 1 })).toBe(true)
    expect(matches('min < max', { min: 1, max: 2 })).toBe(true)
  })

  it('reads a missing field, or a field of a non-JSON payload, as null; never coerces types', () => {
    expect(matches('missing = null', reading)).toBe(true)
    expect(matches('note = null', reading)).toBe(true)
    expect(matches('site != null', reading)).toBe(true)
    expect(matches('missing > 0 or missing < 0 or missing = 0', reading)).toBe(false)
    expect(matches('not missing > 0', reading)).toBe(true)
    expect(matches('dev.nope.deeper = null and values.9 = null and values.x = null', reading)).toBe(true)
    expect(matches('temp = "31.5"', reading)).toBe(false)
    expect(matches('ok = 1', reading)).toBe(false)
    expect(matches('site > 1', reading)).toBe(false)
    expect(matches('dev = "d-1" or dev != "x"', reading)).toBe(true)
    expect(matches('dev = dev', reading)).toBe(false) // objects equal nothing
    expect(matches('site < "b" and site >= "a"', reading)).toBe(true)
    expect(matches('temp > 0', parseJsonPayload(Buffer.from('not json')))).toBe(false)
    expect(matches('temp = null', parseJsonPayload(Buffer.from([0xff, 0xfe])))).toBe(true)
    expect(matches('0 = 0', 42)).toBe(true)
    expect(matches('toString = null and constructor = null', {})).toBe(true) // no prototype lookups
  })

  it('decodes string escapes', () => {
    expect(matches('s = "a\\"b\\\\c\\n\\u00e9\\/"', { s: 'a"b\\c\né/' })).toBe(true)
    expect(matches("s = 'it\\'s'", { s: "it's" })).toBe(true)
  })

  it('builds the syntax tree the grammar says', () => {
    expect(parseFilterExpression('a = 1 or b.c != "x" and not d < -2')).toEqual({
      kind: 'or',
      left: { kind: 'compare', op: '=', left: { kind: 'path', path: ['a'] }, right: { kind: 'literal', value: 1 } },
      right: {
        kind: 'and',
        left: { kind: 'compare', op: '!=', left: { kind: 'path', path: ['b', 'c'] }, right: { kind: 'literal', value: 'x' } },
        right: { kind: 'not', operand: { kind: 'compare', op: '<', left: { kind: 'path', path: ['d'] }, right: { kind: 'literal', value: -2 } } },
      },
    })
  })
})

describe('filter expressions: errors carry code FILTER_SYNTAX and a 0-based position', () => {
  const cases: ReadonlyArray<readonly [string, number]> = [
    ['', 0],
    ['   ', 3],
    ['temp >', 6],
    ['temp > > 30', 7],
    ['(temp > 1', 9],
    ['temp > 1)', 8],
    ['temp 30', 5],
    ['temp > "abc', 7],
    ['temp ! 3', 5],
    ['temp > 3 and', 12],
    ['temp > 3 && x = 1', 9],
    ['x = 1 y = 2', 6],
    ['a. = 1', 2],
    ['1.2.3 = x', 0],
    ['12abc = 1', 0],
    ['s = "\\q"', 5],
    ['s = "\\u12"', 5],
    ['not', 3],
    ['temp > true and', 15],
    ['and = 1', 0],
    ['() ', 1],
    ['`open = 1', 0],
    ['`` = 1', 0],
    ['temp = #', 7],
  ]
  for (const [expr, position] of cases) {
    it(`${JSON.stringify(expr)} fails at ${position}`, () => {
      let caught: unknown
      try { parseFilterExpression(expr) } catch (err) { caught = err }
      expect(caught).toBeInstanceOf(FilterExpressionError)
      expect(caught).toMatchObject({ code: 'FILTER_SYNTAX', position })
    })
  }

  it('limits nesting and length, so a hostile expression cannot exhaust the stack', () => {
    const deep = `${'('.repeat(MAX_EXPRESSION_DEPTH + 10)}a = 1${')'.repeat(MAX_EXPRESSION_DEPTH + 10)}`
    expect(() => parseFilterExpression(deep)).toThrow(expect.objectContaining({ code: 'FILTER_SYNTAX', position: MAX_EXPRESSION_DEPTH }))
    expect(() => parseFilterExpression(`${'not '.repeat(100_000)}a = 1`)).toThrow(expect.objectContaining({ code: 'FILTER_SYNTAX' }))
    const nested = `${'('.repeat(MAX_EXPRESSION_DEPTH - 1)}a = 1${')'.repeat(MAX_EXPRESSION_DEPTH - 1)}`
    expect(matches(nested, { a: 1 })).toBe(true)
    const long = `a = "${'x'.repeat(MAX_EXPRESSION_LENGTH)}"`
    expect(() => parseFilterExpression(long)).toThrow(expect.objectContaining({ code: 'FILTER_SYNTAX', position: MAX_EXPRESSION_LENGTH }))
  })
})
