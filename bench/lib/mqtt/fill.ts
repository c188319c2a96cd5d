/**
 * Publishes a fixed number of QoS 1 messages and resolves once every one is
 * acknowledged: the bridge bench builds its backlog with it. Like
 * load.ts it sends pre-generated PUBLISH bytes from a ring of packet
 * ids over plain sockets, a window of unacknowledged messages per
 * connection, refilled a tenth of the window at a time; unlike it, it
 * counts messages instead of timing a window.
 *
 * Connection c (client id `fill-<c>`) publishes for devices
 * `dev-<c * devicesPerConnection + k>` (three digits) in turn, to topic
 * `devices/<device>/telemetry/t`: with the default routes each device is a
 * partition key, so 100 devices spread the records over every partition of
 * an 8-partition stream.
 */
import net from 'node:net'
import { performance } from 'node:perf_hooks'
import mqttPacket from 'mqtt-packet'
import { disconnectSocket, frameAt } from './frame.ts'

export interface FillSpec {
  readonly host: string
  readonly port: number
  readonly messages: number
  readonly connections: number
  readonly devicesPerConnection: number
  readonly payloadBytes: number
  /** Unacknowledged PUBLISHes per connection. */
  readonly window: number
}

export interface FillResult {
  readonly messages: number
  readonly seconds: number
  readonly rate: number
}

const RING = 4096
const REFILL_DIVISOR = 10
const CONNACK = 2
const PUBACK = 4

export function fillDevice (n: number): string { return `dev-${String(n).padStart(3, '0')}` }
export function fillTopic (device: string): string { return `devices/${device}/telemetry/t` }

class FillConnection {
  readonly #socket: net.Socket
  readonly #ring: Buffer
  readonly #unit: number
  readonly #window: number
  readonly #target: number
  readonly #inflight = new Uint8Array(RING)
  readonly #id: string
  #next = 0
  #carry: Buffer | null = null
  #closing = false
  #connack: ((code: number) => void) | null = null
  #done: (() => void) | null = null
  #fail: (err: Error) => void
  sent = 0
  acked = 0

  constructor (spec: FillSpec, index: number, target: number, fail: (err: Error) => void) {
    this.#id = `fill-${index}`
    this.#target = target
    this.#window = Math.min(spec.window, RING - 1)
    this.#fail = fail
    const packets: Buffer[] = []
    for (let k = 0; k < RING; k++) {
      const device = fillDevice(index * spec.devicesPerConnection + (k % spec.devicesPerConnection))
      const payload = Buffer.alloc(spec.payloadBytes)
      for (let b = 0; b < payload.length; b++) payload[b] = (k * 31 + b * 7) & 0xff
      packets.push(mqttPacket.generate({ cmd: 'publish', topic: fillTopic(device), payload, qos: 1, dup: false, retain: false, messageId: k + 1 }))
    }
    this.#unit = (packets[0] as Buffer).length
    if (packets.some((p) => p.length !== this.#unit)) throw new Error('fill: pre-generated PUBLISH packets differ in length')
    this.#ring = Buffer.concat(packets)
    this.#socket = net.connect({ host: spec.host, port: spec.port, noDelay: true })
    this.#socket.on('data', (chunk: Buffer) => this.#onData(chunk))
    this.#socket.on('error', (err) => { if (!this.#closing) fail(new Error(`${this.#id}: ${err.message}`)) })
    this.#socket.on('close', () => { if (!this.#closing) fail(new Error(`${this.#id}: the broker closed the connection`)) })
  }

  connect (): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#connack = (code) => { if (code === 0) resolve(); else reject(new Error(`${this.#id}: CONNACK return code ${code}`)) }
      this.#socket.write(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: this.#id, clean: true, keepalive: 0 }))
    })
  }

  run (): Promise<void> {
    return new Promise((resolve) => {
      if (this.#target === 0) return resolve()
      this.#done = resolve
      this.#send(this.#window)
    })
  }

  async close (): Promise<void> {
    this.#closing = true
    await disconnectSocket(this.#socket)
  }

  #send (k: number): void {
    k = Math.min(k, this.#target - this.sent)
    while (k > 0) {
      const n = Math.min(k, RING - this.#next)
      for (let i = this.#next; i < this.#next + n; i++) {
        if (this.#inflight[i] !== 0) return this.#fail(new Error(`${this.#id}: packet id ${i + 1} would be reused while unacknowledged`))
        this.#inflight[i] = 1
      }
      this.#socket.write(this.#ring.subarray(this.#next * this.#unit, (this.#next + n) * this.#unit))
      this.sent += n
      k -= n
      this.#next = (this.#next + n) % RING
    }
  }

  #onData (chunk: Buffer): void {
    let buf = chunk
    if (this.#carry !== null) {
      buf = Buffer.concat([this.#carry, chunk])
      this.#carry = null
    }
    let acked = 0
    let i = 0
    while (i + 2 <= buf.length) {
      const frame = frameAt(buf, i)
      if (frame === null) break
      const { body: j, length } = frame
      const type = (buf[i] as number) >> 4
      if (type === PUBACK) {
        const id = buf.readUInt16BE(j)
        if (this.#inflight[id - 1] !== 1) return this.#fail(new Error(`${this.#id}: PUBACK for packet id ${id}, which is not in flight`))
        this.#inflight[id - 1] = 0
        acked++
      } else if (type === CONNACK) {
        this.#connack?.(buf[j + 1] as number)
        this.#connack = null
      } else {
        return this.#fail(new Error(`${this.#id}: unexpected packet type ${type}`))
      }
      i = j + length
    }
    if (i < buf.length) this.#carry = Buffer.from(buf.subarray(i))
    if (acked === 0) return
    this.acked += acked
    if (this.acked === this.#target) {
      this.#done?.()
      this.#done = null
      return
    }
    const free = this.#window - (this.sent - this.acked)
    if (free >= Math.max(1, Math.floor(this.#window / REFILL_DIVISOR)) && this.sent < this.#target) this.#send(free)
  }
}

/** Publishes `spec.messages` QoS 1 messages (split evenly over the connections) and waits for every PUBACK. */
export async function fill (spec: FillSpec): Promise<FillResult> {
  let reject: (err: Error) => void = () => {}
  const failed = new Promise<never>((_resolve, r) => { reject = r })
  failed.catch(() => {})
  const connections = Array.from({ length: spec.connections }, (_v, c) => {
    const target = Math.floor(spec.messages / spec.connections) + (c < spec.messages % spec.connections ? 1 : 0)
    return new FillConnection(spec, c, target, (err) => reject(err))
  })
  try {
    await Promise.race([Promise.all(connections.map((c) => c.connect())), failed])
    const t0 = performance.now()
    await Promise.race([Promise.all(connections.map((c) => c.run())), failed])
    const seconds = (performance.now() - t0) / 1000
    return { messages: spec.messages, seconds, rate: spec.messages / seconds }
  } finally {
    await Promise.all(connections.map((c) => c.close()))
  }
}
