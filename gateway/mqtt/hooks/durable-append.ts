/**
 * The append authorizePublish waits for before aedes acks (ack means
 * durable), and the backpressure it puts on the sockets.
 *
 * A failed write (disk full, store error) is retried with backoff while the
 * client is connected: the ack is held back, the client's socket is not
 * read, and nothing is acknowledged that is not on disk. An MQTT 5 client's
 * QoS 1/2 publish is not retried: its PUBACK/PUBREC says why (0x97, 0x80). When more appends
 * are pending than mqtt.maxPendingAppends, every MQTT socket is paused until
 * the log has drained to half of that ({@link releaseBackpressure}).
 */
import type { Client, PublishPacket } from 'aedes'
import { isStoreError, type AppendOptions, type LogStore } from '../../../store/index.ts'
import { propertiesToHeaders, type MessageProperties } from '../../../bridge/index.ts'
import type { Identity } from '../../access/auth.ts'
import type { GatewayMetrics, PublishRefusal } from '../../metrics/metrics.ts'
import type { GuardGroup } from '../connection-guard.ts'
import type { LogPosition } from '../log-position.ts'
import { isMqtt5 } from '../reason-codes.ts'
import type { HookContext } from './context.ts'

/** Header of every record an authenticated client sent: its username (a certificate's CN with certIdentity), for audit. */
export const USER_HEADER = 'edgemq-user'
/**
 * Header of a record whose PUBLISH had RETAIN set (value `1`): a persistent session reading the record from the log
 * gives MQTT 5 subscriptions with Retain As Published the flag as published (sessions/cursors.ts).
 */
export const RETAIN_HEADER = 'edgemq-retain'

const RETRY_MIN_MS = 100
const RETRY_MAX_MS = 5000

/** Where one publish goes in the log. */
export interface AppendTarget {
  readonly stream: string
  readonly key: string
  /** The topic as the client sent it (unmounted). */
  readonly topic: string
}

/** `position`: where the record is in the log (the first append's, for a duplicate). */
export type AppendDone = (err: Error | null, duplicate?: boolean, position?: LogPosition) => void

type Counter = { inc (n?: number): void }

/**
 * The ingest counters of one stream, and what was appended to it since they were last added to. prom-client's inc on
 * a labelled child costs a hash lookup each: two per message were 2.2 % of the main thread in the fan-in bench, so
 * the counts of the appends one group commit completes go in once, in the next turn of the event loop.
 */
interface IngestCounters {
  readonly messages: Counter
  readonly bytes: Counter
  uncountedMessages: number
  uncountedBytes: number
}

/** What the appender needs of the hooks' context. */
export type AppenderDeps = Pick<HookContext, 'config' | 'store' | 'metrics' | 'logger' | 'guards' | 'onStoreHealth' | 'refusePublish'>

export class DurableAppender {
  readonly #ctx: AppenderDeps
  /** The ingest counters of one stream, bound to their labels once (prom-client hashes label objects per inc). */
  readonly #ingest = new Map<string, IngestCounters>()
  /** Ingest counters with appends not added yet (see IngestCounters); a flush is scheduled when it is not empty. */
  readonly #uncounted: IngestCounters[] = []
  /** Appends not yet settled (each counted once across its retries), and who waits for none. */
  #inflight = 0
  #settledWaiters: Array<() => void> = []
  /** A write failed and no append has succeeded since: the next success reports the log healthy again. */
  #failing = false

  constructor (ctx: AppenderDeps) {
    this.#ctx = ctx
  }

  /** Appends and calls back once the record is durable (or refused); see the header for retries and backpressure. */
  append (client: Client, who: Identity, target: AppendTarget, packet: PublishPacket, done: AppendDone,
    options?: AppendOptions, headers?: Record<string, string>): void {
    this.#inflight++
    this.#append(client, who, target, packet, (err, duplicate, position) => {
      if (--this.#inflight === 0) for (const resolve of this.#settledWaiters.splice(0)) resolve()
      done(err, duplicate, position)
    }, options, headers, RETRY_MIN_MS)
  }

  /**
   * Resolves once every append started so far has settled. The gateway's shutdown waits for it after the clients
   * are closed: an append of a closed client is not retried, so this ends.
   */
  settled (): Promise<void> {
    if (this.#inflight === 0) return Promise.resolve()
    return new Promise((resolve) => this.#settledWaiters.push(resolve))
  }

  #append (client: Client, who: Identity, target: AppendTarget, packet: PublishPacket, done: AppendDone,
    options: AppendOptions | undefined, headers: Record<string, string> | undefined, delay: number): void {
    const { store, guards, metrics, logger } = this.#ctx
    const payload = typeof packet.payload === 'string' ? Buffer.from(packet.payload) : packet.payload
    const counters = this.#counters(who.tenant, target.stream)
    // An MQTT 5 message's properties are kept as headers (bridge/mqtt-properties.ts); a 3.1.1 packet has none.
    const properties = propertiesToHeaders((packet as PublishPacket & { properties?: MessageProperties }).properties)
    const withProperties = properties === null ? headers : { ...headers, ...properties }
    const named = who.username === null ? withProperties : { ...withProperties, [USER_HEADER]: who.username }
    const stamped = packet.retain ? { ...named, [RETAIN_HEADER]: '1' } : named
    const base = { payload, topic: target.topic, qos: packet.qos, clientId: who.clientId }
    const record = stamped === undefined ? base : { ...base, headers: stamped }
    store.append(target.stream, target.key, record, options).then((result) => {
      // The ack that done() leads to leaves with the commit's other acks, before the next check phase (flushSoon).
      if (packet.qos > 0) guards.flushSoon(client.conn)
      if (result.duplicate !== true) this.#count(counters, payload.byteLength)
      if (this.#failing) {
        // A retried append, or (an MQTT 5 client's publish is not retried) any append after the failure.
        this.#failing = false
        this.#ctx.onStoreHealth(true)
      }
      done(null, result.duplicate === true, { stream: target.stream, partition: result.partition, offset: result.offset })
    }, (err: unknown) => {
      if (isStoreError(err, 'STORE_WRITE_FAILED') || isStoreError(err, 'STORE_CLOSED')) {
        this.#failing = true
        this.#ctx.onStoreHealth(false, err) // the failed write itself was counted by the store observer (gateway.ts)
        // An MQTT 5 QoS 1/2 publish is answered with the reason code (0x97 disk full, 0x80) on its PUBACK/PUBREC instead
        // of held: its client learns why and decides (authorize-publish.ts, inbound-qos2.ts).
        if (packet.qos === 0 || client.closed || isStoreError(err, 'STORE_CLOSED') || isMqtt5(client)) {
          this.#refuse(client, who, 'store-failed', err as Error)
          return done(packet.qos === 0 ? null : err as Error)
        }
        const retry = (): void => this.#append(client, who, target, packet, done, options, headers, Math.min(delay * 2, RETRY_MAX_MS))
        setTimeout(retry, delay).unref()
        return
      }
      this.#refuse(client, who, isStoreError(err, 'STORE_RECORD_TOO_LARGE') ? 'record-too-large' : 'store-failed', err as Error)
      done(err as Error)
    })
    if (store.pendingAppends > this.#ctx.config.mqtt.maxPendingAppends && !guards.paused) {
      guards.setPaused(true)
      metrics.backpressure.set(1)
      logger.warn({ pending: store.pendingAppends }, 'log backed up: pausing all MQTT sockets')
    }
  }

  #refuse (client: Client, who: Identity, reason: PublishRefusal, err: Error): void {
    this.#ctx.refusePublish(client, who, reason, err.message)
  }

  #counters (tenant: string, stream: string): IngestCounters {
    let c = this.#ingest.get(stream)
    if (c === undefined) {
      const name = stream.slice(tenant.length + 1)
      c = {
        messages: this.#ctx.metrics.ingestMessages.labels(tenant, name),
        bytes: this.#ctx.metrics.ingestBytes.labels(tenant, name),
        uncountedMessages: 0,
        uncountedBytes: 0,
      }
      this.#ingest.set(stream, c)
    }
    return c
  }

  /** Counts one appended message, added to the counters in the next turn of the event loop (see IngestCounters). */
  #count (counters: IngestCounters, bytes: number): void {
    if (counters.uncountedMessages === 0) {
      if (this.#uncounted.length === 0) setImmediate(flushCounts, this.#uncounted)
      this.#uncounted.push(counters)
    }
    counters.uncountedMessages++
    counters.uncountedBytes += bytes
  }
}

function flushCounts (uncounted: IngestCounters[]): void {
  for (const c of uncounted) {
    c.messages.inc(c.uncountedMessages)
    c.bytes.inc(c.uncountedBytes)
    c.uncountedMessages = 0
    c.uncountedBytes = 0
  }
  uncounted.length = 0
}

/** Resumes sockets once the log has drained to half the bound. */
export function releaseBackpressure (guards: GuardGroup, store: LogStore, maxPending: number, metrics: GatewayMetrics): void {
  if (guards.paused && store.pendingAppends <= maxPending / 2) {
    guards.setPaused(false)
    metrics.backpressure.set(0)
  }
}
