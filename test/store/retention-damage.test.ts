/**
 * Retention and the disk budget meeting damage at the front of a partition (issue 13 follow-up, found by review): a
 * partition whose oldest batch fails its checks, or whose first offsets no batch holds. The store neither deletes nor
 * passes over damage (store/damage.ts), so that partition keeps its records, and says so once per pass (logged, told
 * the observer, in the report); every other partition is still trimmed, and the disk budget takes its bytes from
 * them. Before, the pass threw at the damaged partition: time retention never reached the partitions after it, and
 * the budget, which took the partition of unknown age as the oldest, failed every pass and protected nothing.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { partitionForKey } from '../../store/partitioner.ts'
import type { LogStore, RetentionBlocked, StoreLogger } from '../../store/index.ts'
import { damageBatch } from './batch-damage.ts'
import { backends, FakeClock, payloadOf, type Backend, type StoreOptions } from './harness.ts'

/** A key that maps to each partition of a stream of `n`. */
function keysFor (n: number): string[] {
  const all = Array.from({ length: 100 }, (_, i) => `dev-${i}`)
  return Array.from({ length: n }, (_, p) => all.find((k) => partitionForKey(k, n) === p) as string)
}

interface Told { errors: Array<{ fields: Record<string, unknown>, message: string }>, blocked: RetentionBlocked[] }

function listeners (): { told: Told, options: StoreOptions } {
  const told: Told = { errors: [], blocked: [] }
  const logger: StoreLogger = { warn () {}, error (fields, message) { told.errors.push({ fields, message }) } }
  return { told, options: { logger, observer: { onRetentionBlocked: (b) => { told.blocked.push(b) } } } }
}

/** The retention lines among the logged errors: one per pass and blocked partition. */
const blockedLines = (told: Told): Array<Record<string, unknown>> =>
  told.errors.filter((e) => e.message.startsWith('retention cannot delete past a damaged batch')).map((e) => e.fields)

for (const makeBackend of backends) {
  describe(`retention over a damaged partition on ${makeBackend().name}`, () => {
    let backend: Backend
    let store: LogStore | undefined
    afterEach(async () => {
      await store?.close().catch(() => {})
      store = undefined
      await backend.destroy()
    })

    /**
     * `batches[p]` batches of 10 records of 100 bytes in partition p of `t/s`, in rounds of one batch per partition
     * (partition 0's first), one clock step of `stepMs` per round. Returns each partition's bytes; the store is closed.
     */
    async function fill (clock: FakeClock, batches: number[], stream: { retentionMs?: number } = {}, stepMs = 1000): Promise<number[]> {
      backend = makeBackend()
      const s = await backend.open({ clock })
      await s.createStream('t/s', { partitions: batches.length, ...stream })
      const key = keysFor(batches.length)
      for (let b = 0; b < Math.max(...batches); b++) {
        for (const [p, n] of batches.entries()) {
          if (b < n) await Promise.all(Array.from({ length: 10 }, (_, i) => s.append('t/s', key[p] as string, { payload: payloadOf(b * 10 + i, 100) })))
        }
        clock.advance(stepMs)
      }
      const bytes = batches.map((_, p) => s.partitionInfo('t/s', p).bytes)
      await s.close()
      return bytes
    }

    it('the disk budget deletes from the other partitions and leaves one whose oldest batch is damaged as it is, reporting it each pass', async () => {
      const clock = new FakeClock()
      const [damaged, other] = await fill(clock, [4, 12]) as [number, number]
      const raw = await backend.raw()
      await damageBatch(raw, 't/s', 0, 0, 'corrupt') // partition 0 holds the oldest records: the budget's first victim
      await raw.close()
      const budget = damaged + Math.floor(other / 2)
      const { told, options } = listeners()
      store = await backend.openExisting({ clock, diskBudgetBytes: budget, ...options })

      const report = await store.enforceRetention()
      expect(store.totalBytes).toBeLessThanOrEqual(budget)
      expect(store.partitionInfo('t/s', 1).logStartOffset).toBeGreaterThan(0)
      // Partition 0 keeps every batch, the damaged one too: still reported to its readers, not out of range.
      expect(store.partitionInfo('t/s', 0)).toMatchObject({ logStartOffset: 0, logEndOffset: 40, bytes: damaged })
      expect(await store.read('t/s', 0, 0).catch((e: unknown) => e)).toMatchObject({ code: 'STORE_CORRUPT_BATCH', details: { baseOffset: 0 } })
      expect((await store.read('t/s', 0, 10, { maxRecords: 1 })).records.map((r) => r.offset)).toEqual([10])
      const blocked = { stream: 't/s', partition: 0, offset: 0, error: expect.objectContaining({ code: 'STORE_CORRUPT_BATCH' }) }
      expect(report.blocked).toEqual([blocked])
      expect(told.blocked).toEqual([blocked])
      expect(blockedLines(told)).toEqual([expect.objectContaining({ code: 'STORE_CORRUPT_BATCH', stream: 't/s', partition: 0, offset: 0 })])
      expect(told.errors.some((e) => e.message.includes('edgemq check'))).toBe(true)

      // Over the budget again: the next pass meets it again, says so again, once, and trims partition 1 again.
      const start = store.partitionInfo('t/s', 1).logStartOffset
      for (let b = 0; b < 3; b++) {
        await Promise.all(Array.from({ length: 10 }, (_, i) => store!.append('t/s', keysFor(2)[1] as string, { payload: payloadOf(i, 100) })))
      }
      const again = await store.enforceRetention()
      expect(again.blocked).toEqual([blocked])
      expect(store.partitionInfo('t/s', 1).logStartOffset).toBeGreaterThan(start)
      expect(store.totalBytes).toBeLessThanOrEqual(budget)
      expect(blockedLines(told)).toHaveLength(2)
      expect(store.partitionInfo('t/s', 0)).toMatchObject({ logStartOffset: 0, bytes: damaged })
    })

    it('the disk budget deletes the healthy batches before a damaged one, then stops there and goes on with the others', async () => {
      const clock = new FakeClock()
      const [damaged, other] = await fill(clock, [4, 12]) as [number, number]
      const raw = await backend.raw()
      await damageBatch(raw, 't/s', 0, 20, 'corrupt')
      await raw.close()
      // Below partition 0's bytes: its two oldest batches go first, then the budget has to move on to partition 1.
      const budget = Math.floor(damaged / 2) + Math.floor(other / 2)
      const { told, options } = listeners()
      store = await backend.openExisting({ clock, diskBudgetBytes: budget, ...options })

      const report = await store.enforceRetention()
      expect(store.partitionInfo('t/s', 0)).toMatchObject({ logStartOffset: 20, logEndOffset: 40 })
      expect(await store.read('t/s', 0, 20).catch((e: unknown) => e)).toMatchObject({ code: 'STORE_CORRUPT_BATCH', details: { baseOffset: 20 } })
      expect(store.partitionInfo('t/s', 1).logStartOffset).toBeGreaterThan(0)
      expect(store.totalBytes).toBeLessThanOrEqual(budget)
      expect(report.blocked).toEqual([expect.objectContaining({ stream: 't/s', partition: 0, offset: 20 })])
      expect(blockedLines(told)).toEqual([expect.objectContaining({ code: 'STORE_CORRUPT_BATCH', partition: 0, offset: 20 })])
    })

    it('time retention trims the partitions and streams after one whose oldest batch is damaged', async () => {
      const clock = new FakeClock()
      // Two batches per partition, 100 s apart; at the pass, 100 s after the second, the first is past a 150 s retention.
      await fill(clock, [2, 2, 2], { retentionMs: 150_000 }, 100_000)
      let s = await backend.openExisting({ clock })
      await s.createStream('t/later', { partitions: 1, retentionMs: 150_000 })
      await s.append('t/later', 'k', { payload: payloadOf(0), timestamp: clock.now() - 200_000 })
      await s.append('t/later', 'k', { payload: payloadOf(1) })
      await s.close()
      const raw = await backend.raw()
      await damageBatch(raw, 't/s', 0, 0, 'corrupt')
      await raw.close()
      const { told, options } = listeners()
      s = store = await backend.openExisting({ clock, ...options })

      const report = await s.enforceRetention()
      expect([0, 1, 2].map((p) => s.partitionInfo('t/s', p).logStartOffset)).toEqual([0, 10, 10])
      expect(s.partitionInfo('t/later', 0).logStartOffset).toBe(1)
      expect(report.recordsDeleted).toBe(21)
      expect(report.blocked).toEqual([expect.objectContaining({ stream: 't/s', partition: 0, offset: 0 })])
      expect(blockedLines(told)).toEqual([expect.objectContaining({ code: 'STORE_CORRUPT_BATCH', stream: 't/s', partition: 0, offset: 0 })])
    })

    it('time retention does not pass over offsets missing at the front of a partition: they stay damaged, not out of range', async () => {
      const clock = new FakeClock()
      await fill(clock, [3, 3], { retentionMs: 150_000 }, 100_000)
      const raw = await backend.raw()
      await damageBatch(raw, 't/s', 0, 0, 'delete') // as LevelDB skipping a table block it cannot read
      await raw.close()
      const { told, options } = listeners()
      store = await backend.openExisting({ clock, ...options })
      // Said at open already, as a damaged oldest batch is.
      expect(told.errors).toEqual([{ fields: { code: 'STORE_DAMAGED', stream: 't/s', partition: 0 }, message: expect.stringContaining('offsets 0 to 9 of t/s[0] are missing') }])

      const report = await store.enforceRetention()
      // Every batch of partition 0 but the newest is past retention; deleting them would hide offsets 0 to 9.
      expect(store.partitionInfo('t/s', 0).logStartOffset).toBe(0)
      const missing = { code: 'STORE_DAMAGED', details: { stream: 't/s', partition: 0, missingFrom: 0, missingTo: 10 } }
      expect(await store.read('t/s', 0, 0).catch((e: unknown) => e)).toMatchObject(missing)
      expect(store.partitionInfo('t/s', 1).logStartOffset).toBe(20)
      expect(report.blocked).toEqual([{ stream: 't/s', partition: 0, offset: 0, error: expect.objectContaining(missing) }])
      expect(blockedLines(told)).toEqual([expect.objectContaining({ code: 'STORE_DAMAGED', partition: 0, offset: 0 })])
    })
  })
}
