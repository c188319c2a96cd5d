/**
 * Leadership terms in the database, as Kafka's leader-epoch checkpoint: when
 * a node starts a term as primary in epoch E it writes one entry in the
 * root database's sublevel `terms`, key E as 10 decimal digits, value JSON
 * {@link TermStart}: every partition's log end offset when the term began.
 * It is replicated like every other write, so each copy knows where each
 * term of its history began.
 *
 * Invariants: written once per epoch (a restart in the same epoch keeps the
 * first); epochs increase; a record at or past `starts[stream][p]` of term E
 * was written in term E or later; a stream missing from `starts` did not
 * exist when the term began (all of it is later).
 *
 * A former primary of epoch N that follows a newer primary: the first term
 * after N in the new primary's copy began where the new primary's copy of
 * N's log ended, so what the former primary holds past those offsets is the
 * tail the new primary lacks ({@link lostTail}) — exactly, per partition.
 */
import type { LevelDatabase, LogStore } from '../../store/index.ts'

export interface TermStart {
  readonly epoch: number
  /** Wall-clock ms when the term began. */
  readonly at: number
  /** Per stream (tenant/name), each partition's log end offset when the term began. */
  readonly starts: Readonly<Record<string, readonly number[]>>
}

/** A range of offsets [from, to) of one partition. */
export interface OffsetRange { readonly stream: string, readonly partition: number, readonly from: number, readonly to: number }

const RAW = { keyEncoding: 'utf8', valueEncoding: 'utf8' } as const

function termsOf (root: LevelDatabase): LevelDatabase {
  return root.sublevel<string, string>('terms', RAW) as unknown as LevelDatabase
}

/** Every partition's log end offset, per stream. */
export function logEnds (store: LogStore): Record<string, number[]> {
  const ends: Record<string, number[]> = {}
  for (const info of store.listStreams()) {
    ends[info.name] = Array.from({ length: info.partitions }, (_, p) => store.partitionInfo(info.name, p).logEndOffset)
  }
  return ends
}

/** Writes the start of `epoch`'s term unless it is there already (a restart in the same term). */
export async function recordTermStart (root: LevelDatabase, store: LogStore, epoch: number, now: number): Promise<TermStart> {
  const terms = termsOf(root)
  const key = String(epoch).padStart(10, '0')
  const existing = await terms.get(key, RAW) as string | undefined
  if (existing !== undefined) return JSON.parse(existing) as TermStart
  const term: TermStart = { epoch, at: now, starts: logEnds(store) }
  await terms.put(key, JSON.stringify(term), { ...RAW, sync: true } as never)
  return term
}

/** The first term after `epoch` in this database's history, or null. */
export async function nextTerm (root: LevelDatabase, epoch: number): Promise<TermStart | null> {
  const terms = termsOf(root)
  const iterator = terms.iterator({ ...RAW, gt: String(epoch).padStart(10, '0'), limit: 1 } as never) as unknown as {
    next (): Promise<[string, string] | undefined>, close (): Promise<void>
  }
  try {
    const entry = await iterator.next()
    return entry === undefined ? null : JSON.parse(entry[1]) as TermStart
  } finally {
    await iterator.close()
  }
}

/** What a former primary with log ends `ends` holds past where the next term began: the ranges the new primary lacks (empty ones left out). */
export function lostTail (ends: Readonly<Record<string, readonly number[]>>, next: TermStart): OffsetRange[] {
  const out: OffsetRange[] = []
  for (const [stream, partitions] of Object.entries(ends)) {
    partitions.forEach((to, partition) => {
      const from = next.starts[stream]?.[partition] ?? 0
      if (to > from) out.push({ stream, partition, from, to })
    })
  }
  return out
}
