/**
 * The one read path. Every surface that reads records out of the log — the
 * HTTP API (http/records.ts, http/batches.ts), `edgemq replay` from a data
 * directory (cli/replay.ts) and MQTT `$replay` (mqtt/replay.ts) — turns its
 * request (a stream, partitions, a range from/to by offset or time, key /
 * topic / where filters, limits) into a plan here, and runs the plan with
 * the reader here. What differs between them in semantics is said by the
 * policies and options they pass. What stays theirs is how a request is
 * written (URL parameters, flags, a topic level), what is done with the
 * records, and how errors are worded: this module throws QueryError
 * (query/errors.ts), and each surface maps its codes to its own (HTTP_…,
 * CLI_…, GW_REPLAY_…).
 *
 * Interface, in the order a read uses it:
 *
 * 1. **Parse** (pure). `parseTime(text, now, name)`: a time (`now`, `-15m`,
 *    epoch ms, ISO 8601 with a zone, a date). `parsePosition(text, now,
 *    {name, start})`: a position as the CLI's `--from/--to` and the
 *    `$replay` range write it — `earliest` / `latest` (a start only), a bare
 *    integer (an offset), `@<epoch ms>`, or a time. `compileRecordFilter
 *    ({keys, topics, where})`: the filters as one predicate, null when none.
 *    Throws QUERY_BAD_TIME, QUERY_BAD_POSITION, QUERY_BAD_TOPIC_FILTER, or
 *    FilterExpressionError (filter-expression.ts) with its position.
 * 2. **Check** (pure). `readRange(from, to)` / a {@link ReadRange} literal;
 *    `checkRange(range, names)` refuses an end before a start of the same
 *    kind (QUERY_BAD_RANGE; offsets and times are not comparable before the
 *    plan). `selectPartitions(stream, count, {partition, keys})`: the one
 *    asked for, those the keys hash to, or all (QUERY_UNKNOWN_PARTITION).
 * 3. **Plan**. `resolveRange(store, stream, partition, range, policy)`
 *    places a range on one partition as offsets ({@link PartitionRange});
 *    `planRead` does it for a list of partitions, in their order. A plan
 *    that starts from a given offset per partition (a session's cursor) is
 *    `resolveRange` with `{kind: 'offset'}` per partition. `placePending`
 *    places again the times the index could not place yet, for readers of
 *    whole stored batches (http/batches.ts), which cannot skip record by
 *    record.
 * 4. **Run**. `new PartitionReader(store, range, options)` walks one
 *    partition's range, one store read per `step(room)`, and returns the
 *    records the filter accepts, with why it stopped: `range` (the range is
 *    done for good), `log` (caught up with the log end: a caller may wait
 *    for an append and step again), `limit` (the room is full), or null
 *    (more to read). It holds one chunk at a time, never the range: memory
 *    is bounded by the chunk size, not by the length of the history.
 *
 * Range rules, the same on every surface:
 * - start: `earliest` is the log start, `latest` the log end, an offset is
 *   itself, a time is the first offset whose timestamp is at or after it,
 *   a group is its committed offset (the log start when it has none, or
 *   when retention passed it).
 * - end, exclusive: `endOffset`, and/or the first offset whose timestamp is
 *   at or after `endTime` — the same rule as the start, so consecutive
 *   ranges neither overlap nor leave gaps. With both, the earlier wins. An
 *   end before the start is the start (an empty range).
 * - A time becomes an offset through the store's sparse time index
 *   (`offsetForTime`), never by scanning from the log start. A time the
 *   index cannot place yet (every record so far is older) stays pending in
 *   the range (`fromTime`, `toTime`): the reader skips records older than a
 *   pending start, and ends the range at the first record at or after a
 *   pending end.
 *
 * Policies ({@link RangePolicy}):
 * - `outside: 'fail'` (HTTP, CLI) refuses a start outside [log start, log
 *   end] with QUERY_OFFSET_OUT_OF_RANGE, before anything is read;
 *   `'clamp'` (`$replay`, where one offset applies to every partition)
 *   moves it into the log.
 * - `snapshot: true` (a replay) ends the range at the log end as of the
 *   plan; `false` (HTTP, a live replay, a cursor) leaves it open, so the
 *   reader goes on as records are appended.
 *
 * Reader options ({@link ReaderOptions}): the chunk (records and bytes per
 * store read; HTTP reads 10,000 records to amortise seeks, `$replay` 1,000
 * to bound native memory); a `slice` (http/cpu-slice.ts) ticked per record
 * examined, so filtering and a caller's per-record work yield to other
 * clients; `onGap`, which makes the reader skip records retention deleted
 * before it reached them (and say how many) instead of failing with the
 * store's STORE_OFFSET_OUT_OF_RANGE; `openEnd()` turns a snapshot into a
 * live read once its history is delivered.
 *
 * A standby's log can go backwards (a snapshot from a new primary whose log
 * ends before the old copy's; log-rewinds.ts). A reader positioned past the
 * new end moves back to it at its next step (`checkRewound()` does it at
 * once), so it reads every record of the new history, and the store's
 * tracker is told (a log line and a counter); a snapshot range ends at the
 * new end. Records of the old history it returned before are not taken back.
 *
 * A reader serves one caller: `step` is not called again before the
 * previous step resolved.
 */
import { isStoreError, partitionForKey, type LogStore, type StoredRecord } from '../../store/index.ts'
import { compileTopicFilters, topicFilterProblem } from '../access/topics.ts'
import { compileFilterExpression, parseJsonPayload } from './filter-expression.ts'
import { QueryError } from './errors.ts'
import { RewindWatch, rewindsOf, type LogRewinds } from './log-rewinds.ts'

// ---------------------------------------------------------------- requests

/** A position in a partition, before it is placed on the partition. */
export type Position =
  | { readonly kind: 'earliest' | 'latest' }
  | { readonly kind: 'offset', readonly offset: number }
  | { readonly kind: 'time', readonly timestamp: number }

/** Where a read starts: a position, or a consumer group's committed offset (the group's store name). */
export type Start = Position | { readonly kind: 'group', readonly group: string }

export interface ReadRange {
  readonly start: Start
  /** Exclusive; null: no end offset. */
  readonly endOffset: number | null
  /** The range ends before the first record at or after this time; null: no end time. */
  readonly endTime: number | null
}

export interface FilterSpec {
  /** Record keys to keep (the device ids); empty: any. */
  readonly keys: readonly string[]
  /** MQTT topic filters a record's topic must match one of; empty: any. */
  readonly topics: readonly string[]
  /** A `where` expression over the JSON payload (filter-expression.ts), as text or already compiled. */
  readonly where: string | WherePredicate | undefined
}

/** A compiled `where` expression: true when the parsed payload matches. */
export type WherePredicate = (doc: unknown) => boolean

export type RecordFilter = (r: StoredRecord) => boolean

// ---------------------------------------------------------------- parse

const UNIT_MS: Readonly<Record<string, number>> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }
const RELATIVE = /^-([0-9]{1,12})(ms|s|m|h|d)$/
const ISO = /^([0-9]{4})-([0-9]{2})-([0-9]{2})(?:[Tt]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,9}))?)?([Zz]|[+-][0-9]{2}:?[0-9]{2})?)?$/

/**
 * A point in time, in milliseconds since the epoch:
 * - `now`, or a relative time before now: `-30s`, `-15m`, `-2h`, `-7d`, `-500ms`;
 * - milliseconds since the epoch: `1714528800000`;
 * - ISO 8601: `2024-05-01T02:00:00Z`, `2024-05-01T04:00:00.250+02:00`, or a
 *   date alone, `2024-05-01`, meaning midnight UTC. A date-time needs its
 *   zone (`Z` or an offset): the gateway's local zone is not the caller's.
 *
 * `name` is what the caller calls the value (`from`, `--to`, `start`); it
 * begins the message of QUERY_BAD_TIME.
 */
export function parseTime (text: string, now: number, name: string): number {
  const bad = (why: string): QueryError => new QueryError('QUERY_BAD_TIME', `${name}: ${JSON.stringify(text)} is not a time: ${why}`, { details: { name } })
  if (text === 'now') return now
  const rel = RELATIVE.exec(text)
  if (rel !== null) {
    const t = now - Number(rel[1]) * (UNIT_MS[rel[2] as string] as number)
    if (t < 0) throw bad('it is before 1970')
    return t
  }
  if (/^[0-9]{1,16}$/.test(text)) {
    const t = Number(text)
    if (!Number.isSafeInteger(t)) throw bad('too large')
    return t
  }
  const m = ISO.exec(text)
  if (m === null) {
    throw bad('expected milliseconds since the epoch, an ISO 8601 time such as 2024-05-01T02:00:00Z, "now", or a relative time such as -15m')
  }
  const [, y, mo, d, hh, mm, ss, frac, zone] = m
  if (hh !== undefined && zone === undefined) throw bad('an ISO 8601 date-time needs a zone: add Z (UTC) or an offset such as +02:00')
  const year = Number(y)
  const month = Number(mo)
  const day = Number(d)
  const hour = Number(hh ?? 0)
  const minute = Number(mm ?? 0)
  const second = Number(ss ?? 0)
  const ms = frac === undefined ? 0 : Math.floor(Number(`0.${frac}`) * 1000)
  if (month < 1 || month > 12 || hour > 23 || minute > 59 || second > 59) throw bad('a field is out of range')
  const utc = Date.UTC(year, month - 1, day, hour, minute, second, ms)
  if (new Date(utc).getUTCDate() !== day || day < 1) throw bad(`${y}-${mo} has no day ${d}`)
  let offsetMs = 0
  if (zone !== undefined && zone !== 'Z' && zone !== 'z') {
    const digits = zone.slice(1).replace(':', '')
    const oh = Number(digits.slice(0, 2))
    const om = Number(digits.slice(2))
    if (oh > 23 || om > 59) throw bad('the zone offset is out of range')
    offsetMs = (zone[0] === '-' ? -1 : 1) * (oh * 60 + om) * 60_000
  }
  const t = utc - offsetMs
  if (t < 0) throw bad('it is before 1970')
  return t
}

/**
 * A position written as one word: `earliest` or `latest` (only where a
 * start is wanted, `start: true`), a bare integer (an offset), `@<epoch
 * ms>`, or a time as {@link parseTime} reads it. An offset too large is
 * QUERY_BAD_POSITION; anything else that is not a position, QUERY_BAD_TIME.
 */
export function parsePosition (text: string, now: number, options: { readonly name: string, readonly start: boolean }): Position {
  const { name, start } = options
  if (text === '') throw new QueryError('QUERY_BAD_TIME', `${name} is empty`, { details: { name } })
  if (text === 'earliest' || text === 'latest') {
    if (start) return { kind: text }
    throw new QueryError('QUERY_BAD_TIME', `${name}: ${text} is a start, not an end`, { details: { name } })
  }
  if (/^[0-9]+$/.test(text)) {
    const offset = Number(text)
    if (!Number.isSafeInteger(offset)) throw new QueryError('QUERY_BAD_POSITION', `${name} ${text}: the offset is too large`, { details: { name } })
    return { kind: 'offset', offset }
  }
  return { kind: 'time', timestamp: parseTime(/^@[0-9]+$/.test(text) ? text.slice(1) : text, now, name) }
}

/**
 * Record keys, topic filters and a `where` expression as one predicate
 * (null when there is none, so a reader can skip the call). `topicName`
 * names the topic filters in QUERY_BAD_TOPIC_FILTER's message.
 */
export function compileRecordFilter (spec: FilterSpec, topicName = 'topic'): RecordFilter | null {
  for (const f of spec.topics) {
    const problem = topicFilterProblem(f)
    if (problem !== null) {
      throw new QueryError('QUERY_BAD_TOPIC_FILTER', `${topicName} ${JSON.stringify(f)}: ${problem}`, { details: { name: topicName, filter: f } })
    }
  }
  // FilterExpressionError carries the position of the problem.
  const where = spec.where === undefined ? null : typeof spec.where === 'string' ? compileFilterExpression(spec.where) : spec.where
  const keys = spec.keys.length === 0 ? null : new Set(spec.keys)
  const topicMatch = spec.topics.length === 0 ? null : compileTopicFilters(spec.topics)
  if (keys === null && topicMatch === null && where === null) return null
  return (r) => (keys === null || keys.has(r.key)) &&
    (topicMatch === null || topicMatch(r.topic)) &&
    (where === null || where(parseJsonPayload(r.payload)))
}

// ---------------------------------------------------------------- check

/** A range from two positions, either optional (no start: the log start; no end: open). */
export function readRange (from: Start | undefined, to: Position | undefined): ReadRange {
  if (to?.kind === 'earliest' || to?.kind === 'latest') throw new QueryError('QUERY_BAD_POSITION', `the end cannot be ${to.kind}: it is a start`)
  return {
    start: from ?? { kind: 'earliest' },
    endOffset: to?.kind === 'offset' ? to.offset : null,
    endTime: to?.kind === 'time' ? to.timestamp : null,
  }
}

/** What the caller calls each end, for QUERY_BAD_RANGE's message (`offset`/`endOffset`, `--from`/`--to`). */
export interface RangeNames {
  readonly startOffset: string
  readonly endOffset: string
  readonly startTime: string
  readonly endTime: string
}

/** Refuses a range whose end lies before its start, when both are offsets or both are times (QUERY_BAD_RANGE). */
export function checkRange (range: ReadRange, names: RangeNames): void {
  const { start, endOffset, endTime } = range
  if (start.kind === 'offset' && endOffset !== null && endOffset < start.offset) {
    throw new QueryError('QUERY_BAD_RANGE', `${names.endOffset} ${endOffset} is before ${names.startOffset} ${start.offset}`,
      { details: { name: names.endOffset } })
  }
  if (start.kind === 'time' && endTime !== null && endTime < start.timestamp) {
    const [to, from] = [new Date(endTime).toISOString(), new Date(start.timestamp).toISOString()]
    throw new QueryError('QUERY_BAD_RANGE', `${names.endTime} (${to}) is before ${names.startTime} (${from})`,
      { details: { name: names.endTime } })
  }
}

/**
 * The partitions a read covers, ascending: the one asked for; else those
 * the keys hash to (only they can hold the keys' records); else all.
 * `stream` names the stream in QUERY_UNKNOWN_PARTITION's message.
 */
export function selectPartitions (stream: string, count: number, which: { readonly partition?: number, readonly keys?: readonly string[] }): number[] {
  const { partition, keys = [] } = which
  if (partition !== undefined) {
    if (!Number.isSafeInteger(partition) || partition < 0 || partition >= count) {
      throw new QueryError('QUERY_UNKNOWN_PARTITION', `stream ${stream} has partitions 0 to ${count - 1}, not ${partition}`,
        { details: { stream, partition, partitions: count } })
    }
    return [partition]
  }
  if (keys.length > 0) return [...new Set(keys.map((k) => partitionForKey(k, count)))].sort((a, b) => a - b)
  return Array.from({ length: count }, (_, p) => p)
}

// ---------------------------------------------------------------- plan

export interface RangePolicy {
  /** A start outside the log: refuse it (QUERY_OFFSET_OUT_OF_RANGE) or move it into the log. */
  readonly outside: 'fail' | 'clamp'
  /** End the range at the log end as of the plan (a replay), or leave it open (a pull, a live read). */
  readonly snapshot: boolean
}

/** A range placed on one partition. */
export interface PartitionRange {
  /** The store's `<tenant>/<stream>` name. */
  readonly stream: string
  readonly partition: number
  readonly start: number
  /** Exclusive; Infinity when open-ended. Never below `start`. */
  readonly end: number
  /** A start time the time index could not place yet (every record was older): skip records before it. */
  readonly fromTime: number | null
  /** An end time the time index could not place yet: the first record at or after it ends the range. */
  readonly toTime: number | null
  /** `end` is the log end as of the plan (policy `snapshot`): a rewind of the log lowers it to the new end. */
  readonly snapshot?: boolean
}

/** Places `range` on one partition of `stream` (the rules in the header). */
export async function resolveRange (store: Pick<LogStore, 'partitionInfo' | 'offsetForTime' | 'fetchOffset'>, stream: string, partition: number,
  range: ReadRange, policy: RangePolicy): Promise<PartitionRange> {
  const info = store.partitionInfo(stream, partition)
  let start: number
  let fromTime: number | null = null
  const s = range.start
  switch (s.kind) {
    case 'offset': start = s.offset; break
    case 'earliest': start = info.logStartOffset; break
    case 'latest': start = info.logEndOffset; break
    case 'time': {
      const found = await store.offsetForTime(stream, partition, s.timestamp)
      // Every record is older: start at the log end, and skip what arrives before the time (a time in the future).
      if (found === null) fromTime = s.timestamp
      start = found ?? store.partitionInfo(stream, partition).logEndOffset
      break
    }
    // A group that never committed starts at the log start; one whose offset retention passed, at the log start too.
    case 'group': start = Math.max(store.fetchOffset(s.group, stream, partition) ?? 0, store.partitionInfo(stream, partition).logStartOffset); break
  }
  // Where the log is now: placing a time awaited the index, and appends or retention may have moved it meanwhile.
  const { logStartOffset, logEndOffset } = store.partitionInfo(stream, partition)
  if (start < logStartOffset || start > logEndOffset) {
    if (policy.outside === 'fail') {
      throw new QueryError('QUERY_OFFSET_OUT_OF_RANGE',
        `offset ${start} is out of range for ${stream}[${partition}]: the log holds offsets from ${logStartOffset} up to ${logEndOffset} (exclusive)`,
        { details: { stream, partition, offset: start, logStartOffset, logEndOffset } })
    }
    start = Math.min(Math.max(start, logStartOffset), logEndOffset)
  }
  let end = range.endOffset ?? Infinity
  let toTime = range.endTime
  if (toTime !== null) {
    const bound = await store.offsetForTime(stream, partition, toTime)
    // Every record so far is older than the end time: the range stays open until a record at or after it arrives.
    if (bound !== null) { end = Math.min(end, bound); toTime = null }
  }
  if (policy.snapshot) {
    // Every record below the log end is older than a pending end time: the log end bounds the range either way.
    end = Math.min(end, logEndOffset)
    toTime = null
  }
  return { stream, partition, start, end: Math.max(end, start), fromTime, toTime, snapshot: policy.snapshot }
}

/** {@link resolveRange} for each partition, in the order given. */
export async function planRead (store: Pick<LogStore, 'partitionInfo' | 'offsetForTime' | 'fetchOffset'>, stream: string, partitions: readonly number[],
  range: ReadRange, policy: RangePolicy): Promise<PartitionRange[]> {
  const out: PartitionRange[] = []
  for (const p of partitions) out.push(await resolveRange(store, stream, p, range, policy))
  return out
}

/**
 * Places pending times again (appends may have brought records at or after
 * them): for readers of whole stored batches, which cannot skip record by
 * record. Returns the range unchanged when nothing is pending.
 */
export async function placePending (store: Pick<LogStore, 'partitionInfo' | 'offsetForTime'>, range: PartitionRange): Promise<PartitionRange> {
  let { start, end, fromTime, toTime } = range
  const { stream, partition } = range
  if (fromTime !== null) {
    const found = await store.offsetForTime(stream, partition, fromTime)
    if (found !== null) fromTime = null
    start = found ?? store.partitionInfo(stream, partition).logEndOffset
    end = Math.max(end, start)
  }
  if (toTime !== null) {
    const bound = await store.offsetForTime(stream, partition, toTime)
    if (bound !== null) { end = Math.max(start, Math.min(end, bound)); toTime = null }
  }
  return { ...range, start, end, fromTime, toTime }
}

// ---------------------------------------------------------------- run

/** Cooperative CPU slices (http/cpu-slice.ts's CpuSlice): `tick` per unit of work, `yield` when it says so. */
export interface Slice {
  tick (bytes?: number): boolean
  yield (): Promise<void>
}

export interface ReaderOptions {
  /** Records the caller wants; null: all. */
  readonly filter?: RecordFilter | null
  /** Records per store read (default READ_CHUNK_RECORDS). */
  readonly chunkRecords?: number
  /** Payload bytes per store read (default READ_CHUNK_BYTES). */
  readonly chunkBytes?: number
  /** Ticked per record examined; the reader yields when the slice is used up. */
  readonly slice?: Slice | null
  /**
   * Skip records retention deleted before the reader reached them, and call
   * this with how many; without it, the store's STORE_OFFSET_OUT_OF_RANGE
   * ends the read.
   */
  readonly onGap?: ((skipped: number) => void) | null
  /** Where the store's log rewinds are tracked (log-rewinds.ts); default: the store's tracker, when it has one. */
  readonly rewinds?: LogRewinds | null
}

/** Room left in the caller's answer. `first`: nothing is in it yet, so one record goes in even when larger than `bytes`. */
export interface Room {
  readonly records: number
  readonly bytes: number
  readonly first: boolean
}

export type ReadStop = 'range' | 'log' | 'limit'

export interface ReadChunk {
  /** The records the filter accepted, in offset order. */
  readonly records: StoredRecord[]
  /** Their payload bytes. */
  readonly bytes: number
  /** Records examined (accepted or not). */
  readonly scanned: number
  /** Why the step stopped; null: it read a chunk and there is more to read. */
  readonly stop: ReadStop | null
}

/**
 * Records per store read. Reads of 1,000 records spent a fifth of a
 * replay's time seeking (a backwards key seek and an iterator per read below
 * the tail index); ten times that amortises it, at some 2.5 MB of NDJSON per
 * HTTP write.
 */
export const READ_CHUNK_RECORDS = 10_000
export const READ_CHUNK_BYTES = 4 * 1024 * 1024

const ALL: Room = { records: Number.POSITIVE_INFINITY, bytes: Number.POSITIVE_INFINITY, first: true }

/** Walks one partition's range, one store read per step. */
export class PartitionReader {
  /** The next offset to examine. */
  next: number
  #end: number
  #fromTime: number | null
  readonly #toTime: number | null
  readonly #store: Pick<LogStore, 'partitionInfo' | 'read'>
  readonly #stream: string
  readonly #partition: number
  readonly #filter: RecordFilter | null
  readonly #chunkRecords: number
  readonly #chunkBytes: number
  readonly #slice: Slice | null
  readonly #onGap: ((skipped: number) => void) | null
  readonly #rewinds: RewindWatch
  #snapshot: boolean

  constructor (store: Pick<LogStore, 'partitionInfo' | 'read'>, range: PartitionRange, options: ReaderOptions = {}) {
    this.#store = store
    this.#stream = range.stream
    this.#partition = range.partition
    this.next = range.start
    this.#end = range.end
    this.#fromTime = range.fromTime
    this.#toTime = range.toTime
    this.#filter = options.filter ?? null
    this.#chunkRecords = options.chunkRecords ?? READ_CHUNK_RECORDS
    this.#chunkBytes = options.chunkBytes ?? READ_CHUNK_BYTES
    this.#slice = options.slice ?? null
    this.#onGap = options.onGap ?? null
    this.#rewinds = new RewindWatch(store, range.stream, range.partition, options.rewinds !== undefined ? options.rewinds : rewindsOf(store))
    this.#snapshot = range.snapshot === true
  }

  /** Exclusive; Infinity when open. Lowered when a pending end time is reached. */
  get end (): number { return this.#end }

  /** Lifts the end: a snapshot whose history is delivered goes on live. */
  openEnd (): void {
    this.#end = Number.POSITIVE_INFINITY
    this.#snapshot = false
  }

  /**
   * Moves the reader back to its partition's log end when the log was
   * rewound below its position since it last looked: by the store's tracker
   * (the lowest end a rewind left, even when appends have carried the log
   * past the reader again since), or by the log end it sees now. True when
   * it moved. `step` does it first; a caller that reports the reader's
   * position without stepping (a long poll that timed out) calls it.
   */
  checkRewound (): boolean {
    const end = this.#rewinds.movedEnd(this.next)
    if (end === null) return false
    this.#moveBack(end)
    return true
  }

  #moveBack (end: number): void {
    const from = this.next
    this.next = end
    // A snapshot's history is the log as of the plan; what of it is left ends at the new end.
    if (this.#snapshot) this.#end = Math.min(this.#end, end)
    this.#rewinds.movedBack(from, end)
  }

  /** Caught up with the log end: a live reader waits for appends there; a snapshot range rewound below its end is done. */
  #atLogEnd (): ReadChunk {
    if (this.#snapshot && this.next < this.#end) this.#end = this.next
    return { records: [], bytes: 0, scanned: 0, stop: this.next >= this.#end ? 'range' : 'log' }
  }

  /** One store read: the records it accepted, within `room`. */
  async step (room: Room = ALL): Promise<ReadChunk> {
    this.checkRewound()
    if (this.next >= this.#end) return { records: [], bytes: 0, scanned: 0, stop: 'range' }
    const info = this.#store.partitionInfo(this.#stream, this.#partition)
    if (this.next < info.logStartOffset && this.#onGap !== null) {
      this.#onGap(info.logStartOffset - this.next)
      this.next = Math.min(info.logStartOffset, this.#end)
      if (this.next >= this.#end) return { records: [], bytes: 0, scanned: 0, stop: 'range' }
    }
    if (this.next >= info.logEndOffset) return this.#atLogEnd()
    // Unfiltered records all go out: read no more than there is room for. Filtered ones: a full chunk.
    const filtered = this.#filter !== null || this.#fromTime !== null
    let result
    try {
      result = await this.#store.read(this.#stream, this.#partition, this.next, {
        maxRecords: Math.max(1, Math.min(this.#chunkRecords, this.#end - this.next, filtered ? this.#chunkRecords : room.records)),
        maxBytes: Math.max(1, Math.min(this.#chunkBytes, filtered ? this.#chunkBytes : room.bytes)),
      })
    } catch (err) {
      // A standby's log rewound below the reader since partitionInfo (the store has not refreshed yet): move back to its new end.
      const rewoundTo = isStoreError(err, 'STORE_OFFSET_OUT_OF_RANGE') ? err.details.logEndOffset : undefined
      if (rewoundTo !== undefined && rewoundTo < this.next) {
        this.#moveBack(rewoundTo)
        return this.#atLogEnd()
      }
      // Retention moved the log start meanwhile: the next step skips ahead.
      if (this.#onGap !== null && isStoreError(err, 'STORE_OFFSET_OUT_OF_RANGE')) return { records: [], bytes: 0, scanned: 0, stop: null }
      throw err
    }
    // A standby's log rewound by a snapshot since partitionInfo: the read ends at its new end (logEndOffset), where a
    // live reader waits for appends as at any log end.
    if (result.records.length === 0 && this.next >= result.logEndOffset) {
      if (this.next > result.logEndOffset) this.#moveBack(result.logEndOffset)
      return this.#atLogEnd()
    }
    // Below the log end a read returns a record; never spin on one that did not.
    if (result.records.length === 0) { this.#end = this.next; return { records: [], bytes: 0, scanned: 0, stop: 'range' } }
    const out: StoredRecord[] = []
    let bytes = 0
    let scanned = 0
    const slice = this.#slice
    for (const r of result.records) {
      if (r.offset >= this.#end) return { records: out, bytes, scanned, stop: 'range' }
      if (this.#toTime !== null && r.timestamp >= this.#toTime) {
        // The first record at or after the end time ends the range for good.
        this.#end = r.offset
        return { records: out, bytes, scanned, stop: 'range' }
      }
      scanned++
      // Filters (a where expression parses every payload) cost CPU per record: yield between slices.
      if (slice !== null && slice.tick(r.payload.byteLength)) await slice.yield()
      if (this.#fromTime !== null) {
        if (r.timestamp < this.#fromTime) { this.next = r.offset + 1; continue }
        this.#fromTime = null
      }
      if (this.#filter === null || this.#filter(r)) {
        const size = r.payload.byteLength
        if ((!room.first || out.length > 0) && bytes + size > room.bytes) return { records: out, bytes, scanned, stop: 'limit' }
        out.push(r)
        bytes += size
        this.next = r.offset + 1
        if (out.length >= room.records) return { records: out, bytes, scanned, stop: this.next >= this.#end ? 'range' : 'limit' }
      } else {
        this.next = r.offset + 1
      }
    }
    if (this.next >= this.#end) return { records: out, bytes, scanned, stop: 'range' }
    return { records: out, bytes, scanned, stop: null }
  }
}
