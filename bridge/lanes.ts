/**
 * The lanes of an uplink and the scheduler that picks which one sends next.
 *
 * A lane is one (stream, partition) of the log as one upstream sees it: a
 * buffer of records read ahead in offset order, the records sent (or skipped
 * by the filter) and not yet settled, and `done`, below which every offset is
 * acknowledged or skipped. `done` only moves over a contiguous run of settled
 * records, so a lane's offset never passes a record the upstream has not
 * acknowledged, whatever order the PUBACKs come in.
 *
 * Scheduling: a free window slot goes to the highest-priority lane with a
 * record ready, round robin among lanes of equal priority, so a backlog of one
 * stream cannot starve live records of a higher-priority one. A lane reading
 * records from the log counts them as ready (they are appended, only not in
 * memory yet): no lane of lower priority is served until the read is in.
 * Without that, a live record waited out its own read while the backlog went
 * on: with one message in flight, on a loaded machine (load 9), a 147 ms read
 * let five backlog messages go ahead of it.
 *
 * Pure: no I/O and no timers; the uplink reads, sends and commits.
 */
import type { StoredRecord } from '../store/index.ts'
import type { RECORD_VARIABLES, Template } from './topic-template.ts'

/** A record sent, or skipped by the lane's filter, that `done` has not passed yet. */
export interface Pending {
  readonly offset: number
  readonly timestamp: number
  readonly record: StoredRecord | null // null: skipped by the filter, done at once
  acked: boolean
  /** Dead-lettered rather than acknowledged: never a canary. */
  refused?: boolean
}

export interface Lane {
  readonly tenant: string
  readonly name: string
  /** The store's stream name, `<tenant>/<name>`. */
  readonly stream: string
  readonly partition: number
  readonly priority: number
  readonly filter: string
  readonly template: Template<typeof RECORD_VARIABLES[number]>
  /** Receipt lanes forward only the records addressed to this upstream. */
  readonly receipts: boolean
  /** Bumped whenever the lane is rewound, so reads started before are dropped. */
  epoch: number
  nextRead: number
  buffer: StoredRecord[]
  bufferAt: number
  /** Sent or skipped records above `done`, in offset order. */
  pending: Pending[]
  pendingAt: number
  /** Every offset below is acknowledged or skipped. */
  done: number
  /** Offset last committed to the consumer group; -1 when the group had none for this partition. */
  committed: number
  reading: boolean
  /** Set while a failed read waits for its retry: the lane neither reads again before it nor holds other lanes back. */
  failing: boolean
  /** The partition's log end as last reported (onAppend); reads stop there. */
  end: number
  /** Acknowledged since the metrics were last told (they are told once per turn, not per record). */
  unreportedMessages: number
  unreportedBytes: number
  /** The record just below `done`, once one was acknowledged: a 3.1.1 canary (see uplink/index.ts). */
  lastAcked: StoredRecord | null
}

export interface LaneSource {
  readonly tenant: string
  readonly name: string
  readonly partition: number
  readonly priority: number
  readonly filter: string
  readonly template: Template<typeof RECORD_VARIABLES[number]>
  readonly receipts: boolean
}

/** A lane that resumes at `start` (the committed offset, or the log start), with the log ending at `end`. */
export function createLane (source: LaneSource, start: number, committed: number, end: number): Lane {
  return {
    ...source, stream: `${source.tenant}/${source.name}`,
    epoch: 0, nextRead: start, buffer: [], bufferAt: 0, pending: [], pendingAt: 0, done: start,
    committed, reading: false, failing: false, end, unreportedMessages: 0, unreportedBytes: 0, lastAcked: null,
  }
}

/** Records `record` as sent and not yet settled. */
export function track (lane: Lane, record: StoredRecord): Pending {
  const entry: Pending = { offset: record.offset, timestamp: record.timestamp, record, acked: false }
  lane.pending.push(entry)
  return entry
}

/** Settles a record the filter does not forward: at once when nothing is pending below it, else in its place. */
export function skip (lane: Lane, record: StoredRecord): void {
  if (lane.pendingAt === lane.pending.length) {
    lane.done = record.offset + 1
  } else {
    lane.pending.push({ offset: record.offset, timestamp: record.timestamp, record: null, acked: true })
  }
}

/** Moves `done` over the settled records at the head of `pending`. */
export function advance (lane: Lane): void {
  while (lane.pendingAt < lane.pending.length && (lane.pending[lane.pendingAt] as Pending).acked) {
    const entry = lane.pending[lane.pendingAt] as Pending
    lane.done = entry.offset + 1
    if (entry.record !== null && entry.refused !== true) lane.lastAcked = entry.record
    lane.pendingAt++
  }
  if (lane.pendingAt === lane.pending.length) {
    lane.pending = []
    lane.pendingAt = 0
  } else if (lane.pendingAt > 1024) {
    lane.pending = lane.pending.slice(lane.pendingAt)
    lane.pendingAt = 0
  }
}

/** Forgets what was read and sent: the lane reads again from `done`, and reads in progress are dropped. */
export function rewind (lane: Lane): void {
  lane.epoch++
  lane.nextRead = lane.done
  lane.buffer = []
  lane.bufferAt = 0
  lane.pending = []
  lane.pendingAt = 0
  lane.reading = false
}

/** The lanes of one upstream, in config order, and whose turn it is. */
export class LaneScheduler {
  readonly lanes: Lane[] = []
  #rr = 0

  add (lane: Lane): void {
    this.lanes.push(lane)
  }

  /**
   * The highest-priority lane with a record in its buffer, round robin among equals; null when none has one, or when
   * a lane of higher priority than that is reading records from the log (they go first: the read calls for a pump).
   */
  next (): Lane | null {
    const lanes = this.lanes
    let best: Lane | null = null
    let bestAt = 0
    let reading = -1
    const n = lanes.length
    for (let k = 0; k < n; k++) {
      const at = (this.#rr + k) % n
      const lane = lanes[at] as Lane
      if (lane.bufferAt < lane.buffer.length) {
        if (best === null || lane.priority > best.priority) {
          best = lane
          bestAt = at
        }
      } else if (lane.reading && lane.priority > reading) {
        reading = lane.priority
      }
    }
    if (best === null || best.priority < reading) return null
    this.#rr = (bestAt + 1) % n
    return best
  }
}
