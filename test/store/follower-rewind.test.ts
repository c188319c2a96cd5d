/**
 * A follower store (a standby's) whose database its writer replaces while it
 * reads: a snapshot from a new primary empties the copy and writes the new
 * primary's, whose log may end before the old one did (the old primary's
 * tail that never reached the standby). Reads that meet the shorter log are
 * no damage: they end at the new log end, or are out of range past it, or
 * (a copy half written) fail with STORE_LOG_REPLACED, a retryable error.
 * A gap the database still shows when looked at again stays STORE_DAMAGED.
 *
 * The snapshot is played the way the standby applies one (replication/
 * standby.ts): the whole database cleared, then the primary's entries
 * written in key order.
 */
import { MemoryLevel } from 'memory-level'
import { afterEach, describe, expect, it } from 'vitest'
import { openLogStore, type LevelDatabase, type LogStore } from '../../store/index.ts'
import { damageBatch } from './batch-damage.ts'
import { entriesOf, primaryLog, replaceCopy, RAW, STREAM, type Raw } from './follower-copy.ts'

const OLD = Array.from({ length: 180 }, (_, i) => `old-${i}`)
/** The new primary had the first 150 records when it took over, and wrote 10 of its own: its log ends at 160, the old one's at 180. */
const NEW = [...OLD.slice(0, 150), ...Array.from({ length: 10 }, (_, i) => `new-${150 + i}`)]

/**
 * The root database as the follower store sees it, with a seam: once armed, the next iterator over the log is held
 * before its second step (after it gave the read its first batch) until released.
 */
function holdable (db: Raw): { root: LevelDatabase, arm: () => { reached: Promise<void>, release: () => void } } {
  let armed: { reached: () => void, released: Promise<void> } | undefined
  const bind = <T extends object>(target: T, override: (prop: string | symbol) => unknown): T => new Proxy(target, {
    get (t, prop) {
      const own = override(prop)
      if (own !== undefined) return own
      const value = Reflect.get(t, prop, t) as unknown
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(t) : value
    },
  })
  const holdIterator = (iterator: { nextv: (n: number) => Promise<unknown> }): object => {
    const hold = armed
    armed = undefined
    if (hold === undefined) return iterator
    let steps = 0
    return bind(iterator, (prop) => prop !== 'nextv' ? undefined : async (n: number) => {
      if (++steps === 2) {
        hold.reached()
        await hold.released
      }
      return await iterator.nextv(n)
    })
  }
  const root = bind(db, (prop) => prop !== 'sublevel' ? undefined : (name: string, options: object) => {
    const sub = db.sublevel(name, options) as unknown as { iterator: (o: object) => { nextv: (n: number) => Promise<unknown> } }
    return bind(sub, (p) => p !== 'iterator' ? undefined : (o: object) => holdIterator(sub.iterator(o)))
  }) as unknown as LevelDatabase
  return {
    root,
    arm: () => {
      let reached!: () => void
      let release!: () => void
      const r = new Promise<void>((resolve) => { reached = resolve })
      armed = { reached, released: new Promise<void>((resolve) => { release = resolve }) }
      return { reached: r, release }
    },
  }
}

const payloads = (records: ReadonlyArray<{ payload: Uint8Array }>): string[] => records.map((r) => Buffer.from(r.payload).toString())

describe('a follower store whose log is rewound under its reads (a standby\'s copy replaced by a snapshot)', () => {
  const opened: LogStore[] = []
  afterEach(async () => { for (const s of opened.splice(0)) await s.close() })

  /** A standby's copy of the old primary's log, its follower store open on it (log end 180), and the new primary's entries. */
  async function standby (): Promise<{ copy: Raw, follower: LogStore, arm: ReturnType<typeof holdable>['arm'], next: Array<[Buffer, Buffer]> }> {
    const copy = new MemoryLevel<Buffer, Buffer>(RAW)
    await replaceCopy(copy, await entriesOf(await primaryLog(OLD)))
    const { root, arm } = holdable(copy)
    const follower = await openLogStore({ db: root, follower: true })
    opened.push(follower)
    expect(follower.partitionInfo(STREAM, 0).logEndOffset).toBe(180)
    return { copy, follower, arm, next: await entriesOf(await primaryLog(NEW)) }
  }

  it('ends a read at the new log end when the refresh rewinds the log while the read runs', async () => {
    const { copy, follower, arm, next } = await standby()
    await replaceCopy(copy, next)
    // The read takes its end (180) from the log as the store last saw it, then is held after its first batch...
    const hold = arm()
    const reading = follower.read(STREAM, 0, 0, { maxRecords: 10_000 })
    await hold.reached
    // ...while the standby's refresh after the snapshot moves the log end back to 160.
    await follower.refresh()
    expect(follower.partitionInfo(STREAM, 0).logEndOffset).toBe(160)
    hold.release()
    const read = await reading
    expect(payloads(read.records)).toEqual(NEW)
    expect({ nextOffset: read.nextOffset, logEndOffset: read.logEndOffset }).toEqual({ nextOffset: 160, logEndOffset: 160 })
  })

  it('ends reads at the copy\'s log end before the refresh, and calls offsets past it out of range', async () => {
    const { copy, follower, next } = await standby()
    await replaceCopy(copy, next)
    // Not refreshed yet: the store still says 180.
    expect(follower.partitionInfo(STREAM, 0).logEndOffset).toBe(180)
    const read = await follower.read(STREAM, 0, 100, { maxRecords: 10_000 })
    expect(payloads(read.records)).toEqual(NEW.slice(100))
    expect(read.logEndOffset).toBe(160)
    const columns = await follower.readColumns(STREAM, 0, 100, { maxRecords: 10_000 })
    expect(columns.nextOffset).toBe(160)
    expect(columns.logEndOffset).toBe(160)
    const batches = await follower.readBatches(STREAM, 0, 100)
    expect(batches.nextOffset).toBe(160)
    expect(batches.logEndOffset).toBe(160)
    // At the new log end: nothing more, as at any log end.
    const atEnd = await follower.read(STREAM, 0, 160)
    expect({ records: atEnd.records.length, logEndOffset: atEnd.logEndOffset }).toEqual({ records: 0, logEndOffset: 160 })
    // Past it: the offset is no longer in the log, as it will be once refreshed.
    await expect(follower.read(STREAM, 0, 170)).rejects.toMatchObject({ code: 'STORE_OFFSET_OUT_OF_RANGE', details: { offset: 170, logEndOffset: 160 } })
    await follower.refresh()
    await expect(follower.read(STREAM, 0, 170)).rejects.toMatchObject({ code: 'STORE_OFFSET_OUT_OF_RANGE', details: { offset: 170, logEndOffset: 160 } })
  })

  it('fails a read of a copy half written by a snapshot with STORE_LOG_REPLACED, and reads the copy once it is in', async () => {
    const { copy, follower, next } = await standby()
    // The snapshot's first entries: some of the new primary's batches, not yet its partition and stream entries.
    const batches = next.filter(([key]) => key.toString('latin1').startsWith('!log!B'))
    await replaceCopy(copy, batches.slice(0, 5))
    await expect(follower.read(STREAM, 0, 0, { maxRecords: 10_000 })).rejects.toMatchObject({ code: 'STORE_LOG_REPLACED' })
    await expect(follower.read(STREAM, 0, 100)).rejects.toMatchObject({ code: 'STORE_LOG_REPLACED' })
    await replaceCopy(copy, next)
    await follower.refresh()
    expect(payloads((await follower.read(STREAM, 0, 0, { maxRecords: 10_000 })).records)).toEqual(NEW)
  })

  it('still reports offsets missing inside the log it follows as STORE_DAMAGED', async () => {
    const { copy, follower } = await standby()
    await damageBatch(copy as unknown as LevelDatabase, STREAM, 0, 100, 'delete')
    await expect(follower.read(STREAM, 0, 0, { maxRecords: 10_000 })).rejects.toMatchObject({ code: 'STORE_DAMAGED', details: { missingFrom: 100, missingTo: 110 } })
    // The last batch gone while the metadata still says the log ends at 180: damage too, not a rewind.
    await damageBatch(copy as unknown as LevelDatabase, STREAM, 0, 170, 'delete')
    await expect(follower.read(STREAM, 0, 110, { maxRecords: 10_000 })).rejects.toMatchObject({ code: 'STORE_DAMAGED', details: { missingFrom: 170 } })
  })
})
