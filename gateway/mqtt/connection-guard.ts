/**
 * A Duplex that sits between a client's socket and aedes. aedes reads a
 * whole buffered chunk, handles every packet in it concurrently, and reads
 * again only when all are done; this wrapper decides what a "chunk" is:
 *
 * - it scans MQTT fixed headers as bytes arrive and destroys the connection
 *   as soon as a packet announces a remaining length over `maxPacketBytes`,
 *   before the body is buffered (aedes has no limit of its own), or has a
 *   reserved packet type or reserved flag bits [MQTT-2.2.2-2];
 * - it checks the parts of PUBLISH, SUBSCRIBE and UNSUBSCRIBE that
 *   mqtt-packet and aedes let through although the spec says to close the
 *   connection (Mosquitto does): topic names and filters that are not valid
 *   UTF-8 (mqtt-packet silently turns bad bytes into U+FFFD) or contain
 *   U+0000 [MQTT-1.5.3-1, -2], empty topics [MQTT-4.7.3-1], wildcards in a
 *   PUBLISH topic [MQTT-3.3.2-2], packet id 0 [MQTT-2.3.1-1], SUBSCRIBE and
 *   UNSUBSCRIBE without a filter [MQTT-3.8.3-3, MQTT-3.10.3-2], and (MQTT 5)
 *   No Local on a `$share/` subscription [MQTT-3.8.3-4]. Only the
 *   variable header of a PUBLISH is kept for this (at most 65,539 bytes), and
 *   the verdict comes before the packet's last byte reaches aedes;
 * - it reads the protocol level of the CONNECT and checks the rest as that
 *   version frames it: MQTT 5 puts properties after the packet id of
 *   SUBSCRIBE and UNSUBSCRIBE, has subscription options in the upper bits of
 *   the options byte, allows an empty PUBLISH topic (a topic alias; aedes
 *   resolves it) and the AUTH packet (type 15, reserved before 5). An MQTT 5
 *   client that broke a limit or the protocol after its CONNACK gets a
 *   DISCONNECT with the reason code (0x95 packet too large, 0x81 malformed
 *   packet, 0x82 protocol error) before the connection closes [MQTT-4.13.1-1];
 * - it hands aedes at most `maxInflight` packets at a time, so one client
 *   cannot have more publishes being appended at once; the same number is
 *   the receive maximum the CONNACK advertises, and an MQTT 5 client with
 *   more QoS 1/2 PUBLISHes unfinished gets DISCONNECT 0x93; towards an MQTT 5
 *   client it holds QoS 1/2 PUBLISHes beyond the client's own receive
 *   maximum until the client acknowledges (receive-maximum.ts), and gives
 *   topic aliases to the PUBLISHes it writes when the client allows them
 *   (topic-aliases.ts);
 * - it stops reading from the socket while the gateway is paused (the log
 *   has too many appends pending) or the client is over its publish rate.
 *
 * The readable side has a high-water mark of one byte, so a segment is
 * pushed only when aedes asked for more. Writes are gathered for one turn of
 * the event loop and go to the socket in one write (see #queueWrite).
 *
 * An idle connection should cost little (issue 13: an idle device connection
 * cost 12-20 KB of RSS, Mosquitto's 0.7 KB): the options are one object per
 * listener, the socket's listeners are shared functions that find their guard
 * through a symbol, the header scanner keeps numbers, and the buffers of
 * packets in transit exist only while a packet is in transit.
 */
import { isUtf8 } from 'node:buffer'
import type { Socket } from 'node:net'
import { Duplex } from 'node:stream'
import { clientOfConnection } from './aedes-internals.ts'
import { readVarint } from './publish-frames.ts'
import { REASON, type ReasonCode } from './reason-codes.ts'
import { InflightWindows, RECEIVE_MAXIMUM_DEFAULT } from './receive-maximum.ts'
import { OutboundTopicAliases } from './topic-aliases.ts'

export type ViolationReason = 'packet-too-large' | 'malformed-header' | 'protocol' | 'receive-maximum' | 'slow-subscriber'

/** Shared by every connection of a listener (not made per connection: see the header). */
export interface GuardOptions {
  readonly maxPacketBytes: number
  readonly maxInflight: number
  /** Publishes per second; 0 = unlimited. */
  readonly publishRate: number
  /**
   * How long a write may wait for the socket to drain before the connection is closed as a slow subscriber (0: never):
   * aedes' delivery waits for it, and a device's ack waits for deliveries once 1,000 are under way (authorize-publish.ts),
   * so a subscriber that stopped reading stalled every device's acks for as long as it stayed connected.
   */
  readonly slowSubscriberMs?: number
  /**
   * Called once when the connection is closed for breaking a limit or the protocol. `detail` names the client
   * when aedes has seen its CONNECT; `clientId` is that id (undefined before the CONNECT).
   */
  readonly onViolation: (reason: ViolationReason, detail: string, clientId: string | undefined, guard: ConnectionGuard) => void
  /** Called (once per connection) when the client is first slowed down for exceeding its publish rate. */
  readonly onRateLimited?: (clientId: string | undefined, guard: ConnectionGuard) => void
  readonly group: GuardGroup
}

const CONNECT = 1
const PUBLISH = 3
/** The first byte of a PUBACK [MQTT-3.4.1]. */
const PUBACK_BYTE = 0x40
const SUBSCRIBE = 8
const UNSUBSCRIBE = 10
const AUTH = 15
/** MQTT 5's protocol level in the CONNECT (3.1.1 is 4). */
export const MQTT5 = 5
/**
 * Flag bits each packet type must carry [MQTT-2.2.2-1]; PUBLISH (3) has real flags; 0 is reserved, and 15 (AUTH)
 * before MQTT 5.
 */
const REQUIRED_FLAGS: ReadonlyArray<number | null> = [null, 0, 0, null, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0]
/** The reason code of the MQTT 5 DISCONNECT a violation sends (MQTT 5 3.14.2.1). */
const DISCONNECT_CODES: Readonly<Record<ViolationReason, ReasonCode>> = {
  'packet-too-large': REASON.PACKET_TOO_LARGE, 'malformed-header': REASON.MALFORMED_PACKET, protocol: REASON.PROTOCOL_ERROR,
  'receive-maximum': REASON.RECEIVE_MAXIMUM_EXCEEDED, 'slow-subscriber': REASON.QUOTA_EXCEEDED,
}
/**
 * Bytes of PUBLISH packets held back for a client's receive maximum beyond which aedes' writes wait (its write path
 * then waits for 'drain', as for a full socket), so a client that stops acknowledging holds a bounded amount.
 */
const HOLD_LIMIT = 256 * 1024
/** How long a connection closed with a DISCONNECT may take to write it before its socket is destroyed. */
const LINGER_MS = 1000
/** The first bytes of a shared subscription's filter (`$share/<group>/<filter>`). */
const SHARE_PREFIX = Buffer.from('$share/')
const PLUS = 0x2b
const HASH = 0x23
/** The guard of a socket, for the socket listeners below (one function each for all sockets, not a closure each). */
const GUARD = Symbol('edgemq.guard')
type GuardedSocket = (Socket | Duplex) & { [GUARD]?: ConnectionGuard }

function onSocketData (this: GuardedSocket, chunk: Buffer): void {
  const guard = this[GUARD]
  if (guard !== undefined && !guard.destroyed) guard.onSocketData(chunk)
}
function onSocketEnd (this: GuardedSocket): void { this[GUARD]?.onSocketEnd() }
function onSocketError (this: GuardedSocket, err: Error): void { this[GUARD]?.destroy(err) }
function onSocketClose (this: GuardedSocket): void { this[GUARD]?.destroy() }
function onSocketDrain (this: GuardedSocket): void { this[GUARD]?.onSocketDrain() }
function flushWrites (guard: ConnectionGuard): void { guard.flushWrites() }
function onStalled (guard: ConnectionGuard): void { guard.onStalled() }
function flushGroup (guards: Set<ConnectionGuard>): void {
  for (const guard of guards) guard.flushWrites()
  guards.clear()
}

/**
 * Takes PUBACKs before aedes parses them: a writer of its own PUBLISHes on the connection (a persistent session's
 * deliveries from the log, sessions/cursors.ts) settles the ones it holds straight from the bytes, as they arrive.
 * aedes built a packet object and went through its handler and the session store for each (12 % of a drain's CPU,
 * BENCHMARKS.md "Persistent sessions").
 */
export interface PubackTaker {
  /** True when the PUBACK was one of the taker's: it is settled, and aedes never sees it. */
  take (messageId: number): boolean
  /** Once after the PUBACKs taken from one chunk of the socket. */
  taken (): void
}

/** The connections of one gateway, paused and resumed together when its log backs up. */
export class GuardGroup {
  #paused = false
  readonly members = new Set<ConnectionGuard>()
  /** Guards to flush once this turn's microtasks are done (flushSoon); empty when none is scheduled. */
  readonly #soon = new Set<ConnectionGuard>()

  get paused (): boolean { return this.#paused }

  /**
   * Writes what `conn` gathered (and what it is given until then) once this turn's microtasks and nextTicks are
   * done, instead of in the next check phase (#queueWrite). For the acks of a group commit: the store resolves its
   * appends together and aedes writes each PUBACK synchronously down the resolution's promise chain
   * (hooks/durable-append.ts), so a nextTick scheduled at the first one runs after the last. Devices with one
   * message in flight wait for that PUBACK before they send again, and the check phase came 50-60 µs after the
   * last one was written (traced under the gateway bench's device load: aedes' work after each ack, the ingest
   * counters), then took 6-8 µs per socket write. `conn` is a client's `conn`; anything not of this group is ignored.
   */
  flushSoon (conn: unknown): void {
    if (!this.members.has(conn as ConnectionGuard)) return
    if (this.#soon.size === 0) process.nextTick(flushGroup, this.#soon)
    this.#soon.add(conn as ConnectionGuard)
  }

  setPaused (paused: boolean): void {
    if (this.#paused === paused) return
    this.#paused = paused
    if (!paused) for (const guard of this.members) guard.pump()
  }
}

export class ConnectionGuard extends Duplex {
  readonly socket: Socket | Duplex
  readonly #options: GuardOptions
  /** Segments ready for aedes, each holding at most maxInflight packet starts; null when there are none. */
  #segments: Buffer[] | null = null
  #wanted = false
  #ended = false
  // Header scanner state.
  #skip = 0 // body bytes of the current packet still to pass
  #headerBytes = 0 // bytes of the current fixed header seen so far (0 = a packet starts at the next byte)
  #first = 0 // its first byte: type and flags
  #length = 0 // its remaining length, summed as the bytes arrive [MQTT-2.2.3]
  // Body inspection of the current packet (PUBLISH, SUBSCRIBE, UNSUBSCRIBE); #inType 0 = none.
  #inType = 0
  #inFlags = 0
  #inLength = 0 // remaining length of the packet
  #inNeed = 0 // body bytes needed for the next check
  #inHave = 0
  #inParts: Buffer[] | null = null
  // Segment being built; null when empty.
  #parts: Buffer[] | null = null
  #starts = 0
  // Token bucket, used only with a publish rate.
  #tokens = 0
  #lastRefill = 0
  #rateTimer: NodeJS.Timeout | undefined
  #rateLogged = false
  /** The callback of a write waiting for the socket to drain. */
  #drained: (() => void) | null = null
  /** The slow-subscriber deadline of the write waiting for 'drain', and how far the socket's output had got when it was set. */
  #stall: NodeJS.Timeout | undefined = undefined
  #stallMark = 0
  /** What aedes wrote in this turn of the event loop, for one socket write in the next (see #queueWrite); null when nothing. */
  #pending: Buffer[] | null = null
  /** The protocol level of the CONNECT (4 until it is read: 3.1.1 framing). */
  #version = 4
  /** Closed with a DISCONNECT still being written: the socket ends by itself (or after LINGER_MS). */
  #lingering = false
  /**
   * aedes has written to the client: its first packet is always the CONNACK [MQTT-3.2.0-1], after which an MQTT 5
   * DISCONNECT may be sent [MQTT-3.14.0-1]. (aedes' own `connackSent` is set in the write's callback, which a client
   * that answers the CONNACK at once can beat.)
   */
  #answered = false
  /** MQTT 5 only (receive-maximum.ts): the QoS 1/2 packet ids in flight both ways, and the PUBLISHes held back. */
  #windows: InflightWindows | null = null
  /** The callback of a write that waits for held PUBLISHes to go below HOLD_LIMIT. */
  #unheld: (() => void) | null = null
  /** MQTT 5 with a Topic Alias Maximum in the CONNECT only (topic-aliases.ts). */
  #aliases: OutboundTopicAliases | null = null
  /**
   * Offered every PUBACK of the short form (`0x40 0x02 id`, MQTT 5's success without properties too) whose bytes
   * are in one chunk, once the receive maximum has counted it; set after the CONNACK (hooks/sessions.ts).
   */
  pubacks: PubackTaker | null = null
  /**
   * Read by aedes' write (patches/aedes+2.0.0-beta.1.patch, lib/write.js), which corks a connection until the end of
   * the tick, a nextTick per packet delivered: this one holds what is written until the next check phase anyway
   * (#queueWrite), so aedes writes to it through.
   */
  readonly gathersWrites = true

  constructor (socket: Socket | Duplex, options: GuardOptions) {
    super({ readableHighWaterMark: 1, allowHalfOpen: false })
    this.socket = socket
    this.#options = options
    if (options.publishRate > 0) {
      this.#tokens = options.publishRate
      this.#lastRefill = performance.now()
    }
    options.group.members.add(this);
    (socket as GuardedSocket)[GUARD] = this
    socket.on('data', onSocketData)
    socket.on('end', onSocketEnd)
    socket.on('error', onSocketError)
    socket.on('close', onSocketClose)
  }

  get remoteAddress (): string | undefined { return (this.socket as Socket).remoteAddress }

  /** The protocol level the client's CONNECT asked for (4 = MQTT 3.1.1, 5 = MQTT 5), 4 until it is read. */
  get protocolVersion (): number { return this.#version }

  /**
   * The Topic Alias Maximum of the client's MQTT 5 CONNECT (preConnect, hooks/authenticate.ts, before the CONNACK):
   * PUBLISHes written to it from now on get topic aliases.
   */
  aliasTopics (clientMaximum: number): void {
    if (this.#version === MQTT5 && clientMaximum > 0 && this.#aliases === null) this.#aliases = new OutboundTopicAliases(clientMaximum)
  }

  /** @internal the socket's 'data' (see onSocketData). */
  onSocketData (chunk: Buffer): void {
    let from = 0
    let i = 0
    const { maxInflight } = this.#options
    let publishes = 0
    let start = -1 // where the packet whose header is being read starts, when it starts in this chunk
    let taken = false
    while (i < chunk.length) {
      if (this.#skip > 0) {
        const n = Math.min(this.#skip, chunk.length - i)
        if (this.#inType !== 0 && !this.#feed(chunk, i, i + n)) return
        this.#skip -= n
        i += n
        continue
      }
      const byte = chunk[i] as number
      if (this.#headerBytes === 0) {
        // A new packet starts at i.
        if (this.#starts === maxInflight) {
          this.#addPart(chunk.subarray(from, i))
          from = i
          this.#flushSegment()
        }
        this.#starts++
        start = i
        if (byte >> 4 === PUBLISH) publishes++
        this.#first = byte
        this.#length = 0
        this.#headerBytes = 1
        i++
        continue
      }
      i++
      // Remaining length: up to four 7-bit groups, least significant first, continuation in the top bit [MQTT-2.2.3].
      this.#length += (byte & 0x7f) * 128 ** (this.#headerBytes - 1)
      this.#headerBytes++
      if ((byte & 0x80) !== 0) {
        if (this.#headerBytes === 5) return this.#violate('malformed-header', 'remaining length longer than 4 bytes')
        continue
      }
      const length = this.#length
      const total = length + this.#headerBytes
      const first = this.#first
      this.#headerBytes = 0
      if (total > this.#options.maxPacketBytes) {
        return this.#violate('packet-too-large', `packet of ${total} bytes exceeds maxPacketBytes (${this.#options.maxPacketBytes})`)
      }
      const type = first >> 4
      const flags = first & 0x0f
      const required = REQUIRED_FLAGS[type]
      if (type === 0 || (type === AUTH && this.#version !== MQTT5)) return this.#violate('malformed-header', `reserved packet type ${type}`)
      if (required !== null && required !== undefined && flags !== required) {
        return this.#violate('malformed-header', `packet type ${type} with flags 0x${flags.toString(16)} (must be 0x${required.toString(16)})`)
      }
      if (type === PUBLISH && ((flags >> 1) & 3) === 3) return this.#violate('malformed-header', 'PUBLISH with both QoS bits set [MQTT-3.3.1-4]')
      this.#skip = length
      if (type === PUBLISH) {
        // Fast path, the usual case: the variable header is in this chunk and is checked where it lies.
        const verdict = checkPublish(chunk, i, Math.min(chunk.length - i, length), flags, length, this.#version)
        if (typeof verdict === 'string') return this.#violate('protocol', verdict)
        if (verdict !== 0) this.#inspect(type, flags, length, verdict) // split across chunks: collect it
        else if ((flags & 0x06) !== 0 && this.#windows !== null && !this.#received(chunk, i)) return
      } else if (type === SUBSCRIBE || type === UNSUBSCRIBE) {
        // The whole (small, size-limited) body.
        this.#inspect(type, flags, length, length)
        if (length === 0 && !this.#feed(chunk, i, i)) return
      } else if (this.#windows !== null && InflightWindows.ackBytes(type, length) > 0) {
        const need = InflightWindows.ackBytes(type, length)
        if (chunk.length - i >= need) this.#acknowledged(type, chunk, i, length)
        else this.#inspect(type, flags, length, need)
      } else if (type === CONNECT && length > 0) {
        // The protocol name's length first, then up to its level byte (checkConnect).
        this.#inspect(type, flags, length, Math.min(length, 2))
      }
      if (first === PUBACK_BYTE && length === 2 && start >= from && chunk.length - i >= 2 && this.pubacks?.take(chunk.readUInt16BE(i)) === true) {
        // Cut out of what aedes reads (it is not a packet start of the segment any more).
        if (start > from) this.#addPart(chunk.subarray(from, start))
        i += 2
        from = i
        this.#skip = 0
        this.#starts--
        taken = true
      }
    }
    if (taken) this.pubacks?.taken()
    this.#addPart(chunk.subarray(from))
    if (this.#segments === null || this.#wanted) this.#flushSegment()
    this.#charge(publishes)
    this.pump()
    if (this.#segments !== null || (this.#parts?.length ?? 0) > 8) this.socket.pause()
  }

  /** @internal the socket's 'end'. */
  onSocketEnd (): void {
    this.#ended = true
    this.#flushSegment()
    this.pump()
  }

  /** @internal the socket's 'drain', while a write waits for it. */
  onSocketDrain (): void {
    const callback = this.#drained
    this.#drained = null
    if (this.#stall !== undefined) clearTimeout(this.#stall)
    this.#stall = undefined
    callback?.()
  }

  /** @internal the socket took nothing for slowSubscriberMs while a write waited: the subscriber stopped reading. */
  onStalled (): void {
    this.#stall = undefined
    if (this.#drained === null || this.destroyed) return
    // 'drain' comes only once the socket's buffer is empty: a slow link still taking bytes (a 256 KB frame at 20 KB/s)
    // is given another period, and only a socket that took nothing in one is closed (found by review).
    const mark = this.#outputMark()
    if (mark !== this.#stallMark) {
      this.#stallMark = mark
      this.#stall = setTimeout(onStalled, this.#options.slowSubscriberMs ?? 0, this)
      return
    }
    const ms = this.#options.slowSubscriberMs ?? 0
    this.#violate('slow-subscriber', `its socket took no bytes for ${ms} ms with more to write (mqtt.slowSubscriberTimeoutMs)`)
  }

  #addPart (part: Buffer): void {
    if (this.#parts === null) this.#parts = [part]
    else this.#parts.push(part)
  }

  /**
   * The client id from the CONNECT, once aedes has read it (aedes sets `conn.client` on the stream it handles).
   * broker.ts scopes the ids of non-default tenants as `<tenant>U+0000<id>` (U+0000 is refused in client ids);
   * the plain id is what the device sent.
   */
  get clientId (): string | undefined {
    const id = clientOfConnection(this)?.id
    return typeof id === 'string' ? id.slice(id.indexOf('\u0000') + 1) : undefined
  }

  #violate (reason: ViolationReason, detail: string): void {
    this.flushWrites()
    const clientId = this.clientId
    this.#inType = 0
    this.#inParts = null
    this.#options.onViolation(reason, clientId === undefined ? detail : `client ${JSON.stringify(clientId)}: ${detail}`, clientId, this)
    // [MQTT-3.14.0-1] no DISCONNECT before the CONNACK; a slow subscriber's socket takes no DISCONNECT either.
    const disconnect = this.#version === MQTT5 && this.#answered && reason !== 'slow-subscriber'
    if (disconnect) this.#linger(Buffer.from([0xe0, 2, DISCONNECT_CODES[reason], 0])) // no properties
    else this.socket.destroy()
    this.destroy()
  }

  /** Ends the socket once what was written to it (and `last`) is out; destroys it after LINGER_MS at the latest. */
  #linger (last?: Buffer): void {
    this.flushWrites()
    this.#lingering = true
    this.socket.pause()
    if (last === undefined) this.socket.end()
    else this.socket.end(last)
    setTimeout(destroySocket, LINGER_MS, this.socket).unref()
  }

  #inspect (type: number, flags: number, length: number, need: number): void {
    this.#inType = type
    this.#inFlags = flags
    this.#inLength = length
    this.#inNeed = need
    this.#inHave = 0
    this.#inParts = null
  }

  /**
   * Collects body bytes [from, to) of the packet being inspected until the next check can run; false when the
   * packet broke the protocol (the connection is then destroyed).
   */
  #feed (chunk: Buffer, from: number, to: number): boolean {
    let at = from
    while (this.#inType !== 0) {
      const take = Math.min(this.#inNeed - this.#inHave, to - at)
      if (take > 0) {
        const part = chunk.subarray(at, at + take)
        if (this.#inParts === null) this.#inParts = [part]
        else this.#inParts.push(part)
        this.#inHave += take
        at += take
      }
      if (this.#inHave < this.#inNeed) return true
      const parts = this.#inParts ?? []
      const body = parts.length === 1 ? parts[0] as Buffer : Buffer.concat(parts)
      this.#inParts = [body]
      const type = this.#inType
      const verdict = type === PUBLISH
        ? checkPublish(body, 0, body.length, this.#inFlags, this.#inLength, this.#version)
        : type === CONNECT
          ? this.#checkConnect(body)
          : type === SUBSCRIBE || type === UNSUBSCRIBE ? this.#checkSubscription(body) : this.#acknowledged(type, body, 0, this.#inLength)
      if (typeof verdict === 'string') {
        this.#violate('protocol', verdict)
        return false
      }
      if (verdict === 0 && type === PUBLISH && (this.#inFlags & 0x06) !== 0 && this.#windows !== null && !this.#received(body, 0)) return false
      if (verdict === 0) {
        this.#inType = 0
        this.#inParts = null
      } else {
        this.#inNeed = verdict
      }
    }
    return true
  }

  /**
   * Reads the protocol level from the start of a CONNECT body (the protocol name, then the level byte
   * [MQTT-3.1.2-2]); 0 when done, or how many bytes it needs. A CONNECT too short for it is left to aedes,
   * which refuses it.
   */
  #checkConnect (body: Buffer): number {
    if (body.length < 2) return 0
    const level = 2 + body.readUInt16BE(0)
    if (body.length > level) {
      this.#version = body[level] as number
      if (this.#version === MQTT5) this.#windows = new InflightWindows(this.#options.maxInflight, () => this.#clientReceiveMaximum())
      return 0
    }
    return level < this.#inLength ? level + 1 : 0
  }

  /** A problem, or 0 when the SUBSCRIBE / UNSUBSCRIBE (whole body) is fine. */
  #checkSubscription (body: Buffer): string | 0 {
    const name = this.#inType === SUBSCRIBE ? 'SUBSCRIBE' : 'UNSUBSCRIBE'
    if (body.length < 2) return `${name} without a packet id`
    if (body.readUInt16BE(0) === 0) return `${name} with packet id 0 [MQTT-2.3.1-1]`
    let pos = 2
    if (this.#version === MQTT5) {
      // MQTT 5 3.8.2.1 / 3.10.2.1: the properties, a variable byte integer length first; mqtt-packet checks them.
      const properties = readVarint(body, pos)
      if (properties === null || properties.end + properties.value > body.length) return `malformed ${name}: properties`
      pos = properties.end + properties.value
    }
    if (pos === body.length) return `${name} without a topic filter [${this.#inType === SUBSCRIBE ? 'MQTT-3.8.3-3' : 'MQTT-3.10.3-2'}]`
    while (pos < body.length) {
      if (pos + 2 > body.length) return `malformed ${name}`
      const end = pos + 2 + body.readUInt16BE(pos)
      if (end > body.length) return `malformed ${name}`
      const problem = topicProblem(body, pos + 2, end, false)
      if (problem !== null) return `${name} ${problem}`
      const filterAt = pos + 2
      pos = end
      if (this.#inType === SUBSCRIBE) {
        if (pos >= body.length) return 'malformed SUBSCRIBE: a filter without its QoS byte'
        const options = body[pos++] as number
        // 3.1.1: only the QoS bits [MQTT-3.8.3-4]; 5: no local, retain as published, retain handling (3 is invalid) and
        // two reserved bits [MQTT-3.8.3-5].
        const invalid = this.#version === MQTT5 ? (options & 0xc0) !== 0 || (options & 0x30) === 0x30 : (options & 0xfc) !== 0
        if (invalid || (options & 3) === 3) return `SUBSCRIBE with invalid options byte 0x${options.toString(16)} [MQTT-3.8.3-4]`
        // MQTT 5: No Local on a shared subscription is a Protocol Error [MQTT-3.8.3-4] (aedes does not check it).
        if (this.#version === MQTT5 && (options & 0x04) !== 0 && body.subarray(filterAt, end).subarray(0, SHARE_PREFIX.length).equals(SHARE_PREFIX)) {
          return 'SUBSCRIBE with No Local on a shared subscription [MQTT-3.8.3-4]'
        }
      }
    }
    return 0
  }

  #flushSegment (): void {
    const parts = this.#parts
    if (parts === null) return
    const segment = parts.length === 1 ? parts[0] as Buffer : Buffer.concat(parts)
    this.#parts = null
    this.#starts = 0
    if (segment.length === 0) return
    if (this.#segments === null) this.#segments = [segment]
    else this.#segments.push(segment)
  }

  #charge (publishes: number): void {
    const rate = this.#options.publishRate
    if (rate <= 0 || publishes === 0) return
    const now = performance.now()
    this.#tokens = Math.min(rate, this.#tokens + ((now - this.#lastRefill) / 1000) * rate) - publishes
    this.#lastRefill = now
    if (this.#tokens < 0 && this.#rateTimer === undefined) {
      if (!this.#rateLogged) { this.#rateLogged = true; this.#options.onRateLimited?.(this.clientId, this) }
      this.socket.pause()
      this.#rateTimer = setTimeout(() => { this.#rateTimer = undefined; this.pump() }, Math.ceil((-this.#tokens / rate) * 1000))
    }
  }

  /** Pushes the next segment if aedes wants one and nothing holds us back. */
  pump (): void {
    if (this.destroyed || this.#options.group.paused || this.#rateTimer !== undefined) return
    if (this.#wanted) {
      if (this.#segments === null) this.#flushSegment()
      const segment = this.#segments?.shift()
      if (this.#segments?.length === 0) this.#segments = null
      if (segment !== undefined) {
        this.#wanted = false
        this.push(segment)
      } else if (this.#ended) {
        this.push(null)
        return
      }
    }
    if (this.#segments === null && this.#parts === null && !this.#ended) this.socket.resume()
  }

  override _read (): void {
    this.#wanted = true
    this.pump()
  }

  override _write (chunk: Buffer, _encoding: BufferEncoding, callback: (err?: Error | null) => void): void {
    this.#queueWrite(chunk, callback)
  }

  /**
   * aedes (patched: lib/write.js) writes each packet in one piece and, to a stream other than this one
   * (gathersWrites), corks it for the rest of the tick; what comes here in pieces is from anything else.
   */
  override _writev (chunks: Array<{ chunk: Buffer }>, callback: (err?: Error | null) => void): void {
    this.#queueWrite(chunks.length === 1 ? (chunks[0] as { chunk: Buffer }).chunk : Buffer.concat(chunks.map((c) => c.chunk)), callback)
  }

  /**
   * Everything written in one turn of the event loop goes to the socket in one write, in the next turn's check
   * phase (setImmediate). aedes delivers each message to a subscriber from its own setImmediate callback, and
   * Node uncorks (the nextTick of aedes' write) between two of them, so writing through cost one syscall per delivered
   * message: 37 % of the main thread under 10 publishers fanning in to one subscriber (BENCHMARKS.md, fan-in). The
   * write completes at once unless the socket asked to drain, so backpressure still reaches aedes.
   */
  #queueWrite (chunk: Buffer, callback: (err?: Error | null) => void): void {
    this.#answered = true
    const out = this.#windows === null ? chunk : this.#windows.sending(chunk)
    if (out.length > 0) this.#enqueue(out)
    const done = this.#windows === null ? callback : () => this.#whenUnheld(callback)
    if (this.socket.writableNeedDrain) this.#waitForDrain(done)
    else done()
  }

  /**
   * Queues bytes for the next flush, with topic aliases (MQTT 5). PUBLISHes the receive maximum released come
   * through here too, so the socket gets everything in the order the aliases were given.
   */
  #enqueue (out: Buffer): void {
    const bytes = this.#aliases === null ? out : this.#aliases.rewrite(out)
    if (this.#pending === null) {
      this.#pending = [bytes]
      setImmediate(flushWrites, this)
    } else {
      this.#pending.push(bytes)
    }
  }

  /** @internal writes what #queueWrite gathered (see flushWrites). */
  flushWrites (): void {
    const pending = this.#pending
    if (pending === null) return
    this.#pending = null
    if (this.socket.destroyed) return
    this.socket.write(pending.length === 1 ? pending[0] as Buffer : Buffer.concat(pending))
  }

  /** A Writable has one write in progress at a time, so one callback waits at most. */
  #waitForDrain (callback: () => void): void {
    this.#drained = callback
    this.socket.once('drain', onSocketDrain)
    const ms = this.#options.slowSubscriberMs ?? 0
    if (ms > 0) {
      this.#stallMark = this.#outputMark()
      this.#stall = setTimeout(onStalled, ms, this)
    }
  }

  /**
   * How far the socket's output has got: the bytes whose writes completed (net.Socket's bytesWritten counts what it
   * buffers and dispatched, writableLength what has not completed), or for a stream without it (WebSocket) what it
   * still buffers, negated.
   */
  #outputMark (): number {
    const written = (this.socket as { bytesWritten?: unknown }).bytesWritten
    return (typeof written === 'number' ? written : 0) - this.socket.writableLength
  }

  #whenUnheld (callback: () => void): void {
    if ((this.#windows?.heldBytes ?? 0) <= HOLD_LIMIT) callback()
    else this.#unheld = callback
  }

  /** A QoS 1/2 PUBLISH from an MQTT 5 client, its body at buf[at]; false when it broke the receive maximum (closed). */
  #received (buf: Buffer, at: number): boolean {
    const id = buf.readUInt16BE(at + 2 + buf.readUInt16BE(at))
    if ((this.#windows as InflightWindows).received(id)) return true
    this.#violate('receive-maximum', `more than ${this.#options.maxInflight} QoS 1/2 publishes unacknowledged (the receive maximum it was given)`)
    return false
  }

  /** A PUBACK, PUBREC or PUBCOMP from an MQTT 5 client, its body at buf[at]: the PUBLISHes it lets out go out. */
  #acknowledged (type: number, buf: Buffer, at: number, length: number): 0 {
    const windows = this.#windows as InflightWindows
    const released = windows.acknowledged(type, buf.readUInt16BE(at), length >= 3 ? buf[at + 2] as number : 0)
    if (released !== null && !this.socket.destroyed) this.#enqueue(released)
    const unheld = this.#unheld
    if (unheld !== null && windows.heldBytes <= HOLD_LIMIT) {
      this.#unheld = null
      unheld()
    }
    return 0
  }

  /** The client's receive maximum (aedes reads it from the CONNECT, before it writes the CONNACK). */
  #clientReceiveMaximum (): number {
    const max = clientOfConnection(this)?.receiveMaximum
    return typeof max === 'number' && max >= 1 ? max : RECEIVE_MAXIMUM_DEFAULT
  }

  override _final (callback: (err?: Error | null) => void): void {
    this.flushWrites()
    this.socket.end(callback)
  }

  override _destroy (err: Error | null, callback: (err?: Error | null) => void): void {
    this.#options.group.members.delete(this)
    this.#unheld = null
    if (this.#stall !== undefined) clearTimeout(this.#stall)
    this.#stall = undefined
    // The write waiting for 'drain' is answered (Node fails it: the stream is destroyed), so the delivery waiting on it ends.
    const drained = this.#drained
    this.#drained = null
    drained?.()
    if (this.#rateTimer !== undefined) clearTimeout(this.#rateTimer)
    // aedes destroys the connection right after writing a DISCONNECT (0x8E takeover, 0x8B shutdown, 0x94): what the
    // socket still buffers goes out first, or the client never learns why.
    if (!this.#lingering) {
      this.flushWrites()
      if (err === null && !this.socket.destroyed && this.socket.writableLength > 0) this.#linger()
      else this.socket.destroy()
    }
    callback(err)
  }
}

function destroySocket (socket: Socket | Duplex): void {
  socket.destroy()
}

/**
 * Checks the start of a PUBLISH body: `avail` bytes of it at `buf[at]`, `length` its remaining length. A problem,
 * 0 when the PUBLISH is fine, or how many body bytes the check needs (more than `avail`).
 */
function checkPublish (buf: Buffer, at: number, avail: number, flags: number, length: number, version: number): string | number {
  const qos = (flags >> 1) & 3
  if (length < 2) return 'PUBLISH without a topic'
  if (avail < 2) return 2
  const topicEnd = 2 + buf.readUInt16BE(at)
  const end = topicEnd + (qos > 0 ? 2 : 0)
  if (end > length) return 'PUBLISH shorter than its topic and packet id'
  if (avail < end) return end
  // MQTT 5: an empty topic names a topic alias (3.3.2.3.4); aedes resolves it or disconnects with 0x94.
  const problem = version === MQTT5 && topicEnd === 2 ? null : topicProblem(buf, at + 2, at + topicEnd, true)
  if (problem !== null) return `PUBLISH ${problem}`
  if (qos > 0 && buf.readUInt16BE(at + topicEnd) === 0) return `PUBLISH with QoS ${qos} and packet id 0 [MQTT-2.3.1-1]`
  return 0
}

/** Why the topic name (`name`) or filter in buf[start, end) is not acceptable, or null. Allocates only for non-ASCII. */
function topicProblem (buf: Buffer, start: number, end: number, name: boolean): string | null {
  const what = name ? 'topic' : 'topic filter'
  if (end === start) return `with an empty ${what} [MQTT-4.7.3-1]`
  let ascii = true
  for (let k = start; k < end; k++) {
    const b = buf[k] as number
    if (b === 0) return `${what} contains U+0000 [MQTT-1.5.3-2]`
    if (b >= 0x80) ascii = false
    else if (name && (b === PLUS || b === HASH)) return 'topic contains a wildcard [MQTT-3.3.2-2]'
  }
  if (!ascii && !isUtf8(buf.subarray(start, end))) return `${what} is not valid UTF-8 [MQTT-1.5.3-1]`
  return null
}
