/**
 * PUBLISH frames the gateway writes to a client's connection itself, without
 * aedes' write path: `$replay` (replay.ts), shared subscriptions
 * (shared/share-groups.ts) and persistent sessions' cursors
 * (sessions/cursors.ts). aedes writes one packet per socket write and one per
 * event-loop turn (lib/write.js); these paths frame a batch of records into
 * one buffer and write it at once, which is what lets them reach 90–160 k
 * messages/s from the log (BENCHMARKS.md).
 *
 * Also here: what the three share about the connection they write to (its
 * packet ids come from the client's own counter, see {@link FrameConnection}),
 * and the wait for a full socket to drain.
 */
import type { Writable } from 'node:stream'
import type { StoredRecord } from '../../store/index.ts'
import { headersToProperties } from '../../bridge/index.ts'

/** A client connection the gateway writes frames to; hooks/replays.ts adapts an aedes client to it. */
export interface FrameConnection {
  /** The connection's outgoing side (aedes' `client.conn`); its 'close' ends what writes to it. */
  readonly stream: Pick<Writable, 'write' | 'once' | 'off' | 'destroyed' | 'writableNeedDrain'>
  /** True once aedes closed the client. */
  readonly closed: boolean
  readonly clientId: string
  /** Whether the client speaks MQTT 5: its PUBLISH packets carry a property section. */
  readonly mqtt5?: boolean
  /**
   * The client's receive maximum (receive-maximum.ts): a replay or share member has at most this many QoS 1 messages
   * unacknowledged, however large its own window. Absent: no limit but its own.
   */
  readonly receiveMaximum?: number
  /**
   * The next packet id of the client's own counter, which aedes' QoS 1/2 deliveries take theirs from too. It skips
   * the ids every holder registered with {@link holdIds} holds: after 65,535 others the counter comes back to an id
   * a writer still holds, and one that skipped only its own would clash with another's.
   */
  nextMessageId (): number
  /** Makes the counter skip the ids `held` says `holder` holds, until {@link releaseIds} (a later call replaces it). */
  holdIds? (holder: object, held: (messageId: number) => boolean): void
  releaseIds? (holder: object): void
}

/**
 * One PUBLISH packet [MQTT-3.3]. `topic` is the encoded topic name; `messageId` is ignored at QoS 0. `properties`
 * is the MQTT 5 property section (its length first, {@link recordProperties}); without it the packet is framed as
 * MQTT 3.1.1, which has none.
 */
export function publishPacketSize (topic: Buffer, payload: Uint8Array, qos: 0 | 1, properties?: Buffer): number {
  return publishPacketLength(topic.length, payload.byteLength, qos, properties?.length ?? 0)
}

/** {@link publishPacketSize} from the lengths of its parts (`propertiesLength` 0: MQTT 3.1.1). */
export function publishPacketLength (topicLength: number, payloadLength: number, qos: 0 | 1, propertiesLength: number): number {
  const remaining = 2 + topicLength + (qos === 1 ? 2 : 0) + propertiesLength + payloadLength
  return 1 + varintSize(remaining) + remaining
}

/** Writes the PUBLISH packet at `out[at]` and returns the offset after it; `dup` marks a redelivery [MQTT-3.3.1-1]. */
export function writePublishPacket (out: Buffer, at: number, topic: Buffer, payload: Uint8Array, qos: 0 | 1, messageId: number, retain: boolean,
  properties?: Buffer, dup = false): number {
  at = writePublishHeader(out, at, topic, payload.byteLength, qos, messageId, retain, properties, dup)
  out.set(payload, at)
  return at + payload.byteLength
}

/**
 * Writes a PUBLISH packet up to its payload at `out[at]` and returns where the `payloadLength` bytes of the payload
 * go: for a writer that copies the payload from where it is stored (sessions/cursors.ts, from a batch's bytes).
 */
export function writePublishHeader (out: Buffer, at: number, topic: Buffer, payloadLength: number, qos: 0 | 1, messageId: number, retain: boolean,
  properties?: Buffer, dup = false): number {
  const remaining = 2 + topic.length + (qos === 1 ? 2 : 0) + (properties?.length ?? 0) + payloadLength
  out[at++] = 0x30 | (dup && qos === 1 ? 0x08 : 0) | (qos << 1) | (retain ? 1 : 0)
  at = writeVarint(out, at, remaining)
  // Two-byte integers by hand: Buffer#writeUInt16BE took 28 ns against 9 (its checks), twice per packet.
  out[at++] = topic.length >>> 8
  out[at++] = topic.length & 0xff
  at += topic.copy(out, at)
  if (qos === 1) {
    out[at++] = messageId >>> 8
    out[at++] = messageId & 0xff
  }
  if (properties !== undefined) at += properties.copy(out, at)
  return at
}

/** The bytes of a Variable Byte Integer [MQTT-1.5.5]. */
export function varintSize (n: number): number {
  return n < 128 ? 1 : n < 16_384 ? 2 : n < 2_097_152 ? 3 : 4
}

/** A Variable Byte Integer [MQTT-1.5.5] at buf[at]: its value and where it ends; null when cut off or over 4 bytes. */
export function readVarint (buf: Buffer, at: number): { value: number, end: number } | null {
  let value = 0
  for (let k = 0; k < 4; k++) {
    if (at + k >= buf.length) return null
    const byte = buf[at + k] as number
    value += (byte & 0x7f) * 128 ** k
    if ((byte & 0x80) === 0) return { value, end: at + k + 1 }
  }
  return null
}

/** Writes a Variable Byte Integer at `out[at]` [MQTT-1.5.5] and returns the offset after it. */
export function writeVarint (out: Buffer, at: number, n: number): number {
  do {
    let byte = n % 128
    n = Math.floor(n / 128)
    if (n > 0) byte |= 0x80
    out[at++] = byte
  } while (n > 0)
  return at
}

/** A Variable Byte Integer [MQTT-1.5.5]. */
function varint (n: number): Buffer {
  const out = Buffer.allocUnsafe(varintSize(n))
  writeVarint(out, 0, n)
  return out
}

/** The property section of an MQTT 5 PUBLISH without properties: its length, 0. */
export const NO_PROPERTIES: Buffer = Buffer.from([0])

/** User property names (MQTT 5 3.3.2.3.7) that tell an MQTT 5 client where a replayed record is in the log. */
export const RECORD_PROPERTY = { partition: 'edgemq-partition', offset: 'edgemq-offset', timestamp: 'edgemq-timestamp' } as const

export interface RecordPropertyOptions {
  /** Add user properties with the record's partition, offset and receive time ({@link RECORD_PROPERTY}; default true). */
  readonly location?: boolean
  /** Subscription Identifiers of the client's subscriptions the record matched [MQTT-3.3.4-3]. */
  readonly subscriptionIds?: readonly number[]
}

/**
 * The MQTT 5 property section of a record delivered from the log: the message properties its publisher sent (kept
 * as headers, bridge/mqtt-properties.ts), the message expiry interval as the seconds left at `now` (ms)
 * [MQTT-3.3.2-6] (callers skip expired records), the subscription identifiers, then (replays and shares) user
 * properties with its partition, offset and receive time (ms since the epoch), so an MQTT 5 client can resume a
 * replay from where it is or tell records apart.
 */
export function recordProperties (partition: number, record: Pick<StoredRecord, 'offset' | 'timestamp'> & { readonly headers?: StoredRecord['headers'] },
  now: number, options: RecordPropertyOptions = {}): Buffer {
  const parts: Buffer[] = []
  if (record.headers !== undefined && record.headers !== null) {
    const sent = headersToProperties(record.headers, { now, timestamp: record.timestamp })
    if (sent?.payloadFormatIndicator === true) parts.push(Buffer.from([0x01, 1]))
    if (sent?.messageExpiryInterval !== undefined) {
      const left = Buffer.from([0x02, 0, 0, 0, 0]) // Message Expiry Interval, a four-byte integer
      left.writeUInt32BE(Math.max(1, sent.messageExpiryInterval), 1)
      parts.push(left)
    }
    if (sent?.contentType !== undefined) parts.push(Buffer.from([0x03]), mqttString(sent.contentType))
    if (sent?.responseTopic !== undefined) parts.push(Buffer.from([0x08]), mqttString(sent.responseTopic))
    if (sent?.correlationData !== undefined) parts.push(Buffer.from([0x09]), mqttString(sent.correlationData))
    for (const [k, v] of Object.entries(sent?.userProperties ?? {})) {
      for (const one of Array.isArray(v) ? v : [v]) parts.push(Buffer.from([0x26]), mqttString(k), mqttString(one)) // User Property
    }
  }
  for (const id of options.subscriptionIds ?? []) parts.push(Buffer.from([0x0b]), varint(id)) // Subscription Identifier
  // The record's place, written straight into the result: every MQTT 5 delivery of a replay or share has them, and
  // building them from small buffers cost 4.6 us a record, 0.62x the 3.1.1 rate of a share's drain (BENCHMARKS.md).
  const location = options.location !== false
  const values = location ? [String(partition), String(record.offset), String(record.timestamp)] : [] // ASCII digits: one byte each
  let length = 0
  for (const p of parts) length += p.length
  for (let i = 0; i < values.length; i++) length += (POSITION_NAMES[i] as Buffer).length + 2 + (values[i] as string).length
  const out = Buffer.allocUnsafe(varintSize(length) + length)
  let at = writeVarint(out, 0, length)
  for (const p of parts) at += p.copy(out, at)
  for (let i = 0; i < values.length; i++) {
    const value = values[i] as string
    at += (POSITION_NAMES[i] as Buffer).copy(out, at)
    at = out.writeUInt16BE(value.length, at)
    at += out.write(value, at, 'latin1')
  }
  return out
}

/** User Property identifiers and names of a record's place in the log, encoded once. */
const POSITION_NAMES: readonly Buffer[] = [RECORD_PROPERTY.partition, RECORD_PROPERTY.offset, RECORD_PROPERTY.timestamp].map((name) => {
  const b = Buffer.allocUnsafe(3 + name.length)
  b[0] = 0x26
  b.writeUInt16BE(name.length, 1)
  b.write(name, 3, 'latin1')
  return b
})

/** A UTF-8 string or binary data as MQTT encodes them: a two-byte length, then the bytes [MQTT-1.5.4, 1.5.6]. */
function mqttString (value: string | Buffer): Buffer {
  const bytes = typeof value === 'string' ? Buffer.from(value) : value
  const out = Buffer.allocUnsafe(2 + bytes.length)
  out.writeUInt16BE(bytes.length, 0)
  bytes.copy(out, 2)
  return out
}

