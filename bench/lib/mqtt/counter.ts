/**
 * A counting MQTT subscriber (3.1.1, or 5 with `protocolVersion: 5`) for the
 * bridge and fan-in benches: plain `net`
 * socket, one SUBSCRIBE, and for every PUBLISH that arrives only a count,
 * the time of the first and the last, and (QoS 1) a PUBACK. The PUBACKs of
 * one read go out in one `write`, so the subscriber asks little of the
 * broker and of the 2-core machine; MQTT.js would spend a core near
 * 150 k msgs/s (see load.ts).
 *
 * It checks what it can without decoding payloads: packets it does not
 * expect, a refused SUBACK, a broker that closes the connection. Counting
 * `$dedupe/...` topics needs a `$dedupe/#` filter: `#` does not match
 * topics that start with `$` [MQTT-4.7.2-1].
 */
import net from 'node:net'
import { performance } from 'node:perf_hooks'
import mqttPacket from 'mqtt-packet'
import { disconnectSocket, frameAt } from './frame.ts'

const CONNACK = 2
const PUBLISH = 3
const SUBACK = 9
const READ_BUFFER_BYTES = 256 * 1024

export interface CounterOptions {
  readonly host: string
  readonly port: number
  readonly clientId: string
  readonly filter: string
  readonly qos: 0 | 1
  /** MQTT protocol level: 4 (3.1.1, the default) or 5. */
  readonly protocolVersion?: 4 | 5
  /**
   * Clean session (the default) or a persistent one. A persistent MQTT 5
   * session asks for the longest session expiry interval, so that it
   * outlives the connection as a 3.1.1 one does.
   */
  readonly clean?: boolean
}

/** Where the subscriber is at a moment: messages so far and the clock (performance.now(), ms). */
export interface CounterSample { readonly at: number, readonly received: number }

export class CountingSubscriber {
  readonly #socket: net.Socket
  readonly #options: CounterOptions
  #carry: Buffer | null = null
  #closing = false
  #failure: Error | null = null
  #onConnack: ((code: number) => void) | null = null
  #onSuback: ((code: number) => void) | null = null
  #waiters: Array<{ readonly n: number, readonly resolve: () => void }> = []
  #onFailure: Array<(err: Error) => void> = []
  /** PUBLISHes received so far. */
  received = 0
  /** performance.now() of the read that brought the first / the latest PUBLISH; NaN before. */
  firstAt = NaN
  lastAt = NaN
  /** process.hrtime in µs of the same reads (the clock of a CPU profile). */
  firstAtUs = NaN
  lastAtUs = NaN
  /** Reads that carried at least one PUBLISH. */
  reads = 0

  private constructor (options: CounterOptions) {
    this.#options = options
    this.#socket = net.connect({
      host: options.host, port: options.port, noDelay: true,
      onread: { buffer: Buffer.allocUnsafe(READ_BUFFER_BYTES), callback: (n: number, buf: Uint8Array) => { this.#onData(buf as Buffer, n); return true } },
    })
    this.#socket.on('error', (err) => this.#fail(new Error(`subscriber ${options.clientId}: ${err.message}`)))
    this.#socket.on('close', () => this.#fail(new Error(`subscriber ${options.clientId}: the broker closed the connection`)))
  }

  /** Connects and subscribes; resolves once the SUBACK granted the subscription. */
  static async subscribe (options: CounterOptions): Promise<CountingSubscriber> {
    const s = new CountingSubscriber(options)
    try {
      await s.#handshake()
    } catch (err) {
      await s.close()
      throw err
    }
    return s
  }

  async #handshake (): Promise<void> {
    const { clientId, filter, qos } = this.#options
    const protocolVersion = this.#options.protocolVersion ?? 4
    const clean = this.#options.clean ?? true
    const failed = new Promise<never>((_resolve, reject) => this.#onFailure.push(reject))
    failed.catch(() => {})
    const connack = new Promise<number>((resolve) => { this.#onConnack = resolve })
    const properties = protocolVersion === 5 && !clean ? { sessionExpiryInterval: 0xffffffff } : undefined
    this.#socket.write(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion, clientId, clean, keepalive: 0, properties }, { protocolVersion }))
    const code = await Promise.race([connack, failed])
    if (code !== 0) throw new Error(`subscriber ${clientId}: CONNACK return code ${code}`)
    const suback = new Promise<number>((resolve) => { this.#onSuback = resolve })
    this.#socket.write(mqttPacket.generate({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: filter, qos }] }, { protocolVersion }))
    const granted = await Promise.race([suback, failed])
    if (granted >= 0x80) throw new Error(`subscriber ${clientId}: the broker refused the subscription to ${filter} (0x${granted.toString(16)})`)
  }

  /**
   * Resolves once `n` PUBLISHes arrived. Rejects when the connection fails,
   * or when nothing arrived for `stallMs` (a lost message would otherwise
   * hang the bench).
   */
  waitFor (n: number, stallMs: number): Promise<void> {
    if (this.#failure !== null) return Promise.reject(this.#failure)
    if (this.received >= n) return Promise.resolve()
    return new Promise<void>((resolve, reject) => {
      let seen = this.received
      const timer = setInterval(() => {
        if (this.received > seen) { seen = this.received; return }
        done()
        reject(new Error(`subscriber ${this.#options.clientId}: ${this.received} of ${n} messages, and none for ${stallMs} ms`))
      }, stallMs)
      const waiter = { n, resolve: () => { done(); resolve() } }
      const onFailure = (err: Error): void => { done(); reject(err) }
      const done = (): void => {
        clearInterval(timer)
        this.#waiters = this.#waiters.filter((w) => w !== waiter)
        this.#onFailure = this.#onFailure.filter((f) => f !== onFailure)
      }
      this.#waiters.push(waiter)
      this.#onFailure.push(onFailure)
    })
  }

  async close (): Promise<void> {
    this.#closing = true
    await disconnectSocket(this.#socket)
  }

  #fail (err: Error): void {
    if (this.#closing || this.#failure !== null) return
    this.#failure = err
    for (const f of this.#onFailure.splice(0)) f(err)
  }

  #onData (readBuffer: Buffer, n: number): void {
    let buf = readBuffer.subarray(0, n)
    if (this.#carry !== null) {
      buf = Buffer.concat([this.#carry, buf])
      this.#carry = null
    }
    let acks: Buffer | null = null
    let nAcks = 0
    let publishes = 0
    let i = 0
    while (i + 2 <= buf.length) {
      const frame = frameAt(buf, i)
      if (frame === null) break
      const { body: j, length } = frame
      const header = buf[i] as number
      const type = header >> 4
      if (type === PUBLISH) {
        publishes++
        const qos = (header >> 1) & 3
        if (qos > 0) {
          const topicLength = buf.readUInt16BE(j)
          // A read holds at most READ_BUFFER_BYTES / 4 + 1 acks' worth of PUBLISHes (the smallest is longer than 4 bytes).
          acks ??= Buffer.allocUnsafe(4 * Math.ceil(buf.length / 4))
          acks[nAcks * 4] = qos === 1 ? 0x40 : 0x50 // PUBACK, or PUBREC for QoS 2
          acks[nAcks * 4 + 1] = 2
          acks[nAcks * 4 + 2] = buf[j + 2 + topicLength] as number
          acks[nAcks * 4 + 3] = buf[j + 3 + topicLength] as number
          nAcks++
        }
      } else if (type === CONNACK) {
        this.#onConnack?.(buf[j + 1] as number)
        this.#onConnack = null
      } else if (type === SUBACK) {
        // MQTT 5: the reason codes follow a property section [MQTT-3.9.2.1]; its length is a variable byte integer.
        let k = j + 2
        if (this.#options.protocolVersion === 5) {
          let propertyLength = 0
          for (let shift = 0; ; shift += 7) {
            const byte = buf[k++] as number
            propertyLength += (byte & 0x7f) * 2 ** shift
            if ((byte & 0x80) === 0) break
          }
          k += propertyLength
        }
        this.#onSuback?.(buf[k] as number)
        this.#onSuback = null
      } else {
        this.#fail(new Error(`subscriber ${this.#options.clientId}: unexpected packet type ${type}`))
        return
      }
      i = j + length
    }
    if (i < buf.length) this.#carry = Buffer.from(buf.subarray(i))
    if (nAcks > 0) this.#socket.write((acks as Buffer).subarray(0, nAcks * 4))
    if (publishes > 0) {
      const now = performance.now()
      const nowUs = Number(process.hrtime.bigint() / 1000n)
      if (this.received === 0) { this.firstAt = now; this.firstAtUs = nowUs }
      this.lastAt = now
      this.lastAtUs = nowUs
      this.received += publishes
      this.reads++
      for (const w of [...this.#waiters]) if (this.received >= w.n) w.resolve()
    }
  }

  /** A sample of the count now. */
  sample (): CounterSample {
    return { at: performance.now(), received: this.received }
  }
}
