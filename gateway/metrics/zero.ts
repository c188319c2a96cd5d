/**
 * Series at 0 for every label set the config already names (listeners,
 * tenants, streams, upstreams, and every refusal reason), so that a fresh
 * gateway's dashboards show 0 instead of "No data", and increase() sees the
 * first event (a counter born at 1 has no increase to show).
 *
 * The reason lists are checked against the union types in metrics.ts at
 * compile time: a reason added there and not here fails `tsc`.
 */
import { Counter, type Registry } from 'prom-client'
import type { BridgeConfig } from '../../bridge/index.ts'
import type { SessionDamage } from '../mqtt/sessions/persistence.ts'
import type { GatewayMetrics, PublishRefusal, RefusalReason, ReplayOutcome, SubscribeRefusal } from './metrics.ts'

/** Every member of the union U, or a compile error naming the missing ones. */
type Exhaustive<U, L extends readonly U[]> = [Exclude<U, L[number]>] extends [never] ? L : { missing: Exclude<U, L[number]> }

const REFUSAL_REASONS = [
  'max-connections', 'bad-credentials', 'not-authorized', 'invalid-client-id', 'client-id-not-bound', 'invalid-will', 'protocol', 'packet-too-large',
  'malformed-header', 'slow-subscriber',
] as const
const PUBLISH_REFUSALS = ['acl-denied', 'invalid-topic', 'reserved-topic', 'unrouted', 'record-too-large', 'store-failed', 'rate-limited'] as const
const SUBSCRIBE_REFUSALS = ['acl-denied', 'invalid-filter', 'replay-bad-range', 'replay-bad-filter', 'replay-limit', 'replay-not-resumed',
  'too-many-filters', 'too-many-subscriptions', 'share-invalid', 'share-limit'] as const
const REPLAY_OUTCOMES = ['done', 'cancelled', 'failed'] as const
const DAMAGED_SESSION_ENTRIES = ['cursor', 'session', 'offline', 'messageId', 'subscription'] as const

export const KNOWN_LABELS = {
  refusalReasons: REFUSAL_REASONS satisfies Exhaustive<RefusalReason, typeof REFUSAL_REASONS>,
  publishRefusals: PUBLISH_REFUSALS satisfies Exhaustive<PublishRefusal, typeof PUBLISH_REFUSALS>,
  subscribeRefusals: SUBSCRIBE_REFUSALS satisfies Exhaustive<SubscribeRefusal, typeof SUBSCRIBE_REFUSALS>,
  replayOutcomes: REPLAY_OUTCOMES satisfies Exhaustive<ReplayOutcome, typeof REPLAY_OUTCOMES>,
  damagedSessionEntries: DAMAGED_SESSION_ENTRIES satisfies Exhaustive<SessionDamage['entry'], typeof DAMAGED_SESSION_ENTRIES>,
}

export interface KnownSeries {
  readonly tenants: readonly string[]
  readonly streams: readonly string[]
  readonly listeners: readonly string[]
  /** Groups that hold retention (the bridge's uplinks), with the partitions they read: records the disk budget may drop. */
  readonly retentionGroups: ReadonlyArray<{ readonly group: string, readonly tenant: string, readonly stream: string, readonly partitions: number }>
}

export function zeroGatewaySeries (metrics: GatewayMetrics, known: KnownSeries): void {
  for (const listener of known.listeners) {
    metrics.authFailures.inc({ listener }, 0)
    for (const reason of REFUSAL_REASONS) metrics.connectionsRefused.inc({ listener, reason }, 0)
    for (const tenant of known.tenants) metrics.connectedClients.inc({ tenant, listener }, 0)
  }
  for (const tenant of known.tenants) {
    for (const stream of known.streams) {
      metrics.ingestMessages.inc({ tenant, stream }, 0)
      metrics.ingestBytes.inc({ tenant, stream }, 0)
      metrics.sessionDropped.inc({ tenant, stream }, 0)
    }
    for (const reason of PUBLISH_REFUSALS) metrics.publishesRefused.inc({ tenant, reason }, 0)
    for (const reason of SUBSCRIBE_REFUSALS) metrics.subscriptionsRefused.inc({ tenant, reason }, 0)
    metrics.replaysActive.inc({ tenant }, 0)
    metrics.replayMessages.inc({ tenant }, 0)
    for (const outcome of REPLAY_OUTCOMES) metrics.replaysFinished.inc({ tenant, outcome }, 0)
    metrics.sessionQueueDropped.inc({ tenant }, 0)
    metrics.oversizedDeliveries.inc({ tenant }, 0)
  }
  for (const entry of DAMAGED_SESSION_ENTRIES) metrics.sessionDamaged.inc({ entry }, 0)
  for (const { group, tenant, stream, partitions } of known.retentionGroups) {
    for (let p = 0; p < partitions; p++) metrics.droppedRecords.inc({ tenant, stream, partition: String(p), group }, 0)
  }
}

/**
 * The bridge's per-stream counters (bridge/metrics.ts starts its per-upstream ones at 0 itself): each upstream's
 * forwarded streams are in the config. Looked up by name on the registry, as bridge/ keeps its counters to itself.
 */
export function zeroBridgeSeries (registry: Registry, bridge: BridgeConfig): void {
  const perStream = ['edgemq_bridge_forwarded_messages_total', 'edgemq_bridge_forwarded_bytes_total', 'edgemq_bridge_dead_lettered_total']
    .map((name) => registry.getSingleMetric(name))
    .filter((m): m is Counter<'upstream' | 'tenant' | 'stream'> => m instanceof Counter)
  for (const u of bridge.upstreams) {
    for (const f of u.forward) {
      for (const c of perStream) c.inc({ upstream: u.name, tenant: f.tenant, stream: f.stream }, 0)
    }
  }
}
