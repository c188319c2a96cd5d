/**
 * The JSON schemas of the HTTP API: path parameters, query parameters and
 * bodies, one per route. fastify validates every request against them with
 * ajv before a handler runs, and @fastify/swagger turns them into the
 * OpenAPI document served at GET /v1/openapi.json.
 *
 * Every object is `additionalProperties: false`, so an unknown query
 * parameter or body field is an error (a typo like `maxRecord=10` is not
 * silently ignored). A query parameter that is not an array in its schema
 * may be given once; a repeated one arrives as an array and fails.
 *
 * `x-error-code` (an OpenAPI extension, declared to ajv in server.ts) names
 * the error code a failure of that schema gets; without it a query problem
 * is HTTP_BAD_REQUEST and a body problem HTTP_BAD_BODY (errors.ts,
 * `validationError`). The checks that need the store (does the stream
 * exist, is the partition below its count) or several parameters at once
 * (at most one of offset, from and group) stay in the handlers.
 */
import { HTTP_ERROR_CODES, type HttpErrorCode } from './errors.ts'
import { MAX_SESSIONS_PER_PAGE } from '../query/sessions.ts'
import { BATCHES_MEDIA_TYPE, MAX_KEYS, MAX_TOPIC_FILTERS, MAX_WAIT_SECONDS } from './records.ts'

/** An ajv schema; `x-error-code` is ours. */
export interface JsonSchema {
  readonly [keyword: string]: unknown
  readonly 'x-error-code'?: HttpErrorCode
}

/** The keyword, for ajv (server.ts) and errors.ts. */
export const ERROR_CODE_KEYWORD = 'x-error-code'

const MAX_SAFE = Number.MAX_SAFE_INTEGER

function integer (minimum: number, maximum: number, description: string): JsonSchema {
  return { type: 'integer', minimum, maximum, description }
}

// ---------------------------------------------------------------- path parameters

export const STREAM_NAME: JsonSchema = {
  type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$', 'x-error-code': 'HTTP_UNKNOWN_STREAM',
  description: 'A stream of the caller\'s tenant (another tenant\'s streams cannot be named).',
}
export const GROUP_NAME: JsonSchema = {
  type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$', 'x-error-code': 'HTTP_BAD_NAME',
  description: '1 to 128 letters, digits, ".", "_", ":" and "-", starting with a letter or digit',
}
const PARTITION: JsonSchema = {
  type: 'string', pattern: '^(?:0|[1-9][0-9]{0,4})$', 'x-error-code': 'HTTP_UNKNOWN_PARTITION',
  description: 'A partition number, from 0 to the stream\'s partition count - 1.',
}
const UPSTREAM: JsonSchema = { type: 'string', description: 'A configured bridge upstream.' }

function pathParams (properties: Readonly<Record<string, JsonSchema>>): JsonSchema {
  return { type: 'object', additionalProperties: false, required: Object.keys(properties), properties }
}

export const STREAM_PARAMS = pathParams({ stream: STREAM_NAME })
export const PARTITION_PARAMS = pathParams({ stream: STREAM_NAME, partition: PARTITION })
export const GROUP_PARAMS = pathParams({ group: GROUP_NAME })
export const GROUP_STREAM_PARAMS = pathParams({ group: GROUP_NAME, stream: STREAM_NAME })
export const UPSTREAM_PARAMS = pathParams({ upstream: UPSTREAM })

// ---------------------------------------------------------------- query parameters

/** For the endpoints that take no query parameter. */
export const NO_QUERY: JsonSchema = { type: 'object', additionalProperties: false, properties: {} }

const TIME = 'Milliseconds since the epoch, ISO 8601 with a zone (or a date alone, midnight UTC), `now`, or a relative time such as -15m.'

const RECORDS_QUERY_PROPERTIES: Readonly<Record<string, JsonSchema>> = {
  offset: { type: 'string', pattern: '^(?:earliest|latest|[0-9]{1,16})$', description: 'Start offset, or `earliest` / `latest`. Default: earliest.' },
  from: { type: 'string', description: `Start at the first record whose timestamp is at or after this time. ${TIME}` },
  group: { ...GROUP_NAME, description: 'Start at this consumer group\'s committed offset (the log start if it never committed).' },
  endOffset: integer(0, MAX_SAFE, 'Stop before this offset.'),
  to: { type: 'string', description: `Stop before the first record whose timestamp is at or after this time. ${TIME}` },
  maxRecords: integer(1, MAX_SAFE, 'JSON/CBOR: 1 to 100000, default 1000. NDJSON: default unlimited. Not with format=batches.'),
  maxBytes: integer(1, MAX_SAFE, 'Payload bytes per response (batches: stored batch bytes). JSON/CBOR: default 1 MiB, at most 64 MiB.'),
  wait: integer(0, MAX_WAIT_SECONDS, 'Long-poll: wait up to this many seconds for a matching record.'),
  key: { type: 'array', items: { type: 'string' }, maxItems: MAX_KEYS, description: 'Only records with this key; repeatable.' },
  topic: {
    type: 'array', items: { type: 'string' }, maxItems: MAX_TOPIC_FILTERS, description: 'Only records whose topic matches this MQTT filter; repeatable.',
  },
  where: { type: 'string', description: 'Only records whose JSON payload satisfies this expression (docs/http-api.md).' },
  format: {
    type: 'string', enum: ['json', 'ndjson', 'cbor', 'batches'],
    description: 'Default: what the Accept header asks for (application/x-ndjson, application/cbor, application/vnd.edgemq.batches+cbor-seq), else json.',
  },
  payload: { type: 'string', enum: ['utf8', 'base64'], description: 'How JSON and NDJSON carry payloads. Default: utf8.' },
}

/** GET /v1/sessions: one page of the tenant's sessions, by client id. */
export const SESSIONS_QUERY: JsonSchema = {
  type: 'object', additionalProperties: false,
  properties: {
    limit: integer(1, MAX_SESSIONS_PER_PAGE, `Sessions per page, 1 to ${MAX_SESSIONS_PER_PAGE} (the default).`),
    after: { type: 'string', maxLength: 65535, description: 'Start after this client id: the `next` of the previous page.' },
  },
}

/** GET …/partitions/{partition}/records. */
export const RECORDS_QUERY: JsonSchema = { type: 'object', additionalProperties: false, properties: RECORDS_QUERY_PROPERTIES }

/** GET /v1/streams/{stream}/records: the partition of exactly one key. */
export const KEY_RECORDS_QUERY: JsonSchema = {
  type: 'object', additionalProperties: false, required: ['key'],
  properties: {
    ...RECORDS_QUERY_PROPERTIES,
    key: {
      type: 'string', description: 'The key whose partition is read (and only its records); use …/partitions/{partition}/records to read without a key.',
    },
  },
}

// ---------------------------------------------------------------- bodies

const NON_NEGATIVE = integer(0, MAX_SAFE, 'A non-negative integer.')

export const COMMIT_BODY: JsonSchema = {
  type: 'object', additionalProperties: false, required: ['offsets'],
  properties: {
    offsets: {
      type: 'array', minItems: 1, description: 'A non-empty array of {"partition": P, "offset": N}: the next offset to consume, per partition.',
      items: {
        type: 'object', additionalProperties: false, required: ['partition', 'offset'],
        properties: { partition: NON_NEGATIVE, offset: NON_NEGATIVE },
      },
    },
  },
}

export const RESET_BODY: JsonSchema = {
  type: 'object', additionalProperties: false, required: ['to'],
  properties: {
    to: { type: 'string', enum: ['earliest', 'latest', 'offset', 'timestamp'], description: 'Where the group moves to.' },
    offset: { ...NON_NEGATIVE, description: 'With to: offset.' },
    timestamp: {
      type: ['integer', 'string'], minimum: 0, maximum: MAX_SAFE, 'x-error-code': 'HTTP_BAD_TIME',
      description: 'With to: timestamp: milliseconds since the epoch, or an ISO 8601 time.',
    },
    partition: { ...NON_NEGATIVE, description: 'Move this partition only; without it every partition moves.' },
  },
}

// ---------------------------------------------------------------- responses (for the OpenAPI document: replies are not checked against them)

/** Every route's `default` response (routes.ts adds it). */
export const ERROR_RESPONSE: JsonSchema = {
  description: 'An error: the code says what went wrong (docs/errors.md) and sets the status; other fields name what failed.',
  type: 'object', required: ['error'],
  properties: {
    error: {
      type: 'object', required: ['code', 'message'], additionalProperties: true,
      properties: { code: { type: 'string', enum: Object.keys(HTTP_ERROR_CODES) }, message: { type: 'string' } },
    },
  },
}

const BINARY: JsonSchema = { type: 'string', format: 'binary' }

export const RECORDS_RESPONSES: Readonly<Record<string, JsonSchema>> = {
  200: {
    description: 'The records: one JSON or CBOR document {stream, partition, records, nextOffset, logStartOffset, logEndOffset, endOfRange}; ' +
      'NDJSON, one record per line and a last line {"end": {…}}; or the stored batches as a CBOR sequence (docs/http-api.md).',
    content: {
      'application/json': { schema: { type: 'object' } },
      'application/x-ndjson': { schema: { type: 'string' } },
      'application/cbor': { schema: BINARY },
      [BATCHES_MEDIA_TYPE]: { schema: BINARY },
    },
  },
}

// ---------------------------------------------------------------- the types the schemas guarantee

export interface StreamParams { readonly stream: string }
export interface PartitionParams { readonly stream: string, readonly partition: string }
export interface GroupParams { readonly group: string }
export interface GroupStreamParams { readonly group: string, readonly stream: string }
export interface UpstreamParams { readonly upstream: string }

export interface CommitBody { readonly offsets: ReadonlyArray<{ readonly partition: number, readonly offset: number }> }
export interface ResetBody {
  readonly to: 'earliest' | 'latest' | 'offset' | 'timestamp'
  readonly offset?: number
  readonly timestamp?: number | string
  readonly partition?: number
}
