/**
 * One upstream: replicates the configured streams to a remote MQTT broker and
 * brings its command topics down. This file is the forwarding core — the
 * send window, PUBLISH encoding and PUBACK matching, refusal handling — and
 * composes the rest (the files named here without a folder are in bridge/):
 *
 * - connection.ts: connect, CONNACK, close, reconnect with backoff, protocol
 *   fallback;
 * - uplink/core.ts: what every uplink does whatever its transport: the lanes
 *   (lanes.ts), reading them from the log, the rate limit (token-bucket.ts),
 *   dead letters (dead-letters.ts), commits and the status;
 * - disconnect-refusals.ts: which message an MQTT 3.1.1 disconnect points at;
 * - downlink.ts: commands from the upstream down to devices;
 * - uplink/status.ts: the status snapshot, counters and throughput.
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
import type { StoredRecord } from '../../store/index.ts'
import { upstreamKind, type DedupeCarrier, type ProtocolVersion, type UpstreamConfig } from '../config-schema.ts'
import { ID_SPLIT, UpstreamConnection } from '../connection.ts'
import { DisconnectRefusals } from '../disconnect-refusals.ts'
import { Downlink, RECEIPT_RESPONSE_TOPIC_HEADER } from '../downlink.ts'
import { headersToProperties } from '../mqtt-properties.ts'
import { advance, rewind, type Lane, type Pending } from '../lanes.ts'
import { DEDUPE_PROPERTY, DEDUPE_TOPIC_PREFIX, parseTemplate, RECORD_VARIABLES } from '../topic-template.ts'
import { REFUSAL_RETRY_MS, UplinkCore, type UplinkDeps } from './core.ts'
import { redact, type UpstreamStatus } from './status.ts'

export type { UplinkDeps } from './core.ts'

export { DEDUPE_PROPERTY } from '../topic-template.ts'

/** A 3.1.1 disconnect later than this after a message was sent does not point at it. */
const REFUSAL_DISCONNECT_MS = 10_000

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
  readonly #core: UplinkCore
  readonly #connection: UpstreamConnection
  readonly #downlink: Downlink
  readonly #lanes: readonly Lane[]
  readonly #refusals = new DisconnectRefusals(REFUSAL_DISCONNECT_MS)
  /** What the current connection speaks (copied from it at CONNACK: read per message). */
  #version: ProtocolVersion
  #carrier: DedupeCarrier
  /** The window: at most this many PUBLISHes unacknowledged (maxInflight, or less if the CONNACK says so). */
  #window: number
  /** An MQTT 5 upstream's maximum packet size (CONNACK); larger messages are dead-lettered unsent. */
  #maxPacket = Infinity
  /** Messages still to resend one at a time after a disconnect with messages in flight. */
  #probe = 0
  #canarySent = false
  /** PUBLISHes sent on the current connection and not yet acknowledged, by message id. */
  readonly #awaiting = new Map<number, Awaiting>()
  #nextId = 1
  #frames: Buffer[] = []
  readonly #room = (): boolean => this.#connection.connected && this.#core.inflight < (this.#probe > 0 ? 1 : this.#window)
  readonly #refusal = (lane: Lane, record: StoredRecord): string | null => this.#refused(lane, record)
  readonly #sendEntry = (lane: Lane, entry: Pending): void => this.#send(lane, entry)

  /** Throws BRIDGE_NO_COMMAND_SINK (command mappings without deps.commands) or BRIDGE_TLS_FILES. */
  constructor (config: UpstreamConfig, deps: UplinkDeps) {
    this.config = config
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
    this.#core = new UplinkCore(config, deps, {
      ready: () => this.#connection.connected,
      pump: () => this.#pump(),
      deadLettered: () => { if (this.#probe > 0) this.#probe-- },
    })
    this.group = this.#core.group
    this.#lanes = this.#core.lanes
  }

  /** Creates the group, the lanes and the dead-letter streams, then connects. */
  async start (): Promise<void> {
    await this.#core.start(() => ({
      record: parseTemplate(this.config.topicTemplate, RECORD_VARIABLES),
      receipt: parseTemplate(this.config.receiptTopic, RECORD_VARIABLES),
    }))
    this.#connection.start()
  }

  /** Disconnects, waits for dead-letter appends, and commits what the upstream acknowledged. */
  async stop (): Promise<void> {
    await this.#core.stop(() => this.#connection.stop())
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
    this.#core.catchUp()
    this.#pump()
  }

  /** The connection is gone: in-flight messages will be resent from each lane's acknowledged offset. */
  #onDropped (wasConnected: boolean, now: number): void {
    if (wasConnected && this.#version === 4 && !this.#core.stopped) { // our own DISCONNECT at stop() says nothing about the upstream
      const strike = this.#refusals.disconnected(now)
      if (strike !== null) {
        this.#deps.logger.warn({ upstream: this.config.name, message: strike.id, attempt: strike.strikes, of: this.config.maxDeliveryAttempts },
          'upstream disconnected right after a message was sent alone on a working connection: counted as a refusal')
      }
    }
    // Over MQTT 5 a refusal is a PUBACK reason code, so a disconnect says nothing about the messages in flight.
    if (this.#core.inflight > 0 && this.#version === 4) this.#probe = Math.max(this.#probe, this.#core.inflight)
    this.#core.inflight = 0
    this.#awaiting.clear()
    this.#frames = []
    for (const lane of this.#lanes) rewind(lane)
  }

  #pump (): void {
    const connection = this.#connection
    if (connection.connected && this.#probe > 0 && this.#core.inflight === 0 && !this.#canarySent && !this.#refusals.healthy) this.#sendCanary()
    this.#core.drain(this.#room, this.#refusal, this.#sendEntry)
    this.#flush()
    this.#core.fillEmpty()
  }

  /** Why the record is to be dead-lettered instead of sent (refused or suspected maxDeliveryAttempts times), or null. */
  #refused (lane: Lane, record: StoredRecord): string | null {
    const strikes = this.#refusals.suspecting ? this.#refusals.strikes(this.#core.dedupeId(lane, record.offset)) : 0
    const attempts = this.#core.deadLetters.refusing ? this.#core.deadLetters.attempts(this.#core.dedupeId(lane, record.offset)) : 0
    if (Math.max(attempts, strikes) < this.config.maxDeliveryAttempts) return null
    this.#refusals.forget(this.#core.dedupeId(lane, record.offset))
    return strikes >= this.config.maxDeliveryAttempts
      ? `the upstream disconnected right after it was sent, ${strikes} times in a row`
      : 'refused by the upstream'
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

  /**
   * Encodes the record's PUBLISH into the current batch of frames (written by #flush). The uplink numbers its own
   * PUBLISHes (1 to ID_SPLIT - 1) and matches their PUBACKs itself: going through MQTT.js' publish() cost a deep copy,
   * an outgoing-store entry and a callback per message, a third of a drain's main thread.
   */
  #send (lane: Lane, entry: Pending, canary = false): void {
    const record = entry.record as StoredRecord
    // The receipt of a command that named a response topic goes there (downlink.ts), with its correlation data as a header.
    const remote = (lane.receipts ? record.headers?.[RECEIPT_RESPONSE_TOPIC_HEADER] : undefined) ?? lane.template.render({
      site: this.#deps.gatewayId, region: this.config.region, upstream: this.config.name,
      tenant: lane.tenant, stream: lane.name, partition: String(lane.partition), key: record.key, topic: record.topic,
    })
    const dedupeId = this.#core.dedupeId(lane, record.offset)
    const topic = this.#carrier === 'topic-prefix' ? `${DEDUPE_TOPIC_PREFIX}${dedupeId}/${remote}` : remote
    const payload = Buffer.from(record.payload.buffer, record.payload.byteOffset, record.payload.byteLength)
    const messageId = this.#allocateId()
    const packet: IPublishPacket = { cmd: 'publish', topic, payload, qos: 1, dup: false, retain: false, messageId }
    // An MQTT 5 upstream gets the message properties its publisher sent (kept as headers; the expiry interval is
    // not passed on: the record may have waited here), beside the dedupe id when that is a user property.
    const sent = this.#version === 5 ? headersToProperties(record.headers) : undefined
    if (sent !== undefined) {
      const { messageExpiryInterval: _expiry, ...properties } = sent
      packet.properties = properties
    }
    if (this.#carrier === 'user-property') {
      packet.properties = { ...packet.properties, userProperties: { ...packet.properties?.userProperties, [DEDUPE_PROPERTY]: dedupeId } }
    }
    const frame = mqttPacket.generate(packet, { protocolVersion: this.#version })
    if (frame.length > this.#maxPacket) {
      // [MQTT-3.1.2-24]: a client must not send a packet larger than the server's Maximum Packet Size.
      if (!canary) this.#core.deadLetter(lane, entry, `larger than the upstream's maximum packet size (${frame.length} > ${this.#maxPacket} bytes)`)
      return
    }
    this.#frames.push(frame)
    this.#awaiting.set(messageId, { lane, entry, epoch: lane.epoch, remote, canary })
    if (this.#version === 4) this.#refusals.sent(canary ? `canary:${dedupeId}` : dedupeId, this.#deps.clock.now())
    this.#core.inflight++
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
    this.#core.inflight--
    if (this.#version === 4) this.#refusals.acked(`${canary ? 'canary:' : ''}${this.#core.dedupeId(lane, entry.offset)}`)
    if (canary) return this.#core.schedulePump()
    if (reasonCode === undefined || reasonCode < 0x80) return this.#acked(lane, entry) // 0x10 "no matching subscribers" is a success
    const record = entry.record as StoredRecord
    const reason = `reason code 0x${reasonCode.toString(16)}`
    this.#connection.recordError(`PUBACK refused ${remote}: ${reason}`)
    if (this.#core.deadLetters.refused(this.#core.dedupeId(lane, record.offset), record.offset, reason)) {
      this.#core.deadLetter(lane, entry, reason)
      return
    }
    // Sent again after a pause, in its place: the lane's offset cannot pass it until it is acked or dead-lettered.
    const generation = this.#connection.generation
    this.#core.inflight++
    setTimeout(() => {
      if (generation !== this.#connection.generation || epoch !== lane.epoch) return
      this.#core.inflight--
      this.#send(lane, entry)
      this.#flush()
    }, REFUSAL_RETRY_MS).unref()
  }

  #acked (lane: Lane, entry: Pending): void {
    this.#core.acked(lane, entry)
    if (this.#probe > 0) this.#probe--
    advance(lane)
    this.#core.refill(this.#window, this.#probe > 0)
  }

  /** The upstream's state; reads one record per lane whose oldest unforwarded record is not in memory. */
  async status (): Promise<UpstreamStatus> {
    return await this.#core.status(
      () => ({ url: redact(this.config.url), kind: upstreamKind(this.config), ...this.#connection.status() }),
      () => this.#downlink.received,
    )
  }
}
