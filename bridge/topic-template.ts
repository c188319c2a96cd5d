/**
 * Topic rewriting for the bridge, as pure functions: the remote topic
 * template of forwarded records, and the mapping of remote command topics to
 * local device topics.
 *
 * A template is literal text with `{variable}` placeholders. Forwarded records
 * know `{site}` (the gateway id), `{region}`, `{upstream}`, `{tenant}`,
 * `{stream}`, `{partition}`, `{key}` (the partition key, normally the device
 * id) and `{topic}` (the MQTT topic the device published to). A rendered topic
 * is an MQTT topic name, so a template holds no `+` or `#`.
 *
 * A command mapping pairs a remote topic filter (where `{site}`, `{region}`
 * and `{upstream}` are filled in once) with a local filter of the same shape:
 * the n-th `+` of the local filter takes what the n-th `+` of the remote one
 * matched, and a trailing `#` takes the rest. `cmd/{site}/+/#` →
 * `devices/+/commands/#` turns `cmd/gw1/dev-42/reboot` into
 * `devices/dev-42/commands/reboot`.
 */
import { BridgeError, isBridgeError } from './errors.ts'

export const RECORD_VARIABLES = ['site', 'region', 'upstream', 'tenant', 'stream', 'partition', 'key', 'topic'] as const
export const CONNECTION_VARIABLES = ['site', 'region', 'upstream'] as const
export type ConnectionVariable = typeof CONNECTION_VARIABLES[number]

type Part = string | { readonly variable: string }

/** A parsed template; `render` fills it in. */
export interface Template<V extends string> {
  readonly source: string
  readonly variables: ReadonlySet<V>
  render (values: Readonly<Record<V, string>>): string
}

/** Why `source` is not a template over `allowed`, or null. */
export function templateProblem (source: string, allowed: readonly string[]): string | null {
  try {
    parseParts(source, allowed)
    return null
  } catch (err) {
    if (!isBridgeError(err, 'BRIDGE_TOPIC_TEMPLATE')) throw err
    return err.message
  }
}

const templateError = (message: string): BridgeError => new BridgeError('BRIDGE_TOPIC_TEMPLATE', message)
const mappingError = (message: string): BridgeError => new BridgeError('BRIDGE_COMMAND_MAPPING', message)

/** Throws BRIDGE_TOPIC_TEMPLATE naming the problem. */
function parseParts (source: string, allowed: readonly string[]): Part[] {
  const parts: Part[] = []
  let i = 0
  while (i < source.length) {
    const open = source.indexOf('{', i)
    const close = source.indexOf('}', i)
    if (close !== -1 && (open === -1 || close < open)) throw templateError(`unmatched "}" at position ${close}`)
    if (open === -1) { parts.push(source.slice(i)); break }
    if (open > i) parts.push(source.slice(i, open))
    const end = source.indexOf('}', open)
    if (end === -1) throw templateError(`unclosed "{" at position ${open}`)
    const variable = source.slice(open + 1, end)
    if (!allowed.includes(variable)) throw templateError(`unknown variable {${variable}} (known: ${allowed.map((v) => `{${v}}`).join(', ')})`)
    parts.push({ variable })
    i = end + 1
  }
  return parts
}

/** Parses a topic template; throws BRIDGE_TOPIC_TEMPLATE naming the problem. */
export function parseTemplate<V extends string> (source: string, allowed: readonly V[]): Template<V> {
  if (source.length === 0) throw templateError('empty template')
  const parts = parseParts(source, allowed)
  const literal = parts.filter((p): p is string => typeof p === 'string').join('')
  if (literal.includes('+') || literal.includes('#')) throw templateError('a topic template cannot contain the wildcards + or #')
  if (literal.includes('\u0000')) throw templateError('a topic template cannot contain U+0000')
  const variables = new Set(parts.filter((p): p is { variable: V } => typeof p !== 'string').map((p) => p.variable))
  return {
    source,
    variables,
    render (values) {
      let out = ''
      for (const p of parts) out += typeof p === 'string' ? p : values[p.variable as V]
      return out
    },
  }
}

/** Matches `topic` against an MQTT filter and returns what each wildcard matched (`#` last), or null. */
export function captureTopic (filter: string, topic: string): string[] | null {
  if (topic.startsWith('$') && (filter.startsWith('+') || filter.startsWith('#'))) return null // [MQTT-4.7.2-1]
  const f = filter.split('/')
  const t = topic.split('/')
  const captures: string[] = []
  for (let i = 0; i < f.length; i++) {
    const level = f[i] as string
    if (level === '#') { captures.push(t.slice(i).join('/')); return captures }
    if (i >= t.length) return null
    if (level === '+') captures.push(t[i] as string)
    else if (level !== t[i]) return null
  }
  return f.length === t.length ? captures : null
}

/** Why `filter` is not a valid MQTT topic filter, or null. */
export function filterProblem (filter: string): string | null {
  if (filter.length === 0) return 'empty topic filter'
  if (filter.includes('\u0000')) return 'topic filter contains U+0000'
  const levels = filter.split('/')
  for (let i = 0; i < levels.length; i++) {
    const level = levels[i] as string
    if (level.includes('#') && (level !== '#' || i !== levels.length - 1)) return '# must be the whole last level'
    if (level.includes('+') && level !== '+') return '+ must be a whole level'
  }
  return null
}

function shape (filter: string): { plus: number, hash: boolean } {
  const levels = filter.split('/')
  return { plus: levels.filter((l) => l === '+').length, hash: levels.at(-1) === '#' }
}

/** Maps remote command topics to local ones. */
export interface CommandMapping {
  /** The remote filter with {site}/{region}/{upstream} filled in: what the bridge subscribes to. */
  readonly remoteFilter: string
  /** The local topic for a remote one, or null when it does not match. */
  toLocal (remoteTopic: string): string | null
}

/**
 * Builds a mapping; throws BRIDGE_COMMAND_MAPPING naming the problem (BRIDGE_TOPIC_TEMPLATE when the remote filter's
 * variables do not parse).
 */
export function parseCommandMapping (remote: string, local: string, values: Readonly<Record<ConnectionVariable, string>>): CommandMapping {
  const remoteFilter = parseTemplateLoose(remote).render(values)
  const remoteBad = filterProblem(remoteFilter)
  if (remoteBad !== null) throw mappingError(`remote filter ${JSON.stringify(remote)}: ${remoteBad}`)
  const localBad = filterProblem(local)
  if (localBad !== null) throw mappingError(`local filter ${JSON.stringify(local)}: ${localBad}`)
  const r = shape(remoteFilter)
  const l = shape(local)
  if (r.plus !== l.plus || r.hash !== l.hash) {
    const wildcards = `${r.plus} "+"${r.hash ? ' and a trailing "#"' : ''}`
    throw mappingError(`local filter ${JSON.stringify(local)} must have the same wildcards as the remote filter ${JSON.stringify(remote)} (${wildcards})`)
  }
  const localLevels = local.split('/')
  return {
    remoteFilter,
    toLocal (remoteTopic) {
      const captures = captureTopic(remoteFilter, remoteTopic)
      if (captures === null) return null
      let k = 0
      const out: string[] = []
      for (const level of localLevels) {
        if (level === '+') out.push(captures[k++] as string)
        else if (level === '#') { const rest = captures[k++] as string; if (rest !== '') out.push(rest) } else out.push(level)
      }
      const topic = out.join('/')
      // A remote level may hold characters a local topic name must not (a capture is one level, so no "/").
      return topic === '' || topic.includes('+') || topic.includes('#') ? null : topic
    },
  }
}

/** A template over the connection variables whose literal text may hold wildcards (a filter template). */
function parseTemplateLoose (source: string): { render (values: Readonly<Record<ConnectionVariable, string>>): string } {
  const parts = parseParts(source, CONNECTION_VARIABLES)
  return {
    render (values) {
      let out = ''
      for (const p of parts) out += typeof p === 'string' ? p : values[p.variable as ConnectionVariable]
      return out
    },
  }
}

/** Topic prefix carrying a forwarded record's dedupe id to an MQTT 3.1.1 upstream. */
export const DEDUPE_TOPIC_PREFIX = '$dedupe/'

/**
 * Splits `$dedupe/<gatewayId>/<tenant>/<stream>/<partition>/<offset>/<topic>`
 * into the dedupe id and the topic; null when the topic is not of that form.
 * Gateway ids, tenants and stream names cannot contain `/`, so the id is
 * always the first five levels.
 */
export function splitDedupeTopic (topic: string): { readonly dedupeId: string, readonly topic: string } | null {
  if (!topic.startsWith(DEDUPE_TOPIC_PREFIX)) return null
  const levels = topic.slice(DEDUPE_TOPIC_PREFIX.length).split('/')
  if (levels.length < 6 || !isDedupeId(levels.slice(0, 5))) return null
  const rest = levels.slice(5).join('/')
  if (rest === '') return null
  return { dedupeId: levels.slice(0, 5).join('/'), topic: rest }
}

/** The MQTT 5 user property that carries a forwarded record's dedupe id (an upstream's `dedupeId: user-property`). */
export const DEDUPE_PROPERTY = 'edgemq-dedupe-id'

/**
 * The dedupe id an MQTT 5 PUBLISH carries in its {@link DEDUPE_PROPERTY} user property: null without one, `invalid`
 * when it is not one id of the form `<gatewayId>/<tenant>/<stream>/<partition>/<offset>` (repeated, or malformed).
 */
export function dedupePropertyOf (userProperties: Readonly<Record<string, string | string[]>> | undefined): string | 'invalid' | null {
  const value = userProperties?.[DEDUPE_PROPERTY]
  if (value === undefined) return null
  if (typeof value !== 'string') return 'invalid'
  return isDedupeId(value.split('/')) ? value : 'invalid'
}

function isDedupeId (levels: readonly string[]): boolean {
  if (levels.length !== 5) return false
  const [gateway, tenant, stream, partition, offset] = levels as [string, string, string, string, string]
  return gateway !== '' && tenant !== '' && stream !== '' && /^(0|[1-9][0-9]{0,15})$/.test(partition) && /^(0|[1-9][0-9]{0,15})$/.test(offset)
}
