/**
 * Test helpers for poking a running gateway from outside: hand-built MQTT
 * 3.1.1 packets (including ones a well-behaved client library refuses to
 * generate), a raw socket that records what the gateway answers and when it
 * closes, a /metrics scraper, the gateway's JSON log lines, and a reader for
 * the log on disk.
 */
import net from 'node:net'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import { parser, type Packet } from 'mqtt-packet'
import { openLogStore, type LevelDatabase, type StoredRecord } from '../../store/index.ts'

// ---- packet building -------------------------------------------------------

/** MQTT's variable byte integer (the remaining length). */
export function varint (n: number): Buffer {
  const out: number[] = []
  do {
    let byte = n % 128
    n = Math.floor(n / 128)
    if (n > 0) byte |= 0x80
    out.push(byte)
  } while (n > 0)
  return Buffer.from(out)
}

/** A two-byte length followed by the bytes; a string is UTF-8 encoded, a Buffer is taken as is (it may be invalid UTF-8). */
export function str (value: string | Buffer): Buffer {
  const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : value
  const len = Buffer.alloc(2)
  len.writeUInt16BE(bytes.length)
  return Buffer.concat([len, bytes])
}

export function u16 (n: number): Buffer {
  const b = Buffer.alloc(2)
  b.writeUInt16BE(n)
  return b
}

/** A fixed header (type and flags in the first byte) followed by the remaining length and the body. */
export function packet (first: number, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from([first]), varint(body.length), body])
}

export interface ConnectFields {
  readonly clientId: string | Buffer
  readonly clean?: boolean
  readonly username?: string | Buffer
  readonly password?: string | Buffer
  readonly keepalive?: number
}

export function connectPacket (c: ConnectFields): Buffer {
  let flags = 0
  if (c.clean !== false) flags |= 0x02
  if (c.username !== undefined) flags |= 0x80
  if (c.password !== undefined) flags |= 0x40
  const parts = [str('MQTT'), Buffer.from([4, flags]), u16(c.keepalive ?? 30), str(c.clientId)]
  if (c.username !== undefined) parts.push(str(c.username))
  if (c.password !== undefined) parts.push(str(c.password))
  return packet(0x10, Buffer.concat(parts))
}

export function publishPacket (topic: string | Buffer, payload: string | Buffer, qos: 0 | 1 | 2 = 0, messageId = 1): Buffer {
  const body = [str(topic)]
  if (qos > 0) body.push(u16(messageId))
  body.push(typeof payload === 'string' ? Buffer.from(payload) : payload)
  return packet(0x30 | (qos << 1), Buffer.concat(body))
}

export function subscribePacket (messageId: number, filters: ReadonlyArray<string | Buffer>, qos = 1): Buffer {
  return packet(0x82, Buffer.concat([u16(messageId), ...filters.flatMap((f) => [str(f), Buffer.from([qos])])]))
}

export function unsubscribePacket (messageId: number, filters: ReadonlyArray<string | Buffer>): Buffer {
  return packet(0xa2, Buffer.concat([u16(messageId), ...filters.map((f) => str(f))]))
}

// ---- raw connection ----------------------------------------------------------

export class RawConnection {
  readonly socket: net.Socket
  readonly packets: Packet[] = []
  /** When the gateway closed (or reset) the connection, in performance.now() ms. */
  closedAt: number | undefined
  readonly #closed: Promise<void>
  #waiters: Array<() => void> = []

  private constructor (socket: net.Socket) {
    this.socket = socket
    const p = parser({ protocolVersion: 4 })
    p.on('packet', (pk: Packet) => { this.packets.push(pk); this.#wake() })
    p.on('error', () => {})
    socket.on('data', (d: Buffer) => p.parse(d))
    socket.on('error', () => {})
    this.#closed = new Promise((resolve) => socket.once('close', () => { this.closedAt = performance.now(); this.#wake(); resolve() }))
  }

  static open (url: string): Promise<RawConnection> {
    const { hostname, port } = new URL(url)
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: hostname, port: Number(port), noDelay: true })
      socket.once('connect', () => { socket.removeListener('error', reject); resolve(new RawConnection(socket)) })
      socket.once('error', reject)
    })
  }

  #wake (): void {
    const waiters = this.#waiters
    this.#waiters = []
    for (const w of waiters) w()
  }

  get closed (): boolean { return this.closedAt !== undefined }

  /** Writes unless the socket is gone; the gateway may close it at any moment. */
  send (bytes: Buffer): boolean {
    if (this.socket.destroyed || !this.socket.writable) return false
    return this.socket.write(bytes)
  }

  /** The first received packet of this type, waiting up to `ms`; undefined if none came (or the socket closed first). */
  async next (cmd: Packet['cmd'], ms = 5000): Promise<Packet | undefined> {
    const until = performance.now() + ms
    for (;;) {
      const found = this.packets.find((pk) => pk.cmd === cmd)
      if (found !== undefined || this.closed || performance.now() >= until) return found
      await this.#wait(until - performance.now())
    }
  }

  /** Resolves true once the gateway closed the connection, false if it is still open after `ms`. */
  async waitClosed (ms = 5000): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<false>((resolve) => { timer = setTimeout(() => resolve(false), ms) })
    const result = await Promise.race([this.#closed.then(() => true as const), timeout])
    clearTimeout(timer)
    return result
  }

  #wait (ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, Math.max(1, ms))
      this.#waiters.push(() => { clearTimeout(timer); resolve() })
    })
  }

  destroy (): void { this.socket.destroy() }
}

// ---- metrics -----------------------------------------------------------------

export interface Sample { readonly name: string, readonly labels: Readonly<Record<string, string>>, readonly value: number }

export async function scrape (httpUrl: string): Promise<Sample[]> {
  const res = await fetch(`${httpUrl}/metrics`)
  const text = await res.text()
  const samples: Sample[] = []
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line)
    if (m === null) continue
    const labels: Record<string, string> = {}
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1] as string] = l[2] as string
    samples.push({ name: m[1] as string, labels, value: Number(m[3]) })
  }
  return samples
}

/** Sum of the samples of one metric whose labels include `labels`. */
export function total (samples: readonly Sample[], name: string, labels: Readonly<Record<string, string>> = {}): number {
  return samples
    .filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + s.value, 0)
}

// ---- log lines -----------------------------------------------------------------

export interface LogLine { readonly level: string, readonly time: string, readonly msg: string, readonly [field: string]: unknown }

/** The JSON log lines of a stderr capture (pino), skipping anything that is not JSON. */
export function logLines (stderr: string): LogLine[] {
  const lines: LogLine[] = []
  for (const raw of stderr.split('\n')) {
    if (!raw.startsWith('{')) continue
    try {
      const parsed = JSON.parse(raw) as unknown
      if (parsed !== null && typeof parsed === 'object' && typeof (parsed as LogLine).level === 'string') lines.push(parsed as LogLine)
    } catch { /* not a log line */ }
  }
  return lines
}

// ---- the log on disk -------------------------------------------------------------

/** Every record of every stream, read from `<dataDir>/db` while the gateway is stopped. */
export async function readWholeLog (dataDir: string): Promise<Array<StoredRecord & { stream: string }>> {
  const db = new ClassicLevel<Buffer, Buffer>(path.join(dataDir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await db.open()
  const store = await openLogStore({ db: db as unknown as LevelDatabase })
  const out: Array<StoredRecord & { stream: string }> = []
  try {
    for (const info of store.listStreams()) {
      for (let p = 0; p < info.partitions; p++) {
        let offset = store.partitionInfo(info.name, p).logStartOffset
        for (let round = 0; round < 10_000; round++) {
          const r = await store.read(info.name, p, offset, { maxRecords: 5000, maxBytes: 16 << 20 })
          if (r.records.length === 0) break
          for (const rec of r.records) out.push({ ...rec, stream: info.name })
          offset = r.nextOffset
        }
      }
    }
  } finally {
    await store.close()
    await db.close()
  }
  return out
}

export function sleep (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

/** Polls `check` every 20 ms until it is true or `ms` passed; returns its last value. */
export async function waitUntil (check: () => boolean | Promise<boolean>, ms: number): Promise<boolean> {
  const until = performance.now() + ms
  for (;;) {
    if (await check()) return true
    if (performance.now() >= until) return false
    await sleep(20)
  }
}
