/**
 * What an uplink reports about itself: the status snapshot (GET /v1/bridge,
 * `edgemq bridge`, the metrics' gauges), the counters it feeds the metrics as
 * it works (UplinkObserver), and the logger it writes through. The backlog is
 * computed here from the lanes and the store; the throughput from samples of
 * the forwarded count taken at most once a second.
 */
import type { LogStore } from '../../store/index.ts'
import type { DedupeCarrier, UpstreamKind } from '../config-schema.ts'
import type { BridgeErrorCode } from '../errors.ts'
import type { Lane, Pending } from '../lanes.ts'

export interface BridgeLogger {
  info (fields: Record<string, unknown>, message: string): void
  warn (fields: Record<string, unknown>, message: string): void
  error (fields: Record<string, unknown>, message: string): void
}

/** Counters the uplink reports as it works (the metrics read the rest from status()). */
export interface UplinkObserver {
  onForwarded? (upstream: string, tenant: string, stream: string, messages: number, bytes: number): void
  onDeadLettered? (upstream: string, tenant: string, stream: string): void
  onReconnect? (upstream: string): void
  onConnectFailure? (upstream: string): void
  onCommand? (upstream: string): void
}

/** How an upstream's messages carry their dedupe id: an MQTT form (config-schema.ts), or the Nats-Msg-Id header. */
export type DedupeForm = DedupeCarrier | 'nats-msg-id'

export interface LaneStatus {
  readonly tenant: string
  readonly stream: string
  readonly partition: number
  /** Next offset to forward, as committed in the log (what a restart resumes from). */
  readonly committedOffset: number
  /** Every offset below this is acknowledged by the upstream (committed within commitIntervalMs). */
  readonly forwardedOffset: number
  readonly logEndOffset: number
  readonly backlogMessages: number
}

/** The last error, when it happened, and when a connection came up after it (null while unresolved); times in epoch ms. */
export interface ConnectionError {
  readonly message: string
  /** A NATS upstream's errors carry their code (BRIDGE_NATS_…). */
  readonly code?: BridgeErrorCode
  readonly at: number
  resolvedAt: number | null
}

export interface UpstreamStatus {
  readonly name: string
  readonly region: string
  /** The URL without credentials. */
  readonly url: string
  readonly kind: UpstreamKind
  /** MQTT protocol of the current (or last attempted) connection; null before the first attempt, and for a NATS upstream. */
  readonly mqttVersion: '5' | '3.1.1' | null
  /** How the messages carry their dedupe id on that connection. */
  readonly dedupeId: DedupeForm
  readonly connected: boolean
  /** When the current connection (or the current outage) began, ISO 8601; null before the first attempt. */
  readonly since: string | null
  /** The last error, when it happened, and when a connection came up after it (null while unresolved). */
  readonly lastError: { readonly message: string, readonly code?: BridgeErrorCode, readonly at: string, readonly resolvedAt: string | null } | null
  /** Connection attempts that failed (no CONNACK, or a refusing one). */
  readonly connectFailures: number
  readonly reconnects: number
  readonly inflight: number
  readonly forwardedMessages: number
  readonly forwardedBytes: number
  /** Messages per second over the last ten seconds. */
  readonly throughput: number
  readonly deadLettered: number
  readonly commandsReceived: number
  readonly backlog: { readonly messages: number, readonly bytes: number, readonly seconds: number }
  readonly partitions: readonly LaneStatus[]
  /**
   * A NATS upstream's JetStream stream, once checked (null before), and the PubAcks since the start that said
   * `duplicate` (resends the stream already had, counted as delivered).
   */
  readonly jetstream?: { readonly stream: string, readonly duplicateWindowMs: number, readonly replicas: number, readonly duplicateAcks: number } | null
  /**
   * A NATS upstream's server on the current (or last) connection, as its INFO announced it (in a cluster, the node
   * the uplink is connected to); null before the first connection.
   */
  readonly natsServer?: { readonly name: string, readonly version: string, readonly jetstream: boolean } | null
}

/** The connection's part of the status. */
export type ConnectionStatus = Pick<UpstreamStatus, 'mqttVersion' | 'dedupeId' | 'connected' | 'since' | 'lastError' | 'connectFailures' | 'reconnects'>

/** The URL without credentials. */
export function redact (url: string): string {
  const u = new URL(url)
  u.username = ''
  u.password = ''
  return u.toString().replace(/\/$/, '')
}

export function isoOrNull (ms: number | null): string | null {
  return ms === null ? null : new Date(ms).toISOString()
}

const THROUGHPUT_WINDOW = 10

/** Messages per second over the last ten seconds, from samples of a running count. */
export class ThroughputMeter {
  readonly #samples: Array<{ at: number, count: number }> = []

  /** Records the running count at `now`; a sample less than a second after the last is dropped. */
  sample (count: number, now: number): void {
    const last = this.#samples.at(-1)
    if (last !== undefined && now - last.at < 1000) return
    this.#samples.push({ at: now, count })
    if (this.#samples.length > THROUGHPUT_WINDOW + 1) this.#samples.shift()
  }

  /** Per second, to one decimal; 0 before two samples. */
  perSecond (): number {
    const first = this.#samples[0]
    const last = this.#samples.at(-1)
    const rate = first !== undefined && last !== undefined && last.at > first.at ? (last.count - first.count) * 1000 / (last.at - first.at) : 0
    return Math.round(rate * 10) / 10
  }
}

/** The lanes' backlog at `now`; reads one record per lane whose oldest unforwarded record is not in memory. */
export async function backlogOf (store: LogStore, lanes: readonly Lane[], now: number): Promise<Pick<UpstreamStatus, 'backlog' | 'partitions'>> {
  let messages = 0
  let bytes = 0
  let oldest = Infinity
  const partitions: LaneStatus[] = []
  for (const lane of lanes) {
    const p = store.partitionInfo(lane.stream, lane.partition)
    const from = Math.max(lane.done, p.logStartOffset)
    const backlog = Math.max(0, p.logEndOffset - from)
    messages += backlog
    const stored = p.logEndOffset - p.logStartOffset
    if (stored > 0) bytes += Math.round(p.bytes * backlog / stored) // estimate: the partition's average record size
    if (backlog > 0) {
      const ts = lane.pendingAt < lane.pending.length ? (lane.pending[lane.pendingAt] as Pending).timestamp : await timestampAt(store, lane, from)
      if (ts !== null) oldest = Math.min(oldest, ts)
    }
    partitions.push({
      tenant: lane.tenant, stream: lane.name, partition: lane.partition,
      committedOffset: Math.max(lane.committed, 0), forwardedOffset: lane.done, logEndOffset: p.logEndOffset, backlogMessages: backlog,
    })
  }
  return { backlog: { messages, bytes, seconds: oldest === Infinity ? 0 : Math.max(0, (now - oldest) / 1000) }, partitions }
}

async function timestampAt (store: LogStore, lane: Lane, offset: number): Promise<number | null> {
  const b = lane.buffer[lane.bufferAt]
  if (b !== undefined && b.offset === offset) return b.timestamp
  try {
    const r = await store.read(lane.stream, lane.partition, offset, { maxRecords: 1 })
    return r.records[0]?.timestamp ?? null
  } catch {
    return null
  }
}
