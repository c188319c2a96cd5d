/**
 * Errors of the HTTP server and its /v1 API. Every error response is
 * `{"error":{"code":"HTTP_…","message":"…", …details}}` with the status in
 * the table below; clients and tests match on the code, never the message.
 * This table is the registry of codes (docs/errors.md is generated from it).
 */
import type { ErrorObject } from 'ajv'
import { CodedError, isStoreError } from '../../store/index.ts'
import { FilterExpressionError } from '../query/filter-expression.ts'
import { QueryError } from '../query/errors.ts'

export const HTTP_ERROR_CODES = {
  HTTP_BAD_REQUEST: { status: 400, description: 'A query parameter is unknown, repeated, malformed or out of range; the message names it.' },
  HTTP_BAD_BODY: { status: 400, description: 'The request body is not the JSON object the endpoint expects; the message names the field.' },
  HTTP_BAD_NAME: { status: 400, description: 'A consumer group name is empty, too long or has characters other than letters, digits, ".", "_", ":" and "-".' },
  HTTP_BAD_TIME: {
    status: 400, description: 'A time is not milliseconds since the epoch, an ISO 8601 date-time with a zone (or a date), "now" or a relative time like -15m.',
  },
  HTTP_BAD_RANGE: { status: 400, description: 'The end of a range (to, endOffset) lies before its start.' },
  HTTP_BAD_FILTER: { status: 400, description: 'The where expression does not parse; the error carries the 0-based position of the problem.' },
  HTTP_BAD_TOPIC_FILTER: { status: 400, description: 'A topic parameter is not a valid MQTT topic filter.' },
  HTTP_TOO_MANY_VALUES: {
    status: 400,
    description: 'A repeatable parameter is given more often than it may be: topic at most 100 times, key at most 1,000; the error carries parameter and max.',
  },
  HTTP_AUTH_REQUIRED: {
    status: 401, description: 'No credentials were sent, and anonymous access is not allowed (it is only from loopback when no users are configured).',
  },
  HTTP_BAD_CREDENTIALS: {
    status: 401, description: 'The Authorization header is malformed or neither Basic nor Bearer, or the username or password is wrong.',
  },
  HTTP_BAD_TOKEN: { status: 401, description: 'The bearer token is malformed, unknown or wrong (tokens are printed by `edgemq token`).' },
  HTTP_FORBIDDEN: { status: 403, description: 'The user\'s or token\'s role may not use the API (only service and admin may).' },
  HTTP_NOT_FOUND: { status: 404, description: 'No such path.' },
  HTTP_UNKNOWN_STREAM: { status: 404, description: 'The tenant has no stream of that name (another tenant\'s stream cannot be named).' },
  HTTP_UNKNOWN_PARTITION: { status: 404, description: 'The stream has no partition of that number.' },
  HTTP_UNKNOWN_GROUP: { status: 404, description: 'The tenant has no consumer group of that name.' },
  HTTP_UNKNOWN_UPSTREAM: { status: 404, description: 'No bridge upstream of that name is configured.' },
  HTTP_GROUP_READ_ONLY: {
    status: 409, description: 'The consumer group is the bridge\'s (`bridge.<upstream>`): listed, but only the bridge moves or deletes its offsets; ' +
      'or a shared subscription\'s (`share/<group>/<filter>`), whose offsets only its members\' acknowledgements move.',
  },
  HTTP_GROUP_IN_USE: {
    status: 409, description: 'The consumer group is a shared subscription\'s ($share/...) and a client is a member of the share: ' +
      'its members unsubscribe (or disconnect) before it can be deleted.',
  },
  HTTP_METHOD_NOT_ALLOWED: { status: 405, description: 'The path exists but not with this method; the Allow header lists the methods.' },
  HTTP_BODY_TOO_LARGE: { status: 413, description: 'The request body is larger than 64 KiB.' },
  HTTP_OFFSET_OUT_OF_RANGE: {
    status: 416,
    description: 'The offset is below the log start (retention deleted it) or above the log end; the error carries logStartOffset and logEndOffset.',
  },
  HTTP_INTERNAL: { status: 500, description: 'The server failed (for example a corrupt batch in the log); the message says why.' },
  HTTP_UNAVAILABLE: {
    status: 503,
    description: 'The gateway is shutting down; or it is a standby whose copy of the log was replaced while the read ran (a snapshot from its primary, ' +
      'STORE_LOG_REPLACED): read again.',
  },
  HTTP_PROMOTE_REFUSED: {
    status: 409, description: 'POST /v1/replication/promote on a gateway that is not a standby, or whose copy is incomplete (GW_PROMOTE_REFUSED).',
  },
  HTTP_READ_ONLY: {
    status: 503,
    description: 'This gateway is a standby (replication.role: standby): it serves reads, and writes (commits, resets, deletes) go to the primary.',
  },
} as const

export type HttpErrorCode = keyof typeof HTTP_ERROR_CODES

export class ApiError extends CodedError<HttpErrorCode> {
  override readonly name = 'ApiError'
  readonly status: number
  /** Extra fields of the error object (position, parameter, logStartOffset, …). */
  readonly details: Readonly<Record<string, unknown>>
  /** Response headers the error needs (a WWW-Authenticate challenge). */
  readonly headers: Readonly<Record<string, string>>

  constructor (code: HttpErrorCode, message: string, options: { cause?: unknown, details?: Record<string, unknown>, headers?: Record<string, string> } = {}) {
    super(code, message, options)
    this.status = HTTP_ERROR_CODES[code].status
    this.details = options.details ?? {}
    this.headers = options.headers ?? {}
  }

  toJSON (): { error: Record<string, unknown> } {
    return { error: { code: this.code, message: this.message, ...this.details } }
  }
}

/** The errors fastify itself raises before a handler runs, by their `code`. */
const FRAMEWORK_ERRORS: Readonly<Record<string, { code: HttpErrorCode, message: string }>> = {
  FST_ERR_CTP_BODY_TOO_LARGE: { code: 'HTTP_BODY_TOO_LARGE', message: 'the body is larger than 64 KiB' },
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: { code: 'HTTP_BAD_BODY', message: 'the body\'s length is not its Content-Length' },
  FST_ERR_BAD_URL: { code: 'HTTP_BAD_REQUEST', message: 'the path is not valid percent-encoding' },
  FST_ERR_MAX_PARAM_LENGTH: { code: 'HTTP_BAD_REQUEST', message: 'a path segment is too long' },
}

/** Turns whatever a handler threw into an ApiError. */
export function toApiError (err: unknown): ApiError {
  if (err instanceof ApiError) return err
  const framework = frameworkCode(err)
  if (framework !== undefined) {
    const known = FRAMEWORK_ERRORS[framework]
    if (known !== undefined) return new ApiError(known.code, known.message, { cause: err })
    const status = (err as { statusCode?: unknown }).statusCode
    if (typeof status === 'number' && status < 500) return new ApiError('HTTP_BAD_REQUEST', (err as Error).message, { cause: err })
  }
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
      case 'STORE_LOG_REPLACED':
        return new ApiError('HTTP_UNAVAILABLE', 'this standby\'s copy of the log was replaced while reading (a snapshot from its primary): read again',
          { cause: err })
      case 'STORE_READ_ONLY': return new ApiError('HTTP_READ_ONLY', 'this gateway is a standby: it takes no writes; send them to the primary', { cause: err })
      default: return new ApiError('HTTP_INTERNAL', `${err.code}: ${err.message}`, { cause: err })
    }
  }
  return new ApiError('HTTP_INTERNAL', err instanceof Error ? err.message : String(err), { cause: err })
}

function frameworkCode (err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && code.startsWith('FST_') ? code : undefined
}

/**
 * The ApiError of the first failure ajv found in one part of a request
 * (fastify's `schemaErrorFormatter`). The code is the failing schema's
 * `x-error-code` (schemas.ts), else HTTP_BAD_REQUEST, or HTTP_BAD_BODY for
 * a body; the details name the parameter (`parameter`), the body field
 * (`field`) or the path parameter (`stream`, `partition`, `group`), as the
 * error bodies always did. Needs ajv's `verbose` option (the failing value
 * and schema).
 */
export function validationError (errors: readonly ErrorObject[], part: string): ApiError {
  const e = errors[0]
  if (e === undefined) return new ApiError('HTTP_BAD_REQUEST', `the request's ${part} is invalid`)
  const schema = (e.parentSchema ?? {}) as Record<string, unknown>
  const body = part === 'body'
  const fallback: HttpErrorCode = body ? 'HTTP_BAD_BODY' : 'HTTP_BAD_REQUEST'
  const steps = e.instancePath.split('/').slice(1).map((s) => s.replaceAll('~1', '/').replaceAll('~0', '~'))
  const missing = e.keyword === 'required' ? String((e.params as { missingProperty: string }).missingProperty) : undefined
  const extra = e.keyword === 'additionalProperties' ? String((e.params as { additionalProperty: string }).additionalProperty) : undefined
  const childSchema = (name: string): Record<string, unknown> => ((schema.properties ?? {}) as Record<string, Record<string, unknown>>)[name] ?? {}
  const code = (missing === undefined ? schema['x-error-code'] : childSchema(missing)['x-error-code']) as HttpErrorCode | undefined ?? fallback
  const value = e.data

  if (part === 'params') {
    const name = steps[0] ?? missing ?? 'path'
    const message = HTTP_ERROR_CODES[code].status === 404
      ? `unknown ${name} ${JSON.stringify(value)}`
      : `invalid ${name} ${JSON.stringify(value)}: ${String(schema.description ?? e.message)}`
    return new ApiError(code, message, { details: { [name]: value } })
  }

  if (!body) {
    // Query parameters are flat: the first step is the parameter's name.
    const name = extra ?? steps[0] ?? missing ?? 'query'
    const details = { parameter: name }
    if (extra !== undefined) {
      const takes = Object.keys((schema.properties ?? {}) as object)
      const list = takes.length === 0 ? 'none' : takes.join(', ')
      return new ApiError(code, `unknown parameter ${JSON.stringify(extra)}; this endpoint takes ${list}`, { details })
    }
    if (e.keyword === 'maxItems') {
      const max = (e.params as { limit: number }).limit
      return new ApiError('HTTP_TOO_MANY_VALUES', `parameter ${name} is given more than ${max} times`, { details: { ...details, max } })
    }
    if (e.keyword === 'type' && Array.isArray(value)) return new ApiError(code, `parameter ${name} is given more than once`, { details })
    if (missing !== undefined) {
      return new ApiError(code, `parameter ${missing} is missing: ${String(childSchema(missing).description ?? 'it is required')}`, { details })
    }
    return new ApiError(code, describe(name, schema, e), { details })
  }

  // A body: `field` is the path in JavaScript notation, offsets[0].partition.
  const field = (more?: string): string => [...steps, ...(more === undefined ? [] : [more])]
    .map((s, i) => /^[0-9]+$/.test(s) ? `[${s}]` : i === 0 ? s : `.${s}`).join('')
  if (steps.length === 0 && e.keyword === 'type') return new ApiError(code, 'the body must be a JSON object')
  if (extra !== undefined) {
    const takes = Object.keys((schema.properties ?? {}) as object).join(', ')
    const owner = steps.length === 0 ? 'this endpoint' : field()
    return new ApiError(code, `unknown field ${JSON.stringify(extra)}; ${owner} takes ${takes}`, { details: { field: field(extra) } })
  }
  if (missing !== undefined) {
    const description = childSchema(missing).description
    const why = description === undefined ? '' : `: ${String(description)}`
    return new ApiError(code, `${field(missing)} is missing${why}`, { details: { field: field(missing) } })
  }
  return new ApiError(code, describe(field(), schema, e), { details: { field: field() } })
}

/** "maxRecords must be an integer from 1 to 100000, got "0"", and the like. */
function describe (name: string, schema: Record<string, unknown>, e: ErrorObject): string {
  const got = `got ${JSON.stringify(e.data)}`
  if (schema.type === 'integer' && ['type', 'minimum', 'maximum'].includes(e.keyword)) {
    return `${name} must be an integer from ${String(schema.minimum)} to ${String(schema.maximum)}, ${got}`
  }
  if (e.keyword === 'enum') return `${name} must be one of ${(schema.enum as unknown[]).join(', ')}, ${got}`
  const description = typeof schema.description === 'string' ? ` (${schema.description})` : ''
  return `${name} ${e.message ?? 'is invalid'}${description}, ${got}`
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
