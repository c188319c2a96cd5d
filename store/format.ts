/**
 * On-disk format of the log, version 1. This file owns the key layout and the
 * batch encoding; nothing else builds keys or parses values.
 *
 * All keys live in the `log` sublevel of the gateway's LevelDB and are binary
 * (big-endian integers, so byte order is numeric order):
 *
 * | key                                             | value                                   |
 * | ----------------------------------------------- | --------------------------------------- |
 * | `V`                                             | format version, u64 (= 1)               |
 * | `S` name(utf8)                                  | cbor StreamMeta                         |
 * | `P` streamId(u32) partition(u32)                | cbor PartitionMeta (logStart, logEnd, bytes) |
 * | `B` streamId(u32) partition(u32) base(u64)      | batch (below)                           |
 * | `T` streamId(u32) partition(u32) maxTs(u64)     | base offset, u64                        |
 * | `G` group(utf8) 0x00                            | cbor GroupMeta (holdsRetention)         |
 * | `O` group(utf8) 0x00 streamId(u32) partition(u32) | committed offset, u64                 |
 * | `d` streamId(u32) dedupeId(utf8)                | streamId u32, partition u32, offset u64, timestamp f64 |
 *
 * Invariants:
 * - `B` entries of a partition cover [logStart, logEnd) without gaps or
 *   overlaps; a batch holds 1..MAX_BATCH_RECORDS records. A batch is written
 *   in the same LevelDB write batch as its `P` and `T` entries, so a crash
 *   leaves either all of them or none (LevelDB write batches are atomic).
 * - `T` is the sparse, monotonic time index: an entry is written only for a
 *   batch whose max timestamp exceeds every earlier one in the partition, so
 *   both its keys and its values increase. To find the first offset with
 *   timestamp >= t, seek to the first `T` key >= t and scan forward from its
 *   batch. When retention deletes the batch of the first entry, it re-points
 *   that entry at the new log start, so the index never loses coverage.
 * - A `d` entry is written in the same LevelDB batch as the record it
 *   names, so after a crash an id is known exactly when its record exists.
 * - Dedupe ids are scoped to the stream the record landed in (a stream is
 *   `<tenant>/<name>`, so to its tenant too): the key starts with the
 *   stream id, and an id seen in one stream never suppresses an append to
 *   another. Before this scoping, format 1 keyed ids globally as
 *   `D` dedupeId(utf8) with the same value; opening such a data dir moves
 *   each of them under its value's stream id, in one write batch.
 * - `P` is rewritten with every group commit and retention pass. Opening
 *   finds the log end by seeking to the last `B` key (or it is `logStart`
 *   when retention removed every batch) and checks it against `P.logEnd`: a
 *   mismatch means lost batches (damaged files), never a crash, since both are
 *   written in one LevelDB batch. Data written before `logEnd` was recorded
 *   lacks it; it is added by the next commit.
 *
 * Batch value:
 *
 * | bytes | field                                                          |
 * | ----- | -------------------------------------------------------------- |
 * | 0     | magic: 0xE1 (no record has headers, or written before 0xE2), 0xE2 (header sets) |
 * | 1..4  | CRC-32 (zlib) of bytes 5..end                                  |
 * | 5..12 | base offset, u64 (must equal the key's)                        |
 * | 13..16| record count, u32                                              |
 * | 17..24| first timestamp (ms), float64                                  |
 * | 25..32| max timestamp (ms), float64                                    |
 * | 33..  | cbor body, columns (below)                                     |
 *
 * The body stores the batch column by column, with the strings of the batch
 * (keys, topics, client ids — a device repeats them) interned once, and the
 * numeric columns as typed arrays (cbor-x writes each as one tagged byte
 * string): measured here, a 1,000-record batch encodes in ~75 µs and decodes
 * in ~18 µs, against ~140 µs and ~87 µs for plain cbor arrays of numbers.
 * `[firstTs, strings[], tsDelta (Int32Array, or Float64Array when a delta
 *   does not fit), keyIdx, topicIdx, clientIdx (Uint16Array), qos
 *   (Uint8Array), payloadLength (Uint32Array), payloads (one byte string),
 *   ...headers]`, where the magic byte says how headers are stored:
 * - 0xE1: one element, `headers[] | null`: per record a cbor map or null;
 *   null for the whole column when no record has headers. The encoder still
 *   writes 0xE1 (with null) for a batch without headers, byte for byte as
 *   before, so older readers read it; it no longer writes maps, but every
 *   reader keeps decoding them (batches written before 0xE2 existed).
 * - 0xE2: two elements, `headerSets[], headerIdx (Uint16Array)`. The names
 *   and values of headers are interned in `strings` like keys and topics
 *   (after them, so key, topic and client indexes stay below 3,000);
 *   `headerSets` holds each distinct set of headers in the batch once, as a
 *   flat array of string indexes `[name, value, name, value, …]` in the
 *   record's header order, and `headerIdx[i]` is 0 for a record without
 *   headers (null) or 1 + the index of its set. Authenticated clients stamp
 *   `edgemq-user` on every record: with maps it made a 1,000 × 100-byte
 *   batch 22 % bigger and its decode 3–5× slower; with sets it costs 2 bytes
 *   per record plus one set per user (BENCHMARKS.md, store.headers).
 * The typed arrays are RFC 8746 tags over little-endian byte strings: 78
 * (sint32), 86 (float64), 69 (uint16), 64 (uint8), 70 (uint32). Record i
 * has offset base + i, timestamp firstTs + tsDelta[i], key
 * strings[keyIdx[i]] (likewise topic and client id), and the payload bytes
 * following those of records 0..i-1 in `payloads`.
 *
 * Batch values leave the process unchanged: the HTTP API's
 * `format=batches` serves them as stored (docs/http-api.md, "Response formats"), and
 * `decodeStoredBatch` below is what clients decode them with. So this
 * layout is a wire format too: a change needs a new magic byte, and a
 * reader must refuse a magic it does not know. A new magic that only adds a
 * batch shape, every older shape still read, keeps FORMAT_VERSION: the `V`
 * entry changes only when a data dir written by this version can no longer
 * be opened by the previous one's rules (key layout, meta values). An older
 * edgemq refuses a 0xE2 batch as STORE_CORRUPT_BATCH (`bad magic byte
 * 0xe2`), at open when it is a partition's last batch: going back to a
 * version before 0xE2 after an authenticated client wrote needs the backup
 * (docs/operations.md, "Upgrade").
 */
import { crc32 } from 'node:zlib'
import { Encoder } from 'cbor-x'
import { StoreError } from './errors.ts'
import type { RecordColumns, StoredRecord } from './types.ts'

export const FORMAT_VERSION = 1
/** Magic of a batch without headers; its bytes are those every edgemq so far wrote for such a batch. */
export const BATCH_MAGIC = 0xe1
/** Magic of a batch whose records carry headers, interned as header sets (see the header of this file). */
export const BATCH_MAGIC_HEADER_SETS = 0xe2
export const BATCH_HEADER_BYTES = 33
/** Upper bound on records in one `B` entry; a group commit may write several. */
export const MAX_BATCH_RECORDS = 1000
/** Soft upper bound on the bytes of one `B` entry. */
export const MAX_BATCH_BYTES = 1024 * 1024

const cbor = new Encoder({ useRecords: false, structuredClone: false, mapsAsObjects: true, variableMapSize: true })

const TAG_VERSION = 0x56 // 'V'
const TAG_STREAM = 0x53 // 'S'
const TAG_PARTITION = 0x50 // 'P'
const TAG_BATCH = 0x42 // 'B'
const TAG_TIME = 0x54 // 'T'
const TAG_GROUP = 0x47 // 'G'
const TAG_OFFSET = 0x4f // 'O'
const TAG_DEDUPE = 0x64 // 'd'
/** Unscoped dedupe ids of data dirs written before ids were scoped by stream; moved to `d` at open. */
const TAG_LEGACY_DEDUPE = 0x44 // 'D'

const TWO_32 = 2 ** 32

export function writeU64 (buf: Buffer, n: number, at: number): void {
  buf.writeUInt32BE(Math.floor(n / TWO_32), at)
  buf.writeUInt32BE(n % TWO_32, at + 4)
}

export function readU64 (buf: Uint8Array, at: number): number {
  const view = Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength)
  return view.readUInt32BE(at) * TWO_32 + view.readUInt32BE(at + 4)
}

function partitionPrefix (tag: number, streamId: number, partition: number, extra: number): Buffer {
  const key = Buffer.allocUnsafe(9 + extra)
  key[0] = tag
  key.writeUInt32BE(streamId, 1)
  key.writeUInt32BE(partition, 5)
  return key
}

export const keys = {
  version: (): Buffer => Buffer.from([TAG_VERSION]),

  stream: (name: string): Buffer => Buffer.concat([Buffer.from([TAG_STREAM]), Buffer.from(name, 'utf8')]),
  streamRange: (): { gt: Buffer, lt: Buffer } => ({ gt: Buffer.from([TAG_STREAM]), lt: Buffer.from([TAG_STREAM + 1]) }),
  streamName: (key: Buffer): string => key.subarray(1).toString('utf8'),

  partition: (streamId: number, partition: number): Buffer => partitionPrefix(TAG_PARTITION, streamId, partition, 0),

  batch (streamId: number, partition: number, base: number): Buffer {
    const key = partitionPrefix(TAG_BATCH, streamId, partition, 8)
    writeU64(key, base, 9)
    return key
  },
  /** Range bounds covering every batch of one partition. */
  batchRange (streamId: number, partition: number): { gte: Buffer, lt: Buffer } {
    return { gte: keys.batch(streamId, partition, 0), lt: keys.batch(streamId, partition, Number.MAX_SAFE_INTEGER) }
  },
  batchBase: (key: Buffer): number => readU64(key, 9),
  batchPartition: (key: Buffer): { streamId: number, partition: number } => ({ streamId: key.readUInt32BE(1), partition: key.readUInt32BE(5) }),
  /** Range bounds covering every batch of every stream. */
  batchSpace: (): { gte: Buffer, lt: Buffer } => ({ gte: Buffer.from([TAG_BATCH]), lt: Buffer.from([TAG_BATCH + 1]) }),

  time (streamId: number, partition: number, ts: number): Buffer {
    const key = partitionPrefix(TAG_TIME, streamId, partition, 8)
    writeU64(key, Math.max(0, Math.floor(ts)), 9)
    return key
  },
  timeRange (streamId: number, partition: number): { gte: Buffer, lt: Buffer } {
    return { gte: keys.time(streamId, partition, 0), lt: keys.time(streamId, partition, Number.MAX_SAFE_INTEGER) }
  },
  timeOf: (key: Buffer): number => readU64(key, 9),

  group: (group: string): Buffer => Buffer.concat([Buffer.from([TAG_GROUP]), Buffer.from(group, 'utf8'), Buffer.from([0])]),
  groupRange: (): { gt: Buffer, lt: Buffer } => ({ gt: Buffer.from([TAG_GROUP]), lt: Buffer.from([TAG_GROUP + 1]) }),
  groupName: (key: Buffer): string => key.subarray(1, key.length - 1).toString('utf8'),

  offset (group: string, streamId: number, partition: number): Buffer {
    const prefix = keys.offsetPrefix(group)
    const key = Buffer.allocUnsafe(prefix.length + 8)
    prefix.copy(key, 0)
    key.writeUInt32BE(streamId, prefix.length)
    key.writeUInt32BE(partition, prefix.length + 4)
    return key
  },
  offsetPrefix: (group: string): Buffer => Buffer.concat([Buffer.from([TAG_OFFSET]), Buffer.from(group, 'utf8'), Buffer.from([0])]),
  offsetRange: (): { gt: Buffer, lt: Buffer } => ({ gt: Buffer.from([TAG_OFFSET]), lt: Buffer.from([TAG_OFFSET + 1]) }),
  /** Splits an `O` key into its parts. */
  parseOffset (key: Buffer): { group: string, streamId: number, partition: number } {
    const end = key.length - 8
    return {
      group: key.subarray(1, end - 1).toString('utf8'),
      streamId: key.readUInt32BE(end),
      partition: key.readUInt32BE(end + 4),
    }
  },
}

export interface DedupeEntry { readonly streamId: number, readonly partition: number, readonly offset: number, readonly timestamp: number }

export const dedupe = {
  key: (streamId: number, id: string): Buffer => {
    const prefix = Buffer.allocUnsafe(5)
    prefix[0] = TAG_DEDUPE
    prefix.writeUInt32BE(streamId, 1)
    return Buffer.concat([prefix, Buffer.from(id, 'utf8')])
  },
  range: (): { gt: Buffer, lt: Buffer } => ({ gt: Buffer.from([TAG_DEDUPE]), lt: Buffer.from([TAG_DEDUPE + 1]) }),
  parseKey: (key: Buffer): { streamId: number, id: string } => ({ streamId: key.readUInt32BE(1), id: key.subarray(5).toString('utf8') }),
  legacyRange: (): { gt: Buffer, lt: Buffer } => ({ gt: Buffer.from([TAG_LEGACY_DEDUPE]), lt: Buffer.from([TAG_LEGACY_DEDUPE + 1]) }),
  legacyId: (key: Buffer): string => key.subarray(1).toString('utf8'),
  encode (e: DedupeEntry): Buffer {
    const value = Buffer.allocUnsafe(24)
    value.writeUInt32BE(e.streamId, 0)
    value.writeUInt32BE(e.partition, 4)
    writeU64(value, e.offset, 8)
    value.writeDoubleBE(e.timestamp, 16)
    return value
  },
  decode (value: Buffer): DedupeEntry {
    return { streamId: value.readUInt32BE(0), partition: value.readUInt32BE(4), offset: readU64(value, 8), timestamp: value.readDoubleBE(16) }
  },
}

export function encodeU64 (n: number): Buffer {
  const buf = Buffer.allocUnsafe(8)
  writeU64(buf, n, 0)
  return buf
}

export function encodeMeta (value: unknown): Buffer {
  return cbor.encode(value)
}

export function decodeMeta<T> (value: Uint8Array): T {
  return cbor.decode(value) as T
}

/** A record as handed to the encoder: everything but its offset. */
export interface PendingRecord {
  readonly timestamp: number
  readonly key: string
  readonly topic: string
  readonly payload: Uint8Array
  readonly qos: 0 | 1 | 2
  readonly clientId: string
  readonly headers: Readonly<Record<string, string>> | null
}

export interface BatchHeader {
  readonly baseOffset: number
  readonly count: number
  readonly firstTimestamp: number
  readonly maxTimestamp: number
  readonly bytes: number
}

export function encodeBatch (baseOffset: number, records: readonly PendingRecord[], from = 0, to = records.length): { value: Buffer, header: BatchHeader } {
  const n = to - from
  const strings: string[] = []
  const interned = new Map<string, number>()
  const intern = (str: string): number => {
    let i = interned.get(str)
    if (i === undefined) {
      i = strings.length
      strings.push(str)
      interned.set(str, i)
    }
    return i
  }
  const firstTs = (records[from] as PendingRecord).timestamp
  let maxTs = firstTs
  let payloadBytes = 0
  let anyHeaders = false
  for (let i = from; i < to; i++) {
    const r = records[i] as PendingRecord
    payloadBytes += r.payload.byteLength
    if (r.headers !== null) anyHeaders = true
  }
  let tsDelta: Int32Array | Float64Array = new Int32Array(n)
  for (let i = 0; i < n; i++) {
    const delta = (records[from + i] as PendingRecord).timestamp - firstTs
    if (delta > 0x7fffffff || delta < -0x80000000) { tsDelta = new Float64Array(n); break }
  }
  // Key, topic and client id are interned before any header string: at most
  // three per record and MAX_BATCH_RECORDS records, so their indexes fit in 16 bits.
  const keyIdx = new Uint16Array(n)
  const topicIdx = new Uint16Array(n)
  const clientIdx = new Uint16Array(n)
  const qos = new Uint8Array(n)
  const lengths = new Uint32Array(n)
  const payloads = Buffer.allocUnsafe(payloadBytes)
  let at = 0
  for (let i = 0; i < n; i++) {
    const r = records[from + i] as PendingRecord
    if (r.timestamp > maxTs) maxTs = r.timestamp
    tsDelta[i] = r.timestamp - firstTs
    keyIdx[i] = intern(r.key)
    topicIdx[i] = intern(r.topic)
    clientIdx[i] = intern(r.clientId)
    qos[i] = r.qos
    lengths[i] = r.payload.byteLength
    payloads.set(r.payload, at)
    at += r.payload.byteLength
  }
  const columns: unknown[] = [firstTs, strings, tsDelta, keyIdx, topicIdx, clientIdx, qos, lengths, payloads]
  if (anyHeaders) columns.push(...headerColumns(records, from, to, intern))
  else columns.push(null)
  const body = cbor.encode(columns)
  const value = Buffer.allocUnsafe(BATCH_HEADER_BYTES + body.length)
  value[0] = anyHeaders ? BATCH_MAGIC_HEADER_SETS : BATCH_MAGIC
  writeU64(value, baseOffset, 5)
  value.writeUInt32BE(n, 13)
  value.writeDoubleBE(firstTs, 17)
  value.writeDoubleBE(maxTs, 25)
  body.copy(value, BATCH_HEADER_BYTES)
  value.writeUInt32BE(crc32(value.subarray(5)), 1)
  return { value, header: { baseOffset, count: n, firstTimestamp: firstTs, maxTimestamp: maxTs, bytes: value.length } }
}

/** A trie node of header names and values (alternating by depth); setId 0 = no set ends here. */
class SetNode {
  setId = 0
  #children: Map<string, SetNode> | null = null

  child (str: string): SetNode {
    this.#children ??= new Map()
    let next = this.#children.get(str)
    if (next === undefined) {
      next = new SetNode()
      this.#children.set(str, next)
    }
    return next
  }
}

/**
 * The two header columns of an 0xE2 body: the distinct header sets of the
 * batch, each a flat array of string indexes (name, value, name, value …),
 * and per record 0 (no headers) or 1 + its set's index.
 */
function headerColumns (records: readonly PendingRecord[], from: number, to: number, intern: (str: string) => number): [number[][], Uint16Array] {
  const sets: number[][] = []
  // Sets are found by walking a trie of their names and values: no string is
  // built per record, and a header string the producer reuses (a connection's
  // username) keeps its hash. Strings are interned only for a new set.
  const root = new SetNode()
  const headerIdx = new Uint16Array(to - from)
  let previous: PendingRecord['headers'] = null
  let previousId = 0
  for (let i = from; i < to; i++) {
    const headers = (records[i] as PendingRecord).headers
    if (headers === null) continue
    // The same object as the record before (one producer's constant headers) needs no walk.
    if (headers === previous) { headerIdx[i - from] = previousId; continue }
    let node = root
    for (const name in headers) node = node.child(name).child(headers[name] as string)
    if (node.setId === 0) {
      const set: number[] = []
      for (const name in headers) set.push(intern(name), intern(headers[name] as string))
      sets.push(set)
      node.setId = sets.length // at most MAX_BATCH_RECORDS sets, so 1 + index fits in 16 bits
    }
    headerIdx[i - from] = node.setId
    previous = headers
    previousId = node.setId
  }
  return [sets, headerIdx]
}

interface Where { readonly stream: string, readonly partition: number, readonly baseOffset: number }

function corrupt (where: Where, why: string, cause?: unknown): StoreError {
  return new StoreError('STORE_CORRUPT_BATCH',
    `corrupt batch in ${where.stream}[${where.partition}] at base offset ${where.baseOffset}: ${why}`,
    { cause, details: { stream: where.stream, partition: where.partition, baseOffset: where.baseOffset } })
}

/** Verifies magic, checksum and base offset, then returns the header. */
export function readBatchHeader (value: Buffer, where: Where): BatchHeader {
  if (value.length < BATCH_HEADER_BYTES || (value[0] !== BATCH_MAGIC && value[0] !== BATCH_MAGIC_HEADER_SETS)) {
    throw corrupt(where, value.length < BATCH_HEADER_BYTES ? 'value shorter than the batch header' : `bad magic byte 0x${(value[0] ?? 0).toString(16)}`)
  }
  if (crc32(value.subarray(5)) !== value.readUInt32BE(1)) throw corrupt(where, 'checksum mismatch')
  const baseOffset = readU64(value, 5)
  if (baseOffset !== where.baseOffset) throw corrupt(where, `header says base offset ${baseOffset}`)
  const count = value.readUInt32BE(13)
  if (count === 0 || count > MAX_BATCH_RECORDS) throw corrupt(where, `record count ${count} out of range`)
  return { baseOffset, count, firstTimestamp: value.readDoubleBE(17), maxTimestamp: value.readDoubleBE(25), bytes: value.length }
}

type NumberColumn = ArrayLike<number>
type Columns = [number, string[], NumberColumn, NumberColumn, NumberColumn, NumberColumn, NumberColumn, NumberColumn, Uint8Array]
/** 0xE1: headers as one cbor map per record, or null when no record has any. */
type MapsBody = [...Columns, Array<Record<string, string> | null> | null]
/** 0xE2: distinct header sets as string-index pairs, and per record 0 or 1 + its set. */
type SetsBody = [...Columns, number[][], NumberColumn]

function isColumn (value: unknown, count: number): boolean {
  return ArrayBuffer.isView(value) && !(value instanceof DataView) && (value as unknown as NumberColumn).length === count
}

function hasColumns (body: unknown, length: number, count: number): body is Columns {
  if (!Array.isArray(body) || body.length !== length || typeof body[0] !== 'number' || !Array.isArray(body[1])) return false
  for (let c = 2; c <= 7; c++) if (!isColumn(body[c], count)) return false
  return body[8] instanceof Uint8Array
}

function isMapsBody (body: unknown, count: number): body is MapsBody {
  return hasColumns(body, 10, count) && ((body as unknown[])[9] === null || (Array.isArray((body as unknown[])[9]) && ((body as unknown[])[9] as unknown[]).length === count))
}

function isSetsBody (body: unknown, count: number): body is SetsBody {
  if (!hasColumns(body, 11, count)) return false
  const [sets, headerIdx] = [(body as unknown[])[9], (body as unknown[])[10]]
  if (!Array.isArray(sets) || !isColumn(headerIdx, count)) return false
  const strings = body[1].length
  for (const set of sets as unknown[]) {
    if (!Array.isArray(set) || set.length % 2 !== 0) return false
    for (const i of set as unknown[]) if (!Number.isInteger(i) || (i as number) < 0 || (i as number) >= strings) return false
  }
  for (let i = 0; i < count; i++) if (((headerIdx as NumberColumn)[i] as number) > sets.length) return false
  return true
}

/**
 * A decoded record. A class rather than an object literal: V8 tracks an
 * object literal's allocation site and, when most of what it allocated is
 * still alive at a young-generation GC (a read holds thousands of records at
 * once), allocates its objects directly in the old generation from then on
 * ("pretenuring"). Records live only as long as a read, so that turned every
 * replay into a run of major GCs, at about a quarter more CPU per record,
 * and whether V8 took that decision varied from one build of the process to
 * the next. Objects made by `new` have no allocation site and stay young.
 */
class DecodedRecord implements StoredRecord {
  constructor (readonly offset: number, readonly timestamp: number, readonly key: string, readonly topic: string, readonly payload: Uint8Array,
    readonly qos: 0 | 1 | 2, readonly clientId: string, readonly headers: Readonly<Record<string, string>> | null) {}
}

/**
 * A batch's body as its columns ({@link RecordColumns}): the decoded cbor
 * columns plus one prefix sum of the payload lengths; records are made only
 * when asked for ({@link BatchColumns.record}): a 1,000-record batch decodes
 * in about 20 µs into columns, 36 µs into records (BENCHMARKS.md, sessions,
 * 12:14 UTC). A persistent session's drain frames its PUBLISHes from these.
 */
export class BatchColumns implements RecordColumns {
  readonly payloadBytes: Buffer
  /** Header set objects of an 0xE2 batch, made on first use. */
  #setObjects: Array<Readonly<Record<string, string>>> | undefined

  constructor (readonly baseOffset: number, readonly count: number, readonly start: number, readonly end: number,
    readonly strings: readonly string[], readonly firstTs: number, readonly tsDelta: NumberColumn, readonly keyIdx: NumberColumn,
    readonly topicIdx: NumberColumn, readonly clientIdx: NumberColumn, readonly qosColumn: NumberColumn,
    readonly lengths: NumberColumn, readonly starts: Uint32Array, payloads: Uint8Array,
    /** 0xE1: a map (or null) per record, or null for all. */
    readonly maps: Array<Record<string, string> | null> | null,
    /** 0xE2: the header sets (string index pairs) and per record 0 or 1 + its set. */
    readonly sets: number[][] | null, readonly headerIdx: NumberColumn | null) {
    this.payloadBytes = Buffer.from(payloads.buffer, payloads.byteOffset, payloads.byteLength)
  }

  /** The same batch with the read's range narrowed to [start, end). */
  range (start: number, end: number): BatchColumns {
    if (start === this.start && end === this.end) return this
    return new BatchColumns(this.baseOffset, this.count, start, end, this.strings, this.firstTs, this.tsDelta, this.keyIdx, this.topicIdx,
      this.clientIdx, this.qosColumn, this.lengths, this.starts, this.payloadBytes, this.maps, this.sets, this.headerIdx)
  }

  timestamp (i: number): number { return this.firstTs + (this.tsDelta[i] as number) }
  key (i: number): string { return this.strings[this.keyIdx[i] as number] as string }
  topic (i: number): string { return this.strings[this.topicIdx[i] as number] as string }
  topicIndex (i: number): number { return this.topicIdx[i] as number }
  clientId (i: number): string { return this.strings[this.clientIdx[i] as number] as string }
  qos (i: number): 0 | 1 | 2 { return this.qosColumn[i] as 0 | 1 | 2 }
  payloadStart (i: number): number { return this.starts[i] as number }
  payloadLength (i: number): number { return this.lengths[i] as number }

  payload (i: number): Uint8Array {
    return new Uint8Array(this.payloadBytes.buffer, this.payloadBytes.byteOffset + (this.starts[i] as number), this.lengths[i] as number)
  }

  headerSet (i: number): number {
    if (this.headerIdx !== null) return this.headerIdx[i] as number
    // 0xE1 maps: each record's map is its own set.
    return this.maps?.[i] === null || this.maps === null ? 0 : i + 1
  }

  headers (i: number): Readonly<Record<string, string>> | null {
    if (this.maps !== null) return this.maps[i] ?? null
    const id = this.headerIdx === null ? 0 : this.headerIdx[i] as number
    if (id === 0 || this.sets === null) return null
    // One object per set, shared by its records (StoredRecord.headers is readonly).
    // fromEntries defines own properties, so a header named __proto__ stays a header.
    this.#setObjects ??= this.sets.map((set) => {
      const entries: Array<[string, string]> = []
      for (let k = 0; k < set.length; k += 2) entries.push([this.strings[set[k] as number] as string, this.strings[set[k + 1] as number] as string])
      return Object.freeze(Object.fromEntries(entries)) as Readonly<Record<string, string>>
    })
    return this.#setObjects[id - 1] as Readonly<Record<string, string>>
  }

  record (i: number): StoredRecord {
    return new DecodedRecord(this.baseOffset + i, this.timestamp(i), this.key(i), this.topic(i), this.payload(i), this.qos(i), this.clientId(i),
      this.headers(i))
  }
}

/** The cbor body of a batch whose header was verified, its shape checked against the header's count. */
function decodeBody (value: Buffer, header: BatchHeader, where: Where): MapsBody | SetsBody {
  let body: unknown
  try {
    body = cbor.decode(value.subarray(BATCH_HEADER_BYTES))
  } catch (err) {
    throw corrupt(where, 'body is not valid cbor', err)
  }
  const valid = value[0] === BATCH_MAGIC ? isMapsBody(body, header.count) : isSetsBody(body, header.count)
  if (!valid) throw corrupt(where, 'body does not hold the counted records')
  return body as MapsBody | SetsBody
}

/** Throws unless record i names strings the batch holds (key, topic, client id) and has a QoS of 0 to 2. */
function checkRecord (where: Where, i: number, strings: number, keyIdx: NumberColumn, topicIdx: NumberColumn, clientIdx: NumberColumn,
  qos: NumberColumn): void {
  const key = keyIdx[i] as number
  const topic = topicIdx[i] as number
  const client = clientIdx[i] as number
  if (key >= strings || topic >= strings || client >= strings) {
    throw corrupt(where, `record ${i} names string ${Math.max(key, topic, client)} of ${strings} (key, topic, client id)`)
  }
  if ((qos[i] as number) > 2) throw corrupt(where, `record ${i} has QoS ${qos[i] as number}`)
}

/**
 * Decodes a batch whose header was verified by {@link readBatchHeader}, of
 * either magic, into columns; every record is checked (string indexes, QoS,
 * payload lengths against the payload bytes), so reading a column never
 * meets a damaged value. Payloads stay in `value`, not copied.
 */
export function decodeColumns (value: Buffer, header: BatchHeader, where: Where): BatchColumns {
  const checked = decodeBody(value, header, where)
  const [firstTs, strings, tsDelta, keyIdx, topicIdx, clientIdx, qos, lengths, payloads] = checked
  const count = header.count
  const starts = new Uint32Array(count)
  let at = 0
  for (let i = 0; i < count; i++) {
    checkRecord(where, i, strings.length, keyIdx, topicIdx, clientIdx, qos)
    starts[i] = at
    at += lengths[i] as number
    if (at > payloads.byteLength) throw corrupt(where, `record ${i} runs past the payload bytes`)
  }
  const maps = value[0] === BATCH_MAGIC ? (checked as MapsBody)[9] : null
  const [sets, headerIdx] = value[0] === BATCH_MAGIC ? [null, null] : [(checked as SetsBody)[9], (checked as SetsBody)[10]]
  return new BatchColumns(header.baseOffset, count, 0, count, strings, firstTs, tsDelta, keyIdx, topicIdx, clientIdx, qos, lengths, starts, payloads,
    maps, sets, headerIdx)
}

/** Each record's headers, from either body shape. */
function recordHeaders (body: MapsBody | SetsBody, magic: number, count: number): Array<Readonly<Record<string, string>> | null> {
  if (magic === BATCH_MAGIC) {
    const maps = (body as MapsBody)[9]
    return maps === null ? new Array<null>(count).fill(null) : maps.map((h) => h ?? null)
  }
  const [, strings, , , , , , , , sets, headerIdx] = body as SetsBody
  // One object per set, shared by its records (StoredRecord.headers is readonly).
  // fromEntries defines own properties, so a header named __proto__ stays a header.
  const objects = sets.map((set) => {
    const entries: Array<[string, string]> = []
    for (let k = 0; k < set.length; k += 2) entries.push([strings[set[k] as number] as string, strings[set[k + 1] as number] as string])
    return Object.freeze(Object.fromEntries(entries)) as Readonly<Record<string, string>>
  })
  const out = new Array<Readonly<Record<string, string>> | null>(count)
  for (let i = 0; i < count; i++) {
    const id = headerIdx[i] as number
    out[i] = id === 0 ? null : objects[id - 1] as Readonly<Record<string, string>>
  }
  return out
}


/**
 * Decodes every record of a batch whose header was verified by
 * {@link readBatchHeader}, of either magic, with the checks of
 * {@link decodeColumns}. Payloads are views into `value`, not copies. Records
 * are built here in one loop rather than through the columns' accessors,
 * which took twice as long per batch (BENCHMARKS.md, 12:14 UTC section).
 */
export function decodeBatch (value: Buffer, header: BatchHeader, where: Where): StoredRecord[] {
  const checked = decodeBody(value, header, where)
  const [firstTs, strings, tsDelta, keyIdx, topicIdx, clientIdx, qos, lengths, payloads] = checked
  const headers = recordHeaders(checked, value[0] as number, header.count)
  const out: StoredRecord[] = new Array(header.count)
  const buffer = payloads.buffer
  let at = payloads.byteOffset
  const end = at + payloads.byteLength
  for (let i = 0; i < header.count; i++) {
    checkRecord(where, i, strings.length, keyIdx, topicIdx, clientIdx, qos)
    const length = lengths[i] as number
    if (at + length > end) throw corrupt(where, `record ${i} runs past the payload bytes`)
    out[i] = new DecodedRecord(header.baseOffset + i, firstTs + (tsDelta[i] as number), strings[keyIdx[i] as number] as string,
      strings[topicIdx[i] as number] as string, new Uint8Array(buffer, at, length), qos[i] as 0 | 1 | 2, strings[clientIdx[i] as number] as string,
      headers[i] as Readonly<Record<string, string>> | null)
    at += length
  }
  return out
}

/**
 * Decodes one batch exactly as stored (the bytes {@link LogStore.readBatches}
 * returns and the HTTP API's `format=batches` serves): checks magic and
 * CRC-32, then returns every record of the batch, payloads as views into
 * `bytes`. STORE_CORRUPT_BATCH when the bytes are not a valid batch;
 * `where` only names the batch in that error.
 */
export function decodeStoredBatch (bytes: Uint8Array, where: { stream: string, partition: number } = { stream: '(unknown)', partition: 0 }): StoredRecord[] {
  const value = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const at = { ...where, baseOffset: value.length >= BATCH_HEADER_BYTES ? readU64(value, 5) : 0 }
  return decodeBatch(value, readBatchHeader(value, at), at)
}
