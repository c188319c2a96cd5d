/**
 * The log interface that the gateway, the bridge and the replay API use.
 * Nothing here knows about MQTT: a record's `topic` and `clientId` are opaque
 * strings to the store.
 */
import type { AbstractLevel } from 'abstract-level'
import type { StoreError } from './errors.ts'

/** Source of time, injected so that tests can use a fake clock. */
export interface Clock {
  /** Milliseconds since the Unix epoch. */
  now (): number
}

export const systemClock: Clock = { now: () => Date.now() }

/** Minimal structured logger; the gateway passes its own. */
export interface StoreLogger {
  warn (fields: Record<string, unknown>, message: string): void
  error (fields: Record<string, unknown>, message: string): void
}

/**
 * `sync` fsyncs every group commit before any of its appends resolve.
 * `async` resolves once LevelDB has the batch in its write-ahead log without
 * fsync: a process crash loses nothing, a power loss may lose the last
 * moments of acknowledged appends.
 */
export type Durability = 'sync' | 'async'

export interface StreamOptions {
  /** Number of partitions, fixed for the life of the stream (1..1024). */
  readonly partitions: number
  /** Delete batches whose newest record is older than this (ms); 0 keeps forever. */
  readonly retentionMs?: number
  /** Keep each partition under this many bytes by deleting its oldest batches; 0 = unbounded. */
  readonly retentionBytes?: number
}

export interface StreamInfo {
  readonly name: string
  readonly partitions: number
  readonly retentionMs: number
  readonly retentionBytes: number
}

export interface PartitionInfo {
  readonly stream: string
  readonly partition: number
  /** First offset still in the log. */
  readonly logStartOffset: number
  /** Offset the next appended record will get. */
  readonly logEndOffset: number
  /** Bytes of the stored batches of this partition. */
  readonly bytes: number
  /** Timestamp of the oldest record in the log, null when the partition is empty. */
  readonly oldestTimestamp: number | null
  /** Timestamp of the newest record in the log, null when the partition is empty. */
  readonly newestTimestamp: number | null
}

/** What a producer hands to {@link LogStore.append}. */
export interface RecordInput {
  /** The message body; must be binary. */
  readonly payload: Uint8Array
  /** The MQTT topic the record arrived on (opaque to the store). */
  readonly topic?: string
  readonly qos?: 0 | 1 | 2
  readonly clientId?: string
  readonly headers?: Readonly<Record<string, string>>
  /** Receive time in ms; defaults to the store's clock. */
  readonly timestamp?: number
}

export interface StoredRecord {
  readonly offset: number
  readonly timestamp: number
  readonly key: string
  readonly topic: string
  readonly payload: Uint8Array
  readonly qos: 0 | 1 | 2
  readonly clientId: string
  readonly headers: Readonly<Record<string, string>> | null
}

export interface AppendResult {
  readonly partition: number
  readonly offset: number
  /** Set when the append carried a dedupe id the store had already seen: nothing new was written. */
  readonly duplicate?: true
}

export interface AppendOptions {
  /**
   * Makes the append idempotent: the id is written in the same atomic batch
   * as the record, and a later append with the same id (also after a crash
   * and reopen) resolves with the first one's partition and offset and
   * `duplicate: true` instead of appending again. Ids are scoped to the
   * stream: the same id appended to another stream (another tenant's, say)
   * is a different id and is written. Ids are kept until
   * {@link LogStore.forgetDedupe} or until they are older than the store's
   * dedupe retention.
   */
  readonly dedupeId?: string
  /**
   * Writes outside the log committed in the same LevelDB write batch as the
   * record (and its dedupe id): after a crash either the record and every
   * one of these operations are on disk, or none is. A caller keeps state
   * of its own that must agree with the log this way (the gateway: an
   * inbound MQTT QoS 2 packet awaiting PUBREL).
   *
   * The store does not read, interpret or remember them. Contract:
   * - each `sublevel` is a sublevel of the database the store was opened on
   *   (`LogStoreOptions.db`), whose key space does not overlap the log's
   *   (the store's own `log` sublevel); otherwise the append rejects with
   *   `STORE_INVALID_ARGUMENT` and nothing is written;
   * - they are written only when the record is: not when the append
   *   rejects, and not when it resolves `duplicate: true`;
   * - they are applied after the log's own operations of the batch, in the
   *   order given, and in call order with the extraOps of other appends and
   *   the operations of {@link LogStore.write}.
   *
   * A put's value may be a function of the record's position
   * ({@link PositionedPut}): the store calls it once, while it builds the
   * commit that assigns the offset, and writes what it returns.
   */
  readonly extraOps?: readonly AppendExtraOperation[]
}

/** Where an appended record is: its stream, partition and offset. */
export interface RecordPosition {
  readonly stream: string
  readonly partition: number
  readonly offset: number
}

/**
 * A put among an append's extraOps whose value says where the record is: the
 * offset is assigned by the group commit, after the append was called, so
 * the value is made then (the gateway's inbound QoS 2 entry keeps the
 * position of its record this way). `value` must not throw: a throw fails the
 * whole commit being built.
 */
export interface PositionedPut {
  readonly type: 'put'
  readonly sublevel: ExtraSublevel
  readonly key: Uint8Array
  readonly value: (position: RecordPosition) => Uint8Array
}

/** What {@link AppendOptions.extraOps} takes. */
export type AppendExtraOperation = ExtraOperation | PositionedPut

/**
 * A put or del of a key outside the log (see {@link AppendOptions.extraOps}).
 * `sublevel` is abstract-level's batch option: the operation acts on that
 * sublevel, with its key and value encodings.
 */
/** Options of {@link LogStore.write}. */
export interface StoreWriteOptions {
  /** False: no fsync of its own, and may be lost to an OS crash (see LogStore.write; default true: fsync'd under `durability: sync`). */
  readonly durable?: boolean
}

export type ExtraOperation =
  | { readonly type: 'put', readonly sublevel: ExtraSublevel, readonly key: Uint8Array, readonly value: Uint8Array }
  | { readonly type: 'del', readonly sublevel: ExtraSublevel, readonly key: Uint8Array }

/** A sublevel as abstract-level exposes it: its root database and its key prefix. */
export type ExtraSublevel = AbstractLevel<string | Buffer | Uint8Array, unknown, unknown> & { readonly db?: unknown, readonly prefix?: string }

export interface ReadOptions {
  /** At most this many records (default 1000). */
  readonly maxRecords?: number
  /**
   * Stop once the payloads returned add up to this many bytes (default 1 MiB).
   * At least one record is returned when one is available, as Kafka does.
   */
  readonly maxBytes?: number
}

export interface ReadResult {
  readonly records: StoredRecord[]
  /** Offset to read from next. */
  readonly nextOffset: number
  readonly logStartOffset: number
  readonly logEndOffset: number
}

/**
 * The records of one stored batch, column by column, as {@link LogStore.readColumns}
 * returns them: nothing is allocated per record unless asked for. Record `i`
 * (0 ≤ i < count) has offset `baseOffset + i`; the records the read returned
 * are `start` ≤ i < `end`. Strings (keys, topics, client ids) are interned per
 * batch: two records of the batch with equal topics have equal
 * {@link RecordColumns.topicIndex}, so a reader can do per-topic work once per
 * batch; likewise equal header sets have equal {@link RecordColumns.headerSet}.
 * Payloads are ranges of {@link RecordColumns.payloadBytes}, a view into the
 * stored value, not copies. A batch is immutable.
 */
export interface RecordColumns {
  readonly baseOffset: number
  readonly count: number
  /** The first record of the batch the read returned. */
  readonly start: number
  /** One past the last record of the batch the read returned. */
  readonly end: number
  /** The batch's interned strings, indexed by {@link topicIndex}. */
  readonly strings: readonly string[]
  /** The payloads of every record of the batch, one after another. */
  readonly payloadBytes: Buffer
  timestamp (i: number): number
  key (i: number): string
  topic (i: number): string
  /** Where record i's topic is in {@link strings}. */
  topicIndex (i: number): number
  clientId (i: number): string
  qos (i: number): 0 | 1 | 2
  /** Where record i's payload starts in {@link payloadBytes}. */
  payloadStart (i: number): number
  payloadLength (i: number): number
  /** Record i's payload: a view into {@link payloadBytes} (an allocation; framing can copy the range instead). */
  payload (i: number): Uint8Array
  /** Record i's headers, or null; records with the same set share one frozen object. */
  headers (i: number): Readonly<Record<string, string>> | null
  /** 0 when record i has no headers, else a number its batch gives each distinct header set (from 1). */
  headerSet (i: number): number
  /** Record i as a {@link StoredRecord} (an allocation, for the paths that keep records). */
  record (i: number): StoredRecord
}

export interface ColumnReadResult {
  /** In offset order; the first may begin below `fromOffset` (its `start` says where the read begins). */
  readonly batches: RecordColumns[]
  /** Offset to read from next. */
  readonly nextOffset: number
  readonly logStartOffset: number
  readonly logEndOffset: number
}

export interface ReadBatchesOptions {
  /**
   * Stop before a batch that would take the bytes returned past this
   * (default 1 MiB). At least one batch is returned when one is available.
   */
  readonly maxBytes?: number
  /** Batches that start at or after this offset are not read. */
  readonly endOffset?: number
}

/**
 * One batch as stored: `bytes` is the batch value of the on-disk format
 * (store/format.ts: a 33-byte header with magic, CRC-32, base offset, count
 * and timestamps, then the columnar cbor body), checked but not decoded.
 */
export interface StoredBatch {
  /** Offset of the batch's first record. */
  readonly baseOffset: number
  /** Records in the batch: offsets baseOffset .. baseOffset + count - 1. */
  readonly count: number
  readonly firstTimestamp: number
  /** Largest record timestamp in the batch. */
  readonly maxTimestamp: number
  readonly bytes: Uint8Array
}

export interface BatchReadResult {
  readonly batches: StoredBatch[]
  /** Offset to read from next: the end of the last batch, or `fromOffset` when none was returned. */
  readonly nextOffset: number
  readonly logStartOffset: number
  readonly logEndOffset: number
}

export interface GroupOptions {
  /** Retention never deletes records this group has not consumed (unless the disk budget forces it). */
  readonly holdsRetention: boolean
}

export type ResetSpec =
  | { readonly to: 'earliest' }
  | { readonly to: 'latest' }
  | { readonly to: 'offset', readonly offset: number }
  | { readonly to: 'timestamp', readonly timestamp: number }

export interface PartitionLag {
  readonly partition: number
  /** Next offset the group will consume; null when it never committed. */
  readonly committedOffset: number | null
  readonly logStartOffset: number
  readonly logEndOffset: number
  /** logEnd − max(committed, logStart); everything from logStart when never committed. */
  readonly lagMessages: number
  /** now − timestamp of the oldest unconsumed record, 0 when caught up. */
  readonly lagSeconds: number
}

export interface GroupInfo {
  readonly group: string
  readonly holdsRetention: boolean
  /** Committed offsets by stream name, then partition. */
  readonly offsets: Readonly<Record<string, Readonly<Record<number, number>>>>
}

/** Told that the disk budget deleted a hold's records: those of `partition` below `logStartOffset` from its floor up. */
export type RetentionHoldDropped = (stream: string, partition: number, logStartOffset: number) => void

/** Why records left the log before a retention-holding group consumed them. */
export interface DroppedRecords {
  readonly stream: string
  readonly partition: number
  readonly group: string
  /** Records this group had not consumed yet. */
  readonly count: number
  readonly reason: 'disk-budget'
}

/**
 * A partition that retention (by age, by size, or the disk budget) could not trim past `offset`: the batch there is
 * damaged (STORE_CORRUPT_BATCH), or the offsets from there are missing or unreadable (STORE_DAMAGED). Nothing in the
 * store repairs or skips damage, so retention deletes nothing from that offset on and trims the other partitions; an
 * operator stops the gateway and runs `edgemq check` (docs/operations.md, "Damaged data").
 */
export interface RetentionBlocked {
  readonly stream: string
  readonly partition: number
  /** The first offset retention could not pass (the partition's log start once retention deleted what lies before). */
  readonly offset: number
  /** The damage, as a reader of that offset gets it. */
  readonly error: StoreError
}

export interface CommitStats {
  readonly records: number
  readonly bytes: number
  /** Time from the oldest append in the commit to the write resolving, in ms. */
  readonly latencyMs: number
  readonly durationMs: number
}

/** What {@link LogStore.onAppend} listeners get: a partition that received records, and its new log end. */
export interface AppendEvent {
  readonly stream: string
  readonly partition: number
  /** The partition's log end after the commit; every offset below it is readable. */
  readonly logEndOffset: number
}

export type AppendListener = (event: AppendEvent) => void

/** Callbacks the composition root uses to export metrics. All optional. */
export interface StoreObserver {
  onCommit? (stats: CommitStats): void
  onDropped? (dropped: DroppedRecords): void
  onWriteError? (err: Error): void
  /** Once per retention pass and partition that retention met damage in (also logged). */
  onRetentionBlocked? (blocked: RetentionBlocked): void
}

export interface RetentionReport {
  readonly batchesDeleted: number
  readonly recordsDeleted: number
  readonly bytesDeleted: number
  readonly dropped: readonly DroppedRecords[]
  /** Partitions left as they are from a damaged batch on; the pass trimmed the others. */
  readonly blocked: readonly RetentionBlocked[]
}

/**
 * A durable, partitioned, append-only log. Stream names are
 * `<tenant>/<stream>`. All methods reject with {@link StoreError}s.
 */
export interface LogStore {
  /**
   * Creates a stream, or updates the retention of an existing one. Rejects
   * with STORE_STREAM_CONFLICT when the stream exists with a different
   * partition count: partition counts never change, since keys would move.
   */
  createStream (name: string, options: StreamOptions): Promise<StreamInfo>

  /** Every stream, sorted by name. */
  listStreams (): StreamInfo[]

  /** One stream's settings; STORE_UNKNOWN_STREAM when absent. */
  streamInfo (name: string): StreamInfo

  /** Offsets, bytes and timestamps of one partition. */
  partitionInfo (stream: string, partition: number): PartitionInfo

  /** The partition `key` maps to: a stable FNV-1a hash of its UTF-8 bytes, mod partitions. */
  partitionFor (stream: string, key: string): number

  /**
   * Appends one record to the partition chosen by `key`. Resolves when the
   * group commit holding it is written (and fsync'd under `sync`); the
   * returned offset is then readable. Concurrent appends are committed
   * together; an idle store writes a lone append at once.
   */
  append (stream: string, key: string, record: RecordInput, options?: AppendOptions): Promise<AppendResult>

  /**
   * The store's group-commit writer, for state kept beside the log (the
   * gateway's MQTT sessions): writes `ops` in the next group commit, together
   * with the appends and other writes queued with them, after the log's own
   * operations and in call order with every append's extraOps and every other
   * write, so a key written twice ends with the later value. Resolves once that
   * LevelDB batch is written (fsync'd under `sync`). `ops` follow the
   * contract of {@link AppendOptions.extraOps} (STORE_INVALID_ARGUMENT
   * otherwise, and nothing is written). Rejects with STORE_WRITE_FAILED when
   * the batch failed and the reopened database cannot say whether it landed
   * (always so for a batch without records), with STORE_CLOSED after close().
   * With `durable: false` the batch goes without an fsync when nothing else in
   * its commit needs one: it survives the process being killed (the OS has
   * it), but an OS crash or power loss may lose it, even after later synced
   * commits survived (LevelDB closes a full write-ahead log without an fsync
   * and syncs only the new one): only for writes whose loss costs a redo,
   * never order or data (the session cursors' advances).
   */
  write (ops: readonly ExtraOperation[], options?: StoreWriteOptions): Promise<void>

  /**
   * Calls `listener` after every successful group commit, once per partition
   * that received records, once those records are readable (long-poll
   * readers and live replay wait on it). Returns a function that removes the
   * listener. Listeners run on the writer's path: they must be quick; one
   * that throws is logged and does not affect the commit or other listeners.
   */
  onAppend (listener: AppendListener): () => void

  /** Forgets a dedupe id in every stream, so the next append carrying it is written again (MQTT reuses packet ids). */
  forgetDedupe (dedupeId: string): Promise<void>

  /** Forgets every dedupe id that starts with `prefix` (a client's ids when its session is cleaned). */
  forgetDedupePrefix (prefix: string): Promise<void>

  /**
   * Reads records from `fromOffset` in offset order. `fromOffset` equal to
   * the log end returns no records; below the log start or above the log end
   * rejects with STORE_OFFSET_OUT_OF_RANGE.
   */
  read (stream: string, partition: number, fromOffset: number, options?: ReadOptions): Promise<ReadResult>

  /**
   * Reads the records {@link LogStore.read} would return with the same
   * arguments, without an object per record: each stored batch decoded into
   * columns ({@link RecordColumns}), the records returned being `start` to
   * `end` of each. For readers that frame records straight onto a socket
   * (the gateway's persistent sessions). Errors are those of `read`,
   * STORE_CORRUPT_BATCH for a batch that does not decode.
   */
  readColumns (stream: string, partition: number, fromOffset: number, options?: ReadOptions): Promise<ColumnReadResult>

  /**
   * Reads whole stored batches, from the one holding `fromOffset`, without
   * decoding them: for serving the log's bytes as they are (the HTTP API's
   * `format=batches`). The first batch may begin below `fromOffset`, and the
   * last may reach past `options.endOffset`; records outside the range the
   * caller asked for are its to skip. Every batch's magic, CRC and base
   * offset are checked (STORE_CORRUPT_BATCH otherwise), and the batches are
   * contiguous. Offset errors are those of {@link LogStore.read}.
   * `decodeStoredBatch` (format.ts) turns a batch's bytes into records.
   */
  readBatches (stream: string, partition: number, fromOffset: number, options?: ReadBatchesOptions): Promise<BatchReadResult>

  /**
   * The first offset whose timestamp is >= `timestamp` (Kafka's
   * offsetsForTimes), found through the sparse time index; null when every
   * record is older.
   */
  offsetForTime (stream: string, partition: number, timestamp: number): Promise<number | null>

  /** Creates or updates a consumer group's settings. */
  setGroup (group: string, options: GroupOptions): Promise<void>

  /** Commits the next offset `group` will consume; must be within [0, logEnd]. */
  commitOffset (group: string, stream: string, partition: number, offset: number): Promise<void>

  /** The committed offset, or null when the group never committed on that partition. */
  fetchOffset (group: string, stream: string, partition: number): number | null

  /** Moves the group's offsets on every partition of `stream` (or only `partition`). */
  resetGroup (group: string, stream: string, spec: ResetSpec, partition?: number): Promise<void>

  /** Lag per partition of `stream`, in messages and seconds. */
  groupLag (group: string, stream: string): Promise<PartitionLag[]>

  listGroups (): GroupInfo[]

  /** Forgets a group's settings and offsets; STORE_UNKNOWN_GROUP when it has neither. */
  deleteGroup (group: string): Promise<void>

  /**
   * Adds a retention hold kept by its holder rather than by a consumer
   * group (the gateway's persistent sessions keep their cursors in their own
   * key space): retention by age and size never deletes a record at or after
   * the offset `floor` gives for its partition (undefined: no hold there).
   * The disk budget still may: then `onDropped` is told the partition's new
   * log start, once per deletion that went past the floor, so the holder can
   * count and log what it lost (DESIGN: each dropped record is counted and
   * logged). Held in memory: the holder adds it again when it opens.
   * Returns the release.
   */
  holdRetention (floor: (stream: string, partition: number) => number | undefined, onDropped?: RetentionHoldDropped): () => void

  /**
   * Deletes whole batches from the front of each partition by age and size,
   * never past what a retention-holding group still needs, then enforces the
   * store's disk budget, which may drop unconsumed records (reported). A
   * partition whose front batch is damaged (or missing) keeps it and what
   * follows: reported in `blocked`, logged and told the observer once per
   * pass, while the other partitions are trimmed and the budget takes its
   * bytes from them; the pass does not reject for it.
   */
  enforceRetention (): Promise<RetentionReport>

  /** Appends accepted but not yet durable. */
  readonly pendingAppends: number

  /** Sum of stored batch bytes over all partitions. */
  readonly totalBytes: number

  /**
   * For a store opened with `follower: true`: re-reads what another writer
   * (a replication follower applying a primary's LevelDB batches) changed in
   * the database — new streams, every partition's offsets, consumer groups —
   * and calls the {@link LogStore.onAppend} listeners of partitions whose log
   * grew. A partition's state is swapped whole, so a concurrent read sees
   * either the old or the new log end. Dedupe ids are not followed (only
   * appends use them, and a follower takes none). STORE_INVALID_ARGUMENT on a
   * store that is not a follower.
   */
  refresh (): Promise<void>

  /** Waits for pending appends, then closes the database. */
  close (): Promise<void>
}
