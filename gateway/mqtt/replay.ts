/**
 * Replay of the log to plain MQTT 3.1.1 clients. A client subscribes to
 *
 *     $replay/<range>/<topic filter>
 *
 * and receives the records of its tenant whose topic matches the filter, as
 * ordinary PUBLISH packets on `$replay/<range>/<original topic>`: that topic
 * matches the subscription (its first level is the literal `$replay`, so the
 * wildcards after it match [MQTT-4.7.2-1]), and any client library dispatches
 * it there. History arrives with RETAIN set: it is sent because a
 * subscription was made, as retained messages are [MQTT-3.3.1-8]. Then one
 * PUBLISH on `$replay/<range>/$done` without RETAIN, with a JSON body, says
 * the history is complete (`mosquitto_sub --retained-only` exits there); a
 * `..live` range goes on with records as they are appended, without RETAIN
 * [MQTT-3.3.1-9].
 *
 * Range: `<start>` or `<start>..<end>`.
 * - start: `earliest`, `latest`, an offset (`1200`, in every partition, clamped
 *   into the log), or a time (`2026-11-24T02:00:00Z`, `2026-11-24`, `now`,
 *   `-15m`, `@<epoch ms>`), resolved through the time index;
 * - end (exclusive): an offset, a time, or `live`. Without `..live` a replay
 *   is a snapshot: it ends at each partition's log end as of the SUBSCRIBE.
 *
 * Ranges are planned and read by the one read path (query/read-plan.ts):
 * an offset applies to every partition and is clamped into each log
 * (policy `outside: 'clamp'`), and the history is a snapshot
 * (`snapshot: true`) that `..live` lifts once it is delivered.
 *
 * Where records come from: every stream of the client's tenant that a route
 * sends topics matching the filter to; in each, only the partition of the key
 * the filter names at the route's key level (`devices/dev-42/#` reads one
 * partition), or every partition when that level is a wildcard. Each record
 * is checked against the filter and the client's read ACL, as a live delivery
 * is (authorizeForward). The ACL also decides at SUBSCRIBE time, on the
 * filter.
 *
 * Order: within a partition, offset order. Across partitions the records are
 * merged by timestamp (ties: stream, then partition), which needs one chunk
 * of each partition in memory at a time; live records follow as appended.
 *
 * Pacing: at QoS 1 at most `inflight` replay messages are unacknowledged;
 * the replay resumes when the client's PUBACKs bring that down to half. At
 * QoS 0 (a QoS 0 subscription) only the socket's backpressure paces it. The
 * store is read in chunks, so memory is bounded by partitions x chunk, never
 * by the length of the history.
 *
 * Packet ids come from the client's own counter, which aedes' live deliveries
 * use too, skipping ids a replay still has in flight; aedes does not know the
 * replay's ids, so a clash would need 65,535 other deliveries while one replay
 * message waits for its PUBACK.
 *
 * Sessions: a $replay subscription is never stored in a persistent session;
 * it ends with the connection, with UNSUBSCRIBE, or when the same filter is
 * subscribed again (which starts the replay over). Unacknowledged replay
 * messages are not sent again after a reconnect: subscribe again.
 */
import { systemClock, type Clock, type LogStore, type StoredRecord } from '../../store/index.ts'
import { expiredAt } from '../../bridge/index.ts'
import { isAllowed, type Identity } from '../access/auth.ts'
import type { AclRule, RouteConfig } from '../config/config.ts'
import { GatewayError } from '../errors.ts'
import type { GatewayMetrics, ReplayOutcome } from '../metrics/metrics.ts'
import { filtersOverlap, topicFilterProblem, topicMatches } from '../access/topics.ts'
import { isQueryError } from '../query/errors.ts'
import { NO_PROPERTIES, publishPacketSize, recordProperties, writePublishPacket, type FrameConnection } from './publish-frames.ts'
import { checkRange, parsePosition as parseReadPosition, PartitionReader, planRead, type Position, type ReadRange } from '../query/read-plan.ts'

export const REPLAY_LEVEL = '$replay'
/** Last level of the completion marker's topic. */
export const DONE_LEVEL = '$done'

/**
 * Records read from a partition per store read (a whole batch), and their
 * payload bytes. Each read of older records seeks; with 256 KiB reads of 1 KB
 * records a replay of 100 MB left the gateway with some 400 MB more native
 * memory (LevelDB and the allocator, not the JS heap), with 1 MiB about as
 * much as the HTTP API's reads (120 MB, the same for a 400 MB log).
 */
const CHUNK_RECORDS = 1000
const CHUNK_BYTES = 1024 * 1024
/** Records and bytes written to the socket at once. */
const BATCH_RECORDS = 500
const BATCH_BYTES = 256 * 1024
/** Per-replay cache of delivered topics; a replay walking more topics recomputes. */
const CACHE_ENTRIES = 4096
const MAX_TOPIC_BYTES = 65535

export type ReplayStart = Position

export type ReplayEnd =
  | { readonly kind: 'snapshot' | 'live' }
  | { readonly kind: 'offset', readonly offset: number }
  | { readonly kind: 'time', readonly timestamp: number }

export interface ReplayRequest {
  /** The subscription as the client wrote it, `$replay/<range>/<filter>`. */
  readonly subscription: string
  /** The range level as the client wrote it; delivered topics repeat it. */
  readonly range: string
  readonly start: ReplayStart
  readonly end: ReplayEnd
  /** The topic filter records must match. */
  readonly filter: string
}

/** Whether a topic or filter is in the replay namespace (`$replay` or `$replay/...`). */
export function isReplayTopic (topic: string): boolean {
  return topic.startsWith(REPLAY_LEVEL) && (topic.length === REPLAY_LEVEL.length || topic[REPLAY_LEVEL.length] === '/')
}

const USAGE = 'expected $replay/<range>/<topic filter>, e.g. $replay/earliest/devices/+/telemetry/# or $replay/-1h..live/devices/dev-42/#'
const POSITIONS = 'an offset such as 1200, or a time: 2026-11-24T02:00:00Z, 2026-11-24, now, -15m, or epoch milliseconds as @1764000000000'

/**
 * Reads a `$replay/<range>/<filter>` subscription. Relative times count back
 * from `now`. Throws GW_REPLAY_BAD_RANGE or GW_REPLAY_BAD_FILTER.
 */
export function parseReplaySubscription (subscription: string, now: number): ReplayRequest {
  if (!isReplayTopic(subscription)) throw new GatewayError('GW_REPLAY_BAD_FILTER', `${JSON.stringify(subscription)} is not a replay: ${USAGE}`)
  const rest = subscription.slice(REPLAY_LEVEL.length + 1)
  const slash = rest.indexOf('/')
  const range = slash === -1 ? rest : rest.slice(0, slash)
  const bad = (why: string): GatewayError => new GatewayError('GW_REPLAY_BAD_RANGE', `${JSON.stringify(subscription)}: ${why}; ${USAGE}`)
  if (range.includes('+') || range.includes('#')) throw bad('the range level cannot be a wildcard: it says where the replay starts')
  if (slash === -1 || subscription.length <= REPLAY_LEVEL.length) {
    throw new GatewayError('GW_REPLAY_BAD_FILTER', `${JSON.stringify(subscription)}: no topic filter after the range; ${USAGE}`)
  }
  const filter = rest.slice(slash + 1)
  const problem = topicFilterProblem(filter)
  if (problem !== null) throw new GatewayError('GW_REPLAY_BAD_FILTER', `${JSON.stringify(subscription)}: topic filter ${JSON.stringify(filter)}: ${problem}`)
  if (isReplayTopic(filter)) throw new GatewayError('GW_REPLAY_BAD_FILTER', `${JSON.stringify(subscription)}: the log holds no $replay topics to replay`)

  const dots = range.indexOf('..')
  const startText = dots === -1 ? range : range.slice(0, dots)
  const endText = dots === -1 ? null : range.slice(dots + 2)
  // The read path's errors (query/read-plan.ts) are all GW_REPLAY_BAD_RANGE here, with what the range takes.
  const position = (text: string, which: 'start' | 'end'): Position => {
    try {
      return parseReadPosition(text, now, { name: `the ${which}`, start: which === 'start' })
    } catch (err) {
      if (!isQueryError(err)) throw err
      throw bad(`${err.message} (the ${which} is ${which === 'start' ? 'earliest, latest, ' : ''}${POSITIONS}${which === 'end' ? ', or live' : ''})`)
    }
  }
  const start = position(startText, 'start')
  let end: ReplayEnd = { kind: 'snapshot' }
  if (endText === 'live') end = { kind: 'live' }
  else if (endText !== null) end = position(endText, 'end') as ReplayEnd
  try {
    checkRange(replayRange({ start, end }), { startOffset: 'the start', endOffset: 'the end', startTime: 'the start', endTime: 'the end' })
  } catch (err) {
    if (!isQueryError(err)) throw err
    throw bad(err.message)
  }
  return { subscription, range, start, end, filter }
}

/** A replay's range as the read path takes it; `live` and `snapshot` have no end of their own (the plan's policy ends a snapshot). */
function replayRange (r: Pick<ReplayRequest, 'start' | 'end'>): ReadRange {
  return {
    start: r.start,
    endOffset: r.end.kind === 'offset' ? r.end.offset : null,
    endTime: r.end.kind === 'time' ? r.end.timestamp : null,
  }
}

export interface ReplayPartition {
  /** The store's `<tenant>/<stream>` name. */
  readonly stream: string
  readonly partition: number
}

/** The literal a filter has at `level` (so every topic it matches has it there), or null when that level is open. */
function literalAt (filter: string, level: number): string | null {
  const levels = filter.split('/')
  for (let i = 0; i <= level; i++) {
    const l = levels[i]
    if (l === undefined || l === '#' || (i === level && l === '+')) return null
  }
  return levels[level] as string
}

/**
 * The partitions that can hold records of `tenant` whose topic matches
 * `filter`, by the current routes: the streams routes send such topics to,
 * and in each the partitions of the keys the filter fixes at the routes' key
 * levels (all partitions when a route's key level is open in the filter).
 * Sorted by stream, then partition.
 */
export function replayPartitions (routes: readonly RouteConfig[], tenant: string, filter: string,
  store: Pick<LogStore, 'listStreams' | 'partitionFor'>): ReplayPartition[] {
  const wanted = new Map<string, Set<number> | 'all'>()
  const partitions = new Map(store.listStreams().map((s) => [s.name, s.partitions]))
  for (const route of routes) {
    const stream = `${tenant}/${route.stream}`
    if (!partitions.has(stream) || wanted.get(stream) === 'all' || !filtersOverlap(route.filter, filter)) continue
    const key = literalAt(filter, route.keyLevel)
    if (key === null) { wanted.set(stream, 'all'); continue }
    if (key === '') continue // the route logs no topic with an empty key
    const set = wanted.get(stream) as Set<number> | undefined ?? new Set<number>()
    set.add(store.partitionFor(stream, key))
    wanted.set(stream, set)
  }
  const out: ReplayPartition[] = []
  for (const stream of [...wanted.keys()].sort()) {
    const which = wanted.get(stream) as Set<number> | 'all'
    const list = which === 'all' ? Array.from({ length: partitions.get(stream) as number }, (_, p) => p) : [...which].sort((a, b) => a - b)
    for (const partition of list) out.push({ stream, partition })
  }
  return out
}

/** What a replay needs of the client's connection; hooks/replays.ts adapts an aedes client to it. */
export type ReplayConnection = FrameConnection

export interface ReplayLimits {
  /** Unacknowledged QoS 1 replay messages per replay. */
  readonly inflight: number
  readonly maxPerClient: number
  readonly maxActive: number
}

export interface ReplayLogger {
  info (fields: Record<string, unknown>, message: string): void
  warn (fields: Record<string, unknown>, message: string): void
}

export interface MqttReplayDeps {
  readonly store: LogStore
  readonly routes: readonly RouteConfig[]
  readonly acl: readonly AclRule[]
  readonly limits: ReplayLimits
  readonly metrics: Pick<GatewayMetrics, 'replaysActive' | 'replayMessages' | 'replaysFinished' | 'expiredDropped'>
  readonly logger: ReplayLogger
  /** Where `now` and relative times come from (the store's Clock; the system's when not given). */
  readonly clock?: Clock
}

/** A $replay subscription the ACL and the limits let through, waiting for its SUBACK to go out. */
export interface ReplayTicket {
  readonly request: ReplayRequest
  readonly who: Identity
}

/** The replays of one client, and the packet ids they have in flight. */
class ReplayChannel {
  /** Running replays by subscription (the mounted filter aedes keys it by). */
  readonly running = new Map<string, Replay>()
  readonly pending = new Set<ReplayTicket>()
  /** Packet id → the replay waiting for its PUBACK. */
  readonly inflight = new Map<number, Replay>()
  closed = false

  constructor (readonly conn: ReplayConnection, onClose: () => void) {
    conn.stream.once('close', onClose)
    // Its ids in flight are skipped by every other taker of the client's counter (aedes, cursors, shares).
    conn.holdIds?.(this, (id) => this.inflight.has(id))
  }

  allocate (replay: Replay): number {
    for (;;) {
      const id = this.conn.nextMessageId()
      if (!this.inflight.has(id)) {
        this.inflight.set(id, replay)
        return id
      }
    }
  }
}

/**
 * The gateway's MQTT replays. broker.ts calls `prepare` from
 * authorizeSubscribe, `start` once the SUBACK is written, `stop` on
 * UNSUBSCRIBE and `acked` for every PUBACK.
 */
export class MqttReplays {
  readonly #deps: MqttReplayDeps
  readonly #channels = new WeakMap<ReplayConnection, ReplayChannel>()
  /** Replays running or waiting for their SUBACK, over all clients. */
  #count = 0

  constructor (deps: MqttReplayDeps) {
    this.#deps = deps
  }

  get active (): number { return this.#count }

  /**
   * Checks a `$replay/...` subscription: syntax, the ACL on its filter, the
   * limits. Throws GW_REPLAY_BAD_RANGE, GW_REPLAY_BAD_FILTER,
   * GW_REPLAY_DENIED or GW_REPLAY_LIMIT.
   */
  prepare (conn: ReplayConnection, who: Identity, subscription: string): ReplayTicket {
    const request = parseReplaySubscription(subscription, (this.#deps.clock ?? systemClock).now())
    if (!isAllowed(this.#deps.acl, who, 'subscribe', request.filter)) {
      throw new GatewayError('GW_REPLAY_DENIED', `${JSON.stringify(subscription)}: the ACL does not allow subscribing to ${request.filter}`)
    }
    const channel = this.#channel(conn)
    const { maxPerClient, maxActive } = this.#deps.limits
    if (channel.running.size + channel.pending.size >= maxPerClient) {
      throw new GatewayError('GW_REPLAY_LIMIT', `${JSON.stringify(subscription)}: the client already runs ${maxPerClient} replays (mqtt.replay.maxPerClient)`)
    }
    if (this.#count >= maxActive) {
      throw new GatewayError('GW_REPLAY_LIMIT', `${JSON.stringify(subscription)}: the gateway already runs ${maxActive} replays (mqtt.replay.maxActive)`)
    }
    const ticket: ReplayTicket = { request, who }
    channel.pending.add(ticket)
    this.#count++
    return ticket
  }

  /** Starts a prepared replay; `key` is the subscription as aedes stored it. A running replay of the same key is replaced. */
  start (conn: ReplayConnection, ticket: ReplayTicket, key: string, grantedQos: number): void {
    const channel = this.#channels.get(conn)
    if (channel === undefined || !channel.pending.delete(ticket)) return
    if (channel.closed || conn.closed) { this.#count--; return }
    channel.running.get(key)?.cancel()
    const replay = new Replay(this.#deps, channel, ticket, grantedQos === 0 ? 0 : 1)
    channel.running.set(key, replay)
    void replay.run().finally(() => {
      if (channel.running.get(key) === replay) channel.running.delete(key)
      this.#count--
    })
  }

  /** Ends the replays of these subscriptions (UNSUBSCRIBE). */
  stop (conn: ReplayConnection, keys: readonly string[]): void {
    const channel = this.#channels.get(conn)
    if (channel === undefined) return
    for (const key of keys) channel.running.get(key)?.cancel()
  }

  /** Takes a PUBACK that answers a replay message; false when the packet id is not a replay's. */
  acked (conn: ReplayConnection, messageId: number): boolean {
    const channel = this.#channels.get(conn)
    const replay = channel?.inflight.get(messageId)
    if (channel === undefined || replay === undefined) return false
    channel.inflight.delete(messageId)
    replay.acked()
    return true
  }

  #channel (conn: ReplayConnection): ReplayChannel {
    let channel = this.#channels.get(conn)
    if (channel === undefined) {
      const created = new ReplayChannel(conn, () => {
        created.closed = true
        this.#count -= created.pending.size
        created.pending.clear()
        for (const replay of created.running.values()) replay.cancel()
      })
      channel = created
      this.#channels.set(conn, channel)
    }
    return channel
  }
}

/** One partition's reader (query/read-plan.ts), and the chunk of matching records read ahead. */
class Cursor {
  /** Records read and accepted, not yet sent; `pos` is the next one. */
  buffer: StoredRecord[] = []
  /** The delivered topic of each record in `buffer`, encoded. */
  topics: Buffer[] = []
  pos = 0

  constructor (readonly stream: string, readonly partition: number, readonly from: number, readonly reader: PartitionReader) {}

  /** Next offset to read. */
  get next (): number { return this.reader.next }
  /** Offset the replay stops before; Infinity once live. */
  get end (): number { return this.reader.end }
  get head (): StoredRecord | undefined { return this.buffer[this.pos] }
}

/** Records to send, each with its delivered topic. */
interface Batch {
  readonly records: StoredRecord[]
  readonly topics: Buffer[]
  /** The partition of each record (for an MQTT 5 client's record properties). */
  readonly partitions: number[]
  /** Records skipped because their message expiry had passed: a batch may be empty while the replay goes on. */
  expired: number
}

const NO_RECORDS: Batch = { records: [], topics: [], partitions: [], expired: 0 }

/** One running replay. */
class Replay {
  readonly #deps: MqttReplayDeps
  readonly #channel: ReplayChannel
  readonly #request: ReplayRequest
  readonly #who: Identity
  readonly #qos: 0 | 1
  readonly #prefix: string
  readonly #resumeAt: number
  /** Unacknowledged QoS 1 messages at most: mqtt.replay.inflight, or the client's receive maximum if smaller. */
  readonly #window: number
  #cancelled = false
  #inflight = 0
  #records = 0
  #wake: (() => void) | null = null
  #wakeScheduled = false
  /** Record topic → its delivered topic, encoded; null when the record is not for this replay. */
  readonly #topics = new Map<string, Buffer | null>()
  readonly #messages: { inc (n?: number): void }

  constructor (deps: MqttReplayDeps, channel: ReplayChannel, ticket: ReplayTicket, qos: 0 | 1) {
    this.#deps = deps
    this.#channel = channel
    this.#request = ticket.request
    this.#who = ticket.who
    this.#qos = qos
    this.#prefix = `${REPLAY_LEVEL}/${ticket.request.range}/`
    this.#window = Math.min(deps.limits.inflight, channel.conn.receiveMaximum ?? deps.limits.inflight)
    this.#resumeAt = Math.floor(this.#window / 2)
    this.#messages = deps.metrics.replayMessages.labels(ticket.who.tenant)
  }

  get #stopped (): boolean {
    return this.#cancelled || this.#channel.closed || this.#channel.conn.closed || this.#channel.conn.stream.destroyed === true
  }

  cancel (): void {
    this.#cancelled = true
    this.#wakeUp()
  }

  acked (): void {
    this.#inflight--
    // PUBACKs come in runs (aedes handles a whole chunk of packets at once): wake once for the run.
    if (this.#wake !== null && this.#inflight <= this.#resumeAt && !this.#wakeScheduled) {
      this.#wakeScheduled = true
      setImmediate(() => { this.#wakeScheduled = false; this.#wakeUp() })
    }
  }

  #wakeUp (): void {
    const wake = this.#wake
    this.#wake = null
    wake?.()
  }

  /** Resolves at the next wake-up: an ack run, a drain, an append (live), or the end of the replay. */
  #sleep (): Promise<void> {
    return new Promise((resolve) => { this.#wake = resolve })
  }

  async run (): Promise<void> {
    const { metrics, logger } = this.#deps
    const { tenant, clientId } = this.#who
    const started = performance.now()
    const fields = { clientId, tenant, replay: this.#request.subscription }
    metrics.replaysActive.inc({ tenant })
    let outcome: ReplayOutcome = 'done'
    let cursors: Cursor[] = []
    let unlisten = (): void => {}
    try {
      if (this.#request.end.kind === 'live') unlisten = this.#deps.store.onAppend(() => this.#wakeUp())
      cursors = await this.#open()
      logger.info({ ...fields, partitions: cursors.length }, 'replay started')
      await this.#pump(cursors, false)
      if (this.#stopped) { outcome = 'cancelled'; return }
      await this.#send(NO_RECORDS, this.#doneMarker(cursors, null), false)
      if (this.#request.end.kind !== 'live') return
      for (const c of cursors) c.reader.openEnd()
      await this.#pump(cursors, true)
      outcome = 'cancelled'
    } catch (err) {
      if (this.#stopped) { outcome = 'cancelled'; return }
      outcome = 'failed'
      const e = err as Error & { code?: string }
      logger.warn({ ...fields, code: e.code, err: e.message }, 'replay failed')
      await this.#send(NO_RECORDS, this.#doneMarker(cursors, e), false).catch(() => {})
    } finally {
      unlisten()
      metrics.replaysActive.dec({ tenant })
      metrics.replaysFinished.inc({ tenant, outcome })
      logger.info({ ...fields, records: this.#records, outcome, ms: Math.round(performance.now() - started) }, 'replay ended')
    }
  }

  /**
   * Plans the range on every partition the filter can reach: one offset
   * applies to every partition, so it is clamped into each log; without
   * `..live` the history ends at each log end as of now (a snapshot, lifted
   * for the live part). The filter and the ACL choose the records.
   */
  async #open (): Promise<Cursor[]> {
    const { store, routes } = this.#deps
    const { filter } = this.#request
    const targets = replayPartitions(routes, this.#who.tenant, filter, store)
    const cursors: Cursor[] = []
    for (const stream of new Set(targets.map((t) => t.stream))) {
      const partitions = targets.filter((t) => t.stream === stream).map((t) => t.partition)
      for (const range of await planRead(store, stream, partitions, replayRange(this.#request), { outside: 'clamp', snapshot: true })) {
        const reader = new PartitionReader(store, range, {
          filter: (r) => this.#deliveredTopic(r.topic) !== null,
          chunkRecords: CHUNK_RECORDS,
          chunkBytes: CHUNK_BYTES,
          onGap: (skipped) => this.#deps.logger.warn({ clientId: this.#who.clientId, stream, partition: range.partition, skipped },
            'replay: retention deleted records before they were replayed'),
        })
        cursors.push(new Cursor(stream, range.partition, range.start, reader))
      }
    }
    return cursors
  }

  /**
   * Whether the cursor has records to read: below its end, and (live) not at the log end. Past the log end (a
   * standby's log rewound under it) a step moves it back to the new end (read-plan.ts), from where the new history's
   * records are read as they arrive.
   */
  #readable (c: Cursor, live: boolean): boolean {
    return c.next < c.end && (!live || c.next !== this.#deps.store.partitionInfo(c.stream, c.partition).logEndOffset)
  }

  /** Sends records in merged order until the history is delivered (or, live, until the replay is stopped). */
  async #pump (cursors: readonly Cursor[], live: boolean): Promise<void> {
    for (;;) {
      if (this.#stopped) return
      for (const c of cursors) {
        while (c.head === undefined && this.#readable(c, live)) {
          await this.#fill(c)
          if (this.#stopped) return
        }
      }
      const room = this.#qos === 1 ? this.#window - this.#inflight : BATCH_RECORDS
      if (room <= 0) { await this.#sleep(); continue }
      const batch = this.#take(cursors, live, Math.min(room, BATCH_RECORDS))
      if (batch.records.length > 0) { await this.#send(batch, null, !live); continue }
      if (batch.expired > 0) continue // a chunk of expired records: read on
      if (!live) return
      // Caught up: wait for an append (onAppend wakes every live replay; the loop checks its own partitions).
      if (!cursors.some((c) => c.head !== undefined || this.#readable(c, true))) await this.#sleep()
    }
  }

  /**
   * Takes up to `room` records in timestamp order. Stops when a partition's
   * chunk runs out while it has more to read, so it is read before anything
   * later is taken.
   */
  #take (cursors: readonly Cursor[], live: boolean, room: number): Batch {
    const out: Batch = { records: [], topics: [], partitions: [], expired: 0 }
    const now = (this.#deps.clock ?? systemClock).now()
    let bytes = 0
    while (out.records.length < room && bytes < BATCH_BYTES) {
      let best: Cursor | undefined
      for (const c of cursors) {
        const head = c.head
        if (head === undefined) {
          if (this.#readable(c, live)) return out
          continue
        }
        if (best === undefined || head.timestamp < (best.head as StoredRecord).timestamp) best = c
      }
      if (best === undefined) return out
      const r = best.buffer[best.pos] as StoredRecord
      const topic = best.topics[best.pos++] as Buffer
      if (best.pos === best.buffer.length) { best.buffer = []; best.topics = []; best.pos = 0 }
      // A replay asks for history, but an MQTT delivery still may not carry an expired message [MQTT-3.3.2-5].
      if (expiredAt(r.headers ?? null, r.timestamp, now)) {
        out.expired++
        this.#deps.metrics.expiredDropped.inc({ tenant: this.#who.tenant, path: 'replay' })
        continue
      }
      out.records.push(r)
      out.topics.push(topic)
      out.partitions.push(best.partition)
      bytes += r.payload.byteLength
    }
    return out
  }

  /** Reads the cursor's next chunk, keeping the records the filter and the ACL let through. */
  async #fill (c: Cursor): Promise<void> {
    const { records } = await c.reader.step()
    // The reader kept the records that have a delivered topic; the cache answers again (or works it out once more if it was cleared).
    c.buffer = records
    c.topics = records.map((r) => this.#deliveredTopic(r.topic) as Buffer)
    c.pos = 0
  }

  /**
   * The topic a record is delivered on, `$replay/<range>/<topic>`, encoded;
   * null when the record is not for this replay: its topic does not match
   * the filter, the client may not read it (read access per message, as
   * authorizeForward checks it for live deliveries), or the delivered topic
   * would be longer than MQTT allows. Worked out once per topic.
   */
  #deliveredTopic (topic: string): Buffer | null {
    let encoded = this.#topics.get(topic)
    if (encoded === undefined) {
      const b = Buffer.from(this.#prefix + topic)
      const ok = topicMatches(this.#request.filter, topic) && isAllowed(this.#deps.acl, this.#who, 'subscribe', topic) && b.length <= MAX_TOPIC_BYTES
      encoded = ok ? b : null
      if (this.#topics.size >= CACHE_ENTRIES) this.#topics.clear()
      this.#topics.set(topic, encoded)
    }
    return encoded
  }

  #doneMarker (cursors: readonly Cursor[], err: (Error & { code?: string }) | null): Buffer {
    const body: Record<string, unknown> = {
      replay: this.#request.subscription,
      records: this.#records,
      live: this.#request.end.kind === 'live',
      // Where the history began and ended in each partition; after a failure only the error is known for sure.
      partitions: err !== null
        ? []
        : cursors.map((c) => ({ stream: c.stream.slice(this.#who.tenant.length + 1), partition: c.partition, from: c.from, to: c.end })),
    }
    if (err !== null) body.error = { code: err.code ?? 'GW_REPLAY_FAILED', message: err.message }
    return Buffer.from(JSON.stringify(body))
  }

  /**
   * Writes records (and the done marker) as one socket write, then waits
   * while the socket is full. History goes out with RETAIN set, as messages
   * sent because a subscription was made [MQTT-3.3.1-8]; the done marker and
   * live records without, as messages matching an established subscription
   * [MQTT-3.3.1-9]. So the first PUBLISH without RETAIN ends the history.
   */
  async #send (batch: Batch, done: Buffer | null, retain: boolean): Promise<void> {
    while (done !== null && this.#qos === 1 && this.#inflight >= this.#window && !this.#stopped) await this.#sleep()
    if (this.#stopped) return
    const { records, topics, partitions } = batch
    const mqtt5 = this.#channel.conn.mqtt5 === true
    const now = (this.#deps.clock ?? systemClock).now()
    const properties = mqtt5 ? records.map((r, i) => recordProperties(partitions[i] as number, r, now)) : []
    const doneTopic = done === null ? null : Buffer.from(this.#prefix + DONE_LEVEL)
    const doneProperties = mqtt5 ? NO_PROPERTIES : undefined
    let size = done === null ? 0 : publishPacketSize(doneTopic as Buffer, done, this.#qos, doneProperties)
    for (let i = 0; i < records.length; i++) size += publishPacketSize(topics[i] as Buffer, (records[i] as StoredRecord).payload, this.#qos, properties[i])
    const out = Buffer.allocUnsafe(size)
    let at = 0
    for (let i = 0; i < records.length; i++) {
      const id = this.#qos === 1 ? this.#channel.allocate(this) : 0
      at = writePublishPacket(out, at, topics[i] as Buffer, (records[i] as StoredRecord).payload, this.#qos, id, retain, properties[i])
    }
    if (done !== null) {
      writePublishPacket(out, at, doneTopic as Buffer, done, this.#qos, this.#qos === 1 ? this.#channel.allocate(this) : 0, false, doneProperties)
    }
    if (this.#qos === 1) this.#inflight += records.length + (done === null ? 0 : 1)
    this.#records += records.length
    this.#messages.inc(records.length)
    const stream = this.#channel.conn.stream
    if (stream.write(out)) return
    const onDrain = (): void => this.#wakeUp()
    stream.once('drain', onDrain)
    try {
      while (stream.writableNeedDrain && !this.#stopped) await this.#sleep()
    } finally {
      stream.off('drain', onDrain)
    }
  }
}
