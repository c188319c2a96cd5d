/**
 * `edgemq replay` and `edgemq tail`: read a stream's records, filtered as
 * the /v1 API filters them, and write them as NDJSON, JSON or CBOR.
 *
 * Two sources give the same records: a running gateway over HTTP and a
 * stopped gateway's data directory (the store, read directly). Over HTTP,
 * an unfiltered read fetches the stored batches as they are
 * (`format=batches`, decoded here by cli/batches.ts); a filtered one, the
 * API's NDJSON with payloads as base64, filtered by the gateway. Positions,
 * ranges, partitions and filters are parsed and checked here before
 * anything is read, by the read path the API uses (query/read-plan.ts), so
 * both modes accept and refuse the same input; a data directory is read
 * through that read path too (a snapshot: up to each partition's log end).
 *
 * Several partitions are read one after the other, in partition order (order
 * is only defined within a partition; every output record carries its
 * partition). An offset is a position in one partition, so `--from`/`--to`
 * offsets need the read to cover one partition.
 *
 * `--from` / `--to`: a bare integer is an offset; anything else is a time in
 * the API's syntax, with epoch milliseconds written `@1714528800000`.
 */
import { once } from 'node:events'
import { createWriteStream } from 'node:fs'
import { rename, rm } from 'node:fs/promises'
import path from 'node:path'
import { Encoder } from 'cbor-x'
import type { StoredRecord } from '../../store/index.ts'
import { CliError, cliErrorForQuery } from './errors.ts'
import { readBatchStream } from './batches.ts'
import { RecordJson } from '../query/record-json.ts'
import { apiFailure, ndjsonLines, type ApiClient } from './http-client.ts'
import { streamDoc, type OfflineLog, type StreamDoc } from './offline.ts'
import { createProgress, type Progress, type ProgressStream } from './progress-bar.ts'
import { FilterExpressionError } from '../query/filter-expression.ts'
import { isQueryError } from '../query/errors.ts'
import {
  checkRange as checkReadRange, compileRecordFilter, parsePosition as parseReadPosition, PartitionReader as RangeReader, readRange, resolveRange,
  selectPartitions, type FilterSpec, type Position, type RecordFilter,
} from '../query/read-plan.ts'

export type { Position }

export type OutputFormat = 'ndjson' | 'json' | 'cbor'
export type PayloadEncoding = 'utf8' | 'base64'

/** A record as the CLI writes it: the API's record plus its partition. */
export interface CliRecord {
  readonly partition: number
  readonly offset: number
  readonly timestamp: number
  readonly key: string
  readonly topic: string
  readonly qos: number
  readonly clientId: string
  readonly headers: Readonly<Record<string, string>> | null
  readonly payload: Buffer
}

export interface Filters extends FilterSpec {
  readonly where: string | undefined
}

export interface ReadSpec {
  readonly stream: string
  readonly partition: number | undefined
  readonly from: Position | undefined
  readonly to: Position | undefined
  readonly filters: Filters
  readonly maxRecords: number | undefined
}

/**
 * `--from` / `--to`: `earliest`, `latest` (start only), a bare integer
 * (an offset), or a time: ISO 8601 with a zone, a date, `now`, `-15m`, or
 * `@<epoch ms>`.
 */
export function parsePosition (text: string, flag: string, now: number, ends = flag === '--from'): Position {
  try {
    return parseReadPosition(text, now, { name: flag, start: ends })
  } catch (err) {
    if (!isQueryError(err)) throw err
    throw cliErrorForQuery(err, ` (${flag} takes ${ends ? 'earliest, latest, ' : ''}an offset such as 17, or a time: ` +
      '2024-05-01T02:00:00Z, 2024-05-01, now, -15m, or epoch milliseconds as @1714528800000)')
  }
}

/** The expression with a caret under the position of the problem. */
export function markPosition (text: string, position: number): string {
  const line = text.replace(/[\r\n\t]/g, ' ')
  return `  ${line}\n  ${' '.repeat(Math.min(position, line.length))}^`
}

/** Checks the filters as the API would, before anything is read; returns them as one predicate (null: none). */
export function checkFilters (filters: Filters): RecordFilter | null {
  try {
    return compileRecordFilter(filters, '--topic')
  } catch (err) {
    if (err instanceof FilterExpressionError && filters.where !== undefined) {
      throw new CliError('CLI_BAD_FILTER', `--where: ${err.message}:\n${markPosition(filters.where, err.position)}`, { cause: err })
    }
    throw isQueryError(err) ? cliErrorForQuery(err) : err
  }
}

function checkRange (spec: ReadSpec): void {
  try {
    checkReadRange(readRange(spec.from, spec.to), { startOffset: '--from', endOffset: '--to', startTime: '--from', endTime: '--to' })
  } catch (err) {
    throw isQueryError(err) ? cliErrorForQuery(err) : err
  }
}

/** Which partitions a read covers: the one asked for, those of the devices asked for, or all. */
export function targetPartitions (spec: ReadSpec, stream: StreamDoc): number[] {
  const count = stream.partitionCount
  let partitions: number[]
  try {
    partitions = selectPartitions(spec.stream, count, { partition: spec.partition, keys: spec.filters.keys })
  } catch (err) {
    throw isQueryError(err) ? cliErrorForQuery(err) : err
  }
  for (const [flag, pos] of [['--from', spec.from], ['--to', spec.to]] as const) {
    if (pos?.kind === 'offset' && partitions.length !== 1) {
      throw new CliError('CLI_BAD_ARGUMENT',
        `${flag} ${pos.offset} is an offset, and offsets are per partition: add --partition (stream ${spec.stream} has ${count} partitions)`)
    }
  }
  return partitions
}

// ---------------------------------------------------------------- output

const cbor = new Encoder({ useRecords: false, mapsAsObjects: true, variableMapSize: true })

/** One record as a JSON object: the API's record layout, with `partition` first. */
export function recordJson (r: CliRecord, payload: PayloadEncoding): string {
  return new RecordJson(payload).encode([r as unknown as StoredRecord], 0x0a, true, r.partition).toString('utf8')
}

/**
 * Writes to stdout or a file with backpressure; a reader that went away
 * (EPIPE) ends the run quietly. Small writes (one per record) are gathered
 * into chunks of up to SINK_CHUNK_BYTES, written when a chunk is full or
 * once the event loop turns (so `tail` still prints each record at once):
 * one stream write per record cost a replay as much as decoding it.
 */
const SINK_CHUNK_BYTES = 64 * 1024

export class OutputSink {
  #closed = false
  #error: Error | null = null
  readonly #ownsStream: boolean
  #pending: Array<string | Uint8Array> = []
  #pendingBytes = 0
  #flushScheduled = false

  private constructor (private readonly stream: NodeJS.WritableStream, owns: boolean) {
    this.#ownsStream = owns
    stream.on('error', (err: NodeJS.ErrnoException) => {
      this.#closed = true
      if (err.code !== 'EPIPE') this.#error = err
    })
  }

  static stdout (stream: NodeJS.WritableStream = process.stdout): OutputSink {
    return new OutputSink(stream, false)
  }

  /**
   * `atomic`: write a temporary file beside `file` and rename it over `file` on close(), so that a run that
   * fails leaves an existing file as it was (discard() removes the temporary one) instead of truncated.
   */
  static async file (file: string, options: { atomic?: boolean } = {}): Promise<OutputSink> {
    const target = options.atomic === true ? path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`) : file
    const stream = createWriteStream(target)
    try {
      await once(stream, 'open')
    } catch (cause) {
      throw new CliError('CLI_OUTPUT', `cannot write --out ${file}: ${(cause as Error).message}`, { cause })
    }
    const sink = new OutputSink(stream, true)
    if (target !== file) sink.#rename = { from: target, to: file }
    return sink
  }

  #rename: { from: string, to: string } | null = null

  /** Drops a run's output: an atomic file's temporary file is closed and removed. */
  async discard (): Promise<void> {
    if (this.#rename === null) return
    const { from } = this.#rename
    this.#rename = null
    this.#closed = true
    this.stream.end()
    await once(this.stream, 'close').catch(() => {})
    await rm(from, { force: true })
  }

  /** False once the reader went away: stop reading. */
  get open (): boolean { return !this.#closed }

  async write (chunk: string | Uint8Array): Promise<void> {
    if (this.#closed) return
    this.#pending.push(chunk)
    this.#pendingBytes += typeof chunk === 'string' ? chunk.length : chunk.byteLength
    if (this.#pendingBytes >= SINK_CHUNK_BYTES) {
      await this.#flush()
    } else if (!this.#flushScheduled) {
      this.#flushScheduled = true
      setImmediate(() => { this.#flushScheduled = false; void this.#flush() })
    }
  }

  /** Writes what was gathered; resolves once the stream can take more. */
  async #flush (): Promise<void> {
    if (this.#pending.length === 0 || this.#closed) return
    const parts = this.#pending
    this.#pending = []
    this.#pendingBytes = 0
    const data = parts.every((p) => typeof p === 'string')
      ? parts.join('')
      : Buffer.concat(parts.map((p) => typeof p === 'string' ? Buffer.from(p) : p))
    if (!this.stream.write(data)) {
      await new Promise<void>((resolve) => {
        const done = (): void => { this.stream.off('drain', done); this.stream.off('error', done); resolve() }
        this.stream.once('drain', done)
        this.stream.once('error', done)
      })
    }
  }

  /** Ends a file; for stdout, waits until what was written has reached the OS, since `edgemq` ends with process.exit. */
  async close (): Promise<void> {
    await this.#flush()
    if (this.#ownsStream && !this.#closed) {
      this.stream.end()
      await once(this.stream, 'finish').catch(() => {})
    } else if (!this.#closed) {
      await new Promise<void>((resolve) => {
        this.stream.once('error', () => resolve())
        this.stream.write('', () => resolve())
      })
    }
    if (this.#error !== null) {
      await this.discard()
      throw new CliError('CLI_OUTPUT', `cannot write the output: ${this.#error.message}`, { cause: this.#error })
    }
    if (this.#rename !== null) {
      const { from, to } = this.#rename
      this.#rename = null
      try {
        await rename(from, to)
      } catch (cause) {
        await rm(from, { force: true })
        throw new CliError('CLI_OUTPUT', `cannot write --out ${to}: ${(cause as Error).message}`, { cause })
      }
    }
  }
}

const JSON_OPEN = Buffer.from('[\n')
const JSON_NEXT = Buffer.from(',\n')
const SCRATCH_BYTES = 256 * 1024

/** Frames records in the chosen format. */
export class RecordWriter {
  #count = 0
  readonly #json: RecordJson
  /** NDJSON and JSON records are written into this and handed to the sink as views, not one buffer each. */
  #scratch = Buffer.allocUnsafe(SCRATCH_BYTES)
  #at = 0

  constructor (private readonly sink: OutputSink, private readonly format: OutputFormat, payload: PayloadEncoding) {
    this.#json = new RecordJson(payload)
  }

  get count (): number { return this.#count }

  /** Writes one record; returns its size in the output, in bytes. */
  async write (r: CliRecord): Promise<number> {
    let chunk: Uint8Array
    if (this.format === 'cbor') {
      const doc: Record<string, unknown> = {
        partition: r.partition, offset: r.offset, timestamp: r.timestamp, key: r.key, topic: r.topic, qos: r.qos, clientId: r.clientId,
      }
      if (r.headers !== null) doc.headers = r.headers
      doc.payload = r.payload
      chunk = cbor.encode(doc)
    } else {
      const record = r as unknown as StoredRecord
      if (this.format === 'json') this.#put(this.#count === 0 ? JSON_OPEN : JSON_NEXT)
      const start = this.#at
      let end = this.#json.encodeInto(this.#scratch, start, record, this.format === 'ndjson' ? 0x0a : null, r.partition)
      if (end < 0) {
        this.#scratch = Buffer.allocUnsafe(Math.max(SCRATCH_BYTES, 2 * this.#scratch.length))
        this.#at = 0
        end = this.#json.encodeInto(this.#scratch, 0, record, this.format === 'ndjson' ? 0x0a : null, r.partition)
        while (end < 0) {
          this.#scratch = Buffer.allocUnsafe(2 * this.#scratch.length)
          end = this.#json.encodeInto(this.#scratch, 0, record, this.format === 'ndjson' ? 0x0a : null, r.partition)
        }
      }
      chunk = this.#scratch.subarray(this.#at, end)
      this.#at = end
    }
    this.#count++
    await this.sink.write(chunk)
    return chunk.byteLength
  }

  #put (bytes: Buffer): void {
    if (this.#at + bytes.length > this.#scratch.length) { this.#scratch = Buffer.allocUnsafe(SCRATCH_BYTES); this.#at = 0 }
    bytes.copy(this.#scratch, this.#at)
    void this.sink.write(this.#scratch.subarray(this.#at, this.#at + bytes.length))
    this.#at += bytes.length
  }

  async finish (): Promise<void> {
    if (this.format === 'json') await this.sink.write(this.#count === 0 ? '[]\n' : '\n]\n')
  }
}

// ---------------------------------------------------------------- sources

/** Reads one partition's range; calls `emit` per matching record and returns where the read ended. */
export interface PartitionReader {
  /** `until`: the partition's log end when the replay started; a read need not go past it (a replay is a snapshot). */
  read (partition: number, emit: (r: CliRecord) => Promise<boolean>, signal?: AbortSignal, until?: number): Promise<{ nextOffset: number }>
}

export interface ReplaySource {
  stream (name: string): Promise<StreamDoc>
  reader (spec: ReadSpec): PartitionReader
}

interface ApiRecordLine {
  readonly offset: number
  readonly timestamp: number
  readonly key: string
  readonly topic: string
  readonly qos: number
  readonly clientId: string
  readonly headers?: Record<string, string>
  readonly payload: string
}

interface FetchEnd {
  readonly nextOffset: number
  readonly endOfRange: boolean
  readonly logEndOffset?: number
  /** `emit` asked to stop: the response was abandoned. */
  readonly stopped?: boolean
}
interface EndLine { readonly end: FetchEnd }
interface ErrorLine { readonly error: { readonly code: string, readonly message: string } }

function positionQuery (pos: Position | undefined, start: boolean): Record<string, string> {
  if (pos === undefined) return {}
  switch (pos.kind) {
    case 'earliest': case 'latest': return { offset: pos.kind }
    case 'offset': return start ? { offset: String(pos.offset) } : { endOffset: String(pos.offset) }
    case 'time': return start ? { from: String(pos.timestamp) } : { to: String(pos.timestamp) }
  }
}

function hasFilters (filters: Filters): boolean {
  return filters.keys.length > 0 || filters.topics.length > 0 || filters.where !== undefined
}

function storedToCli (partition: number, r: StoredRecord): CliRecord {
  return {
    partition, offset: r.offset, timestamp: r.timestamp, key: r.key, topic: r.topic, qos: r.qos, clientId: r.clientId,
    headers: r.headers, payload: Buffer.from(r.payload.buffer, r.payload.byteOffset, r.payload.byteLength),
  }
}

/**
 * One fetch of a partition: records until the gateway's last item. Without
 * filters, the stored batches (`format=batches`); with filters, NDJSON
 * filtered by the gateway.
 */
async function fetchPartition (api: ApiClient, spec: ReadSpec, partition: number, start: Position | undefined, extra: Record<string, string>,
  emit: (r: CliRecord) => Promise<boolean>, signal?: AbortSignal): Promise<FetchEnd> {
  const batches = !hasFilters(spec.filters)
  const range = { ...positionQuery(start, true), ...positionQuery(spec.to, false) }
  const url = api.url(['streams', spec.stream, 'partitions', partition, 'records'], batches
    ? { format: 'batches', ...range, ...extra }
    : { format: 'ndjson', payload: 'base64', ...range, key: spec.filters.keys, topic: spec.filters.topics, where: spec.filters.where, ...extra })
  const controller = new AbortController()
  const onAbort = (): void => controller.abort()
  signal?.addEventListener('abort', onAbort, { once: true })
  // When `emit` asks to stop, the loops are left first (closing the body), and the request aborted after.
  let stopped: FetchEnd | null = null
  try {
    const res = await api.request(url, { signal: controller.signal })
    if (batches) {
      if (res.body === null) throw new CliError('CLI_CUT_SHORT', `the gateway sent no body for ${spec.stream}[${partition}]`)
      items: for await (const item of readBatchStream(res.body as unknown as AsyncIterable<Uint8Array>)) {
        if (item.kind === 'end') return item.end
        if (item.kind === 'error') throw apiFailure(item.error.code, item.error.message)
        if (item.kind !== 'records') continue
        for (const r of item.records) {
          if (!await emit(storedToCli(partition, r))) {
            stopped = { nextOffset: r.offset + 1, endOfRange: false, stopped: true }
            break items
          }
        }
      }
    } else {
      for await (const line of ndjsonLines(res)) {
        const parsed = JSON.parse(line) as ApiRecordLine | EndLine | ErrorLine
        if ('end' in parsed) return parsed.end
        if ('error' in parsed) throw apiFailure(parsed.error.code, parsed.error.message)
        const more = await emit({
          partition, offset: parsed.offset, timestamp: parsed.timestamp, key: parsed.key, topic: parsed.topic, qos: parsed.qos,
          clientId: parsed.clientId, headers: parsed.headers ?? null, payload: Buffer.from(parsed.payload, 'base64'),
        })
        if (!more) {
          stopped = { nextOffset: parsed.offset + 1, endOfRange: false, stopped: true }
          break
        }
      }
    }
    if (stopped !== null) return stopped
    throw new CliError('CLI_CUT_SHORT', `the gateway ended the response for ${spec.stream}[${partition}] before its last line (did it stop?)`)
  } finally {
    signal?.removeEventListener('abort', onAbort)
    if (stopped !== null) controller.abort()
  }
}

export function httpSource (api: ApiClient): ReplaySource {
  return {
    async stream (name) {
      return await api.json<StreamDoc>(api.url(['streams', name]))
    },
    reader (spec) {
      return {
        async read (partition, emit, signal, until = 0) {
          // One fetch reads up to the log end, unless the gateway ended a batches response early (a `to` it placed
          // meanwhile): then go on from where it stopped, up to the snapshot's end.
          let start = spec.from
          for (;;) {
            const end = await fetchPartition(api, spec, partition, start, {}, emit, signal)
            if (end.stopped === true || end.endOfRange || end.nextOffset >= until || (signal?.aborted ?? false)) return { nextOffset: end.nextOffset }
            start = { kind: 'offset', offset: end.nextOffset }
          }
        },
      }
    },
  }
}

/**
 * Reads the log of a stopped gateway through the read path the API uses
 * (query/read-plan.ts), as a snapshot: each partition up to its log end.
 */
export function offlineSource (log: OfflineLog): ReplaySource {
  const { store } = log
  return {
    async stream (name) {
      return streamDoc(log, log.streamInfo(name))
    },
    reader (spec) {
      const stream = log.streamInfo(spec.stream).name
      const filter = checkFilters(spec.filters)
      const range = readRange(spec.from, spec.to)
      return {
        async read (partition, emit) {
          let planned
          try {
            planned = await resolveRange(store, stream, partition, range, { outside: 'fail', snapshot: true })
          } catch (err) {
            throw isQueryError(err) ? cliErrorForQuery(err) : err
          }
          const reader = new RangeReader(store, planned, { filter })
          for (;;) {
            const chunk = await reader.step()
            for (const r of chunk.records) {
              if (!await emit(storedToCli(partition, r))) return { nextOffset: r.offset + 1 }
            }
            if (chunk.stop !== null) return { nextOffset: reader.next }
          }
        },
      }
    },
  }
}

// ---------------------------------------------------------------- commands

export interface OutputOptions {
  readonly format: OutputFormat
  readonly payload: PayloadEncoding
  readonly out: string | undefined
}

export interface ReplayIo {
  readonly stdout?: NodeJS.WritableStream
  readonly stderr: ProgressStream
  /** Draw the progress bar (when stderr is a terminal). */
  readonly progress: boolean
  readonly signal?: AbortSignal
}

function startOffsetEstimate (p: { logStartOffset: number, logEndOffset: number }, pos: Position | undefined): number {
  if (pos?.kind === 'offset') return pos.offset
  if (pos?.kind === 'latest') return p.logEndOffset
  return p.logStartOffset
}

/** `edgemq replay`: the records of a range, partition after partition. Returns the exit code. */
export async function replay (source: ReplaySource, spec: ReadSpec, output: OutputOptions, io: ReplayIo): Promise<number> {
  checkFilters(spec.filters)
  checkRange(spec)
  const stream = await source.stream(spec.stream)
  const partitions = targetPartitions(spec, stream)
  const reader = source.reader(spec)
  // A file appears (or replaces the one there) only when the replay succeeds.
  const sink = output.out === undefined ? OutputSink.stdout(io.stdout) : await OutputSink.file(output.out, { atomic: true })
  const writer = new RecordWriter(sink, output.format, output.payload)
  // A bar on the terminal would tear records printed to the same terminal.
  const stdoutIsTty = (io.stdout as ProgressStream | undefined ?? process.stdout as ProgressStream).isTTY === true
  const progress: Progress = createProgress(io.stderr, io.progress && (output.out !== undefined || !stdoutIsTty))
  const plans = partitions.map((p) => {
    const info = stream.partitions[p] as StreamDoc['partitions'][number]
    const end = spec.to?.kind === 'offset' ? Math.min(info.logEndOffset, spec.to.offset) : info.logEndOffset
    return { partition: p, planned: startOffsetEstimate(info, spec.from), end }
  })
  progress.addTotal(plans.reduce((n, { planned, end }) => n + Math.max(0, end - planned), 0))
  try {
    for (const { partition: p, planned, end } of plans) {
      let position: number | null = null
      const done = await reader.read(p, async (r) => {
        // A time start is only known at the first record; everything before it was skipped.
        if (position === null) { progress.addTotal(-(Math.max(0, r.offset - planned))); position = Math.max(planned, r.offset) }
        const bytes = await writer.write(r)
        progress.advance(r.offset + 1 - position, 1, bytes)
        position = r.offset + 1
        return sink.open && !(io.signal?.aborted ?? false) && (spec.maxRecords === undefined || writer.count < spec.maxRecords)
      }, io.signal, end)
      if (position === null) progress.addTotal(-Math.max(0, end - planned))
      else progress.advance(Math.max(0, Math.min(done.nextOffset, end) - position), 0, 0)
      if (!sink.open || (io.signal?.aborted ?? false) || (spec.maxRecords !== undefined && writer.count >= spec.maxRecords)) break
    }
    await writer.finish()
  } catch (err) {
    await sink.discard()
    throw err
  } finally {
    progress.stop()
  }
  await sink.close()
  return 0
}

/** How long each long-poll of `edgemq tail` waits on the gateway, in seconds. */
export const TAIL_WAIT_SECONDS = 20

/**
 * `edgemq tail`: from the current log end (or `--from`) of every partition
 * read, print records as they are appended, until `signal` aborts or
 * `maxRecords` were printed. Each partition is followed by its own chain of
 * long-polls (the API's `wait`), so an idle gateway costs one open request
 * per partition.
 */
export async function tail (api: ApiClient, spec: ReadSpec, output: OutputOptions, io: ReplayIo): Promise<number> {
  checkFilters(spec.filters)
  checkRange(spec)
  const stream = await httpSource(api).stream(spec.stream)
  const partitions = targetPartitions(spec, stream)
  const sink = output.out === undefined ? OutputSink.stdout(io.stdout) : await OutputSink.file(output.out)
  const writer = new RecordWriter(sink, output.format, output.payload)
  const stop = new AbortController()
  const onAbort = (): void => stop.abort()
  io.signal?.addEventListener('abort', onAbort, { once: true })
  const emit = async (r: CliRecord): Promise<boolean> => {
    if (stop.signal.aborted) return false
    await writer.write(r)
    if (!sink.open || (spec.maxRecords !== undefined && writer.count >= spec.maxRecords)) { stop.abort(); return false }
    return true
  }
  const follow = async (partition: number): Promise<void> => {
    // Without --from: the log end as it was when tail started, so nothing appended from then on is missed.
    let start: Position = spec.from ?? { kind: 'offset', offset: (stream.partitions[partition] as StreamDoc['partitions'][number]).logEndOffset }
    while (!stop.signal.aborted) {
      const end = await fetchPartition(api, spec, partition, start, { wait: String(TAIL_WAIT_SECONDS) }, emit, stop.signal)
      if (end.endOfRange) return
      start = { kind: 'offset', offset: end.nextOffset }
    }
  }
  try {
    await Promise.all(partitions.map(async (p) => {
      try {
        await follow(p)
      } catch (err) {
        if (stop.signal.aborted && (err as Error).name === 'AbortError') return
        stop.abort()
        throw err
      }
    }))
    await writer.finish()
  } finally {
    io.signal?.removeEventListener('abort', onAbort)
  }
  await sink.close()
  return 0
}
