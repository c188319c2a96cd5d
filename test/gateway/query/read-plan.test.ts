/**
 * The one read path (gateway/query/read-plan.ts) without sockets: parsing
 * positions and times, range and partition checks, the record filter, range
 * placement on a memory-level store (empty streams, times before the first
 * record and after the last, starts outside the log under both policies,
 * groups) and the chunked reader (filters, room, pending times, CPU slices,
 * retention gaps). The surfaces that use it are compared with each other in
 * surfaces.int.test.ts.
 */
import { MemoryLevel } from 'memory-level'
import { afterEach, describe, expect, it } from 'vitest'
import { isQueryError } from '../../../gateway/query/errors.ts'
import {
  checkRange, compileRecordFilter, parsePosition, parseTime, PartitionReader, planRead, placePending, readRange, resolveRange, selectPartitions,
  type PartitionRange, type ReadChunk, type ReadRange, type Room,
} from '../../../gateway/query/read-plan.ts'
import { openLogStore, partitionForKey, type LevelDatabase, type LogStore, type StoredRecord } from '../../../store/index.ts'

const NOW = Date.UTC(2026, 10, 24, 12)
const STREAM = 'acme/telemetry'
const NAMES = { startOffset: 'offset', endOffset: 'endOffset', startTime: 'from', endTime: 'to' }

/** The error's code (QueryError, FilterExpressionError), or undefined when `fn` does not throw. */
async function codeOf (fn: () => unknown): Promise<string | undefined> {
  try {
    await fn()
  } catch (err) {
    return (err as { code?: string }).code ?? 'no code'
  }
  return undefined
}

const stores: LogStore[] = []
afterEach(async () => { for (const s of stores.splice(0)) await s.close() })

async function openStore (partitions = 1, options: { retentionMs?: number, now?: () => number } = {}): Promise<LogStore> {
  const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
  const clock = options.now === undefined ? undefined : { now: options.now }
  const store = await openLogStore({ db: db as unknown as LevelDatabase, ...(clock === undefined ? {} : { clock }) })
  stores.push(store)
  await store.createStream(STREAM, { partitions, retentionMs: options.retentionMs ?? 0 })
  return store
}

/** Records i = from..to-1 on partition 0's key, timestamp T0 + 10 i, topic alternating temp/hum, payload {"i": i}, in batches of `batch`. */
const T0 = 1_000_000
async function seed (store: LogStore, from: number, to: number, batch = 7, key = 'dev-1'): Promise<void> {
  for (let i = from; i < to; i += batch) {
    await Promise.all(Array.from({ length: Math.min(batch, to - i) }, (_, k) => {
      const j = i + k
      const topic = `devices/${key}/telemetry/${j % 2 === 0 ? 'temp' : 'hum'}`
      return store.append(STREAM, key, { payload: Buffer.from(`{"i":${j}}`), timestamp: T0 + 10 * j, topic })
    }))
  }
}

const ids = (records: readonly StoredRecord[]): number[] => records.map((r) => (JSON.parse(Buffer.from(r.payload).toString()) as { i: number }).i)

/** Steps the reader until it stops for good (range) or catches up (log); every record, and the last stop. */
async function drain (reader: PartitionReader, room?: Room): Promise<{ records: StoredRecord[], stops: Array<ReadChunk['stop']> }> {
  const records: StoredRecord[] = []
  const stops: Array<ReadChunk['stop']> = []
  for (let i = 0; i < 10_000; i++) {
    const chunk = await reader.step(room)
    records.push(...chunk.records)
    stops.push(chunk.stop)
    if (chunk.stop === 'range' || chunk.stop === 'log') return { records, stops }
  }
  throw new Error('the reader did not stop')
}

const open = { outside: 'fail', snapshot: false } as const
const snapshot = { outside: 'fail', snapshot: true } as const

describe('parsing', () => {
  it('reads times as the API documents them, and names the value in QUERY_BAD_TIME', async () => {
    expect(parseTime('2024-05-01T04:00:00.250+02:00', NOW, 'from')).toBe(Date.UTC(2024, 4, 1, 2, 0, 0, 250))
    expect(parseTime('-15m', NOW, 'from')).toBe(NOW - 15 * 60_000)
    expect(parseTime('1714528800000', NOW, 'from')).toBe(1714528800000)
    for (const bad of ['yesterday', '2024-05-01T02:00', '2024-02-30', '-3w', '', '99999999999999999']) {
      expect(await codeOf(() => parseTime(bad, NOW, 'to')), bad).toBe('QUERY_BAD_TIME')
    }
    try { parseTime('yesterday', NOW, '--to') } catch (err) { expect(isQueryError(err) && err.details.name).toBe('--to') }
  })

  it('reads a position: earliest and latest as a start only, an integer as an offset, @ms and times', async () => {
    const start = { name: 'start', start: true }
    const end = { name: 'end', start: false }
    expect(parsePosition('earliest', NOW, start)).toEqual({ kind: 'earliest' })
    expect(parsePosition('latest', NOW, start)).toEqual({ kind: 'latest' })
    expect(parsePosition('17', NOW, end)).toEqual({ kind: 'offset', offset: 17 })
    expect(parsePosition('@1714528800000', NOW, end)).toEqual({ kind: 'time', timestamp: 1714528800000 })
    expect(parsePosition('-1h', NOW, start)).toEqual({ kind: 'time', timestamp: NOW - 3_600_000 })
    expect(await codeOf(() => parsePosition('latest', NOW, end))).toBe('QUERY_BAD_TIME')
    expect(await codeOf(() => parsePosition('', NOW, start))).toBe('QUERY_BAD_TIME')
    expect(await codeOf(() => parsePosition('@', NOW, start))).toBe('QUERY_BAD_TIME')
    expect(await codeOf(() => parsePosition('12345678901234567890', NOW, start))).toBe('QUERY_BAD_POSITION')
    expect(await codeOf(() => parsePosition('-5', NOW, start))).toBe('QUERY_BAD_TIME')
  })

  it('compiles keys, topic filters and where into one predicate, and refuses bad filters', async () => {
    expect(compileRecordFilter({ keys: [], topics: [], where: undefined })).toBeNull()
    const f = compileRecordFilter({ keys: ['a', 'b'], topics: ['devices/+/telemetry/#'], where: 't > 1' })
    const rec = (key: string, topic: string, t: number): StoredRecord =>
      ({ offset: 0, timestamp: 0, key, topic, qos: 0, clientId: key, headers: null, payload: Buffer.from(JSON.stringify({ t })) })
    expect(f?.(rec('a', 'devices/a/telemetry/x', 2))).toBe(true)
    expect(f?.(rec('c', 'devices/c/telemetry/x', 2))).toBe(false)
    expect(f?.(rec('a', 'devices/a/events/x', 2))).toBe(false)
    expect(f?.(rec('a', 'devices/a/telemetry/x', 1))).toBe(false)
    expect(compileRecordFilter({ keys: [], topics: [], where: (doc) => (doc as { t: number }).t === 5 })?.(rec('a', 'x', 5))).toBe(true)
    for (const topic of ['a/#/b', '', 'a+']) {
      expect(await codeOf(() => compileRecordFilter({ keys: [], topics: [topic], where: undefined })), topic).toBe('QUERY_BAD_TOPIC_FILTER')
    }
    expect(await codeOf(() => compileRecordFilter({ keys: [], topics: [], where: 'temp > > 3' }))).toBe('FILTER_SYNTAX')
  })
})

describe('checks', () => {
  it('refuses an end before the start of the same kind, and nothing else', async () => {
    expect(await codeOf(() => checkRange({ start: { kind: 'offset', offset: 10 }, endOffset: 9, endTime: null }, NAMES))).toBe('QUERY_BAD_RANGE')
    expect(await codeOf(() => checkRange({ start: { kind: 'time', timestamp: 10 }, endOffset: null, endTime: 9 }, NAMES))).toBe('QUERY_BAD_RANGE')
    expect(() => checkRange({ start: { kind: 'offset', offset: 10 }, endOffset: 10, endTime: 9 }, NAMES)).not.toThrow()
    expect(() => checkRange({ start: { kind: 'time', timestamp: 10 }, endOffset: 3, endTime: 10 }, NAMES)).not.toThrow()
    expect(() => checkRange(readRange({ kind: 'latest' }, { kind: 'offset', offset: 0 }), NAMES)).not.toThrow()
    let message = ''
    try { checkRange({ start: { kind: 'offset', offset: 5 }, endOffset: 4, endTime: null }, NAMES) } catch (err) { message = (err as Error).message }
    expect(message).toBe('endOffset 4 is before offset 5')
    expect(await codeOf(() => readRange(undefined, { kind: 'latest' }))).toBe('QUERY_BAD_POSITION')
    expect(readRange(undefined, undefined)).toEqual({ start: { kind: 'earliest' }, endOffset: null, endTime: null })
  })

  it('picks the partition asked for, those of the keys, or all; refuses unknown partitions', async () => {
    expect(selectPartitions('s', 4, {})).toEqual([0, 1, 2, 3])
    expect(selectPartitions('s', 4, { partition: 3 })).toEqual([3])
    const keys = ['dev-1', 'dev-2', 'dev-3', 'dev-1']
    expect(selectPartitions('s', 8, { keys })).toEqual([...new Set(keys.map((k) => partitionForKey(k, 8)))].sort((a, b) => a - b))
    for (const partition of [4, -1, 1.5]) expect(await codeOf(() => selectPartitions('s', 4, { partition })), String(partition)).toBe('QUERY_UNKNOWN_PARTITION')
  })
})

describe('placing a range on a partition', () => {
  it('an empty stream: every start is offset 0, a time stays pending, a snapshot is empty', async () => {
    const store = await openStore()
    for (const start of [{ kind: 'earliest' }, { kind: 'latest' }, { kind: 'offset', offset: 0 }] as const) {
      expect(await resolveRange(store, STREAM, 0, readRange(start, undefined), open)).toMatchObject({ start: 0, end: Infinity, fromTime: null, toTime: null })
      expect(await resolveRange(store, STREAM, 0, readRange(start, undefined), snapshot)).toMatchObject({ start: 0, end: 0 })
    }
    const byTime = await resolveRange(store, STREAM, 0, { start: { kind: 'time', timestamp: T0 }, endOffset: null, endTime: T0 + 50 }, open)
    expect(byTime).toMatchObject({ start: 0, end: Infinity, fromTime: T0, toTime: T0 + 50 })
    expect((await drain(new PartitionReader(store, byTime))).stops.at(-1)).toBe('log')
    expect((await drain(new PartitionReader(store, await resolveRange(store, STREAM, 0, readRange(undefined, undefined), snapshot)))).stops).toEqual(['range'])
    expect(await codeOf(() => resolveRange(store, STREAM, 0, readRange({ kind: 'offset', offset: 1 }, undefined), open))).toBe('QUERY_OFFSET_OUT_OF_RANGE')
  })

  it('a time before the first record starts at the log start; one after the last, at the log end with the time pending', async () => {
    const store = await openStore()
    await seed(store, 0, 30)
    const before = await resolveRange(store, STREAM, 0, { start: { kind: 'time', timestamp: 0 }, endOffset: null, endTime: 1 }, open)
    expect(before).toMatchObject({ start: 0, end: 0, fromTime: null, toTime: null })
    const after = await resolveRange(store, STREAM, 0, { start: { kind: 'time', timestamp: T0 + 10_000 }, endOffset: null, endTime: null }, open)
    expect(after).toMatchObject({ start: 30, end: Infinity, fromTime: T0 + 10_000 })
    expect(await resolveRange(store, STREAM, 0, readRange({ kind: 'time', timestamp: T0 + 10_000 }, undefined), snapshot)).toMatchObject({ start: 30, end: 30 })
    // A pending start skips older records as they arrive, and keeps the first at or after it.
    const reader = new PartitionReader(store, after)
    await seed(store, 30, 40) // older than the start time
    expect((await drain(reader)).records).toEqual([])
    await seed(store, 1000, 1003)
    expect(ids((await drain(reader)).records)).toEqual([1000, 1001, 1002])
  })

  it('places a time range exactly: from the first record at or after from, to the first at or after to (exclusive)', async () => {
    const store = await openStore()
    await seed(store, 0, 100, 9)
    const range = await resolveRange(store, STREAM, 0, { start: { kind: 'time', timestamp: T0 + 205 }, endOffset: null, endTime: T0 + 500 }, open)
    expect(range).toMatchObject({ start: 21, end: 50, fromTime: null, toTime: null })
    expect(ids((await drain(new PartitionReader(store, range, { chunkRecords: 4 }))).records)).toEqual(Array.from({ length: 29 }, (_, i) => 21 + i))
    // Both ends: the earlier wins.
    expect(await resolveRange(store, STREAM, 0, { start: { kind: 'earliest' }, endOffset: 40, endTime: T0 + 500 }, open)).toMatchObject({ start: 0, end: 40 })
    // An end before the start is the start.
    expect(await resolveRange(store, STREAM, 0, { start: { kind: 'offset', offset: 60 }, endOffset: null, endTime: T0 }, open))
      .toMatchObject({ start: 60, end: 60 })
  })

  it('an end time after the last record stays pending on an open range, and ends it at the first record at or after it', async () => {
    const store = await openStore()
    await seed(store, 0, 10)
    const range = await resolveRange(store, STREAM, 0, { start: { kind: 'earliest' }, endOffset: null, endTime: T0 + 150 }, open)
    expect(range).toMatchObject({ start: 0, end: Infinity, toTime: T0 + 150 })
    expect(await resolveRange(store, STREAM, 0, { start: { kind: 'earliest' }, endOffset: null, endTime: T0 + 150 }, snapshot))
      .toMatchObject({ end: 10, toTime: null })
    const reader = new PartitionReader(store, range)
    expect(ids((await drain(reader)).records)).toEqual(Array.from({ length: 10 }, (_, i) => i))
    await seed(store, 10, 20)
    const rest = await drain(reader)
    expect(ids(rest.records)).toEqual([10, 11, 12, 13, 14])
    expect(rest.stops.at(-1)).toBe('range')
    expect(reader.end).toBe(15)
    // Batch readers place it again instead.
    expect(await placePending(store, range)).toMatchObject({ start: 0, end: 15, toTime: null })
  })

  it('refuses a start outside the log, or clamps it into the log', async () => {
    const store = await openStore()
    await seed(store, 0, 10)
    const err = await resolveRange(store, STREAM, 0, readRange({ kind: 'offset', offset: 11 }, undefined), open).catch((e: unknown) => e)
    expect(isQueryError(err, 'QUERY_OFFSET_OUT_OF_RANGE') && err.details)
      .toEqual({ stream: STREAM, partition: 0, offset: 11, logStartOffset: 0, logEndOffset: 10 })
    expect(await resolveRange(store, STREAM, 0, readRange({ kind: 'offset', offset: 10 }, undefined), open)).toMatchObject({ start: 10 })
    const clamped = readRange({ kind: 'offset', offset: 11 }, { kind: 'offset', offset: 500 })
    expect(await resolveRange(store, STREAM, 0, clamped, { outside: 'clamp', snapshot: true }))
      .toMatchObject({ start: 10, end: 10 })
  })

  it('starts a group at its committed offset, or the log start', async () => {
    const store = await openStore()
    await seed(store, 0, 10)
    expect(await resolveRange(store, STREAM, 0, readRange({ kind: 'group', group: 'acme/g' }, undefined), open)).toMatchObject({ start: 0 })
    await store.commitOffset('acme/g', STREAM, 0, 7)
    expect(await resolveRange(store, STREAM, 0, readRange({ kind: 'group', group: 'acme/g' }, undefined), open)).toMatchObject({ start: 7 })
  })

  it('plans every partition in the order given, with the range placed on each', async () => {
    const store = await openStore(4)
    for (const key of ['a', 'b', 'c', 'd', 'e']) await seed(store, 0, 5, 5, key)
    const range: ReadRange = { start: { kind: 'offset', offset: 2 }, endOffset: 4, endTime: null }
    const plan = await planRead(store, STREAM, [3, 1], range, { outside: 'clamp', snapshot: true })
    expect(plan.map((p) => p.partition)).toEqual([3, 1])
    for (const p of plan) {
      const { logEndOffset } = store.partitionInfo(STREAM, p.partition)
      expect(p).toMatchObject({ stream: STREAM, start: Math.min(2, logEndOffset), end: Math.min(4, logEndOffset) })
    }
  })
})

describe('the reader', () => {
  async function filled (n = 50): Promise<{ store: LogStore, range: PartitionRange }> {
    const store = await openStore()
    await seed(store, 0, n, 6)
    return { store, range: await resolveRange(store, STREAM, 0, readRange(undefined, undefined), open) }
  }

  it('reads in chunks, keeps what the filter accepts, and stops at the log end of an open range', async () => {
    const { store, range } = await filled()
    const filter = compileRecordFilter({ keys: [], topics: ['devices/+/telemetry/temp'], where: 'i >= 10' })
    const reader = new PartitionReader(store, range, { filter, chunkRecords: 8 })
    const { records, stops } = await drain(reader)
    expect(ids(records)).toEqual(Array.from({ length: 20 }, (_, i) => 10 + 2 * i))
    expect(stops.length).toBeGreaterThan(5)
    expect(stops.at(-1)).toBe('log')
    expect(reader.next).toBe(50)
  })

  it('fills no more than the room, and takes one record larger than the room when nothing is in it yet', async () => {
    const { store, range } = await filled()
    const reader = new PartitionReader(store, range)
    const first = await reader.step({ records: 3, bytes: 1_000_000, first: true })
    expect([ids(first.records), first.stop]).toEqual([[0, 1, 2], 'limit'])
    const tiny = await reader.step({ records: 100, bytes: 1, first: true })
    expect([ids(tiny.records), tiny.stop]).toEqual([[3], null]) // the read was bounded by the room: the caller steps again

    const none = await reader.step({ records: 100, bytes: 1, first: false })
    expect([none.records.length, none.stop, reader.next]).toEqual([0, 'limit', 4])
  })

  it('ticks the CPU slice for every record examined and yields when it says so', async () => {
    const { store, range } = await filled()
    let ticks = 0
    let yields = 0
    const slice = { tick: () => ++ticks % 10 === 0, yield: async () => { yields++ } }
    await drain(new PartitionReader(store, range, { filter: () => false, slice }))
    expect([ticks, yields]).toEqual([50, 5])
  })

  it('goes on live once a snapshot is opened', async () => {
    const { store } = await filled(10)
    const reader = new PartitionReader(store, await resolveRange(store, STREAM, 0, readRange({ kind: 'offset', offset: 5 }, undefined), snapshot))
    expect(ids((await drain(reader)).records)).toEqual([5, 6, 7, 8, 9])
    await seed(store, 10, 12)
    expect((await drain(reader)).stops).toEqual(['range'])
    reader.openEnd()
    expect(ids((await drain(reader)).records)).toEqual([10, 11])
  })

  it('skips what retention deleted before it got there, with onGap; fails with the store\'s error without it', async () => {
    let now = T0 + 1000
    const store = await openStore(1, { retentionMs: 5000, now: () => now })
    await seed(store, 0, 20, 10)
    const range = await resolveRange(store, STREAM, 0, readRange(undefined, undefined), open)
    const gaps: number[] = []
    const skipping = new PartitionReader(store, range, { onGap: (n) => gaps.push(n) })
    const failing = new PartitionReader(store, range)
    now = T0 + 200 + 5001 // the first batch (records 0-9, up to T0 + 90) is older than retention allows; the second is not
    await store.enforceRetention()
    const { logStartOffset } = store.partitionInfo(STREAM, 0)
    expect(logStartOffset).toBeGreaterThan(0)
    expect(ids((await drain(skipping)).records)).toEqual(Array.from({ length: 20 - logStartOffset }, (_, i) => logStartOffset + i))
    expect(gaps).toEqual([logStartOffset])
    expect(await codeOf(() => failing.step())).toBe('STORE_OFFSET_OUT_OF_RANGE')
  })
})
