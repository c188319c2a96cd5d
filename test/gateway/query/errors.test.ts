/**
 * The read path's errors never reach a client as they are: every QUERY_…
 * code has its word on each surface — an HTTP_… code with its status and
 * parameter, a CLI_… code, and for `$replay` a refusal with
 * GW_REPLAY_BAD_RANGE. A new code without a mapping fails here (and the
 * switch statements fail to compile).
 */
import { describe, expect, it } from 'vitest'
import { cliErrorForQuery } from '../../../gateway/cli/errors.ts'
import { toApiError } from '../../../gateway/http/errors.ts'
import { parseReplaySubscription } from '../../../gateway/mqtt/replay.ts'
import { QUERY_ERROR_CODES, QueryError, type QueryErrorCode } from '../../../gateway/query/errors.ts'

const NOW = Date.parse('2026-11-24T12:00:00Z')

const EXPECTED: Readonly<Record<QueryErrorCode, { http: string, status: number, cli: string }>> = {
  QUERY_BAD_TIME: { http: 'HTTP_BAD_TIME', status: 400, cli: 'CLI_BAD_TIME' },
  QUERY_BAD_POSITION: { http: 'HTTP_BAD_REQUEST', status: 400, cli: 'CLI_BAD_ARGUMENT' },
  QUERY_BAD_RANGE: { http: 'HTTP_BAD_RANGE', status: 400, cli: 'CLI_BAD_RANGE' },
  QUERY_BAD_TOPIC_FILTER: { http: 'HTTP_BAD_TOPIC_FILTER', status: 400, cli: 'CLI_BAD_TOPIC_FILTER' },
  QUERY_UNKNOWN_PARTITION: { http: 'HTTP_UNKNOWN_PARTITION', status: 404, cli: 'CLI_UNKNOWN_PARTITION' },
  QUERY_OFFSET_OUT_OF_RANGE: { http: 'HTTP_OFFSET_OUT_OF_RANGE', status: 416, cli: 'CLI_OFFSET_OUT_OF_RANGE' },
}

describe('the read path\'s errors on each surface', () => {
  it.each(Object.keys(QUERY_ERROR_CODES) as QueryErrorCode[])('%s', (code) => {
    const err = new QueryError(code, 'x', { details: { name: 'from', stream: 'acme/telemetry', partition: 2, offset: 1, logStartOffset: 5, logEndOffset: 9 } })
    const want = EXPECTED[code]
    const api = toApiError(err)
    expect([api.code, api.status]).toEqual([want.http, want.status])
    expect(cliErrorForQuery(err).code).toBe(want.cli)
    // Neither surface shows a client another tenant's name.
    expect(api.message).not.toContain('acme')
    expect(cliErrorForQuery(err).message).not.toContain('acme')
  })

  it('names the parameter for HTTP and gives the log bounds of an offset out of range', () => {
    expect(toApiError(new QueryError('QUERY_BAD_TIME', 'to: "x" is not a time', { details: { name: 'to' } })).details).toEqual({ parameter: 'to' })
    const details = { stream: 'acme/t', partition: 0, offset: 12, logStartOffset: 0, logEndOffset: 10 }
    const range = toApiError(new QueryError('QUERY_OFFSET_OUT_OF_RANGE', 'x', { details }))
    expect(range.details).toEqual({ offset: 12, logStartOffset: 0, logEndOffset: 10 })
    expect(range.message).toBe('offset 12 is out of range for t[0]: the log holds offsets from 0 up to 10 (exclusive)')
  })

  it('refuses every bad position and range of a $replay subscription with GW_REPLAY_BAD_RANGE', () => {
    for (const range of ['yesterday', '', '12345678901234567890', '10..5', '-1h..-2h', 'earliest..latest', 'now..']) {
      let code: string | undefined
      try { parseReplaySubscription(`$replay/${range}/x`, NOW) } catch (err) { code = (err as { code?: string }).code }
      expect(code, range).toBe('GW_REPLAY_BAD_RANGE')
    }
  })
})
