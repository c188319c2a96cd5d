/**
 * What the store does when the disk lies or fails: corrupted batches, a data
 * directory from another format version, and writes that the database rejects.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ClassicLevel } from 'classic-level'
import { MemoryLevel } from 'memory-level'
import { decodeStoredBatch, openLogStore, type ExtraOperation, type LevelDatabase, type LogStore } from '../../store/index.ts'
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
      expect(await store.readColumns('t/s', 0, 5).catch((e: unknown) => e)).toMatchObject({ code: 'STORE_CORRUPT_BATCH', details: { baseOffset: 0 } })
      expect(() => decodeStoredBatch(copy)).toThrow(expect.objectContaining({ code: 'STORE_CORRUPT_BATCH' }))
      // The intact batch after it is still readable, and appends go on.
      expect((await store.read('t/s', 0, 100)).records.map((r) => r.offset)).toEqual([100])
      const after = await store.readColumns('t/s', 0, 100)
      expect(after.batches.map((b) => [b.baseOffset + b.start, b.baseOffset + b.end])).toEqual([[100, 101]])
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
      expect(await damaged.readColumns('t/s', 0, 50, { maxRecords: 100 }).catch((e: unknown) => e)).toMatchObject(damage)
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

  it('rejects write()s of a failed commit with STORE_WRITE_FAILED, with or without appends beside them, and goes on', async () => {
    const db = flakyLevel()
    const store = await openLogStore({ db: db as unknown as LevelDatabase })
    const side = db.sublevel<Buffer, Buffer>('side', { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const put = (k: string): ExtraOperation => ({ type: 'put', sublevel: side as unknown as ExtraOperation['sublevel'], key: Buffer.from(k), value: Buffer.from(k) })
    await store.createStream('t/s', { partitions: 1 })
    db.failing = true
    // a batch of writes alone cannot be told landed or not after the reopen: failed
    await expect(store.write([put('alone')])).rejects.toMatchObject({ code: 'STORE_WRITE_FAILED' })
    const [appended, written] = await Promise.allSettled([store.append('t/s', 'k', { payload: payloadOf(0) }), store.write([put('beside')])])
    expect([appended.status, written.status]).toEqual(['rejected', 'rejected'])
    expect((written as PromiseRejectedResult).reason).toMatchObject({ code: 'STORE_WRITE_FAILED' })
    db.failing = false
    await store.write([put('after')])
    expect((await side.keys().all()).map((k) => k.toString())).toEqual(['after'])
    await store.close()
  })
})

/**
 * LevelDB reports a failed write when the write-ahead log record went out but
 * its fsync failed ("the log record we just added may or may not show up when
 * the DB is re-opened", leveldb db_impl.cc): after the store's reopen the batch
 * is there. A real classic-level on a temp dir whose next write lands, then
 * reports that failure.
 */
async function landsThenFails (): Promise<{ db: ClassicLevel<Buffer, Buffer>, arm: () => void, dir: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'edgemq-lands-'))
  const db = new ClassicLevel<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await db.open()
  let armed = false
  const inner = db as unknown as { _batch: (ops: unknown, options: unknown) => Promise<void> }
  const batch = inner._batch.bind(db)
  inner._batch = async (ops, options) => {
    await batch(ops, options)
    if (armed) {
      armed = false
      throw Object.assign(new Error('EIO: fsync of the write-ahead log failed'), { code: 'EIO' })
    }
  }
  return { db, arm: () => { armed = true }, dir }
}

describe('a failed write that reached the disk', () => {
  it('acknowledges its appends (dedupe id and extraOps included) instead of rejecting them, so a retry adds no second copy', async () => {
    const { db, arm, dir } = await landsThenFails()
    try {
      const store = await openLogStore({ db: db as unknown as LevelDatabase, reopen: async () => { await db.close(); await db.open() } })
      const side = db.sublevel<Buffer, Buffer>('side', { keyEncoding: 'buffer', valueEncoding: 'buffer' })
      await store.createStream('t/s', { partitions: 1 })
      await store.append('t/s', 'k', { payload: payloadOf(0) })
      arm()
      // What the gateway does with a STORE_WRITE_FAILED while its client waits: the same append again.
      const appendWithRetry = async (): Promise<{ offset: number, duplicate?: boolean }> => {
        for (let attempt = 0; ; attempt++) {
          try {
            return await store.append('t/s', 'k', { payload: payloadOf(1) }, {
              dedupeId: 'once', extraOps: [{ type: 'put', sublevel: side as unknown as ExtraOperation['sublevel'], key: Buffer.from('I'), value: Buffer.from('x') }],
            })
          } catch (err) {
            if ((err as { code?: string }).code !== 'STORE_WRITE_FAILED' || attempt > 3) throw err
          }
        }
      }
      expect(await appendWithRetry()).toMatchObject({ offset: 1 })
      // The store's own reopen after the failure re-read the log: one copy, at offset 1, and the log goes on from 2.
      expect((await store.read('t/s', 0, 0)).records.map((r) => Buffer.from(r.payload))).toEqual([payloadOf(0), payloadOf(1)])
      expect(store.partitionInfo('t/s', 0).logEndOffset).toBe(2)
      expect(await store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'once' })).toEqual({ partition: 0, offset: 1, duplicate: true })
      expect(await store.append('t/s', 'k', { payload: payloadOf(2) })).toMatchObject({ offset: 2 })
      await side.open() // a sublevel stays closed after its database reopens
      expect(await side.get(Buffer.from('I'))).toEqual(Buffer.from('x'))
      await store.close()
    } finally {
      await db.close()
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('runs a retention pass queued behind that write only once the store has re-read the log, so the metadata it writes is true', async () => {
    const { db, arm, dir } = await landsThenFails()
    try {
      const reopen = async (): Promise<void> => { await db.close(); await db.open() }
      const store = await openLogStore({ db: db as unknown as LevelDatabase, reopen })
      await store.createStream('t/s', { partitions: 1, retentionBytes: 1 })
      await store.append('t/s', 'k', { payload: payloadOf(0) })
      // The writer loop finishes that commit's iteration in microtasks; one macrotask later it is idle.
      await new Promise((resolve) => setImmediate(resolve))
      arm()
      // In one tick: the pass waits on the writer loop right behind the commit that fails.
      const appended = store.append('t/s', 'k', { payload: payloadOf(1) })
      const retention = store.enforceRetention()
      expect(await appended).toMatchObject({ offset: 1 })
      expect(await retention).toMatchObject({ recordsDeleted: 2 })
      await store.close()
      const again = await openLogStore({ db: db as unknown as LevelDatabase, reopen })
      expect(again.partitionInfo('t/s', 0)).toMatchObject({ logStartOffset: 2, logEndOffset: 2 })
      await again.close()
    } finally {
      await db.close()
      await rm(dir, { recursive: true, force: true })
    }
  }, 10_000)
})
