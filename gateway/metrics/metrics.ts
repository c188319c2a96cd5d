/**
 * The gateway's Prometheus metrics, registered on an injected registry (tests
 * use a fresh one). Names follow Prometheus conventions: `edgemq_` prefix,
 * base units, `_total` counters; labels are tenant / stream / partition /
 * group / listener / reason, never a device or client id.
 */
import { Counter, Gauge, Histogram, collectDefaultMetrics, type Registry } from 'prom-client'
import type { LogStore, PartitionLag } from '../../store/index.ts'

export type RefusalReason =
  | 'max-connections' | 'bad-credentials' | 'not-authorized' | 'invalid-client-id' | 'client-id-not-bound' | 'protocol'
  | 'packet-too-large' | 'malformed-header' | 'invalid-will' | 'slow-subscriber'

export type PublishRefusal = 'acl-denied' | 'invalid-topic' | 'reserved-topic' | 'unrouted' | 'record-too-large' | 'store-failed' | 'rate-limited'

export type SubscribeRefusal = 'acl-denied' | 'invalid-filter' | 'replay-bad-range' | 'replay-bad-filter' | 'replay-limit' | 'replay-not-resumed'
  | 'too-many-filters' | 'too-many-subscriptions' | 'share-invalid' | 'share-limit'

export type ReplayOutcome = 'done' | 'cancelled' | 'failed'

export interface GatewayMetrics {
  readonly ingestMessages: Counter<'tenant' | 'stream'>
  readonly ingestBytes: Counter<'tenant' | 'stream'>
  readonly appendLatency: Histogram
  readonly commitRecords: Histogram
  readonly connectedClients: Gauge<'tenant' | 'listener'>
  readonly connectionsRefused: Counter<'listener' | 'reason'>
  readonly authFailures: Counter<'listener'>
  readonly publishesRefused: Counter<'tenant' | 'reason'>
  readonly storeErrors: Counter<'kind'>
  readonly droppedRecords: Counter<'tenant' | 'stream' | 'partition' | 'group'>
  readonly backpressure: Gauge
  readonly subscriptionsRefused: Counter<'tenant' | 'reason'>
  readonly replaysActive: Gauge<'tenant'>
  readonly replayMessages: Counter<'tenant'>
  readonly shareMessages: Counter<'tenant' | 'group'>
  readonly shareMembers: Gauge<'tenant' | 'group'>
  readonly shareUnreadable: Counter<'tenant' | 'group'>
  readonly replaysFinished: Counter<'tenant' | 'outcome'>
  readonly expiredDropped: Counter<'tenant' | 'path'>
  readonly sessionQueueDropped: Counter<'tenant'>
  readonly sessionDropped: Counter<'tenant' | 'stream'>
  readonly sessionDamaged: Counter<'entry'>
  readonly oversizedDeliveries: Counter<'tenant'>
  readonly sessionsExpired: Counter
  readonly readerRewinds: Counter<'tenant' | 'stream'>
  readonly httpWaitingReads: Gauge
}

export interface MetricsSources {
  readonly store: LogStore
  readonly diskFreeBytes: () => number | undefined
  readonly diskSizeBytes: () => number | undefined
  readonly healthy: () => boolean
  readonly version: string
  readonly gatewayId: string
  /** Persistent sessions' cursors into the log, per stream (mqtt/sessions/cursors.ts); none before the broker exists. */
  readonly sessionLag?: () => ReadonlyArray<{ readonly stream: string, readonly sessions: number, readonly lagMessages: number }>
}

/** `<tenant>/<stream>` as the two labels every metric uses. */
export function splitStream (name: string): { tenant: string, stream: string } {
  const at = name.indexOf('/')
  return { tenant: name.slice(0, at), stream: name.slice(at + 1) }
}

export function createMetrics (registry: Registry, sources: MetricsSources): GatewayMetrics {
  collectDefaultMetrics({ register: registry })
  const { store } = sources

  new Gauge({
    name: 'edgemq_build_info', help: 'Version of the running gateway (value 1).', labelNames: ['version', 'gateway'], registers: [registry],
    collect () { this.set({ version: sources.version, gateway: sources.gatewayId }, 1) },
  })
  new Gauge({
    name: 'edgemq_up', help: '1 when the gateway is healthy (store writable), 0 when it is not acking.', registers: [registry],
    collect () { this.set(sources.healthy() ? 1 : 0) },
  })
  // The first gauge fills both, so a scrape walks the cursors once.
  const sessionGauges = {
    sessions: new Gauge({
      name: 'edgemq_mqtt_session_cursor_sessions',
      help: 'Persistent sessions with a cursor into the stream (they hold its retention).',
      labelNames: ['tenant', 'stream'],
      registers: [registry],
      collect () { fillSessionLag() },
    }),
    lag: new Gauge({
      name: 'edgemq_mqtt_session_lag_messages',
      help: 'Records of the stream persistent sessions have not acknowledged, summed over sessions (log end minus each cursor).',
      labelNames: ['tenant', 'stream'],
      registers: [registry],
    }),
  }
  const fillSessionLag = (): void => {
    sessionGauges.sessions.reset()
    sessionGauges.lag.reset()
    for (const { stream, sessions, lagMessages } of sources.sessionLag?.() ?? []) {
      const labels = splitStream(stream)
      sessionGauges.sessions.set(labels, sessions)
      sessionGauges.lag.set(labels, lagMessages)
    }
  }
  new Gauge({
    name: 'edgemq_store_pending_appends', help: 'Appends accepted by the log but not yet durable.', registers: [registry],
    collect () { this.set(store.pendingAppends) },
  })
  new Gauge({
    name: 'edgemq_store_disk_used_bytes', help: 'Bytes of stored log batches over all partitions.', registers: [registry],
    collect () { this.set(store.totalBytes) },
  })
  new Gauge({
    name: 'edgemq_store_disk_size_bytes', help: 'Size of the file system holding the data directory.', registers: [registry],
    collect () { const size = sources.diskSizeBytes(); if (size !== undefined) this.set(size) },
  })
  new Gauge({
    name: 'edgemq_store_disk_free_bytes', help: 'Free bytes on the file system holding the data directory.', registers: [registry],
    collect () { const free = sources.diskFreeBytes(); if (free !== undefined) this.set(free) },
  })
  // prom-client reads metrics in registration order: the first gauge of each family fills them all when a scrape
  // reads it, so a scrape walks the partitions (and groups) once and every gauge shows the same moment.
  const partitionLabels = ['tenant', 'stream', 'partition'] as const
  const partitionGauges = {
    start: new Gauge({
      name: 'edgemq_partition_log_start_offset', help: 'First offset still in the log.', labelNames: partitionLabels, registers: [registry],
      collect () { fillPartitions() },
    }),
    end: new Gauge({ name: 'edgemq_partition_log_end_offset', help: 'Offset the next record will get.', labelNames: partitionLabels, registers: [registry] }),
    bytes: new Gauge({ name: 'edgemq_partition_bytes', help: 'Bytes stored for the partition.', labelNames: partitionLabels, registers: [registry] }),
    oldest: new Gauge({
      name: 'edgemq_partition_oldest_timestamp_seconds',
      help: 'Unix time of the oldest record in the partition.',
      labelNames: partitionLabels,
      registers: [registry],
    }),
  }
  const fillPartitions = (): void => {
    for (const g of Object.values(partitionGauges)) g.reset()
    for (const s of store.listStreams()) {
      const { tenant, stream } = splitStream(s.name)
      for (let p = 0; p < s.partitions; p++) {
        const info = store.partitionInfo(s.name, p)
        const labels = { tenant, stream, partition: String(p) }
        partitionGauges.start.set(labels, info.logStartOffset)
        partitionGauges.end.set(labels, info.logEndOffset)
        partitionGauges.bytes.set(labels, info.bytes)
        if (info.oldestTimestamp !== null) partitionGauges.oldest.set(labels, info.oldestTimestamp / 1000)
      }
    }
  }
  new Gauge({
    name: 'edgemq_streams', help: 'Number of streams in the log.', registers: [registry],
    collect () { this.set(store.listStreams().length) },
  })
  // Group lag in seconds reads the oldest unconsumed record, so this family's collect is async, and prom-client
  // collects all metrics concurrently: each of the three waits for the one fill its scrape started.
  const groupLabels = ['group', 'tenant', 'stream', 'partition'] as const
  let groupFill: Promise<void> | null = null
  const groupsCollected = async (): Promise<void> => {
    groupFill ??= fillGroups().finally(() => { groupFill = null })
    await groupFill
  }
  const groupGauges = {
    committed: new Gauge({
      name: 'edgemq_group_committed_offset', help: 'Next offset the consumer group will consume.', labelNames: groupLabels, registers: [registry],
      collect: groupsCollected,
    }),
    lag: new Gauge({
      name: 'edgemq_group_lag_messages',
      help: 'Records the group has not consumed yet (log end minus its position, never below the log start).',
      labelNames: groupLabels,
      registers: [registry],
      collect: groupsCollected,
    }),
    lagSeconds: new Gauge({
      name: 'edgemq_group_lag_seconds',
      help: 'Now minus the timestamp of the oldest record the group has not consumed; 0 when caught up.',
      labelNames: groupLabels,
      registers: [registry],
      collect: groupsCollected,
    }),
  }
  const fillGroups = async (): Promise<void> => {
    for (const g of Object.values(groupGauges)) g.reset()
    for (const g of store.listGroups()) {
      for (const name of Object.keys(g.offsets)) {
        const { tenant, stream } = splitStream(name)
        let lags: PartitionLag[]
        try {
          lags = await store.groupLag(g.group, name)
        } catch {
          // The oldest unconsumed record could not be read (a damaged table block, STORE_DAMAGED): the scrape still
          // answers, with the lag in messages from the offsets alone, no lag in seconds, and a read error counted.
          storeErrors.inc({ kind: 'read' })
          lags = lagFromOffsets(name, g.offsets[name] ?? {})
        }
        for (const lag of lags) {
          const labels = { group: g.group, tenant, stream, partition: String(lag.partition) }
          if (lag.committedOffset !== null) groupGauges.committed.set(labels, lag.committedOffset)
          groupGauges.lag.set(labels, lag.lagMessages)
          if (!Number.isNaN(lag.lagSeconds)) groupGauges.lagSeconds.set(labels, lag.lagSeconds)
        }
      }
    }
  }
  /** A group's lag in messages without reading a record; lagSeconds is NaN (unknown). */
  const lagFromOffsets = (name: string, committed: Readonly<Record<number, number>>): PartitionLag[] => {
    const s = store.listStreams().find((x) => x.name === name)
    return Array.from({ length: s?.partitions ?? 0 }, (_, partition) => {
      const info = store.partitionInfo(name, partition)
      const offset = committed[partition] ?? null
      const next = Math.max(offset ?? info.logStartOffset, info.logStartOffset)
      return {
        partition, committedOffset: offset, logStartOffset: info.logStartOffset, logEndOffset: info.logEndOffset,
        lagMessages: Math.max(0, info.logEndOffset - next), lagSeconds: Number.NaN,
      }
    })
  }
  new Gauge({
    name: 'edgemq_groups', help: 'Number of consumer groups.', registers: [registry],
    collect () { this.set(store.listGroups().length) },
  })

  const storeErrors = new Counter({
    name: 'edgemq_store_errors_total',
    help: 'Failed log writes (kind write: each one stops acks until the store recovers) and reads that met a damaged record (kind read).',
    labelNames: ['kind'],
    registers: [registry],
    // A read error met by this scrape's group lag shows in this scrape.
    collect: groupsCollected,
  })
  // Present from the first scrape, so dashboards show 0 and increase() sees the first error.
  storeErrors.inc({ kind: 'write' }, 0)
  storeErrors.inc({ kind: 'read' }, 0)

  return {
    ingestMessages: new Counter({
      name: 'edgemq_ingest_messages_total',
      help: 'Messages appended to the log.',
      labelNames: ['tenant', 'stream'],
      registers: [registry],
    }),
    ingestBytes: new Counter({
      name: 'edgemq_ingest_bytes_total',
      help: 'Payload bytes appended to the log.',
      labelNames: ['tenant', 'stream'],
      registers: [registry],
    }),
    appendLatency: new Histogram({
      name: 'edgemq_append_duration_seconds', help: 'Time from a group commit\'s oldest append to the commit being durable.', registers: [registry],
      buckets: [0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
    }),
    commitRecords: new Histogram({
      name: 'edgemq_group_commit_records', help: 'Records per group commit (one LevelDB write).', registers: [registry],
      buckets: [1, 2, 5, 10, 50, 100, 500, 1000, 5000, 20000],
    }),
    connectedClients: new Gauge({
      name: 'edgemq_mqtt_connected_clients',
      help: 'Connected MQTT clients.',
      labelNames: ['tenant', 'listener'],
      registers: [registry],
    }),
    connectionsRefused: new Counter({
      name: 'edgemq_mqtt_connections_refused_total',
      help: 'Connections refused or closed for breaking a rule, by reason.',
      labelNames: ['listener', 'reason'],
      registers: [registry],
    }),
    authFailures: new Counter({
      name: 'edgemq_mqtt_auth_failures_total',
      help: 'CONNECTs with an unknown user or a wrong password.',
      labelNames: ['listener'],
      registers: [registry],
    }),
    publishesRefused: new Counter({
      name: 'edgemq_mqtt_publishes_refused_total',
      help: 'PUBLISH packets not appended, by reason.',
      labelNames: ['tenant', 'reason'],
      registers: [registry],
    }),
    storeErrors,
    droppedRecords: new Counter({
      name: 'edgemq_retention_dropped_records_total', help: 'Records deleted by the disk budget before a retention-holding group consumed them.',
      labelNames: ['tenant', 'stream', 'partition', 'group'], registers: [registry],
    }),
    backpressure: new Gauge({
      name: 'edgemq_mqtt_backpressure',
      help: '1 while sockets are paused because the log has too many pending appends.',
      registers: [registry],
    }),
    subscriptionsRefused: new Counter({
      name: 'edgemq_mqtt_subscriptions_refused_total',
      help: 'Topic filters of SUBSCRIBE packets refused (SUBACK 0x80), by reason.',
      labelNames: ['tenant', 'reason'],
      registers: [registry],
    }),
    replaysActive: new Gauge({
      name: 'edgemq_mqtt_replays_active',
      help: 'MQTT $replay subscriptions being replayed (or continuing live).',
      labelNames: ['tenant'],
      registers: [registry],
    }),
    replayMessages: new Counter({
      name: 'edgemq_mqtt_replay_messages_total',
      help: 'Records delivered to MQTT $replay subscriptions.',
      labelNames: ['tenant'],
      registers: [registry],
    }),
    shareMessages: new Counter({
      name: 'edgemq_mqtt_share_messages_total',
      help: 'Messages delivered to members of shared subscriptions ($share/<group>/<filter>), redeliveries included; ' +
        'group is the share\'s consumer group (its lag is edgemq_group_lag_messages).',
      labelNames: ['tenant', 'group'],
      registers: [registry],
    }),
    shareMembers: new Gauge({
      name: 'edgemq_mqtt_share_members',
      help: 'Connected members of each shared subscription.',
      labelNames: ['tenant', 'group'],
      registers: [registry],
    }),
    shareUnreadable: new Counter({
      name: 'edgemq_mqtt_share_unreadable_total',
      help: 'Records of a shared subscription\'s log that no connected member may read (read ACL): skipped, the group commits past them ' +
        '(a record its partition\'s member may not read goes to a member that may).',
      labelNames: ['tenant', 'group'],
      registers: [registry],
    }),
    replaysFinished: new Counter({
      name: 'edgemq_mqtt_replays_finished_total',
      help: 'MQTT replays that ended: done (history delivered), cancelled (unsubscribed, disconnected, replaced) or failed.',
      labelNames: ['tenant', 'outcome'],
      registers: [registry],
    }),
    readerRewinds: new Counter({
      name: 'edgemq_reader_rewinds_total',
      help: 'Live readers of a standby (HTTP long polls and follows, MQTT $replay) whose position was past the log end a snapshot from a new ' +
        'primary rewound the log to, moved back to that end so they read every record of the new history (docs/operations.md, standby).',
      labelNames: ['tenant', 'stream'],
      registers: [registry],
    }),
    sessionsExpired: new Counter({
      name: 'edgemq_mqtt_sessions_expired_total',
      help: 'Persistent sessions dropped when their time offline ran out (MQTT 5 Session Expiry Interval or mqtt.sessionExpirySeconds), ' +
        'with their queues and cursors.',
      registers: [registry],
    }),
    sessionQueueDropped: new Counter({
      name: 'edgemq_mqtt_session_queue_dropped_total',
      help: 'Messages not queued for a persistent session because its queue of copies was full (mqtt.maxQueuedMessagesPerSession).',
      labelNames: ['tenant'],
      registers: [registry],
    }),
    sessionDropped: new Counter({
      name: 'edgemq_mqtt_session_dropped_records_total',
      help: 'Records the disk budget (store.diskBudgetBytes) deleted before a persistent session\'s cursor reached them, per session ' +
        '(each such deletion is also logged with the client id; some may not have been for the session).',
      labelNames: ['tenant', 'stream'],
      registers: [registry],
    }),
    sessionDamaged: new Counter({
      name: 'edgemq_mqtt_session_damaged_entries_total',
      help: 'Stored session entries found damaged at start (entry: cursor, session, offline, messageId, subscription), each logged with its key and ' +
        'GW_SESSION_CORRUPT; the session went on with a fallback that delivers more, never less (docs/mqtt.md).',
      labelNames: ['entry'],
      registers: [registry],
    }),
    oversizedDeliveries: new Counter({
      name: 'edgemq_mqtt_oversized_deliveries_total',
      help: 'Messages not sent to an MQTT 5 client because the PUBLISH would exceed the Maximum Packet Size it set in its CONNECT ' +
        '(the server drops them for that client, as if sent [MQTT-3.1.2-25]).',
      labelNames: ['tenant'],
      registers: [registry],
    }),
    expiredDropped: new Counter({
      name: 'edgemq_mqtt_expired_dropped_total',
      help: 'MQTT messages past their expiry not delivered, by path: copy (a command past its time-to-live, a session\'s queued copy), ' +
        'session (a persistent session\'s log cursor), share (a shared subscription), replay ($replay).',
      labelNames: ['tenant', 'path'],
      registers: [registry],
    }),
    httpWaitingReads: new Gauge({
      name: 'edgemq_http_waiting_reads',
      help: 'HTTP record reads (wait=…) waiting at the end of the log for an append.',
      registers: [registry],
    }),
  }
}
