/**
 * What an uplink does whatever its transport, composed by the MQTT uplink (uplink/index.ts) and the NATS JetStream one
 * (nats/uplink.ts): the consumer group `bridge.<name>` that holds retention and its lanes (lanes.ts), reading a
 * lane's records from the log (skipping what retention deleted), the loop that picks the next record to send
 * (filters, receipts, dead letters after maxDeliveryAttempts, the rate limit), dead-lettering a record while it holds a
 * window slot, the accounting of acknowledged records, the offset commits and the common part of the status.
 *
 * The transport sends, matches acknowledgements and handles its connection; it tells the core what it needs through
 * {@link UplinkTransport}. The count of window slots in use, `inflight`, is shared: the transport takes one per
 * message it sends, the core one per dead-letter append under way.
 */
import { isStoreError, type Clock, type LogStore, type StoredRecord } from '../../store/index.ts'
import { OffsetCommits } from '../commits.ts'
import { BRIDGE_GROUP_PREFIX, type UpstreamConfig } from '../config-schema.ts'
import { DeadLetters } from '../dead-letters.ts'
import { RECEIPT_UPSTREAM_HEADER, RECEIPTS_STREAM, type CommandSink } from '../downlink.ts'
import { advance, createLane, LaneScheduler, skip, track, type Lane, type Pending } from '../lanes.ts'
import { TokenBucket } from '../token-bucket.ts'
import { captureTopic, type RECORD_VARIABLES, type Template } from '../topic-template.ts'
import { backlogOf, ThroughputMeter, type BridgeLogger, type UplinkObserver, type UpstreamStatus } from './status.ts'

/** Free window slots a draining uplink waits for before it refills (capped at a quarter of the window). */
const REFILL_BATCH = 32
const READ_RECORDS = 500
const READ_BYTES = 1024 * 1024
export const REFUSAL_RETRY_MS = 1000
const READ_RETRY_MS = 1000

export interface UplinkDeps {
  readonly store: LogStore
  readonly gatewayId: string
  readonly clock: Clock
  readonly logger: BridgeLogger
  readonly commitIntervalMs: number
  readonly observer?: UplinkObserver
  /** Required when the upstream has command mappings. */
  readonly commands?: CommandSink
  /** Source of jitter for reconnect delays (tests make it deterministic). */
  readonly random?: () => number
}

export type LaneTemplate = Template<typeof RECORD_VARIABLES[number]>

/** What the core asks of its transport. */
export interface UplinkTransport {
  /** Whether the link can carry records now (a lane's appends are read only then). */
  ready (): boolean
  /** Sends what the window allows (through {@link UplinkCore.drain}). */
  pump (): void
  /** A record's dead-letter append is durable and its slot freed (before the pump that follows). */
  deadLettered (): void
}

/** The status fields only the transport knows, in the order they are reported. */
export type TransportStatus = Pick<UpstreamStatus, 'url' | 'kind' | 'mqttVersion' | 'dedupeId' | 'connected' | 'since' | 'lastError' |
'connectFailures' | 'reconnects'>

export class UplinkCore {
  readonly config: UpstreamConfig
  readonly group: string
  readonly deps: UplinkDeps
  readonly #transport: UplinkTransport
  readonly #scheduler = new LaneScheduler()
  readonly lanes: readonly Lane[] = this.#scheduler.lanes
  readonly #commits: OffsetCommits
  readonly deadLetters: DeadLetters
  /** Null when the upstream has no rate limit. */
  readonly #bucket: TokenBucket | null
  readonly #throughput = new ThroughputMeter()
  #stopped = true
  #unlisten: (() => void) | null = null
  #commitTimer: NodeJS.Timeout | null = null
  #rateTimer: NodeJS.Timeout | null = null
  #pumpScheduled = false
  /** Window slots in use: messages sent and not yet settled, retries waiting in their place, dead-letter appends. */
  inflight = 0
  #forwarded = 0
  #forwardedBytes = 0

  constructor (config: UpstreamConfig, deps: UplinkDeps, transport: UplinkTransport) {
    this.config = config
    this.group = `${BRIDGE_GROUP_PREFIX}${config.name}`
    this.deps = deps
    this.#transport = transport
    this.#commits = new OffsetCommits(deps.store, this.group, config.name, deps.logger, this.lanes)
    this.deadLetters = new DeadLetters(config.name, { ...deps, maxDeliveryAttempts: config.maxDeliveryAttempts })
    const bucket = new TokenBucket(config.maxMessagesPerSecond, config.maxBytesPerSecond)
    this.#bucket = bucket.limited ? bucket : null
  }

  get stopped (): boolean {
    return this.#stopped
  }

  /**
   * Creates the group, the lanes (with the templates `templates` makes once the group exists) and the dead-letter
   * streams, and starts listening to appends and committing; the transport connects after.
   */
  async start (templates: () => { readonly record: LaneTemplate, readonly receipt: LaneTemplate }): Promise<void> {
    const { store } = this.deps
    await store.setGroup(this.group, { holdsRetention: true })
    const { record: template, receipt: receiptTemplate } = templates()
    const tenants = new Set<string>()
    for (const f of this.config.forward) {
      tenants.add(f.tenant)
      this.#addLanes(f.tenant, f.stream, f.priority, f.filter, template, false)
    }
    for (const tenant of new Set(this.config.commands.map((c) => c.tenant))) {
      tenants.add(tenant) // a receipt the upstream refuses is dead-lettered too
      this.#addLanes(tenant, RECEIPTS_STREAM, 9, '#', receiptTemplate, true)
    }
    await this.deadLetters.create(tenants)
    const byPartition = new Map(this.lanes.map((l) => [`${l.stream}\u0000${l.partition}`, l]))
    this.#unlisten = store.onAppend((event) => {
      const lane = byPartition.get(`${event.stream}\u0000${event.partition}`)
      if (lane === undefined) return
      lane.end = event.logEndOffset
      if (this.#transport.ready()) this.#fill(lane)
    })
    this.#stopped = false
    this.#commitTimer = setInterval(() => {
      this.#throughput.sample(this.#forwarded, this.deps.clock.now())
      void this.#commits.commit()
    }, this.deps.commitIntervalMs)
    this.#commitTimer.unref()
  }

  #addLanes (tenant: string, name: string, priority: number, filter: string, template: LaneTemplate, receipts: boolean): void {
    const { store } = this.deps
    const stream = `${tenant}/${name}`
    const info = store.streamInfo(stream)
    for (let partition = 0; partition < info.partitions; partition++) {
      const p = store.partitionInfo(stream, partition)
      const committed = store.fetchOffset(this.group, stream, partition)
      const start = Math.max(committed ?? p.logStartOffset, p.logStartOffset)
      this.#scheduler.add(createLane({ tenant, name, partition, priority, filter, template, receipts }, start, committed ?? -1, p.logEndOffset))
    }
  }

  /** Stops listening, runs `disconnect`, waits for dead-letter appends, and commits what the upstream acknowledged. */
  async stop (disconnect: () => Promise<void>): Promise<void> {
    if (this.#stopped) return
    this.#stopped = true
    this.#unlisten?.()
    if (this.#rateTimer !== null) clearTimeout(this.#rateTimer)
    if (this.#commitTimer !== null) clearInterval(this.#commitTimer)
    await disconnect()
    while (this.deadLetters.appending || this.#commits.running) {
      await this.#commits.settled()
      if (this.deadLetters.appending) await new Promise((resolve) => setTimeout(resolve, 10))
    }
    await this.#commits.commit()
    this.#report()
  }

  /** After a (re)connection: each lane's end as the log has it now. */
  catchUp (): void {
    for (const lane of this.lanes) lane.end = Math.max(lane.end, this.deps.store.partitionInfo(lane.stream, lane.partition).logEndOffset)
  }

  /**
   * Hands the lanes' next records to `send` while `room()` says the window has room: records the lane does not carry
   * are skipped, those `refusal` names a reason for are dead-lettered, and the rate limit may stop the loop. A lane
   * whose buffer runs out reads on at once, so while it reads, lanes of lower priority wait (LaneScheduler.next).
   */
  drain (room: () => boolean, refusal: (lane: Lane, record: StoredRecord) => string | null, send: (lane: Lane, entry: Pending) => void): void {
    while (room()) {
      const lane = this.#scheduler.next()
      if (lane === null) break
      const record = lane.buffer[lane.bufferAt] as StoredRecord
      if (!this.#wanted(lane, record)) {
        this.#take(lane)
        skip(lane, record)
        continue
      }
      const reason = refusal(lane, record)
      if (reason !== null) {
        this.#take(lane)
        this.deadLetter(lane, track(lane, record), reason)
        continue
      }
      if (this.#bucket !== null && !this.#takeTokens(this.#bucket, record.payload.byteLength)) break
      this.#take(lane)
      send(lane, track(lane, record))
    }
  }

  /** Moves past the lane's next buffered record; the last one starts the next read. */
  #take (lane: Lane): void {
    if (++lane.bufferAt >= lane.buffer.length) this.#fill(lane)
  }

  /** Starts a read for every lane whose buffer is used up and whose log has more. */
  fillEmpty (): void {
    for (const lane of this.lanes) {
      if (lane.bufferAt >= lane.buffer.length && !lane.reading && lane.nextRead < lane.end) this.#fill(lane)
    }
  }

  /** Takes the message's tokens, or sets a timer to pump again when the bucket will hold them. */
  #takeTokens (bucket: TokenBucket, bytes: number): boolean {
    const waitMs = bucket.take(bytes, this.deps.clock.now())
    if (waitMs === 0) return true
    if (this.#rateTimer === null) {
      this.#rateTimer = setTimeout(() => { this.#rateTimer = null; this.#transport.pump() }, waitMs)
      this.#rateTimer.unref()
    }
    return false
  }

  #wanted (lane: Lane, record: StoredRecord): boolean {
    if (lane.receipts) return record.headers?.[RECEIPT_UPSTREAM_HEADER] === this.config.name
    return lane.filter === '#' || captureTopic(lane.filter, record.topic) !== null
  }

  dedupeId (lane: Lane, offset: number): string {
    return `${this.deps.gatewayId}/${lane.tenant}/${lane.name}/${lane.partition}/${offset}`
  }

  /** Counts the record of `entry` as delivered; the transport then advances the lane ({@link advance}). */
  acked (lane: Lane, entry: Pending): void {
    entry.acked = true
    const record = entry.record as StoredRecord
    this.#forwarded++
    this.#forwardedBytes += record.payload.byteLength
    lane.unreportedMessages++
    lane.unreportedBytes += record.payload.byteLength
    if (this.deadLetters.refusing) this.deadLetters.forget(this.dedupeId(lane, record.offset))
  }

  /**
   * After an acknowledgement: while a backlog drains, refills in batches of a quarter of the window (up to 32), so the
   * messages leave in one write instead of one per acknowledgement. Live traffic has next to nothing in flight, so it
   * is never held back; nor is `now`.
   */
  refill (window: number, now: boolean): void {
    const batch = Math.min(REFILL_BATCH, Math.floor(window / 4))
    if (this.inflight === 0 || now || window - this.inflight >= batch) this.schedulePump()
  }

  /**
   * The clients handle each acknowledgement of a socket read in a tick of its own, so pumping per acknowledgement sent
   * each refill in a write of its own. One pump per turn of the event loop refills the window for all of them.
   */
  schedulePump (): void {
    if (this.#pumpScheduled) return
    this.#pumpScheduled = true
    setImmediate(() => {
      this.#pumpScheduled = false
      this.#report()
      this.#transport.pump()
    })
  }

  /** Tells the metrics what was acknowledged since last time, per lane. */
  #report (): void {
    for (const lane of this.lanes) {
      if (lane.unreportedMessages === 0) continue
      this.deps.observer?.onForwarded?.(this.config.name, lane.tenant, lane.name, lane.unreportedMessages, lane.unreportedBytes)
      lane.unreportedMessages = 0
      lane.unreportedBytes = 0
    }
  }

  /** Dead-letters the record of `entry`; it holds a window slot until the append is durable, so its lane cannot pass it. */
  deadLetter (lane: Lane, entry: Pending, reason: string): void {
    const record = entry.record as StoredRecord
    const epoch = lane.epoch
    this.inflight++
    this.deadLetters.append(lane, record, this.dedupeId(lane, record.offset), reason, () => {
      if (epoch !== lane.epoch) return
      this.inflight--
      this.#transport.deadLettered()
      entry.refused = true
      entry.acked = true
      advance(lane)
      this.#transport.pump()
    }, () => {
      // Not dead-lettered yet: the message keeps its window slot (the lane cannot pass it) and is tried again.
      if (epoch !== lane.epoch) return
      this.inflight--
      setTimeout(() => { if (epoch === lane.epoch && !this.#stopped) this.deadLetter(lane, entry, reason) }, REFUSAL_RETRY_MS).unref()
    })
  }

  #fill (lane: Lane): void {
    if (lane.reading || lane.failing || lane.bufferAt < lane.buffer.length || this.#stopped) return
    const { store, logger } = this.deps
    if (lane.nextRead >= lane.end) return
    lane.reading = true
    const epoch = lane.epoch
    store.read(lane.stream, lane.partition, lane.nextRead, { maxRecords: READ_RECORDS, maxBytes: READ_BYTES }).then((r) => {
      if (epoch !== lane.epoch) return
      lane.reading = false
      lane.buffer = r.records
      lane.bufferAt = 0
      lane.nextRead = r.nextOffset
      this.#transport.pump()
    }, (err: unknown) => {
      if (epoch !== lane.epoch) return
      lane.reading = false
      const where = { upstream: this.config.name, stream: lane.stream, partition: lane.partition }
      if (isStoreError(err, 'STORE_OFFSET_OUT_OF_RANGE')) {
        // Retention (the disk budget) deleted records this upstream had not forwarded; the store counted and logged
        // them per group. Continue from the new log start.
        const start = store.partitionInfo(lane.stream, lane.partition).logStartOffset
        logger.warn({ ...where, from: lane.nextRead, to: start }, 'records dropped by retention before they were forwarded')
        if (lane.pendingAt === lane.pending.length && lane.done < start) lane.done = start
        lane.nextRead = Math.max(lane.nextRead, start)
        this.#fill(lane)
        // No read started (retention emptied the partition): the lanes this one held back go now.
        if (!lane.reading) this.#transport.pump()
        return
      }
      logger.error({ ...where, err: (err as Error).message }, 'reading the log failed; retrying')
      // Until the retry the lane holds no other back (LaneScheduler.next), and a pump does not read it again at once.
      lane.failing = true
      setTimeout(() => {
        lane.failing = false
        this.#fill(lane)
      }, READ_RETRY_MS).unref()
      this.#transport.pump()
    })
  }

  /** The upstream's state; reads one record per lane whose oldest unforwarded record is not in memory. */
  async status (transport: () => TransportStatus, commandsReceived: () => number): Promise<UpstreamStatus> {
    const now = this.deps.clock.now()
    const { backlog, partitions } = await backlogOf(this.deps.store, this.lanes, now)
    return {
      name: this.config.name,
      region: this.config.region,
      ...transport(),
      inflight: this.inflight,
      forwardedMessages: this.#forwarded,
      forwardedBytes: this.#forwardedBytes,
      throughput: this.#throughput.perSecond(),
      deadLettered: this.deadLetters.count,
      commandsReceived: commandsReceived(),
      backlog,
      partitions,
    }
  }
}
