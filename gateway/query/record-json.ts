/**
 * Records as the JSON text of the /v1 API (JSON and NDJSON formats),
 * written straight into bytes: the hot path of a replay, where a consumer
 * asks for a million records and building a JavaScript string per record,
 * then encoding it again as UTF-8, cost more than reading the log.
 *
 * A record is `{"offset":…,"timestamp":…,"key":…,"topic":…,"qos":…,
 * "clientId":…[,"headers":{…}],"payload":…}`. The bytes are exactly those of
 * JSON.stringify of the same fields: a payload that is valid UTF-8 is copied
 * and escaped byte by byte with JSON.stringify's rules (`"` `\` and the
 * control characters; \b \f \n \r \t in short form, the others as \u00XX),
 * and anything else (invalid UTF-8, base64, headers, fractional timestamps)
 * goes through JSON.stringify itself. The `key`/`topic`/`qos`/`clientId`
 * part repeats for a device's records and is encoded once per topic.
 */
import { isUtf8 } from 'node:buffer'
import type { StoredRecord } from '../../store/index.ts'

export type PayloadEncoding = 'utf8' | 'base64'

/** How each byte of a UTF-8 payload is written inside a JSON string: 0 as is, else the escape's first byte after `\`. */
const ESCAPE = new Uint8Array(256)
for (let b = 0; b < 0x20; b++) ESCAPE[b] = 0x75 // u
ESCAPE[0x08] = 0x62 // b
ESCAPE[0x09] = 0x74 // t
ESCAPE[0x0a] = 0x6e // n
ESCAPE[0x0c] = 0x66 // f
ESCAPE[0x0d] = 0x72 // r
ESCAPE[0x22] = 0x22 // "
ESCAPE[0x5c] = 0x5c // \
const HEX = Buffer.from('0123456789abcdef', 'latin1')

const OFFSET = Buffer.from('{"offset":', 'latin1')
const TIMESTAMP = Buffer.from(',"timestamp":', 'latin1')
const PAYLOAD = Buffer.from(',"payload":', 'latin1')
/** Room for a record's fixed parts besides its payload and the per-topic part: the three names above, two numbers, quotes, brace, separator. */
const FIXED_BYTES = OFFSET.length + TIMESTAMP.length + PAYLOAD.length + 2 * 24 + 4
/** "00" … "99", for writing numbers two digits at a time. */
const PAIRS = Buffer.from(Array.from({ length: 100 }, (_, i) => String(i).padStart(2, '0')).join(''), 'latin1')

interface Middle {
  readonly key: string
  readonly clientId: string
  readonly qos: number
  /** `,"key":…,"topic":…,"qos":…,"clientId":…` */
  readonly bytes: Buffer
  /** The same followed by `,"payload":`, for records without headers. */
  readonly withPayload: Buffer
}

export class RecordJson {
  /** The `,"key":…,"topic":…,"qos":…,"clientId":…` part, by topic (a device's topic names it). */
  readonly #middles = new Map<string, Middle>()
  /** `{"partition":P,"offset":`, by partition (the command line's records name their partition first). */
  readonly #openings = new Map<number, Buffer>()

  constructor (private readonly encoding: PayloadEncoding) {}

  #middle (r: StoredRecord): Middle {
    let m = this.#middles.get(r.topic)
    if (m === undefined || m.key !== r.key || m.clientId !== r.clientId || m.qos !== r.qos) {
      if (this.#middles.size >= 10_000) this.#middles.clear()
      const text = `,"key":${JSON.stringify(r.key)},"topic":${JSON.stringify(r.topic)},"qos":${r.qos},"clientId":${JSON.stringify(r.clientId)}`
      m = { key: r.key, clientId: r.clientId, qos: r.qos, bytes: Buffer.from(text, 'utf8'), withPayload: Buffer.from(`${text},"payload":`, 'utf8') }
      this.#middles.set(r.topic, m)
    }
    return m
  }

  #opening (partition: number | undefined): Buffer {
    if (partition === undefined) return OFFSET
    let opening = this.#openings.get(partition)
    if (opening === undefined) {
      opening = Buffer.from(`{"partition":${partition},"offset":`, 'latin1')
      this.#openings.set(partition, opening)
    }
    return opening
  }

  /**
   * The records' JSON, each followed by `separator` (a newline for NDJSON),
   * or between them when `between` is set (a JSON array's commas). With
   * `partition`, each record starts with `"partition":P`.
   */
  encode (records: readonly StoredRecord[], separator: 0x0a | 0x2c = 0x0a, between = false, partition?: number): Buffer {
    let room = 1024
    for (const r of records) room += FIXED_BYTES + 32 + 6 * r.payload.byteLength
    let out = Buffer.allocUnsafe(room)
    let at = 0
    for (let i = 0; i < records.length; i++) {
      const sep = !between || i < records.length - 1 ? separator : null
      let end = this.encodeInto(out, at, records[i] as StoredRecord, sep, partition)
      while (end < 0) {
        const bigger = Buffer.allocUnsafe(out.length * 2)
        out.copy(bigger, 0, 0, at)
        out = bigger
        end = this.encodeInto(out, at, records[i] as StoredRecord, sep, partition)
      }
      at = end
    }
    return out.subarray(0, at)
  }

  /**
   * Writes one record's JSON (and `separator`, unless null) into `out` at
   * `at`; returns where it ends, or -1 when `out` has not enough room
   * (nothing of the record counts then).
   */
  encodeInto (out: Buffer, at: number, r: StoredRecord, separator: number | null, partition?: number): number {
    const opening = this.#opening(partition)
    const middle = this.#middle(r)
    const p = r.payload
    // Everything that is not a plain UTF-8 payload goes through JSON.stringify (or base64) first, to know its size.
    const headers = r.headers === null ? null : Buffer.from(`,"headers":${JSON.stringify(r.headers)}`, 'utf8')
    const plain = this.encoding === 'utf8' && isUtf8(p)
    const bytes = plain ? null : Buffer.from(p.buffer, p.byteOffset, p.byteLength)
    const payload = bytes === null
      ? null
      : Buffer.from(this.encoding === 'base64' ? `"${bytes.toString('base64')}"` : JSON.stringify(bytes.toString('utf8')), 'utf8')
    const need = FIXED_BYTES + opening.length + middle.withPayload.length + (headers?.length ?? 0) + (payload?.length ?? 6 * p.byteLength + 2)
    if (at + need > out.length) return -1
    // TypedArray#set, not Buffer#copy: these copies are a few bytes each, and copy()'s argument checks cost more.
    out.set(opening, at)
    at = writeNumber(out, at + opening.length, r.offset)
    out.set(TIMESTAMP, at)
    at += TIMESTAMP.length
    if (Number.isSafeInteger(r.timestamp) && r.timestamp >= 0) at = writeNumber(out, at, r.timestamp)
    else at += out.write(JSON.stringify(r.timestamp), at, 'latin1')
    if (headers === null) {
      out.set(middle.withPayload, at)
      at += middle.withPayload.length
    } else {
      out.set(middle.bytes, at)
      at += middle.bytes.length
      out.set(headers, at)
      at += headers.length
      out.set(PAYLOAD, at)
      at += PAYLOAD.length
    }
    if (payload === null) {
      at = writeEscaped(out, at, p)
    } else {
      out.set(payload, at)
      at += payload.length
    }
    out[at++] = 0x7d // }
    if (separator !== null) out[at++] = separator
    return at
  }
}

/** A non-negative safe integer as decimal digits at `at`; returns the end. */
function writeNumber (out: Buffer, at: number, n: number): number {
  if (n < 100_000_000) return writeSmall(out, at, n)
  // Millisecond timestamps do not fit 31 bits: the digits above 10^8, then the last eight, each in small-integer arithmetic.
  const hi = Math.floor(n / 100_000_000)
  at = writeSmall(out, at, hi)
  let lo = n - hi * 100_000_000
  for (let end = at + 8; end > at; end -= 2) {
    const q = (lo / 100) | 0
    const pair = (lo - q * 100) * 2
    out[end - 1] = PAIRS[pair + 1] as number
    out[end - 2] = PAIRS[pair] as number
    lo = q
  }
  return at + 8
}

/** 0 <= n < 10^8, two digits at a time. */
function writeSmall (out: Buffer, at: number, n: number): number {
  const digits = n < 10 ? 1 : n < 100 ? 2 : n < 1000 ? 3 : n < 10_000 ? 4 : n < 100_000 ? 5 : n < 1_000_000 ? 6 : n < 10_000_000 ? 7 : 8
  let end = at + digits
  while (n >= 100) {
    const q = (n / 100) | 0
    const pair = (n - q * 100) * 2
    out[--end] = PAIRS[pair + 1] as number
    out[--end] = PAIRS[pair] as number
    n = q
  }
  if (n >= 10) {
    out[--end] = PAIRS[n * 2 + 1] as number
    out[--end] = PAIRS[n * 2] as number
  } else {
    out[--end] = 0x30 + n
  }
  return at + digits
}

/** A valid UTF-8 payload as a JSON string (quotes included) at `at`; returns the end. */
function writeEscaped (out: Buffer, at: number, p: Uint8Array): number {
  out[at++] = 0x22
  for (let i = 0; i < p.length; i++) {
    const b = p[i] as number
    const e = ESCAPE[b] as number
    if (e === 0) {
      out[at++] = b
    } else {
      out[at++] = 0x5c
      out[at++] = e
      if (e === 0x75) {
        out[at++] = 0x30
        out[at++] = 0x30
        out[at++] = HEX[b >> 4] as number
        out[at++] = HEX[b & 15] as number
      }
    }
  }
  out[at++] = 0x22
  return at
}
