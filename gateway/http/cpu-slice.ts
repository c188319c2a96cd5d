/**
 * Cooperative CPU slices for request handlers. Node runs every client on one
 * thread: a request that filters, parses or encodes 100,000 records in one
 * synchronous run holds up every other socket, MQTT PUBACKs included (a
 * read with 1,100 topic filters over 20,000 records once stalled the
 * gateway for 11 s). A handler doing per-record work calls `tick()` per
 * record and, when it says the slice is used up, awaits `yield()`.
 *
 * Yielding goes through one queue for the whole process, which resumes one
 * slice per turn of the event loop (from setImmediate, so after the poll
 * phase has run the pending I/O). Each request yielding on its own would not
 * do: six heavy requests each resumed by their own setImmediate all run in
 * the same check phase, 60 ms per turn, and a PUBACK takes several turns
 * (read, append, fsync, write). With the queue a turn holds at most one
 * slice, and the waiting requests take turns in order.
 *
 * The clock is read only every so many units of work, so the check costs
 * nothing measurable on the read path; a unit is one record plus one per
 * 256 payload bytes, so a run of large records checks the clock sooner.
 * Independent of the HTTP server: it is plain code over a clock.
 */

/** Longest run of work between two yields, in ms: far below the 100 ms the other clients may wait. */
export const SLICE_MS = 10
/** Units of work between two clock reads. */
const CHECK_EVERY = 64

/** Slices waiting for their turn, oldest first; one is resumed per turn of the event loop. */
const waiting: Array<() => void> = []
let turnScheduled = false

function resumeOne (): void {
  turnScheduled = false
  waiting.shift()?.()
  if (waiting.length > 0) scheduleTurn()
}

function scheduleTurn (): void {
  if (turnScheduled) return
  turnScheduled = true
  setImmediate(resumeOne)
}

function nextTurn (): Promise<void> {
  return new Promise((resolve) => {
    waiting.push(resolve)
    scheduleTurn()
  })
}

export class CpuSlice {
  readonly #budgetMs: number
  readonly #now: () => number
  #start: number
  #units = 0

  constructor (budgetMs = SLICE_MS, now: () => number = () => performance.now()) {
    this.#budgetMs = budgetMs
    this.#now = now
    this.#start = now()
  }

  /** Counts one unit of work (a record, plus its payload bytes); true when the slice is used up and the caller should `await yield()`. */
  tick (bytes = 0): boolean {
    this.#units += 1 + (bytes >>> 8)
    if (this.#units < CHECK_EVERY) return false
    this.#units = 0
    return this.#now() - this.#start >= this.#budgetMs
  }

  /** Waits for this request's next turn (the event loop runs what waits, I/O and timers, meanwhile), then starts a new slice. */
  async yield (): Promise<void> {
    await nextTurn()
    this.#start = this.#now()
    this.#units = 0
  }
}

/**
 * Maps `items` in pieces, yielding between pieces when the slice is used up:
 * for encoders that take an array (JSON, CBOR) and would otherwise run over
 * all of it at once. `weight` is an item's payload bytes.
 */
export async function slicedPieces<T, R> (slice: CpuSlice, items: readonly T[], weight: (item: T) => number,
  encode: (piece: readonly T[], last: boolean) => R): Promise<R[]> {
  const out: R[] = []
  let from = 0
  for (let i = 0; i < items.length; i++) {
    const last = i === items.length - 1
    if (slice.tick(weight(items[i] as T)) || last) {
      out.push(encode(items.slice(from, i + 1), last))
      from = i + 1
      if (!last) await slice.yield()
    }
  }
  return out
}
