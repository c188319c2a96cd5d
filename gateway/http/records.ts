/**
 * Fetching records over HTTP: read the request's parameters, plan and run
 * the read through the one read path (query/read-plan.ts: where a read
 * starts and ends, by offset, time or a group's committed offset, and the
 * key / topic / where filters), wait for new records (long-poll), and write
 * the result as JSON, streamed NDJSON or CBOR. A range here is open-ended
 * (policy `snapshot: false`) and a start outside the log is refused
 * (`outside: 'fail'`, HTTP_OFFSET_OUT_OF_RANGE).
 *
 * Long-poll: when nothing matches yet, the request waits on the store's
 * `onAppend` event for its partition (never on a timer that polls), up to
 * `wait` seconds, then reads again.
 *
 * Fairness: filtering, parsing `where` payloads and encoding run in CPU
 * slices (cpu-slice.ts) that yield to the event loop, so one request cannot
 * hold up other clients, MQTT acks included; repeated filters are bounded
 * (MAX_TOPIC_FILTERS, MAX_KEYS) and the topic filters are one compiled
 * matcher (compileTopicFilters, topics.ts).
 */
import { once } from 'node:events'
import type { IncomingMessage, ServerResponse } from 'node:http'
import { Encoder } from 'cbor-x'
import type { LogStore, StoredRecord } from '../../store/index.ts'
import { ApiError, toApiError } from './errors.ts'
import { parseInteger } from './params.ts'
import { CpuSlice, slicedPieces } from './cpu-slice.ts'
import { RecordJson, type PayloadEncoding } from '../query/record-json.ts'
import { compileFilterExpression } from '../query/filter-expression.ts'
import { isQueryError } from '../query/errors.ts'
import {
  checkRange, compileRecordFilter, parseTime, PartitionReader, resolveRange, type PartitionRange, type ReadRange, type RecordFilter, type Start,
} from '../query/read-plan.ts'

export type OutputFormat = 'json' | 'ndjson' | 'cbor' | 'batches'
/** The media type of format=batches: a CBOR sequence (RFC 8742) of stored batches (http/batches.ts). */
export const BATCHES_MEDIA_TYPE = 'application/vnd.edgemq.batches+cbor-seq'
/** Each format's media type, the one an Accept header names to ask for it. */
export const FORMAT_MEDIA_TYPES: Readonly<Record<OutputFormat, string>> = {
  json: 'application/json', ndjson: 'application/x-ndjson', cbor: 'application/cbor', batches: BATCHES_MEDIA_TYPE,
}
export type { PayloadEncoding }

/** A JSON or CBOR response stops after examining this many records that a filter rejected, and says where to go on. */
const SCAN_BUDGET = 100_000
export const MAX_WAIT_SECONDS = 60
export const LIMITS = {
  json: { defaultRecords: 1000, maxRecords: 100_000, defaultBytes: 1024 * 1024, maxBytes: 64 * 1024 * 1024 },
  ndjson: {
    defaultRecords: Number.MAX_SAFE_INTEGER, maxRecords: Number.MAX_SAFE_INTEGER, defaultBytes: Number.MAX_SAFE_INTEGER, maxBytes: Number.MAX_SAFE_INTEGER,
  },
} as const

/** The most values of each repeatable filter parameter (documented with HTTP_TOO_MANY_VALUES in http/errors.ts). */
export const MAX_TOPIC_FILTERS = 100
export const MAX_KEYS = 1000


export interface RecordsRequest {
  readonly start: Start
  readonly endOffset: number | null
  readonly toTime: number | null
  readonly keys: ReadonlySet<string> | null
  readonly topicFilters: readonly string[] | null
  readonly where: ((doc: unknown) => boolean) | null
  readonly maxRecords: number
  readonly maxBytes: number
  readonly waitMs: number
  readonly format: OutputFormat
  readonly payload: PayloadEncoding
}

/**
 * The fetch parameters as the route's schema (http/schemas.ts) let them
 * through: each one of the right type and range, known, and given once
 * (key and topic: at most MAX_KEYS / MAX_TOPIC_FILTERS times).
 */
export interface RecordsQuery {
  readonly offset?: string
  readonly from?: string
  readonly group?: string
  readonly endOffset?: number
  readonly to?: string
  readonly maxRecords?: number
  readonly maxBytes?: number
  readonly wait?: number
  readonly key?: readonly string[]
  readonly topic?: readonly string[]
  readonly where?: string
  readonly format?: OutputFormat
  readonly payload?: PayloadEncoding
}

/** `name`'s value when it lies in [min, max]; HTTP_BAD_REQUEST otherwise (the bounds that depend on the format). */
function within (value: number | undefined, name: string, min: number, max: number): number | undefined {
  if (value !== undefined && (value < min || value > max)) {
    throw new ApiError('HTTP_BAD_REQUEST', `${name} must be an integer from ${min} to ${max}, got ${value}`, { details: { parameter: name } })
  }
  return value
}

/**
 * Reads the fetch parameters. `group` is the caller's group name already
 * mapped into the tenant's namespace by `groupName`; `fallbackFormat` is the
 * format without a `format` parameter (what the Accept header asks for).
 */
export function parseRecordsRequest (query: RecordsQuery, now: number, fallbackFormat: OutputFormat,
  groupName: (name: string) => string): RecordsRequest {
  const has = (name: keyof RecordsQuery): boolean => query[name] !== undefined
  const format = query.format ?? fallbackFormat
  const payload = query.payload ?? 'utf8'
  if ((format === 'cbor' || format === 'batches') && has('payload')) {
    throw new ApiError('HTTP_BAD_REQUEST', `payload does not apply to format=${format}: it carries payloads as bytes`, { details: { parameter: 'payload' } })
  }
  if (format === 'batches') {
    // Stored batches go out as they are; anything that needs records decoded belongs to the other formats.
    const decoded = (['key', 'topic', 'where', 'maxRecords'] as const).find((p) => has(p))
    if (decoded !== undefined) {
      throw new ApiError('HTTP_BAD_REQUEST', `${decoded} does not apply to format=batches, which serves stored batches whole and unfiltered; ` +
        'use format=ndjson, json or cbor (or endOffset to bound the range)', { details: { parameter: decoded } })
    }
  }

  const starts = (['offset', 'from', 'group'] as const).filter((p) => has(p))
  if (starts.length > 1) {
    throw new ApiError('HTTP_BAD_REQUEST', `give at most one of offset, from and group (got ${starts.join(', ')})`, { details: { parameter: starts[1] } })
  }
  let start: Start = { kind: 'earliest' }
  const offsetText = query.offset
  const fromText = query.from
  const groupText = query.group
  if (offsetText === 'earliest' || offsetText === 'latest') start = { kind: offsetText }
  else if (offsetText !== undefined) start = { kind: 'offset', offset: parseInteger(offsetText, 'offset', 0, Number.MAX_SAFE_INTEGER) }
  else if (fromText !== undefined) start = { kind: 'time', timestamp: asApiError(() => parseTime(fromText, now, 'from')) }
  else if (groupText !== undefined) start = { kind: 'group', group: groupName(groupText) }

  const endOffset = query.endOffset ?? null
  const toText = query.to
  const toTime = toText === undefined ? null : asApiError(() => parseTime(toText, now, 'to'))
  asApiError(() => checkRange({ start, endOffset, endTime: toTime }, RANGE_NAMES))

  const limits = format === 'ndjson' || format === 'batches' ? LIMITS.ndjson : LIMITS.json
  const maxRecords = within(query.maxRecords, 'maxRecords', 1, limits.maxRecords) ?? limits.defaultRecords
  const maxBytes = within(query.maxBytes, 'maxBytes', 1, limits.maxBytes) ?? limits.defaultBytes
  const waitMs = (query.wait ?? 0) * 1000

  const keyList = query.key ?? []
  const topicFilters = query.topic ?? []
  asApiError(() => compileRecordFilter({ keys: [], topics: [...topicFilters], where: undefined }, 'topic'))
  const whereText = query.where
  return {
    start, endOffset, toTime, format, payload, maxRecords, maxBytes, waitMs,
    keys: keyList.length === 0 ? null : new Set(keyList),
    topicFilters: topicFilters.length === 0 ? null : topicFilters,
    // FilterExpressionError becomes HTTP_BAD_FILTER with its position (http/errors.ts).
    where: whereText === undefined ? null : compileFilterExpression(whereText),
  }
}

/** Runs a check of the read path; its QueryError becomes the API's error, naming the parameter (toApiError). */
function asApiError<T> (check: () => T): T {
  try {
    return check()
  } catch (err) {
    throw isQueryError(err) ? toApiError(err) : err
  }
}

const RANGE_NAMES = { startOffset: 'offset', endOffset: 'endOffset', startTime: 'from', endTime: 'to' } as const

/** The request's range, as the read path takes it. */
function readRangeOf (req: RecordsRequest): ReadRange {
  return { start: req.start, endOffset: req.endOffset, endTime: req.toTime }
}

function recordFilter (req: RecordsRequest): RecordFilter | null {
  return compileRecordFilter({ keys: req.keys === null ? [] : [...req.keys], topics: req.topicFilters ?? [], where: req.where ?? undefined })
}

/** Wakes long-polling requests when their partition receives records. */
export class AppendWaiters {
  readonly #waiting = new Map<string, Set<() => void>>()
  readonly #unsubscribe: () => void
  readonly #onSize: (waiting: number) => void
  #closed = false

  /** `onSize` hears the number of waiting requests whenever it changes (the edgemq_http_waiting_reads gauge). */
  constructor (store: LogStore, onSize: (waiting: number) => void = () => {}) {
    this.#onSize = onSize
    this.#unsubscribe = store.onAppend((e) => {
      const set = this.#waiting.get(`${e.stream}\u0000${e.partition}`)
      if (set !== undefined) for (const wake of [...set]) wake()
    })
  }

  get size (): number {
    let n = 0
    for (const set of this.#waiting.values()) n += set.size
    return n
  }

  /** Resolves on the next append to the partition, after `ms`, on abort, or on close. */
  wait (stream: string, partition: number, ms: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      if (this.#closed || signal.aborted || ms <= 0) return resolve()
      const key = `${stream}\u0000${partition}`
      let set = this.#waiting.get(key)
      if (set === undefined) { set = new Set(); this.#waiting.set(key, set) }
      const waiters = set
      const done = (): void => {
        clearTimeout(timer)
        signal.removeEventListener('abort', done)
        waiters.delete(done)
        if (waiters.size === 0 && this.#waiting.get(key) === waiters) this.#waiting.delete(key)
        this.#onSize(this.size)
        resolve()
      }
      const timer = setTimeout(done, ms)
      signal.addEventListener('abort', done, { once: true })
      waiters.add(done)
      this.#onSize(this.size)
    })
  }

  close (): void {
    this.#closed = true
    this.#unsubscribe()
    for (const set of [...this.#waiting.values()]) for (const wake of [...set]) wake()
  }
}

type Stop = 'range' | 'log' | 'limit' | 'budget'

export interface PartitionTarget {
  /** The store's `<tenant>/<stream>` name. */
  readonly stream: string
  /** The name the client used. */
  readonly name: string
  readonly partition: number
}

/** Where a read starts and ends on the partition (query/read-plan.ts's PartitionRange). */
export type RangeBounds = PartitionRange

/** The request's range placed on the partition; HTTP_OFFSET_OUT_OF_RANGE when the start lies outside the log. */
export async function resolveBounds (store: LogStore, target: PartitionTarget, req: RecordsRequest): Promise<RangeBounds> {
  try {
    // Fails now, before any header is sent, when the start is outside the log (retention passed it, or it is in the future).
    return await resolveRange(store, target.stream, target.partition, readRangeOf(req), { outside: 'fail', snapshot: false })
  } catch (err) {
    throw isQueryError(err) ? toApiError(err) : err
  }
}

async function openReader (store: LogStore, target: PartitionTarget, req: RecordsRequest, slice: CpuSlice): Promise<PartitionReader> {
  return new PartitionReader(store, await resolveBounds(store, target, req), { filter: recordFilter(req), slice })
}

// ---------------------------------------------------------------- output

const cbor = new Encoder({ useRecords: false, mapsAsObjects: true, variableMapSize: true })

function payloadBuffer (payload: Uint8Array): Buffer {
  return Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength)
}

/** The head of a definite-length CBOR item of major type `major` (4: array, 5: map) with `n` entries. */
function cborHead (major: 4 | 5, n: number): Buffer {
  const type = major << 5
  if (n < 24) return Buffer.from([type | n])
  if (n < 0x100) return Buffer.from([type | 24, n])
  if (n < 0x10000) return Buffer.from([type | 25, n >> 8, n & 0xff])
  const b = Buffer.allocUnsafe(5)
  b[0] = type | 26
  b.writeUInt32BE(n, 1)
  return b
}

/**
 * `{...summary, records: [...]}` as CBOR, the records encoded one slice at a time (a map and an array of
 * definite length, written head first: the same bytes cbor-x gives for the whole object, without one long run).
 */
async function cborBody (sum: Summary, records: readonly StoredRecord[], slice: CpuSlice): Promise<Buffer> {
  const entries = Object.entries(sum)
  const parts: Buffer[] = [cborHead(5, entries.length + 1)]
  for (const [k, v] of entries) parts.push(cbor.encode(k), cbor.encode(v))
  parts.push(cbor.encode('records'), cborHead(4, records.length))
  const pieces = await slicedPieces(slice, records, (r) => r.payload.byteLength, (piece) => Buffer.concat(piece.map((r) => cbor.encode(cborRecord(r)))))
  return Buffer.concat([...parts, ...pieces])
}

/** Records as JSON text with a separator after each (or between them, `between`), encoded one slice at a time. */
async function jsonPieces (json: RecordJson, records: readonly StoredRecord[], separator: 0x0a | 0x2c, between: boolean, slice: CpuSlice): Promise<Buffer[]> {
  return await slicedPieces(slice, records, (r) => r.payload.byteLength, (piece, last) => json.encode(piece, separator, between && last))
}

function cborRecord (r: StoredRecord): Record<string, unknown> {
  const out: Record<string, unknown> = { offset: r.offset, timestamp: r.timestamp, key: r.key, topic: r.topic, qos: r.qos, clientId: r.clientId }
  if (r.headers !== null) out.headers = r.headers
  out.payload = payloadBuffer(r.payload)
  return out
}

interface Summary {
  readonly stream: string
  readonly partition: number
  readonly nextOffset: number
  readonly logStartOffset: number
  readonly logEndOffset: number
  /** True when the read reached the end of the requested range (`to` / `endOffset`): nothing more will ever come. */
  readonly endOfRange: boolean
}

function summary (store: LogStore, target: PartitionTarget, reader: PartitionReader, stop: Stop): Summary {
  // A long poll that timed out past a standby's rewound log end: the client goes on from the new end, not past it.
  reader.checkRewound()
  const info = store.partitionInfo(target.stream, target.partition)
  return {
    stream: target.name,
    partition: target.partition,
    nextOffset: reader.next,
    logStartOffset: info.logStartOffset,
    logEndOffset: info.logEndOffset,
    endOfRange: stop === 'range',
  }
}

export interface FetchContext {
  readonly store: LogStore
  readonly waiters: AppendWaiters
  /** Aborted when the client goes away. */
  readonly signal: AbortSignal
}

/**
 * Reads until something matches, the range ends, or the wait runs out —
 * the part every format shares. Returns the first chunk of records.
 */
async function firstChunk (ctx: FetchContext, target: PartitionTarget, reader: PartitionReader, req: RecordsRequest,
  budget: number): Promise<{ records: StoredRecord[], bytes: number, stop: Stop | null }> {
  const deadline = performance.now() + req.waitMs
  let scanned = 0
  for (;;) {
    const chunk = await reader.step({ records: req.maxRecords, bytes: req.maxBytes, first: true })
    scanned += chunk.scanned
    if (chunk.records.length > 0 || chunk.stop === 'range' || chunk.stop === 'limit') return chunk
    if (ctx.signal.aborted) return { records: [], bytes: 0, stop: 'log' }
    if (chunk.stop === null) {
      // A filter rejected a whole step; go on, within the budget.
      if (scanned >= budget) return { records: [], bytes: 0, stop: 'budget' }
      continue
    }
    // Caught up with the log end: wait for an append, unless one already came in meanwhile.
    const left = deadline - performance.now()
    if (left <= 0) return chunk
    if (ctx.store.partitionInfo(target.stream, target.partition).logEndOffset <= reader.next) {
      await ctx.waiters.wait(target.stream, target.partition, left, ctx.signal)
    }
  }
}

/** Serves GET …/records for one partition in the requested format. */
export async function serveRecords (ctx: FetchContext, target: PartitionTarget, req: RecordsRequest, res: ServerResponse): Promise<void> {
  const slice = new CpuSlice()
  const reader = await openReader(ctx.store, target, req, slice)
  if (req.format === 'ndjson') return streamNdjson(ctx, target, reader, req, res, slice)
  const first = await firstChunk(ctx, target, reader, req, SCAN_BUDGET)
  const records = first.records
  let bytes = first.bytes
  let stop = first.stop
  let scanned = 0
  while (stop === null && !ctx.signal.aborted) {
    const chunk = await reader.step({ records: req.maxRecords - records.length, bytes: req.maxBytes - bytes, first: records.length === 0 })
    for (const r of chunk.records) records.push(r)
    bytes += chunk.bytes
    scanned += chunk.scanned
    stop = chunk.stop ?? (scanned >= SCAN_BUDGET ? 'budget' : null)
  }
  const sum = summary(ctx.store, target, reader, stop ?? 'log')
  if (req.format === 'cbor') {
    const body = await cborBody(sum, records, slice)
    res.writeHead(200, { 'content-type': 'application/cbor', 'content-length': body.length })
    res.end(body)
    return
  }
  const { nextOffset, logStartOffset, logEndOffset, endOfRange } = sum
  const body = Buffer.concat([
    Buffer.from(`{"stream":${JSON.stringify(sum.stream)},"partition":${sum.partition},"records":[`),
    ...await jsonPieces(new RecordJson(req.payload), records, 0x2c, true, slice),
    Buffer.from(`],"nextOffset":${nextOffset},"logStartOffset":${logStartOffset},"logEndOffset":${logEndOffset},"endOfRange":${String(endOfRange)}}`),
  ])
  res.writeHead(200, { 'content-type': 'application/json; charset=utf-8', 'content-length': body.length })
  res.end(body)
}

/**
 * NDJSON: one record per line, written as it is read with the socket's
 * backpressure respected, then one last line `{"end":{…}}` with where to
 * continue — a stream without it was cut short. An error after the first
 * line becomes a last line `{"error":{…}}`.
 */
async function streamNdjson (ctx: FetchContext, target: PartitionTarget, reader: PartitionReader, req: RecordsRequest, res: ServerResponse,
  slice: CpuSlice): Promise<void> {
  // Errors up to the first records still get a proper status.
  const first = await firstChunk(ctx, target, reader, req, Number.MAX_SAFE_INTEGER)
  res.writeHead(200, { 'content-type': 'application/x-ndjson; charset=utf-8', 'cache-control': 'no-store' })
  const json = new RecordJson(req.payload)
  let count = 0
  let bytes = 0
  let stop: Stop | null = first.stop
  const write = async (records: readonly StoredRecord[]): Promise<void> => {
    if (records.length === 0) return
    count += records.length
    let full = false
    for (const piece of await jsonPieces(json, records, 0x0a, false, slice)) full = !res.write(piece)
    // Rejects with an AbortError when the client goes away; `once` removes its listener either way.
    if (full) await once(res, 'drain', { signal: ctx.signal })
  }
  try {
    await write(first.records)
    bytes += first.bytes
    while (stop === null && !ctx.signal.aborted && !res.destroyed) {
      const chunk = await reader.step({ records: req.maxRecords - count, bytes: req.maxBytes - bytes, first: count === 0 })
      await write(chunk.records)
      bytes += chunk.bytes
      stop = chunk.stop
    }
    const end = summary(ctx.store, target, reader, stop ?? 'log')
    res.end(`${JSON.stringify({ end: { ...end, records: count } })}\n`)
  } catch (err) {
    if (ctx.signal.aborted || res.destroyed) return
    res.end(`${JSON.stringify(toApiError(err).toJSON())}\n`)
  }
}

/** Aborts when the request's connection closes before the response is done. */
export function clientGone (req: IncomingMessage, res: ServerResponse): AbortSignal {
  const controller = new AbortController()
  res.once('close', () => { if (!res.writableFinished) controller.abort() })
  req.once('error', () => controller.abort())
  return controller.signal
}
