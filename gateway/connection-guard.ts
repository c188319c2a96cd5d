/**
 * A Duplex that sits between a client's socket and aedes. aedes reads a
 * whole buffered chunk, handles every packet in it concurrently, and reads
 * again only when all are done; this wrapper decides what a "chunk" is:
 *
 * - it scans MQTT fixed headers as bytes arrive and destroys the connection
 *   as soon as a packet announces a remaining length over `maxPacketBytes`,
 *   before the body is buffered (aedes has no limit of its own);
 * - it hands aedes at most `maxInflight` packets at a time, so one client
 *   cannot have more publishes being appended at once;
 * - it stops reading from the socket while the gateway is paused (the log
 *   has too many appends pending) or the client is over its publish rate.
 *
 * The readable side has a high-water mark of one byte, so a segment is
 * pushed only when aedes asked for more. Writes pass straight through.
 */
import { Duplex } from 'node:stream'
import type { Socket } from 'node:net'

export interface GuardOptions {
  readonly maxPacketBytes: number
  readonly maxInflight: number
  /** Publishes per second; 0 = unlimited. */
  readonly publishRate: number
  /** Called once when the connection is closed for breaking a limit. */
  readonly onViolation: (reason: 'packet-too-large' | 'malformed-header', detail: string) => void
  /** Called when the client is slowed down for exceeding its publish rate. */
  readonly onRateLimited?: () => void
  readonly group: GuardGroup
}

const PUBLISH = 3

/** The connections of one gateway, paused and resumed together when its log backs up. */
export class GuardGroup {
  #paused = false
  readonly members = new Set<ConnectionGuard>()

  get paused (): boolean { return this.#paused }

  setPaused (paused: boolean): void {
    if (this.#paused === paused) return
    this.#paused = paused
    if (!paused) for (const guard of this.members) guard.pump()
  }
}

export class ConnectionGuard extends Duplex {
  readonly socket: Socket | Duplex
  readonly #options: GuardOptions
  /** Segments ready for aedes, each holding at most maxInflight packet starts. */
  readonly #segments: Buffer[] = []
  #wanted = false
  #ended = false
  // Header scanner state.
  #skip = 0 // body bytes of the current packet still to pass
  #header: number[] = [] // bytes of a fixed header seen so far
  // Segment being built.
  #parts: Buffer[] = []
  #starts = 0
  // Token bucket.
  #tokens: number
  #lastRefill = performance.now()
  #rateTimer: NodeJS.Timeout | undefined
  #rateLogged = false

  constructor (socket: Socket | Duplex, options: GuardOptions) {
    super({ readableHighWaterMark: 1, allowHalfOpen: false })
    this.socket = socket
    this.#options = options
    this.#tokens = Math.max(1, options.publishRate)
    options.group.members.add(this)
    socket.on('data', (chunk: Buffer) => this.#onData(chunk))
    socket.on('end', () => { this.#ended = true; this.#flushSegment(); this.pump() })
    socket.on('error', (err) => this.destroy(err))
    socket.on('close', () => this.destroy())
  }

  get remoteAddress (): string | undefined { return (this.socket as Socket).remoteAddress }

  #onData (chunk: Buffer): void {
    let from = 0
    let i = 0
    const { maxInflight } = this.#options
    let publishes = 0
    while (i < chunk.length) {
      if (this.#skip > 0) {
        const n = Math.min(this.#skip, chunk.length - i)
        this.#skip -= n
        i += n
        continue
      }
      if (this.#header.length === 0) {
        // A new packet starts at i.
        if (this.#starts === maxInflight) {
          this.#parts.push(chunk.subarray(from, i))
          from = i
          this.#flushSegment()
        }
        this.#starts++
        if ((chunk[i] as number) >> 4 === PUBLISH) publishes++
      }
      const byte = chunk[i++] as number
      this.#header.push(byte)
      if (this.#header.length === 1) continue
      // Remaining length: up to four 7-bit groups, continuation in the top bit [MQTT-2.2.3].
      if ((byte & 0x80) !== 0) {
        if (this.#header.length === 5) return this.#violate('malformed-header', 'remaining length longer than 4 bytes')
        continue
      }
      let length = 0
      for (let k = this.#header.length - 1; k >= 1; k--) length = length * 128 + ((this.#header[k] as number) & 0x7f)
      const total = length + this.#header.length
      this.#header = []
      if (total > this.#options.maxPacketBytes) {
        return this.#violate('packet-too-large', `packet of ${total} bytes exceeds maxPacketBytes (${this.#options.maxPacketBytes})`)
      }
      this.#skip = length
    }
    this.#parts.push(chunk.subarray(from))
    if (this.#segments.length === 0 || this.#wanted) this.#flushSegment()
    this.#charge(publishes)
    this.pump()
    if (this.#segments.length > 0 || this.#parts.length > 8) this.socket.pause()
  }

  #violate (reason: 'packet-too-large' | 'malformed-header', detail: string): void {
    this.#options.onViolation(reason, detail)
    this.socket.destroy()
    this.destroy()
  }

  #flushSegment (): void {
    if (this.#parts.length === 0) return
    const segment = this.#parts.length === 1 ? this.#parts[0] as Buffer : Buffer.concat(this.#parts)
    this.#parts = []
    this.#starts = 0
    if (segment.length > 0) this.#segments.push(segment)
  }

  #charge (publishes: number): void {
    const rate = this.#options.publishRate
    if (rate <= 0 || publishes === 0) return
    const now = performance.now()
    this.#tokens = Math.min(rate, this.#tokens + ((now - this.#lastRefill) / 1000) * rate) - publishes
    this.#lastRefill = now
    if (this.#tokens < 0 && this.#rateTimer === undefined) {
      if (!this.#rateLogged) { this.#rateLogged = true; this.#options.onRateLimited?.() }
      this.socket.pause()
      this.#rateTimer = setTimeout(() => { this.#rateTimer = undefined; this.pump() }, Math.ceil((-this.#tokens / rate) * 1000))
    }
  }

  /** Pushes the next segment if aedes wants one and nothing holds us back. */
  pump (): void {
    if (this.destroyed || this.#options.group.paused || this.#rateTimer !== undefined) return
    if (this.#wanted) {
      if (this.#segments.length === 0) this.#flushSegment()
      const segment = this.#segments.shift()
      if (segment !== undefined) {
        this.#wanted = false
        this.push(segment)
      } else if (this.#ended) {
        this.push(null)
        return
      }
    }
    if (this.#segments.length === 0 && this.#parts.length === 0 && !this.#ended) this.socket.resume()
  }

  override _read (): void {
    this.#wanted = true
    this.pump()
  }

  override _write (chunk: Buffer, _encoding: BufferEncoding, callback: (err?: Error | null) => void): void {
    if (this.socket.write(chunk)) callback()
    else this.socket.once('drain', () => callback())
  }

  override _writev (chunks: Array<{ chunk: Buffer }>, callback: (err?: Error | null) => void): void {
    let ok = true
    for (const { chunk } of chunks) ok = this.socket.write(chunk)
    if (ok) callback()
    else this.socket.once('drain', () => callback())
  }

  override _final (callback: (err?: Error | null) => void): void {
    this.socket.end(callback)
  }

  override _destroy (err: Error | null, callback: (err?: Error | null) => void): void {
    this.#options.group.members.delete(this)
    if (this.#rateTimer !== undefined) clearTimeout(this.#rateTimer)
    this.socket.destroy()
    callback(err)
  }
}
