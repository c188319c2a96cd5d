/**
 * format=batches without sockets: the server side (gateway/http/batches.ts) against a
 * store on memory-level with a fake clock and a response that collects what
 * is written, and the CLI's decoder (gateway/cli/batches.ts) fed that response in
 * chunks of every size. The HTTP side is in api.int.test.ts.
 */
import type { ServerResponse } from 'node:http'
import { encode as encodeCbor } from 'cbor-x'
import { MemoryLevel } from 'memory-level'
import { afterEach, describe, expect, it } from 'vitest'
import { byteStringHead, serveBatches } from '../../../gateway/http/batches.ts'
import { AppendWaiters, parseRecordsRequest, type PartitionTarget, type RecordsQuery } from '../../../gateway/http/records.ts'
import { cborItemEnd, readBatchStream, type BatchStreamItem } from '../../../gateway/cli/batches.ts'
import { openLogStore, type LevelDatabase, type LogStore, type StoredRecord } from '../../../store/index.ts'

const STREAM = 'acme/telemetry'
const TARGET: PartitionTarget = { stream: STREAM, name: 'telemetry', partition: 0 }

const stores: LogStore[] = []
afterEach(async () => { for (const s of stores.splice(0)) await s.close() })

async function openStore (): Promise<LogStore> {
  const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
  const store = await openLogStore({ db: db as unknown as LevelDatabase })
  stores.push(store)
  await store.createStream(STREAM, { partitions: 1 })
  return store
}

/** One batch of `count` records with timestamps t0, t0 + 1, …: concurrent appends share a group commit. */
async function appendBatch (store: LogStore, count: number, t0: number): Promise<void> {
  await Promise.all(Array.from({ length: count }, (_, i) =>
    store.append(STREAM, 'dev-1', { payload: Buffer.from(`{"t":${t0 + i}}`), timestamp: t0 + i, topic: 'devices/dev-1/telemetry' })))
}

/** The store, except that its first readBatches() call runs `append` first: records that arrive while a response is being written. */
function appendingOnFirstRead (store: LogStore, append: () => Promise<void>): LogStore {
  let appended = false
  return new Proxy(store, {
    get (target, prop, receiver) {
      if (prop === 'readBatches' && !appended) {
        appended = true
        return async (...args: Parameters<LogStore['readBatches']>) => { await append(); return await target.readBatches(...args) }
      }
      const value = Reflect.get(target, prop, receiver) as unknown
      return typeof value === 'function' ? value.bind(target) : value
    },
  })
}

/** A ServerResponse that keeps what is written. */
function collector (): { res: ServerResponse, body: () => Buffer, status: () => number } {
  const chunks: Buffer[] = []
  let status = 0
  const res = {
    writeHead (s: number) { status = s; return res },
    write (c: Uint8Array) { chunks.push(Buffer.from(c)); return true },
    end (c?: Uint8Array) { if (c !== undefined) chunks.push(Buffer.from(c)); return res },
    cork () {},
    uncork () {},
    writableNeedDrain: false,
    destroyed: false,
  }
  return { res: res as unknown as ServerResponse, body: () => Buffer.concat(chunks), status: () => status }
}

async function serve (store: LogStore, query: RecordsQuery): Promise<Buffer> {
  const out = collector()
  const req = parseRecordsRequest({ format: 'batches', ...query }, 0, 'json', (g) => g)
  await serveBatches({ store, waiters: new AppendWaiters(store), signal: new AbortController().signal }, TARGET, req, out.res)
  expect(out.status()).toBe(200)
  return out.body()
}

async function items (body: Buffer, chunkSize = body.length): Promise<BatchStreamItem[]> {
  async function * chunks (): AsyncGenerator<Uint8Array> {
    for (let at = 0; at < body.length; at += chunkSize) yield body.subarray(at, at + chunkSize)
  }
  const out: BatchStreamItem[] = []
  for await (const item of readBatchStream(chunks())) out.push(item)
  return out
}

const offsets = (xs: readonly BatchStreamItem[]): number[] => xs.flatMap((x) => x.kind === 'records' ? x.records.map((r) => r.offset) : [])

async function readAll (store: LogStore): Promise<StoredRecord[]> {
  return (await store.read(STREAM, 0, 0, { maxRecords: 100_000, maxBytes: 64 << 20 })).records
}

describe('format=batches, served', () => {
  it('states the range in the head and ends with where to go on', async () => {
    const store = await openStore()
    await appendBatch(store, 10, 100)
    await appendBatch(store, 10, 200)
    await appendBatch(store, 10, 300)
    const got = await items(await serve(store, { offset: '3', endOffset: 25 }))
    expect(got[0]).toEqual({ kind: 'head', head: { stream: 'telemetry', partition: 0, fromOffset: 3, endOffset: 25 } })
    expect(offsets(got)).toEqual(Array.from({ length: 22 }, (_, i) => 3 + i))
    expect(got.at(-1)).toEqual({
      kind: 'end',
      end: {
        stream: 'telemetry', partition: 0, nextOffset: 25, logStartOffset: 0, logEndOffset: 30, endOfRange: true,
        records: 22, batches: 3, bytes: expect.any(Number),
      },
    })
    // A `to` the time index places at once: the end falls inside the second batch.
    const timed = await items(await serve(store, { from: '104', to: '205' }))
    expect(timed[0]).toMatchObject({ head: { fromOffset: 4, endOffset: 15 } })
    expect(offsets(timed)).toEqual(Array.from({ length: 11 }, (_, i) => 4 + i))
  })

  it('stops before a batch that holds a `to` placed only while the response ran; the next request ends there', async () => {
    const store = await openStore()
    await appendBatch(store, 10, 100)
    // The second batch (timestamps 200..209, 205 among them) arrives after the head said "no end yet".
    const first = await items(await serve(appendingOnFirstRead(store, () => appendBatch(store, 10, 200)), { offset: '0', to: '205' }))
    expect(first[0]).toMatchObject({ head: { fromOffset: 0, endOffset: null } })
    expect(offsets(first)).toEqual(Array.from({ length: 10 }, (_, i) => i))
    expect(first.at(-1)).toMatchObject({ end: { nextOffset: 10, endOfRange: false, logEndOffset: 20 } })
    const second = await items(await serve(store, { offset: '10', to: '205' }))
    expect(second[0]).toMatchObject({ head: { fromOffset: 10, endOffset: 15 } })
    expect(offsets(second)).toEqual([10, 11, 12, 13, 14])
    expect(second.at(-1)).toMatchObject({ end: { nextOffset: 15, endOfRange: true } })
  })

  it('ends exactly at a `to` that a new batch starts at', async () => {
    const store = await openStore()
    await appendBatch(store, 10, 100)
    const got = await items(await serve(appendingOnFirstRead(store, () => appendBatch(store, 5, 500)), { offset: '0', to: '500' }))
    expect(offsets(got)).toEqual(Array.from({ length: 10 }, (_, i) => i))
    expect(got.at(-1)).toMatchObject({ end: { nextOffset: 10, endOfRange: true } })
  })
})

describe('format=batches, decoded by the CLI', () => {
  it('gives the same records whatever the chunking, identical to read()', async () => {
    const store = await openStore()
    await appendBatch(store, 50, 100)
    await appendBatch(store, 1, 200)
    await appendBatch(store, 30, 300)
    const body = await serve(store, { offset: '7', endOffset: 70 })
    const all = await readAll(store)
    for (const size of [1, 2, 3, 7, 64, 1000, body.length]) {
      const got = await items(body, size)
      const records = got.flatMap((x) => x.kind === 'records' ? x.records : [])
      expect(records, `chunks of ${size}`).toEqual(all.slice(7, 70))
    }
  })

  it('refuses a malformed response with CLI_SERVER, a damaged batch with STORE_CORRUPT_BATCH', async () => {
    const store = await openStore()
    await appendBatch(store, 5, 100)
    await appendBatch(store, 5, 200)
    const { batches } = await store.readBatches(STREAM, 0, 0)
    const head = encodeCbor({ stream: 'telemetry', partition: 0, fromOffset: 0, endOffset: null })
    const end = encodeCbor({ end: { nextOffset: 10 } })
    const item = (b: Uint8Array): Buffer => Buffer.concat([byteStringHead(b.byteLength), b])
    const damaged = Buffer.from(batches[1]!.bytes)
    damaged[damaged.length - 3] = (damaged[damaged.length - 3] as number) ^ 0xff
    const cases: Array<[string, Buffer, string]> = [
      ['a batch before the head', Buffer.concat([item(batches[0]!.bytes), head]), 'CLI_SERVER'],
      ['a gap between batches', Buffer.concat([head, item(batches[1]!.bytes), end]), 'CLI_SERVER'],
      ['a batch twice', Buffer.concat([head, item(batches[0]!.bytes), item(batches[0]!.bytes), end]), 'CLI_SERVER'],
      ['bytes after the end', Buffer.concat([head, end, end]), 'CLI_SERVER'],
      ['an unknown map', Buffer.concat([head, encodeCbor({ what: 1 })]), 'CLI_SERVER'],
      ['an array item', Buffer.concat([head, encodeCbor([1, 2])]), 'CLI_SERVER'],
      ['a head without fromOffset', encodeCbor({ stream: 'telemetry', partition: 0 }), 'CLI_SERVER'],
      ['an indefinite-length item', Buffer.concat([head, Buffer.from([0x5f, 0x41, 0x00, 0xff])]), 'CLI_SERVER'],
      ['a damaged batch', Buffer.concat([head, item(batches[0]!.bytes), item(damaged), end]), 'STORE_CORRUPT_BATCH'],
    ]
    for (const [what, body, code] of cases) {
      await expect(items(body), what).rejects.toMatchObject({ code })
    }
    // The gateway's error item is handed on, not thrown.
    const failed = await items(Buffer.concat([head, item(batches[0]!.bytes), encodeCbor({ error: { code: 'HTTP_INTERNAL', message: 'disk' } })]))
    expect(failed.at(-1)).toEqual({ kind: 'error', error: { code: 'HTTP_INTERNAL', message: 'disk' } })
    // A cut-off stream simply ends without its last item.
    const cut = await items(Buffer.concat([head, item(batches[0]!.bytes)]).subarray(0, -5))
    expect(cut.map((x) => x.kind)).toEqual(['head'])
  })

  it('writes and measures CBOR heads of every length class', () => {
    for (const n of [0, 1, 23, 24, 255, 256, 65_535, 65_536, 1 << 20]) {
      const bytes = Buffer.alloc(n, 7)
      const framed = Buffer.concat([byteStringHead(n), bytes])
      expect(Buffer.compare(framed, encodeCbor(bytes)), String(n)).toBe(0)
      expect(cborItemEnd(framed, 0)).toBe(framed.length)
      expect(cborItemEnd(framed.subarray(0, framed.length - 1), 0)).toBe(-1)
    }
    const map = encodeCbor({ a: [1, 'x', { b: null }], c: -5, d: 1.5, e: Buffer.from('zz') })
    expect(cborItemEnd(map, 0)).toBe(map.length)
    expect(cborItemEnd(map.subarray(0, 4), 0)).toBe(-1)
  })
})
