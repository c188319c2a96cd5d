/**
 * NATS subjects from MQTT topics and record fields, as pure functions.
 *
 * Mapping (reversible): an MQTT topic's levels become subject tokens, `/` → `.`.
 * A NATS token cannot be empty and cannot hold `.`, `*`, `>` or white space,
 * while an MQTT level can; so inside each level the characters `%`, `.`, `*`,
 * `>` and every ASCII control or space character (U+0000–U+0020, U+007F) are
 * written `%` + two upper-case hex digits (`dev.42` → `dev%2E42`, `a b` →
 * `a%20b`, `50%` → `50%25`), and an empty level is the token `%_`
 * (`a//b` → `a.%_.b`). `%` starts every escape, so {@link subjectToTopic}
 * gives back the exact topic. Other characters (UTF-8 included) pass as they
 * are: NATS subjects are UTF-8.
 *
 * Template: literal subject text with `{variable}` placeholders, like the MQTT
 * upstream's topicTemplate: {site} {region} {upstream} {tenant} {stream}
 * {partition} {key} {topic}. Every value is escaped as one level (a key
 * `a.b` is the token `a%2Eb`); {topic} is the topic's levels, so it must be
 * the template's last token(s), after a `.` — a downstream consumer filters
 * `edgemq.plant-7.default.telemetry.>` and reads the topic from the tail.
 */
import { BridgeError } from '../errors.ts'
import { parseTemplate, RECORD_VARIABLES, type Template } from '../topic-template.ts'

export type RecordVariable = typeof RECORD_VARIABLES[number]

const EMPTY_LEVEL = '%_'

function mustEscape (code: number): boolean {
  return code <= 0x20 || code === 0x7F || code === 0x25 /* % */ || code === 0x2E /* . */ || code === 0x2A /* * */ || code === 0x3E /* > */
}

/** One MQTT topic level (or any value) as one NATS subject token. */
export function escapeToken (level: string): string {
  if (level === '') return EMPTY_LEVEL
  let out = ''
  let from = 0
  for (let i = 0; i < level.length; i++) {
    const code = level.charCodeAt(i)
    if (!mustEscape(code)) continue
    out += level.slice(from, i) + '%' + code.toString(16).toUpperCase().padStart(2, '0')
    from = i + 1
  }
  return from === 0 ? level : out + level.slice(from)
}

/** The level an escaped token stands for; throws BRIDGE_SUBJECT_TEMPLATE when `token` is not one escapeToken() makes. */
export function unescapeToken (token: string): string {
  if (token === EMPTY_LEVEL) return ''
  return token.replace(/%([0-9A-F]{2})|%/g, (match, hex: string | undefined) => {
    if (hex === undefined) throw new BridgeError('BRIDGE_SUBJECT_TEMPLATE', `not an escaped subject token: ${JSON.stringify(token)}`)
    return String.fromCharCode(parseInt(hex, 16))
  })
}

/** An MQTT topic as subject tokens: `devices/dev.42/t` → `devices.dev%2E42.t`. */
export function topicToSubject (topic: string): string {
  return topic.split('/').map(escapeToken).join('.')
}

/** The inverse of topicToSubject. */
export function subjectToTopic (subject: string): string {
  return subject.split('.').map(unescapeToken).join('/')
}

/** A parsed subject template. */
export interface SubjectTemplate {
  readonly source: string
  /** The subject of a record; every value escaped. */
  render (values: Readonly<Record<RecordVariable, string>>): string
  /**
   * The subjects the template can render once `fixed` variables are known, as one subject filter: a token that
   * holds another variable is `*`, {topic} is `>`.
   */
  pattern (fixed: Partial<Readonly<Record<RecordVariable, string>>>): string
}

const templateError = (message: string): BridgeError => new BridgeError('BRIDGE_SUBJECT_TEMPLATE', message)

/** Parses a subject template; throws BRIDGE_SUBJECT_TEMPLATE (or BRIDGE_TOPIC_TEMPLATE for a bad placeholder) naming the problem. */
export function parseSubjectTemplate (source: string): SubjectTemplate {
  const template: Template<RecordVariable> = parseTemplate(source, RECORD_VARIABLES)
  if (source.includes('\uE000')) throw templateError('a subject template cannot contain U+E000')
  // Tokens with each placeholder replaced by a marker that cannot occur in literal text (a private-use character).
  const marked = template.render(Object.fromEntries(RECORD_VARIABLES.map((v) => [v, `\uE000${v}\uE000`])) as Record<RecordVariable, string>)
  const tokens = marked.split('.')
  for (const [i, token] of tokens.entries()) {
    const literal = token.replace(/\uE000[a-z]+\uE000/g, '')
    if (token === '') throw templateError(`empty token at position ${i} (a subject cannot start or end with "." or hold "..")`)
    if (/[\s*>]/.test(literal)) throw templateError(`token ${i} holds white space, "*" or ">": a subject template is literal text`)
    if (token.includes('\uE000topic\uE000')) {
      if (token !== '\uE000topic\uE000') throw templateError('{topic} must be a whole token (its levels become tokens)')
      if (i !== tokens.length - 1) throw templateError('{topic} must be the last token (its number of levels varies)')
    }
  }
  return {
    source,
    render (values) {
      const escaped = {} as Record<RecordVariable, string>
      for (const v of RECORD_VARIABLES) escaped[v] = v === 'topic' ? topicToSubject(values.topic) : escapeToken(values[v])
      return template.render(escaped)
    },
    pattern (fixed) {
      return tokens.map((token) => {
        if (token === '\uE000topic\uE000') return fixed.topic === undefined ? '>' : topicToSubject(fixed.topic)
        let unknown = false
        const out = token.replace(/\uE000([a-z]+)\uE000/g, (_m, v: RecordVariable) => {
          const value = fixed[v]
          if (value === undefined) { unknown = true; return '' }
          return escapeToken(value)
        })
        return unknown ? '*' : out
      }).join('.')
    },
  }
}

/**
 * Whether every subject matched by filter `inner` is matched by filter `outer` (NATS wildcards: `*` one token,
 * `>` one or more trailing tokens).
 */
export function subjectCovers (outer: string, inner: string): boolean {
  const o = outer.split('.')
  const n = inner.split('.')
  for (let i = 0; i < o.length; i++) {
    const a = o[i] as string
    if (a === '>') return i < n.length
    const b = n[i]
    if (b === undefined || b === '>') return false
    if (a !== '*' && (b === '*' || a !== b)) return false
  }
  return o.length === n.length
}
