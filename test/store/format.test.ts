import { readFileSync } from 'node:fs'
import { crc32 } from 'node:zlib'
import { Encoder } from 'cbor-x'
import { describe, expect, it } from 'vitest'
import { BATCH_HEADER_BYTES, BATCH_MAGIC, BATCH_MAGIC_HEADER_SETS, decodeBatch, decodeColumns, decodeMeta, decodeStoredBatch, encodeBatch, readBatchHeader, type PendingRecord } from '../../store/format.ts'
import type { StoredRecord } from '../../store/types.ts'

const where = { stream: 't/s', partition: 0, baseOffset: 500 }

function rec (timestamp: number, i: number, headers: Record<string, string> | null = null): PendingRecord {
  return { timestamp, key: `dev-${i % 3}`, topic: `devices/dev-${i % 3}/t`, payload: Buffer.from(`payload ${i}`), qos: (i % 3) as 0 | 1 | 2, clientId: `c${i % 2}`, headers }
}

describe('batch format', () => {
  it('round-trips every field, with the header describing the batch', () => {
    const records = [rec(1000, 0), rec(1002, 1, { a: 'b' }), rec(999, 2), rec(1001, 3)]
    const { value, header } = encodeBatch(500, records)
    expect(header).toMatchObject({ baseOffset: 500, count: 4, firstTimestamp: 1000, maxTimestamp: 1002, bytes: value.length })
    expect(readBatchHeader(value, where)).toEqual(header)
    const out = decodeBatch(value, header, where)
    expect(out.map((r) => r.offset)).toEqual([500, 501, 502, 503])
    for (const [i, r] of records.entries()) {
      expect({ ...out[i], payload: Buffer.from(out[i]!.payload) }).toEqual({ ...r, offset: 500 + i, payload: r.payload })
    }
  })

  it('keeps timestamps exact when records in one batch are years apart', () => {
    const far = [rec(0, 0), rec(2 ** 40, 1), rec(5, 2)]
    const { value, header } = encodeBatch(500, far)
    expect(decodeBatch(value, header, where).map((r) => r.timestamp)).toEqual([0, 2 ** 40, 5])
  })

  it('encodes a slice of a queue in place', () => {
    const queue = [rec(1, 0), rec(2, 1), rec(3, 2), rec(4, 3)]
    const { value, header } = encodeBatch(500, queue, 1, 3)
    expect(decodeBatch(value, header, where).map((r) => r.timestamp)).toEqual([2, 3])
  })

  it('reports a damaged batch with STORE_CORRUPT_BATCH, naming where it is', () => {
    const { value } = encodeBatch(500, [rec(1, 0)])
    const flipped = Buffer.from(value)
    flipped[flipped.length - 1] = (flipped[flipped.length - 1] as number) ^ 1
    expect(() => readBatchHeader(flipped, where)).toThrow(expect.objectContaining({ code: 'STORE_CORRUPT_BATCH', details: { stream: 't/s', partition: 0, baseOffset: 500 } }))
    expect(() => readBatchHeader(value, { ...where, baseOffset: 501 })).toThrow(expect.objectContaining({ code: 'STORE_CORRUPT_BATCH' }))
    expect(() => readBatchHeader(value.subarray(0, 10), where)).toThrow(expect.objectContaining({ code: 'STORE_CORRUPT_BATCH' }))
  })
})

interface FixtureCase { name: string, baseOffset: number, batch: string, records: Array<Omit<StoredRecord, 'payload'> & { payload: string }> }
const e1 = JSON.parse(readFileSync(new URL('./fixtures/batches-e1.json', import.meta.url), 'utf8')) as { cases: FixtureCase[] }

/** A record as plain data, payload as a Buffer, so toEqual compares values. */
const plain = (r: StoredRecord): unknown => ({ ...r, payload: Buffer.from(r.payload), headers: r.headers === null ? null : { ...r.headers } })

/** Rewrites a batch's body and its CRC: a well-formed batch with the body a writer gone wrong would leave. */
function withBody (value: Buffer, body: unknown[]): Buffer {
  const encoded = new Encoder({ useRecords: false, structuredClone: false, mapsAsObjects: true, variableMapSize: true }).encode(body)
  const out = Buffer.concat([value.subarray(0, BATCH_HEADER_BYTES), encoded])
  out.writeUInt32BE(crc32(out.subarray(5)), 1)
  return out
}

/** Deterministic PRNG (mulberry32), so a failing case can be replayed from its seed. */
function prng (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

describe('headers in batches', () => {
  it('still reads batches written before header interning (0xE1, one map per record), record for record', () => {
    expect(e1.cases.length).toBeGreaterThan(0)
    for (const c of e1.cases) {
      const bytes = Buffer.from(c.batch, 'hex')
      expect(bytes[0]).toBe(BATCH_MAGIC)
      const records = decodeStoredBatch(bytes, { stream: 't/s', partition: 0 })
      expect(records.map(plain), c.name).toEqual(c.records.map((r) => ({ ...r, payload: Buffer.from(r.payload, 'base64') })))
    }
  })

  it('writes a batch without headers byte for byte as before, so older readers still read it', () => {
    const c = e1.cases.find((x) => x.records.every((r) => r.headers === null)) as FixtureCase
    const records: PendingRecord[] = c.records.map(({ offset: _offset, ...r }) => ({ ...r, payload: Buffer.from(r.payload, 'base64') }))
    expect(encodeBatch(c.baseOffset, records).value.toString('hex')).toBe(c.batch)
  })

  it('stores the same header on every record in a few bytes per record', () => {
    const none = Array.from({ length: 1000 }, (_, i) => rec(i, i))
    const named = none.map((r) => ({ ...r, headers: { 'edgemq-user': `user-${r.key}` } }))
    const plainBatch = encodeBatch(0, none).value
    const namedBatch = encodeBatch(0, named).value
    expect(namedBatch[0]).toBe(BATCH_MAGIC_HEADER_SETS)
    // One index per record (2 bytes) plus, once per distinct user, the set and its strings.
    expect(namedBatch.length - plainBatch.length).toBeLessThan(1000 * 2 + 100)
    expect(decodeStoredBatch(namedBatch).map((r) => r.headers)).toEqual(named.map((r) => r.headers))
  })

  it('round-trips random headers, shared and distinct, through decodeStoredBatch', () => {
    const names = ['edgemq-user', 'edgemq-origin', 'a', '', '__proto__', 'constructor', 'ünï ✓', 'k\u0000x', '0', '1:x']
    for (let seed = 1; seed <= 200; seed++) {
      const rand = prng(seed)
      const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)] as T
      const value = (): string => pick(['alice', 'bob', '', 'x:1', '1:x', 'ü✓', 'a\u0000b', 'y'.repeat(Math.floor(rand() * 300))])
      const pool: Array<Record<string, string> | null> = [null]
      for (let k = 0; k < 1 + Math.floor(rand() * 5); k++) {
        const h: Record<string, string> = {}
        for (let j = Math.floor(rand() * 4); j > 0; j--) Object.defineProperty(h, pick(names), { value: value(), enumerable: true, writable: true, configurable: true })
        pool.push(h)
      }
      const count = 1 + Math.floor(rand() * 60)
      // Shared objects (as a producer's constant headers) and equal but distinct ones.
      const records = Array.from({ length: count }, (_, i) => {
        const h = pick(pool)
        return rec(i, i, h === null || rand() < 0.5 ? h : { ...h })
      })
      const { value: bytes } = encodeBatch(seed * 1000, records)
      const decoded = decodeStoredBatch(bytes)
      expect(decoded.map(plain), `seed ${seed}`).toEqual(records.map((r, i) => ({ ...r, offset: seed * 1000 + i, payload: Buffer.from(r.payload) })))
      for (const [i, r] of decoded.entries()) {
        expect(r.headers === null ? null : Object.keys(r.headers), `seed ${seed} record ${i} header order`).toEqual(records[i]!.headers === null ? null : Object.keys(records[i]!.headers!))
      }
    }
  })

  it('refuses a header set naming a string the batch does not hold, and a magic it does not know, with STORE_CORRUPT_BATCH', () => {
    const { value } = encodeBatch(0, [rec(1, 0, { 'edgemq-user': 'alice' })])
    const body = decodeMeta<unknown[]>(value.subarray(BATCH_HEADER_BYTES))
    const strings = body[1] as string[]
    expect(() => decodeStoredBatch(withBody(value, [...body.slice(0, 9), [[0, strings.length]], body[10]]))).toThrow(expect.objectContaining({ code: 'STORE_CORRUPT_BATCH' }))
    expect(() => decodeStoredBatch(withBody(value, [...body.slice(0, 9), [], body[10]]))).toThrow(expect.objectContaining({ code: 'STORE_CORRUPT_BATCH' }))
    const unknown = Buffer.from(value)
    unknown[0] = 0xe3
    expect(() => decodeStoredBatch(unknown)).toThrow(expect.objectContaining({ code: 'STORE_CORRUPT_BATCH' }))
  })
})

describe('batch columns', () => {
  it('give every field of every record without decoding records, topics and header sets numbered per batch', () => {
    const records = [rec(1000, 0, { a: 'b' }), rec(1002, 1), rec(999, 2, { a: 'b' }), rec(1001, 3, { a: 'c' }), rec(2 ** 40, 4)]
    const { value, header } = encodeBatch(500, records)
    const columns = decodeColumns(value, header, where)
    expect(columns).toMatchObject({ baseOffset: 500, count: 5, start: 0, end: 5 })
    for (const [i, r] of records.entries()) {
      const start = columns.payloadStart(i)
      expect({
        timestamp: columns.timestamp(i), key: columns.key(i), topic: columns.topic(i), qos: columns.qos(i), clientId: columns.clientId(i),
        payload: Buffer.from(columns.payloadBytes.subarray(start, start + columns.payloadLength(i))), headers: columns.headers(i),
      }).toEqual({ ...r, payload: Buffer.from(r.payload) })
      expect(plain(columns.record(i))).toEqual(plain(decodeBatch(value, header, where)[i]!))
    }
    // Records 0 and 3 share a topic (dev-0), 1 and 4 too; 0 and 2 share a header set, 3 has another, 1 and 4 none.
    expect(columns.topicIndex(0)).toBe(columns.topicIndex(3))
    expect(columns.topicIndex(0)).not.toBe(columns.topicIndex(1))
    expect([0, 1, 2, 3, 4].map((i) => columns.headerSet(i) === 0)).toEqual([false, true, false, false, true])
    expect(columns.headerSet(0)).toBe(columns.headerSet(2))
    expect(columns.headerSet(0)).not.toBe(columns.headerSet(3))
    expect(columns.headers(0)).toBe(columns.headers(2))
  })

  it('read batches written before header interning (0xE1, one map per record), record for record', () => {
    for (const c of e1.cases) {
      const value = Buffer.from(c.batch, 'hex')
      const at = { stream: 't/s', partition: 0, baseOffset: c.baseOffset }
      const columns = decodeColumns(value, readBatchHeader(value, at), at)
      expect(Array.from({ length: columns.count }, (_, i) => plain(columns.record(i))), c.name)
        .toEqual(c.records.map((r) => ({ ...r, payload: Buffer.from(r.payload, 'base64') })))
      for (let i = 0; i < columns.count; i++) expect(columns.headerSet(i) === 0, c.name).toBe(columns.headers(i) === null)
    }
  })

  it('refuse a damaged body with STORE_CORRUPT_BATCH: indexes past the strings, a QoS above 2, payloads past their bytes, columns of the wrong length', () => {
    const { value } = encodeBatch(500, [rec(1, 0), rec(2, 1)])
    const body = decodeMeta<unknown[]>(value.subarray(BATCH_HEADER_BYTES))
    const strings = (body[1] as string[]).length
    const header = readBatchHeader(value, where)
    const damaged: Array<[string, unknown[]]> = [
      ['topic index', body.map((c, k) => k === 4 ? Uint16Array.from([0, strings]) : c)],
      ['key index', body.map((c, k) => k === 3 ? Uint16Array.from([strings + 5, 0]) : c)],
      ['client index', body.map((c, k) => k === 5 ? Uint16Array.from([0, 65535]) : c)],
      ['QoS', body.map((c, k) => k === 6 ? Uint8Array.from([1, 3]) : c)],
      ['payload lengths', body.map((c, k) => k === 7 ? Uint32Array.from([5, 1000]) : c)],
      ['short column', body.map((c, k) => k === 4 ? Uint16Array.from([0]) : c)],
      ['empty columns', body.map((c, k) => k >= 2 && k <= 7 ? new Uint8Array(0) : c)],
    ]
    for (const [what, bad] of damaged) {
      const batch = withBody(value, bad)
      expect(() => decodeColumns(batch, header, where), what).toThrow(expect.objectContaining({ code: 'STORE_CORRUPT_BATCH', details: { stream: 't/s', partition: 0, baseOffset: 500 } }))
      expect(() => decodeStoredBatch(batch), what).toThrow(expect.objectContaining({ code: 'STORE_CORRUPT_BATCH' }))
    }
  })
})

describe('format version key', () => {
  it('is `V` in the log sublevel, a u64 (every data dir so far was written so; format.ts once said u32)', async () => {
    const { MemoryLevel } = await import('memory-level')
    const { openLogStore } = await import('../../store/index.ts')
    const db = new MemoryLevel()
    const store = await openLogStore({ db: db as never })
    await store.close()
    const log = db.sublevel<Buffer, Buffer>('log', { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    expect(await log.get(Buffer.from('V'))).toEqual(Buffer.from([0, 0, 0, 0, 0, 0, 0, 1]))
  })
})
