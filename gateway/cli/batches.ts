/**
 * The client side of the API's `format=batches` (http/batches.ts documents
 * the response): splits the CBOR sequence into its items as bytes arrive,
 * decodes each stored batch with the store's own decoder, and hands out only
 * the records of the response's range, `fromOffset <= offset < endOffset`
 * (whole batches may reach past either end).
 *
 * Checked as it goes: the head comes first, batches are contiguous and the
 * first holds `fromOffset`, every batch passes its CRC (STORE_CORRUPT_BATCH
 * otherwise, as when reading a data directory). A malformed response is
 * CLI_SERVER. Only the CBOR this API writes is understood: definite
 * lengths, no tags outside batch bytes.
 */
import { decode as decodeCbor } from 'cbor-x'
import { decodeStoredBatch, type StoredRecord } from '../../store/index.ts'
import { CliError } from './errors.ts'

export interface BatchStreamHead {
  readonly stream: string
  readonly partition: number
  readonly fromOffset: number
  readonly endOffset: number | null
}

export interface BatchStreamEnd {
  readonly nextOffset: number
  readonly logStartOffset: number
  readonly logEndOffset: number
  readonly endOfRange: boolean
  readonly records: number
  readonly batches: number
  readonly bytes: number
}

export type BatchStreamItem =
  | { readonly kind: 'head', readonly head: BatchStreamHead }
  /** The records of one stored batch that lie inside the range (possibly none). */
  | { readonly kind: 'records', readonly records: StoredRecord[] }
  | { readonly kind: 'end', readonly end: BatchStreamEnd }
  | { readonly kind: 'error', readonly error: { readonly code: string, readonly message: string } }

function malformed (why: string): CliError {
  return new CliError('CLI_SERVER', `malformed format=batches response: ${why}`)
}

/** Bytes received and not yet consumed, merged only when an item spans chunks. */
class ChunkQueue {
  #chunks: Buffer[] = []
  length = 0

  push (chunk: Uint8Array): void {
    if (chunk.byteLength === 0) return
    this.#chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength))
    this.length += chunk.byteLength
  }

  /** The first `n` (<= length) bytes as one buffer that may run on past `n`. */
  contiguous (n: number): Buffer {
    let first = this.#chunks[0] as Buffer
    if (first.length < n) {
      let k = 0
      let size = 0
      while (size < n) size += (this.#chunks[k++] as Buffer).length
      first = Buffer.concat(this.#chunks.slice(0, k), size)
      this.#chunks.splice(0, k, first)
    }
    return first
  }

  consume (n: number): void {
    this.length -= n
    while (n > 0) {
      const first = this.#chunks[0] as Buffer
      if (first.length > n) { this.#chunks[0] = first.subarray(n); return }
      n -= first.length
      this.#chunks.shift()
    }
  }
}

/** The length argument of the CBOR item head at `at`: [head bytes, value]; null when incomplete. */
function itemHead (buf: Buffer, at: number): [number, number] | null {
  if (at >= buf.length) return null
  const info = (buf[at] as number) & 0x1f
  if (info < 24) return [1, info]
  const size = info === 24 ? 1 : info === 25 ? 2 : info === 26 ? 4 : info === 27 ? 8 : 0
  if (size === 0) throw malformed(`unsupported CBOR item head 0x${(buf[at] as number).toString(16)} (indefinite length or reserved)`)
  if (at + 1 + size > buf.length) return null
  const value = size === 1
    ? buf[at + 1] as number
    : size === 2 ? buf.readUInt16BE(at + 1) : size === 4 ? buf.readUInt32BE(at + 1) : Number(buf.readBigUInt64BE(at + 1))
  return [1 + size, value]
}

/** The end of the CBOR item at `at` (definite lengths only), or -1 when it is not all there yet. */
export function cborItemEnd (buf: Buffer, at: number): number {
  const head = itemHead(buf, at)
  if (head === null) return -1
  const [headBytes, value] = head
  const major = (buf[at] as number) >> 5
  let end = at + headBytes
  switch (major) {
    case 0: case 1: case 7: return end
    case 2: case 3: return end + value <= buf.length ? end + value : -1
    case 6: return cborItemEnd(buf, end)
    case 4: case 5:
      for (let i = 0; i < value * (major === 5 ? 2 : 1); i++) {
        end = cborItemEnd(buf, end)
        if (end < 0) return -1
      }
      return end
  }
  return -1
}

function isMap (value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value) && !(value instanceof Uint8Array)
}

/**
 * The items of a CBOR sequence as its bytes arrive: byte strings as their
 * bytes (a view, not a copy, when they arrived in one chunk), anything else
 * decoded. Bytes that do not complete an item by the end are dropped (a
 * cut-off stream simply ends).
 */
export async function * cborSequence (body: AsyncIterable<Uint8Array>): AsyncGenerator<{ readonly bytes: Buffer } | { readonly value: unknown }> {
  const queue = new ChunkQueue()
  for await (const chunk of body) {
    queue.push(chunk)
    while (queue.length > 0) {
      const first = queue.contiguous(Math.min(queue.length, 9))
      if ((first[0] as number) >> 5 === 2) {
        const h = itemHead(first, 0)
        if (h === null || queue.length < h[0] + h[1]) break
        const bytes = queue.contiguous(h[0] + h[1]).subarray(h[0], h[0] + h[1])
        queue.consume(h[0] + h[1])
        yield { bytes }
        continue
      }
      const all = queue.contiguous(queue.length)
      const endAt = cborItemEnd(all, 0)
      if (endAt < 0) break
      const value: unknown = decodeCbor(all.subarray(0, endAt))
      queue.consume(endAt)
      yield { value }
    }
  }
}

/** The items of a `format=batches` response body, as its bytes arrive. */
export async function * readBatchStream (body: AsyncIterable<Uint8Array>): AsyncGenerator<BatchStreamItem> {
  let head: BatchStreamHead | null = null
  let expected = 0
  let done = false
  for await (const item of cborSequence(body)) {
    if (done) throw malformed('bytes after the last item')
    if ('bytes' in item) {
      if (head === null) throw malformed('a batch before the head')
      const records = decodeStoredBatch(item.bytes, { stream: head.stream, partition: head.partition })
      const base = records[0]?.offset ?? expected
      if (base > expected || base + records.length <= expected || (expected > head.fromOffset && base !== expected)) {
        throw malformed(`batch at base offset ${base} (${records.length} records) does not continue at offset ${expected}`)
      }
      expected = base + records.length
      const from = Math.max(0, head.fromOffset - base)
      const to = head.endOffset === null ? records.length : Math.max(from, Math.min(records.length, head.endOffset - base))
      yield { kind: 'records', records: from === 0 && to === records.length ? records : records.slice(from, to) }
      continue
    }
    const value = item.value
    if (!isMap(value)) throw malformed('an item that is neither a map nor a batch')
    if (head === null) {
      if (typeof value.fromOffset !== 'number' || typeof value.partition !== 'number' || typeof value.stream !== 'string' ||
        (value.endOffset !== null && typeof value.endOffset !== 'number')) {
        throw malformed('the first item is not the head {stream, partition, fromOffset, endOffset}')
      }
      head = { stream: value.stream, partition: value.partition, fromOffset: value.fromOffset, endOffset: value.endOffset as number | null }
      expected = head.fromOffset
      yield { kind: 'head', head }
    } else if (isMap(value.end)) {
      done = true
      yield { kind: 'end', end: value.end as unknown as BatchStreamEnd }
    } else if (isMap(value.error)) {
      done = true
      yield { kind: 'error', error: { code: String(value.error.code), message: String(value.error.message) } }
    } else {
      throw malformed('a map item that is neither the head, the end nor an error')
    }
  }
}
