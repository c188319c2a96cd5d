/**
 * Conformance suite for the LogStore interface, run against every backend in
 * harness.ts. Tests that write run twice: once on the live store and once
 * after close → reopen at the `checkpoint()` the test marks.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { MemoryLevel } from 'memory-level'
import { decodeStoredBatch, openLogStore, type DroppedRecords, type ExtraOperation, type LevelDatabase, type LogStore, type StoredRecord, type StoreObserver, type CommitStats } from '../../store/index.ts'
import { backends, FakeClock, payloadOf, type Backend, type StoreOptions } from './harness.ts'
import { partitionForKey } from '../../store/partitioner.ts'

interface Ctx {
  store: LogStore
  readonly clock: FakeClock
  readonly backend: Backend
  /** Reopens the store in the reopen variant; a no-op otherwise. */
  checkpoint (): Promise<void>
}

async function readAll (store: LogStore, stream: string, partition: number, from?: number): Promise<StoredRecord[]> {
  const out: StoredRecord[] = []
  let offset = from ?? store.partitionInfo(stream, partition).logStartOffset
  for (;;) {
    const r = await store.read(stream, partition, offset, { maxRecords: 5000, maxBytes: 64 * 1024 * 1024 })
    if (r.records.length === 0) return out
    out.push(...r.records)
    offset = r.nextOffset
  }
}

for (const makeBackend of backends) {
  describe(`LogStore on ${makeBackend().name}`, () => {
    let backend: Backend
    let open: LogStore[] = []

    afterEach(async () => {
      for (const s of open) await s.close().catch(() => {})
      open = []
      await backend?.destroy()
    })

    async function setup (options: StoreOptions = {}): Promise<Ctx> {
      backend = makeBackend()
      const clock = new FakeClock()
      const opts = { clock, ...options }
      const ctx: Ctx = {
        store: await backend.open(opts),
        clock,
        backend,
        async checkpoint () {},
      }
      open.push(ctx.store)
      return ctx
    }

    /** Registers `fn` twice: as is, and with checkpoint() reopening the store. */
    function writeTest (name: string, fn: (ctx: Ctx) => Promise<void>, options: StoreOptions = {}): void {
      it(name, async () => { await fn(await setup(options)) })
      it(`${name} (across close → reopen)`, async () => {
        const ctx = await setup(options)
        ctx.checkpoint = async () => {
          ctx.store = await backend.reopen(ctx.store, { clock: ctx.clock, ...options })
          open.push(ctx.store)
        }
        await fn(ctx)
      })
    }

    describe('streams', () => {
      writeTest('creates streams with fixed partitions and lists them', async (ctx) => {
        await ctx.store.createStream('acme/telemetry', { partitions: 8, retentionMs: 60_000 })
        await ctx.store.createStream('acme/events', { partitions: 2 })
        await ctx.store.createStream('globex/telemetry', { partitions: 1, retentionBytes: 1 << 20 })
        // Re-creating with the same partition count updates retention only.
        await ctx.store.createStream('acme/events', { partitions: 2, retentionMs: 5000 })
        await ctx.checkpoint()
        expect(ctx.store.listStreams()).toEqual([
          { name: 'acme/events', partitions: 2, retentionMs: 5000, retentionBytes: 0 },
          { name: 'acme/telemetry', partitions: 8, retentionMs: 60_000, retentionBytes: 0 },
          { name: 'globex/telemetry', partitions: 1, retentionMs: 0, retentionBytes: 1 << 20 },
        ])
        expect(ctx.store.partitionInfo('acme/telemetry', 7)).toMatchObject({ logStartOffset: 0, logEndOffset: 0, bytes: 0, oldestTimestamp: null })
      })

      it('refuses to change the partition count of an existing stream', async () => {
        const { store } = await setup()
        await store.createStream('acme/telemetry', { partitions: 4 })
        await expect(store.createStream('acme/telemetry', { partitions: 8 })).rejects.toMatchObject({ code: 'STORE_STREAM_CONFLICT' })
        expect(store.streamInfo('acme/telemetry').partitions).toBe(4)
      })
    })

    describe('append and read', () => {
      writeTest('gives each partition gapless offsets from 0, chosen by the key hash', async (ctx) => {
        const { store } = ctx
        await store.createStream('t/s', { partitions: 4 })
        const results = await Promise.all(Array.from({ length: 200 }, (_, i) =>
          store.append('t/s', `dev-${i % 13}`, { payload: payloadOf(i) }).then((r) => ({ ...r, i }))))
        const byPartition = new Map<number, number[]>()
        for (const r of results) {
          expect(r.partition).toBe(store.partitionFor('t/s', `dev-${r.i % 13}`))
          byPartition.set(r.partition, [...(byPartition.get(r.partition) ?? []), r.offset])
        }
        for (const offsets of byPartition.values()) {
          expect([...offsets].sort((a, b) => a - b)).toEqual(offsets.map((_, k) => k))
        }
        await ctx.checkpoint()
        let total = 0
        for (let p = 0; p < 4; p++) {
          const info = ctx.store.partitionInfo('t/s', p)
          expect(info.logEndOffset).toBe(byPartition.get(p)?.length ?? 0)
          total += info.logEndOffset
        }
        expect(total).toBe(200)
        // Offsets continue, never reused, after a reopen.
        const next = await ctx.store.append('t/s', 'dev-0', { payload: payloadOf(999) })
        expect(next.offset).toBe(byPartition.get(next.partition)?.length)
      })

      writeTest('reads back every field byte-identical and in offset order', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 1 })
        const sent = Array.from({ length: 50 }, (_, i) => ({
          payload: payloadOf(i, 1 + (i * 7) % 300),
          topic: `devices/d${i}/telemetry`,
          qos: (i % 3) as 0 | 1 | 2,
          clientId: `client-${i}`,
          headers: i % 2 === 0 ? { 'content-type': 'application/json', seq: String(i) } : undefined,
        }))
        for (const [i, r] of sent.entries()) {
          ctx.clock.advance(i)
          await ctx.store.append('t/s', `d${i}`, r)
        }
        await ctx.store.append('t/s', 'explicit', { payload: Buffer.alloc(0), timestamp: 42 })
        await ctx.checkpoint()
        const got = await readAll(ctx.store, 't/s', 0)
        expect(got).toHaveLength(51)
        let t = 1_700_000_000_000
        for (const [i, r] of sent.entries()) {
          t += i
          const g = got[i] as StoredRecord
          expect(g.offset).toBe(i)
          expect(Buffer.from(g.payload).equals(r.payload)).toBe(true)
          expect(g).toMatchObject({ key: `d${i}`, topic: r.topic, qos: r.qos, clientId: r.clientId, timestamp: t, headers: r.headers ?? null })
        }
        expect(got[50]).toMatchObject({ offset: 50, key: 'explicit', timestamp: 42, topic: '', qos: 0, clientId: '', headers: null })
        expect(got[50]?.payload.byteLength).toBe(0)
      })

      writeTest('reads from inside a batch, across batch boundaries, within maxRecords and maxBytes', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 1 })
        // 2,500 concurrent appends become several batches (at most 1,000 records each).
        await Promise.all(Array.from({ length: 2500 }, (_, i) => ctx.store.append('t/s', 'k', { payload: payloadOf(i, 100) })))
        for (let i = 0; i < 30; i++) await ctx.store.append('t/s', 'k', { payload: payloadOf(2500 + i, 100) })
        await ctx.checkpoint()
        const { store } = ctx
        const mid = await store.read('t/s', 0, 1999, { maxRecords: 3 })
        expect(mid.records.map((r) => r.offset)).toEqual([1999, 2000, 2001])
        expect(mid.nextOffset).toBe(2002)
        expect(Buffer.from(mid.records[1]?.payload ?? []).equals(payloadOf(2000, 100))).toBe(true)
        const bytes = await store.read('t/s', 0, 10, { maxBytes: 250 })
        expect(bytes.records.map((r) => r.offset)).toEqual([10, 11])
        // At least one record even when it alone exceeds maxBytes.
        expect((await store.read('t/s', 0, 10, { maxBytes: 1 })).records).toHaveLength(1)
        const all = await readAll(store, 't/s', 0)
        expect(all.map((r) => r.offset)).toEqual(Array.from({ length: 2530 }, (_, i) => i))
        for (const r of all) expect(Buffer.from(r.payload).equals(payloadOf(r.offset, 100))).toBe(true)
        const atEnd = await store.read('t/s', 0, 2530)
        expect(atEnd).toMatchObject({ records: [], nextOffset: 2530, logStartOffset: 0, logEndOffset: 2530 })
      })

      writeTest('reads whole stored batches that decode to exactly the records read() returns', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 1 })
        // Several batches of different sizes, with headers on some records.
        await Promise.all(Array.from({ length: 2500 }, (_, i) => ctx.store.append('t/s', `k${i % 7}`, { payload: payloadOf(i, 100), topic: `devices/k${i % 7}/t`, qos: 1 })))
        for (let i = 0; i < 30; i++) await ctx.store.append('t/s', 'k', { payload: payloadOf(2500 + i, 1 + i), headers: i % 2 === 0 ? { n: String(i) } : undefined })
        await ctx.checkpoint()
        const { store } = ctx
        const all = await readAll(store, 't/s', 0)
        expect(all).toHaveLength(2530)
        /** Every batch from `from` on, decoded, below-`from` records dropped. */
        const viaBatches = async (from: number, options: { maxBytes?: number, endOffset?: number } = {}): Promise<{ records: StoredRecord[], bases: number[], nextOffset: number }> => {
          const r = await store.readBatches('t/s', 0, from, options)
          expect(r).toMatchObject({ logStartOffset: 0, logEndOffset: 2530 })
          const bases = r.batches.map((b) => b.baseOffset)
          let expected = r.batches[0]?.baseOffset
          for (const b of r.batches) {
            // Contiguous, headers true to the bytes.
            expect(b.baseOffset).toBe(expected)
            const records = decodeStoredBatch(b.bytes)
            expect(records.map((x) => x.offset)).toEqual(Array.from({ length: b.count }, (_, i) => b.baseOffset + i))
            expect(Math.max(...records.map((x) => x.timestamp))).toBe(b.maxTimestamp)
            expect(records[0]?.timestamp).toBe(b.firstTimestamp)
            expected = b.baseOffset + b.count
          }
          return { records: r.batches.flatMap((b) => decodeStoredBatch(b.bytes)).filter((x) => x.offset >= from), bases, nextOffset: r.nextOffset }
        }
        // Everything, from the start and from inside a batch: identical to read().
        const whole = await viaBatches(0, { maxBytes: 64 << 20 })
        expect(whole.records).toEqual(all)
        expect(whole.nextOffset).toBe(2530)
        const mid = all[1999]!.offset
        const fromMid = await viaBatches(mid, { maxBytes: 64 << 20 })
        expect(fromMid.bases[0]).toBeLessThan(mid)
        expect(fromMid.records).toEqual(all.slice(1999))
        // maxBytes: whole batches, at least one, never past the limit after the first.
        const one = await viaBatches(mid, { maxBytes: 1 })
        expect(one.bases).toHaveLength(1)
        expect(one.records[0]).toEqual(all[1999])
        const r = await store.readBatches('t/s', 0, 0, { maxBytes: 150_000 })
        expect(r.batches.reduce((n, b) => n + b.bytes.byteLength, 0)).toBeLessThanOrEqual(150_000)
        expect(r.nextOffset).toBe(r.batches.at(-1)!.baseOffset + r.batches.at(-1)!.count)
        // endOffset: no batch that starts at or after it.
        const bounded = await store.readBatches('t/s', 0, 0, { maxBytes: 64 << 20, endOffset: fromMid.bases[0]! })
        expect(bounded.nextOffset).toBe(fromMid.bases[0])
        expect((await store.readBatches('t/s', 0, 5, { endOffset: 5 })).batches).toEqual([])
        // At the log end: nothing, and where to go on.
        expect(await store.readBatches('t/s', 0, 2530)).toEqual({ batches: [], nextOffset: 2530, logStartOffset: 0, logEndOffset: 2530 })
      })

      writeTest('reads columns: the records read() returns, batch by batch, without an object per record', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 1 })
        // Several batches of different sizes; topics, client ids and header sets repeat within a batch.
        await Promise.all(Array.from({ length: 2500 }, (_, i) => ctx.store.append('t/s', `k${i % 7}`,
          { payload: payloadOf(i, 100), topic: `devices/k${i % 7}/t`, qos: (i % 3) as 0 | 1 | 2, clientId: `c${i % 5}`, headers: i % 4 === 0 ? { n: String(i % 8) } : undefined })))
        for (let i = 0; i < 30; i++) await ctx.store.append('t/s', 'k', { payload: payloadOf(2500 + i, 1 + i), headers: i % 2 === 0 ? { n: String(i) } : undefined })
        await ctx.checkpoint()
        const { store } = ctx
        /** Every record a column read returns, made from the columns alone, and where to read on. */
        const viaColumns = async (from: number, options: { maxRecords?: number, maxBytes?: number }): Promise<{ records: unknown[], made: unknown[], nextOffset: number }> => {
          const r = await store.readColumns('t/s', 0, from, options)
          expect(r).toMatchObject({ logStartOffset: 0, logEndOffset: 2530 })
          const records: unknown[] = []
          const made: unknown[] = []
          let expected = from
          for (const b of r.batches) {
            expect(b.baseOffset + b.start).toBe(expected) // contiguous, starting at `from`
            expect(b.start).toBeLessThan(b.end)
            expect(b.end).toBeLessThanOrEqual(b.count)
            const sets = new Map<number, unknown>()
            let sharing = true
            for (let i = b.start; i < b.end; i++) {
              const start = b.payloadStart(i)
              const headers = b.headers(i)
              records.push({
                offset: b.baseOffset + i, timestamp: b.timestamp(i), key: b.key(i), topic: b.strings[b.topicIndex(i)], qos: b.qos(i), clientId: b.clientId(i),
                payload: Buffer.from(b.payloadBytes.subarray(start, start + b.payloadLength(i))), headers, viewed: Buffer.from(b.payload(i)),
              })
              made.push(b.record(i))
              // One number per distinct set, 0 for none; records of a set share its object.
              const set = b.headerSet(i)
              if ((set === 0) !== (headers === null) || (sets.has(set) && sets.get(set) !== headers)) sharing = false
              sets.set(set, headers)
            }
            expect(sharing).toBe(true)
            expected = b.baseOffset + b.end
          }
          expect(r.nextOffset).toBe(expected)
          return { records, made, nextOffset: r.nextOffset }
        }
        const cases: Array<[number, { maxRecords?: number, maxBytes?: number }]> = [
          [0, { maxRecords: 5000, maxBytes: 64 << 20 }], [1999, { maxRecords: 3 }], [10, { maxBytes: 250 }], [10, { maxBytes: 1 }],
          [777, { maxRecords: 1000, maxBytes: 30_000 }], [2499, { maxRecords: 10 }], [2529, {}],
        ]
        for (const [from, options] of cases) {
          const plain = await store.read('t/s', 0, from, options)
          const columns = await viaColumns(from, options)
          const what = `from ${from} ${JSON.stringify(options)}`
          expect(columns.made, what).toEqual(plain.records)
          expect(columns.records, what).toEqual(plain.records.map((x) => ({ ...x, payload: Buffer.from(x.payload), viewed: Buffer.from(x.payload) })))
          expect(columns.nextOffset).toBe(plain.nextOffset)
        }
        // At the log end: no batch, and where to go on.
        expect(await store.readColumns('t/s', 0, 2530)).toEqual({ batches: [], nextOffset: 2530, logStartOffset: 0, logEndOffset: 2530 })
      })

      it('commits concurrent appends together and writes a lone append at once', async () => {
        const commits: CommitStats[] = []
        const observer: StoreObserver = { onCommit: (s) => { commits.push(s) } }
        const { store } = await setup({ observer })
        await store.createStream('t/s', { partitions: 8 })
        await Promise.all(Array.from({ length: 1000 }, (_, i) => store.append('t/s', `d${i}`, { payload: payloadOf(i) })))
        // 1,000 appends from one tick: one commit (one LevelDB batch) for all of them.
        expect(commits.map((c) => c.records)).toEqual([1000])
        commits.length = 0
        for (let i = 0; i < 20; i++) await store.append('t/s', 'solo', { payload: payloadOf(i) })
        // A producer that waits for each append gets its own commit each time: no linger.
        expect(commits.map((c) => c.records)).toEqual(Array(20).fill(1))
      })

      it('resolves a lone append without any timer firing', async () => {
        const { store } = await setup()
        await store.createStream('t/s', { partitions: 1 })
        const realSetTimeout = globalThis.setTimeout
        let timers = 0
        globalThis.setTimeout = ((...args: Parameters<typeof setTimeout>) => { timers++; return realSetTimeout(...args) }) as typeof setTimeout
        try {
          await store.append('t/s', 'k', { payload: payloadOf(1) })
        } finally {
          globalThis.setTimeout = realSetTimeout
        }
        expect(timers).toBe(0)
      })

      it('finishes pending appends on close and refuses appends after it', async () => {
        const { store } = await setup()
        await store.createStream('t/s', { partitions: 2 })
        const pending = Array.from({ length: 300 }, (_, i) => store.append('t/s', `d${i}`, { payload: payloadOf(i) }))
        expect(store.pendingAppends).toBe(300)
        await store.close()
        const results = await Promise.all(pending)
        expect(results).toHaveLength(300)
        await expect(store.append('t/s', 'd', { payload: payloadOf(0) })).rejects.toMatchObject({ code: 'STORE_CLOSED' })
        const again = await backend.openExisting()
        open.push(again)
        expect(again.partitionInfo('t/s', 0).logEndOffset + again.partitionInfo('t/s', 1).logEndOffset).toBe(300)
      })
    })

    describe('idempotent appends', () => {
      writeTest('appends a record carrying a dedupe id once, also across a reopen', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 2 })
        const [a, b] = await Promise.all([
          ctx.store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'client-1/42' }),
          ctx.store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'client-1/42' }),
        ])
        expect(a).toEqual({ partition: a.partition, offset: 0 })
        expect(b).toEqual({ partition: a.partition, offset: 0, duplicate: true })
        expect(await ctx.store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'client-1/42' })).toMatchObject({ offset: 0, duplicate: true })
        await ctx.store.append('t/s', 'k', { payload: payloadOf(2) }, { dedupeId: 'client-1/43' })
        await ctx.checkpoint()
        expect(await ctx.store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'client-1/42' })).toMatchObject({ offset: 0, duplicate: true })
        expect(ctx.store.partitionInfo('t/s', a.partition).logEndOffset).toBe(2)
        // MQTT reuses packet ids once the exchange completes: a forgotten id appends again.
        await ctx.store.forgetDedupe('client-1/42')
        await ctx.checkpoint()
        expect(await ctx.store.append('t/s', 'k', { payload: payloadOf(3) }, { dedupeId: 'client-1/42' })).toEqual({ partition: a.partition, offset: 2 })
        await ctx.store.append('t/s', 'k', { payload: payloadOf(4) }, { dedupeId: 'client-2/1' })
        await ctx.store.forgetDedupePrefix('client-1/')
        await ctx.checkpoint()
        expect((await ctx.store.append('t/s', 'k', { payload: payloadOf(5) }, { dedupeId: 'client-1/43' })).duplicate).toBeUndefined()
        expect((await ctx.store.append('t/s', 'k', { payload: payloadOf(4) }, { dedupeId: 'client-2/1' })).duplicate).toBe(true)
      })

      it('commits extra operations outside the log in the record\'s batch, and only with a new record', async () => {
        backend = makeBackend()
        const db = await backend.database()
        const side = db.sublevel<Buffer, Buffer>('side', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
        const sideKey = (k: string): Buffer => Buffer.from(k)
        const put = (k: string, v: string): ExtraOperation => ({ type: 'put', sublevel: side, key: sideKey(k), value: Buffer.from(v) })
        let store = await openLogStore({ db, clock: new FakeClock() })
        open.push(store)
        await store.createStream('t/s', { partitions: 1 })
        await store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'd1', extraOps: [put('a', '1'), put('b', '1')] })
        // A duplicate writes nothing, its extra operations neither; a later append may delete what an earlier one put.
        expect(await store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'd1', extraOps: [put('a', 'dup')] })).toMatchObject({ duplicate: true })
        await store.append('t/s', 'k', { payload: payloadOf(2) }, { extraOps: [{ type: 'del', sublevel: side, key: sideKey('b') }] })
        // A failing append writes none of them.
        await expect(store.append('t/nope', 'k', { payload: payloadOf(3) }, { extraOps: [put('c', '1')] })).rejects.toMatchObject({ code: 'STORE_UNKNOWN_STREAM' })
        // Only sublevels of the store's database outside the log are accepted.
        const log = db.sublevel('log') as unknown as LevelDatabase
        for (const sublevel of [log, log.sublevel('inner') as unknown as LevelDatabase, db, new MemoryLevel() as unknown as LevelDatabase]) {
          await expect(store.append('t/s', 'k', { payload: payloadOf(4) }, { extraOps: [{ type: 'put', sublevel, key: sideKey('x'), value: Buffer.from('x') }] }))
            .rejects.toMatchObject({ code: 'STORE_INVALID_ARGUMENT', name: 'StoreError' })
        }
        await store.close()
        await db.close()
        await db.open()
        store = await openLogStore({ db, clock: new FakeClock() })
        open.push(store)
        expect(store.partitionInfo('t/s', 0).logEndOffset).toBe(2)
        await side.open() // a sublevel stays closed after its database reopens
        const stored = await side.iterator<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' }).all()
        expect(stored.map(([k, v]) => [k.toString(), v.toString()])).toEqual([['a', '1']])
      })

      it('writes operations outside the log through its group commit, in call order with appends\' extraOps', async () => {
        backend = makeBackend()
        const db = await backend.database()
        const side = db.sublevel<Buffer, Buffer>('side', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
        const put = (k: string, v: string): ExtraOperation => ({ type: 'put', sublevel: side, key: Buffer.from(k), value: Buffer.from(v) })
        const del = (k: string): ExtraOperation => ({ type: 'del', sublevel: side, key: Buffer.from(k) })
        let store = await openLogStore({ db, clock: new FakeClock() })
        open.push(store)
        await store.createStream('t/s', { partitions: 1 })
        await store.write([put('alone', '1')]) // a commit without records
        // Queued in one tick, so committed in one batch: the later operation on a key wins, whichever path it took.
        await Promise.all([
          store.append('t/s', 'k', { payload: payloadOf(1) }, { extraOps: [put('a', 'from-append')] }),
          store.write([put('a', 'from-write'), put('b', '1')]),
          store.write([del('b')]),
          store.append('t/s', 'k', { payload: payloadOf(2) }, { extraOps: [put('c', 'from-append')] }),
          store.write([put('c', 'from-write')]),
          store.write([]),
        ])
        // Bad operations: refused, nothing written.
        const log = db.sublevel('log') as unknown as LevelDatabase
        for (const ops of [[{ type: 'put', sublevel: log, key: Buffer.from('x'), value: Buffer.from('x') }], [{ type: 'merge', sublevel: side, key: Buffer.from('x') }], 'nope']) {
          await expect(store.write(ops as never)).rejects.toMatchObject({ code: 'STORE_INVALID_ARGUMENT', name: 'StoreError' })
        }
        await store.close()
        await expect(store.write([put('late', '1')])).rejects.toMatchObject({ code: 'STORE_CLOSED' })
        await db.close()
        await db.open()
        store = await openLogStore({ db, clock: new FakeClock() })
        open.push(store)
        expect(store.partitionInfo('t/s', 0).logEndOffset).toBe(2)
        await side.open() // a sublevel stays closed after its database reopens
        const stored = await side.iterator<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' }).all()
        expect(stored.map(([k, v]) => [k.toString(), v.toString()])).toEqual([['a', 'from-write'], ['alone', '1'], ['c', 'from-write']])
      })

      writeTest('scopes dedupe ids to the stream, so an id seen in one stream never suppresses another stream\'s record', async (ctx) => {
        await ctx.store.createStream('tenant-a/telemetry', { partitions: 1 })
        await ctx.store.createStream('tenant-b/telemetry', { partitions: 1 })
        // Another tenant's client takes the id first (a forged bridge resend, a guessable offset).
        expect(await ctx.store.append('tenant-b/telemetry', 'k', { payload: payloadOf(1) }, { dedupeId: 'bridge/edge-1/a/0/0' })).toEqual({ partition: 0, offset: 0 })
        await ctx.checkpoint()
        expect(await ctx.store.append('tenant-a/telemetry', 'k', { payload: payloadOf(2) }, { dedupeId: 'bridge/edge-1/a/0/0' })).toEqual({ partition: 0, offset: 0 })
        await ctx.checkpoint()
        // Within each stream the id still dedupes, also after a reopen.
        expect(await ctx.store.append('tenant-a/telemetry', 'k', { payload: payloadOf(2) }, { dedupeId: 'bridge/edge-1/a/0/0' })).toEqual({ partition: 0, offset: 0, duplicate: true })
        expect(await ctx.store.append('tenant-b/telemetry', 'k', { payload: payloadOf(1) }, { dedupeId: 'bridge/edge-1/a/0/0' })).toEqual({ partition: 0, offset: 0, duplicate: true })
        expect((await readAll(ctx.store, 'tenant-a/telemetry', 0)).map((r) => Buffer.from(r.payload).toString('hex'))).toEqual([payloadOf(2).toString('hex')])
        // Forgetting an id forgets it in every stream (a QoS 2 exchange ends without naming its stream).
        await ctx.store.forgetDedupe('bridge/edge-1/a/0/0')
        await ctx.checkpoint()
        expect((await ctx.store.append('tenant-a/telemetry', 'k', { payload: payloadOf(3) }, { dedupeId: 'bridge/edge-1/a/0/0' })).duplicate).toBeUndefined()
        expect((await ctx.store.append('tenant-b/telemetry', 'k', { payload: payloadOf(3) }, { dedupeId: 'bridge/edge-1/a/0/0' })).duplicate).toBeUndefined()
      })

      it('moves the unscoped dedupe ids of an older data dir under their stream at open', async () => {
        const ctx = await setup()
        await ctx.store.createStream('t/s', { partitions: 1 })
        await ctx.store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'bridge/edge-1/t/s/0/0' })
        await ctx.store.close()
        // Rewrite the entry as the format before scoping wrote it: `D` id(utf8), same value.
        const raw = await backend.raw()
        const log = raw.sublevel<Buffer, Buffer>('log', { keyEncoding: 'buffer', valueEncoding: 'buffer' })
        const scoped = await log.iterator<Buffer, Buffer>({ gte: Buffer.from('d'), lt: Buffer.from('e') }).all()
        expect(scoped).toHaveLength(1)
        const [key, value] = scoped[0]!
        await log.batch<Buffer, Buffer>([{ type: 'del', key }, { type: 'put', key: Buffer.from('Dbridge/edge-1/t/s/0/0'), value }], {})
        await raw.close()
        const store = await backend.openExisting()
        open.push(store)
        expect(await store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'bridge/edge-1/t/s/0/0' })).toEqual({ partition: 0, offset: 0, duplicate: true })
        await store.forgetDedupe('bridge/edge-1/t/s/0/0') // the moved entry is a scoped one: forgetting it reaches the disk
        const again = await backend.reopen(store)
        open.push(again)
        expect((await again.append('t/s', 'k', { payload: payloadOf(2) }, { dedupeId: 'bridge/edge-1/t/s/0/0' })).duplicate).toBeUndefined()
      })

      it('forgets dedupe ids older than the dedupe retention', async () => {
        const { store, clock } = await setup({ dedupeRetentionMs: 60_000 })
        await store.createStream('t/s', { partitions: 1 })
        await store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'old' })
        clock.advance(61_000)
        await store.append('t/s', 'k', { payload: payloadOf(2) }, { dedupeId: 'new' })
        await store.enforceRetention()
        expect((await store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: 'old' })).duplicate).toBeUndefined()
        expect((await store.append('t/s', 'k', { payload: payloadOf(2) }, { dedupeId: 'new' })).duplicate).toBe(true)
      })
    })

    describe('time index', () => {
      writeTest('finds the first offset at or after a time without scanning the log', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 1 })
        const t0 = ctx.clock.now()
        // 10 batches of 100 records, 1 s apart; records within a batch 1 ms apart.
        for (let b = 0; b < 10; b++) {
          await Promise.all(Array.from({ length: 100 }, (_, i) =>
            ctx.store.append('t/s', 'k', { payload: payloadOf(b * 100 + i), timestamp: t0 + b * 1000 + i })))
        }
        await ctx.checkpoint()
        const { store } = ctx
        expect(await store.offsetForTime('t/s', 0, 0)).toBe(0)
        expect(await store.offsetForTime('t/s', 0, t0)).toBe(0)
        expect(await store.offsetForTime('t/s', 0, t0 + 1)).toBe(1)
        expect(await store.offsetForTime('t/s', 0, t0 + 3000)).toBe(300)
        expect(await store.offsetForTime('t/s', 0, t0 + 3050)).toBe(350)
        expect(await store.offsetForTime('t/s', 0, t0 + 3100)).toBe(400) // between batches
        expect(await store.offsetForTime('t/s', 0, t0 + 9099)).toBe(999)
        expect(await store.offsetForTime('t/s', 0, t0 + 9100)).toBeNull()
      })

      writeTest('stays correct when the clock steps backwards and after retention', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 1, retentionMs: 10_000 })
        const t0 = ctx.clock.now()
        const stamps = [t0, t0 + 5000, t0 + 2000, t0 + 3000, t0 + 20_000, t0 + 21_000]
        for (const [i, ts] of stamps.entries()) await ctx.store.append('t/s', 'k', { payload: payloadOf(i), timestamp: ts })
        expect(await ctx.store.offsetForTime('t/s', 0, t0 + 2500)).toBe(1)
        expect(await ctx.store.offsetForTime('t/s', 0, t0 + 6000)).toBe(4)
        // Drop the first two batches (newest record t0+5000 is past retention at t0+16000).
        ctx.clock.t = t0 + 16_000
        const report = await ctx.store.enforceRetention()
        expect(report.recordsDeleted).toBe(4)
        await ctx.checkpoint()
        expect(ctx.store.partitionInfo('t/s', 0).logStartOffset).toBe(4)
        expect(await ctx.store.offsetForTime('t/s', 0, 0)).toBe(4)
        expect(await ctx.store.offsetForTime('t/s', 0, t0 + 20_500)).toBe(5)
      })
    })

    describe('retention', () => {
      writeTest('deletes whole batches by age and moves the log start', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 1, retentionMs: 60_000 })
        for (let b = 0; b < 5; b++) {
          await Promise.all(Array.from({ length: 10 }, (_, i) => ctx.store.append('t/s', 'k', { payload: payloadOf(b * 10 + i) })))
          ctx.clock.advance(30_000)
        }
        // Now = t0 + 150 s: batches stamped t0, +30 s and +60 s are older than 60 s.
        const report = await ctx.store.enforceRetention()
        expect(report).toMatchObject({ batchesDeleted: 3, recordsDeleted: 30 })
        await ctx.checkpoint()
        expect(ctx.store.partitionInfo('t/s', 0)).toMatchObject({ logStartOffset: 30, logEndOffset: 50, oldestTimestamp: 1_700_000_000_000 + 90_000 })
        const err = await ctx.store.read('t/s', 0, 29).catch((e: unknown) => e)
        expect(err).toMatchObject({ code: 'STORE_OFFSET_OUT_OF_RANGE', details: { logStartOffset: 30, logEndOffset: 50 } })
        expect(String((err as Error).message)).toContain('log start 30')
        expect((await readAll(ctx.store, 't/s', 0)).map((r) => r.offset)).toEqual(Array.from({ length: 20 }, (_, i) => 30 + i))
        // Appends go on from the old end.
        expect((await ctx.store.append('t/s', 'k', { payload: payloadOf(50) })).offset).toBe(50)
      })

      writeTest('keeps each partition under retentionBytes, oldest batches first', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 1, retentionBytes: 5000 })
        for (let b = 0; b < 10; b++) {
          await Promise.all(Array.from({ length: 10 }, (_, i) => ctx.store.append('t/s', 'k', { payload: payloadOf(b * 10 + i, 100) })))
        }
        const before = ctx.store.partitionInfo('t/s', 0).bytes
        expect(before).toBeGreaterThan(5000)
        await ctx.store.enforceRetention()
        await ctx.checkpoint()
        const info = ctx.store.partitionInfo('t/s', 0)
        expect(info.bytes).toBeLessThanOrEqual(5000)
        expect(info.bytes).toBeGreaterThan(5000 - before / 10 - 1)
        expect(info.logStartOffset % 10).toBe(0)
        expect(info.logEndOffset).toBe(100)
      })

      writeTest('never deletes what a retention-holding group still needs', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 1, retentionMs: 1000 })
        await ctx.store.setGroup('bridge.eu', { holdsRetention: true })
        await ctx.store.commitOffset('plain', 't/s', 0, 0)
        for (let b = 0; b < 4; b++) {
          await Promise.all(Array.from({ length: 5 }, (_, i) => ctx.store.append('t/s', 'k', { payload: payloadOf(b * 5 + i) })))
        }
        await ctx.store.commitOffset('bridge.eu', 't/s', 0, 12)
        ctx.clock.advance(10_000)
        await ctx.checkpoint()
        const report = await ctx.store.enforceRetention()
        // Batches [0,5) and [5,10) are consumed by the holding group; [10,15) is not yet.
        expect(report).toMatchObject({ recordsDeleted: 10, dropped: [] })
        expect(ctx.store.partitionInfo('t/s', 0).logStartOffset).toBe(10)
        await ctx.store.commitOffset('bridge.eu', 't/s', 0, 20)
        await ctx.store.enforceRetention()
        expect(ctx.store.partitionInfo('t/s', 0)).toMatchObject({ logStartOffset: 20, logEndOffset: 20, bytes: 0, oldestTimestamp: null })
      })

      it('drops unconsumed records only under the disk budget, and reports each one', async () => {
        const dropped: unknown[] = []
        const { store, clock } = await setup({ diskBudgetBytes: 3000, observer: { onDropped: (d) => { dropped.push(d) } } })
        await store.createStream('t/s', { partitions: 1 })
        await store.setGroup('bridge.us', { holdsRetention: true })
        for (let b = 0; b < 5; b++) {
          await Promise.all(Array.from({ length: 10 }, (_, i) => store.append('t/s', 'k', { payload: payloadOf(b * 10 + i, 100) })))
          clock.advance(1000)
        }
        await store.commitOffset('bridge.us', 't/s', 0, 5)
        const report = await store.enforceRetention()
        expect(store.totalBytes).toBeLessThanOrEqual(3000)
        const start = store.partitionInfo('t/s', 0).logStartOffset
        expect(start).toBeGreaterThan(5)
        const expected = { stream: 't/s', partition: 0, group: 'bridge.us', count: start - 5, reason: 'disk-budget' }
        expect(report.dropped.reduce((n, d) => n + d.count, 0)).toBe(start - 5)
        expect(dropped.reduce((n: number, d) => n + (d as { count: number }).count, 0)).toBe(start - 5)
        expect(report.dropped[0]).toMatchObject({ ...expected, count: expect.any(Number) })
      })

      it('under the disk budget, logs a partition and group\'s first drop and the rest of the pass with its total, not a warning per batch, oldest batch first across partitions', async () => {
        const warnings: Array<Record<string, unknown>> = []
        const logger = { info () {}, error () {}, warn (fields: Record<string, unknown>) { warnings.push(fields) } }
        const dropped: unknown[] = []
        const { store, clock } = await setup({ diskBudgetBytes: 4000, logger, observer: { onDropped: (d) => { dropped.push(d) } } })
        await store.createStream('t/s', { partitions: 2 })
        await store.setGroup('bridge.us', { holdsRetention: true })
        const told: Array<[string, number, number]> = []
        store.holdRetention(() => 0, (...args) => { told.push(args) })
        // 40 batches of one record each, the two partitions taking turns: 0 is older than 1 at every step.
        const keyOf = [0, 1].map((p) => Array.from({ length: 50 }, (_, i) => `k${i}`).find((k) => partitionForKey(k, 2) === p))
        for (let b = 0; b < 40; b++) {
          await store.append('t/s', keyOf[b % 2] as string, { payload: payloadOf(b, 100) })
          clock.advance(1000)
        }
        const before = [store.partitionInfo('t/s', 0).logEndOffset, store.partitionInfo('t/s', 1).logEndOffset]
        const report = await store.enforceRetention()
        expect(store.totalBytes).toBeLessThanOrEqual(4000)
        const starts = [store.partitionInfo('t/s', 0).logStartOffset, store.partitionInfo('t/s', 1).logStartOffset]
        expect(starts[0]).toBeGreaterThan(5)
        // Oldest first: the partitions lost the same number of batches, or partition 0 (older at each step) one more.
        expect([0, 1]).toContain((starts[0] as number) - (starts[1] as number))
        expect(before).toEqual([20, 20])
        // Two warnings per partition for the whole pass (its first drop at once, then the rest, with the pass's total);
        // every record counted, and the hold told the last log start.
        const budgetWarnings = warnings.filter((w) => w.reason === 'disk-budget')
        expect(budgetWarnings).toHaveLength(4)
        const sum = (ds: ReadonlyArray<{ partition: number, count: number }>, p: number): number => ds.filter((d) => d.partition === p).reduce((n, d) => n + d.count, 0)
        // Summing `count` over the log lines counts each record once (the end line once repeated the first's).
        expect([0, 1].map((p) => sum(budgetWarnings as Array<{ partition: number, count: number }>, p))).toEqual(starts)
        expect([0, 1].map((p) => budgetWarnings.filter((w) => w.partition === p).at(-1)?.passCount)).toEqual(starts)
        expect([sum(report.dropped, 0), sum(report.dropped, 1)]).toEqual(starts)
        expect([sum(dropped as DroppedRecords[], 0), sum(dropped as DroppedRecords[], 1)]).toEqual(starts)
        expect([0, 1].map((p) => told.filter(([, partition]) => partition === p).at(-1)?.[2])).toEqual(starts)
      })

      it('tells a retention hold the disk budget deleted past its floor the new log start, and a hold it did not pass nothing', async () => {
        const { store, clock } = await setup({ diskBudgetBytes: 3000 })
        await store.createStream('t/s', { partitions: 1 })
        const told: Array<[string, number, number]> = []
        const untouched: unknown[] = []
        const release = store.holdRetention((stream) => stream === 't/s' ? 5 : undefined, (...args) => { told.push(args) })
        store.holdRetention(() => undefined, (...args) => { untouched.push(args) })
        for (let b = 0; b < 5; b++) {
          await Promise.all(Array.from({ length: 10 }, (_, i) => store.append('t/s', 'k', { payload: payloadOf(b * 10 + i, 100) })))
          clock.advance(1000)
        }
        await store.enforceRetention()
        const start = store.partitionInfo('t/s', 0).logStartOffset
        expect(start).toBeGreaterThan(5)
        // once per write of the pass, the last with the log start after it; the holder counts from its floor
        expect(told.length).toBeGreaterThan(0)
        expect(told.every(([stream, partition]) => stream === 't/s' && partition === 0)).toBe(true)
        expect(told.at(-1)?.[2]).toBe(start)
        expect(untouched).toEqual([])
        release()
        expect(() => store.holdRetention(() => undefined, 'no' as never)).toThrow(expect.objectContaining({ code: 'STORE_INVALID_ARGUMENT' }))
      })
    })

    describe('consumer groups', () => {
      writeTest('commit, fetch, list, lag in messages and seconds, delete', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 2 })
        const t0 = ctx.clock.now()
        for (let i = 0; i < 10; i++) {
          await ctx.store.append('t/s', 'a', { payload: payloadOf(i) })
          ctx.clock.advance(1000)
        }
        const p = ctx.store.partitionFor('t/s', 'a')
        await ctx.store.commitOffset('svc', 't/s', p, 4)
        await ctx.store.setGroup('bridge.eu', { holdsRetention: true })
        await ctx.checkpoint()
        const { store } = ctx
        expect(store.fetchOffset('svc', 't/s', p)).toBe(4)
        expect(store.fetchOffset('svc', 't/s', 1 - p)).toBeNull()
        ctx.clock.t = t0 + 20_000
        const lag = await store.groupLag('svc', 't/s')
        expect(lag.find((l) => l.partition === p)).toEqual({ partition: p, committedOffset: 4, logStartOffset: 0, logEndOffset: 10, lagMessages: 6, lagSeconds: 16 })
        expect(lag.find((l) => l.partition !== p)).toMatchObject({ committedOffset: null, lagMessages: 0, lagSeconds: 0 })
        expect(store.listGroups()).toEqual([
          { group: 'bridge.eu', holdsRetention: true, offsets: {} },
          { group: 'svc', holdsRetention: false, offsets: { 't/s': { [p]: 4 } } },
        ])
        await store.deleteGroup('svc')
        expect(store.fetchOffset('svc', 't/s', p)).toBeNull()
        await ctx.checkpoint()
        expect(ctx.store.listGroups().map((g) => g.group)).toEqual(['bridge.eu'])
      })

      writeTest('resets to earliest, latest, an offset or a timestamp', async (ctx) => {
        await ctx.store.createStream('t/s', { partitions: 1 })
        const t0 = ctx.clock.now()
        for (let i = 0; i < 10; i++) {
          await ctx.store.append('t/s', 'k', { payload: payloadOf(i) })
          ctx.clock.advance(1000)
        }
        await ctx.checkpoint()
        const { store } = ctx
        await store.resetGroup('g', 't/s', { to: 'latest' })
        expect(store.fetchOffset('g', 't/s', 0)).toBe(10)
        await store.resetGroup('g', 't/s', { to: 'earliest' })
        expect(store.fetchOffset('g', 't/s', 0)).toBe(0)
        await store.resetGroup('g', 't/s', { to: 'timestamp', timestamp: t0 + 6500 })
        expect(store.fetchOffset('g', 't/s', 0)).toBe(7)
        await store.resetGroup('g', 't/s', { to: 'timestamp', timestamp: t0 + 99_000 })
        expect(store.fetchOffset('g', 't/s', 0)).toBe(10)
        await store.resetGroup('g', 't/s', { to: 'offset', offset: 3 }, 0)
        expect(store.fetchOffset('g', 't/s', 0)).toBe(3)
        await store.resetGroup('g', 't/s', { to: 'offset', offset: 500 })
        expect(store.fetchOffset('g', 't/s', 0)).toBe(10)
      })
    })

    describe('bad input', () => {
      it('rejects each bad argument with its error code and stores nothing', async () => {
        const { store } = await setup({ maxRecordBytes: 1024 })
        await store.createStream('t/s', { partitions: 2 })
        await store.append('t/s', 'k', { payload: payloadOf(0) })
        const p = store.partitionFor('t/s', 'k')
        const cases: Array<[string, () => Promise<unknown>, string]> = [
          ['unknown stream', () => store.append('t/nope', 'k', { payload: payloadOf(1) }), 'STORE_UNKNOWN_STREAM'],
          ['unknown stream read', () => store.read('t/nope', 0, 0), 'STORE_UNKNOWN_STREAM'],
          ['bad stream name', () => store.createStream('no-tenant', { partitions: 1 }), 'STORE_INVALID_NAME'],
          ['bad stream name on append', () => store.append('../x', 'k', { payload: payloadOf(1) }), 'STORE_INVALID_NAME'],
          ['zero partitions', () => store.createStream('t/z', { partitions: 0 }), 'STORE_INVALID_ARGUMENT'],
          ['record over maxRecordBytes', () => store.append('t/s', 'k', { payload: Buffer.alloc(1025) }), 'STORE_RECORD_TOO_LARGE'],
          ['string payload', () => store.append('t/s', 'k', { payload: 'text' as unknown as Uint8Array }), 'STORE_INVALID_RECORD'],
          ['missing payload', () => store.append('t/s', 'k', {} as unknown as { payload: Uint8Array }), 'STORE_INVALID_RECORD'],
          ['non-string key', () => store.append('t/s', 7 as unknown as string, { payload: payloadOf(1) }), 'STORE_INVALID_RECORD'],
          ['bad qos', () => store.append('t/s', 'k', { payload: payloadOf(1), qos: 3 as 0 }), 'STORE_INVALID_RECORD'],
          ['non-string header', () => store.append('t/s', 'k', { payload: payloadOf(1), headers: { a: 1 } as unknown as Record<string, string> }), 'STORE_INVALID_RECORD'],
          ['negative offset', () => store.read('t/s', p, -1), 'STORE_INVALID_OFFSET'],
          ['fractional offset', () => store.read('t/s', p, 1.5), 'STORE_INVALID_OFFSET'],
          ['NaN offset', () => store.commitOffset('g', 't/s', p, Number.NaN), 'STORE_INVALID_OFFSET'],
          ['offset past the end', () => store.read('t/s', p, 2), 'STORE_OFFSET_OUT_OF_RANGE'],
          ['commit past the end', () => store.commitOffset('g', 't/s', p, 5), 'STORE_OFFSET_OUT_OF_RANGE'],
          ['partition out of range', () => store.read('t/s', 2, 0), 'STORE_INVALID_PARTITION'],
          ['bad maxRecords', () => store.read('t/s', p, 0, { maxRecords: 0 }), 'STORE_INVALID_ARGUMENT'],
          ['batches past the end', () => store.readBatches('t/s', p, 2), 'STORE_OFFSET_OUT_OF_RANGE'],
          ['columns past the end', () => store.readColumns('t/s', p, 2), 'STORE_OFFSET_OUT_OF_RANGE'],
          ['columns at a fractional offset', () => store.readColumns('t/s', p, 0.5), 'STORE_INVALID_OFFSET'],
          ['columns with a bad maxBytes', () => store.readColumns('t/s', p, 0, { maxBytes: 0 }), 'STORE_INVALID_ARGUMENT'],
          ['columns of an unknown stream', () => store.readColumns('t/nope', 0, 0), 'STORE_UNKNOWN_STREAM'],
          ['batches at a negative offset', () => store.readBatches('t/s', p, -1), 'STORE_INVALID_OFFSET'],
          ['batches with a bad endOffset', () => store.readBatches('t/s', p, 0, { endOffset: 0.5 }), 'STORE_INVALID_OFFSET'],
          ['batches with a bad maxBytes', () => store.readBatches('t/s', p, 0, { maxBytes: 0 }), 'STORE_INVALID_ARGUMENT'],
          ['batches of an unknown stream', () => store.readBatches('t/nope', 0, 0), 'STORE_UNKNOWN_STREAM'],
          ['bad timestamp', () => store.offsetForTime('t/s', p, Number.POSITIVE_INFINITY), 'STORE_INVALID_ARGUMENT'],
          ['bad group name', () => store.commitOffset('', 't/s', p, 0), 'STORE_INVALID_NAME'],
          ['bad reset', () => store.resetGroup('g', 't/s', { to: 'yesterday' } as unknown as { to: 'latest' }), 'STORE_INVALID_ARGUMENT'],
          ['unknown group delete', () => store.deleteGroup('ghost'), 'STORE_UNKNOWN_GROUP'],
          ['empty dedupe id', () => store.append('t/s', 'k', { payload: payloadOf(1) }, { dedupeId: '' }), 'STORE_INVALID_ARGUMENT'],
        ]
        for (const [what, call, code] of cases) {
          await expect(call(), what).rejects.toMatchObject({ code, name: 'StoreError' })
        }
        expect(store.partitionInfo('t/s', p).logEndOffset).toBe(1)
        expect(store.partitionInfo('t/s', 1 - p).logEndOffset).toBe(0)
        expect((await store.read('t/s', p, 0)).records).toHaveLength(1)
      })
    })
  })
}
