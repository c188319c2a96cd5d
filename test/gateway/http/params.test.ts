/**
 * Times and fetch parameters of the /v1 API, as pure functions: what the
 * routes' schemas cannot check (they are checked over HTTP in
 * schemas.int.test.ts).
 */
import { describe, expect, it } from 'vitest'
import { HTTP_ERROR_CODES, toApiError } from '../../../gateway/http/errors.ts'
import { parseTime } from '../../../gateway/http/params.ts'
import { parseRecordsRequest, type OutputFormat, type RecordsQuery } from '../../../gateway/http/records.ts'
import { FilterExpressionError } from '../../../gateway/query/filter-expression.ts'
import { StoreError } from '../../../store/index.ts'

const NOW = Date.UTC(2024, 4, 1, 12, 0, 0)

function codeOf (fn: () => unknown): string | undefined {
  try { fn() } catch (err) { return (err as { code?: string }).code }
  return undefined
}

describe('parseTime', () => {
  it('reads ISO 8601 with a zone, dates, epoch milliseconds, now and relative times', () => {
    expect(parseTime('2024-05-01T02:00:00Z', NOW, 'from')).toBe(Date.UTC(2024, 4, 1, 2))
    expect(parseTime('2024-05-01t02:00z', NOW, 'from')).toBe(Date.UTC(2024, 4, 1, 2))
    expect(parseTime('2024-05-01T04:00:00.250+02:00', NOW, 'from')).toBe(Date.UTC(2024, 4, 1, 2, 0, 0, 250))
    expect(parseTime('2024-05-01T00:30:00-0130', NOW, 'from')).toBe(Date.UTC(2024, 4, 1, 2))
    expect(parseTime('2024-05-01T02:00:00.123456789Z', NOW, 'from')).toBe(Date.UTC(2024, 4, 1, 2, 0, 0, 123))
    expect(parseTime('2024-02-29', NOW, 'from')).toBe(Date.UTC(2024, 1, 29))
    expect(parseTime('1714528800000', NOW, 'from')).toBe(1714528800000)
    expect(parseTime('0', NOW, 'from')).toBe(0)
    expect(parseTime('now', NOW, 'from')).toBe(NOW)
    expect(parseTime('-15m', NOW, 'from')).toBe(NOW - 15 * 60_000)
    expect(parseTime('-2h', NOW, 'from')).toBe(NOW - 2 * 3_600_000)
    expect(parseTime('-7d', NOW, 'from')).toBe(NOW - 7 * 86_400_000)
    expect(parseTime('-30s', NOW, 'from')).toBe(NOW - 30_000)
    expect(parseTime('-500ms', NOW, 'from')).toBe(NOW - 500)
  })

  it('refuses anything else with HTTP_BAD_TIME', () => {
    for (const bad of [
      '', 'yesterday', '2024-05-01T02:00:00', '2024-05-01 02:00:00Z', '2023-02-29', '2024-13-01', '2024-05-00', '2024-05-01T24:00Z',
      '2024-05-01T02:60Z', '2024-05-01T02:00+25:00', '-1.5h', '+1h', '-1w', '-1', '1e12', '99999999999999999', '1969-12-31',
      '-100000000d', 'NaN', ' 1', '0x10',
    ]) {
      expect(codeOf(() => parseTime(bad, NOW, 'from')), bad).toBe('HTTP_BAD_TIME')
    }
  })
})

describe('parseRecordsRequest', () => {
  const parse = (query: RecordsQuery, fallbackFormat: OutputFormat = 'json'): ReturnType<typeof parseRecordsRequest> =>
    parseRecordsRequest(query, NOW, fallbackFormat, (g) => `acme/${g}`)

  it('reads start, end, limits, filters and format', () => {
    expect(parse({}))
      .toMatchObject({ start: { kind: 'earliest' }, endOffset: null, toTime: null, format: 'json', payload: 'utf8', maxRecords: 1000, waitMs: 0 })
    expect(parse({ offset: 'latest', wait: 5 })).toMatchObject({ start: { kind: 'latest' }, waitMs: 5000 })
    expect(parse({ offset: '7', endOffset: 9, maxRecords: 2, maxBytes: 100 }))
      .toMatchObject({ start: { kind: 'offset', offset: 7 }, endOffset: 9, maxRecords: 2, maxBytes: 100 })
    expect(parse({ from: '-1h', to: 'now' }).start).toEqual({ kind: 'time', timestamp: NOW - 3_600_000 })
    expect(parse({ group: 'billing' }).start).toEqual({ kind: 'group', group: 'acme/billing' })
    expect(parse({ format: 'ndjson', payload: 'base64' })).toMatchObject({ format: 'ndjson', payload: 'base64', maxRecords: Number.MAX_SAFE_INTEGER })
    // Without a format parameter, the one the Accept header asked for; the parameter wins over it.
    expect(parse({}, 'ndjson').format).toBe('ndjson')
    expect(parse({ format: 'cbor' }, 'ndjson').format).toBe('cbor')
    const r = parse({ key: ['a', 'b'], topic: ['devices/+/telemetry/#'], where: 't > 1' })
    expect([...(r.keys ?? [])]).toEqual(['a', 'b'])
    expect(r.topicFilters).toEqual(['devices/+/telemetry/#'])
    expect(r.where?.({ t: 2 })).toBe(true)
  })

  it('gives each bad parameter its code', () => {
    const cases: ReadonlyArray<readonly [RecordsQuery, string]> = [
      [{ offset: '1', from: 'now' }, 'HTTP_BAD_REQUEST'],
      [{ offset: '9999999999999999' }, 'HTTP_BAD_REQUEST'],
      [{ from: 'yesterday' }, 'HTTP_BAD_TIME'],
      [{ to: '2024-05-01T02:00' }, 'HTTP_BAD_TIME'],
      [{ from: 'now', to: '-1h' }, 'HTTP_BAD_RANGE'],
      [{ offset: '5', endOffset: 4 }, 'HTTP_BAD_RANGE'],
      [{ maxRecords: 100_001 }, 'HTTP_BAD_REQUEST'],
      [{ maxBytes: 64 * 1024 * 1024 + 1 }, 'HTTP_BAD_REQUEST'],
      [{ format: 'cbor', payload: 'base64' }, 'HTTP_BAD_REQUEST'],
      [{ format: 'batches', key: ['a'] }, 'HTTP_BAD_REQUEST'],
      [{ topic: ['a/#/b'] }, 'HTTP_BAD_TOPIC_FILTER'],
      [{ topic: [''] }, 'HTTP_BAD_TOPIC_FILTER'],
      [{ where: 'temp >' }, 'FILTER_SYNTAX'],
    ]
    for (const [query, code] of cases) expect(codeOf(() => parse(query)), JSON.stringify(query)).toBe(code)
    // NDJSON has no record or byte limit of its own.
    expect(parse({ format: 'ndjson', maxRecords: 100_001 }).maxRecords).toBe(100_001)
  })
})

describe('toApiError', () => {
  it('maps filter and store errors to HTTP codes with the right status', () => {
    const filter = toApiError(new FilterExpressionError('bad', 4))
    expect(filter).toMatchObject({ code: 'HTTP_BAD_FILTER', status: 400, details: { parameter: 'where', position: 4 } })
    const details = { stream: 'acme/telemetry', partition: 2, offset: 1, logStartOffset: 5, logEndOffset: 9 }
    const range = toApiError(new StoreError('STORE_OFFSET_OUT_OF_RANGE', 'x', { details }))
    expect(range).toMatchObject({ code: 'HTTP_OFFSET_OUT_OF_RANGE', status: 416, details: { offset: 1, logStartOffset: 5, logEndOffset: 9 } })
    expect(range.message).not.toContain('acme')
    expect(toApiError(new StoreError('STORE_CLOSED', 'x'))).toMatchObject({ code: 'HTTP_UNAVAILABLE', status: 503 })
    expect(toApiError(new StoreError('STORE_CORRUPT_BATCH', 'x'))).toMatchObject({ code: 'HTTP_INTERNAL', status: 500 })
    expect(toApiError(new Error('boom'))).toMatchObject({ code: 'HTTP_INTERNAL', status: 500 })
  })

  it('has a status and a description for every code', () => {
    for (const [code, { status, description }] of Object.entries(HTTP_ERROR_CODES)) {
      expect(code).toMatch(/^HTTP_[A-Z_]+$/)
      expect(status).toBeGreaterThanOrEqual(400)
      expect(description.length).toBeGreaterThan(10)
    }
  })
})
