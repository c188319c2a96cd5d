/**
 * Outbound MQTT 5 topic aliases (MQTT 5 3.3.2.3.4) for one connection: a device subscribed to its command
 * topics, or a service to a few telemetry topics, is sent the same topic names over and over; with an alias the
 * topic goes over the wire once.
 *
 * aedes 2.0.0-beta.1 resolves inbound aliases but assigns none (https://github.com/moscajs/aedes/pull/1117 is
 * open), so the ConnectionGuard (connection-guard.ts) rewrites the PUBLISH packets it writes to a client whose
 * CONNECT set a Topic Alias Maximum: the first time a topic goes out it carries its topic and a new alias, later
 * times the alias and an empty topic. Aliases are given to the first `min(client's Topic Alias Maximum,
 * MAX_ALIASES)` topics sent and never reassigned, so the client's map and ours cannot disagree; further topics go
 * out as they are [MQTT-3.3.2-8: never above the client's maximum]. The rewrite runs on the bytes as they leave
 * for the socket, after the receive maximum held some back (receive-maximum.ts), so a topic is always registered
 * on the wire before its alias is used alone.
 *
 * Writers give whole MQTT 5 PUBLISH packets with a property section (mqtt-packet, publish-frames.ts' writePublishPacket),
 * none with a Topic Alias of its own (aedes strips the inbound one before forwarding).
 */
import { readVarint, varintSize, writeVarint } from './publish-frames.ts'

/** Aliases per connection at most, whatever the client allows: the table is kept per connection. */
export const MAX_ALIASES = 64

const PUBLISH = 3
/** The Topic Alias property's identifier [MQTT-2.2.2.2]. */
const TOPIC_ALIAS = 0x23

export class OutboundTopicAliases {
  readonly #max: number
  /** Topic (its bytes as latin1) → alias. */
  readonly #aliases = new Map<string, number>()

  constructor (clientMaximum: number) {
    this.#max = Math.min(clientMaximum, MAX_ALIASES)
  }

  /** Topics that have an alias. */
  get size (): number { return this.#aliases.size }

  /** Whole packets on their way to the client: the same, with topic aliases in the PUBLISH packets. */
  rewrite (buf: Buffer): Buffer {
    let at = 0
    let from = 0
    let pieces: Buffer[] | null = null
    while (at < buf.length) {
      const first = buf[at] as number
      const remaining = readVarint(buf, at + 1)
      if (remaining === null) break // not a whole packet: left as it is
      const body = remaining.end
      const end = body + remaining.value
      if (end > buf.length) break
      if (first >> 4 === PUBLISH) {
        const rewritten = this.#publish(buf, at, first, body, end)
        if (rewritten !== null) {
          if (pieces === null) pieces = []
          if (at > from) pieces.push(buf.subarray(from, at))
          pieces.push(rewritten)
          from = end
        }
      }
      at = end
    }
    if (pieces === null) return buf
    if (from < buf.length) pieces.push(buf.subarray(from))
    return Buffer.concat(pieces)
  }

  /** The PUBLISH in buf[at, end) with a topic alias, or null to send it as it is. */
  #publish (buf: Buffer, at: number, first: number, body: number, end: number): Buffer | null {
    const topicLength = buf.readUInt16BE(body)
    if (topicLength === 0) return null
    const topic = buf.toString('latin1', body + 2, body + 2 + topicLength)
    let alias = this.#aliases.get(topic)
    const known = alias !== undefined
    if (alias === undefined) {
      if (this.#aliases.size >= this.#max) return null
      alias = this.#aliases.size + 1
      this.#aliases.set(topic, alias)
    }
    const idBytes = (first & 0x06) !== 0 ? 2 : 0
    const propertiesAt = body + 2 + topicLength + idBytes
    const properties = readVarint(buf, propertiesAt)
    if (properties === null) return null
    const payloadAt = properties.end + properties.value
    const newTopicLength = known ? 0 : topicLength
    const newProperties = properties.value + 3
    const remaining = 2 + newTopicLength + idBytes + varintSize(newProperties) + newProperties + (end - payloadAt)
    const out = Buffer.allocUnsafe(1 + varintSize(remaining) + remaining)
    out[0] = first
    let o = writeVarint(out, 1, remaining)
    o = out.writeUInt16BE(newTopicLength, o)
    if (!known) o += buf.copy(out, o, body + 2, body + 2 + topicLength)
    if (idBytes > 0) o += buf.copy(out, o, body + 2 + topicLength, propertiesAt)
    o = writeVarint(out, o, newProperties)
    out[o++] = TOPIC_ALIAS
    o = out.writeUInt16BE(alias, o)
    o += buf.copy(out, o, properties.end, end)
    return out
  }
}
