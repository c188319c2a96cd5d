/**
 * The full verifications behind `edgemq check`: LevelDB's block checksums
 * read from the table files (table-files.ts), and the walk over every batch
 * and offset (verify.ts), which lists damage as offset ranges.
 */
import fs from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import { MemoryLevel } from 'memory-level'
import { afterEach, describe, expect, it } from 'vitest'
import { keys } from '../../store/format.ts'
import { checkTableFiles, openLogStore, verifyLog, type LevelDatabase, type LogStore, type StoredRecord } from '../../store/index.ts'
import { crc32c } from '../../store/table-files.ts'
import { FakeClock, payloadOf } from './harness.ts'

function logSublevel (db: LevelDatabase): LevelDatabase {
  return db.sublevel<Buffer, Buffer>('log', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
}

/** Three batches in t/s[0]: offsets [0, 10), [10, 20), [20, 30). */
async function threeBatches (store: LogStore): Promise<void> {
  await store.createStream('t/s', { partitions: 1 })
  for (let b = 0; b < 3; b++) await Promise.all(Array.from({ length: 10 }, (_, i) => store.append('t/s', 'k', { payload: payloadOf(b * 10 + i) })))
}

describe('verifyLog', () => {
  it('reports a clean log with its counts, and hands over every record', async () => {
    const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const store = await openLogStore({ db })
    await threeBatches(store)
    const seen: StoredRecord[] = []
    const report = await verifyLog(db, { onRecords: (_s, _p, records) => { seen.push(...records) } })
    expect(report.other).toEqual([])
    expect(report.partitions).toEqual([expect.objectContaining({ stream: 't/s', partition: 0, logStartOffset: 0, logEndOffset: 30, batches: 3, records: 30, damage: [] })])
    expect(seen.map((r) => r.offset)).toEqual(Array.from({ length: 30 }, (_, i) => i))
    await store.close()
  })

  it('lists a corrupt batch, a missing one and a lost tail as offset ranges', async () => {
    const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const store = await openLogStore({ db })
    await threeBatches(store)
    await store.append('t/s', 'k', { payload: payloadOf(30) })
    await store.close()
    const log = logSublevel(db)
    const batch = (base: number): Buffer => keys.batch(1, 0, base)
    await log.del(batch(10))
    const value = Buffer.from(await log.get<Buffer, Buffer>(batch(0), { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as Buffer)
    value[value.length - 3] = (value[value.length - 3] as number) ^ 0x01
    await log.put<Buffer, Buffer>(batch(0), value, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    await log.del(batch(30))
    const seen: number[] = []
    const [part] = (await verifyLog(db, { onRecords: (_s, _p, records) => { seen.push(...records.map((r) => r.offset)) } })).partitions
    expect(part!.damage).toEqual([
      // A corrupt batch's own count is not trusted: its range runs to the next readable batch, over the missing one.
      expect.objectContaining({ kind: 'corrupt', from: 0, to: 20 }),
      expect.objectContaining({ kind: 'missing', from: 30, to: 31 }),
    ])
    expect(part!.records).toBe(10)
    expect(seen).toEqual(Array.from({ length: 10 }, (_, i) => 20 + i))
  })

  it('finds by its batches a partition whose stream entry and metadata are gone, and reports it as damaged', async () => {
    // A stream entry can sit in the same table block as the newest batches; LevelDB then skips that block when listing.
    const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const store = await openLogStore({ db })
    await threeBatches(store)
    await store.createStream('t/other', { partitions: 2 })
    await store.append('t/other', 'k', { payload: payloadOf(0) })
    await store.close()
    const log = logSublevel(db)
    await log.del(keys.stream('t/s'))
    await log.del(keys.partition(1, 0))
    const seen: number[] = []
    const report = await verifyLog(db, { onRecords: (_s, _p, records) => { seen.push(...records.map((r) => r.offset)) } })
    const lost = report.partitions.find((p) => p.stream === '#1')
    expect(lost).toMatchObject({ partition: 0, batches: 3, records: 30 })
    expect(lost!.damage).toEqual([
      expect.objectContaining({ kind: 'metadata', from: 0, to: 30, detail: expect.stringContaining('no readable stream entry') }),
      expect.objectContaining({ kind: 'metadata', from: 0, to: 30 }),
    ])
    expect(seen).toEqual(Array.from({ length: 30 }, (_, i) => i).concat([0]).sort((a, b) => a - b))
    // The streams still listed are checked as before, and nothing is reported twice.
    expect(report.partitions.filter((p) => p.stream === 't/other').map((p) => p.damage)).toEqual([[], []])
    expect(report.partitions).toHaveLength(3)
  })

  it('does not count what retention deleted as damage', async () => {
    const clock = new FakeClock()
    const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const store = await openLogStore({ db, clock })
    await store.createStream('t/s', { partitions: 1, retentionMs: 1000 })
    await Promise.all(Array.from({ length: 10 }, (_, i) => store.append('t/s', 'k', { payload: payloadOf(i) })))
    clock.advance(5000)
    await store.append('t/s', 'k', { payload: payloadOf(10) })
    expect((await store.enforceRetention()).recordsDeleted).toBe(10)
    await store.close()
    expect((await verifyLog(db)).partitions).toEqual([expect.objectContaining({ logStartOffset: 10, logEndOffset: 11, records: 1, damage: [] })])
  })
})

describe('checkTableFiles', () => {
  let dir: string | undefined
  afterEach(async () => { if (dir !== undefined) await fs.rm(dir, { recursive: true, force: true }) })

  it('computes LevelDB\'s CRC-32C', () => {
    expect(crc32c(Buffer.from('123456789'))).toBe(0xe3069283) // the standard check value
  })

  it('passes LevelDB\'s own tables, and names the file and byte of an overwritten block', async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'edgemq-tables-'))
    const store = await openLogStore({ location: dir })
    await threeBatches(store)
    await store.close()
    const reopen = new ClassicLevel(dir) // LevelDB writes its write-ahead log into a table when it opens
    await reopen.open()
    await reopen.close()
    const clean = await checkTableFiles(dir)
    expect(clean.files).toBeGreaterThan(0)
    expect(clean.damage).toEqual([])
    const table = (await fs.readdir(dir)).find((f) => f.endsWith('.ldb'))!
    const handle = await fs.open(path.join(dir, table), 'r+')
    await handle.write(Buffer.alloc(8, 0x5a), 0, 8, 40)
    await handle.close()
    expect((await checkTableFiles(dir)).damage).toEqual([expect.objectContaining({ file: path.join(dir, table), offset: 0, problem: 'block checksum mismatch' })])
  })
})
