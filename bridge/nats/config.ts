/**
 * The `nats` slice of an upstream's config (kind `nats`, or a nats:// URL):
 * the subject template, the JetStream stream the records go to (checked, or
 * created from this config), the extra credentials NATS has beside
 * user/password and TLS, and the durable pull consumer of commands.
 * `natsConfigProblem` checks what the schema cannot and names the key.
 */
import { parseCommandMapping } from '../topic-template.ts'
import { parseSubjectTemplate, topicToSubject } from './subjects.ts'

export const NATS_URL_SCHEMES = ['nats:', 'tls:']

const streamSchema = {
  type: 'object',
  additionalProperties: false,
  default: {},
  description: 'The JetStream stream the records are published to.',
  properties: {
    name: { type: 'string', pattern: '^[A-Za-z0-9_-]{1,64}$', default: 'EDGEMQ', description: 'Stream name.' },
    create: {
      type: 'boolean', default: false,
      description: 'Create the stream from this config when it does not exist. Without it a missing stream is an error (BRIDGE_NATS_STREAM_MISSING) ' +
        'and the uplink waits, retrying, until someone creates it. An existing stream is never changed, only checked.',
    },
    subjects: {
      type: 'array', items: { type: 'string' }, minItems: 1, default: ['edgemq.>'],
      description: 'Subjects of a stream the gateway creates. An existing stream must cover every subject the upstream publishes to.',
    },
    replicas: { type: 'integer', minimum: 1, maximum: 5, default: 1, description: 'Replicas of a stream the gateway creates (3 on a cluster: R3).' },
    storage: { enum: ['file', 'memory'], default: 'file', description: 'Storage of a stream the gateway creates.' },
    maxAgeMs: { type: 'integer', minimum: 0, default: 0, description: 'Maximum age of messages in a stream the gateway creates (0: unlimited).' },
    duplicateWindowMs: {
      type: 'integer', minimum: 1000, default: 3_600_000,
      description: 'Duplicate window of a stream the gateway creates: publishes with a Nats-Msg-Id seen within it are dropped (must be at least ' +
        'minDuplicateWindowMs).',
    },
  },
} as const

const natsSchema = {
  type: 'object',
  additionalProperties: false,
  default: {},
  description: 'NATS JetStream settings of an upstream of kind `nats` (ignored for MQTT upstreams).',
  properties: {
    subject: {
      type: 'string', default: 'edgemq.{site}.{tenant}.{stream}.{topic}',
      description: 'Subject of a forwarded record: literal subject text with {site} {region} {upstream} {tenant} {stream} {partition} {key} {topic}; ' +
        'each value escaped to a valid token, {topic} as one token per level (last). See docs/bridge.md#nats-jetstream-upstreams.',
    },
    receiptSubject: {
      type: 'string', default: 'edgemq.{site}.receipts.{topic}',
      description: 'Subject of a command\'s delivery or expiry receipt; {topic} is the command\'s local topic.',
    },
    stream: streamSchema,
    minDuplicateWindowMs: {
      type: 'integer', minimum: 1000, default: 3_600_000,
      description: 'The stream\'s duplicate window must be at least this long, or the uplink refuses to start (BRIDGE_NATS_DUPLICATE_WINDOW): a ' +
        'record re-sent later than the window after its first publish would be stored twice.',
    },
    ackTimeoutMs: {
      type: 'integer', minimum: 100, default: 10_000,
      description: 'A publish not acknowledged (PubAck) within this long makes the uplink reconnect and resend from its acknowledged offsets.',
    },
    token: { type: 'string', description: 'Token authentication (instead of username/password).' },
    nkeySeedFile: { type: 'string', description: 'File holding the NKey seed (`SU…`) to authenticate with.' },
    credsFile: { type: 'string', description: 'A .creds file (user JWT and NKey seed, NATS decentralized auth).' },
    consumer: {
      type: 'string', pattern: '^[A-Za-z0-9_-]{1,64}$',
      description: 'Durable name of the pull consumer of commands (default `edgemq-<gatewayId>-<name>`).',
    },
    commandStream: {
      type: 'string', pattern: '^[A-Za-z0-9_-]{1,64}$',
      description: 'Stream that holds the commands for this site (default: stream.name). It must exist, covering the commands\' remote subjects.',
    },
  },
} as const

export const natsUpstreamSchema = natsSchema

export interface NatsStreamConfig {
  readonly name: string
  readonly create: boolean
  readonly subjects: readonly string[]
  readonly replicas: number
  readonly storage: 'file' | 'memory'
  readonly maxAgeMs: number
  readonly duplicateWindowMs: number
}

export interface NatsConfig {
  readonly subject: string
  readonly receiptSubject: string
  readonly stream: NatsStreamConfig
  readonly minDuplicateWindowMs: number
  readonly ackTimeoutMs: number
  readonly token?: string
  readonly nkeySeedFile?: string
  readonly credsFile?: string
  readonly consumer?: string
  readonly commandStream?: string
}

/** What natsConfigProblem needs of the upstream entry. */
export interface NatsUpstreamView {
  readonly url: string
  readonly username?: string
  readonly password?: string
  readonly tls: { readonly cert?: string, readonly key?: string }
  readonly nats: NatsConfig
  readonly commands: ReadonlyArray<{ readonly remote: string, readonly local: string }>
}

/** The server URLs of a nats upstream's `url` (a comma-separated list, as the nats CLI takes). */
export function natsServers (url: string): string[] {
  return url.split(',').map((s) => s.trim()).filter((s) => s !== '')
}

/** The first problem of a nats upstream at `at` (e.g. `bridge.upstreams.0`), or null. */
export function natsConfigProblem (u: NatsUpstreamView, at: string, values: { site: string, region: string, upstream: string }): string | null {
  const servers = natsServers(u.url)
  if (servers.length === 0) return `"${at}.url" is empty`
  for (const s of servers) {
    let url: URL
    try {
      url = new URL(s)
    } catch {
      return `"${at}.url" is not a URL: ${JSON.stringify(s)}`
    }
    if (!NATS_URL_SCHEMES.includes(url.protocol)) {
      return `"${at}.url" of a nats upstream must be nats:// or tls:// URLs, comma-separated (got ${url.protocol}//)`
    }
    if (url.hostname === '') return `"${at}.url" has no host: ${JSON.stringify(s)}`
  }
  const n = u.nats
  const ways = [u.username !== undefined, n.token !== undefined, n.nkeySeedFile !== undefined, n.credsFile !== undefined].filter(Boolean).length
  if (ways > 1) return `"${at}" sets more than one of username, nats.token, nats.nkeySeedFile and nats.credsFile: NATS takes one way to authenticate`
  if (u.password !== undefined && u.username === undefined) return `"${at}.password" needs username`
  for (const key of ['subject', 'receiptSubject'] as const) {
    try {
      parseSubjectTemplate(n[key])
    } catch (err) {
      return `"${at}.nats.${key}" ${(err as Error).message}`
    }
  }
  if (n.stream.duplicateWindowMs < n.minDuplicateWindowMs) {
    return `"${at}.nats.stream.duplicateWindowMs" (${n.stream.duplicateWindowMs}) is below nats.minDuplicateWindowMs (${n.minDuplicateWindowMs})`
  }
  for (const [k, c] of u.commands.entries()) {
    let remote: string
    try {
      remote = parseCommandMapping(c.remote, c.local, values).remoteFilter
    } catch (err) {
      return `"${at}.commands.${k}" ${(err as Error).message}`
    }
    if (remote.split('/').some((level) => level === '')) return `"${at}.commands.${k}.remote" has an empty level: no NATS subject filter matches it`
  }
  return null
}

/** An MQTT command filter as a NATS subject filter: `+` → `*`, a trailing `#` → `>`, other levels escaped. */
export function filterToSubject (filter: string): string {
  return filter.split('/').map((level) => level === '+' ? '*' : level === '#' ? '>' : topicToSubject(level)).join('.')
}
