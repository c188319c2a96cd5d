/**
 * Where a standby's log went backwards, for the live readers of it.
 *
 * A standby's snapshot from a new primary can leave a partition's log ending
 * before the old copy did: the old primary's tail that the new primary never
 * got (offsets 160 to 179, say) is gone, and the new primary's own records
 * take those offsets (docs/operations.md, "Standby"). A live reader already
 * positioned in that tail (at 170) would wait there and, once the new log
 * reached 170, go on from it: the new history's 160 to 169 skipped without a
 * word. Kafka's consumers detect such a truncation and move back to where the
 * logs agree (KIP-320); ours move back to the new log end, the first offset
 * whose record is of the new history only, so they get every record of it.
 *
 * How: the standby's refresh of its store after each apply (replication/
 * standby.ts; after a snapshot at once, before any later batch is applied) runs
 * through {@link LogRewinds.refresh}, which compares every partition's log end
 * before and after and remembers each one that went down. A reader
 * (read-plan.ts, PartitionReader) asks at each step whether its partition was
 * rewound below its position since it last asked, and moves back to the
 * lowest such end, whatever the log end is by the time it wakes (the first
 * batches after a snapshot can carry the log past the reader's position before
 * the reader's next step). Rewinds are few (one per partition per shortening
 * snapshot) and kept for the life of the process, so a reader asleep for any
 * time still finds out.
 *
 * One tracker per store, registered beside it ({@link rewindsOf}): every
 * reader of the store, however far from the composition root it is built
 * (HTTP, `$replay`), sees the same rewinds without each surface passing it on.
 *
 * What the log ends cannot tell: where the two histories diverged below the
 * new end. The new primary's log may differ from the old before its end too
 * (it wrote records of its own before the snapshot was taken), and a
 * snapshot whose log is not shorter at all (the successor's log already ran
 * past the old end) lowers no end. A reader in such a stretch goes on from
 * its position. Replication knows the diverging offsets exactly (the set-aside
 * tail, from the new primary's term start: replication/terms.ts) and can
 * report them with {@link LogRewinds.rewound}; it does not yet.
 */
import type { LogStore } from '../../store/index.ts'

/** A partition whose log end went down: records from `end` on are not those the log held before. */
export interface LogRewind {
  readonly stream: string
  readonly partition: number
  /** The log end before. */
  readonly formerEnd: number
  /** The log end after: where the new history begins to differ at the latest. */
  readonly end: number
}

/** A reader positioned past a rewound log end, moved back to it. */
export interface ReaderMovedBack {
  readonly stream: string
  readonly partition: number
  /** The reader's position before: the records it got from `to` up to here were of the old history. */
  readonly from: number
  /** Its position now: the new log end. */
  readonly to: number
}

/** Told of every rewind and every reader moved back (the composition root logs and counts them). */
export interface RewindObserver {
  rewound? (rewind: LogRewind): void
  readerMovedBack? (moved: ReaderMovedBack): void
}

/** The gateway's logger, as far as rewinds need it. */
export interface RewindLogger {
  warn (fields: Record<string, unknown>, message: string): void
}

/**
 * How the gateway makes rewinds visible: a line per rewound partition
 * (GW_WARN_LOG_REWOUND) and per reader moved back (GW_WARN_READER_REWOUND),
 * each with the stream, the partition and both offsets; `counted` hears the
 * stream of each reader moved (edgemq_reader_rewinds_total).
 */
export function reportRewinds (logger: RewindLogger, counted: (stream: string) => void): RewindObserver {
  return {
    rewound: ({ stream, partition, formerEnd, end }) => {
      logger.warn({ code: 'GW_WARN_LOG_REWOUND', stream, partition, formerEnd, end },
        `the snapshot from the primary rewound ${stream}[${partition}]: its log ended at ${formerEnd}, now at ${end}`)
    },
    readerMovedBack: ({ stream, partition, from, to }) => {
      logger.warn({ code: 'GW_WARN_READER_REWOUND', stream, partition, from, to },
        `a reader of ${stream}[${partition}] at ${from}, past the rewound log end, moved back to ${to}: ` +
        `what it got from ${to} up to ${from} was the old history`)
      counted(stream)
    },
  }
}

const trackers = new WeakMap<object, LogRewinds>()

/** The rewinds of `store`'s log, when its refreshes run through a tracker ({@link followRewinds}); else null. */
export function rewindsOf (store: object): LogRewinds | null {
  return trackers.get(store) ?? null
}

/**
 * The tracker of a follower store's rewinds, made on the first call and
 * registered for its readers ({@link rewindsOf}); the same one after.
 * Refresh the store through it (`tracker.refresh()`), not with `store.refresh()`.
 */
export function followRewinds (store: Pick<LogStore, 'listStreams' | 'partitionInfo' | 'refresh'>, observer: RewindObserver = {}): LogRewinds {
  let tracker = trackers.get(store)
  if (tracker === undefined) trackers.set(store, tracker = new LogRewinds(store, observer))
  return tracker
}

const partitionKey = (stream: string, partition: number): string => `${stream}\u0000${partition}`

export class LogRewinds {
  readonly #store: Pick<LogStore, 'listStreams' | 'partitionInfo' | 'refresh'>
  readonly #observer: RewindObserver
  /** Rewinds so far; a reader keeps the count it has seen up to. */
  #count = 0
  /** Per partition, each rewind's number and new end, oldest first. */
  readonly #rewinds = new Map<string, Array<{ readonly seq: number, readonly end: number }>>()

  constructor (store: Pick<LogStore, 'listStreams' | 'partitionInfo' | 'refresh'>, observer: RewindObserver = {}) {
    this.#store = store
    this.#observer = observer
  }

  /** Rewinds so far: a reader that starts now has seen them (its plan was made on the log as it stands). */
  get count (): number { return this.#count }

  /** The store's refresh, noting every partition whose log end it lowered. */
  async refresh (): Promise<void> {
    const before = new Map<string, number>()
    for (const s of this.#store.listStreams()) {
      for (let p = 0; p < s.partitions; p++) before.set(partitionKey(s.name, p), this.#store.partitionInfo(s.name, p).logEndOffset)
    }
    await this.#store.refresh()
    for (const s of this.#store.listStreams()) {
      for (let p = 0; p < s.partitions; p++) {
        const formerEnd = before.get(partitionKey(s.name, p))
        const end = this.#store.partitionInfo(s.name, p).logEndOffset
        if (formerEnd !== undefined && end < formerEnd) this.rewound({ stream: s.name, partition: p, formerEnd, end })
      }
    }
  }

  /** Notes that records of `stream`'s partition from `end` on are not those its log held before. */
  rewound (rewind: LogRewind): void {
    const key = partitionKey(rewind.stream, rewind.partition)
    let list = this.#rewinds.get(key)
    if (list === undefined) this.#rewinds.set(key, list = [])
    list.push({ seq: ++this.#count, end: rewind.end })
    this.#observer.rewound?.(rewind)
  }

  /** The lowest end the partition was rewound to after the first `seen` rewinds; null when none. */
  lowestSince (stream: string, partition: number, seen: number): number | null {
    let lowest: number | null = null
    for (const r of this.#rewinds.get(partitionKey(stream, partition)) ?? []) {
      if (r.seq > seen && (lowest === null || r.end < lowest)) lowest = r.end
    }
    return lowest
  }

  /** A reader moved back to a rewound end (read-plan.ts). */
  readerMovedBack (moved: ReaderMovedBack): void {
    this.#observer.readerMovedBack?.(moved)
  }
}

/**
 * One reader's watch over its partition's rewinds: where it must move back
 * to, asked with its position before it reads or reports it. Besides the
 * tracker's rewinds, a log end now below the position is one (a store
 * without a tracker, or a rewind the tracker has not refreshed yet): only a
 * rewind puts a reader past the log end, since it never reads beyond the end
 * and its plan starts within the log.
 */
export class RewindWatch {
  readonly #store: Pick<LogStore, 'partitionInfo'>
  readonly #stream: string
  readonly #partition: number
  readonly #tracker: LogRewinds | null
  /** The tracker's rewinds this reader has checked its position against: those before its plan do not concern it. */
  #seen: number

  constructor (store: Pick<LogStore, 'partitionInfo'>, stream: string, partition: number, tracker: LogRewinds | null = rewindsOf(store)) {
    this.#store = store
    this.#stream = stream
    this.#partition = partition
    this.#tracker = tracker
    this.#seen = tracker?.count ?? 0
  }

  /** The log end a reader at `position` must move back to, or null when its log was not rewound below it since the last look. */
  movedEnd (position: number): number | null {
    let end = this.#tracker?.lowestSince(this.#stream, this.#partition, this.#seen) ?? null
    if (this.#tracker !== null) this.#seen = this.#tracker.count
    const { logEndOffset } = this.#store.partitionInfo(this.#stream, this.#partition)
    if (logEndOffset < position) end = Math.min(end ?? logEndOffset, logEndOffset)
    return end !== null && end < position ? end : null
  }

  /** Tells the tracker (a log line and a counter) that the reader moved back from `from` to `to`. */
  movedBack (from: number, to: number): void {
    this.#tracker?.readerMovedBack({ stream: this.#stream, partition: this.#partition, from, to })
  }
}
