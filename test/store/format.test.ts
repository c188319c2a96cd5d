import { describe, expect, it } from 'vitest'
import { decodeBatch, encodeBatch, readBatchHeader, type PendingRecord } from '../../store/format.ts'

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
