/**
 * In-memory index of the base offsets of a partition's most recent batches
 * (Kafka's OffsetIndex, kept in memory and only for the tail of the log).
 *
 * A read that starts at an offset the index covers knows the exact keys of
 * the batches it needs and fetches them with one `getMany`, instead of a
 * backwards seek and an iterator (three or more round trips to LevelDB's
 * thread pool, which dominated reads of 1,000 records). Reads below the
 * oldest indexed base fall back to the seek.
 *
 * Invariants: bases are strictly increasing and contiguous — each entry's
 * batch ends where the next begins, the last ends at the log end. The index
 * starts with the newest batch at open (the log is never scanned), grows with
 * every commit, drops entries that retention deleted, and forgets its oldest
 * half when it holds `capacity` entries, so its memory stays bounded.
 * Not persisted; rebuilt from nothing after every open or failed write.
 */
export class BatchIndex {
  readonly #capacity: number
  #bases: number[] = []
  #head = 0

  constructor (capacity = 65_536) {
    this.#capacity = capacity
  }

  get size (): number { return this.#bases.length - this.#head }

  /** Forgets everything (after a failed write, when what is on disk must be re-read). */
  clear (): void {
    this.#bases = []
    this.#head = 0
  }

  /** Records a batch appended at the log end. */
  push (base: number): void {
    if (this.size >= this.#capacity) this.#dropFront(this.#head + Math.floor(this.#capacity / 2))
    this.#bases.push(base)
  }

  /** Drops the entries of batches below `logStart` (retention deletes whole batches from the front). */
  trim (logStart: number): void {
    let i = this.#head
    while (i < this.#bases.length && (this.#bases[i] as number) < logStart) i++
    this.#dropFront(i)
  }

  /**
   * The bases of the batches holding offsets [from, from + count), or null
   * when `from` is below the oldest indexed batch. `logEnd` bounds the last.
   */
  lookup (from: number, count: number, logEnd: number): number[] | null {
    const b = this.#bases
    if (this.size === 0 || (b[this.#head] as number) > from || from >= logEnd) return null
    // Last base <= from.
    let lo = this.#head
    let hi = b.length - 1
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1
      if ((b[mid] as number) <= from) lo = mid
      else hi = mid - 1
    }
    const out: number[] = []
    const until = Math.min(from + count, logEnd)
    for (let i = lo; i < b.length && (b[i] as number) < until; i++) out.push(b[i] as number)
    return out
  }

  #dropFront (to: number): void {
    this.#head = to
    if (this.#head > 1024 && this.#head * 2 > this.#bases.length) {
      this.#bases = this.#bases.slice(this.#head)
      this.#head = 0
    }
  }
}
