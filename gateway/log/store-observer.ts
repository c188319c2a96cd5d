/**
 * What the gateway does with the store's events: commit latency and size
 * into the metrics, health (a failed write turns the gateway unhealthy, a
 * commit healthy again), releasing socket backpressure as the log drains,
 * records that retention dropped before a consumer had them, counted per
 * group (and per upstream for the bridge's groups), and partitions whose
 * damaged front batch retention met, counted as read errors (the store logs
 * each one; the alert on edgemq_store_errors_total fires).
 *
 * The store is opened before the metrics exist (they read the store), so the
 * metrics are attached once created; events before that only change health.
 */
import type { CommitStats, DroppedRecords, StoreObserver } from '../../store/index.ts'
import type { BridgeMetrics } from '../../bridge/index.ts'
import { splitStream, type GatewayMetrics } from '../metrics/metrics.ts'
import type { StoreHealth } from './health.ts'

export class GatewayStoreObserver implements StoreObserver {
  readonly #health: StoreHealth
  /** The bridge's consumer groups, `bridge.<upstream>` → upstream. */
  readonly #bridgeGroups: ReadonlyMap<string, string>
  #metrics: GatewayMetrics | undefined
  #bridgeMetrics: BridgeMetrics | undefined
  #onCommitted: (() => void) | undefined

  constructor (health: StoreHealth, upstreams: readonly string[]) {
    this.#health = health
    this.#bridgeGroups = new Map(upstreams.map((u) => [`bridge.${u}`, u]))
  }

  /** Attaches the gateway's metrics and what runs after each commit (backpressure release). */
  attach (metrics: GatewayMetrics, onCommitted: () => void): void {
    this.#metrics = metrics
    this.#onCommitted = onCommitted
  }

  attachBridge (metrics: BridgeMetrics): void {
    this.#bridgeMetrics = metrics
  }

  onCommit (stats: CommitStats): void {
    this.#metrics?.appendLatency.observe(stats.latencyMs / 1000)
    this.#metrics?.commitRecords.observe(stats.records)
    this.#health.set(true)
    this.#onCommitted?.()
  }

  /** Counted when the write fails: its appends wait for the reopen, and reject only if their batch did not land. */
  onWriteError (err: Error): void {
    this.#metrics?.storeErrors.inc({ kind: 'write' })
    this.#health.set(false, err)
  }

  /** A retention pass's read met damage: counted like any read that did, once per pass and partition. */
  onRetentionBlocked (): void {
    this.#metrics?.storeErrors.inc({ kind: 'read' })
  }

  onDropped (d: DroppedRecords): void {
    this.#metrics?.droppedRecords.inc({ ...splitStream(d.stream), partition: String(d.partition), group: d.group }, d.count)
    const upstream = this.#bridgeGroups.get(d.group)
    if (upstream !== undefined) this.#bridgeMetrics?.droppedBeforeForward.inc({ upstream }, d.count)
  }
}
