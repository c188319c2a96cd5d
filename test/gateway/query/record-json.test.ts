/**
 * The bytes record-json.ts writes must be exactly JSON.stringify's, for every
 * kind of payload a device can send and every field value the store holds.
 */
import { describe, expect, it } from 'vitest'
import { RecordJson, type PayloadEncoding } from '../../../gateway/query/record-json.ts'
import type { StoredRecord } from '../../../store/index.ts'

/** What the API promised before record-json.ts existed: JSON.stringify of the fields, invalid UTF-8 as U+FFFD. */
function reference (r: StoredRecord, encoding: PayloadEncoding): string {
  const doc: Record<string, unknown> = { offset: r.offset, timestamp: r.timestamp, key: r.key, topic: r.topic, qos: r.qos, clientId: r.clientId }
  if (r.headers !== null) doc.headers = r.headers
  doc.payload = Buffer.from(r.payload).toString(encoding)
  return JSON.stringify(doc)
}

const PAYLOADS: Array<[string, Uint8Array]> = [
  ['JSON', Buffer.from('{"temp":21.5,"site":"a \\"b\\""}')],
  ['empty', Buffer.alloc(0)],
  ['every control character, quote, backslash and DEL', Buffer.from(Array.from({ length: 0x20 }, (_, b) => b).concat([0x22, 0x5c, 0x7f, 0x41]))],
  ['multibyte UTF-8, U+2028 and an emoji', Buffer.from('é ü 中文 \u2028 \u2029 😀')],
  ['a lone continuation byte', Buffer.from([0x41, 0x80, 0x42])],
  ['0xff', Buffer.from([0xff])],
  ['a truncated sequence', Buffer.from([0xe4, 0xb8])],
  ['an overlong slash', Buffer.from([0xc0, 0xaf])],
  ['an encoded surrogate', Buffer.from([0xed, 0xa0, 0x80])],
  ['random bytes', Buffer.from(Array.from({ length: 300 }, (_, i) => (i * 73 + 11) & 0xff))],
  // A view into a larger buffer, as decoded batches hand them out.
  ['a view', new Uint8Array(Buffer.from('xx{"a":"\\n"}yy').buffer, 2, 10)],
]

function record (i: number, payload: Uint8Array, extra: Partial<StoredRecord> = {}): StoredRecord {
  const device = `dev-${i % 3}`
  return {
    offset: i, timestamp: 1_764_028_800_123 + i, key: device, topic: `devices/${device}/telemetry`, payload, qos: 1, clientId: device, headers: null, ...extra,
  }
}

describe('record JSON', () => {
  it('writes exactly JSON.stringify\'s bytes for every payload, in both encodings', () => {
    for (const encoding of ['utf8', 'base64'] as const) {
      const json = new RecordJson(encoding)
      const records = PAYLOADS.map(([, p], i) => record(i, p))
      expect(json.encode(records).toString('utf8')).toBe(records.map((r) => `${reference(r, encoding)}\n`).join(''))
      for (const [what, p] of PAYLOADS) {
        const r = record(5, p)
        expect(json.encode([r]).toString('utf8'), what).toBe(`${reference(r, encoding)}\n`)
      }
    }
  })

  it('writes every field value the store can hold: numbers of any size, headers, names needing escapes', () => {
    const json = new RecordJson('utf8')
    const odd: StoredRecord[] = [
      record(0, Buffer.from('a'), { timestamp: 0 }),
      record(9, Buffer.from('a'), { timestamp: 9 }),
      record(10, Buffer.from('a'), { timestamp: 99_999_999 }),
      record(99_999_999, Buffer.from('a'), { timestamp: 100_000_000 }),
      record(100_000_000, Buffer.from('a'), { timestamp: 1_700_000_000_000.5 }),
      record(Number.MAX_SAFE_INTEGER, Buffer.from('a'), { timestamp: Number.MAX_SAFE_INTEGER }),
      record(1, Buffer.from('a'), { timestamp: 1e21 }),
      record(2, Buffer.from('a'), { headers: { 'content-type': 'application/json', 'x-"q"': 'é\n' } }),
      record(3, Buffer.from('a'), { key: 'k"\\\u0001', topic: 'a/"b"/ü', clientId: '', qos: 0 }),
      // Same topic, another key, client id and QoS: the cached part must not be reused.
      record(4, Buffer.from('a'), { key: 'other', topic: 'devices/dev-1/telemetry', clientId: 'c', qos: 2 }),
      record(4, Buffer.from('a'), { topic: 'devices/dev-1/telemetry' }),
    ]
    expect(json.encode(odd).toString('utf8')).toBe(odd.map((r) => `${reference(r, 'utf8')}\n`).join(''))
  })

  it('separates records with commas for a JSON array, and grows past its first estimate', () => {
    const json = new RecordJson('utf8')
    const records = Array.from({ length: 50 }, (_, i) => record(i, Buffer.alloc(i * 40, 0x01), { headers: { h: 'x'.repeat(i * 50) } }))
    expect(JSON.parse(`[${json.encode(records, 0x2c, true).toString('utf8')}]`)).toEqual(records.map((r) => JSON.parse(reference(r, 'utf8')) as unknown))
    expect(json.encode([], 0x2c, true).length).toBe(0)
  })
})
