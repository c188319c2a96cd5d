/**
 * The LevelDB implementation of {@link LogStore}. The key layout and batch
 * format are documented in format.ts; this file owns the in-memory state
 * (offsets per partition, group offsets) and the single writer.
 *
 * Writer: every mutation of the log (group commits and retention passes)
 * runs on one serial loop, so partition metadata is never written by two
 * batches at once. Appends queue per partition; when the loop is idle the
 * first append schedules a commit on the microtask queue (no timer), so a
 * lone append is written at once; appends arriving while a commit is in
 * flight wait and go out together in the next one (leader/follower group
 * commit). Offsets are assigned when the commit is built, so a failed write
 * leaves no gap: its appends are rejected and the next commit reuses nothing
 * that was ever visible.
 *
 * Gathering (`durability: sync`): devices that wait for their ack before
 * sending again split into two groups that take turns on the disk, each
 * waiting for the other's write and then its own (a lone first append is
 * written at once; the rest arrive microseconds later and wait for it). So
 * when a commit is done, the writer waits until every device it just
 * acknowledged has sent again: until as many records are queued as the
 * commit held plus those queued while it was written (the other group),
 * checked once per turn of the event loop, at most {@link GATHER_MS}; then
 * both groups go in one commit. Traced under the gateway bench's device load
 * (10 devices; three runs of 3 s measured, 750-1,050 commits each, a busy
 * machine), gathering only while fewer records were queued than the commit
 * held, and only until that many were, left 14-34 % of commits short of the
 * ten: a gather ended one device early whenever one record was already queued
 * (the late device then went with the next group), and two groups with the
 * larger one waiting (5 and 5, 6 and 4) never gathered. This rule: 7 % short
 * (one run of 5 s, 2,576 commits). A
 * gather that runs out of time twice in a row (devices that do not
 * come back at once) turns gathering off for the next {@link GATHER_BACKOFF}
 * commits, so an irregular load pays it rarely; a single one (a device
 * descheduled on a busy machine: about one gather in forty there) does not,
 * as the backoff split the devices again for eight commits. More than GATHER_MS after
 * the last commit of records (idle, or writing only write()s such as session
 * cursors) a lone append is written at once: no device is turning around.
 * Only after commits of at most {@link GATHER_MAX_RECORDS} records: connections with many messages in
 * flight keep the disk busy without it, and the gateway's qos1 bench (100 in
 * flight per connection, commits of about 400) ran slower with it (paired
 * rounds 0.59-1.68, median 0.81).
 *
 * Not safe for two processes on one database (LevelDB's lock forbids it).
 */
import { ClassicLevel } from 'classic-level'
import type { AbstractBatchOperation, AbstractBatchOptions, AbstractLevel, AbstractSnapshot } from 'abstract-level'
import { StoreError, isStoreError } from './errors.ts'
import {
  FORMAT_VERSION, MAX_BATCH_BYTES, dedupe, MAX_BATCH_RECORDS, decodeBatch, decodeColumns, decodeMeta, encodeBatch, encodeMeta, encodeU64,
  keys, readBatchHeader, readU64, type BatchHeader, type PendingRecord,
} from './format.ts'
import { BatchIndex } from './batch-index.ts'
import { asDamage, missingOffsets } from './damage.ts'
import { partitionForKey } from './partitioner.ts'
import {
  MAX_PARTITIONS, checkCount, checkGroupName, checkOffset, checkStreamName, checkTimestamp, toPendingRecord,
} from './validate.ts'
import {
  systemClock, type AppendListener, type AppendOptions, type AppendResult, type Clock, type DroppedRecords, type RetentionHoldDropped, type Durability, type GroupInfo, type GroupOptions,
  type AppendExtraOperation, type BatchReadResult, type ExtraOperation, type LogStore, type PartitionInfo, type PartitionLag, type ReadBatchesOptions, type StoreWriteOptions, type ReadOptions, type ReadResult, type RecordInput,
  type ResetSpec, type RetentionBlocked, type RetentionReport, type StoreLogger, type StoreObserver, type StoredBatch, type StoredRecord, type StreamInfo,
  type ColumnReadResult, type RecordColumns, type ExtraSublevel,
  type StreamOptions,
} from './types.ts'

/** Any abstract-level database (classic-level, memory-level, a sublevel). */
export type LevelDatabase = AbstractLevel<string | Buffer | Uint8Array, unknown, unknown>
type LogDb = AbstractLevel<string | Buffer | Uint8Array, Buffer, Buffer>
type BatchOp = AbstractBatchOperation<LogDb, Buffer, Buffer>
/** classic-level's `sync` write option; abstract-level's types do not declare it, sublevels forward it. */
type WriteOptions = AbstractBatchOptions<Buffer, Buffer> & { sync: boolean }

/**
 * The longest a commit waits to gather the devices the last one acknowledged (see the header): about a device's
 * turnaround over loopback, from the write's completion to its next PUBLISH appended (median 0.3 ms traced under
 * the gateway bench's device load on 2 cores), against a LevelDB sync write of 0.2-0.5 ms on the same machine.
 */
const GATHER_MS = 0.5
const GATHER_BACKOFF = 8
const GATHER_MAX_RECORDS = 64
const SYNC: WriteOptions = { sync: true }
const NO_SYNC: WriteOptions = { sync: false }

/**
 * The options of a `batch()`, with `sync` not enumerable. abstract-level's array `batch()` copies the batch's options
 * into each operation (`{ ...options, ...op }`; its own TODO there says `sync` should not be), and operations that
 * carry one more property are much slower to build, prefix and hand to classic-level's binding: measured here, a
 * 15-operation write took 190 µs of the main thread with `{ sync }` and 52 µs with no options, the largest cost of a
 * small group commit (BENCHMARKS.md, gateway device). A non-enumerable `sync` is left out of the spread, and
 * sublevels hand the same options object on, so classic-level's binding still reads it (a property lookup in
 * `batch_do`). Only for `batch()`: `put()` and `del()` copy their options when they add encodings, which would drop
 * it, so they keep {@link SYNC}. test/store/write-options.test.ts fails if `sync` stops reaching classic-level.
 */
function batchOptions (sync: boolean): WriteOptions {
  return Object.freeze(Object.defineProperty({}, 'sync', { value: sync, enumerable: false })) as WriteOptions
}
const BATCH_SYNC = batchOptions(true)
const BATCH_NO_SYNC = batchOptions(false)
interface BatchWhere { readonly stream: string, readonly partition: number, readonly baseOffset: number }

export interface LogStoreOptions {
  /** A directory for a classic-level database that the store opens and closes. */
  readonly location?: string
  /** Or a database the caller owns (it is opened if needed, never closed). */
  readonly db?: LevelDatabase
  readonly durability?: Durability
  /** Largest record accepted by append (payload + key + topic + client id + headers). Default 1 MiB. */
  readonly maxRecordBytes?: number
  /** Total stored bytes above which retention drops the oldest batches even if a group still needs them. 0 = none. */
  readonly diskBudgetBytes?: number
  readonly clock?: Clock
  readonly logger?: StoreLogger
  readonly observer?: StoreObserver
  /** Dedupe ids older than this are forgotten by retention (ms). Default 7 days. */
  readonly dedupeRetentionMs?: number
  /**
   * Closes and reopens the database after a failed write, before the store
   * writes again (the store does this itself for a database it opened). After
   * a failed write, LevelDB's write-ahead log may end in a torn record, and
   * records appended after it can be lost at the next recovery; reopening
   * starts a fresh log file.
   */
  readonly reopen?: () => Promise<void>
  /**
   * The database is written by someone else (a standby applying a primary's
   * batches): the store only reads, refuses every write with STORE_READ_ONLY,
   * and {@link LogStore.refresh} re-reads what the other writer changed.
   */
  readonly follower?: boolean
  /**
   * Awaited after each group commit is on disk and before its appends and
   * write()s resolve (and its records become readable): a synchronous
   * replica's acknowledgement, so callers are told only once the replica
   * has the commit too. It is told how many records the commit holds (a
   * gate may let a commit of write()s alone through sooner). The writer
   * waits for it before its next commit, so commits stay in order. It must
   * not reject; a rejection is logged and the commit acknowledged.
   */
  readonly commitGate?: (commit: { readonly records: number }) => Promise<void>
}

export const DEFAULT_MAX_RECORD_BYTES = 1024 * 1024


interface StreamState {
  readonly name: string
  readonly id: number
  readonly partitions: PartitionState[]
  retentionMs: number
  retentionBytes: number
}

interface PartitionState {
  readonly stream: StreamState
  readonly partition: number
  logStart: number
  logEnd: number
  bytes: number
  /** Highest batch max timestamp indexed in `T`; -Infinity when none. */
  indexedMaxTs: number
  oldestTs: number | null
  newestTs: number | null
  /** Records waiting for the next group commit, with their callers' resolvers at the same index. */
  pending: PendingRecord[]
  resolvers: Array<(result: AppendResult) => void>
  rejecters: Array<(err: Error) => void>
  /** Dedupe id of the pending record at the same index, if it has one. */
  dedupeIds: Array<string | undefined>
  /** Base offsets of the newest batches, so reads of the tail skip the seek. */
  readonly index: BatchIndex
}

/** A group commit built for one partition: what to resolve once its write is known to be on disk. */
interface CommitPlan {
  readonly part: PartitionState
  readonly appends: PendingRecord[]
  readonly resolvers: PartitionState['resolvers']
  readonly rejecters: PartitionState['rejecters']
  readonly dedupeIds: PartitionState['dedupeIds']
  readonly bases: number[]
  /** The partition's log end before this commit: its first offset. */
  readonly start: number
  readonly end: number
  readonly bytes: number
  readonly indexedMaxTs: number
  readonly firstTs: number
  readonly lastTs: number
}
interface FailedCommit {
  readonly plans: CommitPlan[]
  readonly taken: Array<{ streamId: number, rejecters: PartitionState['rejecters'], dedupeIds: PartitionState['dedupeIds'] }>
  readonly records: number
  readonly bytes: number
  readonly error: StoreError
  readonly startedAt: number
  readonly writeStart: number
  readonly extras: QueuedExtra[]
}
/** Operations outside the log, queued in call order: an append's extraOps (no settle: its record's promise tells), or a write(). */
interface QueuedExtra {
  readonly ops: readonly AppendExtraOperation[]
  /** An append's: its partition and the record's index in the partition's pending records, for a PositionedPut's value. */
  readonly record?: { readonly part: PartitionState, readonly index: number }
  /** False for a write() that may go without an fsync when nothing else in its commit needs one (StoreWriteOptions). */
  readonly durable?: boolean
  readonly settle?: { readonly resolve: () => void, readonly reject: (err: Error) => void }
}
interface StreamMeta { id: number, partitions: number, retentionMs: number, retentionBytes: number }
/** `logEnd` is absent in data written before it was recorded; then the last batch alone says where the log ends. */
interface PartitionMeta { logStart: number, bytes: number, logEnd?: number }
/** A partition's offsets and bytes as its database holds them. */
interface LogBounds { readonly logStart: number, readonly logEnd: number, readonly bytes: number }
/** Reads in one consistent view of the database (an explicit snapshot), or as it is at each read. */
interface ReadView { readonly snapshot?: AbstractSnapshot }
interface GroupState { holdsRetention: boolean, offsets: Map<PartitionState, number> }

/** The innermost cause's message: abstract-level wraps the interesting one (ENOSPC) in its own errors. */
/** A dedupe id as known in one stream (ids are scoped by stream, format.ts). */
interface DedupeState { readonly id: string, readonly part: PartitionState, readonly offset: number, readonly timestamp: number }

/** Resolves the write()s among `extras`, or rejects them with `error`. */
function settleExtras (extras: readonly QueuedExtra[], error?: Error): void {
  for (const extra of extras) {
    if (extra.settle === undefined) continue
    if (error === undefined) extra.settle.resolve()
    else extra.settle.reject(error)
  }
}

const DROPPED_WARNING = 'disk budget forced retention to drop records a consumer group had not consumed'

/**
 * The disk budget's warnings over one pass: the first drop of each partition and group is logged as it happens (a
 * kill later in the pass still leaves a line), the later ones are added up and logged once at the pass's end. Every
 * line's `count` is records no earlier line counted, so summing `count` over the log counts each record once; the
 * end line also carries the pass's total as `passCount` (it once put the total in `count`, which counted the first
 * line's records twice).
 */
class PassWarnings {
  readonly #totals = new Map<string, { first: DroppedRecords, later: number, writes: number }>()

  constructor (readonly logger: StoreLogger) {}

  add (d: DroppedRecords): void {
    const key = `${d.stream}\u0000${d.partition}\u0000${d.group}`
    const seen = this.#totals.get(key)
    if (seen === undefined) {
      this.#totals.set(key, { first: d, later: 0, writes: 1 })
      this.logger.warn({ ...d }, DROPPED_WARNING)
      return
    }
    seen.later += d.count
    seen.writes++
  }

  /** The partitions and groups that lost records in more than one write of the pass: what the first line did not count. */
  end (): void {
    for (const { first, later, writes } of this.#totals.values()) {
      if (writes === 1) continue
      this.logger.warn({ ...first, count: later, passCount: first.count + later, writes },
        `${DROPPED_WARNING} (later in this retention pass: count is what the pass dropped after its first warning, passCount all it dropped)`)
    }
  }
}

const BLOCKED_ERROR = 'retention cannot delete past a damaged batch: this partition keeps every record from `offset` on, the other ' +
  'partitions are still trimmed; stop the gateway and run `edgemq check` (docs/operations.md, "Damaged data")'

/** A retention pass's report, filled in as its writes land. */
interface PassReport { batchesDeleted: number, recordsDeleted: number, bytesDeleted: number, dropped: DroppedRecords[], blocked: RetentionBlocked[] }

/** The in-memory key of a dedupe id: the stream id first, as on disk. */
function scopedId (streamId: number, id: string): string {
  return `${streamId}/${id}`
}

function rootMessage (err: unknown): string {
  let e = err as { message?: string, cause?: unknown } | undefined
  while (e?.cause !== undefined && e.cause !== null && typeof e.cause === 'object') e = e.cause as { message?: string, cause?: unknown }
  return e?.message ?? String(err)
}

const consoleLogger: StoreLogger = {
  warn: (fields, message) => console.warn(JSON.stringify({ level: 'warn', msg: message, ...fields })),
  error: (fields, message) => console.error(JSON.stringify({ level: 'error', msg: message, ...fields })),
}

/** The sublevel of the database given to {@link openLogStore} that holds the log (format.ts). */
const LOG_SUBLEVEL = 'log'

/**
 * For the writer of a follower store's database (a standby) about to empty it for a snapshot: the operation to write
 * atomically with its own "copy incomplete" marker, before anything else is deleted. It deletes the log's version
 * entry, and a follower reads a log without one as a copy being written anew (STORE_LOG_REPLACED, read again), never
 * as damage; the snapshot brings the entry back after every batch, partition and stream entry (key order). Emptying
 * is no atomic write: classic-level's clear() deletes in key order, about 16 KB of keys per write, so for most of it
 * the log's batches are gone while its partition, stream and version entries remain, which reads as offsets missing
 * inside the log.
 */
export function replacingCopyOp (db: LevelDatabase): ExtraOperation {
  return { type: 'del', sublevel: db.sublevel<Buffer, Buffer>(LOG_SUBLEVEL, { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as ExtraSublevel, key: keys.version() }
}

export async function openLogStore (options: LogStoreOptions): Promise<LogStore> {
  let owned: ClassicLevel<Buffer, Buffer> | undefined
  let db: LevelDatabase
  if (options.db !== undefined) {
    db = options.db
  } else if (options.location !== undefined) {
    owned = new ClassicLevel<Buffer, Buffer>(options.location, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    db = owned as unknown as LevelDatabase
  } else {
    throw new StoreError('STORE_INVALID_ARGUMENT', 'openLogStore needs a location or a db')
  }
  try {
    if (db.status !== 'open') await db.open()
    const log = db.sublevel<Buffer, Buffer>(LOG_SUBLEVEL, { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LogDb
    const store = new LevelLogStore(log, options, owned)
    await store.load()
    return store
  } catch (err) {
    if (owned !== undefined) await owned.close().catch(() => {})
    throw err
  }
}

class LevelLogStore implements LogStore {
  readonly #db: LogDb
  readonly #owned: ClassicLevel<Buffer, Buffer> | undefined
  /** For put(); {@link #batchSync} for batch() (see batchOptions). */
  readonly #sync: WriteOptions
  readonly #batchSync: WriteOptions
  readonly #maxRecordBytes: number
  readonly #diskBudgetBytes: number
  readonly #clock: Clock
  readonly #logger: StoreLogger
  readonly #observer: StoreObserver
  readonly #streams = new Map<string, StreamState>()
  readonly #groups = new Map<string, GroupState>()
  /** Retention holds of holders other than groups (holdRetention). */
  readonly #holds = new Set<{ readonly floor: (stream: string, partition: number) => number | undefined, readonly onDropped: RetentionHoldDropped | undefined }>()
  /** Dedupe ids on disk, by {@link scopedId} (ids are per stream), with where their record went. */
  readonly #dedupe = new Map<string, DedupeState>()
  /** Dedupe ids of appends not yet committed, by {@link scopedId}, resolving with their result. */
  readonly #dedupePending = new Map<string, Promise<AppendResult>>()
  readonly #dedupeRetentionMs: number
  readonly #appendListeners = new Set<AppendListener>()
  #nextStreamId = 1

  // Writer state.
  #dirty: PartitionState[] = []
  /** Operations outside the log for the next commit, in call order (AppendOptions.extraOps and write()). */
  #extras: QueuedExtra[] = []
  #pending = 0
  #oldestPendingAt = 0
  #tasks: Array<() => Promise<void>> = []
  #running = false
  #scheduled = false
  /** Records of the last group commit, and how many commits go without a gather (see the header). */
  #lastCommitRecords = 0
  /** Records queued when a gather may end: the last commit's, and those queued while it was written. */
  #gatherWant = 0
  #gatherSkips = 0
  /** Gathers in a row that ran out of time. */
  #gatherMisses = 0
  /** When the last commit holding records was done (performance.now()): a gather follows only a recent one. */
  #recordsDoneAt = 0
  #closing = false
  #closed = false
  /** Set by a failed write: the database is reopened and offsets re-read before the next commit. */
  #needsRecovery = false
  /** The commit whose write failed, settled by {@link #recover} once the reopened database says whether it landed. */
  #unsettled: FailedCommit | undefined
  readonly #reopen: () => Promise<void>
  readonly #follower: boolean
  readonly #commitGate: ((commit: { readonly records: number }) => Promise<void>) | undefined

  constructor (db: LogDb, options: LogStoreOptions, owned: ClassicLevel<Buffer, Buffer> | undefined) {
    this.#db = db
    this.#owned = owned
    this.#sync = (options.durability ?? 'sync') === 'sync' ? SYNC : NO_SYNC
    this.#batchSync = this.#sync.sync ? BATCH_SYNC : BATCH_NO_SYNC
    this.#maxRecordBytes = checkCount(options.maxRecordBytes ?? DEFAULT_MAX_RECORD_BYTES, 'maxRecordBytes', 1, MAX_BATCH_BYTES * 64)
    this.#diskBudgetBytes = checkCount(options.diskBudgetBytes ?? 0, 'diskBudgetBytes', 0, Number.MAX_SAFE_INTEGER)
    this.#clock = options.clock ?? systemClock
    this.#logger = options.logger ?? consoleLogger
    this.#observer = options.observer ?? {}
    this.#reopen = options.reopen ?? (owned === undefined ? async () => {} : async () => { await owned.close(); await owned.open() })
    this.#follower = options.follower === true
    this.#commitGate = options.commitGate
    this.#dedupeRetentionMs = checkCount(options.dedupeRetentionMs ?? 7 * 24 * 3600 * 1000, 'dedupeRetentionMs', 0, Number.MAX_SAFE_INTEGER)
    if (options.durability !== undefined && options.durability !== 'sync' && options.durability !== 'async') {
      throw new StoreError('STORE_INVALID_ARGUMENT', `durability must be "sync" or "async", got ${String(options.durability)}`)
    }
  }

  // ---------------------------------------------------------------- recovery

  /** Finds every partition's offsets with a few seeks each; never scans records. */
  async load (): Promise<void> {
    try {
      await this.#load()
    } catch (err) {
      throw asDamage(err, 'opening the log')
    }
  }

  async #load (): Promise<void> {
    const version = await this.#db.get(keys.version())
    if (version === undefined) {
      // A follower's database is empty until the primary's first batches arrive; they bring the version.
      if (!this.#follower) await this.#db.put(keys.version(), encodeU64(FORMAT_VERSION), SYNC)
    } else if (readU64(version, 0) !== FORMAT_VERSION) {
      throw new StoreError('STORE_FORMAT_VERSION',
        `data was written by log format version ${readU64(version, 0)}; this edgemq reads version ${FORMAT_VERSION}`)
    }
    for (const [key, value] of await this.#db.iterator(keys.streamRange()).all()) {
      const meta = decodeMeta<StreamMeta>(value)
      const stream = this.#newStreamState(keys.streamName(key), meta)
      for (const part of stream.partitions) await this.#recoverPartition(part)
      this.#nextStreamId = Math.max(this.#nextStreamId, meta.id + 1)
    }
    const byId = new Map([...this.#streams.values()].map((s) => [s.id, s]))
    for (const [key, value] of await this.#db.iterator(keys.groupRange()).all()) {
      this.#groups.set(keys.groupName(key), { holdsRetention: decodeMeta<GroupOptions>(value).holdsRetention, offsets: new Map() })
    }
    if (!this.#follower) await this.#scopeLegacyDedupe()
    for (const [key, value] of await this.#db.iterator(dedupe.range()).all()) {
      const entry = dedupe.decode(value)
      const part = byId.get(entry.streamId)?.partitions[entry.partition]
      const { id } = dedupe.parseKey(key)
      if (part !== undefined) this.#dedupe.set(scopedId(part.stream.id, id), { id, part, offset: entry.offset, timestamp: entry.timestamp })
    }
    for (const [key, value] of await this.#db.iterator(keys.offsetRange()).all()) {
      const { group, streamId, partition } = keys.parseOffset(key)
      const part = byId.get(streamId)?.partitions[partition]
      if (part === undefined) continue
      this.#groupState(group).offsets.set(part, readU64(value, 0))
    }
  }

  /** Moves unscoped dedupe ids (format.ts, `D`) under the stream their record went to, in one atomic batch. */
  async #scopeLegacyDedupe (): Promise<void> {
    const legacy = await this.#db.iterator(dedupe.legacyRange()).all()
    if (legacy.length === 0) return
    await this.#db.batch(legacy.flatMap(([key, value]) => [
      { type: 'put' as const, key: dedupe.key(dedupe.decode(value).streamId, dedupe.legacyId(key)), value },
      { type: 'del' as const, key },
    ]), BATCH_SYNC)
  }

  async #recoverPartition (part: PartitionState): Promise<void> {
    try {
      await this.#recoverPartitionOf(part)
    } catch (err) {
      throw asDamage(err, `opening ${part.stream.name}[${part.partition}]`, { stream: part.stream.name, partition: part.partition })
    }
  }

  async #recoverPartitionOf (part: PartitionState): Promise<void> {
    const { id } = part.stream
    const meta = await this.#db.get(keys.partition(id, part.partition))
    let recordedEnd: number | undefined
    if (meta !== undefined) {
      const m = decodeMeta<PartitionMeta>(meta)
      part.logStart = m.logStart
      part.bytes = m.bytes
      recordedEnd = m.logEnd
    }
    part.logEnd = part.logStart
    part.index.clear()
    const range = keys.batchRange(id, part.partition)
    const [last] = await this.#db.iterator({ ...range, reverse: true, limit: 1 }).all()
    if (last !== undefined) {
      const header = this.#header(part, last[0], last[1])
      part.logEnd = header.baseOffset + header.count
      part.index.push(header.baseOffset)
      part.newestTs = header.maxTimestamp
      const [first] = await this.#db.iterator({ ...range, limit: 1 }).all()
      try {
        if (first !== undefined) part.oldestTs = this.#header(part, first[0], first[1]).firstTimestamp
        // Batches start at the log start (format.ts): a first batch further on means the oldest offsets are gone.
        if (first !== undefined && keys.batchBase(first[0]) > part.logStart) {
          throw missingOffsets(part.stream.name, part.partition, part.logStart, keys.batchBase(first[0]), 'no batch holds them')
        }
      } catch (err) {
        // Only the newest batch is needed to open; a damaged front is reported to its readers and by retention.
        this.#logger.error({ code: (err as StoreError).code, stream: part.stream.name, partition: part.partition }, (err as Error).message)
      }
    }
    // The last batch and `P` are written in one LevelDB batch, so they agree unless the files were damaged (LevelDB skips an unreadable block without a word).
    if (meta === undefined && last !== undefined) {
      throw new StoreError('STORE_DAMAGED', `${part.stream.name}[${part.partition}] has batches but its metadata entry is gone; stop the gateway and run \`edgemq check\``,
        { details: { stream: part.stream.name, partition: part.partition } })
    }
    if (recordedEnd !== undefined && recordedEnd !== part.logEnd) {
      const [from, to] = recordedEnd > part.logEnd ? [part.logEnd, recordedEnd] : [recordedEnd, part.logEnd]
      throw missingOffsets(part.stream.name, part.partition, from, to,
        `its metadata records the log end at ${recordedEnd}, but the last readable batch ends at ${part.logEnd}`)
    }
    const [lastIndexed] = await this.#db.keys({ ...keys.timeRange(id, part.partition), reverse: true, limit: 1 }).all()
    part.indexedMaxTs = lastIndexed === undefined ? -Infinity : keys.timeOf(lastIndexed)
  }

  #header (part: PartitionState, key: Buffer, value: Buffer): BatchHeader {
    return readBatchHeader(value, { stream: part.stream.name, partition: part.partition, baseOffset: keys.batchBase(key) })
  }

  #newStreamState (name: string, meta: StreamMeta): StreamState {
    const stream: StreamState = { name, id: meta.id, partitions: [], retentionMs: meta.retentionMs, retentionBytes: meta.retentionBytes }
    for (let p = 0; p < meta.partitions; p++) {
      stream.partitions.push({
        stream, partition: p, logStart: 0, logEnd: 0, bytes: 0, indexedMaxTs: -Infinity, oldestTs: null, newestTs: null,
        pending: [], resolvers: [], rejecters: [], dedupeIds: [], index: new BatchIndex(),
      })
    }
    this.#streams.set(name, stream)
    return stream
  }

  // ---------------------------------------------------------------- follower

  async refresh (): Promise<void> {
    this.#checkOpen()
    if (!this.#follower) throw new StoreError('STORE_INVALID_ARGUMENT', 'refresh() is for a store opened with follower: true')
    try {
      await this.#refresh()
    } catch (err) {
      throw asDamage(err, 'following the database')
    }
  }

  async #refresh (): Promise<void> {
    const grown: PartitionState[] = []
    for (const [key, value] of await this.#db.iterator(keys.streamRange()).all()) {
      const meta = decodeMeta<StreamMeta>(value)
      const name = keys.streamName(key)
      let stream = this.#streams.get(name)
      // A snapshot from another primary may number the stream differently: then it is another stream.
      if (stream === undefined || stream.id !== meta.id || stream.partitions.length !== meta.partitions) stream = this.#newStreamState(name, meta)
      stream.retentionMs = meta.retentionMs
      stream.retentionBytes = meta.retentionBytes
      this.#nextStreamId = Math.max(this.#nextStreamId, meta.id + 1)
      for (const part of stream.partitions) if (await this.#refreshPartition(part)) grown.push(part)
    }
    const byId = new Map([...this.#streams.values()].map((s) => [s.id, s]))
    const groups = new Map<string, GroupState>()
    for (const [key, value] of await this.#db.iterator(keys.groupRange()).all()) {
      groups.set(keys.groupName(key), { holdsRetention: decodeMeta<GroupOptions>(value).holdsRetention, offsets: new Map() })
    }
    for (const [key, value] of await this.#db.iterator(keys.offsetRange()).all()) {
      const { group, streamId, partition } = keys.parseOffset(key)
      const part = byId.get(streamId)?.partitions[partition]
      if (part === undefined) continue
      let g = groups.get(group)
      if (g === undefined) groups.set(group, g = { holdsRetention: false, offsets: new Map() })
      g.offsets.set(part, readU64(value, 0))
    }
    this.#groups.clear()
    for (const [name, g] of groups) this.#groups.set(name, g)
    for (const part of grown) this.#notifyAppend(part)
  }

  /** Re-reads one partition into a copy, then swaps its state in at once; true when its log grew. */
  async #refreshPartition (part: PartitionState): Promise<boolean> {
    const meta = await this.#db.get(keys.partition(part.stream.id, part.partition))
    if (meta === undefined && part.logEnd === 0) return false
    if (meta !== undefined) {
      const m = decodeMeta<PartitionMeta>(meta)
      if (m.logStart === part.logStart && m.bytes === part.bytes && m.logEnd === part.logEnd) return false
    }
    const copy: PartitionState = { ...part, index: new BatchIndex() }
    await this.#recoverPartition(copy)
    const grew = copy.logEnd > part.logEnd
    part.logStart = copy.logStart
    part.logEnd = copy.logEnd
    part.bytes = copy.bytes
    part.indexedMaxTs = copy.indexedMaxTs
    part.oldestTs = copy.oldestTs
    part.newestTs = copy.newestTs
    part.index.clear()
    const last = copy.index.lookup(copy.logEnd - 1, 1, copy.logEnd)?.[0]
    if (last !== undefined) part.index.push(last)
    return grew
  }

  // ---------------------------------------------------------------- streams

  async createStream (name: string, options: StreamOptions): Promise<StreamInfo> {
    this.#checkWritable()
    checkStreamName(name)
    if (options === null || typeof options !== 'object') throw new StoreError('STORE_INVALID_ARGUMENT', 'stream options must be an object')
    const partitions = checkCount(options.partitions, 'partitions', 1, MAX_PARTITIONS)
    const retentionMs = checkCount(options.retentionMs ?? 0, 'retentionMs', 0, Number.MAX_SAFE_INTEGER)
    const retentionBytes = checkCount(options.retentionBytes ?? 0, 'retentionBytes', 0, Number.MAX_SAFE_INTEGER)
    const existing = this.#streams.get(name)
    if (existing !== undefined && existing.partitions.length !== partitions) {
      throw new StoreError('STORE_STREAM_CONFLICT',
        `stream ${name} has ${existing.partitions.length} partitions; it cannot be re-created with ${partitions}`,
        { details: { stream: name } })
    }
    const meta: StreamMeta = { id: existing?.id ?? this.#nextStreamId++, partitions, retentionMs, retentionBytes }
    await this.#db.put(keys.stream(name), encodeMeta(meta), SYNC)
    if (existing === undefined) {
      this.#newStreamState(name, meta)
    } else {
      existing.retentionMs = retentionMs
      existing.retentionBytes = retentionBytes
    }
    return this.streamInfo(name)
  }

  listStreams (): StreamInfo[] {
    return [...this.#streams.keys()].sort().map((name) => this.streamInfo(name))
  }

  streamInfo (name: string): StreamInfo {
    const s = this.#stream(name)
    return { name: s.name, partitions: s.partitions.length, retentionMs: s.retentionMs, retentionBytes: s.retentionBytes }
  }

  partitionInfo (stream: string, partition: number): PartitionInfo {
    const p = this.#partition(stream, partition)
    return {
      stream: p.stream.name,
      partition: p.partition,
      logStartOffset: p.logStart,
      logEndOffset: p.logEnd,
      bytes: p.bytes,
      oldestTimestamp: p.logEnd > p.logStart ? p.oldestTs : null,
      newestTimestamp: p.logEnd > p.logStart ? p.newestTs : null,
    }
  }

  partitionFor (stream: string, key: string): number {
    return partitionForKey(key, this.#stream(stream).partitions.length)
  }

  get pendingAppends (): number { return this.#pending }

  get totalBytes (): number {
    let total = 0
    for (const s of this.#streams.values()) for (const p of s.partitions) total += p.bytes
    return total
  }

  #stream (name: string): StreamState {
    const s = this.#streams.get(name)
    if (s === undefined) {
      checkStreamName(name)
      throw new StoreError('STORE_UNKNOWN_STREAM', `unknown stream ${name}`, { details: { stream: name } })
    }
    return s
  }

  #partition (stream: string, partition: number): PartitionState {
    const s = this.#stream(stream)
    const p = Number.isInteger(partition) ? s.partitions[partition] : undefined
    if (p === undefined) {
      throw new StoreError('STORE_INVALID_PARTITION',
        `stream ${stream} has partitions 0..${s.partitions.length - 1}, got ${String(partition)}`, { details: { stream } })
    }
    return p
  }

  #checkOpen (): void {
    if (this.#closing) throw new StoreError('STORE_CLOSED', 'the store is closed')
  }

  /** #checkOpen, and not a follower (whose database another writer owns). */
  #checkWritable (): void {
    this.#checkOpen()
    if (this.#follower) throw new StoreError('STORE_READ_ONLY', 'this store follows a database another writer owns (a standby): it takes no writes')
  }

  // ---------------------------------------------------------------- appends

  append (stream: string, key: string, record: RecordInput, options?: AppendOptions): Promise<AppendResult> {
    let part: PartitionState
    let pending: PendingRecord
    const dedupeId = options?.dedupeId
    const extraOps = options?.extraOps
    try {
      this.#checkWritable()
      const s = this.#stream(stream)
      pending = toPendingRecord(key, record, this.#clock.now(), this.#maxRecordBytes)
      if (extraOps !== undefined) this.#checkExtraOps(extraOps)
      part = s.partitions[partitionForKey(key, s.partitions.length)] as PartitionState
      if (dedupeId !== undefined) {
        if (typeof dedupeId !== 'string' || dedupeId.length === 0 || dedupeId.length > 1024) {
          throw new StoreError('STORE_INVALID_ARGUMENT', 'dedupeId must be a string of 1 to 1024 characters')
        }
        const seen = this.#dedupe.get(scopedId(s.id, dedupeId))
        if (seen !== undefined) return Promise.resolve({ partition: seen.part.partition, offset: seen.offset, duplicate: true })
        const inFlight = this.#dedupePending.get(scopedId(s.id, dedupeId))
        if (inFlight !== undefined) return inFlight.then((r) => ({ partition: r.partition, offset: r.offset, duplicate: true }))
      }
    } catch (err) {
      return Promise.reject(err)
    }
    const result = new Promise<AppendResult>((resolve, reject) => {
      if (part.pending.length === 0) this.#dirty.push(part)
      part.pending.push(pending)
      part.resolvers.push(resolve)
      part.rejecters.push(reject)
      part.dedupeIds.push(dedupeId)
      if (extraOps !== undefined) this.#extras.push({ ops: extraOps, record: { part, index: part.pending.length - 1 } })
      if (this.#pending++ === 0) this.#oldestPendingAt = performance.now()
      this.#kick()
    })
    if (dedupeId !== undefined) this.#dedupePending.set(scopedId(part.stream.id, dedupeId), result)
    return result
  }

  write (ops: readonly ExtraOperation[], options?: StoreWriteOptions): Promise<void> {
    try {
      this.#checkWritable()
      this.#checkExtraOps(ops)
    } catch (err) {
      return Promise.reject(err)
    }
    if (ops.length === 0) return Promise.resolve()
    return new Promise<void>((resolve, reject) => {
      this.#extras.push({ ops, durable: options?.durable !== false, settle: { resolve, reject } })
      this.#kick()
    })
  }

  /** AppendOptions.extraOps must name sublevels of this store's database outside the log's key space. */
  #checkExtraOps (ops: readonly AppendExtraOperation[]): void {
    if (!Array.isArray(ops)) throw new StoreError('STORE_INVALID_ARGUMENT', 'extraOps must be an array')
    const log = this.#db as unknown as { db: unknown, prefix: string }
    for (const op of ops) {
      const sub = op?.sublevel as { db?: unknown, prefix?: unknown, parent?: unknown } | undefined
      const ok = (op?.type === 'put' || op?.type === 'del') && sub !== undefined && sub !== null && sub.parent != null &&
        sub.db === log.db && typeof sub.prefix === 'string' && !sub.prefix.startsWith(log.prefix) && !log.prefix.startsWith(sub.prefix)
      if (!ok) throw new StoreError('STORE_INVALID_ARGUMENT', 'extraOps must be put/del operations on a sublevel of the store\'s database outside the log')
    }
  }

  onAppend (listener: AppendListener): () => void {
    if (typeof listener !== 'function') throw new StoreError('STORE_INVALID_ARGUMENT', 'onAppend needs a function')
    // A wrapper, so that adding the same function twice gives two independent registrations.
    const entry: AppendListener = (event) => listener(event)
    this.#appendListeners.add(entry)
    return () => { this.#appendListeners.delete(entry) }
  }

  #notifyAppend (part: PartitionState): void {
    const event = { stream: part.stream.name, partition: part.partition, logEndOffset: part.logEnd }
    for (const listener of this.#appendListeners) {
      try {
        listener(event)
      } catch (err) {
        this.#logger.error({ err: String(err), stream: event.stream, partition: event.partition }, 'append listener threw')
      }
    }
  }

  async forgetDedupe (dedupeId: string): Promise<void> {
    this.#checkWritable()
    const scoped = [...this.#streams.values()].map((s) => scopedId(s.id, dedupeId)).filter((key) => this.#dedupe.has(key))
    await this.#forgetScoped(scoped)
  }

  async forgetDedupePrefix (prefix: string): Promise<void> {
    this.#checkWritable()
    await this.#forgetScoped([...this.#dedupe].filter(([, e]) => e.id.startsWith(prefix)).map(([key]) => key))
  }

  async #forgetScoped (scoped: readonly string[]): Promise<void> {
    if (scoped.length === 0) return
    const entries = scoped.map((key) => this.#dedupe.get(key) as DedupeState)
    await this.#db.batch(entries.map((e) => ({ type: 'del' as const, key: dedupe.key(e.part.stream.id, e.id) })), this.#batchSync)
    for (const key of scoped) this.#dedupe.delete(key)
  }

  /**
   * Waits until every device the last commit acknowledged has sent again ({@link #gatherWant} records queued), a task
   * is queued, or {@link GATHER_MS} passed (see the header), checking once per turn of the event loop, after its I/O.
   */
  #gather (): Promise<void> {
    if (!this.#sync.sync) return Promise.resolve()
    if (this.#gatherSkips > 0) { this.#gatherSkips--; return Promise.resolve() }
    const want = this.#gatherWant
    const until = performance.now() + GATHER_MS
    return new Promise((resolve) => {
      const turn = (): void => {
        if (this.#pending >= want || this.#tasks.length > 0 || this.#closing) {
          this.#gatherMisses = 0
          return resolve()
        }
        if (performance.now() < until) return void setImmediate(turn)
        if (++this.#gatherMisses >= 2) {
          this.#gatherSkips = GATHER_BACKOFF
          this.#gatherMisses = 0
        }
        resolve()
      }
      setImmediate(turn)
    })
  }

  #kick (): void {
    if (this.#running || this.#scheduled) return
    this.#scheduled = true
    queueMicrotask(() => { void this.#loop() })
  }

  /** The single writer: alternates group commits and exclusive tasks until both queues are empty. */
  async #loop (): Promise<void> {
    this.#scheduled = false
    if (this.#running) return
    this.#running = true
    try {
      while (this.#dirty.length > 0 || this.#extras.length > 0 || this.#tasks.length > 0 || this.#unsettled !== undefined) {
        if (this.#needsRecovery) await this.#recover()
        if (this.#dirty.length > 0 || this.#extras.length > 0) {
          if (this.#pending > 0 && this.#pending < this.#gatherWant && this.#lastCommitRecords <= GATHER_MAX_RECORDS &&
            performance.now() - this.#recordsDoneAt <= GATHER_MS) await this.#gather()
          await this.#commit().catch((err: unknown) => this.#logger.error({ err: String(err) }, 'group commit crashed'))
        }
        // A task (a retention pass) writes partition metadata from memory: not before a failed commit is re-read.
        if (this.#needsRecovery) await this.#recover()
        const task = this.#tasks.shift()
        if (task !== undefined) await task()
      }
    } finally {
      this.#running = false
    }
  }

  /**
   * After a failed write: reopen the database (fresh write-ahead log) and
   * re-read every partition's offsets, since the failed batch may or may not
   * have reached the disk. Retried with backoff while it fails (the disk is
   * still full); appends wait meanwhile, so nothing is acknowledged on a
   * write-ahead log that may be torn.
   *
   * The failed commit's appends are settled only then, by what the reopened
   * database holds: LevelDB reports a failed write whose record may still
   * show up at the next open (a failed fsync of a complete write-ahead log
   * record, leveldb db_impl.cc). Rejecting those appends at once made callers
   * retry records that were in the log, and their dedupe ids and extraOps
   * (the gateway's QoS 2 entries) with them: a second copy.
   */
  async #recover (): Promise<void> {
    for (let delay = 100; this.#needsRecovery; delay = Math.min(delay * 2, 5000)) {
      try {
        await this.#reopen()
        // A sublevel does not reopen with its parent.
        if (this.#db.status !== 'open') await this.#db.open()
        for (const stream of this.#streams.values()) for (const part of stream.partitions) await this.#recoverPartition(part)
        this.#needsRecovery = false
        this.#logger.warn({}, 'database reopened after a failed write; appends continue')
        this.#settleFailed(true)
      } catch (err) {
        this.#logger.error({ err: rootMessage(err) }, `database reopen failed; retrying in ${delay} ms`)
        if (this.#closing) { this.#settleFailed(false); return }
        await new Promise((resolve) => setTimeout(resolve, delay))
      }
    }
  }

  /**
   * Settles the failed commit: acknowledged when the re-read log ends where
   * it would have (a LevelDB write batch lands whole or not at all, so one
   * partition tells for all), rejected with its error otherwise or when the
   * database could not be re-read (`known` false: the store is closing).
   */
  #settleFailed (known: boolean): void {
    const failed = this.#unsettled
    if (failed === undefined) return
    this.#unsettled = undefined
    // A batch without records leaves nothing to tell by: its writes are failed.
    const landed = known && failed.plans.length > 0 && failed.plans.every((plan) => plan.part.logEnd === plan.end)
    settleExtras(failed.extras, landed ? undefined : failed.error)
    if (!landed) {
      if (failed.taken.length > 0) this.#failAppends(failed.taken, failed.error, false)
      return
    }
    this.#logger.warn({ records: failed.records }, 'the failed group commit is on disk after the reopen; its appends are acknowledged')
    // #recoverPartition has re-read each partition's offsets, bytes and index from disk.
    this.#acknowledge(failed.plans, failed.records, failed.bytes, failed.startedAt, failed.writeStart, false)
  }

  /** Runs `fn` on the writer loop, between group commits. */
  #exclusive<T> (fn: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.#tasks.push(() => fn().then(resolve, reject))
      this.#kick()
    })
  }

  async #commit (): Promise<void> {
    const parts = this.#dirty
    this.#dirty = []
    const extras = this.#extras
    this.#extras = []
    const startedAt = this.#oldestPendingAt
    const ops: BatchOp[] = []
    const plans: CommitPlan[] = []
    let records = 0
    let bytes = 0
    const taken: Array<{ streamId: number, rejecters: PartitionState['rejecters'], dedupeIds: PartitionState['dedupeIds'] }> = []
    try {
      for (const part of parts) {
        const appends = part.pending
        const { resolvers, rejecters, dedupeIds } = part
        taken.push({ streamId: part.stream.id, rejecters, dedupeIds })
        part.pending = []
        part.resolvers = []
        part.rejecters = []
        part.dedupeIds = []
        const { id } = part.stream
        const bases: number[] = []
        let base = part.logEnd
        let partBytes = part.bytes
        let indexedMaxTs = part.indexedMaxTs
        let firstTs = Infinity
        let lastTs = -Infinity
        for (let i = 0; i < appends.length;) {
          // Cut the queue into batches of at most MAX_BATCH_RECORDS / about MAX_BATCH_BYTES.
          let j = i
          let size = 0
          while (j < appends.length && j - i < MAX_BATCH_RECORDS && (j === i || size < MAX_BATCH_BYTES)) {
            size += (appends[j] as PendingRecord).payload.byteLength + 64
            j++
          }
          const { value, header } = encodeBatch(base, appends, i, j)
          bases.push(base)
          ops.push({ type: 'put', key: keys.batch(id, part.partition, base), value })
          if (header.maxTimestamp > indexedMaxTs) {
            ops.push({ type: 'put', key: keys.time(id, part.partition, header.maxTimestamp), value: encodeU64(base) })
            indexedMaxTs = header.maxTimestamp
          }
          for (let k = i; k < j; k++) {
            const id = dedupeIds[k]
            if (id !== undefined) {
              const value = dedupe.encode({ streamId: part.stream.id, partition: part.partition, offset: base + (k - i), timestamp: (appends[k] as PendingRecord).timestamp })
              ops.push({ type: 'put', key: dedupe.key(part.stream.id, id), value })
            }
          }
          if (firstTs === Infinity) firstTs = header.firstTimestamp
          lastTs = Math.max(lastTs, header.maxTimestamp)
          partBytes += header.bytes
          bytes += header.bytes
          base += header.count
          i = j
        }
        ops.push({ type: 'put', key: keys.partition(id, part.partition), value: encodeMeta({ logStart: part.logStart, bytes: partBytes, logEnd: base } satisfies PartitionMeta) })
        plans.push({ part, appends, resolvers, rejecters, dedupeIds, bases, start: part.logEnd, end: base, bytes: partBytes, indexedMaxTs, firstTs, lastTs })
        records += appends.length
      }
      // After every record of the batch, in call order (AppendOptions.extraOps, write()).
      // A PositionedPut's record is in this commit (its partition's pending records were all taken above), at the
      // partition's log end before this commit plus its index.
      for (const extra of extras) {
        for (const op of extra.ops) {
          if (op.type !== 'put' || typeof op.value !== 'function') { ops.push(op as unknown as BatchOp); continue }
          const at = extra.record as NonNullable<QueuedExtra['record']>
          const position = { stream: at.part.stream.name, partition: at.part.partition, offset: at.part.logEnd + at.index }
          ops.push({ ...op, value: op.value(position) } as unknown as BatchOp)
        }
      }
    } catch (cause) {
      // Building the write failed (a bug, not the disk): whatever was taken from the queues must not hang.
      const error = new StoreError('STORE_WRITE_FAILED', `group commit could not be built: ${rootMessage(cause)}`, { cause })
      settleExtras(extras, error)
      if (taken.length > 0) this.#failAppends(taken, error)
      return
    }
    const writeStart = performance.now()
    // Appends queued while this write is in flight start the next commit's latency clock.
    this.#oldestPendingAt = writeStart
    try {
      // A commit of writes that need no fsync alone (StoreWriteOptions.durable) is written without one.
      await this.#db.batch(ops, records > 0 || extras.some((e) => e.durable !== false) ? this.#batchSync : BATCH_NO_SYNC)
    } catch (cause) {
      // Settled by #recover, which the writer loop runs next (see there).
      this.#needsRecovery = true
      const error = new StoreError('STORE_WRITE_FAILED', `group commit of ${records} records failed: ${rootMessage(cause)}`, { cause })
      this.#unsettled = { plans, taken, records, bytes, error, startedAt, writeStart, extras }
      this.#logger.error({ code: error.code, records, cause: rootMessage(cause) }, 'group commit failed; its appends wait for the database to reopen')
      this.#observer.onWriteError?.(error)
      return
    }
    if (this.#commitGate !== undefined) {
      await this.#commitGate({ records }).catch((err: unknown) => this.#logger.error({ err: rootMessage(err) }, 'commit gate failed; the commit is acknowledged'))
    }
    this.#acknowledge(plans, records, bytes, startedAt, writeStart, true)
    settleExtras(extras)
  }

  /** Resolves the appends of a commit that is on disk; `advance`: move the partitions' in-memory state past it (not when it was re-read from disk). */
  #acknowledge (plans: CommitPlan[], records: number, bytes: number, startedAt: number, writeStart: number, advance: boolean): void {
    const done = performance.now()
    this.#pending -= records
    for (const plan of plans) {
      const { part, resolvers, dedupeIds } = plan
      const first = plan.start
      if (advance) {
        if (part.logEnd === part.logStart) part.oldestTs = plan.firstTs
        part.logEnd = plan.end
        for (const b of plan.bases) part.index.push(b)
        part.bytes = plan.bytes
        part.indexedMaxTs = plan.indexedMaxTs
        part.newestTs = Math.max(part.newestTs ?? -Infinity, plan.lastTs)
      }
      const partition = part.partition
      for (let i = 0; i < dedupeIds.length; i++) {
        const id = dedupeIds[i]
        if (id === undefined) continue
        const scoped = scopedId(part.stream.id, id)
        this.#dedupe.set(scoped, { id, part, offset: first + i, timestamp: (plan.appends[i] as PendingRecord).timestamp })
        this.#dedupePending.delete(scoped)
      }
      for (let i = 0; i < resolvers.length; i++) (resolvers[i] as (result: AppendResult) => void)({ partition, offset: first + i })
    }
    if (this.#appendListeners.size > 0) for (const plan of plans) this.#notifyAppend(plan.part)
    // A commit of write()s alone is not a log commit: the commit metrics count records.
    if (records > 0) {
      this.#lastCommitRecords = records
      // What this.#pending holds now was queued while the commit was written.
      this.#gatherWant = records + this.#pending
      this.#recordsDoneAt = performance.now()
    }
    if (records > 0) this.#observer.onCommit?.({ records, bytes, latencyMs: done - startedAt, durationMs: done - writeStart })
  }

  /** Rejects the appends of a commit that is not on disk; `report`: log it and tell the observer (not yet done for this failure). */
  #failAppends (taken: FailedCommit['taken'], err: StoreError, report = true): void {
    let count = 0
    for (const { streamId, rejecters, dedupeIds } of taken) {
      for (const id of dedupeIds) if (id !== undefined) this.#dedupePending.delete(scopedId(streamId, id))
      for (const reject of rejecters) reject(err)
      count += rejecters.length
    }
    this.#pending -= count
    this.#logger.error({ code: err.code, records: count, cause: rootMessage(err.cause) }, 'group commit failed; its appends were rejected')
    if (report) this.#observer.onWriteError?.(err)
  }

  // ---------------------------------------------------------------- reads

  /** What {@link read} and {@link readColumns} check first: an open store, the partition, the offset in range, the limits. */
  #readLimits (stream: string, partition: number, fromOffset: number, options: ReadOptions): { part: PartitionState, maxRecords: number, maxBytes: number, end: number } {
    this.#checkOpen()
    const part = this.#partition(stream, partition)
    checkOffset(fromOffset, 'fromOffset')
    const maxRecords = checkCount(options.maxRecords ?? 1000, 'maxRecords', 1, 1_000_000)
    const maxBytes = checkCount(options.maxBytes ?? 1024 * 1024, 'maxBytes', 1, 256 * 1024 * 1024)
    const end = part.logEnd
    this.#checkInRange(part, fromOffset)
    return { part, maxRecords, maxBytes, end }
  }

  async read (stream: string, partition: number, fromOffset: number, options: ReadOptions = {}): Promise<ReadResult> {
    const { part, maxRecords, maxBytes, end } = this.#readLimits(stream, partition, fromOffset, options)
    const records: StoredRecord[] = []
    let bytes = 0
    let logEnd = part.logEnd
    if (fromOffset < end) {
      logEnd = await this.#scan(part, fromOffset, end, (batch) => {
        for (let i = Math.max(0, fromOffset - batch[0]!.offset); i < batch.length; i++) {
          const r = batch[i] as StoredRecord
          if (records.length >= maxRecords || (records.length > 0 && bytes + r.payload.byteLength > maxBytes)) return false
          records.push(r)
          bytes += r.payload.byteLength
        }
        return true
      }, () => records.length < maxRecords && bytes < maxBytes, maxRecords) ?? part.logEnd
    }
    const nextOffset = records.length > 0 ? (records[records.length - 1] as StoredRecord).offset + 1 : fromOffset
    return { records, nextOffset, logStartOffset: part.logStart, logEndOffset: logEnd }
  }

  /** The records {@link read} returns, as columns (the limits are read's, to the record). */
  async readColumns (stream: string, partition: number, fromOffset: number, options: ReadOptions = {}): Promise<ColumnReadResult> {
    const { part, maxRecords, maxBytes, end } = this.#readLimits(stream, partition, fromOffset, options)
    const batches: RecordColumns[] = []
    let records = 0
    let bytes = 0
    let nextOffset = fromOffset
    let logEnd = part.logEnd
    if (fromOffset < end) {
      logEnd = await this.#scanValues(part, fromOffset, end, (value, header, where) => {
        const columns = decodeColumns(value, header, where)
        const first = Math.max(0, fromOffset - header.baseOffset)
        const last = columns.count - 1
        const rest = columns.payloadStart(last) + columns.payloadLength(last) - columns.payloadStart(first)
        let i = first
        if (records + columns.count - first <= maxRecords && bytes + rest <= maxBytes) {
          // The rest of the batch fits (the usual case): no look at each record.
          records += columns.count - first
          bytes += rest
          i = columns.count
        }
        // At least one record, as Kafka does; then whole records within both limits.
        for (; i < columns.count && records < maxRecords; i++) {
          const length = columns.payloadLength(i)
          if (records > 0 && bytes + length > maxBytes) break
          records++
          bytes += length
        }
        if (i > first) {
          batches.push(columns.range(first, i))
          nextOffset = header.baseOffset + i
        }
        return i === columns.count
      }, () => records < maxRecords && bytes < maxBytes, maxRecords) ?? part.logEnd
    }
    return { batches, nextOffset, logStartOffset: part.logStart, logEndOffset: logEnd }
  }

  #checkInRange (part: PartitionState, offset: number): void {
    if (offset < part.logStart || offset > part.logEnd) {
      throw new StoreError('STORE_OFFSET_OUT_OF_RANGE',
        `offset ${offset} is out of range for ${part.stream.name}[${part.partition}]: the log holds offsets ${part.logStart} to ${part.logEnd} (log start ${part.logStart}, log end ${part.logEnd})`,
        { details: { stream: part.stream.name, partition: part.partition, offset, logStartOffset: part.logStart, logEndOffset: part.logEnd } })
    }
  }

  async readBatches (stream: string, partition: number, fromOffset: number, options: ReadBatchesOptions = {}): Promise<BatchReadResult> {
    this.#checkOpen()
    const part = this.#partition(stream, partition)
    checkOffset(fromOffset, 'fromOffset')
    const maxBytes = checkCount(options.maxBytes ?? 1024 * 1024, 'maxBytes', 1, 256 * 1024 * 1024)
    let endOffset = Infinity
    if (options.endOffset !== undefined) {
      checkOffset(options.endOffset, 'endOffset')
      endOffset = options.endOffset
    }
    this.#checkInRange(part, fromOffset)
    const end = Math.min(part.logEnd, endOffset)
    const batches: StoredBatch[] = []
    let bytes = 0
    let logEnd = part.logEnd
    if (fromOffset < end) {
      // Records the batches of maxBytes hold, going by the partition's average record size: the tail index fetches that many at once.
      const records = part.logEnd - part.logStart
      const perRecord = records > 0 ? Math.max(1, part.bytes / records) : 100
      const expect = Math.max(1, Math.min(65_536, Math.ceil(maxBytes / perRecord)))
      logEnd = await this.#scanValues(part, fromOffset, end, (value, header) => {
        if (batches.length > 0 && bytes + value.length > maxBytes) return false
        batches.push({ baseOffset: header.baseOffset, count: header.count, firstTimestamp: header.firstTimestamp, maxTimestamp: header.maxTimestamp, bytes: value })
        bytes += value.length
        return bytes < maxBytes
      }, () => bytes < maxBytes, expect) ?? part.logEnd
    }
    const last = batches[batches.length - 1]
    return { batches, nextOffset: last === undefined ? fromOffset : last.baseOffset + last.count, logStartOffset: part.logStart, logEndOffset: logEnd }
  }

  /** Like {@link #scanValues}, with each batch's records decoded. */
  async #scan (part: PartitionState, from: number, end: number, onBatch: (records: StoredRecord[]) => boolean,
    wantMore: () => boolean = () => true, expectRecords = MAX_BATCH_RECORDS): Promise<number | undefined> {
    return await this.#scanValues(part, from, end, (value, header, where) => onBatch(decodeBatch(value, header, where)), wantMore, expectRecords)
  }

  /**
   * Calls `onBatch` with each stored batch value (its header checked: magic,
   * CRC, base offset) from the one holding `from` up to `end`, while
   * `wantMore()` holds and `onBatch` returns true; a batch that will not be
   * used is neither read nor checked. Seeks backwards (keys only) for the
   * batch holding `from`, then iterates forwards one batch per call.
   * Returns the log end the scan stopped at when a follower's log turned out
   * to end before `end` (rewound by its writer, {@link #explainGap}); undefined
   * otherwise.
   */
  async #scanValues (part: PartitionState, from: number, end: number, onBatch: (value: Buffer, header: BatchHeader, where: BatchWhere) => boolean,
    wantMore: () => boolean = () => true, expectRecords = MAX_BATCH_RECORDS): Promise<number | undefined> {
    try {
      return await this.#scanValuesOf(part, from, end, onBatch, wantMore, expectRecords)
    } catch (err) {
      throw asDamage(err, `reading ${part.stream.name}[${part.partition}] from offset ${from}`, { stream: part.stream.name, partition: part.partition })
    }
  }

  async #scanValuesOf (part: PartitionState, start: number, end: number, onBatch: (value: Buffer, header: BatchHeader, where: BatchWhere) => boolean,
    wantMore: () => boolean, expectRecords: number): Promise<number | undefined> {
    const { id } = part.stream
    let from = start
    // Fast path: the batches holding [from, from + expectRecords) are in the tail index, fetch them in one call.
    const bases = part.index.lookup(from, expectRecords, end)
    if (bases !== null) {
      const values = await this.#db.getMany(bases.map((b) => keys.batch(id, part.partition, b)))
      let expected = from
      for (let i = 0; i < bases.length; i++) {
        const value = values[i]
        if (value === undefined) break // deleted by retention meanwhile: the seek below reports it
        if (!wantMore()) return
        const where = { stream: part.stream.name, partition: part.partition, baseOffset: bases[i] as number }
        const header = readBatchHeader(value, where)
        if (header.baseOffset > expected) break
        expected = header.baseOffset + header.count
        if (!onBatch(value, header, where)) return
      }
      if (expected >= end || !wantMore()) return
      from = expected
    }
    const range = keys.batchRange(id, part.partition)
    const [containing] = await this.#db.keys({ gte: range.gte, lte: keys.batch(id, part.partition, from), reverse: true, limit: 1 }).all()
    const iterator = this.#db.iterator({ gte: containing ?? keys.batch(id, part.partition, from), lt: keys.batch(id, part.partition, end) })
    try {
      let entries = await iterator.nextv(1)
      let expected = from
      while (entries.length > 0) {
        for (const [key, value] of entries) {
          if (!wantMore()) return
          const where = { stream: part.stream.name, partition: part.partition, baseOffset: keys.batchBase(key) }
          const header = readBatchHeader(value, where)
          if (header.baseOffset + header.count <= from) continue
          if (header.baseOffset > expected) await this.#explainGap(part, start, expected, header.baseOffset, false)
          expected = header.baseOffset + header.count
          if (!onBatch(value, header, where)) return
        }
        // One batch per call, and only while the reader wants more: each can be a megabyte.
        if (!wantMore()) return
        entries = await iterator.nextv(1)
      }
      if (expected < end) return await this.#explainGap(part, start, expected, end, true)
    } finally {
      await iterator.close()
    }
  }

  /**
   * Explains the batches a read from `start` found missing between `from`
   * and `to` (`atEnd`: no batch follows them before the read's end). Throws
   * STORE_OFFSET_OUT_OF_RANGE when retention deleted them while we read (the
   * partition's metadata on disk, written atomically with the deletion, says
   * where the log starts now), STORE_DAMAGED otherwise: a read never skips
   * offsets silently.
   *
   * But a follower's writer may have rewound its log since the read took its
   * end from the store's state ({@link #followedChange}): then it is no damage,
   * and the read ends at the new log end (returned) when it got that far, the
   * offset is out of range when the read began past it, and otherwise (it read
   * records the log no longer holds, or the copy is half written) it fails with
   * STORE_LOG_REPLACED, which a reader retries.
   */
  async #explainGap (part: PartitionState, start: number, from: number, to: number, atEnd: boolean): Promise<number> {
    const meta = await this.#partitionMeta(part)
    const logStart = Math.max(part.logStart, meta?.logStart ?? 0)
    if (from < logStart) {
      throw new StoreError('STORE_OFFSET_OUT_OF_RANGE', `offset ${from} of ${part.stream.name}[${part.partition}] was deleted by retention while reading; the log now starts at ${logStart}`,
        { details: { stream: part.stream.name, partition: part.partition, offset: from, logStartOffset: logStart, logEndOffset: part.logEnd } })
    }
    const changed = this.#follower ? await this.#followedChange(part, from) : 'same'
    if (changed === 'same') {
      throw missingOffsets(part.stream.name, part.partition, from, to, 'no batch holds them although the log runs from ' +
        `${part.logStart} to ${part.logEnd}`)
    }
    const where = `${part.stream.name}[${part.partition}]`
    if (changed !== 'replaced') {
      if (atEnd && from === changed.logEnd) return changed.logEnd
      if (from === start && from > changed.logEnd) {
        throw new StoreError('STORE_OFFSET_OUT_OF_RANGE',
          `offset ${from} is out of range for ${where}: the log it follows was rewound while reading (a standby's copy replaced by a snapshot) and now ends at ${changed.logEnd}`,
          { details: { stream: part.stream.name, partition: part.partition, offset: from, logStartOffset: changed.logStart, logEndOffset: changed.logEnd } })
      }
    }
    throw new StoreError('STORE_LOG_REPLACED',
      `${where} was replaced by the writer this store follows while reading from offset ${start} (a standby's copy replaced by a snapshot from its primary); ` +
      'nothing is damaged: read again', { details: { stream: part.stream.name, partition: part.partition, offset: start } })
  }

  async #partitionMeta (part: PartitionState, view: ReadView = {}): Promise<PartitionMeta | undefined> {
    const meta = await this.#db.get(keys.partition(part.stream.id, part.partition), view)
    return meta === undefined ? undefined : decodeMeta<PartitionMeta>(meta)
  }

  /**
   * For a follower whose read found `from` missing: whether the log changed under the read, as the database says now,
   * in one consistent view (an explicit snapshot: its writer goes on applying meanwhile). 'same': the offsets are
   * missing from the log as it stands (damage). 'replaced': the copy is being written anew (its version entry is
   * gone: the standby deletes it before it empties its database for a snapshot, {@link replacingCopyOp}, and the
   * snapshot writes it after every batch, partition and stream entry), or the stream is another now. Else the log as
   * it stands: ending at or before `from` (rewound), starting after it (retention), or holding `from` after all (the
   * read saw an older copy).
   *
   * One view rather than two looks compared: a writer's applies never open a gap inside the log (a batch and its
   * partition entry are one write; retention deletes from the start), only a replacement does, and that is marked by
   * the version entry. Two looks that had to agree called real damage on a busy partition a replaced copy (every
   * apply between them moved the log's end): "read again" to an operator whose data is damaged.
   */
  async #followedChange (part: PartitionState, from: number): Promise<'same' | 'replaced' | LogBounds> {
    const snapshot = this.#db.supports.explicitSnapshots ? this.#db.snapshot() : undefined
    try {
      const view: ReadView = snapshot === undefined ? {} : { snapshot }
      if (await this.#copyReplaced(part, view)) return 'replaced'
      const bounds = await this.#boundsOnDisk(part, view)
      if (bounds === undefined) return 'same'
      if (from >= bounds.logEnd || from < bounds.logStart) return bounds
      const range = keys.batchRange(part.stream.id, part.partition)
      const [holder] = await this.#db.iterator({ gte: range.gte, lte: keys.batch(part.stream.id, part.partition, from), reverse: true, limit: 1, ...view }).all()
      const header = holder === undefined ? undefined : this.#header(part, holder[0], holder[1])
      if (header !== undefined && header.baseOffset + header.count > from) return bounds
      // A database without explicit snapshots: the looks above are not one view, so a replacement that began among them
      // shows only now (its version entry gone).
      if (snapshot === undefined && await this.#copyReplaced(part, view)) return 'replaced'
      return 'same'
    } finally {
      await snapshot?.close()
    }
  }

  /** Whether a follower's copy is being written anew (no version entry), or its stream is another now. */
  async #copyReplaced (part: PartitionState, view: ReadView): Promise<boolean> {
    if (await this.#db.get(keys.version(), view) === undefined) return true
    const stream = await this.#db.get(keys.stream(part.stream.name), view)
    const meta = stream === undefined ? undefined : decodeMeta<StreamMeta>(stream)
    return meta === undefined || meta.id !== part.stream.id || meta.partitions !== part.stream.partitions.length
  }

  /**
   * Where the partition's log starts and ends as its database says now: its metadata, or its newest batch in data
   * written before the metadata recorded the end; a partition never written holds nothing. Undefined when batches are
   * there without metadata (damage, as at open).
   */
  async #boundsOnDisk (part: PartitionState, view: ReadView): Promise<LogBounds | undefined> {
    const meta = await this.#partitionMeta(part, view)
    if (meta?.logEnd !== undefined) return { logStart: meta.logStart, logEnd: meta.logEnd, bytes: meta.bytes }
    const [last] = await this.#db.iterator({ ...keys.batchRange(part.stream.id, part.partition), reverse: true, limit: 1, ...view }).all()
    if (last === undefined) return meta === undefined ? { logStart: 0, logEnd: 0, bytes: 0 } : { logStart: meta.logStart, logEnd: meta.logStart, bytes: meta.bytes }
    if (meta === undefined) return undefined
    const header = this.#header(part, last[0], last[1])
    return { logStart: meta.logStart, logEnd: header.baseOffset + header.count, bytes: meta.bytes }
  }

  async offsetForTime (stream: string, partition: number, timestamp: number): Promise<number | null> {
    this.#checkOpen()
    const part = this.#partition(stream, partition)
    checkTimestamp(timestamp)
    const { id } = part.stream
    const [hit] = await this.#db.iterator({ gte: keys.time(id, partition, timestamp), lt: keys.timeRange(id, partition).lt, limit: 1 }).all()
    if (hit === undefined) return null
    const from = Math.max(readU64(hit[1], 0), part.logStart)
    if (from >= part.logEnd) return null
    let found: number | null = null
    await this.#scan(part, from, part.logEnd, (batch) => {
      for (const r of batch) {
        if (r.offset >= from && r.timestamp >= timestamp) { found = r.offset; return false }
      }
      return true
    })
    return found
  }

  // ---------------------------------------------------------------- consumer groups

  #groupState (group: string): GroupState {
    let g = this.#groups.get(group)
    if (g === undefined) {
      g = { holdsRetention: false, offsets: new Map() }
      this.#groups.set(group, g)
    }
    return g
  }

  async setGroup (group: string, options: GroupOptions): Promise<void> {
    this.#checkWritable()
    checkGroupName(group)
    if (options === null || typeof options !== 'object' || typeof options.holdsRetention !== 'boolean') {
      throw new StoreError('STORE_INVALID_ARGUMENT', 'group options must be { holdsRetention: boolean }')
    }
    await this.#db.put(keys.group(group), encodeMeta({ holdsRetention: options.holdsRetention }), this.#sync)
    this.#groupState(group).holdsRetention = options.holdsRetention
  }

  async commitOffset (group: string, stream: string, partition: number, offset: number): Promise<void> {
    this.#checkWritable()
    checkGroupName(group)
    const part = this.#partition(stream, partition)
    checkOffset(offset)
    if (offset > part.logEnd) {
      throw new StoreError('STORE_OFFSET_OUT_OF_RANGE',
        `cannot commit offset ${offset} for ${stream}[${partition}]: the log ends at ${part.logEnd}`,
        { details: { stream, partition, offset, logStartOffset: part.logStart, logEndOffset: part.logEnd, group } })
    }
    await this.#db.put(keys.offset(group, part.stream.id, partition), encodeU64(offset), this.#sync)
    this.#groupState(group).offsets.set(part, offset)
  }

  fetchOffset (group: string, stream: string, partition: number): number | null {
    checkGroupName(group)
    const part = this.#partition(stream, partition)
    return this.#groups.get(group)?.offsets.get(part) ?? null
  }

  async resetGroup (group: string, stream: string, spec: ResetSpec, partition?: number): Promise<void> {
    this.#checkWritable()
    checkGroupName(group)
    const s = this.#stream(stream)
    const parts = partition === undefined ? s.partitions : [this.#partition(stream, partition)]
    if (spec === null || typeof spec !== 'object') throw new StoreError('STORE_INVALID_ARGUMENT', 'reset spec must be an object')
    if (spec.to === 'offset') checkOffset(spec.offset)
    else if (spec.to === 'timestamp') checkTimestamp(spec.timestamp)
    else if (spec.to !== 'earliest' && spec.to !== 'latest') {
      throw new StoreError('STORE_INVALID_ARGUMENT', `reset must go to earliest, latest, offset or timestamp, got ${String((spec as { to: unknown }).to)}`)
    }
    for (const part of parts) {
      let target: number
      switch (spec.to) {
        case 'earliest': target = part.logStart; break
        case 'latest': target = part.logEnd; break
        // An offset outside the log is clamped into it, as kafka-consumer-groups does.
        case 'offset': target = Math.min(Math.max(spec.offset, part.logStart), part.logEnd); break
        case 'timestamp': target = (await this.offsetForTime(stream, part.partition, spec.timestamp)) ?? part.logEnd; break
      }
      await this.commitOffset(group, stream, part.partition, target)
    }
  }

  async groupLag (group: string, stream: string): Promise<PartitionLag[]> {
    this.#checkOpen()
    checkGroupName(group)
    const s = this.#stream(stream)
    const g = this.#groups.get(group)
    const now = this.#clock.now()
    const out: PartitionLag[] = []
    for (const part of s.partitions) {
      const committed = g?.offsets.get(part) ?? null
      const next = Math.max(committed ?? part.logStart, part.logStart)
      let lagSeconds = 0
      if (next < part.logEnd) {
        const { records } = await this.read(s.name, part.partition, next, { maxRecords: 1 })
        const oldest = records[0]
        if (oldest !== undefined) lagSeconds = Math.max(0, (now - oldest.timestamp) / 1000)
      }
      out.push({
        partition: part.partition,
        committedOffset: committed,
        logStartOffset: part.logStart,
        logEndOffset: part.logEnd,
        lagMessages: Math.max(0, part.logEnd - next),
        lagSeconds,
      })
    }
    return out
  }

  listGroups (): GroupInfo[] {
    return [...this.#groups.keys()].sort().map((group) => {
      const g = this.#groups.get(group) as GroupState
      const offsets: Record<string, Record<number, number>> = {}
      for (const [part, offset] of g.offsets) (offsets[part.stream.name] ??= {})[part.partition] = offset
      return { group, holdsRetention: g.holdsRetention, offsets }
    })
  }

  async deleteGroup (group: string): Promise<void> {
    this.#checkWritable()
    checkGroupName(group)
    const g = this.#groups.get(group)
    if (g === undefined) throw new StoreError('STORE_UNKNOWN_GROUP', `unknown consumer group ${group}`, { details: { group } })
    await this.#db.batch([
      { type: 'del', key: keys.group(group) },
      ...[...g.offsets.keys()].map((part) => ({ type: 'del' as const, key: keys.offset(group, part.stream.id, part.partition) })),
    ], this.#batchSync)
    this.#groups.delete(group)
  }

  // ---------------------------------------------------------------- retention

  holdRetention (floor: (stream: string, partition: number) => number | undefined, onDropped?: RetentionHoldDropped): () => void {
    if (typeof floor !== 'function') throw new StoreError('STORE_INVALID_ARGUMENT', 'a retention hold is a function of stream and partition')
    if (onDropped !== undefined && typeof onDropped !== 'function') throw new StoreError('STORE_INVALID_ARGUMENT', 'a retention hold\'s onDropped is a function')
    const hold = { floor, onDropped }
    this.#holds.add(hold)
    return () => { this.#holds.delete(hold) }
  }

  /** Lowest offset a retention-holding group, or a hold, still needs in this partition. */
  #holdFloor (part: PartitionState): number {
    let floor = Infinity
    for (const g of this.#groups.values()) {
      if (g.holdsRetention) floor = Math.min(floor, g.offsets.get(part) ?? 0)
    }
    for (const hold of this.#holds) floor = Math.min(floor, hold.floor(part.stream.name, part.partition) ?? Infinity)
    return floor
  }

  async enforceRetention (): Promise<RetentionReport> {
    this.#checkWritable()
    const now = this.#clock.now()
    const report: PassReport = { batchesDeleted: 0, recordsDeleted: 0, bytesDeleted: 0, dropped: [], blocked: [] }
    // Partitions whose front is damaged, met this pass: reported once, and the disk budget takes its bytes from the
    // others. Deleting past damage would hide it (a read below the log start is "out of range", not "damaged", and
    // `edgemq check` starts at the log start); failing the pass at it would leave every other partition untrimmed.
    const blocked = new Set<PartitionState>()
    for (const stream of this.#streams.values()) {
      if (stream.retentionMs === 0 && stream.retentionBytes === 0) continue
      for (const part of stream.partitions) {
        const damage = await this.#exclusive(() => this.#trimFront(part, report, (header, bytesLeft) => {
          const expired = stream.retentionMs > 0 && header.maxTimestamp < now - stream.retentionMs
          const oversize = stream.retentionBytes > 0 && bytesLeft > stream.retentionBytes
          return (expired || oversize) && header.baseOffset + header.count <= this.#holdFloor(part)
        }))
        if (damage !== undefined) this.#reportBlocked(part, damage, report, blocked)
      }
    }
    await this.#pruneDedupe(now)
    if (this.#diskBudgetBytes > 0) {
      // Oldest batch first across partitions, while over the budget. One write deletes the victim's batches while they
      // stay older than every other partition's oldest. What each write dropped is reported, counted and told to the
      // holds at once (a failed write or a kill later in the pass must not lose it, and a hold's holder must hear of
      // it before it reads on); a partition and group's first drop of the pass is logged at once, the rest as one
      // line at the pass's end (one warning per batch flooded the log when a burst ran past the budget).
      const warnings = new PassWarnings(this.#logger)
      const budget = this.#diskBudgetBytes
      try {
        while (this.totalBytes > budget) {
          const oldest = this.#oldestPartitions(blocked)
          if (oldest === undefined) break
          const { victim, othersOldest } = oldest
          const before = report.batchesDeleted
          const total = this.totalBytes
          const damage = await this.#exclusive(() => this.#trimFront(victim, report, (header, bytesLeft, index) =>
            index === 0 || (total - (victim.bytes - bytesLeft) > budget && header.firstTimestamp <= othersOldest), warnings))
          if (damage !== undefined) this.#reportBlocked(victim, damage, report, blocked)
          else if (report.batchesDeleted === before) break
        }
      } finally {
        warnings.end()
      }
      if (this.totalBytes > budget && blocked.size > 0) {
        this.#logger.error({ totalBytes: this.totalBytes, diskBudgetBytes: budget, damaged: [...blocked].map((p) => `${p.stream.name}[${p.partition}]`) },
          'the log is over the disk budget and only partitions with a damaged front batch are left to trim; stop the gateway and run `edgemq check`')
      }
    }
    return report
  }

  /** A partition retention could not trim past damage: reported, logged and told the observer, once per pass. */
  #reportBlocked (part: PartitionState, error: StoreError, report: PassReport, blocked: Set<PartitionState>): void {
    blocked.add(part)
    const b: RetentionBlocked = { stream: part.stream.name, partition: part.partition, offset: part.logStart, error }
    report.blocked.push(b)
    this.#logger.error({ code: error.code, stream: b.stream, partition: b.partition, offset: b.offset, err: error.message }, BLOCKED_ERROR)
    this.#observer.onRetentionBlocked?.(b)
  }

  /** Forgets dedupe ids older than the dedupe retention. */
  async #pruneDedupe (now: number): Promise<void> {
    if (this.#dedupeRetentionMs === 0) return
    await this.#forgetScoped([...this.#dedupe].filter(([, e]) => e.timestamp < now - this.#dedupeRetentionMs).map(([key]) => key))
  }

  /**
   * The partition holding the oldest records (by its first batch's timestamp), and the oldest first timestamp of the
   * others that hold records (Infinity when none does); undefined when no partition holds any. Partitions in `skip`
   * (a damaged front: nothing to delete there) are neither.
   */
  #oldestPartitions (skip: ReadonlySet<PartitionState>): { victim: PartitionState, othersOldest: number } | undefined {
    let victim: PartitionState | undefined
    let othersOldest = Infinity
    for (const s of this.#streams.values()) {
      for (const p of s.partitions) {
        if (p.logEnd <= p.logStart || skip.has(p)) continue
        const ts = p.oldestTs ?? 0
        if (victim === undefined || ts < (victim.oldestTs ?? 0)) {
          if (victim !== undefined) othersOldest = Math.min(othersOldest, victim.oldestTs ?? 0)
          victim = p
        } else {
          othersOldest = Math.min(othersOldest, ts)
        }
      }
    }
    return victim === undefined ? undefined : { victim, othersOldest }
  }

  /**
   * Deletes batches from the front of a partition while `shouldDelete`
   * agrees, in one write together with the partition metadata and the
   * re-pointed time index. Records a retention-holding group had not yet
   * consumed (possible only under the disk budget) are reported as dropped.
   * Stops at damage (a batch that fails its checks, offsets no batch holds,
   * LevelDB reporting corruption), deletes what lies before it and returns it:
   * retention never deletes damaged data nor passes over it.
   */
  async #trimFront (part: PartitionState, report: PassReport,
    shouldDelete: (header: BatchHeader, bytesLeft: number, index: number) => boolean, warnings?: PassWarnings): Promise<StoreError | undefined> {
    const { id } = part.stream
    const ops: BatchOp[] = []
    let newStart = part.logStart
    let bytesLeft = part.bytes
    const dropped = new Map<string, number>()
    const iterator = this.#db.iterator(keys.batchRange(id, part.partition))
    let oldestTs: number | null = null
    let damage: StoreError | undefined
    try {
      for (let index = 0; ; index++) {
        let entry: [Buffer, Buffer] | undefined
        let header: BatchHeader | undefined
        try {
          entry = await iterator.next()
          // Batches cover [logStart, logEnd) without gaps (format.ts): a batch further on, or none before the log end, is damage.
          const next = entry === undefined ? part.logEnd : keys.batchBase(entry[0])
          if (next > newStart) {
            damage = missingOffsets(part.stream.name, part.partition, newStart, next,
              entry === undefined ? 'the last batch ends before the log end' : 'no batch holds them')
            break
          }
          if (entry !== undefined) header = this.#header(part, entry[0], entry[1])
        } catch (err) {
          const e = asDamage(err, `reading ${part.stream.name}[${part.partition}] for retention`, { stream: part.stream.name, partition: part.partition })
          if (!isStoreError(e, 'STORE_DAMAGED') && !isStoreError(e, 'STORE_CORRUPT_BATCH')) throw e
          damage = e
          break
        }
        if (entry === undefined || header === undefined) break
        if (!shouldDelete(header, bytesLeft, index)) { oldestTs = header.firstTimestamp; break }
        ops.push({ type: 'del', key: entry[0] })
        newStart = header.baseOffset + header.count
        bytesLeft -= header.bytes
        for (const [group, g] of this.#groups) {
          if (!g.holdsRetention) continue
          const unconsumed = newStart - Math.max(header.baseOffset, g.offsets.get(part) ?? 0)
          if (unconsumed > 0) dropped.set(group, (dropped.get(group) ?? 0) + unconsumed)
        }
      }
    } finally {
      await iterator.close()
    }
    if (ops.length === 0) return damage
    // Re-point the time index: drop entries of deleted batches; keep coverage of the new first batch.
    let lastDeletedTs: number | undefined
    let firstKeptBase: number | undefined
    for (const [key, value] of await this.#db.iterator(keys.timeRange(id, part.partition)).all()) {
      const base = readU64(value, 0)
      if (base >= newStart) { firstKeptBase = base; break }
      ops.push({ type: 'del', key })
      lastDeletedTs = keys.timeOf(key)
    }
    const empty = newStart >= part.logEnd
    if (lastDeletedTs !== undefined && !empty && firstKeptBase !== newStart) {
      ops.push({ type: 'put', key: keys.time(id, part.partition, lastDeletedTs), value: encodeU64(newStart) })
    }
    ops.push({ type: 'put', key: keys.partition(id, part.partition), value: encodeMeta({ logStart: newStart, bytes: bytesLeft, logEnd: part.logEnd } satisfies PartitionMeta) })
    await this.#db.batch(ops, this.#batchSync)
    const batches = ops.filter((op) => op.type === 'del' && op.key[0] === 0x42).length
    report.batchesDeleted += batches
    report.recordsDeleted += newStart - part.logStart
    report.bytesDeleted += part.bytes - bytesLeft
    part.logStart = newStart
    part.index.trim(newStart)
    part.bytes = bytesLeft
    part.oldestTs = empty ? null : oldestTs
    if (empty) part.indexedMaxTs = -Infinity
    // Reported, counted and logged as this write lands (the disk budget's pass merges the warnings: PassWarnings).
    for (const [group, count] of dropped) {
      const d: DroppedRecords = { stream: part.stream.name, partition: part.partition, group, count, reason: 'disk-budget' }
      report.dropped.push(d)
      if (warnings === undefined) this.#logger.warn({ ...d }, DROPPED_WARNING)
      else warnings.add(d)
      this.#observer.onDropped?.(d)
    }
    // A hold past which the budget deleted: its holder counts and logs what it lost.
    for (const hold of this.#holds) {
      const floor = hold.floor(part.stream.name, part.partition)
      if (floor !== undefined && floor < newStart) hold.onDropped?.(part.stream.name, part.partition, newStart)
    }
    return damage
  }

  // ---------------------------------------------------------------- close

  async close (): Promise<void> {
    if (this.#closed) return
    this.#closing = true
    // Runs after every commit queued before it, so pending appends finish first.
    await this.#exclusive(async () => {})
    this.#closed = true
    if (this.#owned !== undefined) await this.#owned.close()
  }
}
