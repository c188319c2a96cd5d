/**
 * The primary's journal of database writes: every LevelDB batch the root
 * database completes (abstract-level's `write` event: the log's group
 * commits with their extraOps and session writes, consumer-group offsets,
 * retention passes, stream metadata), as raw keys and values, numbered in
 * the order the writes completed. The newest `maxBytes` of them stay in
 * memory, so a standby that reconnects catches up from where it was.
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
  readonly #now: () => number
  #entries: JournalEntry[] = []
  #head = 0
  #seq = 0
  #totalBytes = 0
  #keptBytes = 0
  readonly #listeners = new Set<(entry: JournalEntry) => void>()
  readonly #onWrite = (ops: WrittenOperation[]): void => { this.#record(ops) }

  constructor (db: WriteEmitter, options: { ignorePrefix: Buffer, maxBytes: number, now: () => number }) {
    this.#db = db
    this.#ignore = options.ignorePrefix
    this.#maxBytes = options.maxBytes
    this.#now = options.now
    db.on('write', this.#onWrite)
  }

  /** The newest sequence number (0 before the first write). */
  get lastSeq (): number { return this.#seq }
  get totalBytes (): number { return this.#totalBytes }

  /** The entry with this sequence number, if still kept. */
  entry (seq: number): JournalEntry | undefined {
    const first = this.#entries[this.#head]
    if (first === undefined || seq < first.seq) return undefined
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
    while (this.#keptBytes > this.#maxBytes && this.#head < this.#entries.length - 1) {
      this.#keptBytes -= (this.#entries[this.#head] as JournalEntry).bytes
      this.#head++
    }
    if (this.#head > 4096 && this.#head * 2 > this.#entries.length) {
      this.#entries = this.#entries.slice(this.#head)
      this.#head = 0
    }
    for (const listener of this.#listeners) listener(entry)
  }
}
