/**
 * One upstream: replicates the configured streams to a remote MQTT broker and
 * brings its command topics down. This file is the forwarding core — the
 * send window, PUBLISH encoding and PUBACK matching, refusal handling — and
 * composes the rest:
 *
 * - connection.ts: connect, CONNACK, close, reconnect with backoff, protocol
 *   fallback;
 * - lanes.ts: the (stream, partition) lanes and which one sends next;
 * - token-bucket.ts: the upstream's rate limit;
 * - dead-letters.ts: refusal counts and the dead-letter streams;
 * - disconnect-refusals.ts: which message an MQTT 3.1.1 disconnect points at;
 * - commits.ts: committing the lanes' offsets to the consumer group;
 * - downlink.ts: commands from the upstream down to devices;
 * - uplink-status.ts: the status snapshot, counters and throughput.
 *
 * Uplink. The upstream is a consumer group of the log, `bridge.<name>`, that
 * holds retention. Each (stream, partition) is a lane read in offset order;
 * records are published QoS 1 with at most `maxInflight` unacknowledged
 * across all lanes, and a lane's offset advances only to its highest
 * contiguous PUBACKed (or skipped) offset, committed every commitIntervalMs.
 * After a disconnect or a restart every lane resumes there, so nothing is
 * skipped and the only resends are messages that were in flight or acked out
 * of order — each carries the dedupe id `<gatewayId>/<tenant>/<stream>/
 * <partition>/<offset>` that marks it.
 *
 * Refusals: an MQTT 5 PUBACK with a reason code >= 0x80 counts one attempt
 * for that message, and a message larger than an MQTT 5 upstream's maximum
 * packet size is not sent at all; a disconnect never counts over MQTT 5. A
 * 3.1.1 broker refuses by disconnecting, which does not say which message was
 * at fault; so after a disconnect with messages in flight the next connection
 * first resends an already acknowledged record (a canary: its PUBACK proves
 * the link carries PUBLISHes), then the unacknowledged ones one at a time
 * (probe mode), and disconnect-refusals.ts decides which disconnects count. A
 * message refused maxDeliveryAttempts times is appended to the dead-letter
 * stream `<tenant>/dlq.<name>` with the reason, and the lane moves on.
 *
 * The forwarded PUBLISHes are encoded, numbered and matched to their PUBACKs
 * here (see #send), so nothing is resent behind the lanes' back and a drain
 * costs a fraction of MQTT.js' per-message path.
 */
import type { IConnackPacket, IPublishPacket, MqttClient } from 'mqtt'
import mqttPacket from 'mqtt-packet'
import { isStoreError, type Clock, type LogStore, type StoredRecord } from '../store/index.ts'
import { OffsetCommits } from './commits.ts'
import { BRIDGE_GROUP_PREFIX, upstreamKind, type DedupeCarrier, type ProtocolVersion, type UpstreamConfig } from './config-schema.ts'
import { ID_SPLIT, UpstreamConnection } from './connection.ts'
import { DeadLetters } from './dead-letters.ts'
import { DisconnectRefusals } from './disconnect-refusals.ts'
import { Downlink, RECEIPT_UPSTREAM_HEADER, RECEIPTS_STREAM, type CommandSink } from './downlink.ts'
import { advance, createLane, LaneScheduler, rewind, skip, track, type Lane, type Pending } from './lanes.ts'
import { TokenBucket } from './token-bucket.ts'
import { captureTopic, DEDUPE_TOPIC_PREFIX, parseTemplate, RECORD_VARIABLES, type Template } from './topic-template.ts'
import { backlogOf, redact, ThroughputMeter, type BridgeLogger, type UplinkObserver, type UpstreamStatus } from './uplink-status.ts'

export const DEDUPE_PROPERTY = 'edgemq-dedupe-id'

/** Free window slots a draining uplink waits for before it refills (capped at a quarter of the window). */
const REFILL_BATCH = 32
const READ_RECORDS = 500
const READ_BYTES = 1024 * 1024
const REFUSAL_RETRY_MS = 1000
const READ_RETRY_MS = 1000
/** A 3.1.1 disconnect later than this after a message was sent does not point at it. */
const REFUSAL_DISCONNECT_MS = 10_000

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

/** A PUBLISH sent on the current connection and not yet acknowledged. */
interface Awaiting {
  readonly lane: Lane
  readonly entry: Pending
  readonly epoch: number
  readonly remote: string
  readonly canary: boolean
}

export class Uplink {
  readonly config: UpstreamConfig
  readonly group: string
  readonly #deps: UplinkDeps
  readonly #connection: UpstreamConnection
  readonly #downlink: Downlink
  readonly #scheduler = new LaneScheduler()
  readonly #lanes: readonly Lane[] = this.#scheduler.lanes
  readonly #commits: OffsetCommits
  readonly #deadLetters: DeadLetters
  readonly #refusals = new DisconnectRefusals(REFUSAL_DISCONNECT_MS)
  /** Null when the upstream has no rate limit. */
  readonly #bucket: TokenBucket | null
  readonly #throughput = new ThroughputMeter()
  #stopped = true
  #unlisten: (() => void) | null = null
  #commitTimer: NodeJS.Timeout | null = null
  #rateTimer: NodeJS.Timeout | null = null
  /** What the current connection speaks (copied from it at CONNACK: read per message). */
  #version: ProtocolVersion
  #carrier: DedupeCarrier
  /** The window: at most this many PUBLISHes unacknowledged (maxInflight, or less if the CONNACK says so). */
  #window: number
  /** An MQTT 5 upstream's maximum packet size (CONNACK); larger messages are dead-lettered unsent. */
  #maxPacket = Infinity
  #inflight = 0
  /** Messages still to resend one at a time after a disconnect with messages in flight. */
  #probe = 0
  #canarySent = false
  /** PUBLISHes sent on the current connection and not yet acknowledged, by message id. */
  readonly #awaiting = new Map<number, Awaiting>()
  #nextId = 1
  #frames: Buffer[] = []
  #pumpScheduled = false
  #forwarded = 0
  #forwardedBytes = 0

  /** Throws BRIDGE_NO_COMMAND_SINK (command mappings without deps.commands) or BRIDGE_TLS_FILES. */
  constructor (config: UpstreamConfig, deps: UplinkDeps) {
    this.config = config
    this.group = `${BRIDGE_GROUP_PREFIX}${config.name}`
    this.#deps = deps
    this.#downlink = new Downlink(config, deps)
    this.#connection = new UpstreamConnection(config, deps, {
      connected: (client, connack) => this.#onConnected(client, connack),
      dropped: (wasConnected, now) => this.#onDropped(wasConnected, now),
      puback: (messageId, reasonCode) => this.#onPuback(messageId, reasonCode),
      ...(this.#downlink.active
        ? { command: (packet: IPublishPacket, client: MqttClient, done: (err?: Error) => void) => this.#onCommand(packet, client, done) }
        : {}),
    })
    this.#version = this.#connection.version
    this.#carrier = this.#connection.carrier
    this.#window = config.maxInflight
    this.#commits = new OffsetCommits(deps.store, this.group, config.name, deps.logger, this.#lanes)
    this.#deadLetters = new DeadLetters(config.name, { ...deps, maxDeliveryAttempts: config.maxDeliveryAttempts })
    const bucket = new TokenBucket(config.maxMessagesPerSecond, config.maxBytesPerSecond)
    this.#bucket = bucket.limited ? bucket : null
  }

  /** Creates the group, the lanes and the dead-letter streams, then connects. */
  async start (): Promise<void> {
    const { store } = this.#deps
    await store.setGroup(this.group, { holdsRetention: true })
    const template = parseTemplate(this.config.topicTemplate, RECORD_VARIABLES)
    const receiptTemplate = parseTemplate(this.config.receiptTopic, RECORD_VARIABLES)
    const tenants = new Set<string>()
    for (const f of this.config.forward) {
      tenants.add(f.tenant)
      this.#addLanes(f.tenant, f.stream, f.priority, f.filter, template, false)
    }
    for (const tenant of new Set(this.config.commands.map((c) => c.tenant))) {
      tenants.add(tenant) // a receipt the upstream refuses is dead-lettered too
      this.#addLanes(tenant, RECEIPTS_STREAM, 9, '#', receiptTemplate, true)
    }
    await this.#deadLetters.create(tenants)
    const byPartition = new Map(this.#lanes.map((l) => [`${l.stream}\u0000${l.partition}`, l]))
    this.#unlisten = store.onAppend((event) => {
      const lane = byPartition.get(`${event.stream}\u0000${event.partition}`)
      if (lane === undefined) return
      lane.end = event.logEndOffset
      if (this.#connection.connected) this.#fill(lane)
    })
    this.#stopped = false
    this.#commitTimer = setInterval(() => {
      this.#throughput.sample(this.#forwarded, this.#deps.clock.now())
      void this.#commits.commit()
    }, this.#deps.commitIntervalMs)
    this.#commitTimer.unref()
    this.#connection.start()
  }

  #addLanes (tenant: string, name: string, priority: number, filter: string, template: Template<typeof RECORD_VARIABLES[number]>, receipts: boolean): void {
    const { store } = this.#deps
    const stream = `${tenant}/${name}`
    const info = store.streamInfo(stream)
    for (let partition = 0; partition < info.partitions; partition++) {
      const p = store.partitionInfo(stream, partition)
      const committed = store.fetchOffset(this.group, stream, partition)
      const start = Math.max(committed ?? p.logStartOffset, p.logStartOffset)
      this.#scheduler.add(createLane({ tenant, name, partition, priority, filter, template, receipts }, start, committed ?? -1, p.logEndOffset))
    }
  }

  /** Disconnects, waits for dead-letter appends, and commits what the upstream acknowledged. */
  async stop (): Promise<void> {
    if (this.#stopped) return
    this.#stopped = true
    this.#unlisten?.()
    if (this.#rateTimer !== null) clearTimeout(this.#rateTimer)
    if (this.#commitTimer !== null) clearInterval(this.#commitTimer)
    await this.#connection.stop()
    while (this.#deadLetters.appending || this.#commits.running) {
      await this.#commits.settled()
      if (this.#deadLetters.appending) await new Promise((resolve) => setTimeout(resolve, 10))
    }
    await this.#commits.commit()
    this.#report()
  }

  #onCommand (packet: IPublishPacket, client: MqttClient, done: (err?: Error) => void): void {
    this.#downlink.handle(packet, client, done, this.#connection)
  }

  #onConnected (client: MqttClient, connack: IConnackPacket): void {
    this.#version = this.#connection.version
    this.#carrier = this.#connection.carrier
    this.#refusals.connected()
    this.#canarySent = false
    const receiveMaximum = connack.properties?.receiveMaximum
    this.#window = Math.max(1, Math.min(this.config.maxInflight, receiveMaximum ?? Infinity, ID_SPLIT - 1))
    this.#maxPacket = connack.properties?.maximumPacketSize ?? Infinity
    if (this.#downlink.active) this.#downlink.subscribe(client, this.#connection)
    for (const lane of this.#lanes) lane.end = Math.max(lane.end, this.#deps.store.partitionInfo(lane.stream, lane.partition).logEndOffset)
    this.#pump()
  }

  /** The connection is gone: in-flight messages will be resent from each lane's acknowledged offset. */
  #onDropped (wasConnected: boolean, now: number): void {
    if (wasConnected && this.#version === 4 && !this.#stopped) { // our own DISCONNECT at stop() says nothing about the upstream
      const strike = this.#refusals.disconnected(now)
      if (strike !== null) {
        this.#deps.logger.warn({ upstream: this.config.name, message: strike.id, attempt: strike.strikes, of: this.config.maxDeliveryAttempts },
          'upstream disconnected right after a message was sent alone on a working connection: counted as a refusal')
      }
    }
    // Over MQTT 5 a refusal is a PUBACK reason code, so a disconnect says nothing about the messages in flight.
    if (this.#inflight > 0 && this.#version === 4) this.#probe = Math.max(this.#probe, this.#inflight)
    this.#inflight = 0
    this.#awaiting.clear()
    this.#frames = []
    for (const lane of this.#lanes) rewind(lane)
  }

  #pump (): void {
    const connection = this.#connection
    if (connection.connected && this.#probe > 0 && this.#inflight === 0 && !this.#canarySent && !this.#refusals.healthy) this.#sendCanary()
    while (connection.connected && this.#inflight < (this.#probe > 0 ? 1 : this.#window)) {
      const lane = this.#scheduler.next()
      if (lane === null) break
      const record = lane.buffer[lane.bufferAt] as StoredRecord
      if (!this.#wanted(lane, record)) {
        lane.bufferAt++
        skip(lane, record)
        continue
      }
      const strikes = this.#refusals.suspecting ? this.#refusals.strikes(this.#dedupeId(lane, record.offset)) : 0
      const attempts = this.#deadLetters.refusing ? this.#deadLetters.attempts(this.#dedupeId(lane, record.offset)) : 0
      if (Math.max(attempts, strikes) >= this.config.maxDeliveryAttempts) {
        lane.bufferAt++
        this.#refusals.forget(this.#dedupeId(lane, record.offset))
        const reason = strikes >= this.config.maxDeliveryAttempts
          ? `the upstream disconnected right after it was sent, ${strikes} times in a row`
          : 'refused by the upstream'
        this.#deadLetter(lane, track(lane, record), reason)
        continue
      }
      if (this.#bucket !== null && !this.#takeTokens(this.#bucket, record.payload.byteLength)) break
      lane.bufferAt++
      this.#send(lane, track(lane, record))
    }
    this.#flush()
    for (const lane of this.#lanes) {
      if (lane.bufferAt >= lane.buffer.length && !lane.reading && lane.nextRead < lane.end) this.#fill(lane)
    }
  }

  /** Takes the message's tokens, or sets a timer to pump again when the bucket will hold them. */
  #takeTokens (bucket: TokenBucket, bytes: number): boolean {
    const waitMs = bucket.take(bytes, this.#deps.clock.now())
    if (waitMs === 0) return true
    if (this.#rateTimer === null) {
      this.#rateTimer = setTimeout(() => { this.#rateTimer = null; this.#pump() }, waitMs)
      this.#rateTimer.unref()
    }
    return false
  }

  /**
   * Over 3.1.1 after a disconnect with messages in flight: resends the most recently acknowledged record (a
   * duplicate under its own dedupe id, never a reorder: its lane resends from the offset after it) before anything
   * else, so the connection has carried a PUBLISH round trip before a suspect is sent alone. Without one (nothing
   * acknowledged since the start) the suspect goes first, and its disconnect cannot count.
   */
  #sendCanary (): void {
    this.#canarySent = true
    const lane = this.#lanes.find((l) => l.lastAcked !== null)
    if (lane === undefined) return
    const record = lane.lastAcked as StoredRecord
    this.#send(lane, { offset: record.offset, timestamp: record.timestamp, record, acked: true }, true)
  }

  #wanted (lane: Lane, record: StoredRecord): boolean {
    if (lane.receipts) return record.headers?.[RECEIPT_UPSTREAM_HEADER] === this.config.name
    return lane.filter === '#' || captureTopic(lane.filter, record.topic) !== null
  }

  #dedupeId (lane: Lane, offset: number): string {
    return `${this.#deps.gatewayId}/${lane.tenant}/${lane.name}/${lane.partition}/${offset}`
  }

  /**
   * Encodes the record's PUBLISH into the current batch of frames (written by #flush). The uplink numbers its own
   * PUBLISHes (1 to ID_SPLIT - 1) and matches their PUBACKs itself: going through MQTT.js' publish() cost a deep copy,
   * an outgoing-store entry and a callback per message, a third of a drain's main thread.
   */
  #send (lane: Lane, entry: Pending, canary = false): void {
    const record = entry.record as StoredRecord
    const remote = lane.template.render({
      site: this.#deps.gatewayId, region: this.config.region, upstream: this.config.name,
      tenant: lane.tenant, stream: lane.name, partition: String(lane.partition), key: record.key, topic: record.topic,
    })
    const dedupeId = this.#dedupeId(lane, record.offset)
    const topic = this.#carrier === 'topic-prefix' ? `${DEDUPE_TOPIC_PREFIX}${dedupeId}/${remote}` : remote
    const payload = Buffer.from(record.payload.buffer, record.payload.byteOffset, record.payload.byteLength)
    const messageId = this.#allocateId()
    const packet: IPublishPacket = { cmd: 'publish', topic, payload, qos: 1, dup: false, retain: false, messageId }
    if (this.#carrier === 'user-property') packet.properties = { userProperties: { [DEDUPE_PROPERTY]: dedupeId } }
    const frame = mqttPacket.generate(packet, { protocolVersion: this.#version })
    if (frame.length > this.#maxPacket) {
      // [MQTT-3.1.2-24]: a client must not send a packet larger than the server's Maximum Packet Size.
      if (!canary) this.#deadLetter(lane, entry, `larger than the upstream's maximum packet size (${frame.length} > ${this.#maxPacket} bytes)`)
      return
    }
    this.#frames.push(frame)
    this.#awaiting.set(messageId, { lane, entry, epoch: lane.epoch, remote, canary })
    if (this.#version === 4) this.#refusals.sent(canary ? `canary:${dedupeId}` : dedupeId, this.#deps.clock.now())
    this.#inflight++
  }

  /** Writes the frames #send encoded, in one write. */
  #flush (): void {
    if (this.#frames.length === 0) return
    const frames = this.#frames
    this.#frames = []
    this.#connection.write(frames.length === 1 ? frames[0] as Buffer : Buffer.concat(frames))
  }

  #allocateId (): number {
    for (;;) {
      const id = this.#nextId
      this.#nextId = id + 1 < ID_SPLIT ? id + 1 : 1
      if (!this.#awaiting.has(id)) return id
    }
  }

  #onPuback (messageId: number, reasonCode: number | undefined): void {
    const waiting = this.#awaiting.get(messageId)
    if (waiting === undefined) return // an ack of MQTT.js' own, or of a dropped connection
    this.#awaiting.delete(messageId)
    const { lane, entry, epoch, remote, canary } = waiting
    if (epoch !== lane.epoch) return
    this.#inflight--
    if (this.#version === 4) this.#refusals.acked(`${canary ? 'canary:' : ''}${this.#dedupeId(lane, entry.offset)}`)
    if (canary) return this.#schedulePump()
    if (reasonCode === undefined || reasonCode < 0x80) return this.#acked(lane, entry) // 0x10 "no matching subscribers" is a success
    const record = entry.record as StoredRecord
    const reason = `reason code 0x${reasonCode.toString(16)}`
    this.#connection.recordError(`PUBACK refused ${remote}: ${reason}`)
    if (this.#deadLetters.refused(this.#dedupeId(lane, record.offset), record.offset, reason)) {
      this.#deadLetter(lane, entry, reason)
      return
    }
    // Sent again after a pause, in its place: the lane's offset cannot pass it until it is acked or dead-lettered.
    const generation = this.#connection.generation
    this.#inflight++
    setTimeout(() => {
      if (generation !== this.#connection.generation || epoch !== lane.epoch) return
      this.#inflight--
      this.#send(lane, entry)
      this.#flush()
    }, REFUSAL_RETRY_MS).unref()
  }

  #acked (lane: Lane, entry: Pending): void {
    entry.acked = true
    const record = entry.record as StoredRecord
    this.#forwarded++
    this.#forwardedBytes += record.payload.byteLength
    lane.unreportedMessages++
    lane.unreportedBytes += record.payload.byteLength
    if (this.#deadLetters.refusing) this.#deadLetters.forget(this.#dedupeId(lane, record.offset))
    if (this.#probe > 0) this.#probe--
    advance(lane)
    // While a backlog drains, refill in batches of a quarter of the window (up to 32): the PUBLISHes leave in one
    // write instead of a write per PUBACK. Live traffic has next to nothing in flight, so it is never held back.
    const batch = Math.min(REFILL_BATCH, Math.floor(this.#window / 4))
    if (this.#inflight === 0 || this.#probe > 0 || this.#window - this.#inflight >= batch) this.#schedulePump()
  }

  /**
   * MQTT.js handles each PUBACK of a socket read in a tick of its own, so pumping per PUBACK sent each refill in a
   * write of its own (31 % of a drain's main thread in writev). One pump per turn of the event loop refills the
   * window for all of them, and mqtt-packet's cork coalesces the PUBLISHes into one write.
   */
  #schedulePump (): void {
    if (this.#pumpScheduled) return
    this.#pumpScheduled = true
    setImmediate(() => {
      this.#pumpScheduled = false
      this.#report()
      this.#pump()
    })
  }

  /** Tells the metrics what was acknowledged since last time, per lane. */
  #report (): void {
    for (const lane of this.#lanes) {
      if (lane.unreportedMessages === 0) continue
      this.#deps.observer?.onForwarded?.(this.config.name, lane.tenant, lane.name, lane.unreportedMessages, lane.unreportedBytes)
      lane.unreportedMessages = 0
      lane.unreportedBytes = 0
    }
  }

  /** Dead-letters the record of `entry`; it holds a window slot until the append is durable, so its lane cannot pass it. */
  #deadLetter (lane: Lane, entry: Pending, reason: string): void {
    const record = entry.record as StoredRecord
    const epoch = lane.epoch
    this.#inflight++
    this.#deadLetters.append(lane, record, this.#dedupeId(lane, record.offset), reason, () => {
      if (epoch !== lane.epoch) return
      this.#inflight--
      if (this.#probe > 0) this.#probe--
      entry.refused = true
      entry.acked = true
      advance(lane)
      this.#pump()
    }, () => {
      // Not dead-lettered yet: the message keeps its window slot (the lane cannot pass it) and is tried again.
      if (epoch !== lane.epoch) return
      this.#inflight--
      setTimeout(() => { if (epoch === lane.epoch && !this.#stopped) this.#deadLetter(lane, entry, reason) }, REFUSAL_RETRY_MS).unref()
    })
  }

  #fill (lane: Lane): void {
    if (lane.reading || lane.bufferAt < lane.buffer.length || this.#stopped) return
    const { store, logger } = this.#deps
    if (lane.nextRead >= lane.end) return
    lane.reading = true
    const epoch = lane.epoch
    store.read(lane.stream, lane.partition, lane.nextRead, { maxRecords: READ_RECORDS, maxBytes: READ_BYTES }).then((r) => {
      if (epoch !== lane.epoch) return
      lane.reading = false
      lane.buffer = r.records
      lane.bufferAt = 0
      lane.nextRead = r.nextOffset
      this.#pump()
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
        return
      }
      logger.error({ ...where, err: (err as Error).message }, 'reading the log failed; retrying')
      setTimeout(() => this.#fill(lane), READ_RETRY_MS).unref()
    })
  }

  /** The upstream's state; reads one record per lane whose oldest unforwarded record is not in memory. */
  async status (): Promise<UpstreamStatus> {
    const now = this.#deps.clock.now()
    const { backlog, partitions } = await backlogOf(this.#deps.store, this.#lanes, now)
    return {
      name: this.config.name,
      region: this.config.region,
      url: redact(this.config.url),
      kind: upstreamKind(this.config),
      ...this.#connection.status(),
      inflight: this.#inflight,
      forwardedMessages: this.#forwarded,
      forwardedBytes: this.#forwardedBytes,
      throughput: this.#throughput.perSecond(),
      deadLettered: this.#deadLetters.count,
      commandsReceived: this.#downlink.received,
      backlog,
      partitions,
    }
  }
}
