/**
 * Errors of the read path (query/read-plan.ts). They never reach a client as
 * they are: each surface words them in its own codes, so a client keeps
 * seeing the codes documented for it — the HTTP API maps them in
 * http/errors.ts (toApiError), `edgemq replay` in cli/errors.ts
 * (cliErrorForQuery), `$replay` in mqtt/replay.ts (GW_REPLAY_BAD_RANGE,
 * GW_REPLAY_BAD_FILTER). Like the `where` parser's FilterExpressionError,
 * which the read path raises too. Tests match on the code.
 */
import { CodedError } from '../../store/index.ts'

export const QUERY_ERROR_CODES = {
  QUERY_BAD_TIME: 'A time is not "now", a relative time (-15m), epoch milliseconds or an ISO 8601 date-time with a zone (or a date); details.name says which.',
  QUERY_BAD_POSITION: 'A position is not earliest, latest, an offset or a time (an offset too large, or earliest/latest where an end is wanted).',
  QUERY_BAD_RANGE: 'The end of a range lies before its start (both offsets, or both times).',
  QUERY_BAD_TOPIC_FILTER: 'A topic filter is not a valid MQTT topic filter; details.filter is the filter.',
  QUERY_UNKNOWN_PARTITION: 'The stream has no partition of that number.',
  QUERY_OFFSET_OUT_OF_RANGE: 'The start offset is below the log start or above the log end; details carry both.',
} as const

export type QueryErrorCode = keyof typeof QUERY_ERROR_CODES

export interface QueryErrorDetails {
  /** The parameter, flag or part of a request the problem is in, as the caller named it. */
  readonly name?: string
  readonly filter?: string
  readonly stream?: string
  readonly partition?: number
  readonly partitions?: number
  readonly offset?: number
  readonly logStartOffset?: number
  readonly logEndOffset?: number
}

export class QueryError extends CodedError<QueryErrorCode> {
  override readonly name = 'QueryError'
  readonly details: QueryErrorDetails

  constructor (code: QueryErrorCode, message: string, options: { cause?: unknown, details?: QueryErrorDetails } = {}) {
    super(code, message, options)
    this.details = options.details ?? {}
  }
}

export function isQueryError (err: unknown, code?: QueryErrorCode): err is QueryError {
  return err instanceof QueryError && (code === undefined || err.code === code)
}
