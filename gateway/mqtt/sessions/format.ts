/**
 * On-disk format of the MQTT session key space, version 1: the subscriptions
 * of persistent sessions, their offline QoS 1/2 queues, retained messages,
 * wills and inbound QoS 2 packets awaiting PUBREL. This file owns the key
 * layout and value encoding; persistence.ts is the only reader and
 * writer (and the log store writes what it is handed, in the same batches).
 *
 * Keys are binary and live in the `sessions` sublevel of the gateway's
 * LevelDB (beside the log's `log` sublevel, store/format.ts). `client` is the
 * client id as u16 byte length + utf8 bytes, so the keys of one client form a
 * prefix range that never reaches a client whose id extends it ("abc" /
 * "abcd").
 *
 * | key                           | value                                                       |
 * | ----------------------------- | ----------------------------------------------------------- |
 * | `V`                           | format version, u32 (= 1)                                   |
 * | `S` client topic(utf8)        | cbor `{ qos, rh?, rap?, nl?, subscriptionIdentifier?, eras? }`, one key per subscription (`eras`: see below) |
 * | `R` topic(utf8)               | cbor retained packet (every own field aedes gave but functions) |
 * | `O` client seq(u64)           | cbor queued packet in aedes-packet shape, or the packet that replaced it (PUBREL) |
 * | `M` client seq(u64)           | message id, u16, given when the queued packet was sent      |
 * | `I` client messageId(u16)     | cbor inbound QoS 2 packet, aedes-packet shape, with `edgemqPosition` and `edgemqDelivered` (below) |
 * | `C` client                    | a persistent session exists (clean = false), even empty: nothing, or its u32 MQTT 5 Session Expiry Interval (s) |
 * | `W` client                    | cbor will packet, carrying brokerId, clientId and (from the broker, wills.ts) edgemqIdentity |
 * | `E` client                    | u64 ms: when the persistent session went offline (absent while it is connected); for session expiry |
 * | `K` client stream partition(u32) | a cursor into a partition: next offset to deliver, u64, then fences (u64 epoch, u64 offset each) |
 *
 * (`stream` in a `K` key: u16 length + utf8.)
 *
 * Invariants:
 * - One key per subscription: storing or removing k subscriptions writes k
 *   keys, whatever the session holds already.
 * - `seq` is one counter for the whole key space, strictly increasing; the
 *   persistence resumes it at the largest stored seq + 1 when it loads, so a
 *   client's queue order (key order) is its enqueue order, across restarts.
 * - An `M` entry exists only beside the `O` entry with the same key suffix;
 *   both are deleted in one write batch. A lost `M` (power loss with
 *   `durability: 'async'`) only means the packet is resent with a new id.
 * - The `I` entry of a QoS 2 publish that goes into the log is written in
 *   the log's append batch (the store's `extraOps`), so it exists exactly
 *   when the record does, and holds where the record is:
 *   `edgemqPosition: { stream, partition, offset }` (the value is made by
 *   the commit that assigns the offset, a PositionedPut). The entry is
 *   written again with `edgemqDelivered: true` once the message was
 *   delivered and a session kept a copy of it (an `O` entry), before the
 *   PUBREC, without an fsync of its own (a power loss may lose it: one
 *   duplicate, never a loss): a retransmission after a crash delivers again only an entry
 *   without it (inbound-qos2.ts). Entries of older gateways have neither
 *   field: no position (the message is delivered again as a copy) and not
 *   delivered. A will that goes into the log has its `W` entry
 *   deleted in that record's batch, so a kill after it cannot fire it again.
 * - No `S` entry names a refused filter. Gateways before this rule stored
 *   each refused filter of a persistent session as `$denied/<filter>` (it
 *   matched nothing, and was refused again, and logged, at every reconnect);
 *   loading deletes those entries, in one batch.
 * - A `K` cursor never passes a record the session has not acknowledged (or
 *   skipped as not matching its subscriptions): it is written after the
 *   PUBACK, so a kill loses at most the advance, and the records from the
 *   cursor on are delivered again (DUP set). A fence (epoch e, offset o) of
 *   a `K` value: records below `o` were logged before the SUBSCRIBE of grant
 *   epoch e, so a filter whose `eras` (epoch, QoS, … epochs ascending: its
 *   QoS from each epoch on) start or change at e is matched for them with
 *   its earlier era; it is written with that SUBSCRIBE's `S` entries, in
 *   one batch, and dropped once the cursor's written value passes `o`.
 *   SUBSCRIBEs with nothing logged between them, in any partition a cursor
 *   of the session is behind in, share one epoch and its fences (aedes
 *   stores each filter of a SUBSCRIBE on its own). A filter's `eras` are
 *   written when a SUBSCRIBE adds or changes it while a cursor is behind,
 *   and stay until that filter is subscribed to again, which drops the
 *   eras no fence left can select (all of them once no cursor has a
 *   fence). One that is not eras is read as QoS 1 from before every fence
 *   (cursors.ts damagedEras). A fence of epoch 0, the first of its value,
 *   stands for fences lost with a damaged `K` value (cursors.ts
 *   LOST_FENCES_EPOCH): put at the log end when it was loaded, and on disk
 *   from the cursor's next write. Epochs grow across restarts (setup resumes
 *   above every stored one). `$share/` subscriptions have no `eras` and add
 *   no fence. Records of a routed message live
 *   in the log only; the `O` queue holds copies of messages no route sends
 *   to the log, and of QoS 2 deliveries.
 * - A value is never written with a function in it (cbor cannot encode one):
 *   aedes' packets carry write callbacks, which are left out.
 */
import { Encoder } from 'cbor-x'
import type { LogPosition } from '../log-position.ts'
import { SessionPersistenceError } from './errors.ts'

export const SESSION_FORMAT_VERSION = 1

/** The topic prefix under which older gateways stored refused filters (see the invariants). */
export const PARKED_PREFIX = '$denied/'

export const TAG_VERSION = 0x56 // 'V'
export const TAG_SUB = 0x53 // 'S'
export const TAG_RETAINED = 0x52 // 'R'
export const TAG_OUTGOING = 0x4f // 'O'
export const TAG_MESSAGE_ID = 0x4d // 'M'
export const TAG_INCOMING = 0x49 // 'I'
export const TAG_WILL = 0x57 // 'W'
export const TAG_SESSION = 0x43 // 'C'
export const TAG_CURSOR = 0x4b // 'K'
export const TAG_OFFLINE = 0x45 // 'E'

/** Every tag of a client-scoped key: what expiring a session deletes. */
export const CLIENT_TAGS = [TAG_SUB, TAG_OUTGOING, TAG_MESSAGE_ID, TAG_INCOMING, TAG_SESSION, TAG_WILL, TAG_CURSOR, TAG_OFFLINE] as const

export const cbor = new Encoder({ useRecords: false, structuredClone: false, mapsAsObjects: true, variableMapSize: true })

export function clientPrefix (tag: number, clientId: string, extra = 0): Buffer {
  const id = Buffer.from(String(clientId), 'utf8')
  if (id.length > 0xffff) {
    throw new SessionPersistenceError('GW_SESSION_INVALID_ARGUMENT', `client id is ${id.length} bytes, more than 65535`)
  }
  const key = Buffer.allocUnsafe(3 + id.length + extra)
  key[0] = tag
  key.writeUInt16BE(id.length, 1)
  id.copy(key, 3)
  return key
}

export function checkMessageId (messageId: unknown): number {
  if (typeof messageId !== 'number' || !Number.isInteger(messageId) || messageId < 0 || messageId > 0xffff) {
    throw new SessionPersistenceError('GW_SESSION_INVALID_ARGUMENT', `message id must be an integer in 0..65535, got ${String(messageId)}`)
  }
  return messageId
}

export const keys = {
  version: (): Buffer => Buffer.from([TAG_VERSION]),
  sub: (clientId: string, topic: string): Buffer => Buffer.concat([clientPrefix(TAG_SUB, clientId), Buffer.from(topic, 'utf8')]),
  retained: (topic: string): Buffer => Buffer.concat([Buffer.from([TAG_RETAINED]), Buffer.from(topic, 'utf8')]),
  outgoing: (tag: typeof TAG_OUTGOING | typeof TAG_MESSAGE_ID, clientId: string, seq: number): Buffer => {
    const key = clientPrefix(tag, clientId, 8)
    key.writeBigUInt64BE(BigInt(seq), key.length - 8)
    return key
  },
  incoming: (clientId: string, messageId: number): Buffer => {
    const key = clientPrefix(TAG_INCOMING, clientId, 2)
    key.writeUInt16BE(messageId, key.length - 2)
    return key
  },
  will: (clientId: string): Buffer => clientPrefix(TAG_WILL, clientId),
  cursor: (clientId: string, stream: string, partition: number): Buffer => {
    const name = Buffer.from(stream, 'utf8')
    const key = clientPrefix(TAG_CURSOR, clientId, 2 + name.length + 4)
    const at = key.length - 6 - name.length
    key.writeUInt16BE(name.length, at)
    name.copy(key, at + 2)
    key.writeUInt32BE(partition, key.length - 4)
    return key
  },
  /** The stream and partition of a `K` key's rest (after the client). */
  parseCursor (rest: Buffer): { stream: string, partition: number } {
    const length = rest.readUInt16BE(0)
    return { stream: rest.toString('utf8', 2, 2 + length), partition: rest.readUInt32BE(2 + length) }
  },
  session: (clientId: string): Buffer => clientPrefix(TAG_SESSION, clientId),
  offline: (clientId: string): Buffer => clientPrefix(TAG_OFFLINE, clientId),
  /** Splits a client-scoped key into the client id and what follows it. */
  parseClient (key: Buffer): { clientId: string, rest: Buffer } {
    const length = key.readUInt16BE(1)
    return { clientId: key.toString('utf8', 3, 3 + length), rest: key.subarray(3 + length) }
  },
}

/** Range bounds covering every key that starts with `prefix`. */
export function prefixRange (prefix: Buffer): { gte: Buffer, lt?: Buffer } {
  const upper = Buffer.from(prefix)
  for (let i = upper.length - 1; i >= 0; i--) {
    if ((upper[i] as number) < 0xff) {
      upper[i] = (upper[i] as number) + 1
      return { gte: prefix, lt: upper.subarray(0, i + 1) }
    }
  }
  return { gte: prefix }
}

export function encodeU16 (n: number): Buffer {
  const buf = Buffer.allocUnsafe(2)
  buf.writeUInt16BE(n, 0)
  return buf
}

export function encodeU64 (n: number): Buffer {
  const buf = Buffer.allocUnsafe(8)
  buf.writeBigUInt64BE(BigInt(n), 0)
  return buf
}

/** The fields of an `I` entry beside the packet's own (see the invariants). */
export interface IncomingFields {
  edgemqPosition?: LogPosition
  edgemqDelivered?: boolean
}

/** Where the record of a stored inbound packet is in the log; undefined for a topic the log does not hold, or an older entry. */
export function incomingPositionOf (stored: IncomingFields): LogPosition | undefined {
  const at = stored.edgemqPosition as Partial<LogPosition> | undefined
  if (at === undefined || at === null || typeof at !== 'object') return undefined
  const { stream, partition, offset } = at
  if (typeof stream !== 'string' || !Number.isSafeInteger(partition) || !Number.isSafeInteger(offset)) return undefined
  return { stream, partition: partition as number, offset: offset as number }
}

export function decodeValue<T> (key: Buffer, value: Uint8Array): T {
  try {
    return cbor.decode(value) as T
  } catch (err) {
    throw new SessionPersistenceError('GW_SESSION_CORRUPT', `cannot decode session entry ${key.toString('hex')}`, { cause: err })
  }
}

/** The `V` value of this format. */
export function encodeVersion (): Buffer {
  const buf = Buffer.allocUnsafe(4)
  buf.writeUInt32BE(SESSION_FORMAT_VERSION, 0)
  return buf
}

/** The version a stored `V` value names, or undefined when it is not a u32. */
export function readVersion (value: Buffer): number | undefined {
  return value.length === 4 ? value.readUInt32BE(0) : undefined
}
