/**
 * The gateway's configuration: one JSON Schema composed of per-folder slices,
 * every key with a default and a description, unknown keys rejected. A file
 * (YAML or JSON) is parsed, validated, filled with defaults and frozen; the
 * first problem stops start-up with a message that names the key.
 *
 * `describeConfig()` walks the same schema to print the reference that
 * docs/configuration.md is generated from (`npm run docs`).
 */
import os from 'node:os'
import type { ErrorObject } from 'ajv'
import { bridgeConfigProblem, bridgeConfigSchema, type BridgeConfig } from '../../bridge/index.ts'
import { storeConfigSchema, streamConfigSchema, type StoreConfig, type StreamConfig } from '../../store/config-schema.ts'
import { GatewayError } from '../errors.ts'
import { replicationConfigProblem, replicationConfigSchema, type ReplicationConfig } from '../replication/config-schema.ts'
import { LOG_LEVELS, type LogLevel } from '../logger.ts'
import { cachedValidator } from './validator-cache.ts'

const NAME = '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'

const listenerSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['type'],
  properties: {
    name: { type: 'string', pattern: NAME, description: 'Listener name, used as the `listener` label of metrics. Defaults to the type.' },
    type: { enum: ['tcp', 'tls', 'ws', 'wss'], description: 'tcp: MQTT over TCP; tls: MQTT over TLS; ws / wss: MQTT over WebSocket (plain / TLS).' },
    host: { type: 'string', default: '127.0.0.1', description: 'Address to bind. Anything but a loopback address needs users or allowAnonymous: true.' },
    port: { type: 'integer', minimum: 0, maximum: 65535, default: 1883, description: 'Port to bind; 0 picks a free one (printed at start-up).' },
    path: { type: 'string', default: '/mqtt', description: 'HTTP path of a WebSocket listener.' },
    allowAnonymous: {
      type: 'boolean', default: false,
      description: 'Accept clients without credentials on this listener, as tenant "default". Loopback listeners without users accept anonymous clients ' +
        'anyway; a non-loopback listener refuses to start unless this is true or users are configured.',
    },
    tls: {
      type: 'object',
      additionalProperties: false,
      required: ['cert', 'key'],
      description: 'TLS settings (required for tls and wss).',
      properties: {
        cert: { type: 'string', description: 'PEM certificate chain file.' },
        key: { type: 'string', description: 'PEM private key file.' },
        ca: { type: 'string', description: 'PEM CA bundle used to verify client certificates.' },
        requestCert: { type: 'boolean', default: false, description: 'Ask clients for a certificate and refuse those the CA does not sign.' },
        certIdentity: {
          type: 'boolean', default: false,
          description: 'Take the username from the client certificate\'s subject CN (the user must exist; no password needed).',
        },
      },
    },
  },
} as const

const userSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['username', 'tenant', 'role'],
  properties: {
    username: { type: 'string', minLength: 1, maxLength: 256, description: 'MQTT username.' },
    password: {
      type: 'string',
      pattern: '^scrypt\\$',
      description: 'Password hash printed by `edgemq passwd` (scrypt$N$r$p$salt$hash). Omit for certificate-only users.',
    },
    tenant: { type: 'string', pattern: NAME, description: 'Tenant the user belongs to.' },
    role: {
      enum: ['device', 'service', 'admin'],
      description: 'device: its own device topics; service: every topic of its tenant; admin: everything of its tenant plus the admin API.',
    },
    clientIdPattern: {
      type: 'string',
      minLength: 1,
      maxLength: 256,
      description: 'Client ids this user may connect with: %u is the username, * any run of characters (at least one) without / + #. Default for device ' +
        'users: %u (the client id must equal the username); other roles: any client id not bound to another user. A CONNECT with another client id is ' +
        'refused with return code 2 (identifier rejected); so is an unbound user or anonymous client using an id a bound user of its tenant owns.',
    },
  },
} as const

const apiTokenSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['name', 'tokenHash', 'tenant', 'role'],
  properties: {
    name: { type: 'string', pattern: NAME, description: 'Name of the token, unique; it is part of the token (emq_<name>_<secret>) and appears in logs.' },
    tokenHash: {
      type: 'string',
      pattern: '^scrypt\\$',
      description: 'Hash printed by `edgemq token` (scrypt$N$r$p$salt$hash); the token itself is never stored.',
    },
    tenant: { type: 'string', pattern: NAME, description: 'Tenant whose streams and groups the token reaches.' },
    role: {
      enum: ['device', 'service', 'admin'],
      description: 'As for users: service and admin tokens may use the /v1 API; a device token is refused (403), as device users are.',
    },
  },
} as const

const aclRuleSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['topic', 'access'],
  properties: {
    role: { enum: ['device', 'service', 'admin', 'anonymous'], description: 'Rule applies to clients of this role (omit: any role).' },
    username: { type: 'string', description: 'Rule applies to this user only (omit: any user).' },
    topic: { type: 'string', minLength: 1, description: 'Topic filter, within the client\'s tenant; %u is replaced by the username, %c by the client id.' },
    access: {
      enum: ['publish', 'subscribe', 'both', 'replicate'],
      description: 'What the rule grants (or denies). both is publish and subscribe; replicate lets a bridge publish replicated records ' +
        '($dedupe/<id>/<topic>) to topics the filter matches — no built-in rule grants it, and device users never have it.',
    },
    allow: { type: 'boolean', default: true, description: 'false makes the rule deny; the first matching rule decides.' },
  },
} as const

const routeSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['filter', 'stream'],
  properties: {
    filter: { type: 'string', minLength: 1, description: 'MQTT topic filter (+ and # allowed) matched against the topic a device publishes to.' },
    stream: { type: 'string', pattern: NAME, description: 'Stream (in the publisher\'s tenant) the matching messages are appended to.' },
    keyLevel: { type: 'integer', minimum: 0, default: 1, description: 'Zero-based topic level holding the partition key (the device id in devices/{id}/...).' },
  },
} as const

export const configSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    gatewayId: {
      type: 'string',
      pattern: NAME,
      description: 'Name of this gateway (in dedupe ids, the bridge\'s client ids and metrics). Without it, `edgemq start` generates one on the first ' +
        'start and keeps it in <dataDir>/gateway-id; a configured id that differs from the kept one is logged as a warning (GW_WARN_GATEWAY_ID_CHANGED).',
    },
    dataDir: { type: 'string', default: './data', description: 'Directory of the LevelDB holding the log and the MQTT sessions.' },
    store: storeConfigSchema,
    tenants: {
      type: 'array', items: { type: 'string', pattern: NAME }, default: ['default'], uniqueItems: true,
      description: 'Tenants and their isolated topic spaces. Tenants named by users and API tokens are added automatically.',
    },
    streams: {
      type: 'object',
      additionalProperties: streamConfigSchema,
      propertyNames: { pattern: NAME },
      default: {
        telemetry: { partitions: 8 },
        events: { partitions: 4 },
        commands: { partitions: 4 },
      },
      description: 'Streams every tenant has, by name.',
    },
    routes: {
      type: 'array',
      items: routeSchema,
      default: [
        { filter: 'devices/+/telemetry/#', stream: 'telemetry', keyLevel: 1 },
        { filter: 'devices/+/events/#', stream: 'events', keyLevel: 1 },
        { filter: 'devices/+/commands/#', stream: 'commands', keyLevel: 1 },
      ],
      description: 'Which published topics go to which stream; the first matching route wins.',
    },
    unrouted: {
      enum: ['deliver', 'reject'], default: 'deliver',
      description: 'What happens to a publish no route matches: deliver it to live subscribers without logging it, or reject it ' +
        '(an MQTT 3.1.1 QoS 1/2 client is disconnected, as 3.1.1 has no negative PUBACK; an MQTT 5 client gets PUBACK/PUBREC 0x90).',
    },
    mqtt: {
      type: 'object',
      additionalProperties: false,
      default: {},
      description: 'The MQTT front door.',
      properties: {
        listeners: { type: 'array', items: listenerSchema, minItems: 1, default: [{ type: 'tcp' }], description: 'Where devices connect.' },
        maxPacketBytes: {
          type: 'integer',
          minimum: 64,
          maximum: 256 * 1024 * 1024,
          default: 256 * 1024,
          description: 'Largest MQTT packet accepted; a bigger one closes the connection before its body is buffered ' +
            '(an MQTT 5 client gets DISCONNECT 0x95 first).',
        },
        maxConnections: { type: 'integer', minimum: 1, default: 10_000, description: 'Connections beyond this are refused.' },
        compactAfterConnections: {
          type: 'integer',
          minimum: 0,
          default: 1000,
          description: 'After this many new connections, once none came for 5 s, the gateway runs one compacting garbage collection ' +
            'to give the memory the burst of CONNECTs left behind back to the system (docs/operations.md, "Memory after a burst of ' +
            'connections"); it pauses the gateway for as long as it runs (logged, about 0.5 s at 10,000 connections). 0 turns it off.',
        },
        maxInflightPerClient: {
          type: 'integer',
          minimum: 1,
          maximum: 65535,
          default: 1000,
          description: 'QoS 1/2 publishes of one client being appended at once; the socket is paused beyond it. ' +
            'The receive maximum MQTT 5 clients are given: one with more unacknowledged gets DISCONNECT 0x93.',
        },
        slowSubscriberTimeoutMs: {
          type: 'integer',
          minimum: 0,
          default: 10_000,
          description: 'A connection whose socket takes no bytes for this long while the gateway has more to write to it (a subscriber that ' +
            'stopped reading) is closed, counted (edgemq_mqtt_connections_refused_total{reason="slow-subscriber"}) and logged: meanwhile ' +
            'the acks of the devices publishing to it wait (backpressure), so one stuck subscriber may not stall them longer. ' +
            'Its persistent session keeps what it did not get. 0 never closes it.',
        },
        publishRatePerClient: {
          type: 'number',
          minimum: 0,
          default: 0,
          description: 'Publishes per second one client may send (token bucket); 0 is unlimited. A client over the limit is slowed down by pausing its socket.',
        },
        maxPendingAppends: {
          type: 'integer',
          minimum: 1,
          default: 50_000,
          description: 'When the log has more appends pending than this, every socket stops being read until it drains.',
        },
        maxFiltersPerSubscribe: {
          type: 'integer', minimum: 1, maximum: 65535, default: 1000,
          description: 'Topic filters one SUBSCRIBE may carry; every filter of a SUBSCRIBE with more is refused (SUBACK 0x80).',
        },
        maxSubscriptionsPerSession: {
          type: 'integer', minimum: 1, default: 10_000,
          description: 'Subscriptions one client may hold; a new filter beyond it is refused (SUBACK 0x80), a resubscription to a held one is not.',
        },
        maxQueuedMessagesPerSession: {
          type: 'integer', minimum: 1, default: 100_000,
          description: 'Messages a persistent session keeps as copies (topics no route sends to the log, and QoS 2 deliveries); ' +
            'beyond it the newest is dropped, counted in edgemq_mqtt_session_queue_dropped_total and logged once per episode.',
        },
        sessionExpirySeconds: {
          type: 'integer', minimum: 0, maximum: 4294967294, default: 0,
          description: 'A persistent session offline for longer than this is dropped with its queue and cursors (and their hold on ' +
            'retention), counted in edgemq_mqtt_sessions_expired_total and logged, also when the time ran out while the gateway was down. ' +
            'It bounds an MQTT 5 Session Expiry Interval too (told in the CONNACK). 0 keeps sessions forever.',
        },
        sessionInflight: {
          type: 'integer', minimum: 1, maximum: 65535, default: 1000,
          description: 'QoS 1 messages from the log a connected persistent session may have sent and not yet acknowledged (PUBACK), ' +
            'or the MQTT 5 client\'s Receive Maximum when lower; reading the log waits for acks beyond it. It bounds a drain to this many ' +
            'messages per round trip to the client (docs/mqtt.md says what 100 costs); after a reconnect up to this many come again, with DUP.',
        },
        sessionInflightBytes: {
          type: 'integer', minimum: 1, maximum: 4294967295, default: 16777216,
          description: 'Bytes those unacknowledged deliveries hold per session: their PUBLISH packets, or the stored batches they were ' +
            'read from (each batch once), the more. A session of large messages, or one matching a record here and there in ' +
            'batches of others, stops at this many bytes before it reaches mqtt.sessionInflight messages, which bounds the memory ' +
            'a client that reads and does not acknowledge holds in the gateway. The delivery that crosses it still goes out, so ' +
            'a record larger than the bound reaches the client. A session that disconnects keeps copies of its unacknowledged ' +
            'records only.',
        },
        replay: {
          type: 'object',
          additionalProperties: false,
          default: {},
          description: 'Replay of the log to MQTT clients that subscribe to $replay/<range>/<topic filter>.',
          properties: {
            inflight: {
              type: 'integer',
              minimum: 1,
              maximum: 65535,
              default: 1000,
              description: 'QoS 1 replay messages sent to a client and not yet acknowledged (PUBACK); the replay waits for acks beyond it.',
            },
            maxPerClient: {
              type: 'integer',
              minimum: 0,
              default: 4,
              description: 'Replays one client may run at once; a further $replay subscription is refused (SUBACK 0x80).',
            },
            maxActive: {
              type: 'integer',
              minimum: 0,
              default: 64,
              description: 'Replays the gateway runs at once, over all clients; 0 turns MQTT replay off.',
            },
          },
        },
        share: {
          type: 'object',
          additionalProperties: false,
          default: {},
          description: 'Shared subscriptions ($share/<group>/<topic filter>): each message goes to one member of the group.',
          properties: {
            inflight: {
              type: 'integer',
              minimum: 1,
              maximum: 65535,
              default: 100,
              description: 'QoS 1 messages of the log a share sends one member and that member has not acknowledged (PUBACK); ' +
                'the member\'s partitions wait beyond it (an MQTT 5 member\'s Receive Maximum, when lower, takes its place). ' +
                'A member that leaves has these sent again to another member.',
            },
            maxPerTenant: {
              type: 'integer',
              minimum: 0,
              default: 1000,
              description: 'Shares (group and filter) one tenant may have, counting those in the log from before; a SUBSCRIBE that would make ' +
                'one more is refused (SUBACK 0x80). Each is a consumer group kept until deleted, so the bound keeps clients that ' +
                'make up group names from filling the store; 0 allows no new share.',
            },
            holdRetention: {
              type: 'boolean',
              default: false,
              description: 'Whether a share\'s consumer group holds retention (as the bridge\'s do): records it has not consumed are then ' +
                'kept past retentionMs, also for a share nobody will use again, which no command deletes yet. Off, a share that was away ' +
                'longer than the retention resumes at the log start (logged).',
            },
          },
        },
      },
    },
    http: {
      type: 'object',
      additionalProperties: false,
      default: {},
      description: 'HTTP server for /health, /metrics and the /v1 API.',
      properties: {
        host: { type: 'string', default: '127.0.0.1', description: 'Address to bind.' },
        port: { type: 'integer', minimum: 0, maximum: 65535, default: 9464, description: 'Port to bind; 0 picks a free one.' },
      },
    },
    users: { type: 'array', items: userSchema, default: [], description: 'Who may connect. With none, only anonymous clients on loopback listeners.' },
    apiTokens: {
      type: 'array', items: apiTokenSchema, default: [],
      description: 'Bearer tokens for the /v1 API (Authorization: Bearer emq_…), each with a tenant and a role like a user. Print one with `edgemq token`.',
    },
    acl: {
      type: 'array', items: aclRuleSchema, default: [],
      description: 'Extra rules, checked before the built-in ones: devices publish to devices/%c/... and subscribe to devices/%c/commands/#; services and ' +
        'admins use every topic of their tenant.',
    },
    log: {
      type: 'object',
      additionalProperties: false,
      default: {},
      description: 'The gateway\'s log on stderr: JSON lines (level names, ISO times), or readable lines on a terminal.',
      properties: {
        level: { enum: [...LOG_LEVELS], default: 'info', description: 'Least severe level logged; `edgemq start --log-level` overrides it.' },
      },
    },
    shutdownTimeoutMs: { type: 'integer', minimum: 100, default: 10_000, description: 'How long SIGTERM/SIGINT wait for pending appends before exiting.' },
    bridge: bridgeConfigSchema,
    replication: replicationConfigSchema,
  },
} as const

export type Role = 'device' | 'service' | 'admin'

export interface ListenerConfig {
  readonly name: string
  readonly type: 'tcp' | 'tls' | 'ws' | 'wss'
  readonly host: string
  readonly port: number
  readonly path: string
  readonly allowAnonymous: boolean
  readonly tls?: {
    readonly cert: string
    readonly key: string
    readonly ca?: string
    readonly requestCert: boolean
    readonly certIdentity: boolean
  }
}

export interface UserConfig {
  readonly username: string
  readonly password?: string
  readonly tenant: string
  readonly role: Role
  readonly clientIdPattern?: string
}

export interface ApiTokenConfig {
  readonly name: string
  readonly tokenHash: string
  readonly tenant: string
  readonly role: Role
}

export interface AclRule {
  readonly role?: Role | 'anonymous'
  readonly username?: string
  readonly topic: string
  readonly access: 'publish' | 'subscribe' | 'both' | 'replicate'
  readonly allow: boolean
}

export interface RouteConfig {
  readonly filter: string
  readonly stream: string
  readonly keyLevel: number
}

export interface GatewayConfig {
  readonly gatewayId: string
  readonly dataDir: string
  readonly store: StoreConfig
  readonly tenants: readonly string[]
  readonly streams: Readonly<Record<string, StreamConfig>>
  readonly routes: readonly RouteConfig[]
  readonly unrouted: 'deliver' | 'reject'
  readonly mqtt: {
    readonly listeners: readonly ListenerConfig[]
    readonly maxPacketBytes: number
    readonly maxConnections: number
    readonly compactAfterConnections: number
    readonly maxInflightPerClient: number
    readonly publishRatePerClient: number
    readonly slowSubscriberTimeoutMs: number
    readonly maxPendingAppends: number
    readonly maxFiltersPerSubscribe: number
    readonly maxSubscriptionsPerSession: number
    readonly sessionInflight: number
    readonly sessionInflightBytes: number
    readonly maxQueuedMessagesPerSession: number
    readonly sessionExpirySeconds: number
    readonly replay: {
      readonly inflight: number
      readonly maxPerClient: number
      readonly maxActive: number
    }
    readonly share: { readonly inflight: number, readonly maxPerTenant: number, readonly holdRetention: boolean }
  }
  readonly http: { readonly host: string, readonly port: number }
  readonly users: readonly UserConfig[]
  readonly apiTokens: readonly ApiTokenConfig[]
  readonly acl: readonly AclRule[]
  readonly log: { readonly level: LogLevel }
  readonly shutdownTimeoutMs: number
  readonly bridge: BridgeConfig
  readonly replication: ReplicationConfig
}

const validate = cachedValidator('config', configSchema, { useDefaults: true, allErrors: false, strict: true, allowUnionTypes: true })

function keyOf (err: ErrorObject): string {
  const path = err.instancePath.replace(/^\//, '').replace(/\//g, '.')
  if (err.keyword === 'additionalProperties') {
    const extra = (err.params as { additionalProperty: string }).additionalProperty
    return path === '' ? extra : `${path}.${extra}`
  }
  if (err.keyword === 'required') {
    const missing = (err.params as { missingProperty: string }).missingProperty
    return path === '' ? missing : `${path}.${missing}`
  }
  return path === '' ? '(top level)' : path
}

function explain (err: ErrorObject): string {
  const key = keyOf(err)
  switch (err.keyword) {
    case 'additionalProperties': return `unknown key "${key}"`
    case 'required': return `missing key "${key}"`
    case 'pattern':
      // A password pasted in clear is the usual cause; say what to put there instead.
      if (/\/(password|tokenHash)$/.test(err.instancePath)) {
        return `"${key}" is not a scrypt hash: put the line \`edgemq passwd\` (or \`edgemq token\`) prints there, never the password itself`
      }
      return `"${key}" ${err.message ?? 'is invalid'}`
    case 'enum': return `"${key}" must be one of ${(err.params as { allowedValues: unknown[] }).allowedValues.map((v) => JSON.stringify(v)).join(', ')}`
    default: return `"${key}" ${err.message ?? 'is invalid'}`
  }
}

/** Validates a parsed config object; fills defaults; checks cross-key rules; freezes. */
export function buildConfig (input: unknown, source = 'config'): GatewayConfig {
  const data: unknown = structuredClone(input ?? {})
  if (data === null || typeof data !== 'object' || Array.isArray(data)) {
    throw new GatewayError('GW_CONFIG_INVALID', `${source}: the config must be a mapping of keys to values`)
  }
  if (!validate(data)) {
    const first = (validate.errors ?? [])[0]
    throw new GatewayError('GW_CONFIG_INVALID', `${source}: ${first === undefined ? 'invalid' : explain(first)}`)
  }
  const config = data as { -readonly [K in keyof GatewayConfig]: GatewayConfig[K] } & { gatewayId?: string }
  config.gatewayId ??= os.hostname().replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[^A-Za-z0-9]+/, '').slice(0, 64) || 'edgemq'
  const tenants = new Set(config.tenants)
  for (const u of config.users) tenants.add(u.tenant)
  for (const t of config.apiTokens) tenants.add(t.tenant)
  config.tenants = [...tenants]
  const names = new Set<string>()
  config.mqtt.listeners.forEach((l, i) => {
    const listener = l as { -readonly [K in keyof ListenerConfig]: ListenerConfig[K] }
    listener.name ??= l.type
    if (names.has(listener.name)) {
      throw new GatewayError('GW_CONFIG_INVALID', `${source}: "mqtt.listeners.${i}.name" duplicates listener name "${listener.name}"`)
    }
    names.add(listener.name)
    if ((l.type === 'tls' || l.type === 'wss') && l.tls === undefined) {
      throw new GatewayError('GW_CONFIG_INVALID', `${source}: "mqtt.listeners.${i}.tls" is required for a ${l.type} listener`)
    }
    if (l.tls?.requestCert === true && l.tls.ca === undefined) {
      throw new GatewayError('GW_CONFIG_INVALID', `${source}: "mqtt.listeners.${i}.tls.ca" is required when requestCert is true`)
    }
  })
  config.routes.forEach((r, i) => {
    if (config.streams[r.stream] === undefined) {
      throw new GatewayError(
        'GW_CONFIG_INVALID',
        `${source}: "routes.${i}.stream" names unknown stream "${r.stream}" (known: ${Object.keys(config.streams).join(', ')})`,
      )
    }
    const levels = r.filter.split('/')
    if (!isTopicFilter(r.filter)) {
      throw new GatewayError('GW_CONFIG_INVALID', `${source}: "routes.${i}.filter" is not a valid MQTT topic filter: ${JSON.stringify(r.filter)}`)
    }
    if (r.keyLevel >= levels.length || levels[r.keyLevel] === '#') {
      throw new GatewayError('GW_CONFIG_INVALID', `${source}: "routes.${i}.keyLevel" ${r.keyLevel} is not a single level of ${r.filter}`)
    }
  })
  // A rule's topic is a filter once %u and %c are replaced: `devices/secret-+/#` would match `+` as text, so a deny
  // rule written so would deny nothing.
  config.acl.forEach((rule, i) => {
    if (!isTopicFilter(rule.topic.replaceAll('%u', 'u').replaceAll('%c', 'c'))) {
      throw new GatewayError('GW_CONFIG_INVALID', `${source}: "acl.${i}.topic" is not a valid MQTT topic filter: ${JSON.stringify(rule.topic)}`)
    }
  })
  const usernames = new Set<string>()
  config.users.forEach((u, i) => {
    if (usernames.has(u.username)) throw new GatewayError('GW_CONFIG_INVALID', `${source}: "users.${i}.username" duplicates "${u.username}"`)
    usernames.add(u.username)
  })
  const tokenNames = new Set<string>()
  config.apiTokens.forEach((t, i) => {
    if (tokenNames.has(t.name)) throw new GatewayError('GW_CONFIG_INVALID', `${source}: "apiTokens.${i}.name" duplicates "${t.name}"`)
    tokenNames.add(t.name)
  })
  const bridgeProblem = bridgeConfigProblem(config.bridge, { gatewayId: config.gatewayId, tenants: config.tenants, streams: Object.keys(config.streams) })
  if (bridgeProblem !== null) throw new GatewayError('GW_CONFIG_INVALID', `${source}: ${bridgeProblem}`)
  const replicationProblem = replicationConfigProblem(config.replication)
  if (replicationProblem !== null) throw new GatewayError('GW_CONFIG_INVALID', `${source}: ${replicationProblem}`)
  return deepFreeze(config as GatewayConfig)
}

function deepFreeze<T> (value: T): T {
  if (value !== null && typeof value === 'object') {
    for (const v of Object.values(value)) deepFreeze(v)
    Object.freeze(value)
  }
  return value
}

export interface ConfigKeyDoc {
  readonly key: string
  readonly default: string
  readonly description: string
}

/** Flattens the schema into one row per key, for docs/configuration.md and its test. */
export function describeConfig (): ConfigKeyDoc[] {
  const rows: ConfigKeyDoc[] = []
  const walk = (schema: Record<string, unknown>, prefix: string): void => {
    const props = schema.properties as Record<string, Record<string, unknown>> | undefined
    if (props === undefined) return
    for (const [name, sub] of Object.entries(props)) {
      const key = prefix + name
      rows.push({ key, default: sub.default === undefined ? '' : JSON.stringify(sub.default), description: String(sub.description ?? '') })
      if (sub.type === 'object') walk(sub, `${key}.`)
      const items = sub.items as Record<string, unknown> | undefined
      if (items?.type === 'object') walk(items, `${key}[].`)
      const additional = sub.additionalProperties as Record<string, unknown> | boolean | undefined
      if (typeof additional === 'object') walk(additional, `${key}.<name>.`)
    }
  }
  walk(configSchema as unknown as Record<string, unknown>, '')
  return rows
}

/** Whether `filter` is a valid MQTT topic filter: `#` only as a whole last level, `+` only as a whole level, no NUL [MQTT-4.7.1]. */
function isTopicFilter (filter: string): boolean {
  const levels = filter.split('/')
  return !filter.includes('\u0000') &&
    levels.every((level, k) => (!level.includes('#') || (level === '#' && k === levels.length - 1)) && (!level.includes('+') || level === '+'))
}
