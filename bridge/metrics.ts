/**
 * The bridge's Prometheus metrics, on an injected registry. Labels: upstream,
 * tenant, stream — never a device or client id. Gauges are read from the
 * uplinks' status at scrape time (one status per scrape, shared by all of
 * them); counters are bumped by the uplinks as they work.
 */
import { Counter, Gauge, type Registry } from 'prom-client'
import type { Clock } from '../store/index.ts'
import type { UplinkObserver, UpstreamStatus } from './uplink/status.ts'

export interface BridgeMetrics {
  /** Feeds the counters; pass it to the bridge. */
  readonly observer: UplinkObserver
  readonly commandsDelivered: Counter<'upstream'>
  readonly commandsExpired: Counter<'upstream'>
  readonly droppedBeforeForward: Counter<'upstream'>
}

/** `status` is read at most once per 250 ms of `clock`, however many gauges a scrape collects. */
export function createBridgeMetrics (registry: Registry, upstreams: readonly string[], status: () => Promise<UpstreamStatus[]>, clock: Clock): BridgeMetrics {
  let memo: { at: number, value: Promise<UpstreamStatus[]> } | null = null
  const current = (): Promise<UpstreamStatus[]> => {
    const now = clock.now()
    if (memo === null || now - memo.at > 250) memo = { at: now, value: status() }
    return memo.value
  }
  const gauge = (name: string, help: string, read: (s: UpstreamStatus) => number): void => {
    new Gauge({
      name, help, labelNames: ['upstream'], registers: [registry],
      async collect () {
        for (const s of await current()) this.set({ upstream: s.name }, read(s))
      },
    })
  }
  gauge('edgemq_bridge_connected', '1 while the upstream\'s connection is up (a NATS upstream: connected and its stream checked).', (s) => s.connected ? 1 : 0)
  gauge('edgemq_bridge_backlog_messages', 'Records of the forwarded streams the upstream has not acknowledged yet.', (s) => s.backlog.messages)
  gauge('edgemq_bridge_backlog_bytes', 'Estimated bytes of the backlog (backlog records × the partition\'s average stored record size).',
    (s) => s.backlog.bytes)
  gauge('edgemq_bridge_backlog_seconds', 'Age of the oldest record the upstream has not acknowledged, in seconds (0 when caught up).', (s) => s.backlog.seconds)
  new Gauge({
    name: 'edgemq_bridge_upstream_error', labelNames: ['upstream', 'code'], registers: [registry],
    help: '1 while the upstream\'s last error, with this code (BRIDGE_NATS_…), is unresolved: a NATS upstream that cannot be reached, refuses the ' +
      'credentials, or whose stream is missing, has too short a duplicate window or does not cover the subjects.',
    async collect () {
      this.reset()
      for (const s of await current()) {
        const e = s.lastError
        if (e !== null && e.resolvedAt === null && e.code !== undefined) this.set({ upstream: s.name, code: e.code }, 1)
      }
    },
  })
  gauge('edgemq_bridge_inflight_messages', 'Messages sent to the upstream and not yet acknowledged.', (s) => s.inflight)

  const forwarded = new Counter({
    name: 'edgemq_bridge_forwarded_messages_total', labelNames: ['upstream', 'tenant', 'stream'], registers: [registry],
    help: 'Records acknowledged by the upstream.',
  })
  const forwardedBytes = new Counter({
    name: 'edgemq_bridge_forwarded_bytes_total', labelNames: ['upstream', 'tenant', 'stream'], registers: [registry],
    help: 'Payload bytes acknowledged by the upstream.',
  })
  const reconnects = new Counter({
    name: 'edgemq_bridge_reconnects_total', labelNames: ['upstream'], registers: [registry],
    help: 'Connection attempts after the first.',
  })
  const connectFailures = new Counter({
    name: 'edgemq_bridge_connect_failures_total', labelNames: ['upstream'], registers: [registry],
    help: 'Connection attempts to the upstream that failed (no CONNACK, or a refusing one).',
  })
  const deadLettered = new Counter({
    name: 'edgemq_bridge_dead_lettered_total', labelNames: ['upstream', 'tenant', 'stream'], registers: [registry],
    help: 'Records the upstream refused maxDeliveryAttempts times, moved to the dead-letter stream.',
  })
  const droppedBeforeForward = new Counter({
    name: 'edgemq_bridge_dropped_records_total', labelNames: ['upstream'], registers: [registry],
    help: 'Records the disk budget deleted before the upstream acknowledged them.',
  })
  const commandsReceived = new Counter({
    name: 'edgemq_bridge_commands_received_total', labelNames: ['upstream'], registers: [registry],
    help: 'Commands received from the upstream and stored.',
  })
  const commandsDelivered = new Counter({
    name: 'edgemq_bridge_commands_delivered_total', labelNames: ['upstream'], registers: [registry],
    help: 'Commands a device acknowledged.',
  })
  const commandsExpired = new Counter({
    name: 'edgemq_bridge_commands_expired_total', labelNames: ['upstream'], registers: [registry],
    help: 'Commands whose time-to-live ran out before delivery.',
  })
  for (const upstream of upstreams) {
    for (const c of [reconnects, connectFailures, droppedBeforeForward, commandsReceived, commandsDelivered, commandsExpired]) c.inc({ upstream }, 0)
  }

  const bound = new Map<string, { messages: { inc (n: number): void }, bytes: { inc (n: number): void } }>()
  return {
    observer: {
      onForwarded: (upstream, tenant, stream, messages, bytes) => {
        // Once per forwarded message: the label lookups are done once per stream (prom-client hashes a labels object per inc).
        const k = `${upstream}\u0000${tenant}\u0000${stream}`
        let c = bound.get(k)
        if (c === undefined) bound.set(k, c = { messages: forwarded.labels(upstream, tenant, stream), bytes: forwardedBytes.labels(upstream, tenant, stream) })
        c.messages.inc(messages)
        c.bytes.inc(bytes)
      },
      onDeadLettered: (upstream, tenant, stream) => { deadLettered.inc({ upstream, tenant, stream }) },
      onReconnect: (upstream) => { reconnects.inc({ upstream }) },
      onConnectFailure: (upstream) => { connectFailures.inc({ upstream }) },
      onCommand: (upstream) => { commandsReceived.inc({ upstream }) },
    },
    commandsDelivered,
    commandsExpired,
    droppedBeforeForward,
  }
}
