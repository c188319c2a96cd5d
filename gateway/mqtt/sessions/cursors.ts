/**
 * Persistent sessions' cursors into the log (the `K` keys of
 * format.ts; they hold the log's retention through
 * LogStore.holdRetention): for a message the log already holds (a routed
 * topic), a session keeps, per stream and partition, the next offset to
 * deliver instead of a copy of the message. The first message of a partition
 * a session is sent creates its cursor (one small write); later ones write
 * nothing.
 *
 * Delivery: one path for catch-up and live. While the session's client is
 * connected, its cursors are read from the log in stored batches (a chunk per
 * partition read ahead), filtered by the session's subscriptions with the
 * matcher live routing uses and by authorizeForward's rule (tenant, `$`
 * topics, read ACL), at QoS min(subscription, record); QoS 1 deliveries are
 * framed by the gateway (publish-frames.ts, as `$replay` and shared
 * subscriptions do) and written to the connection in batches, one socket
 * write per batch. aedes' own path writes one packet per event-loop turn on
 * reconnect (lib/handlers/connect.js emptyQueue, lib/write.js), which held a
 * drain to about 10 k messages/s. Once a session has caught up, the log's
 * append event wakes it; aedes' live copies of logged QoS 1 messages are
 * held back (authorizeForward asks {@link SessionCursors.forwardLive}), so a
 * partition (a device) has one reader per session and its order holds.
 *
 * Window: at most min(`window`, the client's Receive Maximum) deliveries
 * unacknowledged [MQTT-3.3.4-9], and at most `windowBytes` of their frames
 * or of the stored batches they keep, the more (the delivery that crosses it
 * still goes: a record larger than the window reaches the client). When the
 * connection goes they keep copies of their records instead. A PUBACK moves
 * the cursor to the lowest offset still unacknowledged, written through the
 * log store's group-commit writer: one write in flight per session, with
 * every cursor that moved (later advances coalesce into the next).
 * Deliveries in flight are kept in memory only. Their PUBACKs are taken from
 * the connection's bytes before aedes parses them
 * ({@link CursorConnection.takePubacks}, one advance per socket read); those
 * aedes does parse (split across reads, or a connection without the
 * gateway's guard) come through {@link SessionCursors.clear}.
 *
 * Packet ids: from the client's own counter (FrameConnection.nextMessageId),
 * skipping the ids the session's deliveries hold and those of its queued
 * copies aedes resends ({@link CursorDeps.busy}). aedes takes its ids from
 * the same counter, which skips the ids the cursors hold
 * (FrameConnection.holdIds): its retained deliveries never pass the
 * persistence, so this is what keeps them apart, also after the counter
 * wraps; an id aedes hands the persistence that the cursors hold is moved
 * (outgoingUpdate, {@link SessionCursors.freeId}). A new connection starts
 * again from the lowest unacknowledged offset, with DUP set on every record
 * that may have been sent before; the deliveries the last connection left
 * unacknowledged go out with their packet ids [MQTT-4.4.0-1] (the ids stay
 * held until then), offsets acknowledged above an unacknowledged one are not
 * sent again. The ids are kept in memory: after a restart, everything from
 * the cursor up to the log end at startup is DUP, with new ids.
 *
 * Not kept as a store consumer group: the store commits a group's offset as
 * a lone fsync'd put (about 4.7 k/s) outside the group commit, and a
 * retention-holding group holds every partition it never committed from 0.
 * The cursors are keys of the session key space (`K`, format.ts),
 * written in the log's group commits; an advance without an fsync of its
 * own (LogStore.write `durable: false`): the process being killed loses none
 * (the OS has the write), an OS crash or power loss may lose the last ones,
 * whose deliveries then come again with DUP; a record is never skipped.
 *
 * QoS 2 deliveries stay copies (the `O` queue), whose PUBREL state survives a
 * restart; only QoS 1 deliveries use cursors.
 *
 * Subscriptions change while a cursor is behind: the records it has not
 * passed were logged under the subscriptions of their time, and a filter
 * added since may not get them (MQTT: a new subscription gets what is
 * published after it), nor may a changed QoS move one between the cursor and
 * the copies. A SUBSCRIBE that adds or changes a filter puts a fence (a new
 * epoch, the log end) on each cursor behind, and the subscription keeps
 * eras (its QoS from each epoch on); a record below a fence is matched with
 * the eras granted before it ({@link SessionCursors.grant}). Both are written
 * before the SUBACK, with the subscriptions. The drain pays one comparison
 * per record for it (offset against the highest fence), and matches topic by
 * topic only below a fence.
 */
import { isStoreError, type AppendEvent, type LogStore, type RecordColumns, type StoredRecord, type StoreWriteOptions } from '../../../store/index.ts'
import { expiredAt, headersToProperties } from '../../../bridge/index.ts'
import { mountTopic } from '../../access/topics.ts'
import { isShareTopic } from '../shared/share-topic.ts'
import { RETAIN_HEADER } from '../hooks/durable-append.ts'
import { logPositionOf, type LogPosition } from '../log-position.ts'
import { drained } from '../../drained.ts'
import { publishPacketLength, recordProperties, writePublishHeader, type FrameConnection } from '../publish-frames.ts'
import { keys } from './format.ts'

/** What the cursors read of the log. */
export type SessionLog = Pick<LogStore, 'readColumns' | 'partitionInfo' | 'holdRetention' | 'onAppend'>

/** The connection a session's cursor deliveries are written to; hooks/sessions.ts adapts an aedes client to it. */
export interface CursorConnection {
  readonly conn: FrameConnection
  /** The MQTT 5 Receive Maximum of the client's CONNECT (65,535 when it sent none, and for MQTT 3.1.1). */
  readonly receiveMaximum: number
  /** The MQTT 5 Maximum Packet Size of the client's CONNECT, if it set one: a larger PUBLISH is not sent [MQTT-3.1.2-24]. */
  readonly maximumPacketSize?: number
  /**
   * The topic the client receives a (mounted) topic on, or null when it may not: authorizeForward's rule for live
   * deliveries (its tenant, `$` topics, the read ACL per message).
   */
  deliveredTopic (mountedTopic: string): string | null
  /**
   * Lets the cursors take the connection's PUBACKs from its bytes, before aedes parses them (ConnectionGuard.pubacks):
   * `take` settles one that answers a delivery of theirs, `taken` follows the ones of one socket read.
   */
  takePubacks? (taker: { take (messageId: number): boolean, taken (): void }): void
  /**
   * Sends what was written to `conn.stream` now rather than when the connection would gather it with later writes
   * (ConnectionGuard.flushWrites: the next check phase): a batch of frames is one socket write already, and the client
   * can acknowledge it while the next is framed.
   */
  flush? (): void
}

/** Finds the connection of an aedes client whose session reads its cursors. */
export type CursorConnector = (client: object & { readonly id: string }) => CursorConnection | undefined

/** A delivery the cursors sent and that was taken back as a copy to keep (see {@link SessionCursors.detach}). */
export interface CursorPacket {
  cmd: 'publish'
  topic: string
  payload: Buffer
  qos: number
  retain: boolean
  dup: boolean
  brokerId: string
  brokerCounter: number
  messageId: number
  [field: string]: unknown
}

export interface CursorDeps {
  readonly log: SessionLog
  /** Puts of cursor values (resolve once durable). */
  readonly write: (ops: Array<{ type: 'put', key: Buffer, value: Buffer } | { type: 'del', key: Buffer }>, options?: StoreWriteOptions) => Promise<void>
  /** The highest QoS of the client's subscriptions matching the (mounted) topic, 0 when none. */
  readonly grantedQos: (clientId: string, topic: string) => number
  /** The Subscription Identifiers of the client's subscriptions matching the (mounted) topic [MQTT-3.3.4-3]. */
  readonly subscriptionIds?: (clientId: string, topic: string) => number[]
  /** Whether every QoS > 0 subscription of the client matching the (mounted) topic has MQTT 5's No Local set [MQTT-3.8.3-3]. */
  readonly noLocal?: (clientId: string, topic: string) => boolean
  /** Whether a QoS > 0 subscription of the client matching the (mounted) topic has MQTT 5's Retain As Published set. */
  readonly retainAsPublished?: (clientId: string, topic: string) => boolean
  /**
   * The client's subscriptions whose filter matches the (mounted) topic, every QoS, with their grant eras (`eras`, see
   * {@link SessionCursors.grant}): how records logged before a filter was granted or changed are delivered.
   */
  readonly subscriptionsMatching: (clientId: string, topic: string) => readonly MatchingSubscription[]
  /** Whether aedes holds this packet id for the client (a queued copy it resends with it). */
  readonly busy?: (clientId: string, messageId: number) => boolean
  /** The broker, for the ids of deliveries taken back as copies. */
  readonly broker: () => { readonly id: string, counter?: number } | undefined
  /** Unacknowledged deliveries per session. */
  readonly window: number
  /**
   * Bytes unacknowledged deliveries hold per session (their PUBLISH frames, or the stored batches they keep, the more):
   * past it no more go out until PUBACKs free some; the one that crosses it goes. Default: unbounded.
   */
  readonly windowBytes?: number
  /** Records read per stored read. */
  readonly readRecords?: number
  /** Told when a cursor write failed (it is written again WRITE_RETRY_MS later, or with the next advance if sooner). */
  readonly onWriteError?: (err: unknown) => void
  /**
   * Told when the disk budget deleted records of a partition below the log start it gives that a session's cursor had
   * not reached: `count` records of the partition, once per deletion (some may not have been for the session).
   */
  readonly onDropped?: (dropped: { readonly clientId: string, readonly stream: string, readonly partition: number, readonly count: number }) => void
  /** Told when reading the log for a session failed (it goes on at the next PUBACK or append). */
  readonly onReadError?: (err: unknown) => void
  /** ms since the epoch, for MQTT 5 message expiry (default Date.now). */
  readonly now?: () => number
  /** Told of each record of this session skipped because its message expiry had passed [MQTT-3.3.2-5]. */
  readonly onExpired?: (tenant: string) => void
  /** Told of each record skipped because its PUBLISH would exceed the client's Maximum Packet Size [MQTT-3.1.2-25]. */
  readonly onOversized?: (tenant: string) => void
}

/** A subscription as {@link CursorDeps.subscriptionsMatching} gives it. */
export interface MatchingSubscription {
  readonly qos: number
  readonly nl?: boolean
  readonly rap?: boolean
  readonly subscriptionIdentifier?: number
  /** Its grant eras (see {@link SessionCursors.grant}); absent: its QoS holds for every record the session reads. */
  readonly eras?: readonly number[]
}

/** A subscription of a SUBSCRIBE about to be stored, and the one it replaces (see {@link SessionCursors.grant}). */
export interface GrantedSubscription {
  readonly topic: string
  readonly qos: number
  readonly previous: { readonly qos: number, readonly eras?: readonly number[] } | undefined
}

/** What {@link SessionCursors.grant} hands the persistence to write with the subscriptions, before the SUBACK. */
export interface Grant {
  /** The `K` values of the cursors that got a fence. */
  readonly ops: Array<{ type: 'put', key: Buffer, value: Buffer }>
  /** Per subscription granted (same order): the eras to store with it, or undefined for none. */
  readonly eras: Array<number[] | undefined>
}

/**
 * A fence of a cursor: records of the partition below `offset` were logged before the SUBSCRIBE of grant `epoch`
 * (the log end then), so a filter that SUBSCRIBE added or changed does not apply to them as granted there.
 */
interface Fence { readonly epoch: number, readonly offset: number }

/**
 * The epoch of the fence a cursor loaded from a damaged `K` value gets at the log end then ({@link SessionCursors.load}):
 * it stands for the fences lost with the value, whose epochs are unknown. Below every grant's (they count from 1), so
 * it is always the cursor's first fence, and no grant takes it ({@link SessionCursors.grant}).
 */
const LOST_FENCES_EPOCH = 0

/**
 * The QoS a subscription with grant `eras` has for a record below a {@link LOST_FENCES_EPOCH} fence whose next fence
 * has epoch `before` (Infinity when none): 1 when it had a QoS above 0 in any era granted before that, as
 * {@link damagedEras} reads it. The record may have been logged in any of those eras; QoS 1 makes it the cursors', so
 * one logged under QoS 1 is not skipped as a copy (a QoS 2 one logged under QoS 2 then comes twice, also as its copy).
 */
function lostFencesQos (eras: readonly number[], before: number): number {
  for (let i = 0; i < eras.length && (eras[i] as number) < before; i += 2) if ((eras[i + 1] as number) > 0) return 1
  return 0
}

/**
 * The QoS a subscription with grant `eras` (flat: epoch, QoS, epoch, QoS, … ascending) has for a record whose
 * threshold is `threshold` (the epoch of the first fence above it): that of the last era granted before it; 0 (not
 * subscribed) before the first.
 */
function eraQos (eras: readonly number[], threshold: number): number {
  for (let i = eras.length - 2; i >= 0; i -= 2) if ((eras[i] as number) < threshold) return eras[i + 1] as number
  return 0
}

/** Records and payload bytes framed into one socket write. */
const BATCH_RECORDS = 500
const BATCH_BYTES = 256 * 1024
/** A chunk read ahead per partition: a store read decodes whole batches (up to 1,000 records). */
const CHUNK_BYTES = 256 * 1024
/**
 * A partition whose read failed (a damaged batch) is read again after this long; the session's other partitions go
 * on meanwhile (they waited behind it: every run began with the failing partition's read).
 */
const READ_RETRY_MS = 1000
/** A cursor advance whose write failed is written again after this long (ms), unless a later advance writes it first. */
const WRITE_RETRY_MS = 1000
/**
 * The next chunk is read once fewer than this many windows of records read ahead are left to send, from a partition
 * with none left (#read): across partitions up to this many windows overlap the read; a single partition's next chunk
 * is read once its last one is all framed, while those deliveries wait for their PUBACKs.
 */
const PREFETCH_WINDOWS = 4
const ADVANCE = { durable: false } as const
/** Per-connection cache of what a topic is delivered as; a session walking more topics recomputes. */
const CACHE_ENTRIES = 4096

class PartitionCursor {
  /** The value written (or being written): next offset to deliver after a restart. */
  committed: number
  /**
   * The highest value known to be on disk (loaded, created, or an advance whose write succeeded): `committed` runs
   * ahead of it while an advance is written, and goes back to it when that write fails, so fences are dropped by this.
   */
  durable: number
  /** The write that created the key failed after this cursor had sent records: the next message writes it again. */
  unwritten = false
  /** Its last read of the log failed: not read again before this time (performance.now()), READ_RETRY_MS later. */
  failedUntil = 0
  /** Next offset this connection has not yet delivered or skipped. */
  next: number
  /** Offsets delivered and not acknowledged, ascending, from `#head` on (a queue without shift()'s copying). */
  #pending: number[] = []
  #head = 0
  /** Offsets acknowledged above an unacknowledged one (not sent again by a new connection). */
  readonly acked = new Set<number>()
  /** Offsets below this may have been sent before (DUP). */
  dupBelow: number
  /**
   * Offset → packet id of deliveries sent on an earlier connection and not acknowledged, until they are sent again
   * with that id [MQTT-4.4.0-1] (see {@link ClientCursors.reserved}).
   */
  readonly resend = new Map<number, number>()
  /**
   * Batches read from the log (columns: no object per record) and not yet looked at: from record `aheadPos` of batch
   * `aheadBatch` on; `aheadEnd` is the offset after them.
   */
  ahead: RecordColumns[] = []
  /** The routes of `memoBatch`'s topics by their index in it, taken from `memoRoutes` (see SessionCursors.#pick). */
  memoBatch: RecordColumns | undefined
  memoRoutes: Map<string, Route> | undefined
  readonly memo: Array<Route | undefined> = []
  aheadBatch = 0
  aheadPos = 0
  aheadEnd = 0

  /** The tenant of the stream (`<tenant>/<stream>`). */
  readonly tenant: string
  /** Its `K` key (format.ts), made by the first advance: a drain writes it some thousand times per 100 k messages. */
  key: Buffer | undefined = undefined
  /**
   * Fences above `committed` (see {@link SessionCursors.grant}), ascending by epoch and offset; kept in its `K` value.
   * `fenceTop`: the highest one's offset (0 without any): a record at or above it is matched as usual (one comparison
   * per record in the drain), one below it by the subscriptions' eras, with the routes of `fencedRoutes`.
   */
  fences: Fence[] = []
  fenceTop = 0
  fencedRoutes: Map<string, Route> | undefined = undefined
  /** As `memo`, for the records of `fencedMemoBatch` below a fence of epoch `fencedMemoThreshold`. */
  fencedMemoBatch: RecordColumns | undefined
  fencedMemoRoutes: Map<string, Route> | undefined
  fencedMemoThreshold = 0
  readonly fencedMemo: Array<Route | undefined> = []

  constructor (readonly stream: string, readonly partition: number, committed: number, dupBelow: number) {
    this.tenant = stream.slice(0, stream.indexOf('/'))
    this.committed = committed
    this.durable = committed
    this.next = committed
    this.dupBelow = dupBelow
  }

  /** Sets the fences (ascending), and what follows from them. */
  fence (fences: Fence[]): void {
    this.fences = fences
    this.fenceTop = fences.length === 0 ? 0 : (fences[fences.length - 1] as Fence).offset
    this.fencedRoutes = undefined
  }

  /**
   * Drops the fences the value on disk has reached: no record they apply to is read again, not even after a restart.
   * Not by `committed`: an advance whose write fails goes back below them.
   */
  pruneFences (): void {
    const durable = this.durable
    if (this.fences.length > 0 && (this.fences[0] as Fence).offset <= durable) this.fence(this.fences.filter((f) => f.offset > durable))
  }

  /** The newest fence, if any. */
  lastFence (): Fence | undefined {
    return this.fences[this.fences.length - 1]
  }

  /** The epoch of the first fence above `offset` (Infinity when none is): which grant eras apply to its record. */
  threshold (offset: number): number {
    for (const f of this.fences) if (f.offset > offset) return f.epoch
    return Infinity
  }

  /** Where the cursor may go: the lowest unacknowledged delivery, or past everything delivered. */
  target (): number {
    const pending = this.#pending
    while (this.#head < pending.length && this.acked.delete(pending[this.#head] as number)) this.#head++
    if (this.#head === pending.length) {
      this.#pending = []
      this.#head = 0
    } else if (this.#head > 1024 && this.#head * 2 > pending.length) {
      this.#pending = pending.slice(this.#head)
      this.#head = 0
    }
    return this.#head < this.#pending.length ? this.#pending[this.#head] as number : this.next
  }

  /** A delivery of `offset` went out (offsets ascending). */
  sent (offset: number): void {
    this.#pending.push(offset)
  }

  /**
   * The delivery of `offset` was acknowledged. PUBACKs mostly come in the order of the deliveries: the lowest
   * unacknowledged one is dropped from the queue at once, only those above a gap are remembered in `acked`.
   */
  ack (offset: number): void {
    const pending = this.#pending
    if (this.#head >= pending.length || pending[this.#head] !== offset) {
      this.acked.add(offset)
      return
    }
    this.#head++
    // Acknowledged out of order before it: those go too, so the next in-order PUBACK finds its offset at the head.
    while (this.acked.size > 0 && this.#head < pending.length && this.acked.delete(pending[this.#head] as number)) this.#head++
  }

  /** Whether records read from the log wait to be looked at. */
  hasAhead (): boolean {
    return this.aheadBatch < this.ahead.length
  }

  /** How many records read from the log wait to be looked at (for this session or not). */
  aheadLeft (): number {
    if (this.aheadBatch >= this.ahead.length) return 0
    return this.aheadEnd - ((this.ahead[this.aheadBatch] as RecordColumns).baseOffset + this.aheadPos)
  }

  /** Batches read from the log: the next records to look at. */
  readAhead (batches: RecordColumns[], end: number): void {
    this.ahead = batches
    this.aheadBatch = 0
    this.aheadPos = batches[0]?.start ?? 0
    this.aheadEnd = end
    // Nothing left to look at (drained, or a new connection): the memo lets its batch (up to a chunk) go, or every
    // cursor, of offline sessions too, would keep one alive.
    if (batches.length === 0) this.forgetMemo()
  }

  /** Drops the routes memo and the batch it was made for (see SessionCursors.#pick). */
  forgetMemo (): void {
    this.memoBatch = undefined
    this.memoRoutes = undefined
    this.memo.length = 0
    this.fencedMemoBatch = undefined
    this.fencedMemoRoutes = undefined
    this.fencedMemo.length = 0
  }

  /** A new connection reads again from the lowest unacknowledged delivery; everything sent from there is DUP. */
  restart (): void {
    const from = this.target()
    this.#pending = []
    this.#head = 0
    for (const offset of this.acked) if (offset < from) this.acked.delete(offset)
    this.dupBelow = Math.max(this.dupBelow, this.next)
    this.next = from
    this.readAhead([], from)
    this.resend.clear()
  }
}

/**
 * A record taken for a delivery, then (in `inflight`) a delivery written and not acknowledged: record `index` of a
 * batch read from the log, which it keeps alive until its PUBACK; `record` makes the record itself (a reconnect's
 * resends and {@link SessionCursors.detach} ask for it, a drain does not).
 */
class Delivery {
  /** The record on its own, once {@link keep} let go of the batch. */
  #kept: StoredRecord | undefined
  constructor (readonly cursor: PartitionCursor,
    /** The batch it was read from; null once {@link keep} copied its record out. */
    public batch: RecordColumns | null,
    readonly index: number, readonly offset: number,
    /** The topic it is delivered on. */
    readonly topic: Buffer,
    readonly properties: Buffer | undefined,
    /** The packet id it goes out with again [MQTT-4.4.0-1], when an earlier connection sent it. */
    readonly id: number | undefined,
    /** Its PUBLISH frame's length, which it holds of the session's window in bytes while unacknowledged. */
    readonly bytes: number,
    /**
     * RETAIN: a delivery to an established subscription has it 0 [MQTT-3.3.1-9] [MQTT-3.3.1-12], unless the MQTT 5
     * subscription has Retain As Published and the message was published with it [MQTT-3.3.1-13] (the log keeps it,
     * RETAIN_HEADER).
     */
    readonly retain: boolean) {}

  get record (): StoredRecord {
    return this.#kept ?? (this.batch as RecordColumns).record(this.index)
  }

  /**
   * Copies its record out of the batch and lets the batch go: a delivery left unacknowledged by a connection that is
   * gone waits for the next one, maybe for ever, and kept the whole stored batch it came from (a session matching one
   * record of each batch held as many batches as deliveries).
   */
  keep (): void {
    if (this.batch === null) return
    const r = this.batch.record(this.index)
    this.#kept = { offset: r.offset, timestamp: r.timestamp, key: r.key, topic: r.topic, payload: Buffer.from(r.payload), qos: r.qos,
      clientId: r.clientId, headers: r.headers }
    this.batch = null
  }
}

/**
 * Whether the cursor's records may go out now: what the last connection left unacknowledged goes out again before
 * anything new (partitions without such deliveries wait for them).
 */
const mayTake = (state: ClientCursors, cursor: PartitionCursor): boolean => state.reserved.size === 0 || cursor.resend.size > 0

/** Deliveries sent on this connection and not acknowledged: what the window limits. */
const sentUnacked = (state: ClientCursors): number => state.inflight.size - state.reserved.size

/** Bytes the deliveries sent on this connection and not acknowledged hold: their frames, or the batches they keep, the more. */
const heldBytes = (state: ClientCursors): number => Math.max(state.sentBytes, state.batchBytes)

/** Nothing is sent on a connection (a new one, or none): what `inflight` holds is reserved or kept (Delivery.keep). */
function forgetSent (state: ClientCursors): void {
  state.sentBytes = 0
  state.batches.clear()
  state.batchBytes = 0
}

/** `count` more deliveries sent on this connection keep `batch`: the first of them counts its bytes. */
function holdBatch (state: ClientCursors, batch: RecordColumns, count: number): void {
  const holding = state.batches.get(batch)
  if (holding === undefined) state.batchBytes += batch.payloadBytes.byteLength
  state.batches.set(batch, (holding ?? 0) + count)
}

/** A delivery sent on this connection was acknowledged: its frame and its hold on its batch are let go. */
function sentAcked (state: ClientCursors, delivery: Delivery): void {
  state.sentBytes -= delivery.bytes
  const batch = delivery.batch
  if (batch === null) return
  const holding = state.batches.get(batch) ?? 0
  if (holding > 1) {
    state.batches.set(batch, holding - 1)
  } else if (holding === 1) {
    state.batches.delete(batch)
    state.batchBytes -= batch.payloadBytes.byteLength
  }
}

/** Whether the window is full, in deliveries or in their bytes: the next delivery waits for PUBACKs. */
const windowFull = (state: ClientCursors, windowBytes: number): boolean => sentUnacked(state) >= state.limit || heldBytes(state) >= windowBytes

/**
 * How a topic is delivered to the connection: null when it is not (no QoS > 0 subscription matches, or not readable).
 * `bare`: the MQTT 5 property section of its records without headers (only the subscription identifiers), made once.
 */
type Route = {
  readonly topic: Buffer, readonly qos: number, readonly ids: number[], readonly noLocal: boolean, readonly rap: boolean, bare: Buffer | undefined,
} | null

class ClientCursors {
  readonly cursors = new Map<string, PartitionCursor>()
  /** Set when its last cursor write went without an fsync (ADVANCE): a clean shutdown writes the cursors again, synced. */
  unsynced = false
  /** aedes' client of the connection the deliveries go to, and how to write to it; undefined while offline. */
  client: object | undefined
  via: CursorConnection | undefined
  /**
   * Packet id → delivery sent and not acknowledged. Kept when the connection goes: the next connection sends them
   * again with the same ids [MQTT-4.4.0-1] (in memory only: after a restart they go out with new ids, still DUP).
   */
  readonly inflight = new Map<number, Delivery>()
  /** The ids of `inflight` sent on an earlier connection and not sent again yet: they hold no place in the window. */
  readonly reserved = new Set<number>()
  /** The frame bytes of the deliveries sent on this connection and not acknowledged (`inflight` less `reserved`). */
  sentBytes = 0
  /**
   * The batches those deliveries were read from, with how many of them each: a batch stays in memory until the last
   * is acknowledged. `batchBytes`: their payload bytes, each batch once (a session matching one record of each
   * batch holds far more than its frames).
   */
  readonly batches = new Map<RecordColumns, number>()
  batchBytes = 0
  /** While #frame takes deliveries: the window's bytes left for batches not held yet (#take). */
  batchRoom = 0
  limit = 0
  running = false
  again = false
  scheduled = false
  /** Tenant → record topic → how it is delivered, for this connection and its subscriptions. */
  readonly routes = new Map<string, Map<string, Route>>()
  /** Cursor at which the next batch starts taking records, so partitions take turns. */
  turn = 0
  /** Cursors with PUBACKs settled since the last advance (see {@link SessionCursors.attach}). */
  readonly acking = new Set<PartitionCursor>()
  /** Cursors that may have moved, for the session's next cursor write; `writing` while one is in flight. */
  readonly advancing = new Set<PartitionCursor>()
  writing = false
  /** The read of the log in flight, resolving false when the store was closed (see SessionCursors.#read). */
  reading: Promise<boolean> | undefined
  /** The write in flight (settled, failed or not), for {@link SessionCursors.flush}. */
  written: Promise<void> | undefined
  /** Cursors whose write failed, written again WRITE_RETRY_MS later (or by a clean shutdown's flush, sooner). */
  readonly retrying = new Set<PartitionCursor>()

  constructor (readonly clientId: string) {}
}

/** Whether a delivery was the cursors' (a PUBACK they took). */
export interface Cleared { readonly found: boolean }

/** A delivery sent and not acknowledged, handed back as a copy to keep (see {@link SessionCursors.detach}). */
export interface Detached { readonly packet: Readonly<CursorPacket>, readonly messageId: number }

/** The fields of a live packet forwardLive reads. */
export interface LivePacket {
  readonly topic?: unknown
  readonly qos?: unknown
  readonly payload?: unknown
}

/**
 * Cursor ids (`<partition>/<stream>`), made once per stream and partition: forwardLive looks one up for every live
 * copy of a logged message, and a string built per message was flattened and hashed again by each lookup. Bounded by
 * the streams and partitions the config has (started again past CURSOR_IDS_STREAMS streams, after many deletions).
 */
const cursorIds = new Map<string, string[]>()
const CURSOR_IDS_STREAMS = 4096
const cursorId = (stream: string, partition: number): string => {
  let ids = cursorIds.get(stream)
  if (ids === undefined) {
    if (cursorIds.size >= CURSOR_IDS_STREAMS) cursorIds.clear()
    cursorIds.set(stream, ids = [])
  }
  return ids[partition] ??= `${partition}/${stream}`
}

export class SessionCursors {
  readonly #deps: CursorDeps
  readonly #windowBytes: number
  readonly #clients = new Map<string, ClientCursors>()
  /** Connected sessions by the cursors they read, for the append event. */
  readonly #watching = new Map<string, Set<ClientCursors>>()
  /** Per cursor, the log start up to which records the disk budget deleted before it got there were told (onDropped). */
  readonly #droppedTo = new WeakMap<PartitionCursor, number>()
  /** Per cursor, where it started in this process: its value when loaded, or the offset it was created at ({@link startOf}). */
  readonly #startedAt = new WeakMap<PartitionCursor, number>()
  #connector: CursorConnector | undefined
  #unlisten: (() => void) | undefined
  /**
   * The last grant epoch given (see {@link grant}): one counter for every session, above every epoch stored (setup
   * tells each, {@link noteEras}, {@link load}), so an epoch a stored subscription names is never given again.
   */
  #epoch = 0

  constructor (deps: CursorDeps) {
    this.#deps = deps
    this.#windowBytes = deps.windowBytes ?? Infinity
  }

  /** How to reach a client's connection; without one no cursor is delivered (the gateway installs it, hooks/sessions.ts). */
  connectVia (connector: CursorConnector): void {
    this.#connector = connector
  }

  /**
   * A cursor read from disk at startup: records from it up to the log's end now may have been sent (DUP). `fences`:
   * those its `K` value holds ({@link decodeCursorValue}), or `lost` when the value was damaged: the cursor gets one
   * fence at the log's end now, of {@link LOST_FENCES_EPOCH}, so the records below it are matched as logged before
   * every fence the value had (review: without it, a filter changed from QoS 1 to 2 while the cursor was behind skipped
   * its records logged under QoS 1 as copies, which no copy held). It is on disk from the cursor's next write.
   */
  load (clientId: string, stream: string, partition: number, next: number, fences: readonly Fence[] | 'lost' = []): void {
    let dupBelow = next
    let logStart = 0
    try {
      ({ logEndOffset: dupBelow, logStartOffset: logStart } = this.#deps.log.partitionInfo(stream, partition))
    } catch {
      // a stream deleted since: the cursor reads nothing
    }
    const cursor = new PartitionCursor(stream, partition, next, dupBelow)
    if (fences === 'lost') {
      if (next < dupBelow) cursor.fence([{ epoch: LOST_FENCES_EPOCH, offset: dupBelow }])
    } else if (fences.length > 0) {
      cursor.fence([...fences])
      for (const f of fences) this.#epoch = Math.max(this.#epoch, f.epoch)
    }
    this.#startedAt.set(cursor, next)
    // What the disk budget deleted below it before the restart was told then.
    if (next < logStart) this.#droppedTo.set(cursor, logStart)
    this.#client(clientId).cursors.set(cursorId(stream, partition), cursor)
  }

  /** A stored subscription's grant eras, read at startup: no later grant takes an epoch they name. */
  noteEras (eras: readonly number[] | undefined): void {
    if (eras === undefined) return
    for (let i = 0; i < eras.length; i += 2) this.#epoch = Math.max(this.#epoch, eras[i] as number)
  }

  /**
   * A SUBSCRIBE of the session is about to be stored (before its SUBACK): records logged before it may not reach a
   * filter it adds, and records logged before it keep the QoS of a filter it changes (MQTT: a new subscription gets
   * the messages published after it; a replaced one neither loses nor repeats any). Only records the session has not
   * passed yet can be matched again: those of a cursor behind the log's end (behind its value on disk: a restart
   * reads from there). Each such cursor gets a fence at the log's end now, with a new epoch, written in its `K` value
   * (the returned puts, to be written with the subscriptions, so both are durable before the SUBACK). Each
   * subscription gets its eras: for a new filter (or one that was QoS 0) "from this epoch", for one whose QoS changes
   * the eras it had plus "this QoS from this epoch", and as it was when only its other options change. A record below
   * a fence is matched with, per filter, the QoS of the last era granted before that fence's epoch (none before the
   * first), and the current options. Without a cursor behind, no fence and no era is needed: every record the session
   * will read was logged after this. `$share/` subscriptions take no part: a share is read by its consumer group,
   * never by the session's cursors.
   *
   * When nothing was appended to any partition the session's cursors are behind in since its last grant, this one
   * takes that grant's epoch and puts no fence: every fence it would put is there already, at the same offset, and a
   * record below it sees both grants as after it. aedes stores each filter of one SUBSCRIBE with a call of its own
   * (aedes-internals.ts storeAcceptedSubscriptions): a fence per call made N epochs and N fences per cursor behind for
   * N filters, each rewriting a `K` value that grew by one (1,000 filters: 16 KB, about 8 MB written per cursor).
   *
   * Cost: O(subscriptions + the session's cursors); eras are stored while a fence is above a cursor, and those no
   * fence left can select are dropped here.
   */
  grant (clientId: string, subs: readonly GrantedSubscription[]): Grant {
    const state = this.#clients.get(clientId)
    const ops: Grant['ops'] = []
    // Only a new filter or a changed QoS needs a fence; other options (and a filter as it was) apply to every record.
    const changes = subs.some(({ topic, qos, previous }) => !isShare(topic) && (previous === undefined ? qos > 0 : previous.qos !== qos))
    const behind: Array<{ cursor: PartitionCursor, end: number }> = []
    for (const cursor of state?.cursors.values() ?? []) {
      cursor.pruneFences()
      const end = endOf(this.#deps.log, cursor)
      if (changes && cursor.durable < end) behind.push({ cursor, end })
    }
    let epoch = 0
    if (behind.length > 0) {
      const last = behind[0]?.cursor.lastFence()?.epoch
      // Not the fence of a damaged value: a filter granted in its epoch would count as granted before the lost fences.
      if (last !== undefined && last !== LOST_FENCES_EPOCH &&
        behind.every(({ cursor, end }) => cursor.lastFence()?.epoch === last && cursor.lastFence()?.offset === end)) {
        epoch = last
      } else {
        epoch = ++this.#epoch
        for (const { cursor, end } of behind) cursor.fence([...cursor.fences, { epoch, offset: end }])
      }
      // Every grant writes the fences it relies on, also one that reuses the epoch: the write that first carried them
      // may have failed (a full disk), and its fences stay in memory (review: the next SUBSCRIBE, nothing logged
      // between, reused the epoch and wrote no K value, so after a kill -9 its new filter got records logged before
      // it). A K value with one fence is 24 bytes: a SUBSCRIBE of N filters writes N small values per cursor behind.
      for (const { cursor } of behind) ops.push({ type: 'put', key: cursorKey(clientId, cursor), value: cursorValue(cursor) })
    }
    let lowest = Infinity
    for (const cursor of state?.cursors.values() ?? []) if (cursor.fences.length > 0) lowest = Math.min(lowest, (cursor.fences[0] as Fence).epoch)
    const eras = subs.map(({ topic, qos, previous }) => {
      if (lowest === Infinity || isShare(topic)) return undefined // no fence: every record still to read comes after every grant
      if (previous === undefined) return qos === 0 ? undefined : prunedEras([epoch, qos], lowest)
      if (previous.qos === qos) return previous.eras === undefined ? undefined : prunedEras([...previous.eras], lowest)
      // Was QoS 0 everywhere: not subscribed as far as the cursors go (no QoS 0 delivery is theirs).
      const before = previous.eras ?? (previous.qos === 0 ? [] : [0, previous.qos])
      // Changed again in the epoch it last changed in (no append between): that era's QoS is this one.
      const same = before.length >= 2 && before[before.length - 2] === epoch
      return prunedEras(same ? [...before.slice(0, -1), qos] : [...before, epoch, qos], lowest)
    })
    if (state !== undefined) this.#forgetRoutes(state)
    return { ops, eras }
  }

  /**
   * The disk budget deleted the partition's records below `logStart` (the log store tells its retention hold,
   * {@link LogStore.holdRetention}): each session whose cursor had not reached it is told what it lost, once.
   */
  dropped (stream: string, partition: number, logStart: number): void {
    const id = cursorId(stream, partition)
    for (const state of this.#clients.values()) {
      const cursor = state.cursors.get(id)
      if (cursor === undefined) continue
      const from = Math.max(cursor.committed, this.#droppedTo.get(cursor) ?? 0)
      if (from >= logStart) continue
      this.#droppedTo.set(cursor, logStart)
      this.#deps.onDropped?.({ clientId: state.clientId, stream, partition, count: logStart - from })
    }
  }

  has (clientId: string): boolean {
    return (this.#clients.get(clientId)?.cursors.size ?? 0) > 0
  }

  /**
   * Where the session's cursor in the partition started in this process (its value at load, or the offset it was
   * created at); undefined when it has none. A record below that start is never read by it: one that comes for the
   * session after a later record created the cursor (the two in one commit, delivered out of order) is a copy.
   */
  startOf (clientId: string, stream: string, partition: number): number | undefined {
    const cursor = this.#clients.get(clientId)?.cursors.get(cursorId(stream, partition))
    return cursor === undefined ? undefined : this.#startedAt.get(cursor)
  }

  /**
   * Whether the session's cursor in the record's partition reads the record at `position` from the log; undefined
   * when it has no cursor there. Not a cursor that started above the record in this process (a later record created
   * it, or it was loaded past it: it never reads below its start), nor, for a message delivered again after a restart
   * (`late`), one with a fence above the record (a SUBSCRIBE since: below the fence it matches only the filters the
   * record was logged under). A session whose cursor does not read the record gets a copy (persistence.ts #enqueue),
   * and {@link forwardLive} lets that copy's live delivery through.
   */
  reads (clientId: string, position: LogPosition): boolean | undefined {
    const cursor = this.#clients.get(clientId)?.cursors.get(cursorId(position.stream, position.partition))
    return cursor === undefined ? undefined : this.#reads(cursor, position)
  }

  #reads (cursor: PartitionCursor, position: LogPosition): boolean {
    return (this.#startedAt.get(cursor) ?? 0) <= position.offset && !(position.late === true && cursor.fenceTop > position.offset)
  }

  /**
   * Takes the message at `position` for the client instead of a copy: creates the cursor of its partition (the
   * returned write) when the session has none; else nothing is written. A connected session reads it from the log
   * (its live copy is held back, {@link forwardLive}).
   */
  enqueue (clientId: string, position: LogPosition): Promise<void> | undefined {
    const state = this.#client(clientId)
    const id = cursorId(position.stream, position.partition)
    const existing = state.cursors.get(id)
    if (existing !== undefined) return existing.unwritten ? this.#create(state, existing) : undefined
    const cursor = new PartitionCursor(position.stream, position.partition, position.offset, position.offset)
    this.#startedAt.set(cursor, position.offset)
    state.cursors.set(id, cursor)
    if (state.via !== undefined) {
      this.#watch(state, cursor)
      this.#schedule(state)
    }
    return this.#create(state, cursor)
  }

  /**
   * Writes the cursor's key. When that fails the cursor may not stay in memory as if it were on disk (later messages
   * of its partition would be acked with nothing to find them after a kill -9): one that has sent nothing goes, and
   * the partition's next message creates it again; one that has (a connected session read it already, its deliveries
   * are in flight) stays, marked, and the next message writes its key again. Either way that message waits.
   */
  #create (state: ClientCursors, cursor: PartitionCursor): Promise<void> {
    cursor.unwritten = false
    const from = cursor.committed
    return this.#deps.write([{ type: 'put', key: keys.cursor(state.clientId, cursor.stream, cursor.partition), value: cursorValue(cursor) }])
      .catch((err: unknown) => {
        const id = cursorId(cursor.stream, cursor.partition)
        // Dropped meanwhile (the session, or its cursors): nothing is left to undo.
        if (this.#clients.get(state.clientId) !== state || state.cursors.get(id) !== cursor) throw err
        if (cursor.next !== from || cursor.committed !== from || [...state.inflight.values()].some((d) => d.cursor === cursor)) {
          cursor.unwritten = true
          throw err
        }
        state.cursors.delete(id)
        const watching = this.#watching.get(id)
        watching?.delete(state)
        if (watching?.size === 0) this.#watching.delete(id)
        if (state.via === undefined && state.cursors.size === 0 && state.inflight.size === 0) this.#clients.delete(state.clientId)
        throw err
      })
  }

  /**
   * Whether aedes may forward this live copy to the client (authorizeForward asks): not a QoS 1 copy of a logged
   * message the session has a cursor for, which it reads from the log instead, in order.
   */
  forwardLive (client: object & { readonly id: string }, packet: LivePacket): boolean {
    const state = this.#clients.get(client.id)
    // aedes may deliver before this connection takes over the session's cursors (the retained messages of a SUBSCRIBE
    // sent with the CONNECT): its id comes from a counter that must already skip the ids held for sending again.
    if (state !== undefined && state.client !== client && state.inflight.size > 0) this.#connector?.(client)?.conn.holdIds?.(this, this.#held(client.id))
    // Deliveries framed by this module never pass here: only aedes' copies of logged messages carry a position.
    const position = state === undefined ? undefined : logPositionOf(packet)
    if (state === undefined || position === undefined || typeof packet.topic !== 'string') return true
    const cursor = state.cursors.get(cursorId(position.stream, position.partition))
    if (cursor === undefined) return true
    // A QoS 2 delivery is queued as a copy, not a cursor (outgoingEnqueueCombi, the same rule).
    if (Math.min(Number(packet.qos ?? 0), this.#deps.grantedQos(client.id, packet.topic)) !== 1) return true
    // A record the cursor does not read ({@link reads}): the session got a copy, and it goes out now.
    return !this.#reads(cursor, position)
  }

  /**
   * Starts delivering the session's cursors to this connection (aedes asks for the session's queue right after the
   * CONNACK; persistence's outgoingStream calls this once the copies are handed over). The previous connection's
   * unacknowledged deliveries are sent again, with DUP. `resumed`: the connection took over a stored session, which
   * it reads while connected even when the session ends with it (MQTT 5 Clean Start 0 with Session Expiry 0).
   */
  attach (client: object & { readonly id: string, readonly clean?: boolean }, resumed = false): void {
    // aedes' client.clean (docs/Client.md): a session that ends with its connection keeps no cursors of its own.
    // Also without cursors yet: the session's next logged message creates one, read from the log while connected.
    if (client.clean === true && !resumed) return
    if (this.#connector === undefined) {
      // A persistence used without the gateway's hooks would never deliver its cursors.
      if (this.has(client.id)) throw new Error(`no connection to deliver the cursors of ${client.id} to (SessionCursors.connectVia)`)
      return
    }
    const via = this.#connector(client)
    if (via === undefined) return // the connection is already gone
    const state = this.#client(client.id)
    this.#release(state)
    state.client = client
    state.via = via
    const receiveMaximum = Number.isSafeInteger(via.receiveMaximum) && via.receiveMaximum > 0 ? via.receiveMaximum : this.#deps.window
    state.limit = Math.min(this.#deps.window, receiveMaximum)
    for (const cursor of state.cursors.values()) {
      cursor.restart()
      this.#watch(state, cursor)
    }
    // What the last connection left unacknowledged goes out again first in each partition, with its ids [MQTT-4.4.0-1].
    state.reserved.clear()
    forgetSent(state)
    for (const [id, { cursor, offset }] of state.inflight) {
      if (state.cursors.get(cursorId(cursor.stream, cursor.partition)) !== cursor) {
        state.inflight.delete(id)
        continue
      }
      cursor.resend.set(offset, id)
      state.reserved.add(id)
    }
    // aedes takes ids from the client's counter for deliveries that never pass the persistence (retained messages on
    // SUBSCRIBE), so freeId cannot move them: the counter skips the held ones, also after it wraps.
    via.conn.holdIds?.(this, this.#held(client.id))
    // PUBACKs straight from the socket's bytes: each settles its delivery, and each cursor advances once per read.
    via.takePubacks?.({
      take: (id) => state.client === client && this.#acked(state, id),
      taken: () => {
        for (const cursor of state.acking) state.advancing.add(cursor)
        state.acking.clear()
        // The next deliveries go out first, then the cursor write starts: its LevelDB batch is built on this thread, and
        // the client works on the deliveries meanwhile.
        this.#schedule(state, true)
        queueMicrotask(() => { this.#writeAdvancesIdle(state) })
      },
    })
    this.#unlisten ??= this.#deps.log.onAppend((e) => this.#appended(e))
    via.conn.stream.once('close', () => { if (state.client === client) this.#release(state, true) })
    this.#schedule(state)
  }

  /** The client's subscriptions changed: topics are matched again. */
  subscriptionsChanged (clientId: string): void {
    const state = this.#clients.get(clientId)
    if (state === undefined) return
    this.#forgetRoutes(state)
    if (state.via !== undefined) this.#schedule(state)
  }

  #forgetRoutes (state: ClientCursors): void {
    state.routes.clear()
    for (const cursor of state.cursors.values()) cursor.fencedRoutes = undefined
  }

  /**
   * A packet id aedes may use for a delivery of its own: `messageId` unless a cursor delivery holds it, else a free
   * one of the client's counter.
   */
  freeId (client: object & { readonly id: string }, messageId: number): number {
    const state = this.#clients.get(client.id)
    if (state === undefined || !state.inflight.has(messageId)) return messageId
    // Ids held for a connection's deliveries outlive it (sent again with them): a new connection may not take them either.
    const via = state.client === client ? state.via : this.#connector?.(client)
    return via === undefined ? messageId : this.#allocate(state, via)
  }

  /**
   * Takes the client's sent, unacknowledged deliveries out of the cursors (which advance past them) and returns
   * them, for the caller to keep as copies. Called when the client unsubscribes: the read from the log filters by the
   * subscriptions held, but a delivery sent under a dropped one must still be resent until acknowledged [MQTT-4.4.0-1].
   */
  detach (clientId: string): Detached[] {
    const state = this.#clients.get(clientId)
    if (state === undefined) return []
    this.#forgetRoutes(state)
    const out: Detached[] = []
    const broker = this.#deps.broker()
    const now = (this.#deps.now ?? Date.now)()
    const touched = new Set<PartitionCursor>()
    for (const [messageId, { cursor, record }] of state.inflight) {
      const properties = headersToProperties(record.headers, { now, timestamp: record.timestamp })
      const counter = broker === undefined ? 0 : (broker.counter = (broker.counter ?? 0) + 1)
      out.push({
        messageId,
        packet: {
          cmd: 'publish', topic: mountTopic(cursor.tenant, record.topic), payload: Buffer.from(record.payload), qos: 1, retain: false, dup: true,
          brokerId: broker?.id ?? '', brokerCounter: counter, messageId, ...(properties === undefined ? {} : { properties }),
        },
      })
      cursor.acked.add(record.offset)
      touched.add(cursor)
    }
    state.inflight.clear()
    state.reserved.clear()
    forgetSent(state)
    for (const cursor of state.cursors.values()) cursor.resend.clear()
    for (const cursor of touched) this.#advance(state, cursor)
    if (state.via !== undefined) this.#schedule(state)
    return out
  }

  /**
   * A PUBACK: the delivery is done and the cursor advances past it. Not found when the packet id is not one of the
   * cursors' deliveries on this connection (an unknown or repeated PUBACK changes nothing).
   */
  clear (client: object & { readonly id: string }, packet: { cmd?: unknown, messageId?: unknown }): Cleared {
    const state = this.#clients.get(client.id)
    // aedes also clears a PUBLISH of its own it did not forward: never one of these (they never pass through aedes).
    if (state === undefined || state.client !== client || packet.cmd === 'publish' || typeof packet.messageId !== 'number') return { found: false }
    if (!this.#acked(state, packet.messageId)) return { found: false }
    for (const cursor of state.acking) this.#advance(state, cursor)
    state.acking.clear()
    this.#schedule(state)
    return { found: true }
  }

  /** Settles the delivery with this packet id, if it is one; its cursor is left in `acking`, to advance. */
  #acked (state: ClientCursors, messageId: number): boolean {
    const delivery = state.inflight.get(messageId)
    if (delivery === undefined) return false
    state.inflight.delete(messageId)
    if (state.reserved.delete(messageId)) delivery.cursor.resend.delete(delivery.offset)
    else sentAcked(state, delivery)
    delivery.cursor.ack(delivery.offset)
    state.acking.add(delivery.cursor)
    return true
  }

  /**
   * Drops the cursors of a session left without subscriptions (their unacknowledged deliveries were detached
   * first), with the writes that delete them, so they hold no retention; the connection stays as it is.
   */
  dropCursors (clientId: string): Array<{ type: 'del', key: Buffer }> {
    const state = this.#clients.get(clientId)
    if (state === undefined) return []
    const ops = [...state.cursors.values()].map((c) => ({ type: 'del' as const, key: keys.cursor(clientId, c.stream, c.partition) }))
    this.#unwatch(state)
    state.cursors.clear()
    return ops
  }

  /** Drops the session's cursors (a clean session), with the writes that delete them. */
  drop (clientId: string): Array<{ type: 'del', key: Buffer }> {
    const state = this.#clients.get(clientId)
    if (state === undefined) return []
    this.#clients.delete(clientId)
    this.#release(state)
    return [...state.cursors.values()].map((c) => ({ type: 'del' as const, key: keys.cursor(clientId, c.stream, c.partition) }))
  }

  /**
   * The lowest offset any session still needs in the partition: the cursors hold retention like consumer groups
   * (the log store asks, {@link LogStore.holdRetention}).
   */
  floor (stream: string, partition: number): number | undefined {
    const id = cursorId(stream, partition)
    let floor: number | undefined
    for (const state of this.#clients.values()) {
      const cursor = state.cursors.get(id)
      if (cursor !== undefined && (floor === undefined || cursor.committed < floor)) floor = cursor.committed
    }
    return floor
  }

  /** The client's cursors: per stream and partition, the next offset it has not acknowledged (the value kept on disk). */
  cursorsOf (clientId: string): Array<{ stream: string, partition: number, next: number }> {
    const state = this.#clients.get(clientId)
    if (state === undefined) return []
    return [...state.cursors.values()].map((c) => ({ stream: c.stream, partition: c.partition, next: c.committed }))
  }

  /**
   * Whether the connected session has nothing to write now: no delivery run is under way or due, and its window is
   * full or every cursor has reached the log's end. False while it is offline.
   */
  settled (clientId: string): boolean {
    const state = this.#clients.get(clientId)
    if (state?.via === undefined || state.running || state.scheduled) return false
    if (windowFull(state, this.#windowBytes)) return true
    return [...state.cursors.values()].every((c) => !c.hasAhead() && c.next >= endOf(this.#deps.log, c))
  }

  /** Per stream: sessions with a cursor into it, and the records they have not acknowledged (log end − cursor, summed). */
  lag (): Array<{ stream: string, sessions: number, lagMessages: number }> {
    const byStream = new Map<string, { sessions: Set<ClientCursors>, lagMessages: number }>()
    for (const state of this.#clients.values()) {
      for (const cursor of state.cursors.values()) {
        let s = byStream.get(cursor.stream)
        if (s === undefined) byStream.set(cursor.stream, s = { sessions: new Set(), lagMessages: 0 })
        s.sessions.add(state)
        // A cursor below the log start (the disk budget deleted what it had not reached) lags by what is left to read.
        const info = partitionInfo(this.#deps.log, cursor)
        if (info !== undefined) s.lagMessages += Math.max(0, info.logEndOffset - Math.max(cursor.committed, info.logStartOffset))
      }
    }
    return [...byStream].map(([stream, s]) => ({ stream, sessions: s.sessions.size, lagMessages: s.lagMessages }))
  }

  /** Ends every delivery in progress (the persistence is being destroyed). */
  close (): void {
    this.#unlisten?.()
    this.#unlisten = undefined
    for (const state of this.#clients.values()) this.#release(state)
    this.#clients.clear()
  }

  #client (clientId: string): ClientCursors {
    let state = this.#clients.get(clientId)
    if (state === undefined) {
      state = new ClientCursors(clientId)
      this.#clients.set(clientId, state)
    }
    return state
  }

  /**
   * The ids the client's counter must skip: this session's deliveries in flight and its queued copies' ids (looked up
   * each time: a dropped session holds none).
   */
  #held (clientId: string): (messageId: number) => boolean {
    return (messageId) => this.#clients.get(clientId)?.inflight.has(messageId) === true || this.#deps.busy?.(clientId, messageId) === true
  }

  /** The connection is gone (closed, replaced, or the session dropped): its deliveries in flight wait for the next one. */
  #release (state: ClientCursors, forgetIfEmpty = false): void {
    this.#unwatch(state)
    state.client = undefined
    state.via = undefined
    // What it left unacknowledged goes out again on the next connection, read from the log again: until then each
    // keeps its record, not the batch it came from.
    for (const delivery of state.inflight.values()) delivery.keep()
    forgetSent(state)
    // Both caches hold this connection's answers (deliveredTopic: its user's read ACL): the next connection of the
    // session, maybe another user's, asks again; an offline session keeps neither.
    this.#forgetRoutes(state)
    // An offline session without cursors keeps nothing here (its next logged message makes them again).
    if (forgetIfEmpty && state.cursors.size === 0 && this.#clients.get(state.clientId) === state) this.#clients.delete(state.clientId)
  }

  #watch (state: ClientCursors, cursor: PartitionCursor): void {
    const id = cursorId(cursor.stream, cursor.partition)
    let set = this.#watching.get(id)
    if (set === undefined) this.#watching.set(id, set = new Set())
    set.add(state)
  }

  #unwatch (state: ClientCursors): void {
    for (const cursor of state.cursors.values()) {
      const id = cursorId(cursor.stream, cursor.partition)
      const set = this.#watching.get(id)
      set?.delete(state)
      if (set?.size === 0) this.#watching.delete(id)
    }
  }

  #appended (e: AppendEvent): void {
    for (const state of this.#watching.get(cursorId(e.stream, e.partition)) ?? []) this.#schedule(state)
  }

  /**
   * Runs the session's delivery once in the next turn: a run of PUBACKs (aedes handles a chunk of packets at once) or
   * appends wakes it once. `soon`: the PUBACKs of one socket read, taken from its bytes (the run is complete): in
   * this turn, once the read is handled, so the next deliveries go out with this turn's writes, not a turn later.
   */
  #schedule (state: ClientCursors, soon = false): void {
    if (state.scheduled) return
    state.scheduled = true
    const run = (): void => {
      state.scheduled = false
      this.#pump(state)
    }
    if (soon) queueMicrotask(run)
    else setImmediate(run)
  }

  /** One delivery loop per session at a time; a wake-up while it runs makes it go round again. */
  #pump (state: ClientCursors): void {
    if (state.running) { state.again = true; return }
    state.running = true
    void this.#deliver(state).catch((err: unknown) => {
      if (!isStoreError(err, 'STORE_CLOSED')) this.#deps.onReadError?.(err)
    }).finally(() => {
      state.running = false
      if (state.again) { state.again = false; this.#pump(state) }
    })
  }

  /**
   * Writes the session's records while its window has room and the log has more; returns when caught up or full.
   * What is read ahead goes out first; a partition is read (a chunk) only when nothing read is left to send, so the
   * first records of a drain leave after one read, not one per partition. Once fewer than PREFETCH_WINDOWS windows of
   * records are left to send, the next chunk of a partition with none left is read while they go out or wait for
   * their PUBACKs ({@link #prefetch}): a drain waited for each read with its window empty, about a hundred times per
   * 100 k messages.
   */
  async #deliver (state: ClientCursors): Promise<void> {
    for (;;) {
      state.again = false
      const { client, via } = state
      if (client === undefined || via === undefined || via.conn.closed || via.conn.stream.destroyed === true) return
      if (windowFull(state, this.#windowBytes)) return // woken by the PUBACKs
      const cursors = [...state.cursors.values()]
      if (cursors.some((c) => c.hasAhead() && mayTake(state, c))) {
        const out = this.#frame(state, via)
        this.#prefetch(state, client, cursors)
        let more = true
        if (out !== null) {
          more = via.conn.stream.write(out)
          via.flush?.()
        }
        // After the write: the client works on these deliveries while this thread builds the cursor write's batch.
        this.#writeAdvancesIdle(state)
        if (!more) await drained(via.conn.stream)
        continue
      }
      const reading = state.reading ?? this.#read(state, client, cursors)
      if (reading === undefined) return // caught up: woken by the next append
      // A failed read was told and its partition waits (see #read): the others go on. A closed store ends the run.
      if (!await reading || state.client !== client) return
    }
  }

  /** After a failed read: the partition is left alone for READ_RETRY_MS, then the session's delivery runs again. */
  #retryLater (state: ClientCursors, cursor: PartitionCursor): void {
    cursor.failedUntil = performance.now() + READ_RETRY_MS
    setTimeout(() => {
      if (this.#clients.get(state.clientId) === state && state.via !== undefined) this.#schedule(state)
    }, READ_RETRY_MS + 1).unref()
  }

  /** Starts reading the next chunk while what is read ahead goes out, when little is left (see {@link #deliver}). */
  #prefetch (state: ClientCursors, client: object, cursors: readonly PartitionCursor[]): void {
    if (state.reading !== undefined) return
    let left = 0
    for (const cursor of cursors) if (mayTake(state, cursor)) left += cursor.aheadLeft()
    if (left >= PREFETCH_WINDOWS * state.limit) return
    // Nobody waits for it: a failure is told by #read, and the partition is read again when its turn comes.
    void this.#read(state, client, cursors)
  }

  /**
   * Reads a chunk of the next partition in turn that has nothing read ahead and more in the log: one read in flight
   * per session (`state.reading`). It resolves false when the store was closed; a read that failed otherwise is told
   * (onReadError) once, here, for a prefetch and a run's own read alike, and its partition is left alone for
   * READ_RETRY_MS. Undefined when there is none to read.
   */
  #read (state: ClientCursors, client: object, cursors: readonly PartitionCursor[]): Promise<boolean> | undefined {
    const { log } = this.#deps
    const now = performance.now()
    for (let k = 0; k < cursors.length; k++) {
      const cursor = cursors[(state.turn + k) % cursors.length] as PartitionCursor // partitions take turns
      if (!mayTake(state, cursor) || cursor.hasAhead() || cursor.failedUntil > now) continue
      const info = partitionInfo(log, cursor)
      if (info === undefined) this.#forgetHeld(state, cursor, Infinity) // the stream is gone, and what it held
      if (info === undefined || cursor.next >= info.logEndOffset) continue
      const from = cursor.next
      const reading = log.readColumns(cursor.stream, cursor.partition, Math.max(from, info.logStartOffset),
        { maxRecords: this.#deps.readRecords ?? 1000, maxBytes: CHUNK_BYTES })
        .then(({ batches, nextOffset }) => {
          // Another connection, or the cursor moved on meanwhile: what was read is not its next records.
          if (state.client !== client || cursor.next !== from || cursor.hasAhead()) return true
          if (cursor.next < info.logStartOffset) this.#forgetHeld(state, cursor, info.logStartOffset)
          cursor.readAhead(batches, batches.length === 0 ? info.logEndOffset : nextOffset)
          if (batches.length === 0) cursor.next = Math.max(cursor.next, info.logEndOffset)
          return true
        }, (err: unknown) => {
          if (isStoreError(err, 'STORE_CLOSED')) return false
          this.#deps.onReadError?.(err)
          this.#retryLater(state, cursor)
          return true
        })
        .finally(() => { if (state.reading === reading) state.reading = undefined })
      state.reading = reading
      return reading
    }
    return undefined
  }

  /**
   * Takes up to the window's room of records read ahead, partitions in turn, skipping those not for this session,
   * and frames them into one buffer (null when every record taken was skipped): each PUBLISH straight from the
   * batch's columns, its payload copied from the stored bytes.
   */
  #frame (state: ClientCursors, via: CursorConnection): Buffer | null {
    const room = Math.min(state.limit - sentUnacked(state), BATCH_RECORDS)
    // Bytes of frames for this write: the window's room in bytes (more than 0: #deliver checked), at most a batch's.
    const maxSize = Math.min(this.#windowBytes - heldBytes(state), BATCH_BYTES)
    state.batchRoom = this.#windowBytes - state.batchBytes
    const now = (this.#deps.now ?? Date.now)()
    const mqtt5 = via.conn.mqtt5 === true
    const picked: Delivery[] = []
    let size = 0
    const cursors = [...state.cursors.values()]
    for (let k = 0; k < cursors.length && picked.length < room && size < maxSize; k++) {
      const cursor = cursors[(state.turn + k) % cursors.length] as PartitionCursor
      if (!mayTake(state, cursor)) continue
      const first = cursor.next
      size = this.#take(state, via, cursor, picked, room, size, maxSize, now, mqtt5)
      // Skipped records move the cursor too, once nothing below them is unacknowledged: #deliver writes it after `out`.
      if (cursor.next !== first) state.advancing.add(cursor)
      if (cursor.ahead.length > 0 && !cursor.hasAhead()) {
        cursor.next = Math.max(cursor.next, cursor.aheadEnd)
        cursor.readAhead([], cursor.aheadEnd)
      }
    }
    state.turn++
    return picked.length === 0 ? null : this.#write(state, via, picked, size)
  }

  /**
   * Takes the records the cursor read ahead into `picked`, up to `room` deliveries in all and `maxSize` bytes of
   * frames (`size`, returned as it grows; the record that crosses it is taken, so one always goes). Its own function,
   * and so is {@link #write}: a fresh gateway compiles the drain path during its first drain, on the same two cores as
   * the client. When #frame held both loops, V8 compiled it as one graph with everything inlined (52–148 ms of
   * TurboFan at load 7–8, --trace-opt), sometimes before the code after its first loop had run, and threw that away
   * when it did ("Insufficient type feedback") to compile it again; split, the four functions took 40–60 ms in the
   * same minutes, and #frame and #take were not deoptimized.
   */
  #take (state: ClientCursors, via: CursorConnection, cursor: PartitionCursor, picked: Delivery[], room: number, size: number,
    maxSize: number, now: number, mqtt5: boolean): number {
    const routes = this.#routes(state, cursor.tenant)
    let last: RecordColumns | null = null
    while (picked.length < room && size < maxSize && state.batchRoom > 0 && cursor.hasAhead()) {
      const batch = cursor.ahead[cursor.aheadBatch] as RecordColumns
      const i = cursor.aheadPos++
      if (cursor.aheadPos >= batch.end) {
        cursor.aheadBatch++
        cursor.aheadPos = cursor.aheadBatch < cursor.ahead.length ? (cursor.ahead[cursor.aheadBatch] as RecordColumns).start : 0
      }
      const offset = batch.baseOffset + i
      if (offset < cursor.next) continue
      cursor.next = offset + 1
      // Sent on an earlier connection and not acknowledged: it goes out with the id it had, or gives it up.
      const held = cursor.resend.size === 0 ? undefined : cursor.resend.get(offset)
      if (held !== undefined) {
        cursor.resend.delete(offset)
        state.reserved.delete(held)
      }
      const pick = cursor.acked.size > 0 && cursor.acked.delete(offset) ? null : this.#pick(state, via, cursor, routes, batch, i, now, mqtt5, held)
      if (pick === null) {
        if (held !== undefined) state.inflight.delete(held)
        continue
      }
      const length = pick.bytes
      // Too large for the client: not sent, as if it had been [MQTT-3.1.2-25]; the cursor moves past it, as past an expired one.
      if (via.maximumPacketSize !== undefined && length > via.maximumPacketSize) {
        if (held !== undefined) state.inflight.delete(held)
        this.#deps.onOversized?.(cursor.tenant)
        continue
      }
      picked.push(pick)
      size += length
      // A batch this session holds no delivery of yet takes its bytes from the window (a cursor's batches come in order).
      if (pick.batch !== last) {
        last = pick.batch
        if (last !== null && !state.batches.has(last)) state.batchRoom -= last.payloadBytes.byteLength
      }
    }
    return size
  }

  /** Frames the deliveries taken into one buffer of `size` bytes, each PUBLISH's payload copied from the stored bytes. */
  #write (state: ClientCursors, via: CursorConnection, picked: readonly Delivery[], size: number): Buffer {
    const out = Buffer.allocUnsafe(size)
    const to = new DataView(out.buffer, out.byteOffset, out.byteLength)
    let from: DataView | undefined
    let fromBatch: RecordColumns | undefined
    let at = 0
    // The deliveries of one batch come one after another: the session's hold on it is counted once per run.
    let run: RecordColumns | undefined
    let runLength = 0
    for (const delivery of picked) {
      const { cursor, index, offset } = delivery
      const batch = delivery.batch as RecordColumns // just picked from a batch read ahead (#pick)
      const id = delivery.id ?? this.#allocate(state, via)
      state.inflight.set(id, delivery)
      state.sentBytes += delivery.bytes
      if (batch !== run) {
        if (run !== undefined) holdBatch(state, run, runLength)
        run = batch
        runLength = 0
      }
      runLength++
      cursor.sent(offset)
      const start = batch.payloadStart(index)
      const length = batch.payloadLength(index)
      at = writePublishHeader(out, at, delivery.topic, length, 1, id, delivery.retain, delivery.properties, offset < cursor.dupBelow)
      if (length > SMALL_PAYLOAD) {
        at += batch.payloadBytes.copy(out, at, start, start + length)
        continue
      }
      if (fromBatch !== batch) {
        fromBatch = batch
        from = new DataView(batch.payloadBytes.buffer, batch.payloadBytes.byteOffset, batch.payloadBytes.byteLength)
      }
      copySmall(to, at, from as DataView, start, length)
      at += length
    }
    if (run !== undefined) holdBatch(state, run, runLength)
    return out
  }

  /**
   * The delivery of record `i` of `batch` to this session, or null when it is not one: QoS 0 records, topics no
   * subscription matches and topics it may not read are not this session's; QoS 2 deliveries are copies. `held`: the
   * packet id it was sent with on an earlier connection (its onward delivery started: it is sent again even if it
   * expired since).
   */
  #pick (state: ClientCursors, via: CursorConnection, cursor: PartitionCursor, routes: Map<string, Route>, batch: RecordColumns, i: number,
    now: number, mqtt5: boolean, held: number | undefined): Delivery | null {
    // A batch interns its topics: the route of each is looked up once per batch (and per routes map: a change of
    // subscriptions makes a new one).
    const offset = batch.baseOffset + i
    let route: Route | undefined
    if (offset < cursor.fenceTop) {
      // Logged before a SUBSCRIBE that changed the subscriptions: memoized as above, per fence too.
      const threshold = cursor.threshold(offset)
      const cache = cursor.fencedRoutes ??= new Map()
      if (cursor.fencedMemoBatch !== batch || cursor.fencedMemoRoutes !== cache || cursor.fencedMemoThreshold !== threshold) {
        cursor.fencedMemoBatch = batch
        cursor.fencedMemoRoutes = cache
        cursor.fencedMemoThreshold = threshold
        cursor.fencedMemo.length = 0
      }
      const t = batch.topicIndex(i)
      route = t < cursor.fencedMemo.length ? cursor.fencedMemo[t] : undefined
      if (route === undefined) cursor.fencedMemo[t] = route = this.#fencedRoute(state, via, cursor, cache, batch.topic(i), threshold)
    } else {
      if (cursor.memoBatch !== batch || cursor.memoRoutes !== routes) {
        cursor.memoBatch = batch
        cursor.memoRoutes = routes
        cursor.memo.length = 0
      }
      const t = batch.topicIndex(i)
      route = t < cursor.memo.length ? cursor.memo[t] : undefined
      if (route === undefined) cursor.memo[t] = route = this.#route(state, via, routes, cursor.tenant, batch.topic(i))
    }
    if (route === null || Math.min(batch.qos(i), route.qos) !== 1) return null
    if (route.noLocal && batch.clientId(i) === via.conn.clientId) return null // its own message
    const headers = batch.headerSet(i) === 0 ? null : batch.headers(i)
    const timestamp = batch.timestamp(i)
    if (held === undefined && headers !== null && expiredAt(headers, timestamp, now)) { // [MQTT-3.3.2-5]
      this.#deps.onExpired?.(cursor.tenant)
      return null
    }
    let properties: Buffer | undefined
    if (mqtt5) {
      properties = headers === null
        ? route.bare ??= recordProperties(cursor.partition, { offset, timestamp }, now, { location: false, subscriptionIds: route.ids })
        : recordProperties(cursor.partition, { offset, timestamp, headers }, now, { location: false, subscriptionIds: route.ids })
    }
    const retain = route.rap && headers?.[RETAIN_HEADER] === '1'
    const bytes = publishPacketLength(route.topic.length, batch.payloadLength(i), 1, properties?.length ?? 0)
    return new Delivery(cursor, batch, i, offset, route.topic, properties, held, bytes, retain)
  }

  /** The routes of a tenant's topics for this connection and its subscriptions. */
  #routes (state: ClientCursors, tenant: string): Map<string, Route> {
    let byTopic = state.routes.get(tenant)
    if (byTopic === undefined) state.routes.set(tenant, byTopic = new Map())
    return byTopic
  }

  /** How the connection gets a record's topic: the QoS granted, its delivered topic, its subscription identifiers. */
  #route (state: ClientCursors, via: CursorConnection, byTopic: Map<string, Route>, tenant: string, topic: string): Route {
    let route = byTopic.get(topic)
    if (route === undefined) {
      const mounted = mountTopic(tenant, topic)
      const qos = this.#deps.grantedQos(state.clientId, mounted)
      const delivered = qos > 0 ? via.deliveredTopic(mounted) : null
      route = delivered === null
        ? null
        : {
            topic: Buffer.from(delivered),
            qos,
            ids: this.#deps.subscriptionIds?.(state.clientId, mounted) ?? [],
            noLocal: this.#deps.noLocal?.(state.clientId, mounted) ?? false,
            rap: this.#deps.retainAsPublished?.(state.clientId, mounted) ?? false,
            bare: undefined,
          }
      if (byTopic.size >= CACHE_ENTRIES) byTopic.clear()
      byTopic.set(topic, route)
    }
    return route
  }

  /**
   * How the connection gets a record of the cursor's partition logged before the SUBSCRIBE of grant `threshold` (see
   * {@link grant}): per matching subscription, the QoS of its last era granted before then. Cached per cursor, by
   * threshold and topic, until the subscriptions or fences change.
   */
  #fencedRoute (state: ClientCursors, via: CursorConnection, cursor: PartitionCursor, cache: Map<string, Route>, topic: string,
    threshold: number): Route {
    const id = `${threshold}\u0000${topic}`
    let route = cache.get(id)
    if (route !== undefined) return route
    const mounted = mountTopic(cursor.tenant, topic)
    let qos = 0
    let noLocal = true
    let rap = false
    const ids: number[] = []
    // A record below the fence of a damaged value was logged before the grant of the next fence, if any; the epochs of
    // the fences lost with the value are not known (see load).
    const lost = threshold === LOST_FENCES_EPOCH
    const grantedAfter = lost ? cursor.fences[1]?.epoch ?? Infinity : threshold
    for (const sub of this.#deps.subscriptionsMatching(state.clientId, mounted)) {
      const then = sub.eras === undefined ? sub.qos : lost ? lostFencesQos(sub.eras, grantedAfter) : eraQos(sub.eras, threshold)
      // Not subscribed then (granted later): none of its options apply either.
      if (sub.eras !== undefined && then === 0 && (sub.eras[0] as number) >= grantedAfter) continue
      if (sub.subscriptionIdentifier !== undefined) ids.push(sub.subscriptionIdentifier)
      if (then === 0) continue
      qos = Math.max(qos, then)
      if (sub.nl !== true) noLocal = false
      if (sub.rap === true) rap = true
    }
    const delivered = qos > 0 ? via.deliveredTopic(mounted) : null
    route = delivered === null ? null : { topic: Buffer.from(delivered), qos, ids, noLocal, rap, bare: undefined }
    if (cache.size >= CACHE_ENTRIES) cache.clear()
    cache.set(id, route)
    return route
  }

  /** A packet id of the client's counter that neither a cursor delivery nor a queued copy holds. */
  #allocate (state: ClientCursors, via: CursorConnection): number {
    for (;;) {
      const id = via.conn.nextMessageId()
      if (!state.inflight.has(id) && this.#deps.busy?.(state.clientId, id) !== true) return id
    }
  }

  /** Deliveries held for sending again below `offset` are gone from the log (the disk budget deleted them): their ids are free. */
  #forgetHeld (state: ClientCursors, cursor: PartitionCursor, offset: number): void {
    for (const [at, id] of cursor.resend) {
      if (at >= offset) continue
      cursor.resend.delete(at)
      state.reserved.delete(id)
      state.inflight.delete(id)
    }
  }

  /**
   * The cursor may have moved: the session writes its cursors' new values in one write, one write in flight per
   * session; what moves meanwhile goes in the next (a drain's PUBACKs move every partition's cursor: one write each
   * cost a group-commit entry per partition and per socket read). A write per PUBACK bound (1,000 PUBACKs or 20 ms)
   * cut the drain's writes from about 600 to 100 per 100 k messages, with no change in its rate measurable beside
   * Mosquitto, and meant up to 1,000 deliveries the client had acknowledged coming again after a kill -9; the writes
   * follow each other instead, so only those acknowledged while one write is in flight can.
   */
  #advance (state: ClientCursors, cursor: PartitionCursor): void {
    state.advancing.add(cursor)
    this.#writeAdvancesIdle(state)
  }

  /** Starts the session's cursor write of what moved, unless one is in flight (it starts the next when it settles). */
  #writeAdvancesIdle (state: ClientCursors): void {
    if (!state.writing && state.advancing.size > 0) this.#writeAdvances(state)
  }

  /**
   * Writes every session's cursor advances now, then its cursors once more with an fsync, and resolves once they are
   * written (or failed: onWriteError was told): the persistence's destroy, so a clean shutdown sends nothing
   * acknowledged again, not even after a power loss.
   */
  async flush (): Promise<void> {
    // Bounded: each round waits for the writes in flight, which start the writes of what moved meanwhile; nothing
    // moves once the broker is closed.
    for (let round = 0; round < 10; round++) {
      const writes: Array<Promise<void>> = []
      for (const state of this.#clients.values()) {
        // A write that failed is not left to its timer: the shutdown writes it now, or its acknowledged deliveries come again.
        for (const cursor of state.retrying) state.advancing.add(cursor)
        state.retrying.clear()
        if (!state.writing && state.advancing.size > 0) this.#writeAdvances(state)
        if (state.written !== undefined) writes.push(state.written)
      }
      if (writes.length === 0) break
      await Promise.all(writes)
    }
    // An fsync of the last advances: a synced commit does not sync an earlier write-ahead log LevelDB closed unsynced,
    // so the cursors are written again rather than relying on a later commit.
    const synced: Array<Promise<void>> = []
    for (const state of this.#clients.values()) {
      if (!state.unsynced) continue
      state.unsynced = false
      const ops = [...state.cursors.values()].filter((c) => !c.unwritten)
        .map((c) => ({ type: 'put' as const, key: cursorKey(state.clientId, c), value: cursorValue(c) }))
      if (ops.length > 0) synced.push(this.#deps.write(ops).catch((err: unknown) => { this.#deps.onWriteError?.(err) }))
    }
    await Promise.all(synced)
  }

  #writeAdvances (state: ClientCursors): void {
    const ops: Array<{ type: 'put', key: Buffer, value: Buffer }> = []
    const moved: Array<{ cursor: PartitionCursor, from: number, to: number }> = []
    // A session dropped, or a cursor dropped, writes nothing more (its deletion was written after what is in flight).
    const live = this.#clients.get(state.clientId) === state
    for (const cursor of state.advancing) {
      if (!live || state.cursors.get(cursorId(cursor.stream, cursor.partition)) !== cursor) continue
      const target = cursor.target()
      if (target <= cursor.committed) continue
      moved.push({ cursor, from: cursor.committed, to: target })
      cursor.committed = target
      ops.push({ type: 'put', key: cursorKey(state.clientId, cursor), value: cursorValue(cursor) })
    }
    state.advancing.clear()
    if (ops.length === 0) return
    state.writing = true
    // No fsync of their own: a cursor advance lost with the OS (not with the process: the OS has it) only sends the
    // deliveries after the last written one again, with DUP; records are never skipped for it.
    state.unsynced = true
    state.written = this.#deps.write(ops, ADVANCE).then(() => {
      // Fences the written values passed: not written again (kept in memory until then, as a failed write restores them).
      for (const { cursor, to } of moved) {
        cursor.durable = Math.max(cursor.durable, to)
        cursor.pruneFences()
      }
    }, (err: unknown) => {
      this.#deps.onWriteError?.(err)
      // The session persistence wraps the store's errors (GW_SESSION_WRITE_FAILED, with the store's as the cause).
      if (isStoreError(err, 'STORE_CLOSED') || isStoreError((err as { cause?: unknown } | null)?.cause, 'STORE_CLOSED')) return
      // Not on disk: the cursors are as they were there (they hold retention from there, and show that lag), and are
      // written again in a while: a drain's last advance has no later one to carry it, and after a kill -9 every
      // delivery since the last written one would come again.
      for (const { cursor, from } of moved) {
        cursor.committed = from
        state.retrying.add(cursor)
      }
      setTimeout(() => {
        if (this.#clients.get(state.clientId) !== state || state.retrying.size === 0) return
        for (const cursor of state.retrying) state.advancing.add(cursor)
        state.retrying.clear()
        if (!state.writing) this.#writeAdvances(state)
      }, WRITE_RETRY_MS).unref()
    }).finally(() => {
      state.writing = false
      state.written = undefined
      if (state.advancing.size > 0) this.#writeAdvances(state)
    })
  }
}

/**
 * Payloads up to this many bytes are copied by {@link copySmall}: Buffer#copy of part of a buffer makes a Uint8Array
 * view of that part for each call (node:buffer _copyActual), about 100 B of garbage per delivered message.
 */
const SMALL_PAYLOAD = 256

/** Copies `length` bytes from `from` at `start` to `to` at `at`, four at a time. */
function copySmall (to: DataView, at: number, from: DataView, start: number, length: number): void {
  let k = 0
  for (; k + 4 <= length; k += 4) to.setUint32(at + k, from.getUint32(start + k))
  for (; k < length; k++) to.setUint8(at + k, from.getUint8(start + k))
}

function partitionInfo (log: SessionLog, cursor: PartitionCursor): { logStartOffset: number, logEndOffset: number } | undefined {
  try {
    return log.partitionInfo(cursor.stream, cursor.partition)
  } catch {
    return undefined // the stream is gone: nothing to read
  }
}

/** Whether a stored filter (mounted: `<tenant>/$share/…`, or bare) is a shared subscription. */
function isShare (topic: string): boolean {
  return isShareTopic(topic) || isShareTopic(topic.slice(topic.indexOf('/') + 1))
}

function endOf (log: SessionLog, cursor: PartitionCursor): number {
  try {
    return log.partitionInfo(cursor.stream, cursor.partition).logEndOffset
  } catch {
    return 0 // the stream is gone: nothing to read
  }
}

/**
 * Eras no fence can select dropped (see {@link SessionCursors.grant}): a record below a fence of epoch >= `lowest`
 * (the lowest any cursor of the session holds) or above every fence is matched with the last era before that epoch,
 * so eras before the last one granted before `lowest` never are. Undefined when what is left is one era granted
 * before `lowest`: it holds for every record.
 */
function prunedEras (eras: number[], lowest: number): number[] | undefined {
  let from = 0
  for (let i = 0; i < eras.length; i += 2) if ((eras[i] as number) < lowest) from = i
  const kept = from === 0 ? eras : eras.slice(from)
  return kept.length === 2 && (kept[0] as number) < lowest ? undefined : kept
}

/**
 * A `K` value (format.ts): the next offset, u64, then each fence above it as its epoch and offset, u64 each (none for
 * a cursor without fences: 8 bytes, as before fences).
 */
function cursorValue (cursor: PartitionCursor): Buffer {
  const fences = cursor.fences.filter((f) => f.offset > cursor.committed)
  if (fences.length === 0) return u64(cursor.committed)
  return Buffer.concat([u64(cursor.committed), ...fences.flatMap((f) => [u64(f.epoch), u64(f.offset)])])
}

/**
 * A stored `K` value (see cursorValue): fences ascending, above the offset, epochs from 1, or 0 for the first one
 * ({@link LOST_FENCES_EPOCH}: written for a cursor loaded from a damaged value). Undefined when its offset cannot be
 * read (damaged): the cursor reads its partition from the log start. `fencesDamaged` when the offset can be read but
 * what follows is not fences: the cursor keeps its offset. Either way it is loaded with its fences `lost` (see
 * SessionCursors.load): a filter added while it was behind may get records logged before its SUBSCRIBE, and a QoS 2
 * record may come from the cursor besides its copy: more deliveries, not fewer.
 */
export function decodeCursorValue (value: Buffer): { next: number, fences: Fence[], fencesDamaged: boolean } | undefined {
  if (value.length < 8) return undefined
  const next = Number(value.readBigUInt64BE(0))
  if (!Number.isSafeInteger(next)) return undefined
  const damaged = { next, fences: [], fencesDamaged: true }
  if ((value.length - 8) % 16 !== 0) return damaged
  const fences: Fence[] = []
  // Epochs ascending from LOST_FENCES_EPOCH (only the first may have it); offsets above the offset, and equal for two
  // SUBSCRIBEs with no append between.
  let last = { epoch: LOST_FENCES_EPOCH - 1, offset: next + 1 }
  for (let at = 8; at < value.length; at += 16) {
    const fence = { epoch: Number(value.readBigUInt64BE(at)), offset: Number(value.readBigUInt64BE(at + 8)) }
    if (!Number.isSafeInteger(fence.epoch) || !Number.isSafeInteger(fence.offset) || fence.epoch <= last.epoch || fence.offset < last.offset) {
      return damaged
    }
    fences.push(last = fence)
  }
  return { next, fences, fencesDamaged: false }
}

/**
 * The eras a subscription whose stored eras were damaged gets instead: QoS 1 from before every fence, so its session's
 * cursors deliver every record below a fence that the filter matches (as QoS 1 is what makes a record the cursors').
 * Not no eras: a filter changed from QoS 1 to 2 while a cursor was behind would then skip the records logged under
 * QoS 1, which no copy holds. A filter added while behind may get records logged before its SUBSCRIBE: more
 * deliveries, never fewer. Above every fence the subscription's QoS holds, as always.
 */
export function damagedEras (): number[] {
  return [0, 1]
}

/**
 * Whether a stored subscription's `eras` is grant eras (see {@link SessionCursors.grant}): epoch, QoS pairs, epochs
 * safe integers from 0, ascending, QoS 0 to 2. Checked at load: the epochs of every session's eras set the one epoch
 * counter (noteEras), which a value that is not a number turned into NaN for every later grant.
 */
export function isGrantEras (eras: unknown): eras is number[] {
  if (!Array.isArray(eras) || eras.length === 0 || eras.length % 2 !== 0) return false
  let last = -1
  for (let i = 0; i < eras.length; i += 2) {
    const epoch: unknown = eras[i]
    const qos: unknown = eras[i + 1]
    if (typeof epoch !== 'number' || !Number.isSafeInteger(epoch) || epoch <= last || (qos !== 0 && qos !== 1 && qos !== 2)) return false
    last = epoch
  }
  return true
}

/** The cursor's `K` key; the buffer is shared by its writes, which never change it. */
function cursorKey (clientId: string, cursor: PartitionCursor): Buffer {
  return cursor.key ??= keys.cursor(clientId, cursor.stream, cursor.partition)
}

/** An offset (below 2^53) as a u64, big-endian, without a BigInt. */
function u64 (n: number): Buffer {
  const buf = Buffer.allocUnsafe(8)
  const high = Math.floor(n / 0x1_0000_0000)
  const low = n - high * 0x1_0000_0000
  buf[0] = high >>> 24
  buf[1] = (high >>> 16) & 0xff
  buf[2] = (high >>> 8) & 0xff
  buf[3] = high & 0xff
  buf[4] = low >>> 24
  buf[5] = (low >>> 16) & 0xff
  buf[6] = (low >>> 8) & 0xff
  buf[7] = low & 0xff
  return buf
}
