/**
 * MQTT 5 Receive Maximum (MQTT 5 section 4.9), both ways, for one connection.
 *
 * aedes 2.0.0-beta.1 advertises the broker's receive maximum in the CONNACK and stores the client's from the
 * CONNECT, but enforces neither (lib/handlers/connect.js: "ADVISORY ... enforcement is a planned follow-up";
 * https://github.com/moscajs/aedes/pull/1088). Both are enforced here, on the bytes the ConnectionGuard
 * (connection-guard.ts) passes between the socket and aedes, so every delivery path is covered without forking
 * aedes' handlers: aedes' own deliveries (live, retained, QoS 2 copies), commands, `$replay`, shares and session
 * cursors all write PUBLISH packets through the guard.
 *
 * - Inbound: the packet ids of the client's QoS 1/2 PUBLISHes that the gateway has not finished: a QoS 1 one
 *   until its PUBACK is written, a QoS 2 one until its PUBCOMP, or a PUBREC with a reason code of 0x80 or more
 *   (which ends the exchange, MQTT 5 4.3.3). A client with more than the advertised receive maximum
 *   (`mqtt.maxInflightPerClient`, the guard's window) is over its quota [MQTT-3.3.4-9]: DISCONNECT 0x93.
 *   An id already in flight takes no second slot (a retransmission).
 * - Outbound: the packet ids of the gateway's QoS 1/2 PUBLISHes the client has not finished (PUBACK, PUBCOMP, or
 *   PUBREC >= 0x80; a PUBREL the gateway sends keeps its id in flight). Once the client's receive maximum is
 *   reached, further QoS 1/2 PUBLISHes are held, in order, and released as the client acknowledges
 *   [MQTT-3.3.4-7]. Other packets (acks, QoS 0 PUBLISHes, PINGRESP) pass the held ones: the order rule is per
 *   topic and QoS [MQTT-4.6.0-6].
 *
 * Only MQTT 5 connections have one of these; MQTT 3.1.1 has no receive maximum.
 */
import type { Client } from 'aedes'

/** The receive maximum of a client that sent none, and MQTT 3.1.1's (packet ids are 16 bits) [MQTT-3.1.2.11.3]. */
export const RECEIVE_MAXIMUM_DEFAULT = 65535

/**
 * How many QoS 1/2 PUBLISHes the gateway may have unacknowledged towards `client`: the Receive Maximum of its
 * MQTT 5 CONNECT, else 65535. For delivery paths with a window of their own (`$replay`, shares, session cursors):
 * they use `Math.min(ownWindow, receiveMaximumOf(client))`.
 */
export function receiveMaximumOf (client: Pick<Client, 'version' | 'receiveMaximum'>): number {
  if (client.version !== 5) return RECEIVE_MAXIMUM_DEFAULT
  const max = client.receiveMaximum
  return typeof max === 'number' && max >= 1 ? Math.min(max, RECEIVE_MAXIMUM_DEFAULT) : RECEIVE_MAXIMUM_DEFAULT
}

const PUBLISH = 3
const PUBACK = 4
const PUBREC = 5
const PUBREL = 6
const PUBCOMP = 7
/** A PUBREC reason code at or above this ends the QoS 2 exchange (MQTT 5 3.5.2.1). */
const ERROR_THRESHOLD = 0x80

export class InflightWindows {
  /** The receive maximum the gateway advertised. */
  readonly #inboundLimit: number
  /** The client's receive maximum, read when first needed (aedes sets it from the CONNECT, before the CONNACK). */
  readonly #outboundLimit: () => number
  readonly #inbound = new Set<number>()
  readonly #outbound = new Set<number>()
  /** QoS 1/2 PUBLISH packets held back, oldest first; null when none. */
  #held: Buffer[] | null = null
  #heldBytes = 0
  /** The start of a packet that the last write did not complete. */
  #carry: Buffer | null = null

  constructor (inboundLimit: number, outboundLimit: () => number) {
    this.#inboundLimit = inboundLimit
    this.#outboundLimit = outboundLimit
  }

  /** Bytes of PUBLISH packets held back. */
  get heldBytes (): number { return this.#heldBytes }

  /** Packets held back. */
  get held (): number { return this.#held?.length ?? 0 }

  /** The client's QoS 1/2 PUBLISHes in flight. */
  get inbound (): number { return this.#inbound.size }

  /** The gateway's QoS 1/2 PUBLISHes in flight towards the client. */
  get outbound (): number { return this.#outbound.size }

  /** A QoS 1/2 PUBLISH from the client, by packet id; false when it puts the client over the receive maximum. */
  received (messageId: number): boolean {
    this.#inbound.add(messageId)
    return this.#inbound.size <= this.#inboundLimit
  }

  /**
   * A PUBACK, PUBREC (with its reason code; 0 when absent) or PUBCOMP from the client: the PUBLISH packets it lets
   * out (to write now, in one buffer), or null.
   */
  acknowledged (type: number, messageId: number, reasonCode: number): Buffer | null {
    if (type === PUBREC && reasonCode < ERROR_THRESHOLD) return null
    if (!this.#outbound.delete(messageId) || this.#held === null) return null
    return this.#release()
  }

  /**
   * Whether an inbound packet of this type is one {@link acknowledged} needs to see, and how many body bytes of
   * it: the packet id, and a PUBREC's reason code.
   */
  static ackBytes (type: number, length: number): number {
    if (length < 2) return 0 // malformed: aedes refuses it
    if (type === PUBACK || type === PUBCOMP) return 2
    if (type === PUBREC) return Math.min(length, 3)
    return 0
  }

  /**
   * Bytes aedes (or a replay, share or command) writes to the client: what to write now. Held PUBLISH packets are
   * kept; the bytes of a packet the write did not complete wait for the next write (writers write whole packets:
   * mqtt-packet corks the stream for the pieces of each).
   */
  sending (chunk: Buffer): Buffer {
    const buf = this.#carry === null ? chunk : Buffer.concat([this.#carry, chunk])
    this.#carry = null
    let at = 0
    let from = 0
    let pieces: Buffer[] | null = null
    while (at < buf.length) {
      const first = buf[at] as number
      let length = 0
      let k = 1
      for (; k <= 4 && at + k < buf.length; k++) {
        const byte = buf[at + k] as number
        length += (byte & 0x7f) * 128 ** (k - 1)
        if ((byte & 0x80) === 0) break
      }
      const body = at + k + 1
      const end = body + length
      if (at + k >= buf.length || end > buf.length) break // an incomplete packet: carried
      const type = first >> 4
      if (type === PUBLISH && (first & 0x06) !== 0) {
        const id = buf.readUInt16BE(body + 2 + buf.readUInt16BE(body))
        if (this.#held !== null || (this.#outbound.size >= this.#outboundLimit() && !this.#outbound.has(id))) {
          if (pieces === null) pieces = []
          if (at > from) pieces.push(buf.subarray(from, at))
          this.#hold(Buffer.from(buf.subarray(at, end))) // a copy: the writer's buffer is not ours to keep
          from = end
        } else {
          this.#outbound.add(id)
        }
      } else if (type === PUBREL) {
        this.#outbound.add(buf.readUInt16BE(body))
      } else if (type === PUBACK || type === PUBCOMP || (type === PUBREC && length >= 3 && (buf[body + 2] as number) >= ERROR_THRESHOLD)) {
        this.#inbound.delete(buf.readUInt16BE(body))
      }
      at = end
    }
    if (at < buf.length) this.#carry = Buffer.from(buf.subarray(at))
    if (pieces === null) return at === buf.length ? buf : buf.subarray(0, at)
    if (at > from) pieces.push(buf.subarray(from, at))
    return pieces.length === 1 ? pieces[0] as Buffer : Buffer.concat(pieces)
  }

  #hold (packet: Buffer): void {
    if (this.#held === null) this.#held = [packet]
    else this.#held.push(packet)
    this.#heldBytes += packet.length
  }

  #release (): Buffer | null {
    const held = this.#held as Buffer[]
    const limit = this.#outboundLimit()
    let n = 0
    while (n < held.length && this.#outbound.size < limit) {
      const packet = held[n++] as Buffer
      let k = 1
      while (((packet[k] as number) & 0x80) !== 0) k++
      const body = k + 1
      this.#outbound.add(packet.readUInt16BE(body + 2 + packet.readUInt16BE(body)))
      this.#heldBytes -= packet.length
    }
    if (n === 0) return null
    const out = held.splice(0, n)
    if (held.length === 0) this.#held = null
    return out.length === 1 ? out[0] as Buffer : Buffer.concat(out)
  }
}
