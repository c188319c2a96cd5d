/**
 * Messages an upstream refuses. Each refusal (an MQTT 5 PUBACK reason code
 * >= 0x80) counts one attempt against the message's dedupe id; a message
 * refused `maxDeliveryAttempts` times, or one too large for the upstream, is
 * appended to the dead-letter stream `<tenant>/dlq.<upstream>` (one
 * partition, 30 days' retention) with the reason and its source in headers,
 * under a dedupe id of its own so a retried append does not duplicate it.
 *
 * The uplink decides when to dead-letter and keeps the message's window slot
 * until the append is durable (so its lane cannot pass it); this file owns the
 * counting, the stream and the append. MQTT 3.1.1 refusals (disconnects) are
 * read by disconnect-refusals.ts.
 */
import type { LogStore, StoredRecord } from '../store/index.ts'
import { RECEIPT_UPSTREAM_HEADER } from './downlink.ts'
import type { Lane } from './lanes.ts'
import type { BridgeLogger, UplinkObserver } from './uplink/status.ts'

const DLQ_RETENTION_MS = 30 * 24 * 3600 * 1000
/** Messages whose refusals are remembered at most: bounded, whatever an upstream does. */
const MAX_TRACKED = 10_000

export interface DeadLetterDeps {
  readonly store: LogStore
  readonly logger: BridgeLogger
  readonly observer?: UplinkObserver
  readonly maxDeliveryAttempts: number
}

export class DeadLetters {
  readonly #upstream: string
  readonly #deps: DeadLetterDeps
  /** Refusals so far, by dedupe id. */
  readonly #attempts = new Map<string, number>()
  #appending = 0
  #count = 0

  constructor (upstream: string, deps: DeadLetterDeps) {
    this.#upstream = upstream
    this.#deps = deps
  }

  /** The tenant's dead-letter stream for this upstream. */
  stream (tenant: string): string {
    return `${tenant}/dlq.${this.#upstream}`
  }

  /** Creates the dead-letter stream of each tenant (idempotent). */
  async create (tenants: Iterable<string>): Promise<void> {
    for (const tenant of tenants) await this.#deps.store.createStream(this.stream(tenant), { partitions: 1, retentionMs: DLQ_RETENTION_MS })
  }

  /** Whether any message has a refusal counted (lets the hot path skip building dedupe ids). */
  get refusing (): boolean {
    return this.#attempts.size > 0
  }

  /** Refusals counted against message `id`. */
  attempts (id: string): number {
    return this.#attempts.get(id) ?? 0
  }

  /** Counts a refusal; returns true when the message has used up its attempts (the caller dead-letters it). */
  refused (id: string, offset: number, reason: string): boolean {
    const n = (this.#attempts.get(id) ?? 0) + 1
    if (this.#attempts.size < MAX_TRACKED) this.#attempts.set(id, n)
    const { logger, maxDeliveryAttempts } = this.#deps
    logger.warn({ upstream: this.#upstream, offset, attempt: n, of: maxDeliveryAttempts, reason }, 'upstream refused a message')
    return n >= maxDeliveryAttempts
  }

  /** The upstream acknowledged message `id`: its refusals are forgotten. */
  forget (id: string): void {
    this.#attempts.delete(id)
  }

  /** Messages dead-lettered so far. */
  get count (): number {
    return this.#count
  }

  /** Appends are in progress (stop() waits for them). */
  get appending (): boolean {
    return this.#appending > 0
  }

  /**
   * Appends `record` of `lane` to the dead-letter stream, then calls `written`; when the append fails it logs and
   * calls `failed` (the caller tries again). stop() waits while `appending`, callbacks included.
   */
  append (lane: Lane, record: StoredRecord, id: string, reason: string, written: () => void, failed: () => void): void {
    const { store, logger } = this.#deps
    const dlq = this.stream(lane.tenant)
    const headers = {
      ...record.headers,
      'edgemq-dlq-reason': reason,
      'edgemq-dlq-source': `${lane.stream}/${lane.partition}/${record.offset}`,
      [RECEIPT_UPSTREAM_HEADER]: this.#upstream,
    }
    const { payload, topic, qos, clientId, timestamp } = record
    this.#appending++
    store.append(dlq, record.key, { payload, topic, qos, clientId, headers, timestamp }, { dedupeId: `dlq/${this.#upstream}/${id}` }).then(() => {
      this.#count++
      this.#deps.observer?.onDeadLettered?.(this.#upstream, lane.tenant, lane.name)
      const fields = { upstream: this.#upstream, stream: lane.stream, partition: lane.partition, offset: record.offset, dlq, reason }
      logger.error(fields, 'message dead-lettered: the upstream refuses it')
      this.#attempts.delete(id)
      written()
    }, (err: unknown) => {
      logger.error({ upstream: this.#upstream, err: (err as Error).message, dlq }, 'dead-letter append failed; retrying')
      failed()
    }).finally(() => { this.#appending-- })
  }
}
