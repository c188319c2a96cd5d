/**
 * The replication slice of the gateway's config schema: a primary and a
 * standby on one site, each naming the other. Every key has a default and a
 * description; {@link replicationConfigProblem} checks what the schema cannot
 * say (a standby needs its primary's address; addresses are host:port).
 */

export const replicationConfigSchema = {
  type: 'object',
  additionalProperties: false,
  default: {},
  description: 'A standby gateway that copies the primary\'s database batch by batch and can take over (docs/operations.md, "Standby replica").',
  properties: {
    role: {
      enum: ['none', 'primary', 'standby'], default: 'none',
      description: 'none: a single gateway, no replication. primary: takes writes and streams every LevelDB batch it writes to the standby. ' +
        'standby: applies the primary\'s batches in order, serves reads, refuses writes (GW_STANDBY_READ_ONLY, HTTP_READ_ONLY).',
    },
    listen: {
      type: 'string', default: '127.0.0.1:7883',
      description: 'host:port the primary accepts its standby on (port 0 picks a free one, printed on the ready line as "replication").',
    },
    peer: {
      type: 'string', default: '',
      description: 'host:port of the other gateway\'s replication listener; required for a standby (its primary\'s `listen`).',
    },
    acks: {
      enum: ['local', 'replicated'], default: 'local',
      description: 'local: a PUBACK (and every other write\'s answer) goes out once the primary\'s group commit is on its disk. replicated: only once ' +
        'the standby has also written that batch (fsync\'d under store.durability: sync), while the standby is in sync (see onStandbyLost).',
    },
    maxLagMs: {
      type: 'integer', minimum: 10, default: 2000,
      description: 'A standby whose oldest unacknowledged batch is older than this (or that is disconnected or still copying a snapshot) is out of sync; ' +
        'one not heard from this long (a silent link) is also dropped, and reconnects, but while it applies a snapshot (it stops reading ' +
        'while its disk is behind).',
    },
    silenceMs: {
      type: 'integer', minimum: 1000, default: 5000,
      description: 'A standby that hears nothing from its primary for this long (the primary pings every second) drops the connection and ' +
        'connects again: a link that went silent sends no reset. Counted in whole seconds. Raise it on a link with long stalls (a WAN, ' +
        'a congested uplink), where a pause of the data is no lost path.',
    },
    onStandbyLost: {
      enum: ['block', 'degrade'], default: 'block',
      description: 'With acks: replicated and no standby in sync: block holds every acknowledgement until a standby is in sync again (Kafka\'s ' +
        'min.insync.replicas = 2); degrade acknowledges after the local commit alone. Either way the change is logged, counted and alerted on.',
    },
    backlogBytes: {
      type: 'integer', minimum: 1024 * 1024, default: 64 * 1024 * 1024,
      description: 'Bytes of recent batches the primary keeps in memory, so a standby that was away catches up from where it was; ' +
        'a standby further behind (or one that comes back after the primary restarted) copies a full snapshot.',
    },
    catchUpBytes: {
      type: 'integer', minimum: 1024 * 1024, default: 256 * 1024 * 1024,
      description: 'Bytes of writes (keys and values) the primary keeps in memory in all, the backlog included, while a standby is catching ' +
        'up: everything written since its snapshot began, then since its last acknowledgement, until it has it, so a snapshot copied under ' +
        'load needs no second one. Past this (never less than backlogBytes) the standby\'s connection is dropped ' +
        '(GW_WARN_STANDBY_CATCH_UP_OVERFLOW) and it starts over with a snapshot: set it above the write rate times the time a snapshot takes.',
    },
    coordination: {
      type: 'object', additionalProperties: false, default: {},
      description: 'Where the leadership lease lives, for automatic promotion. Without it a standby is promoted by command only (`edgemq promote`).',
      properties: {
        etcd: {
          type: 'object', additionalProperties: false, required: ['endpoints'],
          description: 'An etcd cluster (v3 API): the primary holds the leader key under a lease; a standby in sync takes over once the lease expires.',
          properties: {
            endpoints: {
              type: 'array', minItems: 1, items: { type: 'string' },
              description: 'Client URLs of the etcd members, e.g. http://10.0.0.3:2379 (the same list on both gateways).',
            },
            leaseTtlMs: {
              type: 'integer', minimum: 2000, maximum: 600_000, multipleOf: 1000, default: 5000,
              description: 'Lease time to live (whole seconds, as etcd grants them): how long after the primary\'s last keep-alive a standby may ' +
                'take over. Shorter means faster takeover and more risk that a primary merely slow to reach etcd is replaced.',
            },
            prefix: {
              type: 'string', default: '/edgemq', pattern: '^/[A-Za-z0-9._/-]*$',
              description: 'Key prefix in etcd: the leader key is <prefix>/<gatewayId>/leader, so one etcd serves many sites.',
            },
          },
        },
      },
    },
  },
} as const

export type ReplicationRole = 'none' | 'primary' | 'standby'

export interface ReplicationConfig {
  readonly role: ReplicationRole
  readonly listen: string
  readonly peer: string
  readonly acks: 'local' | 'replicated'
  readonly maxLagMs: number
  readonly silenceMs: number
  readonly onStandbyLost: 'block' | 'degrade'
  readonly backlogBytes: number
  readonly catchUpBytes: number
  readonly coordination: { readonly etcd?: EtcdCoordinationConfig }
}

export interface EtcdCoordinationConfig {
  readonly endpoints: readonly string[]
  readonly leaseTtlMs: number
  readonly prefix: string
}

export interface HostPort { readonly host: string, readonly port: number }

/** `host:port` or `[v6]:port`, or null when it is neither. */
export function parseHostPort (text: string): HostPort | null {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(text)
  if (m === null) return null
  const port = Number(m[3])
  if (port > 65535) return null
  return { host: (m[1] ?? m[2]) as string, port }
}

/** The first cross-key problem of the replication slice, naming its key, or null. */
export function replicationConfigProblem (config: ReplicationConfig): string | null {
  if (parseHostPort(config.listen) === null) return `"replication.listen" must be host:port, got ${JSON.stringify(config.listen)}`
  if (config.role === 'standby') {
    if (config.peer === '') return '"replication.peer" is required for a standby: the host:port of its primary\'s replication.listen'
    const peer = parseHostPort(config.peer)
    if (peer === null) return `"replication.peer" must be host:port, got ${JSON.stringify(config.peer)}`
    if (peer.port === 0) return '"replication.peer" needs the primary\'s port, not 0'
  } else if (config.peer !== '' && parseHostPort(config.peer) === null) {
    return `"replication.peer" must be host:port, got ${JSON.stringify(config.peer)}`
  }
  if (config.role !== 'primary' && config.acks === 'replicated') return '"replication.acks" replicated needs replication.role primary'
  const etcd = config.coordination.etcd
  if (etcd !== undefined) {
    if (config.role === 'none') return '"replication.coordination" needs replication.role primary or standby'
    const bad = etcd.endpoints.find((e) => !/^https?:\/\/(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(e))
    if (bad !== undefined) return `"replication.coordination.etcd.endpoints" must be http(s)://host:port URLs, got ${JSON.stringify(bad)}`
  }
  return null
}
