/**
 * What the store does when the disk lies or fails: corrupted batches, a data
 * directory from another format version, and writes that the database rejects.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { MemoryLevel } from 'memory-level'
import { decodeStoredBatch, openLogStore, type LevelDatabase, type LogStore } from '../../store/index.ts'
import { backends, payloadOf, type Backend } from './harness.ts'

function logSublevel (db: LevelDatabase): LevelDatabase {
  return db.sublevel<Buffer, Buffer>('log', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
}

/** Flips one byte of every `B` (batch) entry at `at` bytes from the value's start. */
async function corruptBatches (db: LevelDatabase, at: (length: number) => number): Promise<number> {
  const log = logSublevel(db)
  let n = 0
  for await (const [key, value] of log.iterator<Buffer, Buffer>({ gte: Buffer.from('B'), lt: Buffer.from('C') })) {
    const copy = Buffer.from(value)
    const i = at(copy.length)
    copy[i] = (copy[i] as number) ^ 0xff
    await log.put<Buffer, Buffer>(key, copy, {})
    n++
  }
  return n
}

for (const makeBackend of backends) {
  describe(`store faults on ${makeBackend().name}`, () => {
    let backend: Backend
    let stores: LogStore[] = []
    afterEach(async () => {
      for (const s of stores) await s.close().catch(() => {})
      stores = []
      await backend.destroy()
    })

    async function filled (): Promise<LogStore> {
      backend = makeBackend()
      const store = await backend.open()
      await store.createStream('t/s', { partitions: 1 })
      await Promise.all(Array.from({ length: 100 }, (_, i) => store.append('t/s', 'k', { payload: payloadOf(i, 50) })))
      await store.append('t/s', 'k', { payload: payloadOf(100, 50) })
      await store.close()
      return store
    }

    it('reports a corrupted batch body with STORE_CORRUPT_BATCH instead of returning bad data', async () => {
      await filled()
      const raw = await backend.raw()
      // Corrupt only the first (100-record) batch, in its cbor body.
      const log = logSublevel(raw)
      const [first] = await log.iterator<Buffer, Buffer>({ gte: Buffer.from('B'), lt: Buffer.from('C'), limit: 1 }).all()
      const copy = Buffer.from(first![1])
      copy[copy.length - 10] = (copy[copy.length - 10] as number) ^ 0x55
      await log.put<Buffer, Buffer>(first![0], copy, {})
      await raw.close()
      const store = await backend.openExisting()
      stores.push(store)
      const err = await store.read('t/s', 0, 5).catch((e: unknown) => e)
      expect(err).toMatchObject({ code: 'STORE_CORRUPT_BATCH', details: { stream: 't/s', partition: 0, baseOffset: 0 } })
      // Served as stored bytes or decoded, a damaged batch is never data.
      expect(await store.readBatches('t/s', 0, 5).catch((e: unknown) => e)).toMatchObject({ code: 'STORE_CORRUPT_BATCH', details: { baseOffset: 0 } })
      expect(() => decodeStoredBatch(copy)).toThrow(expect.objectContaining({ code: 'STORE_CORRUPT_BATCH' }))
      // The intact batch after it is still readable, and appends go on.
      expect((await store.read('t/s', 0, 100)).records.map((r) => r.offset)).toEqual([100])
      expect((await store.append('t/s', 'k', { payload: payloadOf(101) })).offset).toBe(101)
    })

    it('refuses to open when the newest batch (which fixes the log end) is corrupt', async () => {
      await filled()
      const raw = await backend.raw()
      expect(await corruptBatches(raw, () => 3)).toBe(2) // inside the checksum field
      await raw.close()
      await expect(backend.openExisting()).rejects.toMatchObject({ code: 'STORE_CORRUPT_BATCH', details: { baseOffset: 100 } })
    })

    /** The `B` key of each batch, in offset order. */
    async function batchKeys (raw: LevelDatabase): Promise<Buffer[]> {
      return await logSublevel(raw).keys<Buffer>({ gte: Buffer.from('B'), lt: Buffer.from('C'), keyEncoding: 'buffer' }).all()
    }

    // LevelDB skips a table block it cannot read without an error; to the store that looks like batches that are not there.
    it('reports batches missing inside the log with STORE_DAMAGED on read, never fewer records', async () => {
      const store = await filled()
      const again = await backend.openExisting()
      await again.append('t/s', 'k', { payload: payloadOf(101) })
      await again.close()
      void store
      const raw = await backend.raw()
      const keys = await batchKeys(raw)
      expect(keys).toHaveLength(3)
      await logSublevel(raw).del<Buffer>(keys[1]!, { keyEncoding: 'buffer' }) // offsets [100, 101)
      await raw.close()
      const damaged = await backend.openExisting()
      stores.push(damaged)
      const damage = { code: 'STORE_DAMAGED', details: { stream: 't/s', partition: 0, missingFrom: 100, missingTo: 101 } }
      expect(await damaged.read('t/s', 0, 0, { maxRecords: 1000 }).catch((e: unknown) => e)).toMatchObject(damage)
      expect(await damaged.read('t/s', 0, 100).catch((e: unknown) => e)).toMatchObject(damage)
      expect(await damaged.readBatches('t/s', 0, 50).catch((e: unknown) => e)).toMatchObject(damage)
      // What lies around the hole is still served.
      expect((await damaged.read('t/s', 0, 0, { maxRecords: 100 })).records).toHaveLength(100)
      expect((await damaged.read('t/s', 0, 101)).records.map((r) => r.offset)).toEqual([101])
    })

    it('refuses to open when the newest batches are gone (the log end its metadata records is not reached)', async () => {
      await filled()
      const raw = await backend.raw()
      const keys = await batchKeys(raw)
      await logSublevel(raw).del<Buffer>(keys[keys.length - 1]!, { keyEncoding: 'buffer' })
      await raw.close()
      await expect(backend.openExisting()).rejects.toMatchObject({ code: 'STORE_DAMAGED', details: { stream: 't/s', partition: 0, missingFrom: 100, missingTo: 101 } })
    })

    it('refuses data written by another format version', async () => {
      await filled()
      const raw = await backend.raw()
      await logSublevel(raw).put<Buffer, Buffer>(Buffer.from('V'), Buffer.from([0, 0, 0, 0, 0, 0, 0, 9]), {})
      await raw.close()
      await expect(backend.openExisting()).rejects.toMatchObject({ code: 'STORE_FORMAT_VERSION' })
    })
  })
}

/** memory-level whose writes fail while `failing` is set, like a full disk (via abstract-level's prewrite hook). */
function flakyLevel (): MemoryLevel<Buffer, Buffer> & { failing: boolean } {
  const db = Object.assign(new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' }), { failing: false })
  db.hooks.prewrite.add(() => {
    if (db.failing) throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' })
  })
  return db
}

describe('store write failures', () => {
  it('rejects the appends of a failed group commit with STORE_WRITE_FAILED and reuses no offset', async () => {
    const db = flakyLevel()
    const errors: Error[] = []
    const store = await openLogStore({ db: db as unknown as LevelDatabase, observer: { onWriteError: (e) => { errors.push(e) } } })
    await store.createStream('t/s', { partitions: 1 })
    await store.append('t/s', 'k', { payload: payloadOf(0) })
    db.failing = true
    const failed = await Promise.allSettled(Array.from({ length: 10 }, (_, i) => store.append('t/s', 'k', { payload: payloadOf(1 + i) })))
    expect(failed.every((r) => r.status === 'rejected' && (r.reason as { code: string }).code === 'STORE_WRITE_FAILED')).toBe(true)
    expect(errors).toHaveLength(1)
    expect(store.pendingAppends).toBe(0)
    expect(store.partitionInfo('t/s', 0).logEndOffset).toBe(1)
    db.failing = false
    // The disk recovered: the store goes on without a restart, gapless.
    expect((await store.append('t/s', 'k', { payload: payloadOf(11) })).offset).toBe(1)
    expect((await store.read('t/s', 0, 0)).records.map((r) => r.offset)).toEqual([0, 1])
    await store.close()
    const again = await openLogStore({ db: db as unknown as LevelDatabase })
    expect(again.partitionInfo('t/s', 0).logEndOffset).toBe(2)
    await again.close()
  })
})
