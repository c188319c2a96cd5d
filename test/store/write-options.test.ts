/**
 * The `sync` option of the store's writes reaches classic-level, and is not
 * copied into each operation (log-store.ts, writeOptions): abstract-level
 * spreads a batch's enumerable options into every operation, which made a
 * small group commit several times dearer, so the store hides `sync` from the
 * spread. If an abstract-level upgrade stopped handing that option to the
 * backend, `durability: sync` would silently stop fsyncing: this test says so.
 */
import fs from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import { afterEach, describe, expect, it } from 'vitest'
import { openLogStore, type Durability, type LevelDatabase, type LogStore } from '../../store/index.ts'
import { payloadOf } from './harness.ts'

/** What classic-level's private `_batch` or `_put` was handed, per call. */
interface SeenWrite { readonly method: '_batch' | '_put', readonly sync: unknown, readonly opsWithOptions: number, readonly ops: number }

type PrivateBatch = (operations: ReadonlyArray<Record<string, unknown>>, options: Record<string, unknown>) => Promise<void>
type PrivatePut = (key: Buffer, value: Buffer, options: Record<string, unknown>) => Promise<void>

describe('the options of the store\'s writes', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterEach(async () => { for (const c of cleanups.splice(0).reverse()) await c() })

  /** A classic-level database whose `_batch` and `_put` (where classic-level reads `sync`) record what they are given. */
  async function watched (durability: Durability): Promise<{ store: LogStore, db: LevelDatabase, seen: SeenWrite[] }> {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'edgemq-write-options-'))
    const db = new ClassicLevel<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    await db.open()
    cleanups.push(async () => { await db.close(); await fs.rm(dir, { recursive: true, force: true }) })
    const seen: SeenWrite[] = []
    const target = db as unknown as { _batch: PrivateBatch, _put: PrivatePut }
    const batch = target._batch.bind(db)
    target._batch = (operations, options) => {
      seen.push({ method: '_batch', sync: options.sync, ops: operations.length, opsWithOptions: operations.filter((op) => 'sync' in op).length })
      return batch(operations, options)
    }
    const put = target._put.bind(db)
    target._put = (key, value, options) => {
      seen.push({ method: '_put', sync: options.sync, ops: 1, opsWithOptions: 0 })
      return put(key, value, options)
    }
    const store = await openLogStore({ db: db as unknown as LevelDatabase, durability })
    cleanups.push(() => store.close())
    return { store, db: db as unknown as LevelDatabase, seen }
  }

  async function writeEverything (store: LogStore, db: LevelDatabase): Promise<void> {
    await store.createStream('t/s', { partitions: 4 })
    await Promise.all(Array.from({ length: 20 }, (_, i) => store.append('t/s', `d${i}`, { payload: payloadOf(i) })))
    await store.append('t/s', 'solo', { payload: payloadOf(1) })
    const side = db.sublevel<Buffer, Buffer>('side', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    await store.write([{ type: 'put', sublevel: side, key: Buffer.from('k'), value: Buffer.from('v') }])
    await store.setGroup('g', { holdsRetention: true })
    await store.commitOffset('g', 't/s', 0, 1)
    await store.deleteGroup('g')
  }

  it('asks classic-level for a synchronous write of every group commit and group change under durability: sync', async () => {
    const { store, db, seen } = await watched('sync')
    expect(seen.map((w) => [w.method, w.sync])).toEqual([['_put', true]]) // the format version, at open
    seen.length = 0
    await writeEverything(store, db)
    // createStream, setGroup and commitOffset put; the commits, write() and deleteGroup batch.
    expect(seen.filter((w) => w.method === '_put')).toHaveLength(3)
    expect(seen.filter((w) => w.method === '_batch').length).toBeGreaterThanOrEqual(4)
    expect(seen.filter((w) => w.sync !== true)).toEqual([])
    // The option stays with the write: no operation carries it (the copies made every operation dearer).
    expect(seen.reduce((n, w) => n + w.opsWithOptions, 0)).toBe(0)
    // At least the batch, its index entry and the metadata of each of the 4 partitions the 20 appends went to (how
    // many commits they took depends on the machine's timing: CI saw 20 operations in all, a quiet machine more).
    expect(seen.reduce((n, w) => n + w.ops, 0)).toBeGreaterThanOrEqual(12)
  })

  it('writes a write() of `durable: false` without an fsync when its commit holds nothing else, and with one beside records or a durable write', async () => {
    const { store, db, seen } = await watched('sync')
    await store.createStream('t/s', { partitions: 1 })
    const side = db.sublevel<Buffer, Buffer>('side', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const op = (k: string): { type: 'put', sublevel: LevelDatabase, key: Buffer, value: Buffer } => ({ type: 'put', sublevel: side, key: Buffer.from(k), value: Buffer.from('v') })
    seen.length = 0
    await store.write([op('alone')], { durable: false })
    expect(seen.map((w) => [w.method, w.sync, w.ops])).toEqual([['_batch', false, 1]])
    // In one commit with an append, or with a durable write: fsync'd, both written.
    seen.length = 0
    await Promise.all([store.write([op('beside-record')], { durable: false }), store.append('t/s', 'd', { payload: payloadOf(1) })])
    await Promise.all([store.write([op('beside-durable')], { durable: false }), store.write([op('durable')])])
    expect(seen.every((w) => w.sync === true)).toBe(true)
    for (const k of ['alone', 'beside-record', 'beside-durable', 'durable']) {
      expect(String(await (side as unknown as { get (key: Buffer): Promise<Buffer | undefined> }).get(Buffer.from(k)))).toBe('v')
    }
  })

  it('asks for no synchronous write under durability: async', async () => {
    const { store, db, seen } = await watched('async')
    seen.length = 0
    await writeEverything(store, db)
    expect(seen.length).toBeGreaterThanOrEqual(7)
    // createStream writes the stream's metadata synchronously in either mode; everything else follows the durability.
    expect(seen.filter((w) => w.sync === true).map((w) => w.method)).toEqual(['_put'])
    expect(seen.filter((w) => w.sync !== true && w.sync !== false)).toEqual([])
    expect(seen.reduce((n, w) => n + w.opsWithOptions, 0)).toBe(0)
  })
})
