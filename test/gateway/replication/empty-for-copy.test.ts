/**
 * A standby empties its database before a snapshot (replication.ts
 * emptyForCopy) while its follower store serves reads. Emptying is no atomic
 * write: classic-level's clear() deletes in ascending key order, about 16 KB
 * of keys per write, so the log's batches (`!log!B…`) go while its partition,
 * stream and version entries remain, and the replication metadata
 * (`!replication!…`) goes after the log. The seam here stops a clear at such
 * a write boundary: after the log's batches.
 *
 * Reads there must say "read again" (STORE_LOG_REPLACED), never
 * STORE_DAMAGED; and a standby killed there must find its copy marked
 * incomplete (it empties it again at its next start and takes a new
 * snapshot), not a position on a copy half gone.
 */
import { MemoryLevel } from 'memory-level'
import { afterEach, expect, it } from 'vitest'
import { emptyForCopy } from '../../../gateway/replication/replication.ts'
import type { PendingAside } from '../../../gateway/replication/set-aside-tail.ts'
import { openLogStore, type LevelDatabase, type LogStore } from '../../../store/index.ts'

const RAW = { keyEncoding: 'buffer', valueEncoding: 'buffer' } as const
const STREAM = 't/s'
const POSITION = Buffer.from('!replication!position')
const COPYING = Buffer.from('!replication!copying')
const ASIDE = Buffer.from('!replication!aside')
/** Just past the log's batch keys (`!log!B…`) and before its partition, stream and version entries. */
const AFTER_BATCHES = Buffer.from('!log!C')

const opened: LogStore[] = []
afterEach(async () => { for (const s of opened.splice(0).reverse()) await s.close() })

type Raw = MemoryLevel<Buffer, Buffer>
interface ClearRange { gt?: Buffer, lt?: Buffer }

/** `db` with its clear() stopped, the first time, once the keys before {@link AFTER_BATCHES} in its range are deleted. */
function clearStoppingAfterBatches (db: Raw): { root: LevelDatabase, stopped: Promise<void>, resume: () => void } {
  let stopped!: () => void
  let resume!: () => void
  const atStop = new Promise<void>((resolve) => { stopped = resolve })
  const resumed = new Promise<void>((resolve) => { resume = resolve })
  let first = true
  const clear = async (options: ClearRange = {}): Promise<void> => {
    if (first && (options.gt === undefined || Buffer.compare(options.gt, AFTER_BATCHES) < 0)) {
      first = false
      const lt = options.lt !== undefined && Buffer.compare(options.lt, AFTER_BATCHES) < 0 ? options.lt : AFTER_BATCHES
      await db.clear({ ...RAW, ...options, lt })
      stopped()
      await resumed
    }
    await db.clear({ ...RAW, ...options })
  }
  const root = new Proxy(db, {
    get (target, prop) {
      if (prop === 'clear') return clear
      const value = Reflect.get(target, prop, target) as unknown
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value
    },
  }) as unknown as LevelDatabase
  return { root, stopped: atStop, resume }
}

/** A standby's database: a log of 200 records in batches of ten, and the replication metadata of a copy in use. */
async function standbyDatabase (): Promise<Raw> {
  const db = new MemoryLevel<Buffer, Buffer>(RAW)
  const writer = await openLogStore({ db: db as unknown as LevelDatabase })
  await writer.createStream(STREAM, { partitions: 1 })
  for (let i = 0; i < 200; i += 10) {
    await Promise.all(Array.from({ length: 10 }, (_, k) => writer.append(STREAM, 'k', { payload: Buffer.from(`r-${i + k}`), topic: 't', qos: 1, clientId: 'c' })))
  }
  await writer.close()
  await db.put(POSITION, Buffer.from(JSON.stringify({ history: 'h', seq: 41, epoch: 1 })))
  return db
}

it('reads while the standby empties its copy are STORE_LOG_REPLACED, never STORE_DAMAGED', async () => {
  const db = await standbyDatabase()
  const { root, stopped, resume } = clearStoppingAfterBatches(db)
  const follower = await openLogStore({ db: root, follower: true })
  opened.push(follower)
  expect(follower.partitionInfo(STREAM, 0).logEndOffset).toBe(200)
  const emptying = emptyForCopy(root, null)
  await stopped
  // Half-way: the log's batches are gone, its partition and stream entries not yet.
  const codes = []
  for (const from of [0, 100, 190]) {
    codes.push(await follower.read(STREAM, 0, from, { maxRecords: 1000 }).then(() => 'ok', (err: { code?: string }) => err.code ?? String(err)))
  }
  resume()
  await emptying
  expect(codes).toEqual(['STORE_LOG_REPLACED', 'STORE_LOG_REPLACED', 'STORE_LOG_REPLACED'])
})

it('marks the copy incomplete before it deletes anything, and keeps only that mark and a set-aside tail still to name', async () => {
  const db = await standbyDatabase()
  const { root, stopped, resume } = clearStoppingAfterBatches(db)
  const aside: PendingAside = { file: '/data/set-aside/x.cbor', epoch: 1, ends: { [STREAM]: [200] } }
  const emptying = emptyForCopy(root, aside)
  await stopped
  // A standby killed here restarts, sees the mark, and empties its copy again before its store opens (startStandby).
  expect(await db.get(COPYING)).toBeDefined()
  resume()
  await emptying
  const left = (await db.iterator().all()).map(([key, value]) => [key.toString(), JSON.parse(value.toString()) as unknown])
  expect(left).toEqual([[ASIDE.toString(), aside], [COPYING.toString(), true]])
})
