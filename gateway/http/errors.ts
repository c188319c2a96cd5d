/**
 * Errors of the HTTP server and its /v1 API. Every error response is
 * `{"error":{"code":"HTTP_…","message":"…", …details}}` with the status in
 * the table below; clients and tests match on the code, never the message.
 * This table is the registry of codes (docs/errors.md is generated from it).
 */
import { isStoreError } from '../../store/index.ts'
import { FilterExpressionError } from '../query/filter-expression.ts'
import { QueryError } from '../query/errors.ts'

export const HTTP_ERROR_CODES = {
  HTTP_BAD_REQUEST: { status: 400, description: 'A query parameter is unknown, repeated, malformed or out of range; the message names it.' },
  HTTP_BAD_BODY: { status: 400, description: 'The request body is not the JSON object the endpoint expects; the message names the field.' },
  HTTP_BAD_NAME: { status: 400, description: 'A consumer group name is empty, too long or has characters other than letters, digits, ".", "_", ":" and "-".' },
  HTTP_BAD_TIME: { status: 400, description: 'A time is not milliseconds since the epoch, an ISO 8601 date-time with a zone (or a date), "now" or a relative time like -15m.' },
  HTTP_BAD_RANGE: { status: 400, description: 'The end of a range (to, endOffset) lies before its start.' },
  HTTP_BAD_FILTER: { status: 400, description: 'The where expression does not parse; the error carries the 0-based position of the problem.' },
  HTTP_BAD_TOPIC_FILTER: { status: 400, description: 'A topic parameter is not a valid MQTT topic filter.' },
  HTTP_TOO_MANY_VALUES: { status: 400, description: 'A repeatable parameter is given more often than it may be: topic at most 100 times, key at most 1,000; the error carries parameter and max.' },
  HTTP_AUTH_REQUIRED: { status: 401, description: 'No credentials were sent, and anonymous access is not allowed (it is only from loopback when no users are configured).' },
  HTTP_BAD_CREDENTIALS: { status: 401, description: 'The Authorization header is malformed or neither Basic nor Bearer, or the username or password is wrong.' },
  HTTP_BAD_TOKEN: { status: 401, description: 'The bearer token is malformed, unknown or wrong (tokens are printed by `edgemq token`).' },
  HTTP_FORBIDDEN: { status: 403, description: 'The user\'s or token\'s role may not use the API (only service and admin may).' },
  HTTP_NOT_FOUND: { status: 404, description: 'No such path.' },
  HTTP_UNKNOWN_STREAM: { status: 404, description: 'The tenant has no stream of that name (another tenant\'s stream cannot be named).' },
  HTTP_UNKNOWN_PARTITION: { status: 404, description: 'The stream has no partition of that number.' },
  HTTP_UNKNOWN_GROUP: { status: 404, description: 'The tenant has no consumer group of that name.' },
  HTTP_UNKNOWN_UPSTREAM: { status: 404, description: 'No bridge upstream of that name is configured.' },
  HTTP_GROUP_READ_ONLY: { status: 409, description: 'The consumer group is the bridge\'s (`bridge.<upstream>`): listed, but only the bridge moves or deletes its offsets.' },
  HTTP_METHOD_NOT_ALLOWED: { status: 405, description: 'The path exists but not with this method; the Allow header lists the methods.' },
  HTTP_BODY_TOO_LARGE: { status: 413, description: 'The request body is larger than 64 KiB.' },
  HTTP_OFFSET_OUT_OF_RANGE: { status: 416, description: 'The offset is below the log start (retention deleted it) or above the log end; the error carries logStartOffset and logEndOffset.' },
  HTTP_INTERNAL: { status: 500, description: 'The server failed (for example a corrupt batch in the log); the message says why.' },
  HTTP_UNAVAILABLE: { status: 503, description: 'The gateway is shutting down.' },
} as const

export type HttpErrorCode = keyof typeof HTTP_ERROR_CODES

export class ApiError extends Error {
  override readonly name = 'ApiError'
  readonly code: HttpErrorCode
  readonly status: number
  /** Extra fields of the error object (position, parameter, logStartOffset, …). */
  readonly details: Readonly<Record<string, unknown>>
  /** Response headers the error needs (a WWW-Authenticate challenge). */
  readonly headers: Readonly<Record<string, string>>

  constructor (code: HttpErrorCode, message: string, options: { cause?: unknown, details?: Record<string, unknown>, headers?: Record<string, string> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.code = code
    this.status = HTTP_ERROR_CODES[code].status
    this.details = options.details ?? {}
    this.headers = options.headers ?? {}
  }

  toJSON (): { error: Record<string, unknown> } {
    return { error: { code: this.code, message: this.message, ...this.details } }
  }
}

/** Turns whatever a handler threw into an ApiError. */
export function toApiError (err: unknown): ApiError {
  if (err instanceof ApiError) return err
  if (err instanceof FilterExpressionError) {
    return new ApiError('HTTP_BAD_FILTER', `where: ${err.message}`, { cause: err, details: { parameter: 'where', position: err.position } })
  }
  if (err instanceof QueryError) return queryApiError(err)
  if (isStoreError(err)) {
    const d = err.details
    // Store names are `<tenant>/<stream>`; a client only ever sees its own tenant's part.
    const stream = clientStream(d.stream)
    switch (err.code) {
      case 'STORE_OFFSET_OUT_OF_RANGE': return offsetOutOfRange(err, stream, d)
      case 'STORE_UNKNOWN_STREAM': return new ApiError('HTTP_UNKNOWN_STREAM', `unknown stream ${stream}`, { cause: err })
      case 'STORE_INVALID_PARTITION': return new ApiError('HTTP_UNKNOWN_PARTITION', `${stream} has no such partition`, { cause: err })
      case 'STORE_UNKNOWN_GROUP': return new ApiError('HTTP_UNKNOWN_GROUP', 'unknown consumer group', { cause: err })
      case 'STORE_INVALID_NAME': return new ApiError('HTTP_BAD_NAME', err.message, { cause: err })
      case 'STORE_INVALID_OFFSET': case 'STORE_INVALID_ARGUMENT': return new ApiError('HTTP_BAD_REQUEST', err.message, { cause: err })
      case 'STORE_CLOSED': return new ApiError('HTTP_UNAVAILABLE', 'the gateway is shutting down', { cause: err })
      default: return new ApiError('HTTP_INTERNAL', `${err.code}: ${err.message}`, { cause: err })
    }
  }
  return new ApiError('HTTP_INTERNAL', err instanceof Error ? err.message : String(err), { cause: err })
}

/** The client's part of a store name `<tenant>/<stream>`. */
function clientStream (name: string | undefined): string {
  return name === undefined ? 'the stream' : name.slice(name.indexOf('/') + 1)
}

function offsetOutOfRange (cause: Error, stream: string,
  d: { partition?: number, offset?: number, logStartOffset?: number, logEndOffset?: number }): ApiError {
  return new ApiError('HTTP_OFFSET_OUT_OF_RANGE',
    `offset ${d.offset ?? '?'} is out of range for ${stream}[${d.partition ?? '?'}]: ` +
    `the log holds offsets from ${d.logStartOffset ?? '?'} up to ${d.logEndOffset ?? '?'} (exclusive)`,
    { cause, details: { offset: d.offset, logStartOffset: d.logStartOffset, logEndOffset: d.logEndOffset } })
}

/** The read path's errors (query/errors.ts) in the API's codes; `details.name` is the parameter. */
function queryApiError (err: QueryError): ApiError {
  const parameter = err.details.name === undefined ? {} : { parameter: err.details.name }
  switch (err.code) {
    case 'QUERY_BAD_TIME': return new ApiError('HTTP_BAD_TIME', err.message, { cause: err, details: parameter })
    case 'QUERY_BAD_RANGE': return new ApiError('HTTP_BAD_RANGE', err.message, { cause: err, details: parameter })
    case 'QUERY_BAD_TOPIC_FILTER': return new ApiError('HTTP_BAD_TOPIC_FILTER', err.message, { cause: err, details: parameter })
    case 'QUERY_BAD_POSITION': return new ApiError('HTTP_BAD_REQUEST', err.message, { cause: err, details: parameter })
    case 'QUERY_UNKNOWN_PARTITION': return new ApiError('HTTP_UNKNOWN_PARTITION', `${clientStream(err.details.stream)} has no such partition`, { cause: err })
    case 'QUERY_OFFSET_OUT_OF_RANGE': return offsetOutOfRange(err, clientStream(err.details.stream), err.details)
  }
}
