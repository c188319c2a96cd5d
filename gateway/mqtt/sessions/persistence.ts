/**
 * aedes session persistence on the gateway's LevelDB: the subscriptions of
 * persistent sessions, their offline QoS 1/2 queues, retained messages, wills
 * and inbound QoS 2 packets awaiting PUBREL. The key layout and value
 * encoding are format.ts's; this file keeps the state in memory and
 * decides what to write when. Given the log, a session's QoS 1 queue of
 * routed messages is a cursor per partition into it (cursors.ts);
 * the copies left (unrouted topics, QoS 2) are bounded per session.
 *
 * Interface: the promise API that aedes 1.x calls directly (aedes-persistence
 * 11's `asyncPersistence.js`: an `async setup(broker)`, promise-returning
 * methods, Readable streams). Conformance: aedes-persistence's `abstract.js`
 * run with `testAsync: true` (test/gateway/fixtures/persistence-abstract.ts),
 * and aedes' own test suite (test/gateway/mqtt/aedes-suite.int.test.ts).
 *
 * The key space is the database handed to the constructor (the gateway
 * passes its `sessions` sublevel, with buffer encodings).
 *
 * Invariants:
 * - Memory mirrors the small state and setup() rebuilds it from disk:
 *   subscriptions (plus a qlobber trie of the QoS > 0 ones, the same matcher
 *   mqemitter routes live messages with), the queue index (seq, brokerId,
 *   brokerCounter, messageId per entry, not the bodies), inbound QoS 2
 *   packets and wills. Retained messages and queued bodies live on disk only.
 * - incomingStorePacketWith hands the `I` entry of a QoS 2 publish to the
 *   log's append (format.ts), with its value made from the record's position
 *   by the commit; incomingMarkDelivered writes it again marked delivered;
 *   it is deleted here (PUBREL, clean session) in one write.
 * - Writes go through the log store's group-commit writer (LogStore.write;
 *   the gateway passes its store): a mutation updates memory synchronously,
 *   queues its operations and resolves once the LevelDB batch holding them is
 *   written (fsync'd under the store's `durability: 'sync'`, the default).
 *   Session writes share batches, and fsyncs, with the log's appends. Batches
 *   go out in call order, with the appends' extraOps too, so disk converges on
 *   memory. If a batch fails its calls reject with GW_SESSION_WRITE_FAILED and
 *   memory may be ahead of disk until the next start rebuilds it. Without a
 *   store (tests, tools) each call is its own batch, in call order.
 * - A connection open when a clean CONNECT of its client id discards the
 *   session (cleanSubscriptions) writes nothing into the session that CONNECT
 *   starts: the takeover that closes it comes later (an MQTT 5 connection is
 *   sent a DISCONNECT first, and closed once its socket drains, which one that
 *   stopped reading does only at mqtt.slowSubscriberTimeoutMs), and the
 *   persistence knows sessions by client id only. Its QoS 2 PUBLISH and
 *   SUBSCRIBE are refused (GW_SESSION_TAKEN_OVER: aedes closes it, nothing
 *   acknowledged); its acknowledgements, UNSUBSCRIBE and close change nothing. Nor does it hold that session any
 *   more: the session is offline once the CONNECT's own connection closes, with that CONNECT's interval, even while
 *   the old connection lingers.
 * - setup() raises `broker.counter` above every brokerCounter this broker id
 *   has queued: aedes restarts the counter at 0, and with a stable broker id a
 *   reconnecting client's dedupe table (filled from replayed queue entries)
 *   would otherwise drop new messages whose counters are lower.
 *
 * Not safe for two broker processes on one key space.
 */
import { createRequire } from 'node:module'
import { Readable } from 'node:stream'
import type { AbstractBatchOptions, AbstractLevel } from 'abstract-level'
import type { AppendExtraOperation, Durability, ExtraOperation, LevelDatabase, LogStore, RecordPosition, StoreWriteOptions } from '../../../store/index.ts'
import { compileTopicFilters, QLOBBER_OPTIONS, topicMatches, type QlobberOptions } from '../../access/topics.ts'
import { movePacketId } from '../aedes-internals.ts'
import { logPositionOf, type LogPosition } from '../log-position.ts'
import { noteQueuedCopy } from '../queued-copies.ts'
import { damagedEras, decodeCursorValue, isGrantEras, SessionCursors, type CursorConnector, type LivePacket, type SessionLog } from './cursors.ts'
import { notFound, SessionPersistenceError } from './errors.ts'
import {
  cbor, checkMessageId, CLIENT_TAGS, PARKED_PREFIX, clientPrefix, decodeValue, encodeU16, encodeU64, encodeVersion, keys, prefixRange, readVersion,
  type IncomingFields,
  SESSION_FORMAT_VERSION,
  TAG_CURSOR, TAG_INCOMING, TAG_MESSAGE_ID, TAG_OFFLINE, TAG_OUTGOING, TAG_SESSION, TAG_SUB, TAG_WILL,
} from './format.ts'

export { SESSION_ERROR_CODES, SessionPersistenceError, type SessionErrorCode } from './errors.ts'
export { SESSION_FORMAT_VERSION } from './format.ts'

// ---------------------------------------------------------------------------
// The shapes aedes hands in and gets back

/** One persistent session as {@link LevelSessionPersistence.sessionStates} describes it. */
export interface SessionState {
  /** aedes' client id: `<tenant>\u0000<id>`, or the bare id for tenant `default`. */
  readonly clientId: string
  readonly connected: boolean
  /** ms since the epoch; null while connected (or before this process saw it go). */
  readonly offlineSince: number | null
  /** Mounted filters (`<tenant>/<filter>`). */
  readonly subscriptions: ReadonlyArray<{ readonly topic: string, readonly qos: number }>
  /** Next offset to deliver per stream (the store's name) and partition. */
  readonly cursors: ReadonlyArray<{ readonly stream: string, readonly partition: number, readonly next: number }>
  /** Copies queued (unrouted topics, QoS 2). */
  readonly queued: number
}

/** What this module needs of an aedes client. */
export interface SessionClient {
  readonly id: string
  /** aedes' protocol level (5 for MQTT 5) and the client's Session Expiry Interval (s), as the session's end reads them. */
  readonly version?: number
  readonly sessionExpiryInterval?: number
  /** aedes' Client sets it when its connection closed; a `client` event may come after that (see #connected). */
  readonly closed?: boolean
  /** aedes' Client's connection: its `close` tells that the client went, also when aedes emits no `clientDisconnect`. */
  readonly conn?: { once (event: 'close', listener: () => void): unknown }
}

/**
 * A stored session entry whose value cannot be read (format.ts gives each its length), found by setup(), and what the
 * session does instead. Never skipped silently (DESIGN.md: damaged data is reported; bad input loses nothing):
 * - `cursor` (`K`): the session reads the partition from its log start (more deliveries, with DUP set, never fewer),
 *   or, when only the fences after its offset are damaged, from that offset; either way with one fence at the log end
 *   standing for the lost ones (cursors.ts load): a filter added while it was behind may get records logged before
 *   its SUBSCRIBE, and a QoS 2 record may come from the log besides its copy;
 * - `subscription` (`S`, its grant eras): the subscription is kept, with QoS 1 for the records below its session's
 *   fences (cursors.ts damagedEras: every such record it matches is delivered, also those logged before it);
 * - `session` (`C`): the session is kept, without an MQTT 5 Session Expiry Interval of its own (only
 *   mqtt.sessionExpirySeconds ends it) until its client connects again and gives one;
 * - `offline` (`E`): the session is offline since the start (its mark is written again);
 * - `messageId` (`M`): the queued packet is sent again with a new message id.
 */
export interface SessionDamage {
  readonly entry: 'cursor' | 'session' | 'offline' | 'messageId' | 'subscription'
  /** The key, hex. */
  readonly key: string
  readonly clientId: string
  /** The value's length in bytes, and the length it should have. */
  readonly length: number
  readonly expected: string
}

/** When an offline session ends ({@link LevelSessionPersistence.sessionEnd}) and which bound ends it. */
export interface SessionEnd {
  /** ms since the epoch. */
  readonly at: number
  /** `interval`: the client's MQTT 5 Session Expiry Interval; `cap`: `maxOfflineSeconds` (mqtt.sessionExpirySeconds). */
  readonly source: 'interval' | 'cap'
  /** How long the session may stay offline (s). */
  readonly seconds: number
}

/** What the ack of a logged message waits for ({@link LevelSessionPersistence.beforeAck}). */
export type AckWait = 'unmatched' | 'ready' | 'copies' | Promise<void>

/** MQTT 5 3.1.2.11.2: 0xFFFFFFFF means the session does not expire. */
const NEVER_EXPIRES = 0xffffffff

/** What this module needs of the aedes broker (`broker.counter` numbers packets; see the header). */
export interface SessionBroker {
  readonly id: string
  counter?: number
  /** aedes' events: `client` (connected) and `clientDisconnect` tell when a session goes offline (session expiry). */
  on?: (event: 'client' | 'clientDisconnect', listener: (client: SessionClient) => void) => unknown
}

/**
 * A packet as aedes passes it (an aedes-packet or mqtt-packet object). Only
 * the named fields are read; the others (MQTT 5 `properties`, `nl`,
 * `messageExpiry`, …) are stored as they are.
 */
export interface SessionPacket {
  cmd?: string
  topic?: string
  payload?: Buffer | Uint8Array | string
  qos?: number
  retain?: boolean
  dup?: boolean
  messageId?: number
  brokerId?: string | null
  brokerCounter?: number
  clientId?: string
  [field: string]: unknown
}

/** One entry of a SUBSCRIBE packet (mqtt-packet's shape). */
export interface SessionSubscription {
  topic: string
  qos: number
  rh?: number
  rap?: boolean
  nl?: boolean
  /** MQTT 5 Subscription Identifier: stored and restored, not used for matching. */
  subscriptionIdentifier?: number
}

/** A QoS > 0 subscription matching a topic, as subscriptionsByTopic returns it. */
export interface MatchedSubscription {
  clientId: string
  topic: string
  qos: number
  rh: number | undefined
  rap: boolean | undefined
  nl: boolean | undefined
}

export interface SessionPersistenceOptions {
  /**
   * The log store on the same database, whose group-commit writer every write goes through (the gateway passes
   * its store). Then `db` must be a sublevel of that database with buffer encodings, outside the store's `log`.
   * Without one, each call is written as its own batch.
   */
  readonly writer?: SessionWriter
  /** Without a writer: 'sync' (default) fsyncs each batch before its call resolves. With one, the store's applies. */
  readonly durability?: Durability
  /**
   * The log whose records persistent sessions keep cursors into instead of copies (cursors.ts); the
   * gateway passes its store. Without one, every offline message is queued as a copy.
   */
  readonly log?: SessionLog
  /** With a log: QoS 1 deliveries from the log one session may have unacknowledged while it catches up (default 100). */
  readonly window?: number
  /** With a log: and the bytes they hold, their PUBLISH frames or the batches they keep (default unbounded; cursors.ts). */
  readonly windowBytes?: number
  /** With a log: told when a cursor advance could not be written (it is written again a second later, or with the next one). */
  readonly onCursorWriteError?: (err: unknown) => void
  /**
   * With a log: told when the disk budget deleted `count` records of a partition a session's cursor had not reached
   * (counted and logged by the gateway; some may not have been for the session).
   */
  readonly onCursorDropped?: (dropped: { readonly clientId: string, readonly stream: string, readonly partition: number, readonly count: number }) => void
  /** With a log: told when reading the log for a session failed (it goes on at its next PUBACK or append). */
  readonly onCursorReadError?: (err: unknown) => void
  /**
   * Told of each stored entry setup() found damaged (a value of the wrong length, or a subscription's eras that are
   * not eras) and the fallback it took instead
   * (SessionDamage); the gateway logs and counts it. Loading goes on: the fallback delivers more, never less.
   */
  readonly onDamaged?: (damage: SessionDamage) => void
  /** Told of each record a session's cursor skipped because its MQTT 5 message expiry had passed. */
  readonly onExpired?: (tenant: string) => void
  /** Told of each record a session's cursor skipped because it was larger than the client's Maximum Packet Size. */
  readonly onOversized?: (tenant: string) => void
  /** Copies one session may have queued (default unbounded); beyond it a new copy is dropped (the newest). */
  readonly maxQueuedPerSession?: number
  /** Told of every copy dropped by that bound; `first` is true for the first of an episode (the queue was below it). */
  readonly onQueueOverflow?: (clientId: string, topic: string, first: boolean) => void
  /** The clock of the offline times session expiry compares (default Date.now). */
  readonly now?: () => number
  /**
   * The longest a persistent session may stay offline (s), whatever its protocol version (mqtt.sessionExpirySeconds);
   * 0 or absent: no bound beyond an MQTT 5 client's own Session Expiry Interval.
   */
  readonly maxOfflineSeconds?: number
}

/** Whether a clean CONNECT starts a session that outlives its connection: MQTT 5 with a Session Expiry Interval above 0. */
function startsSession (client: SessionClient): boolean {
  return client.version === 5 && (client.sessionExpiryInterval ?? 0) > 0
}

/** The MQTT 5 Session Expiry Interval (s) a session ends after, or undefined when it does not end by one (3.1.1, 0xFFFFFFFF). */
function expiryInterval (client: SessionClient): number | undefined {
  if (client.version !== 5) return undefined
  const interval = client.sessionExpiryInterval ?? 0
  return interval >= NEVER_EXPIRES ? undefined : interval
}

/** Dropped copies remembered so that aedes' delivery of one to a connected client still finds it (see outgoingUpdate). */
const DROPPED_REMEMBERED = 10_000

/**
 * The QoS > 0 subscriptions matching one published topic, as the trie gave them, and what is known of their
 * sessions' cursors. Every message on a topic that persistent sessions match asks for this two or three times
 * (beforeAck, then aedes' subscriptionsByTopic and outgoingEnqueueCombi); matching once per topic instead of once per
 * call, and checking the cursors once per partition instead of once per message and session, is what keeps ingest
 * with offline sessions near ingest with none (issue 13, BENCHMARKS.md). Valid until a subscription or a cursor goes
 * or comes: {@link LevelSessionPersistence} empties the cache at each such change.
 */
interface TopicMatch {
  /** Handed to aedes as they are (subscriptionsByTopic): outgoingEnqueueCombi knows them by identity. */
  readonly subs: readonly MatchedSubscription[]
  /** Every one is QoS 1: a QoS 2 message is delivered to each at QoS 1 too (the minimum), from its cursor. */
  readonly allQos1: boolean
  /**
   * The partition of this stream that every one's session has a cursor into, on disk: a message logged there needs
   * nothing more of them (no write, no copy). One partition: a routed topic always goes to the same one.
   */
  readyStream: string | undefined
  readyPartition: number
  /** The offset from which every one of those cursors reads (the highest start among them): below it, not ready. */
  readyFrom: number
  /** `subs` as subscriptionsByTopic resolves with them, made at its first call. */
  found?: Promise<readonly MatchedSubscription[]>
}

/**
 * Cached subscriptions (counted across topics, plus one per topic) beyond which the topic cache starts again: about
 * 100 bytes each, so a few MB, for a fleet publishing on more topics than that.
 */
const MATCHES_CACHED = 65_536

/** What the persistence's promise methods return when they have nothing to wait for. */
const SETTLED: Promise<void> = Promise.resolve()
const NOTHING: Promise<undefined> = Promise.resolve(undefined)

/** The match of every topic while no persistent session has a QoS 1/2 subscription. */
const NO_MATCH: readonly MatchedSubscription[] = Object.freeze([])

/**
 * Whether every session of the match reads a message of this QoS from its cursor: a QoS 1 delivery (the minimum of
 * the two QoS) is a cursor, a QoS 2 one a copy (cursors.ts), as is anything of a QoS 0 message.
 */
function cursorsDeliver (match: TopicMatch, qos: number): boolean {
  return qos === 1 || (qos === 2 && match.allQos1)
}

// ---------------------------------------------------------------------------
// qlobber's aedes flavour (the trie aedes-persistence uses), built with the
// gateway's one matcher configuration (topics.ts), so offline matching agrees
// with live routing. It ships no types, hence the narrow local ones and createRequire.

interface TrieSubscription { clientId: string, topic: string, qos: number, rh?: number, rap?: boolean, nl?: boolean }
interface QlobberSub {
  readonly subscriptionsCount: number
  add (topic: string, sub: TrieSubscription): unknown
  remove (topic: string, sub: { clientId: string, topic: string }): unknown
  match (topic: string): MatchedSubscription[]
  clear (): unknown
}
const require = createRequire(import.meta.url)
const QlobberSubClass = require('qlobber/aedes/qlobber-sub') as new (options: QlobberOptions) => QlobberSub

/**
 * Every own enumerable field but functions: aedes packets are class instances, callers mutate what they passed, and
 * the packets aedes hands to outgoingUpdate carry a `writeCallback` bound to the client (lib/qos-packet.js), which
 * cbor cannot encode and which would keep a closed client reachable from memory.
 */
function ownFields (packet: SessionPacket): SessionPacket {
  const fields: SessionPacket = {}
  for (const [field, value] of Object.entries(packet)) {
    if (typeof value !== 'function') fields[field] = value
  }
  return fields
}

/**
 * The shape aedes-packet 4's `new Packet(original)` gives (aedes-persistence
 * stores queued and inbound packets that way, and aedes reads them back as
 * such): known fields defaulted, anything else but the MQTT 5 extras dropped,
 * `messageId` reset for QoS > 0 until outgoingUpdate assigns one.
 */
function toAedesPacket (original: SessionPacket): SessionPacket {
  const packet: SessionPacket = {}
  for (const field of ['clientId', 'nl', 'properties', 'messageExpiry']) {
    if (Object.prototype.hasOwnProperty.call(original, field)) packet[field] = original[field]
  }
  packet.cmd = original.cmd || 'publish'
  packet.brokerId = original.brokerId || undefined
  packet.brokerCounter = original.brokerCounter || 0
  packet.topic = original.topic
  packet.payload = original.payload || Buffer.alloc(0)
  packet.qos = original.qos || 0
  packet.retain = original.retain || false
  packet.dup = original.dup || false
  if (packet.qos > 0 || packet.cmd !== 'publish') packet.messageId = undefined
  return packet
}

/** aedes passes whatever it has (a PUBACK, a queued packet, once even a bare number) to outgoingClearMessageId. */
function fieldOf (packet: unknown, field: 'cmd' | 'messageId' | 'brokerId' | 'brokerCounter'): unknown {
  return typeof packet === 'object' && packet !== null ? (packet as Record<string, unknown>)[field] : undefined
}

function brokerKey (brokerId: unknown, brokerCounter: unknown): string {
  return `${typeof brokerId === 'string' ? `s${brokerId}` : 'u'}|${String(brokerCounter)}`
}

// ---------------------------------------------------------------------------
// Writes: through the log store's group-commit writer (see the header)

type Db = AbstractLevel<string | Buffer | Uint8Array, unknown, unknown>
type BatchOp = { readonly type: 'put', readonly key: Buffer, readonly value: Buffer } | { readonly type: 'del', readonly key: Buffer }
/** classic-level's `sync` write option; abstract-level's types do not declare it, sublevels forward it. */
type WriteOptions = AbstractBatchOptions<Buffer, Buffer> & { sync: boolean }
const BINARY = { keyEncoding: 'buffer', valueEncoding: 'buffer' } as const
const NOT_DURABLE: WriteOptions = { ...BINARY, sync: false }
/** The write of an inbound QoS 2 entry's delivered mark (incomingMarkDelivered). */
const NOT_DURABLE_MARK: StoreWriteOptions = { durable: false }

/** What the persistence writes through: the log store's group-commit writer ({@link LogStore.write}). */
export type SessionWriter = Pick<LogStore, 'write'>

/**
 * The writer of a persistence given no log store (tests, tools): one LevelDB batch per call, in call order. Not a
 * second group commit: the gateway always passes its store.
 */
class DirectWriter implements SessionWriter {
  readonly #db: Db
  readonly #options: WriteOptions
  #tail: Promise<void> = Promise.resolve()

  constructor (db: Db, durability: Durability) {
    this.#db = db
    this.#options = { ...BINARY, sync: durability === 'sync' }
  }

  write (ops: readonly ExtraOperation[], options?: StoreWriteOptions): Promise<void> {
    const batch = ops.map((op) => op.type === 'put' ? { type: 'put' as const, key: op.key, value: op.value } : { type: 'del' as const, key: op.key })
    const write = options?.durable === false ? NOT_DURABLE : this.#options
    const done = this.#tail.then(() => this.#db.batch<Buffer, Buffer>(batch as never, write))
    this.#tail = done.catch(() => {})
    return done
  }
}

interface PendingValue { readonly value: Buffer | undefined }

/**
 * The persistence's side of its writes: hands them to the writer as operations on its key space, keeps the values
 * queued or in flight so point reads see them before LevelDB does, and knows when everything written so far is done.
 */
class SessionWrites {
  readonly #db: Db
  readonly #writer: SessionWriter
  readonly #pending = new Map<string, PendingValue>()
  #last: Promise<void> = Promise.resolve()

  constructor (db: Db, writer: SessionWriter) {
    this.#db = db
    this.#writer = writer
  }

  /** `durable: false`: see {@link LogStore.write} (cursor advances: a lost one only sends deliveries again). */
  write (ops: readonly BatchOp[], options?: StoreWriteOptions): Promise<void> {
    if (ops.length === 0) return Promise.resolve()
    const cells: Array<[string, PendingValue]> = []
    const extra: ExtraOperation[] = []
    for (const op of ops) {
      const cell: PendingValue = { value: op.type === 'put' ? op.value : undefined }
      const id = op.key.toString('latin1')
      this.#pending.set(id, cell)
      cells.push([id, cell])
      extra.push(op.type === 'put'
        ? { type: 'put', sublevel: this.#db, key: op.key, value: op.value }
        : { type: 'del', sublevel: this.#db, key: op.key })
    }
    const done = this.#writer.write(extra, options).then(() => {}, (cause: unknown) => {
      throw new SessionPersistenceError('GW_SESSION_WRITE_FAILED', `session write of ${ops.length} operations failed`, { cause })
    }).finally(() => {
      for (const [id, cell] of cells) {
        if (this.#pending.get(id) === cell) this.#pending.delete(id)
      }
    })
    done.catch(() => {}) // every caller awaits it; this only keeps an unawaited failure from crashing the process
    // The writer commits in call order, so the last write settles after every earlier one.
    this.#last = done.then(() => {}, () => {})
    return done
  }

  /** Resolves (never rejects) once everything written so far has been committed or has failed. */
  flush (): Promise<void> {
    return this.#last
  }

  /** Reads one key, seeing writes that are queued but not yet in LevelDB. */
  async read (key: Buffer): Promise<Buffer | undefined> {
    const pending = this.#pending.get(key.toString('latin1'))
    if (pending !== undefined) return pending.value
    return await this.#db.get<Buffer, Buffer>(key, BINARY)
  }
}

const put = (key: Buffer, value: Buffer): BatchOp => ({ type: 'put', key, value })
const del = (key: Buffer): BatchOp => ({ type: 'del', key })

// ---------------------------------------------------------------------------
// In-memory state

interface StoredSubscription {
  qos: number
  rh?: number
  rap?: boolean
  nl?: boolean
  subscriptionIdentifier?: number
  /** Its grant eras (cursors.ts grant), from a SUBSCRIBE that added or changed it while a cursor of the session was behind. */
  eras?: number[]
}

interface OutgoingEntry {
  readonly seq: number
  brokerId: unknown
  brokerCounter: unknown
  messageId: number | undefined
  /** The packet that replaced the queued one in this process (a PUBREL); on disk too, kept so streams never read a stale body. */
  replacement: SessionPacket | undefined
}

/** One client's offline queue: entries in seq order plus the two lookups aedes needs. */
class OutgoingQueue {
  readonly entries = new Map<number, OutgoingEntry>()
  readonly #byBroker = new Map<string, Set<OutgoingEntry>>()
  readonly #byMessageId = new Map<number, Set<OutgoingEntry>>()

  add (entry: OutgoingEntry): void {
    this.entries.set(entry.seq, entry)
    this.#index(entry)
  }

  remove (entry: OutgoingEntry): void {
    this.entries.delete(entry.seq)
    this.#unindex(entry)
  }

  /** Changes the fields the lookups use. */
  change (entry: OutgoingEntry, fields: { brokerId?: unknown, brokerCounter?: unknown, messageId: number | undefined }): void {
    this.#unindex(entry)
    if ('brokerId' in fields) entry.brokerId = fields.brokerId
    if ('brokerCounter' in fields) entry.brokerCounter = fields.brokerCounter
    entry.messageId = fields.messageId
    this.#index(entry)
  }

  /** First entry (in queue order) sent by this broker under this counter. */
  byBroker (brokerId: unknown, brokerCounter: unknown): OutgoingEntry | undefined {
    return first(this.#byBroker.get(brokerKey(brokerId, brokerCounter)), () => true)
  }

  /** First entry (in queue order) with this message id, optionally only among other brokers' entries. */
  byMessageId (messageId: number, notFromBroker?: { brokerId: unknown }): OutgoingEntry | undefined {
    return first(this.#byMessageId.get(messageId), (e) => notFromBroker === undefined || e.brokerId !== notFromBroker.brokerId)
  }

  #index (entry: OutgoingEntry): void {
    addTo(this.#byBroker, brokerKey(entry.brokerId, entry.brokerCounter), entry)
    if (entry.messageId !== undefined) addTo(this.#byMessageId, entry.messageId, entry)
  }

  #unindex (entry: OutgoingEntry): void {
    removeFrom(this.#byBroker, brokerKey(entry.brokerId, entry.brokerCounter), entry)
    if (entry.messageId !== undefined) removeFrom(this.#byMessageId, entry.messageId, entry)
  }
}

function addTo<K> (map: Map<K, Set<OutgoingEntry>>, key: K, entry: OutgoingEntry): void {
  let set = map.get(key)
  if (set === undefined) {
    set = new Set()
    map.set(key, set)
  }
  set.add(entry)
}

function removeFrom<K> (map: Map<K, Set<OutgoingEntry>>, key: K, entry: OutgoingEntry): void {
  const set = map.get(key)
  if (set === undefined) return
  set.delete(entry)
  if (set.size === 0) map.delete(key)
}

function first (set: Set<OutgoingEntry> | undefined, accept: (entry: OutgoingEntry) => boolean): OutgoingEntry | undefined {
  let best: OutgoingEntry | undefined
  if (set === undefined) return undefined
  for (const entry of set) {
    if (accept(entry) && (best === undefined || entry.seq < best.seq)) best = entry
  }
  return best
}

// ---------------------------------------------------------------------------
// The persistence

export class LevelSessionPersistence {
  readonly #db: Db
  readonly #writer: SessionWrites
  #broker: SessionBroker | undefined
  #loading: Promise<void> | undefined
  #loaded = false
  #destroyed = false

  /** clientId → topic → subscription (every QoS). */
  readonly #subs = new Map<string, Map<string, StoredSubscription>>()
  /** The QoS > 0 subscriptions, for matching published topics. */
  readonly #trie = new QlobberSubClass(QLOBBER_OPTIONS)
  /** Published topic → its matches in the trie (see TopicMatch); emptied by #matchesChanged. */
  readonly #matches = new Map<string, TopicMatch>()
  /** Subscriptions held by #matches, plus one per topic (bounded by MATCHES_CACHED). */
  #matchesHeld = 0
  readonly #queues = new Map<string, OutgoingQueue>()
  #nextSeq = 1
  /** Largest brokerCounter queued per broker id, found by setup(). */
  readonly #maxCounters = new Map<string, number>()
  /** clientId → messageId → inbound QoS 2 packet. */
  readonly #incoming = new Map<string, Map<number, SessionPacket>>()
  readonly #wills = new Map<string, SessionPacket>()
  /** Client ids with a persistent session (`C`). */
  readonly #sessions = new Set<string>()
  /** Cursors into the log, when the persistence has one. */
  readonly #cursors: SessionCursors | undefined
  /** `client U+0000 partition/stream` → the write of a cursor created and not yet on disk (#enqueueCursor). */
  readonly #creating = new Map<string, Promise<void>>()
  readonly #log: SessionLog | undefined
  #releaseHold: (() => void) | undefined
  readonly #maxQueued: number
  readonly #onOverflow: ((clientId: string, topic: string, first: boolean) => void) | undefined
  readonly #onDamaged: ((damage: SessionDamage) => void) | undefined
  /** Clients whose queue is full (an overflow episode is under way). */
  readonly #overflowing = new Set<string>()
  /** `client|broker key` of the latest dropped copies, oldest first. */
  readonly #dropped = new Set<string>()
  readonly #now: () => number
  /** Persistent sessions not connected, and since when (ms; `E`). */
  readonly #offlineSince = new Map<string, number>()
  /**
   * The open connections (aedes' Client objects) per client id: from the CONNECT that resumed the session (markSession),
   * or else aedes' `client` event, until the connection closes.
   */
  readonly #connections = new Map<string, Set<SessionClient>>()
  /**
   * When each open connection last claimed its session (#claim): a later claim is the newer owner. Kept beside
   * #connections, which says which are open, because a close must find the owner among those left (#disconnected).
   */
  readonly #claims = new WeakMap<SessionClient, number>()
  #lastClaim = 0
  /**
   * Connections whose session a clean CONNECT of their client id discarded while they were open (cleanSubscriptions):
   * the CONNECT takes them over, and until they close what they write is not the new session's (sessionDiscarded).
   * They leave #connections then, and neither their registration, a session read nor their close claims the session
   * again (#connected, markSession, #disconnected): it is the CONNECT's, not theirs.
   */
  readonly #discardedFrom = new WeakSet<SessionClient>()
  /**
   * The arrays subscriptionsByTopic handed out before the subscriptions last changed (#matchesChanged): aedes passes
   * one back with each message it queues, turns later, and a session may no longer hold what it says (#stillSubscribed).
   */
  readonly #outdated = new WeakSet<readonly MatchedSubscription[]>()
  readonly #offlineListeners: Array<(clientId: string) => void> = []
  /** The MQTT 5 Session Expiry Interval (s) of sessions that have one below 0xFFFFFFFF (the `C` value). */
  readonly #intervals = new Map<string, number>()
  readonly #maxOfflineSeconds: number

  /**
   * @param db the key space to own, normally `db.sublevel('sessions')` of the
   *   gateway's LevelDB; memory-level works for tests. It is opened if needed
   *   and never closed here.
   */
  constructor (db: LevelDatabase, options: SessionPersistenceOptions = {}) {
    const durability = options.durability ?? 'sync'
    if (durability !== 'sync' && durability !== 'async') {
      throw new SessionPersistenceError('GW_SESSION_INVALID_ARGUMENT', `durability must be "sync" or "async", got ${String(durability)}`)
    }
    this.#db = db
    this.#writer = new SessionWrites(db, options.writer ?? new DirectWriter(db, durability))
    const maxQueued = options.maxQueuedPerSession ?? Infinity
    if (maxQueued !== Infinity && (!Number.isSafeInteger(maxQueued) || maxQueued < 1)) {
      throw new SessionPersistenceError('GW_SESSION_INVALID_ARGUMENT', `maxQueuedPerSession must be a positive integer, got ${String(maxQueued)}`)
    }
    this.#maxQueued = maxQueued
    this.#now = options.now ?? Date.now
    const maxOffline = options.maxOfflineSeconds ?? 0
    if (!Number.isSafeInteger(maxOffline) || maxOffline < 0) {
      throw new SessionPersistenceError('GW_SESSION_INVALID_ARGUMENT', `maxOfflineSeconds must be a non-negative integer, got ${String(maxOffline)}`)
    }
    this.#maxOfflineSeconds = maxOffline
    this.#onOverflow = options.onQueueOverflow
    this.#onDamaged = options.onDamaged
    const window = options.window ?? 100
    if (!Number.isSafeInteger(window) || window < 1) {
      throw new SessionPersistenceError('GW_SESSION_INVALID_ARGUMENT', `window must be a positive integer, got ${String(window)}`)
    }
    const windowBytes = options.windowBytes
    if (windowBytes !== undefined && (!Number.isSafeInteger(windowBytes) || windowBytes < 1)) {
      throw new SessionPersistenceError('GW_SESSION_INVALID_ARGUMENT', `windowBytes must be a positive integer, got ${String(windowBytes)}`)
    }
    this.#log = options.log
    this.#cursors = options.log === undefined
      ? undefined
      : new SessionCursors({
        log: options.log,
        write: (ops, options) => this.#writer.write(ops, options),
        grantedQos: (clientId, topic) => this.#grantedQos(clientId, topic),
        subscriptionIds: (clientId, topic) => this.#subscriptionIds(clientId, topic),
        subscriptionsMatching: (clientId, topic) => this.#subscriptionsMatching(clientId, topic),
        noLocal: (clientId, topic) => this.#noLocal(clientId, topic),
        retainAsPublished: (clientId, topic) => this.#retainAsPublished(clientId, topic),
        busy: (clientId, messageId) => this.#queues.get(clientId)?.byMessageId(messageId) !== undefined,
        broker: () => this.#broker,
        window,
        windowBytes,
        onWriteError: options.onCursorWriteError,
        onDropped: options.onCursorDropped,
        onReadError: options.onCursorReadError,
        onExpired: options.onExpired,
        onOversized: options.onOversized,
      })
  }

  /**
   * How to reach a connected client to deliver its session's cursors (the gateway's hooks install it,
   * hooks/sessions.ts); without it a persistence with a log refuses to deliver a session that has cursors.
   */
  deliverCursorsThrough (connector: CursorConnector): void {
    this.#cursors?.connectVia(connector)
  }

  /** The broker given to setup(); aedes-persistence's abstract suite reads it. */
  get broker (): SessionBroker | undefined {
    return this.#broker
  }

  /**
   * Called by aedes' listen(): loads the sessions into memory (once) and
   * binds the broker. Must stay a native async function: aedes checks
   * `setup.constructor.name === 'AsyncFunction'`.
   */
  async setup (broker: SessionBroker): Promise<void> {
    this.#broker = broker
    if (this.#loading === undefined) {
      this.#loading = this.#load()
      broker.on?.('client', (client) => { this.#connected(client) })
      broker.on?.('clientDisconnect', (client) => { this.#disconnected(client) })
    }
    await this.#loading
    const max = this.#maxCounters.get(broker.id)
    if (max !== undefined && typeof broker.counter === 'number' && broker.counter < max) broker.counter = max
  }

  async #load (): Promise<void> {
    if (this.#db.status !== 'open') await this.#db.open()
    const stored = await this.#db.get<Buffer, Buffer>(keys.version(), BINARY)
    if (stored === undefined) {
      await this.#writer.write([put(keys.version(), encodeVersion())])
    } else if (readVersion(stored) !== SESSION_FORMAT_VERSION) {
      throw new SessionPersistenceError('GW_SESSION_FORMAT_VERSION',
        `sessions were written by format ${readVersion(stored) ?? 'unknown'}, this gateway reads ${SESSION_FORMAT_VERSION}`)
    }

    const parked: BatchOp[] = []
    for await (const [key, value] of this.#scan(Buffer.from([TAG_SUB]))) {
      const { clientId, rest } = keys.parseClient(key)
      const topic = rest.toString('utf8')
      if (topic.startsWith(PARKED_PREFIX)) {
        parked.push(del(key))
        continue
      }
      const record = decodeValue<StoredSubscription>(key, value)
      if (record.eras !== undefined && !isGrantEras(record.eras)) {
        this.#damaged('subscription', key, clientId, value, 'eras: epoch, QoS pairs')
        record.eras = damagedEras()
      }
      this.#addSubscription(clientId, topic, record)
      this.#cursors?.noteEras(record.eras)
    }
    await this.#writer.write(parked)

    for await (const [key, value] of this.#scan(Buffer.from([TAG_OUTGOING]))) {
      const { clientId, rest } = keys.parseClient(key)
      const seq = Number(rest.readBigUInt64BE(0))
      const packet = decodeValue<SessionPacket>(key, value)
      this.#queue(clientId, true).add({
        seq,
        brokerId: packet.brokerId,
        brokerCounter: packet.brokerCounter,
        messageId: packet.messageId ?? undefined,
        replacement: undefined,
      })
      if (seq >= this.#nextSeq) this.#nextSeq = seq + 1
      if (typeof packet.brokerId === 'string' && typeof packet.brokerCounter === 'number') {
        this.#maxCounters.set(packet.brokerId, Math.max(this.#maxCounters.get(packet.brokerId) ?? 0, packet.brokerCounter))
      }
    }
    for await (const [key, value] of this.#scan(Buffer.from([TAG_MESSAGE_ID]))) {
      const { clientId, rest } = keys.parseClient(key)
      const queue = this.#queues.get(clientId)
      const entry = queue?.entries.get(Number(rest.readBigUInt64BE(0)))
      if (queue === undefined || entry === undefined) continue
      if (value.length === 2) queue.change(entry, { messageId: value.readUInt16BE(0) })
      else this.#damaged('messageId', key, clientId, value, '2')
    }

    for await (const [key, value] of this.#scan(Buffer.from([TAG_INCOMING]))) {
      const { clientId, rest } = keys.parseClient(key)
      this.#incomingOf(clientId).set(rest.readUInt16BE(0), decodeValue<SessionPacket>(key, value))
    }

    for await (const [key, value] of this.#scan(Buffer.from([TAG_SESSION]))) {
      const { clientId } = keys.parseClient(key)
      this.#sessions.add(clientId)
      if (value.length === 4) this.#intervals.set(clientId, value.readUInt32BE(0))
      else if (value.length !== 0) this.#damaged('session', key, clientId, value, '0 or 4')
    }

    if (this.#cursors !== undefined) {
      for await (const [key, value] of this.#scan(Buffer.from([TAG_CURSOR]))) {
        const { clientId, rest } = keys.parseClient(key)
        const { stream, partition } = keys.parseCursor(rest)
        const cursor = decodeCursorValue(value)
        if (cursor !== undefined) {
          if (cursor.fencesDamaged) this.#damaged('cursor', key, clientId, value, '8 + 16n')
          this.#cursors.load(clientId, stream, partition, cursor.next, cursor.fencesDamaged ? 'lost' : cursor.fences)
        } else {
          // From the log start: a cursor below it reads from there (what the disk budget deleted is not told again).
          this.#damaged('cursor', key, clientId, value, '8 + 16n')
          this.#cursors.load(clientId, stream, partition, 0, 'lost')
        }
      }
      const cursors = this.#cursors
      this.#releaseHold = this.#log?.holdRetention((stream, partition) => cursors.floor(stream, partition),
        (stream, partition, logStart) => { cursors.dropped(stream, partition, logStart) })
    }

    for await (const [key, value] of this.#scan(Buffer.from([TAG_WILL]))) {
      this.#wills.set(keys.parseClient(key).clientId, decodeValue<SessionPacket>(key, value))
    }

    for await (const [key, value] of this.#scan(Buffer.from([TAG_OFFLINE]))) {
      const { clientId } = keys.parseClient(key)
      // A damaged mark is left out: the session goes offline now, below, and the mark is written again.
      if (value.length === 8) this.#offlineSince.set(clientId, Number(value.readBigUInt64BE(0)))
      else this.#damaged('offline', key, clientId, value, '8')
    }
    // Sessions connected when the gateway stopped went offline now (written, so a restart loop does not extend them).
    const startedOffline: BatchOp[] = []
    for (const clientId of this.#sessions) {
      if (this.#offlineSince.has(clientId)) continue
      this.#offlineSince.set(clientId, this.#now())
      startedOffline.push(put(keys.offline(clientId), encodeU64(this.#now())))
    }
    this.#loaded = true
    await this.#writer.write(startedOffline)
  }

  #damaged (entry: SessionDamage['entry'], key: Buffer, clientId: string, value: Buffer, expected: string): void {
    this.#onDamaged?.({ entry, key: key.toString('hex'), clientId, length: value.length, expected })
  }

  #scan (prefix: Buffer): AsyncIterable<[Buffer, Buffer]> {
    return this.#db.iterator<Buffer, Buffer>({ ...prefixRange(prefix), ...BINARY })
  }

  #ready (): void {
    if (this.#destroyed) throw new SessionPersistenceError('GW_SESSION_CLOSED', 'the session persistence was destroyed')
    if (!this.#loaded) throw new SessionPersistenceError('GW_SESSION_NOT_READY', 'call setup(broker) first')
  }

  // --- retained messages ----------------------------------------------------

  /** Stores a retained message; an empty payload deletes the topic's retained message. */
  async storeRetained (packet: SessionPacket): Promise<void> {
    this.#ready()
    const topic = String(packet.topic)
    const payload = packet.payload
    if (payload === undefined || payload === null || payload.length === 0) {
      await this.#writer.write([del(keys.retained(topic))])
    } else {
      await this.#writer.write([put(keys.retained(topic), cbor.encode(ownFields(packet)))])
    }
  }

  /** @deprecated by aedes-persistence in favour of createRetainedStreamCombi. */
  createRetainedStream (pattern: string): Readable {
    return this.createRetainedStreamCombi([pattern])
  }

  /** Retained messages matching any of the topic filters, each message once. */
  createRetainedStreamCombi (patterns: readonly string[]): Readable {
    return Readable.from(this.#retained([...patterns]))
  }

  async * #retained (patterns: string[]): AsyncGenerator<SessionPacket> {
    this.#ready()
    await this.#writer.flush()
    const seen = new Set<string>()
    try {
      for (const pattern of patterns) {
        if (this.#destroyed) return
        const matches = compileTopicFilters([pattern])
        const levels = pattern.split('/')
        const wildcard = levels.findIndex((level) => level === '+' || level === '#')
        const literal = wildcard === -1 ? pattern : levels.slice(0, wildcard).join('/')
        for await (const [key, value] of this.#scan(keys.retained(literal))) {
          const topic = key.toString('utf8', 1)
          if (seen.has(topic) || !matches(topic)) continue
          seen.add(topic)
          yield decodeValue<SessionPacket>(key, value)
        }
      }
    } catch (err) {
      // aedes reads retained messages after the SUBACK, one scan per filter (10,000 take a while): a shutdown that
      // destroys this persistence and closes the database meanwhile ends the stream, rather than failing it with
      // LEVEL_DATABASE_NOT_OPEN on a stream aedes does not listen to, which killed the process on its way out.
      if (this.#destroyed) return
      throw err
    }
  }

  // --- subscriptions --------------------------------------------------------

  /** Stores subscriptions of a persistent session (later entries for the same topic win). */
  async addSubscriptions (client: SessionClient, subs: readonly SessionSubscription[]): Promise<void> {
    this.#ready()
    this.#refuseDiscarded(client, 'SUBSCRIBE')
    // Fences of the session's cursors behind the log, written with the subscriptions: a filter applies to records
    // logged after its SUBACK, also after a kill -9 (cursors.ts grant).
    const stored = this.#subs.get(client.id)
    const grant = this.#cursors?.grant(client.id, subs.map(({ topic, qos }) => ({ topic, qos, previous: stored?.get(topic) })))
    const ops: BatchOp[] = grant?.ops ?? []
    for (const [i, sub] of subs.entries()) {
      const record: StoredSubscription = { qos: sub.qos }
      if (sub.rh !== undefined) record.rh = sub.rh
      if (sub.rap !== undefined) record.rap = sub.rap
      if (sub.nl !== undefined) record.nl = sub.nl
      if (sub.subscriptionIdentifier !== undefined) record.subscriptionIdentifier = sub.subscriptionIdentifier
      const eras = grant?.eras[i]
      if (eras !== undefined) record.eras = eras
      this.#addSubscription(client.id, sub.topic, record)
      ops.push(put(keys.sub(client.id, sub.topic), cbor.encode(record)))
    }
    this.#cursors?.subscriptionsChanged(client.id)
    await this.#writer.write(ops)
  }

  #addSubscription (clientId: string, topic: string, record: StoredSubscription): void {
    let stored = this.#subs.get(clientId)
    if (stored === undefined) {
      stored = new Map()
      this.#subs.set(clientId, stored)
    }
    const previous = stored.get(topic)
    this.#matchesChanged()
    if (record.qos > 0) {
      this.#trie.add(topic, { clientId, topic, qos: record.qos, rh: record.rh, rap: record.rap, nl: record.nl })
    } else if (previous !== undefined && previous.qos > 0) {
      this.#trie.remove(topic, { clientId, topic })
    }
    stored.set(topic, record)
  }

  async removeSubscriptions (client: SessionClient, topics: readonly string[]): Promise<void> {
    this.#ready()
    if (this.sessionDiscarded(client)) return // the new session's subscriptions of the same filters are not its own
    const stored = this.#subs.get(client.id)
    if (stored === undefined) return
    const ops: BatchOp[] = []
    for (const topic of topics) {
      const record = stored.get(topic)
      if (record === undefined) continue
      if (record.qos > 0) this.#trie.remove(topic, { clientId: client.id, topic })
      stored.delete(topic)
      ops.push(del(keys.sub(client.id, topic)))
    }
    if (stored.size === 0) this.#subs.delete(client.id)
    // Deliveries from the log sent and not acknowledged become copies: the log's read filters by the subscriptions
    // held, and they must be resent until acknowledged [MQTT-4.4.0-1]. Written in the same batch.
    for (const { packet, messageId } of this.#cursors?.detach(client.id) ?? []) {
      const queued = toAedesPacket(packet)
      const seq = this.#nextSeq++
      ops.push(put(keys.outgoing(TAG_OUTGOING, client.id, seq), cbor.encode(queued)))
      ops.push(put(keys.outgoing(TAG_MESSAGE_ID, client.id, seq), encodeU16(messageId)))
      this.#queue(client.id, true).add({ seq, brokerId: queued.brokerId, brokerCounter: queued.brokerCounter, messageId, replacement: undefined })
    }
    // Nothing left to read for: the cursors go, and hold no retention.
    if (!this.#subs.has(client.id)) ops.push(...this.#cursors?.dropCursors(client.id) ?? [])
    this.#matchesChanged()
    this.#cursors?.subscriptionsChanged(client.id)
    await this.#writer.write(ops)
  }

  /** The client's stored subscriptions (aedes restores them on a CONNECT with clean: false). */
  async subscriptionsByClient (client: SessionClient): Promise<Array<SessionSubscription>> {
    this.#ready()
    const stored = this.#subs.get(client.id)
    if (stored === undefined) return []
    // aedes-persistence's shape: rh, rap and nl always present (undefined for MQTT 3.1.1), the identifier only when set.
    return [...stored].map(([topic, record]) => {
      const sub: SessionSubscription = { topic, qos: record.qos, rh: record.rh, rap: record.rap, nl: record.nl }
      if (record.subscriptionIdentifier !== undefined) sub.subscriptionIdentifier = record.subscriptionIdentifier
      return sub
    })
  }

  /**
   * Whether the client has stored session state [MQTT-3.1.2-4]: subscriptions,
   * queued or unacknowledged outgoing QoS 1/2 messages, or inbound QoS 2
   * packets awaiting PUBREL.
   */
  hasSessionState (client: SessionClient): boolean {
    this.#ready()
    return this.#sessions.has(client.id) || this.#subs.has(client.id) || this.#queues.has(client.id) || this.#incoming.has(client.id) ||
      this.#cursors?.has(client.id) === true
  }

  /**
   * Records that the client has a persistent session, stored or not [MQTT-3.1.2-4], with its MQTT 5 Session Expiry
   * Interval; cleanSubscriptions ends it.
   */
  async markSession (client: SessionClient): Promise<void> {
    this.#ready()
    // A connection being taken over records nothing: the session is the clean CONNECT's (cleanSubscriptions).
    if (this.sessionDiscarded(client)) return
    const ops: BatchOp[] = []
    if (this.#offlineSince.delete(client.id)) ops.push(del(keys.offline(client.id)))
    // aedes passes the connecting client (patched lib/handlers/connect.js fetchSubs), and the CONNACK waits for this
    // write: the interval it asked for is on disk before it, so one that asked for 0 is dropped at the next start
    // however soon a kill -9 comes. A caller with a bare { id } (tools, tests) keeps the stored interval.
    const interval = client.version === undefined ? this.#intervals.get(client.id) : expiryInterval(client)
    // From its CONNECT on, the connection holds the session: a connection it takes over closes after its CONNACK, and
    // that close must neither mark the session offline nor write back its own interval (#wentOffline).
    if (client.version !== undefined && client.closed !== true) this.#claim(client)
    if (!this.#sessions.has(client.id) || this.#intervals.get(client.id) !== interval) {
      this.#sessions.add(client.id)
      ops.push(this.#setInterval(client.id, interval))
    }
    await this.#writer.write(ops)
  }

  /**
   * A connection of the client is registered: a persistent session keeps the interval it connected with. The live
   * Client objects are kept, not a count: unpatched aedes emitted `client` also for a connection that closed during
   * its CONNECT (its takeover callback, aedes.js registerClient), and its close had emitted `clientDisconnect`, or
   * nothing. Counted, such connections kept a session connected for ever: it never expired, and its cursors held
   * retention (20 CONNECTs cut short were enough). The aedes patch no longer registers them; this stays the guard.
   */
  #connected (client: SessionClient): void {
    if (this.#discardedFrom.has(client)) return // a connection being taken over holds nothing (cleanSubscriptions)
    const open = this.#openConnections(client.id)
    if (client.closed === true) {
      // Gone already: no `clientDisconnect` follows. Its CONNECT took the session online (markSession).
      if (open === undefined) this.#wentOffline(client)
      return
    }
    this.#claim(client)
    if (this.#destroyed || !this.#loaded || !this.#sessions.has(client.id)) return
    // Online: a close of an earlier connection may have marked it offline after this one's CONNECT read the session.
    if (this.#offlineSince.delete(client.id)) this.#writer.write([del(keys.offline(client.id))]).catch(() => {})
    if (client.version === undefined) return
    const interval = expiryInterval(client)
    if (this.#intervals.get(client.id) === interval) return
    this.#writer.write([this.#setInterval(client.id, interval)]).catch(() => {}) // lost: the session keeps the interval it had
  }

  /**
   * The connection holds the session from now on, over every other open connection of its client id that claimed it
   * before (see #disconnected): its CONNECT recorded the session (markSession, or cleanSubscriptions for one that starts
   * a session), or aedes registered it (#connected; the registration that takes the others over comes last). Counted
   * among the client id's open connections until it closes.
   */
  #claim (client: SessionClient): void {
    this.#claims.set(client, ++this.#lastClaim)
    let open = this.#connections.get(client.id)
    if (open?.has(client) === true) return
    if (open === undefined) {
      open = new Set()
      this.#connections.set(client.id, open)
    }
    open.add(client)
    // Its close, however it comes: aedes emits `clientDisconnect` only while some client holds the id in its registry,
    // and unpatched aedes let a connection that closed during a later CONNECT of the same id take this one's entry.
    client.conn?.once('close', () => { this.#disconnected(client) })
  }

  /** The `C` entry of a session with this interval (u32, or empty for none), memory updated. */
  #setInterval (clientId: string, interval: number | undefined): BatchOp {
    if (interval === undefined) this.#intervals.delete(clientId)
    else this.#intervals.set(clientId, interval)
    const value = Buffer.alloc(interval === undefined ? 0 : 4)
    if (interval !== undefined) value.writeUInt32BE(interval, 0)
    return put(keys.session(clientId), value)
  }

  /**
   * A connection of the client closed: a persistent session with no connection left is offline from now on, with the
   * interval the client left it (an MQTT 5 DISCONNECT may change it). With connections left, it keeps the interval of
   * the one that claimed it last (#heldBy).
   */
  #disconnected (client: SessionClient): void {
    // Taken over by a clean CONNECT: it left the claimants then (cleanSubscriptions), and its close is not the session's.
    // Its interval and offline time were the discarded session's: written now, they ended the new one early (0 or 5 s
    // where the CONNECT asked for 3600) or never (3.1.1), and expiry dropped it with what the new connection subscribed.
    if (this.#discardedFrom.has(client)) return
    this.#connections.get(client.id)?.delete(client)
    const open = this.#openConnections(client.id)
    if (open === undefined) this.#wentOffline(client)
    else this.#heldBy(client.id, open)
  }

  /**
   * A connection closed while others of the client id are open: the session is the newest claimant's (#claim), with
   * the interval that one asked for. A CONNECT cut short before its registration (closed while aedes restored the
   * session; the aedes patch does not register it) had written its own interval in markSession, before its CONNACK;
   * left there, a kill -9 before the registered connection's own close brought the session back with the interval of
   * a connection that never had it: expiring too early (data its owner expects kept) or never. One that took the
   * session over was registered, so it is the newest and its interval stays. A CONNECT still under way that recorded
   * the session after the registered one is newer too: its interval is on disk before its CONNACK, as markSession says.
   */
  #heldBy (clientId: string, open: ReadonlySet<SessionClient>): void {
    if (this.#destroyed || !this.#loaded || !this.#sessions.has(clientId)) return
    let owner: SessionClient | undefined
    let newest = 0
    for (const client of open) {
      const claim = this.#claims.get(client) ?? 0
      if (claim > newest) {
        owner = client
        newest = claim
      }
    }
    if (owner?.version === undefined) return
    const interval = expiryInterval(owner)
    if (this.#intervals.get(clientId) === interval) return
    this.#writer.write([this.#setInterval(clientId, interval)]).catch(() => {}) // lost: as the cut-short CONNECT left it
  }

  /** The client id's connections still open (closed ones dropped), or undefined when none is. */
  #openConnections (clientId: string): Set<SessionClient> | undefined {
    const open = this.#connections.get(clientId)
    if (open === undefined) return undefined
    for (const client of open) {
      if (client.closed === true) open.delete(client)
    }
    if (open.size > 0) return open
    this.#connections.delete(clientId)
    return undefined
  }

  #isConnected (clientId: string): boolean {
    return this.#openConnections(clientId) !== undefined
  }

  /** The client's last connection closed: its persistent session is offline from now on. */
  #wentOffline (client: SessionClient): void {
    const clientId = client.id
    if (this.#destroyed || !this.#loaded || !this.#sessions.has(clientId)) return
    const ops: BatchOp[] = []
    const interval = expiryInterval(client)
    if (this.#intervals.get(clientId) !== interval) ops.push(this.#setInterval(clientId, interval))
    const mark = this.#markOffline(clientId)
    if (mark !== undefined) ops.push(mark)
    if (ops.length > 0) this.#writer.write(ops).catch(() => {}) // a lost mark: the next start sets one
    for (const listener of this.#offlineListeners) listener(clientId)
  }

  /** The session is offline from now, unless it already was: in memory at once, and the write that records it. */
  #markOffline (clientId: string): BatchOp | undefined {
    if (this.#offlineSince.has(clientId)) return undefined
    const now = this.#now()
    this.#offlineSince.set(clientId, now)
    return put(keys.offline(clientId), encodeU64(now))
  }

  /** Tells `listener` each time a persistent session goes offline (its last connection closed); session expiry arms its timer. */
  onOffline (listener: (clientId: string) => void): void {
    this.#offlineListeners.push(listener)
  }

  /**
   * When the offline session of this client ends: its MQTT 5 Session Expiry Interval or `maxOfflineSeconds`, the
   * shorter, counted from when it went offline. Null for a session that is connected, does not exist or never ends.
   */
  sessionEnd (clientId: string): SessionEnd | null {
    this.#ready()
    const since = this.#offlineSince.get(clientId)
    if (since === undefined || !this.#sessions.has(clientId) || this.#isConnected(clientId)) return null
    const interval = this.#intervals.get(clientId)
    const cap = this.#maxOfflineSeconds
    let bound: { source: SessionEnd['source'], seconds: number } | null = interval === undefined ? null : { source: 'interval', seconds: interval }
    if (cap > 0 && (bound === null || cap <= bound.seconds)) bound = { source: 'cap', seconds: cap }
    return bound === null ? null : { at: since + bound.seconds * 1000, ...bound }
  }

  /**
   * Gives an existing session the MQTT 5 Session Expiry Interval a gateway before this format kept elsewhere
   * (expiry.ts reads it once); resolves with whether there was a session to give it to.
   */
  async adoptInterval (clientId: string, seconds: number): Promise<boolean> {
    this.#ready()
    if (!this.#sessions.has(clientId) || !Number.isSafeInteger(seconds) || seconds < 0 || seconds >= NEVER_EXPIRES) return false
    if (this.#intervals.get(clientId) === seconds) return true
    await this.#writer.write([this.#setInterval(clientId, seconds)])
    return true
  }

  /** When the session went offline (ms), if it is offline. */
  offlineSince (clientId: string): number | undefined {
    this.#ready()
    return this.#offlineSince.get(clientId)
  }

  /** Client ids of the persistent sessions offline now. */
  offlineSessions (): string[] {
    this.#ready()
    return [...this.#offlineSince.keys()].filter((clientId) => this.#sessions.has(clientId) && !this.#isConnected(clientId))
  }

  /** Ends every offline session whose end ({@link sessionEnd}) has come; resolves with them. */
  async expireSessions (): Promise<Array<SessionEnd & { clientId: string }>> {
    const ended: Array<SessionEnd & { clientId: string }> = []
    for (const clientId of this.offlineSessions()) {
      const end = await this.expireSession(clientId)
      if (end !== null) ended.push({ clientId, ...end })
    }
    return ended
  }

  /** Drops the client's session ({@link dropSession}) if its end has come; resolves with that end, or null when it was not dropped. */
  async expireSession (clientId: string): Promise<SessionEnd | null> {
    const end = this.sessionEnd(clientId)
    if (end === null || end.at > this.#now()) return null
    return await this.dropSession(clientId) ? end : null
  }

  /**
   * Drops the persistent session of a client that is not connected: its subscriptions, queues, cursors (and their hold
   * on retention), inbound QoS 2 packets, will, interval and offline mark. The one way a session ends for being offline
   * too long (session expiry in both its forms); resolves with whether there was one to drop.
   */
  async dropSession (clientId: string): Promise<boolean> {
    this.#ready()
    if (this.#isConnected(clientId) || !this.#sessions.has(clientId)) return false
    const ops: BatchOp[] = []
    for (const tag of CLIENT_TAGS) {
      for await (const key of this.#db.keys<Buffer>({ ...prefixRange(clientPrefix(tag, clientId)), keyEncoding: 'buffer' })) ops.push(del(key))
    }
    // A reconnect while the keys were read owns the session now.
    if (this.#isConnected(clientId) || !this.#sessions.has(clientId)) return false
    for (const topic of this.#subs.get(clientId)?.keys() ?? []) this.#trie.remove(topic, { clientId, topic })
    this.#subs.delete(clientId)
    // So may a copy have been queued (QoS 2, or no log): its keys are deleted too. Its put went to the writer first
    // (the queue entry and its write are made in one turn), so the group commit deletes after it.
    for (const entry of this.#queues.get(clientId)?.entries.values() ?? []) {
      ops.push(del(keys.outgoing(TAG_OUTGOING, clientId, entry.seq)), del(keys.outgoing(TAG_MESSAGE_ID, clientId, entry.seq)))
    }
    this.#queues.delete(clientId)
    this.#incoming.delete(clientId)
    this.#wills.delete(clientId)
    this.#sessions.delete(clientId)
    this.#intervals.delete(clientId)
    this.#offlineSince.delete(clientId)
    this.#overflowing.delete(clientId)
    // A message may have created a cursor while the keys were read: its key is deleted too (it would hold retention
    // and make the session present again after a restart).
    ops.push(...this.#cursors?.drop(clientId) ?? [])
    this.#matchesChanged()
    await this.#writer.write(ops)
    return true
  }

  /** Number of QoS > 0 subscriptions and of clients with any stored subscription. */
  async countOffline (): Promise<{ subsCount: number, clientsCount: number }> {
    this.#ready()
    return { subsCount: this.#trie.subscriptionsCount, clientsCount: this.#subs.size }
  }

  /**
   * The QoS > 0 subscriptions whose filter matches the topic (aedes hands them to outgoingEnqueueCombi with each
   * message). The same array for every call until a subscription changes (TopicMatch): callers must not change it.
   */
  subscriptionsByTopic (topic: string): Promise<readonly MatchedSubscription[]> {
    try {
      this.#ready()
    } catch (err) {
      return Promise.reject(err)
    }
    const match = this.#matched(topic)
    // aedes asks once per message: one promise per topic rather than one per message (an async method's).
    return match.found ??= Promise.resolve(match.subs)
  }

  /** The topic's entry in the match cache, made now if there is none (see TopicMatch). */
  #matched (topic: string): TopicMatch {
    let match = this.#matches.get(topic)
    if (match !== undefined) return match
    // Without a persistent QoS 1/2 subscription, skips the trie's split of the topic (about 3 % of fan-in's main thread).
    const subs = this.#trie.subscriptionsCount === 0 ? NO_MATCH : this.#trie.match(topic)
    match = { subs, allQos1: subs.every((sub) => sub.qos === 1), readyStream: undefined, readyPartition: -1, readyFrom: 0 }
    if (this.#matchesHeld + subs.length + 1 > MATCHES_CACHED) this.#matchesChanged()
    this.#matches.set(topic, match)
    this.#matchesHeld += subs.length + 1
    return match
  }

  /**
   * A subscription or a cursor went or came: what the cache says of every topic may be wrong now. Every change to
   * the trie, and every drop of a cursor, comes with this call; creating one does not need it (a match whose
   * sessions lack a cursor is never marked ready).
   */
  #matchesChanged (): void {
    if (this.#matchesHeld === 0) return
    for (const match of this.#matches.values()) if (match.found !== undefined) this.#outdated.add(match.subs)
    this.#matches.clear()
    this.#matchesHeld = 0
  }

  /**
   * Ends the client's stored session (aedes calls this for a CONNECT with clean = true, before its CONNACK): its
   * subscriptions, session marker, interval, offline mark, cursors and queued copies. The inbound QoS 2 packets go in
   * cleanIncoming, after the takeover of a previous connection (aedes lib/handlers/connect.js), also before the CONNACK.
   * While another connection of the client id holds the session, the aedes patch calls this only at the CONNECT's turn
   * to register (aedes.js _writeAtTurn), or, for one closed before that, once no other connection holds the id
   * (_closedBeforeRegistering): then `client` is closed.
   */
  async cleanSubscriptions (client: SessionClient): Promise<void> {
    this.#ready()
    // Every in-memory change first, in this turn: a CONNECT read after it (aedes' subscriptionsByClient) finds no
    // session, even while the deletes are being written (an MQTT 5 session that ended with its connection used to be
    // resumed by a reconnect racing them). Then one write of all the deletes, awaited before the CONNACK: the queued
    // copies too. aedes' emptyQueue drops them as well, one at a time after the CONNACK (emptyQueueFilter on
    // _cleanStart), so a kill -9 in between brought the old session back, present and with its old messages.
    const ops: BatchOp[] = []
    // The connections open now are taken over by this CONNECT (the patch cleans at its turn to register, before the
    // takeover): until they close, what they write is not the session this one starts. Nor do they hold it any more:
    // the session is offline once this CONNECT's connection closes, whatever theirs do (#disconnected).
    const open = this.#connections.get(client.id)
    for (const other of open ?? []) {
      if (other === client) continue
      this.#discardedFrom.add(other)
      open?.delete(other)
    }
    if (open?.size === 0) this.#connections.delete(client.id)
    for (const entry of this.#queues.get(client.id)?.entries.values() ?? []) {
      ops.push(del(keys.outgoing(TAG_OUTGOING, client.id, entry.seq)), del(keys.outgoing(TAG_MESSAGE_ID, client.id, entry.seq)))
    }
    this.#queues.delete(client.id)
    this.#overflowing.delete(client.id)
    if (this.#offlineSince.delete(client.id)) ops.push(del(keys.offline(client.id)))
    let wentOffline = false
    if (startsSession(client)) {
      // MQTT 5 Clean Start 1 with a Session Expiry Interval: the new session outlives this connection (3.1.2.4,
      // 3.1.2.11.2) and exists from this CONNECT on, in the write the CONNACK waits for. Only a CONNECT with Clean
      // Start 0 records a session otherwise (markSession): this one had none, so it did not expire, and a reconnect
      // found it present only while the old session's leftovers were still on disk.
      this.#sessions.add(client.id)
      ops.push(this.#setInterval(client.id, expiryInterval(client)))
      // Held from here, as markSession holds a resumed one: a connection it takes over closes after the CONNACK.
      if (client.closed !== true) {
        this.#claim(client)
      } else if (!this.#isConnected(client.id)) {
        // A CONNECT that closed before its registration, with nobody holding the id (see above): the session it
        // starts is offline from now, in this write, or it would never expire.
        ops.push(this.#markOffline(client.id) as BatchOp) // its mark was deleted above
        wentOffline = true
      }
    } else {
      this.#intervals.delete(client.id)
      if (this.#sessions.delete(client.id)) ops.push(del(keys.session(client.id)))
    }
    const dropped = this.#cursors?.drop(client.id) ?? []
    ops.push(...dropped)
    const stored = this.#subs.get(client.id)
    if (stored !== undefined) {
      for (const [topic, record] of stored) {
        if (record.qos > 0) this.#trie.remove(topic, { clientId: client.id, topic })
        ops.push(del(keys.sub(client.id, topic)))
      }
      this.#subs.delete(client.id)
    }
    // aedes calls this at every clean CONNECT: the match cache survives those that had nothing stored.
    if (dropped.length > 0 || stored !== undefined) this.#matchesChanged()
    const written = ops.length > 0 ? this.#writer.write(ops) : undefined
    if (wentOffline) for (const listener of this.#offlineListeners) listener(client.id)
    await written
  }

  /**
   * Whether a clean CONNECT of the client id discarded the session while this connection was open (cleanSubscriptions):
   * the connection is being taken over, and the session of its client id is the new one's. Its session-state writes
   * are refused or change nothing (see the header); inbound-qos2.ts asks before it starts an append.
   */
  sessionDiscarded (client: SessionClient): boolean {
    return this.#discardedFrom.has(client)
  }

  /**
   * Refuses a write of session state from a connection being taken over (sessionDiscarded): aedes fails the packet's
   * step and closes the connection, acknowledging nothing. Stored, it landed in the new session: a QoS 2 packet id
   * made the new connection's PUBLISH with that id a duplicate (dropped), a subscription outlived the clean start.
   */
  #refuseDiscarded (client: SessionClient, what: string): void {
    if (!this.#discardedFrom.has(client)) return
    throw new SessionPersistenceError('GW_SESSION_TAKEN_OVER',
      `${what} of ${client.id} refused: a clean CONNECT of that client id discarded the session and is taking this connection over`)
  }

  /** Client ids with a stored subscription to exactly this topic filter. */
  getClientList (topic: string): Readable {
    const ids: string[] = []
    for (const [clientId, stored] of this.#subs) {
      if (stored.has(topic)) ids.push(clientId)
    }
    return Readable.from(ids)
  }

  // --- offline queues (outgoing) --------------------------------------------

  #queue (clientId: string, create: true): OutgoingQueue
  #queue (clientId: string, create: false): OutgoingQueue | undefined
  #queue (clientId: string, create: boolean): OutgoingQueue | undefined {
    let queue = this.#queues.get(clientId)
    if (queue === undefined && create) {
      queue = new OutgoingQueue()
      this.#queues.set(clientId, queue)
    }
    return queue
  }

  #dropIfEmpty (clientId: string, queue: OutgoingQueue): void {
    if (queue.entries.size === 0 && this.#queues.get(clientId) === queue) this.#queues.delete(clientId)
  }

  /** @deprecated by aedes-persistence in favour of outgoingEnqueueCombi; aedes still calls it for a client's own publishes. */
  async outgoingEnqueue (sub: { clientId: string }, packet: SessionPacket): Promise<void> {
    await this.outgoingEnqueueCombi([sub], packet)
  }

  /**
   * What the ack of a logged message must wait for, so that every persistent session finds it after a kill -9
   * (hooks/authorize-publish.ts acks, then delivers to live subscribers without waiting):
   * - `unmatched`: no persistent session's QoS 1/2 subscription matches the topic; nothing, and no session needs the
   *   message's log position (log-position.ts);
   * - `ready`: every matching session reads the message through a cursor into its partition that is on disk;
   * - a promise: the writes of the cursors that are not on disk yet: created now (the session's first message of
   *   that partition) or by an earlier message and still being written;
   * - `copies`: a session keeps a copy (a QoS 2 delivery), which aedes' publish queues: the ack waits for that
   *   publish, as for a message the log does not hold. Nothing is created then.
   * aedes' publish after it finds the cursors and writes nothing (outgoingEnqueueCombi).
   */
  beforeAck (topic: string, qos: number, position: LogPosition): AckWait {
    this.#ready()
    if (this.#trie.subscriptionsCount === 0) return 'unmatched'
    const match = this.#matched(topic)
    if (match.subs.length === 0) return 'unmatched'
    if (this.#cursors === undefined || !cursorsDeliver(match, qos)) return 'copies'
    return this.#cursorsReady(match, position)
  }

  /**
   * Has every session of the match take the logged message at `position` through its cursor (#enqueueCursor): 'ready'
   * when every such cursor is on disk, else the writes still to wait for. Once every one is, the match remembers the
   * partition, and later messages there skip the sessions altogether (their cursors exist: nothing to do).
   */
  #cursorsReady (match: TopicMatch, position: LogPosition): 'ready' | 'copies' | Promise<void> {
    if (match.readyPartition === position.partition && match.readyStream === position.stream && position.offset >= match.readyFrom) return 'ready'
    // A session whose cursor started above the record (a later record of the partition, in the same commit, reached
    // it first and created the cursor) never reads it: it gets a copy (#enqueue), and the ack waits for that.
    const cursors = this.#cursors as SessionCursors
    for (const sub of match.subs) {
      if (cursors.reads(sub.clientId, position) === false) return 'copies'
    }
    let writes: Array<Promise<void>> | undefined
    let from = 0
    for (const sub of match.subs) {
      const write = this.#enqueueCursor(sub.clientId, position)
      if (write !== undefined) (writes ??= []).push(write)
      from = Math.max(from, cursors.startOf(sub.clientId, position.stream, position.partition) ?? 0)
    }
    if (writes === undefined) {
      match.readyStream = position.stream
      match.readyPartition = position.partition
      match.readyFrom = from
      return 'ready'
    }
    return writes.length === 1 ? writes[0] as Promise<void> : Promise.all(writes).then(() => {})
  }

  /**
   * Takes a logged message for the client's cursor of its partition (cursors.ts enqueue) and returns the write the
   * cursor still waits for: the one that creates it now, or the one an earlier message started; undefined when the
   * cursor is on disk.
   */
  #enqueueCursor (clientId: string, position: LogPosition): Promise<void> | undefined {
    const created = (this.#cursors as SessionCursors).enqueue(clientId, position)
    if (created === undefined) {
      return this.#creating.size === 0 ? undefined : this.#creating.get(`${clientId}\u0000${position.partition}/${position.stream}`)
    }
    const key = `${clientId}\u0000${position.partition}/${position.stream}`
    this.#creating.set(key, created)
    const settled = (): void => { if (this.#creating.get(key) === created) this.#creating.delete(key) }
    // A failed write: the cursors took the cursor back (or marked it unwritten), and no match may still call its
    // partition ready, so the next message there creates it again and waits.
    created.then(settled, () => {
      settled()
      this.#matchesChanged()
    })
    return created
  }

  /**
   * Queues the packet for each subscription's client. Resolves once the queue
   * entries are written; aedes delivers to online clients only after that.
   */
  outgoingEnqueueCombi (subs: ReadonlyArray<{ clientId: string, qos?: number }>, packet: SessionPacket): Promise<void> {
    try {
      this.#ready()
    } catch (err) {
      return Promise.reject(err)
    }
    if (subs.length === 0) return SETTLED
    const position = this.#cursors === undefined ? undefined : logPositionOf(packet)
    if (position !== undefined && position.late !== true && typeof packet.topic === 'string') {
      // aedes passes what subscriptionsByTopic gave for this message: one cursor check per partition, as beforeAck.
      // Not an async method: a logged message to sessions that all read it from their cursors allocates nothing here.
      const match = this.#matches.get(packet.topic)
      if (match !== undefined && match.subs === subs && cursorsDeliver(match, packet.qos ?? 0)) {
        const ready = this.#cursorsReady(match, position)
        if (ready !== 'copies') return ready === 'ready' ? SETTLED : ready
      }
    }
    return this.#enqueue(subs, packet, position)
  }

  async #enqueue (subs: ReadonlyArray<{ clientId: string, qos?: number }>, packet: SessionPacket, position: LogPosition | undefined): Promise<void> {
    let copies = this.#stillSubscribed(subs)
    const created: Array<Promise<void>> = []
    if (position !== undefined && this.#cursors !== undefined) {
      // A QoS 1 delivery of a logged message is a cursor, not a copy (cursors.ts); QoS 2 ones stay copies.
      const held = copies
      copies = []
      for (const sub of held) {
        // Without a subscription's QoS (outgoingEnqueue: a publish to one client, not routed by a subscription) it is a copy.
        if (sub.qos === undefined || Math.min(sub.qos, packet.qos ?? 0) !== 1) { (copies as Array<{ clientId: string }>).push(sub); continue }
        // A copy where the session's cursor will not read the record (cursors.ts reads), and, delivered again after a
        // restart, where it has none in the partition: a cursor made at the record would read the log from there. A
        // cursor loaded past the record may have had it before the crash (a duplicate), or may have been created above
        // it while its delivery was cut short (a kill before the copy's write): a copy, never a loss.
        const reads = this.#cursors.reads(sub.clientId, position)
        if (reads === false || (reads === undefined && position.late === true)) {
          (copies as Array<{ clientId: string }>).push(sub)
          continue
        }
        const write = this.#enqueueCursor(sub.clientId, position)
        if (write !== undefined) created.push(write)
      }
      // No write, no await: aedes emits this message after as many turns as one no session matched. Its dedupe drops
      // a live copy whose counter is below one already delivered (lib/client.js), so an emit may not fall behind.
      if (copies.length === 0) {
        if (created.length > 0) await Promise.all(created)
        return
      }
    }
    const queued = toAedesPacket(packet)
    const body = cbor.encode(queued)
    const ops: BatchOp[] = []
    for (const sub of copies) {
      if (this.#full(sub.clientId, queued)) continue
      const seq = this.#nextSeq++
      ops.push(put(keys.outgoing(TAG_OUTGOING, sub.clientId, seq), body))
      noteQueuedCopy(packet) // inbound QoS 2 marks its entry delivered (format.ts)
      this.#queue(sub.clientId, true).add({
        seq, brokerId: queued.brokerId, brokerCounter: queued.brokerCounter, messageId: undefined, replacement: undefined,
      })
    }
    await Promise.all([this.#writer.write(ops), ...created])
  }

  /**
   * The subscriptions of `subs` (aedes matched them turns before it queues the message: aedes.js enqueueOffline) that
   * their sessions still hold. A clean step in between discarded them: queued, the copy (or the cursor made for it)
   * landed in the new session, which never subscribed. Looked at only when the subscriptions changed since `subs` was
   * handed out (#outdated), so the usual message costs one lookup (a look at every subscription of every message
   * cost offline ingest about 10 %: BENCHMARKS.md). A caller's own array (aedes-persistence's suite; a publish to one
   * client, outgoingEnqueue) is queued as given.
   */
  #stillSubscribed (subs: ReadonlyArray<{ clientId: string, qos?: number }>): ReadonlyArray<{ clientId: string, qos?: number }> {
    if (!this.#outdated.has(subs as readonly MatchedSubscription[])) return subs
    const held = (sub: MatchedSubscription): boolean => (this.#subs.get(sub.clientId)?.get(sub.topic)?.qos ?? 0) > 0
    const matched = subs as readonly MatchedSubscription[]
    return matched.every(held) ? matched : matched.filter(held)
  }

  /**
   * Whether the client's queue is at its bound: then the copy is dropped (the newest, as Mosquitto does), counted
   * and remembered, so that aedes delivering it to a connected client finds it in outgoingUpdate.
   */
  #full (clientId: string, packet: SessionPacket): boolean {
    const size = this.#queues.get(clientId)?.entries.size ?? 0
    if (size < this.#maxQueued) {
      this.#overflowing.delete(clientId)
      return false
    }
    const first = !this.#overflowing.has(clientId)
    this.#overflowing.add(clientId)
    this.#dropped.add(`${clientId}|${brokerKey(packet.brokerId, packet.brokerCounter)}`)
    if (this.#dropped.size > DROPPED_REMEMBERED) this.#dropped.delete(this.#dropped.values().next().value as string)
    this.#onOverflow?.(clientId, String(packet.topic), first)
    return true
  }

  /**
   * Whether aedes may forward this live copy to the client: false for a copy of a logged message the session reads
   * from the log (cursors.ts). authorizeForward asks; aedes then clears the copy it did not forward.
   */
  forwardLive (client: SessionClient, packet: LivePacket): boolean {
    return this.#cursors?.forwardLive(client, packet) ?? true
  }

  /** Whether the connected session's cursors have nothing to write now (window full or caught up with the log). */
  cursorsSettled (client: SessionClient): boolean {
    return this.#cursors?.settled(client.id) ?? true
  }

  /** Per stream: persistent sessions with a cursor into it, and the records they have not acknowledged. */
  cursorLag (): Array<{ stream: string, sessions: number, lagMessages: number }> {
    return this.#cursors?.lag() ?? []
  }

  /**
   * Every persistent session (CONNECT with clean: false, or MQTT 5 with a session expiry): its aedes client id (scoped by
   * tenant, see access/topics.ts), whether a connection holds it, since when it is offline, its (mounted) subscriptions,
   * its cursors into the log and the number of copies queued for it. For GET /v1/sessions.
   */
  sessionStates (): SessionState[] {
    this.#ready()
    return [...this.#sessions].map((clientId) => ({
      clientId,
      connected: this.#isConnected(clientId),
      offlineSince: this.#offlineSince.get(clientId) ?? null,
      subscriptions: [...this.#subs.get(clientId) ?? []].map(([topic, record]) => ({ topic, qos: record.qos })),
      cursors: this.#cursors?.cursorsOf(clientId) ?? [],
      queued: this.#queues.get(clientId)?.entries.size ?? 0,
    }))
  }

  /** The highest QoS of the client's QoS > 0 subscriptions matching the topic, 0 when none: the trie live routing agrees with. */
  #grantedQos (clientId: string, topic: string): number {
    let qos = 0
    for (const sub of this.#matched(topic).subs) {
      if (sub.clientId === clientId && sub.qos > qos) qos = sub.qos
    }
    return qos
  }

  /** The Subscription Identifiers of the client's subscriptions whose filter matches the topic [MQTT-3.3.4-3]. */
  #subscriptionIds (clientId: string, topic: string): number[] {
    const ids: number[] = []
    for (const [filter, record] of this.#subs.get(clientId) ?? []) {
      if (record.subscriptionIdentifier !== undefined && topicMatches(filter, topic)) ids.push(record.subscriptionIdentifier)
    }
    return ids
  }

  /** The client's subscriptions (every QoS) whose filter matches the topic, with their grant eras (cursors.ts). */
  #subscriptionsMatching (clientId: string, topic: string): StoredSubscription[] {
    const matching: StoredSubscription[] = []
    for (const [filter, record] of this.#subs.get(clientId) ?? []) if (topicMatches(filter, topic)) matching.push(record)
    return matching
  }

  /** Whether every QoS > 0 subscription of the client whose filter matches the topic has No Local set [MQTT-3.8.3-3]. */
  #noLocal (clientId: string, topic: string): boolean {
    for (const [filter, record] of this.#subs.get(clientId) ?? []) {
      if (record.qos > 0 && record.nl !== true && topicMatches(filter, topic)) return false
    }
    return true
  }

  /** Whether a QoS > 0 subscription of the client whose filter matches the topic has Retain As Published set (MQTT 5 3.8.3.1). */
  #retainAsPublished (clientId: string, topic: string): boolean {
    for (const [filter, record] of this.#subs.get(clientId) ?? []) {
      if (record.qos > 0 && record.rap === true && topicMatches(filter, topic)) return true
    }
    return false
  }

  /**
   * Records the message id a queued packet was sent with, found by brokerId
   * and brokerCounter; or, for a packet of another broker with the same
   * message id (a PUBREL after PUBREC), replaces the queued packet with it.
   * The earlier entry in queue order wins, as in aedes-persistence.
   * Rejects with GW_SESSION_NOT_FOUND when neither exists.
   */
  async outgoingUpdate (client: SessionClient, packet: SessionPacket): Promise<void> {
    this.#ready()
    // A delivery to a connection being taken over goes out unqueued: a queue entry of the new session may have its
    // brokerId and counter (a copy for the new connection's own subscription), or its packet id.
    if (this.sessionDiscarded(client)) return
    // aedes took this id from the client's counter for a delivery of its own; a cursor delivery may hold it (its ids
    // come from the same counter, and a new connection starts it elsewhere): it goes out with a free one instead.
    // A PUBREL keeps the id of its PUBLISH, which the cursors never take (busy while the copy is queued).
    if (packet.cmd === 'publish' && typeof packet.messageId === 'number' && this.#cursors !== undefined) {
      movePacketId(packet, this.#cursors.freeId(client, packet.messageId))
    }
    const queue = this.#queue(client.id, false)
    const messageId = typeof packet.messageId === 'number' ? checkMessageId(packet.messageId) : undefined
    const sameBroker = queue?.byBroker(packet.brokerId, packet.brokerCounter)
    const otherBroker = messageId === undefined ? undefined : queue?.byMessageId(messageId, { brokerId: packet.brokerId })
    if (queue === undefined || (sameBroker === undefined && otherBroker === undefined)) {
      // A copy dropped by the queue's bound: a connected client still gets it, unqueued.
      if (this.#dropped.delete(`${client.id}|${brokerKey(packet.brokerId, packet.brokerCounter)}`)) return
      // A live delivery to a connected persistent session that neither a copy nor a cursor was made for: its
      // subscription came (or its cursors went, UNSUBSCRIBE) between aedes' enqueue step of the message and its
      // delivery, which runs turns later (aedes.js enqueueOffline, then emitPacket). It is queued now, as the copy it
      // would have had, so its PUBACK, its PUBREL (QoS 2: aedes stores the PUBREL through here, by packet id) and its
      // resend after a reconnect find it: the message was published before the subscription as this session sees it.
      // Refusing it made aedes close the connection (lib/client.js writeQoS), dropping a subscriber for subscribing
      // while devices publish.
      if (packet.cmd === 'publish' && this.#sessions.has(client.id) && this.#connections.has(client.id)) {
        if (messageId === undefined) return
        // Past the queue's bound it is counted as an overflow and goes out unqueued, as any copy the bound drops.
        if (this.#full(client.id, packet)) return
        const queued = toAedesPacket(packet)
        const body = cbor.encode(queued) // before memory changes, so a packet that cannot be stored changes nothing
        await this.#queueSent(client.id, messageId, { brokerId: queued.brokerId, brokerCounter: queued.brokerCounter, replacement: undefined }, body)
        return
      }
      // The PUBREL of a QoS 2 delivery that went out unqueued (a copy the queue's bound dropped): kept from the
      // client's PUBREC to its PUBCOMP, so that a reconnect resends it [MQTT-4.4.0-1]. Refusing it made aedes close the
      // connection, and the client, which releases the message on the PUBREL, never had it.
      if (packet.cmd === 'pubrel' && messageId !== undefined && this.#sessions.has(client.id) && this.#connections.has(client.id)) {
        const replacement = ownFields(packet)
        const body = cbor.encode(replacement) // before memory changes, so a packet that cannot be stored changes nothing
        await this.#queueSent(client.id, messageId, { brokerId: packet.brokerId, brokerCounter: packet.brokerCounter, replacement }, body)
        return
      }
      throw notFound()
    }
    const ops: BatchOp[] = []
    if (sameBroker !== undefined && (otherBroker === undefined || sameBroker.seq < otherBroker.seq)) {
      queue.change(sameBroker, { messageId })
      const key = keys.outgoing(TAG_MESSAGE_ID, client.id, sameBroker.seq)
      ops.push(messageId === undefined ? del(key) : put(key, encodeU16(messageId)))
    } else if (otherBroker !== undefined) {
      const replacement = ownFields(packet)
      const body = cbor.encode(replacement) // before memory changes, so a packet that cannot be stored changes nothing
      otherBroker.replacement = replacement
      queue.change(otherBroker, { brokerId: packet.brokerId, brokerCounter: packet.brokerCounter, messageId })
      ops.push(put(keys.outgoing(TAG_OUTGOING, client.id, otherBroker.seq), body))
      ops.push(put(keys.outgoing(TAG_MESSAGE_ID, client.id, otherBroker.seq), encodeU16(messageId as number)))
    }
    await this.#writer.write(ops)
  }

  /**
   * Queues a packet already on its way to a connected client (outgoingUpdate): in memory, then on disk. Not on disk
   * means not in memory either: its id would stay busy, and it would count against the queue's bound.
   */
  async #queueSent (clientId: string, messageId: number, fields: Omit<OutgoingEntry, 'seq' | 'messageId'>, body: Buffer): Promise<void> {
    const entry: OutgoingEntry = { seq: this.#nextSeq++, messageId, ...fields }
    const target = this.#queue(clientId, true)
    target.add(entry)
    try {
      await this.#writer.write([
        put(keys.outgoing(TAG_OUTGOING, clientId, entry.seq), body), put(keys.outgoing(TAG_MESSAGE_ID, clientId, entry.seq), encodeU16(messageId)),
      ])
    } catch (err) {
      target.remove(entry)
      this.#dropIfEmpty(clientId, target)
      throw err
    }
  }

  /**
   * Removes the queued packet with this message id (a PUBACK or PUBCOMP is
   * fine) and resolves with it, or with undefined when there is none. A packet
   * without a message id is looked up by brokerId and brokerCounter: aedes
   * passes the undelivered packet itself when authorizeForward drops it.
   */
  outgoingClearMessageId (client: SessionClient, packet: SessionPacket): Promise<SessionPacket | undefined> {
    // aedes clears every live copy authorizeForward held back (a logged message a connected session reads from its
    // cursors), one per message: with no copy queued for the client that is nothing to do, and no promise to make.
    if (this.#loaded && !this.#destroyed && fieldOf(packet, 'cmd') === 'publish' && !this.#queues.has(client.id)) return NOTHING
    // A PUBACK or PUBCOMP of a connection being taken over: the new session's queued packet with that id is not its own.
    if (this.sessionDiscarded(client)) return NOTHING
    return this.#clearMessageId(client, packet)
  }

  async #clearMessageId (client: SessionClient, packet: SessionPacket): Promise<SessionPacket | undefined> {
    this.#ready()
    const fromLog = this.#cursors?.clear(client, typeof packet === 'object' && packet !== null ? packet : {})
    if (fromLog?.found === true) return undefined
    const queue = this.#queue(client.id, false)
    if (queue === undefined) return undefined
    const messageId = fieldOf(packet, 'messageId')
    const brokerId = fieldOf(packet, 'brokerId')
    const entry = typeof messageId === 'number'
      ? queue.byMessageId(messageId)
      : typeof brokerId === 'string' ? queue.byBroker(brokerId, fieldOf(packet, 'brokerCounter')) : undefined
    if (entry === undefined) return undefined
    queue.remove(entry)
    this.#dropIfEmpty(client.id, queue)
    const bodyKey = keys.outgoing(TAG_OUTGOING, client.id, entry.seq)
    let stored: SessionPacket | undefined
    if (entry.replacement !== undefined) {
      stored = { ...entry.replacement }
    } else {
      const body = await this.#writer.read(bodyKey)
      if (body !== undefined) stored = { ...decodeValue<SessionPacket>(bodyKey, body), messageId: entry.messageId }
    }
    await this.#writer.write([del(bodyKey), del(keys.outgoing(TAG_MESSAGE_ID, client.id, entry.seq))])
    return stored
  }

  /**
   * The client's queue in enqueue order, with the message ids assigned so
   * far (entries cleared while the stream runs are skipped). With a log, once
   * they are handed over, the session's cursors start delivering to the
   * connection themselves (cursors.ts).
   */
  outgoingStream (client: SessionClient): Readable {
    return Readable.from(this.#outgoing(client))
  }

  async * #outgoing (client: SessionClient): AsyncGenerator<SessionPacket> {
    this.#ready()
    await this.#writer.flush()
    const clientId = client.id
    if (this.#queues.get(clientId) !== undefined) {
      const prefix = clientPrefix(TAG_OUTGOING, clientId)
      for await (const [key, value] of this.#scan(prefix)) {
        const entry = this.#queues.get(clientId)?.entries.get(Number(key.readBigUInt64BE(prefix.length)))
        if (entry === undefined) continue
        if (entry.replacement !== undefined) {
          yield { ...entry.replacement }
        } else {
          yield { ...decodeValue<SessionPacket>(key, value), messageId: entry.messageId }
        }
      }
    }
    // A stored session resumed by a connection whose session ends with it (MQTT 5 Clean Start 0, Session Expiry 0)
    // still gets its cursors' records and its live ones while connected; aedes holds its live copies back all the same.
    this.#cursors?.attach(client, this.#subs.has(clientId))
  }

  // --- inbound QoS 2 (incoming) ---------------------------------------------

  /** Stores an inbound QoS 2 PUBLISH until its PUBREL. aedes sends PUBREC after this resolves. */
  async incomingStorePacket (client: SessionClient, packet: SessionPacket): Promise<void> {
    this.#ready()
    this.#refuseDiscarded(client, 'QoS 2 PUBLISH')
    const messageId = checkMessageId(packet.messageId)
    const stored = toAedesPacket(packet)
    stored.messageId = messageId
    this.#incomingOf(client.id).set(messageId, stored)
    await this.#writer.write([put(keys.incoming(client.id, messageId), cbor.encode(stored))])
  }

  /**
   * incomingStorePacket with the write done by the caller: `write` gets the
   * operations (on this key space, as the log store's `extraOps` take them)
   * and resolves once they are durable, normally in the batch that appends
   * the packet to the log, so the log and this entry agree after any crash.
   * Memory is updated at once, as incomingStorePacket does, so a duplicate
   * arriving meanwhile is found; if `write` rejects the entry is dropped.
   */
  async incomingStorePacketWith<T> (client: SessionClient, packet: SessionPacket, write: (ops: AppendExtraOperation[]) => Promise<T>): Promise<T> {
    this.#ready()
    this.#refuseDiscarded(client, 'QoS 2 PUBLISH') // before `write`: nothing is logged
    const messageId = checkMessageId(packet.messageId)
    const stored: SessionPacket & IncomingFields = toAedesPacket(packet)
    stored.messageId = messageId
    const store = this.#incomingOf(client.id)
    store.set(messageId, stored)
    // The entry keeps its record's position (format.ts), which only the commit that assigns the offset knows.
    const value = (at: RecordPosition): Uint8Array => {
      stored.edgemqPosition = { stream: at.stream, partition: at.partition, offset: at.offset }
      return cbor.encode(stored)
    }
    try {
      return await write([{ type: 'put', sublevel: this.#db, key: keys.incoming(client.id, messageId), value }])
    } catch (err) {
      if (store.get(messageId) === stored) store.delete(messageId)
      if (store.size === 0 && this.#incoming.get(client.id) === store) this.#incoming.delete(client.id)
      throw err
    }
  }

  /**
   * Writes the stored inbound packet again with `edgemqDelivered` (format.ts): its message was delivered, so a
   * retransmission after a crash does not deliver it again. Nothing when the entry is gone. Without an fsync of its
   * own (LogStore.write `durable: false`), as a cursor advance: a killed process loses none, an OS crash or power
   * loss may lose the mark, and then the message is delivered again (a duplicate, never a loss); the copies it
   * follows were written durably before.
   */
  async incomingMarkDelivered (client: SessionClient, messageId: number): Promise<void> {
    this.#ready()
    if (this.sessionDiscarded(client)) return
    const stored: (SessionPacket & IncomingFields) | undefined = this.#incoming.get(client.id)?.get(messageId)
    if (stored === undefined) return
    stored.edgemqDelivered = true
    await this.#writer.write([put(keys.incoming(client.id, messageId), cbor.encode(stored))], NOT_DURABLE_MARK)
  }

  /** Whether an inbound packet with this id is stored for the client (awaiting PUBREL). */
  hasIncomingPacket (client: SessionClient, messageId: number): boolean {
    this.#ready()
    if (this.sessionDiscarded(client)) return false
    return this.#incoming.get(client.id)?.has(messageId) === true
  }

  /** Number of the client's stored inbound packets. */
  incomingCount (client: SessionClient): number {
    this.#ready()
    if (this.sessionDiscarded(client)) return 0
    return this.#incoming.get(client.id)?.size ?? 0
  }

  /** The stored inbound packet; rejects with GW_SESSION_NOT_FOUND, which aedes reads as "a new packet". */
  async incomingGetPacket (client: SessionClient, packet: SessionPacket): Promise<SessionPacket> {
    this.#ready()
    // A connection being taken over sees none of the new session's packets: its PUBLISH is new (and refused), its
    // PUBREL finds nothing to delete (PUBCOMP all the same).
    const stored = this.sessionDiscarded(client) ? undefined : this.#incoming.get(client.id)?.get(packet.messageId as number)
    if (stored === undefined) {
      throw notFound()
    }
    return { ...stored }
  }

  async incomingDelPacket (client: SessionClient, packet: SessionPacket): Promise<void> {
    this.#ready()
    if (this.sessionDiscarded(client)) throw notFound()
    const store = this.#incoming.get(client.id)
    const messageId = packet.messageId as number
    if (store === undefined || !store.delete(messageId)) {
      // A repeated PUBREL: aedes answers it with PUBCOMP, which must not overtake the write deleting the entry (a kill
      // after that PUBCOMP would bring the entry back, and the client's next message with this id would be dropped).
      await this.#writer.flush()
      throw notFound()
    }
    if (store.size === 0) this.#incoming.delete(client.id)
    await this.#writer.write([del(keys.incoming(client.id, messageId))])
  }

  /** Drops every stored inbound packet of the client ([MQTT-3.1.2-6]: a clean session discards them). */
  async cleanIncoming (client: SessionClient): Promise<void> {
    this.#ready()
    // The close of a 3.1.1 clean connection taken over: the packets stored now are the new connection's.
    if (this.sessionDiscarded(client)) return
    const store = this.#incoming.get(client.id)
    if (store === undefined) return
    this.#incoming.delete(client.id)
    await this.#writer.write([...store.keys()].map((messageId) => del(keys.incoming(client.id, messageId))))
  }

  #incomingOf (clientId: string): Map<number, SessionPacket> {
    let store = this.#incoming.get(clientId)
    if (store === undefined) {
      store = new Map()
      this.#incoming.set(clientId, store)
    }
    return store
  }

  // --- wills ----------------------------------------------------------------

  /** Stores the client's will. Like aedes-persistence it stamps brokerId and clientId onto the packet passed in. */
  async putWill (client: SessionClient, packet: SessionPacket): Promise<void> {
    this.#ready()
    packet.brokerId = this.#broker?.id
    packet.clientId = client.id
    const will = ownFields(packet)
    this.#wills.set(client.id, will)
    await this.#writer.write([put(keys.will(client.id), cbor.encode(will))])
  }

  async getWill (client: SessionClient): Promise<SessionPacket | undefined> {
    this.#ready()
    const will = this.#wills.get(client.id)
    return will === undefined ? undefined : { ...will }
  }

  /**
   * The delete of the client's stored will as operations on this key space
   * (as the log store's `extraOps` take them), for the batch that logs the
   * will when it fires: a kill after that batch cannot fire it again. Memory
   * is left to delWill, which the firing calls next.
   */
  willDeleteOps (client: SessionClient): ExtraOperation[] {
    this.#ready()
    return [{ type: 'del', sublevel: this.#db, key: keys.will(client.id) }]
  }

  async delWill (client: SessionClient): Promise<SessionPacket | undefined> {
    this.#ready()
    const will = this.#wills.get(client.id)
    if (will === undefined) return undefined
    this.#wills.delete(client.id)
    await this.#writer.write([del(keys.will(client.id))])
    return will
  }

  /** Wills stored by brokers not listed (aedes passes the brokers it has heard a heartbeat from). */
  streamWill (brokers: Readonly<Record<string, unknown>> = {}): Readable {
    const wills: SessionPacket[] = []
    for (const will of this.#wills.values()) {
      if (!brokers[String(will.brokerId)]) wills.push({ ...will })
    }
    return Readable.from(wills)
  }

  // --- lifecycle ------------------------------------------------------------

  /**
   * Waits for queued writes, then drops the in-memory state. The database is
   * the caller's and stays open. A second call rejects with GW_SESSION_CLOSED.
   */
  async destroy (): Promise<void> {
    if (this.#destroyed) throw new SessionPersistenceError('GW_SESSION_CLOSED', 'the session persistence was already destroyed')
    this.#destroyed = true
    await this.#loading?.catch(() => {})
    // The cursors' advances still being written, and those that moved meanwhile, go now.
    await this.#cursors?.flush()
    await this.#writer.flush()
    this.#subs.clear()
    this.#trie.clear()
    this.#matchesChanged()
    this.#queues.clear()
    this.#incoming.clear()
    this.#wills.clear()
    this.#sessions.clear()
    this.#cursors?.close()
    this.#releaseHold?.()
  }
}
