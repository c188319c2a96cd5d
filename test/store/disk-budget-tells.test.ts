/**
 * The disk budget's pass reports, counts and tells the retention holds what each of its writes dropped as the write
 * lands, not at the pass's end (only its warning is logged once per pass): a write of the pass that fails, or a kill
 * later in it, must not lose the tells of the writes already on disk, and a hold's holder that reads on during the pass
 * must hear of what was deleted below it first. (Found by review: telling at the pass's end lost both.)
 */
import { MemoryLevel } from 'memory-level'
import { describe, expect, it } from 'vitest'
import { openLogStore, type DroppedRecords, type LevelDatabase, type LogStore } from '../../store/index.ts'
import { partitionForKey } from '../../store/partitioner.ts'
import { FakeClock, payloadOf } from './harness.ts'

type Batch = (ops: Array<{ type: string, key: Buffer }>, options?: unknown) => Promise<void>

/** A memory database whose log sublevel's batch() goes through `hook` (given the real batch). */
function hookedDb (hook: (ops: Array<{ type: string, key: Buffer }>, options: unknown, batch: Batch) => Promise<void>): LevelDatabase {
  const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
  const sublevel = db.sublevel.bind(db) as (name: string, options: unknown) => { batch: Batch }
  Object.assign(db, {
    sublevel (name: string, options: unknown) {
      const s = sublevel(name, options)
      if (name === 'log') {
        const batch = s.batch.bind(s)
        s.batch = (ops, o) => hook(ops, o, batch)
      }
      return s
    },
  })
  return db as unknown as LevelDatabase
}

const isTrim = (ops: Array<{ type: string, key: Buffer }>): boolean => ops.some((op) => op.type === 'del' && op.key[0] === 0x42)

interface Told { dropped: DroppedRecords[], warnings: unknown[], holds: Array<[string, number, number]> }

/** A store over `db` past its budget: 40 one-record batches, two partitions taking turns; `floor` is a hold's. */
async function filled (db: LevelDatabase, told: Told, floor: (partition: number) => number): Promise<LogStore> {
  const clock = new FakeClock()
  const logger = { info () {}, error () {}, warn (fields: Record<string, unknown>) { told.warnings.push(fields) } }
  const store = await openLogStore({ db, clock, diskBudgetBytes: 4000, logger, observer: { onDropped: (d) => { told.dropped.push(d) } } })
  await store.createStream('t/s', { partitions: 2 })
  await store.setGroup('bridge.us', { holdsRetention: true })
  store.holdRetention((_stream, partition) => floor(partition), (...args) => { told.holds.push(args) })
  // 40 batches of one record, the two partitions taking turns: one batch per write of the budget's pass.
  const keyOf = [0, 1].map((p) => Array.from({ length: 50 }, (_, i) => `k${i}`).find((k) => partitionForKey(k, 2) === p))
  for (let b = 0; b < 40; b++) {
    await store.append('t/s', keyOf[b % 2] as string, { payload: payloadOf(b, 100) })
    clock.advance(1000)
  }
  return store
}

describe('the disk budget tells what each write dropped', () => {
  it('a write of the pass that fails does not lose the tells of the writes before it', async () => {
    let trims = 0
    let failing = true
    const db = hookedDb(async (ops, options, batch) => {
      if (isTrim(ops) && failing && ++trims === 3) throw new Error('EIO')
      await batch(ops, options)
    })
    const told: Told = { dropped: [], warnings: [], holds: [] }
    const store = await filled(db, told, () => 0)
    await expect(store.enforceRetention()).rejects.toThrow('EIO')
    failing = false
    await store.enforceRetention()
    const starts = [0, 1].map((p) => store.partitionInfo('t/s', p).logStartOffset)
    // Every record below each log start was dropped unconsumed by bridge.us: counted, whichever pass deleted it.
    const counted = [0, 1].map((p) => told.dropped.filter((d) => d.partition === p).reduce((n, d) => n + d.count, 0))
    expect(counted).toEqual(starts)
    await store.close()
  })

  it('a hold whose holder moves on during the pass is told what was deleted below it before that', async () => {
    let trims = 0
    const consumed = [0, 0]
    const db = hookedDb(async (ops, options, batch) => {
      // Between the pass's first and second writes, the holder reads on from the new log start and consumes to the end
      // (a session's cursor reads from max(next, log start)).
      if (isTrim(ops) && ++trims === 2) { consumed[0] = 1_000; consumed[1] = 1_000 }
      await batch(ops, options)
    })
    const told: Told = { dropped: [], warnings: [], holds: [] }
    const store = await filled(db, told, (p) => consumed[p] as number)
    await store.enforceRetention()
    expect(store.partitionInfo('t/s', 0).logStartOffset).toBeGreaterThan(0)
    // Its floor was 0 when the first write deleted partition 0's oldest batch.
    expect(told.holds.filter(([, p]) => p === 0).length).toBeGreaterThan(0)
    await store.close()
  })
})
