/**
 * The primary's journal of database writes: every LevelDB batch the root
 * database completes (abstract-level's `write` event: the log's group
 * commits with their extraOps and session writes, consumer-group offsets,
 * retention passes, stream metadata), as raw keys and values, numbered in
 * the order the writes completed. The newest `maxBytes` of them stay in
 * memory, so a standby that reconnects catches up from where it was.
 *
 * A pin keeps every entry after its position beyond `maxBytes`: the primary
 * pins the point a snapshot is taken at, and then what its standby has
 * acknowledged, so the writes the standby still needs are there however long
 * the copy takes under load (without it, a snapshot that outlasted a
 * backlog's worth of writes ended with its follow-on writes gone, and the
 * next one too: the standby never caught up). Bounded: once the entries kept
 * would pass `maxPinnedBytes`, the oldest pin is lost (its `onLost` runs) and
 * trimming goes on. Invariants: entries are kept oldest first and gapless;
 * every entry after a live pin's position is kept; the newest is always kept.
 *
 * Writes under `ignorePrefix` (the replication's own metadata) are not
 * journaled. Sequence numbers start at 1 for each `history` (a random id per
 * process): a standby's position means something only within the history it
 * came from; any other position needs a snapshot.
 */
import { randomUUID } from 'node:crypto'
import type { RawOp } from './protocol.ts'

export interface JournalEntry {
  readonly seq: number
  /** Wall-clock time the write completed (ms). */
  readonly at: number
  readonly ops: readonly RawOp[]
  readonly bytes: number
  /** Bytes of every entry up to and including this one, so the bytes between two positions are a subtraction. */
  readonly totalBytes: number
}

/** What abstract-level's `write` event carries per operation (README, "write" event). */
interface WrittenOperation {
  readonly type: 'put' | 'del'
  readonly encodedKey: unknown
  readonly encodedValue?: unknown
}

/** The emitter half of an abstract-level database. */
export interface WriteEmitter {
  on (event: 'write', listener: (ops: WrittenOperation[]) => void): unknown
  off (event: 'write', listener: (ops: WrittenOperation[]) => void): unknown
}

/** Keeps the journal's entries after `seq` (see the header). */
export interface JournalPin {
  /** Every entry after this sequence number is kept while the pin lives. */
  readonly seq: number
  /** True once the journal dropped the pin because it would keep over maxPinnedBytes. */
  readonly lost: boolean
  /** Moves the pin forward (never back): what is at or before `seq` is no longer needed. */
  moveTo (seq: number): void
  release (): void
}

function bytesOf (value: unknown): Buffer {
  if (Buffer.isBuffer(value)) return value
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength)
  return Buffer.from(String(value), 'utf8')
}

export class WriteJournal {
  readonly history = randomUUID()
  readonly #db: WriteEmitter
  readonly #ignore: Buffer
  readonly #maxBytes: number
  readonly #maxPinnedBytes: number
  readonly #pins = new Set<{ seq: number, lost: boolean, onLost: (keptBytes: number) => void }>()
  readonly #now: () => number
  #entries: JournalEntry[] = []
  #head = 0
  #seq = 0
  #totalBytes = 0
  #keptBytes = 0
  readonly #listeners = new Set<(entry: JournalEntry) => void>()
  readonly #onWrite = (ops: WrittenOperation[]): void => { this.#record(ops) }

  /** `maxPinnedBytes` (at least maxBytes, which it defaults to): the most the entries kept for pins may take. */
  constructor (db: WriteEmitter, options: { ignorePrefix: Buffer, maxBytes: number, maxPinnedBytes?: number, now: () => number }) {
    this.#db = db
    this.#ignore = options.ignorePrefix
    this.#maxBytes = options.maxBytes
    this.#maxPinnedBytes = Math.max(options.maxBytes, options.maxPinnedBytes ?? options.maxBytes)
    this.#now = options.now
    db.on('write', this.#onWrite)
  }

  /** The newest sequence number (0 before the first write). */
  get lastSeq (): number { return this.#seq }
  get totalBytes (): number { return this.#totalBytes }
  /** Bytes of the entries kept in memory (the backlog, and beyond it what pins keep). */
  get keptBytes (): number { return this.#keptBytes }

  /**
   * Bytes of every entry up to and including `seq` (0 before the first), while `seq` or the entry after it is kept;
   * undefined otherwise. The bytes between two positions are a subtraction.
   */
  totalBytesAt (seq: number): number | undefined {
    if (seq === this.#seq) return this.#totalBytes
    const at = this.entry(seq)
    if (at !== undefined) return at.totalBytes
    const next = this.entry(seq + 1)
    return next === undefined ? undefined : next.totalBytes - next.bytes
  }

  /**
   * Keeps every entry after `seq` until released or moved on, up to maxPinnedBytes kept in all; null when some of
   * those entries are already gone. `onLost` runs (synchronously, inside the write that passed the bound) if the
   * journal has to drop the pin.
   */
  pin (seq: number, onLost: (keptBytes: number) => void): JournalPin | null {
    if (this.since(seq) === null) return null
    const state = { seq, lost: false, onLost }
    this.#pins.add(state)
    const pins = this.#pins
    return {
      get seq () { return state.seq },
      get lost () { return state.lost },
      moveTo (to: number) { if (to > state.seq) state.seq = to },
      release () { pins.delete(state) },
    }
  }

  /** The entry with this sequence number, if still kept. */
  entry (seq: number): JournalEntry | undefined {
    const first = this.#entries[this.#head]
    if (first === undefined || seq < first.seq || seq > this.#seq) return undefined
    return this.#entries[this.#head + seq - first.seq]
  }

  /** The entries after `seq`, or null when some of them are no longer kept (the standby needs a snapshot). */
  since (seq: number): JournalEntry[] | null {
    if (seq > this.#seq || seq < 0) return null
    if (seq === this.#seq) return []
    const first = this.#entries[this.#head]
    if (first === undefined || seq + 1 < first.seq) return null
    return this.#entries.slice(this.#head + seq + 1 - first.seq)
  }

  onEntry (listener: (entry: JournalEntry) => void): () => void {
    this.#listeners.add(listener)
    return () => { this.#listeners.delete(listener) }
  }

  close (): void {
    this.#db.off('write', this.#onWrite)
    this.#listeners.clear()
    this.#pins.clear()
  }

  /** Drops the oldest entries past maxBytes, but those a pin keeps; drops the oldest pin while they pass maxPinnedBytes. */
  #trim (): void {
    while (this.#keptBytes > this.#maxBytes && this.#head < this.#entries.length - 1) {
      const oldest = this.#entries[this.#head] as JournalEntry
      const pin = this.#oldestPin()
      if (pin !== undefined && oldest.seq > pin.seq) {
        if (this.#keptBytes <= this.#maxPinnedBytes) return
        this.#pins.delete(pin)
        pin.lost = true
        pin.onLost(this.#keptBytes)
        continue
      }
      this.#keptBytes -= oldest.bytes
      this.#head++
    }
  }

  #oldestPin (): { seq: number, lost: boolean, onLost: (keptBytes: number) => void } | undefined {
    let oldest
    for (const pin of this.#pins) if (oldest === undefined || pin.seq < oldest.seq) oldest = pin
    return oldest
  }

  #record (written: readonly WrittenOperation[]): void {
    const ops: RawOp[] = []
    let bytes = 0
    for (const op of written) {
      const key = bytesOf(op.encodedKey)
      if (key.length >= this.#ignore.length && key.subarray(0, this.#ignore.length).equals(this.#ignore)) continue
      if (op.type === 'put') {
        const value = bytesOf(op.encodedValue)
        ops.push([0, key, value])
        bytes += key.length + value.length
      } else {
        ops.push([1, key])
        bytes += key.length
      }
    }
    if (ops.length === 0) return
    this.#totalBytes += bytes
    const entry: JournalEntry = { seq: ++this.#seq, at: this.#now(), ops, bytes, totalBytes: this.#totalBytes }
    this.#entries.push(entry)
    this.#keptBytes += bytes
    this.#trim()
    if (this.#head > 4096 && this.#head * 2 > this.#entries.length) {
      this.#entries = this.#entries.slice(this.#head)
      this.#head = 0
    }
    for (const listener of this.#listeners) listener(entry)
  }
}
