/**
 * The bridge's slice of the gateway's config schema: the upstream clusters
 * (regions) the log is replicated to, and the command topics brought down
 * from them. Every key has a default and a description. `bridgeConfigProblem`
 * checks what a schema cannot (streams exist, URLs and templates parse) and
 * names the key; the gateway refuses to start on the first problem.
 */
import { NATS_URL_SCHEMES, natsConfigProblem, natsUpstreamSchema, type NatsConfig } from './nats/config.ts'
import { parseCommandMapping, parseTemplate, RECORD_VARIABLES, filterProblem } from './topic-template.ts'

const NAME = '^[A-Za-z0-9][A-Za-z0-9._-]{0,59}$'

/**
 * An upstream's consumer group is `bridge.<name>`: a store group without a tenant prefix, so no tenant can name or
 * move it; tenants see it listed beside their own groups, read-only.
 */
export const BRIDGE_GROUP_PREFIX = 'bridge.'

const forwardSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['stream'],
  properties: {
    tenant: { type: 'string', default: 'default', description: 'Tenant whose stream is forwarded.' },
    stream: { type: 'string', description: 'Stream to forward (a key of `streams`).' },
    filter: {
      type: 'string', default: '#',
      description: 'Only records whose MQTT topic matches this filter are forwarded; the others are skipped (and count as done).',
    },
    priority: {
      type: 'integer', minimum: 0, maximum: 9, default: 0,
      description: 'Higher first: from its append on, a record of a higher-priority stream goes before a lower one\'s backlog (bar what is in flight).',
    },
  },
} as const

const commandSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['remote', 'local'],
  properties: {
    remote: { type: 'string', description: 'Topic filter subscribed to on the upstream; {site}, {region} and {upstream} are filled in.' },
    local: {
      type: 'string',
      description: 'Local topic filter of the same shape: the n-th + takes what the remote n-th + matched, a trailing # the rest. Must route to a stream.',
    },
    tenant: { type: 'string', default: 'default', description: 'Tenant the commands are delivered in.' },
    ttlMs: {
      type: 'integer', minimum: 0, default: 0,
      description: 'Commands not delivered within this many ms expire (0: never). An MQTT 5 message expiry interval, when shorter, wins.',
    },
  },
} as const

const upstreamSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['name', 'url'],
  properties: {
    name: {
      type: 'string', pattern: NAME,
      description: 'Name of the upstream: its consumer group is `bridge.<name>`, its dead-letter stream `dlq.<name>`, its metrics label `upstream`.',
    },
    region: { type: 'string', default: '', description: 'Region label, shown in the status and usable as {region} in templates.' },
    url: {
      type: 'string',
      description: 'Broker URL: mqtt://, mqtts://, ws:// or wss:// with host and port; for kind `nats`, nats:// or tls:// URLs of the cluster\'s ' +
        'servers, comma-separated.',
    },
    kind: {
      enum: ['mqtt', 'edgemq', 'nats'], default: 'mqtt',
      description: 'What the upstream is: `mqtt`, any MQTT broker (Mosquitto, EMQX, HiveMQ, AWS IoT…), whose subscribers get the topics unchanged; `edgemq`, ' +
        'another edgemq gateway, which takes the dedupe id as a `$dedupe/<id>/` topic prefix and stores each record exactly once; `nats`, a NATS ' +
        'JetStream cluster, each record published with its dedupe id as Nats-Msg-Id (exactly once within the stream\'s duplicate window). ' +
        'A nats:// or tls:// URL makes the upstream `nats` whatever this says.',
    },
    mqttVersion: {
      enum: ['auto', '5', '3.1.1'], default: 'auto',
      description: 'Protocol version spoken to the upstream. `auto`: MQTT 5, and MQTT 3.1.1 (without dedupe ids) if the upstream refuses 5 at CONNACK; for ' +
        'kind `edgemq`, 3.1.1 with the $dedupe/ topic prefix (`5` sends the dedupe id as the edgemq-dedupe-id user property, which edgemq honours too).',
    },
    clientId: { type: 'string', description: 'Client id at the upstream. Defaults to `edgemq-<gatewayId>-<name>`.' },
    username: { type: 'string', description: 'Username at the upstream.' },
    password: { type: 'string', description: 'Password at the upstream (plain text; keep the config file private).' },
    tls: {
      type: 'object',
      additionalProperties: false,
      default: {},
      description: 'TLS for mqtts://, wss:// and tls:// (NATS) upstreams; a NATS upstream uses it too when the server asks for TLS.',
      properties: {
        ca: { type: 'string', description: 'PEM CA bundle that signs the upstream\'s certificate (default: the system\'s).' },
        cert: { type: 'string', description: 'PEM client certificate file, for upstreams that require one.' },
        key: { type: 'string', description: 'PEM private key of the client certificate.' },
        rejectUnauthorized: { type: 'boolean', default: true, description: 'Refuse an upstream whose certificate does not verify.' },
      },
    },
    forward: {
      type: 'array', items: forwardSchema, default: [{ stream: 'telemetry' }, { stream: 'events' }],
      description: 'Streams (and topic filters) replicated to this upstream.',
    },
    topicTemplate: {
      type: 'string', default: '{topic}',
      description: 'Remote topic of a forwarded record; variables {site} {region} {upstream} {tenant} {stream} {partition} {key} {topic}.',
    },
    dedupeId: {
      enum: ['user-property', 'topic-prefix', 'none'],
      description: 'How each message carries its dedupe id `<gatewayId>/<tenant>/<stream>/<partition>/<offset>`: an MQTT 5 user property `edgemq-dedupe-id`, ' +
        'a topic prefix `$dedupe/<id>/` that an upstream edgemq strips (kind `edgemq` only), or not at all. Defaults to user-property over MQTT 5, ' +
        'topic-prefix for kind `edgemq`, none over MQTT 3.1.1 to any other broker.',
    },
    maxInflight: {
      type: 'integer', minimum: 1, maximum: 65535, default: 100,
      description: 'QoS 1 messages sent and not yet PUBACKed (capped by an MQTT 5 upstream\'s receive maximum).',
    },
    maxMessagesPerSecond: { type: 'number', minimum: 0, default: 0, description: 'Send at most this many messages per second (0: unlimited).' },
    maxBytesPerSecond: { type: 'number', minimum: 0, default: 0, description: 'Send at most this many payload bytes per second (0: unlimited).' },
    maxDeliveryAttempts: {
      type: 'integer', minimum: 1, default: 5,
      description: 'A message the upstream refuses this many times goes to the dead-letter stream `dlq.<name>`.',
    },
    reconnectMinMs: { type: 'integer', minimum: 10, default: 500, description: 'First reconnect delay; doubles per failed attempt, with full jitter.' },
    reconnectMaxMs: { type: 'integer', minimum: 10, default: 30_000, description: 'Largest reconnect delay.' },
    connectTimeoutMs: { type: 'integer', minimum: 100, default: 10_000, description: 'Give up a connection attempt after this long.' },
    keepaliveSeconds: { type: 'integer', minimum: 0, maximum: 65535, default: 30, description: 'MQTT keep-alive towards the upstream.' },
    commands: { type: 'array', items: commandSchema, default: [], description: 'Remote command topics brought down to local devices.' },
    receiptTopic: {
      type: 'string', default: 'sites/{site}/receipts/{topic}',
      description: 'Remote topic of a command\'s delivery or expiry receipt; {topic} is the command\'s local topic.',
    },
    nats: natsUpstreamSchema,
  },
} as const

export const bridgeConfigSchema = {
  type: 'object',
  additionalProperties: false,
  default: {},
  description: 'Replication of the log to upstream clusters, and commands brought down from them.',
  properties: {
    upstreams: { type: 'array', items: upstreamSchema, default: [], description: 'Upstream clusters (regions), each replicated independently.' },
    commitIntervalMs: {
      type: 'integer', minimum: 10, default: 200,
      description: 'How often each upstream commits its acknowledged offsets (a restart resends at most this much, marked by dedupe ids).',
    },
  },
} as const

export interface ForwardConfig {
  readonly tenant: string
  readonly stream: string
  readonly filter: string
  readonly priority: number
}

export interface CommandConfig {
  readonly remote: string
  readonly local: string
  readonly tenant: string
  readonly ttlMs: number
}

export interface UpstreamConfig {
  readonly name: string
  readonly region: string
  readonly url: string
  /** As configured; a nats:// or tls:// URL makes it `nats` (read it with upstreamKind). */
  readonly kind: UpstreamKind
  readonly mqttVersion: 'auto' | '3.1.1' | '5'
  readonly clientId?: string
  readonly username?: string
  readonly password?: string
  readonly tls: { readonly ca?: string, readonly cert?: string, readonly key?: string, readonly rejectUnauthorized: boolean }
  readonly forward: readonly ForwardConfig[]
  readonly topicTemplate: string
  readonly dedupeId?: 'user-property' | 'topic-prefix' | 'none'
  readonly maxInflight: number
  readonly maxMessagesPerSecond: number
  readonly maxBytesPerSecond: number
  readonly maxDeliveryAttempts: number
  readonly reconnectMinMs: number
  readonly reconnectMaxMs: number
  readonly connectTimeoutMs: number
  readonly keepaliveSeconds: number
  readonly commands: readonly CommandConfig[]
  readonly receiptTopic: string
  readonly nats: NatsConfig
}

export type UpstreamKind = 'mqtt' | 'edgemq' | 'nats'

/** The upstream's kind: `nats` for a nats:// or tls:// URL (no MQTT client speaks those), else as configured. */
export function upstreamKind (u: Pick<UpstreamConfig, 'kind' | 'url'>): UpstreamKind {
  return NATS_URL_SCHEMES.some((s) => u.url.trimStart().startsWith(`${s}//`)) ? 'nats' : u.kind
}

export interface BridgeConfig {
  readonly upstreams: readonly UpstreamConfig[]
  readonly commitIntervalMs: number
}

/** What the rest of the config says, for the checks the schema cannot make. */
export interface BridgeConfigContext {
  readonly gatewayId: string
  readonly tenants: readonly string[]
  readonly streams: readonly string[]
}

const URL_SCHEMES = ['mqtt:', 'mqtts:', 'ws:', 'wss:']

/** The first problem of a schema-valid bridge slice, naming its key, or null. */
export function bridgeConfigProblem (bridge: BridgeConfig, context: BridgeConfigContext): string | null {
  const names = new Set<string>()
  for (const [i, u] of bridge.upstreams.entries()) {
    const at = `bridge.upstreams.${i}`
    if (names.has(u.name)) return `"${at}.name" duplicates upstream name "${u.name}"`
    names.add(u.name)
    if (u.kind === 'edgemq' && upstreamKind(u) === 'nats') return `"${at}.url" is a NATS URL but kind is "edgemq" (leave kind out, or set "nats")`
    if (upstreamKind(u) === 'nats') {
      const problem = natsConfigProblem(u, at, { site: context.gatewayId, region: u.region, upstream: u.name })
      if (problem !== null) return problem
      if (u.reconnectMaxMs < u.reconnectMinMs) return `"${at}.reconnectMaxMs" is below reconnectMinMs`
      if ((u.tls.cert === undefined) !== (u.tls.key === undefined)) return `"${at}.tls" needs both cert and key, or neither`
      const forwardProblem = forwardsProblem(u, at, context)
      if (forwardProblem !== null) return forwardProblem
      for (const [k, c] of u.commands.entries()) {
        if (!context.tenants.includes(c.tenant)) return `"${at}.commands.${k}.tenant" names unknown tenant "${c.tenant}" (known: ${context.tenants.join(', ')})`
      }
      continue
    }
    let url: URL
    try {
      url = new URL(u.url)
    } catch {
      return `"${at}.url" is not a URL: ${JSON.stringify(u.url)}`
    }
    if (!URL_SCHEMES.includes(url.protocol)) return `"${at}.url" must start with mqtt://, mqtts://, ws:// or wss:// (got ${url.protocol}//)`
    if (url.hostname === '') return `"${at}.url" has no host: ${JSON.stringify(u.url)}`
    if (u.dedupeId === 'user-property' && !protocolVersions(u).includes(5)) return `"${at}.dedupeId" user-property needs mqttVersion "5"`
    if (u.dedupeId === 'topic-prefix' && u.kind !== 'edgemq') {
      return `"${at}.dedupeId" topic-prefix is only for kind "edgemq": a plain MQTT broker would hand its subscribers the prefixed topics`
    }
    if (u.reconnectMaxMs < u.reconnectMinMs) return `"${at}.reconnectMaxMs" is below reconnectMinMs`
    if ((u.tls.cert === undefined) !== (u.tls.key === undefined)) return `"${at}.tls" needs both cert and key, or neither`
    const forwardProblem = forwardsProblem(u, at, context)
    if (forwardProblem !== null) return forwardProblem
    try {
      parseTemplate(u.topicTemplate, RECORD_VARIABLES)
    } catch (err) {
      return `"${at}.topicTemplate" ${(err as Error).message}`
    }
    try {
      parseTemplate(u.receiptTopic, RECORD_VARIABLES)
    } catch (err) {
      return `"${at}.receiptTopic" ${(err as Error).message}`
    }
    const values = { site: context.gatewayId, region: u.region, upstream: u.name }
    for (const [k, c] of u.commands.entries()) {
      if (!context.tenants.includes(c.tenant)) return `"${at}.commands.${k}.tenant" names unknown tenant "${c.tenant}" (known: ${context.tenants.join(', ')})`
      try {
        parseCommandMapping(c.remote, c.local, values)
      } catch (err) {
        return `"${at}.commands.${k}" ${(err as Error).message}`
      }
    }
  }
  return null
}

function forwardsProblem (u: UpstreamConfig, at: string, context: BridgeConfigContext): string | null {
  for (const [k, f] of u.forward.entries()) {
    if (!context.tenants.includes(f.tenant)) return `"${at}.forward.${k}.tenant" names unknown tenant "${f.tenant}" (known: ${context.tenants.join(', ')})`
    if (!context.streams.includes(f.stream)) return `"${at}.forward.${k}.stream" names unknown stream "${f.stream}" (known: ${context.streams.join(', ')})`
    const bad = filterProblem(f.filter)
    if (bad !== null) return `"${at}.forward.${k}.filter" is not a valid MQTT topic filter: ${bad}`
  }
  return null
}

export type DedupeCarrier = 'user-property' | 'topic-prefix' | 'none'
export type ProtocolVersion = 4 | 5

/** The MQTT protocol levels tried with an upstream, in order: `auto` falls back from 5 to 3.1.1 (level 4). */
export function protocolVersions (u: UpstreamConfig): readonly ProtocolVersion[] {
  if (u.mqttVersion === '5') return [5]
  if (u.mqttVersion === '3.1.1' || u.kind === 'edgemq') return [4]
  return [5, 4]
}

/** How an upstream's messages carry their dedupe id over protocol level `version`, with the defaults filled in. */
export function dedupeCarrier (u: UpstreamConfig, version: ProtocolVersion): DedupeCarrier {
  if (u.dedupeId === 'user-property') return version === 5 ? 'user-property' : 'none' // an `auto` upstream that refused 5
  if (u.dedupeId !== undefined) return u.dedupeId
  if (version === 5) return 'user-property'
  return u.kind === 'edgemq' ? 'topic-prefix' : 'none'
}
