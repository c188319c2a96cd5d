/**
 * A minimal MQTT 3.1.1 load generator: plain `net` sockets, PUBLISH bytes
 * generated once with mqtt-packet before any timing starts, a hand-written
 * parser for what comes back (CONNACK, PUBACK, PINGRESP), reads into one
 * buffer per connection (`onread`). Per message it neither allocates nor
 * encodes: when PUBACKs arrive, the new PUBLISHes go out as one slice of a
 * pre-generated ring in one `write`. MQTT.js saturates a core near 150 k
 * msg/s on this machine; this generator drove a do-nothing broker at about
 * 2 M msg/s with half a core (`bench/gateway.ts --check-generator`), and
 * every run reports its CPU and event-loop utilisation.
 *
 * - QoS 1: each connection keeps up to `window` PUBLISHes unacknowledged
 *   (refilled once a tenth of the window is free, see REFILL_DIVISOR). The
 *   throughput is the PUBACKs received in the measured window; the latency
 *   of each is PUBLISH write to PUBACK read (one timestamp per chunk).
 * - QoS 0: there is no ack, so a PINGREQ follows every `window / 2`
 *   PUBLISHes and its PINGRESP stands in for their acks: a broker reads a
 *   connection's packets in order, so when that PINGRESP arrives the broker
 *   has read every PUBLISH before it. At most `window` PUBLISHes are
 *   unconfirmed per connection, as for QoS 1. Without such a bound the
 *   loopback socket buffers (some 4 MB, 30 k PUBLISHes per connection) fill
 *   during the warm-up and any count on the client side measures how fast
 *   they fill, not what the broker reads.
 *
 * Runs inside a child process (see ../load-child.ts) so the broker under test,
 * the generator and the bench's own bookkeeping each have their own event
 * loop.
 */
import net from 'node:net'
import { performance } from 'node:perf_hooks'
import mqttPacket from 'mqtt-packet'
import { LatencyHistogram, type SerializedHistogram } from '../latency-histogram.ts'
import { disconnectSocket, frameAt } from './frame.ts'

export interface LoadSpec {
  readonly host: string
  readonly port: number
  /** Publisher numbers this process drives: client id `dev-<i>`, topic `devices/dev-<i>/telemetry/t`. */
  readonly publishers: readonly number[]
  readonly qos: 0 | 1
  /** MQTT protocol level of every connection: 4 (3.1.1, the default) or 5 (each PUBLISH then has an empty property section). */
  readonly protocolVersion?: 4 | 5
  /** Unconfirmed PUBLISHes per connection (QoS 1: without PUBACK; QoS 0: before the last PINGRESP). */
  readonly window: number
  readonly payloadBytes: number
  readonly warmupMs: number
  readonly measureMs: number
  /** After the window: how long to wait for outstanding PUBACKs / the closing fence before giving up. */
  readonly drainTimeoutMs: number
}

export interface LoadResult {
  /** Length of the measured window, by the generator's clock. */
  readonly windowMs: number
  /** PUBLISHes confirmed in the window: QoS 1 by their PUBACK, QoS 0 by the PINGRESP after them. */
  readonly acked: number
  /** PUBLISHes written in the window. */
  readonly written: number
  /** QoS 1: PUBLISH-to-PUBACK latency of every PUBACK received in the window (QoS 0: PINGREQ-to-PINGRESP). */
  readonly latency: SerializedHistogram
  /** CPU time of this process during the window. */
  readonly cpuUserMs: number
  readonly cpuSystemMs: number
  /** Event-loop utilisation of this process during the window (0..1): near 1 means the generator is the bottleneck. */
  readonly eventLoopUtilization: number
  /** PUBLISHes still unconfirmed when the drain timed out (should be 0). */
  readonly unacked: number
  /** PUBLISHes written over the whole run, warm-up and drain included. */
  readonly writtenTotal: number
}

export type Phase = 'connected' | 'measure' | 'drain'

/** QoS 1 packet ids cycle through 1..RING; a ring slice is what one write sends. */
const RING = 4096
/**
 * QoS 1 with a window of W: new PUBLISHes go out once W / 10 slots are free,
 * so between 0.9 W and W are in flight. Refilling on every PUBACK would cost
 * a write syscall per message when the broker sends its PUBACKs one by one
 * (Mosquitto does), and the generator then needs about a core to keep up.
 */
const REFILL_DIVISOR = 10
const READ_BUFFER_BYTES = 64 * 1024
const PINGREQ = Buffer.from([0xc0, 0x00])

const CONNACK = 2
const PUBACK = 4
const PINGRESP = 13

export function publisherTopic (i: number): string { return `devices/dev-${i}/telemetry/t` }
export function publisherClientId (i: number): string { return `dev-${i}` }

class LoadError extends Error {
  constructor (message: string) {
    super(message)
    this.name = 'LoadError'
  }
}

/**
 * One publisher's connection. It sends in units, each confirmed by one
 * packet from the broker: for QoS 1 a unit is one PUBLISH (confirmed by its
 * PUBACK), for QoS 0 it is `window / 2` PUBLISHes and a PINGREQ (confirmed
 * by the PINGRESP). Confirmed units are replaced as soon as there are enough
 * of them for one write (QoS 1: a tenth of the window; QoS 0: one).
 */
class Connection {
  readonly clientId: string
  readonly socket: net.Socket
  readonly #qos: 0 | 1
  readonly #hist: LatencyHistogram
  readonly #fail: (err: Error) => void
  /** QoS 1: RING PUBLISHes with ids 1..RING; QoS 0: as many units as may be in flight. All units have the same length. */
  readonly #ring: Buffer
  readonly #unitBytes: number
  readonly #units: number
  /** PUBLISHes per unit. */
  readonly #perUnit: number
  /** Units in flight when the connection is sending. */
  readonly #window: number
  /** QoS 1: write time of each packet id in flight (index id - 1); 0 = not in flight. QoS 0: a FIFO of PINGREQ write times. */
  readonly #sentAt: Float64Array
  /** QoS 1: free slots that trigger a write (window / REFILL_DIVISOR), so a write carries several PUBLISHes. */
  readonly #refillAt: number
  #next = 0
  #pingHead = 0
  #carry: Buffer | null = null
  #connack: ((code: number) => void) | undefined
  #closing = false
  readonly #protocolVersion: 4 | 5
  /** Units in flight. */
  inflight = 0
  /** PUBLISHes confirmed / written so far. */
  acked = 0
  written = 0
  recording = false
  sending = false
  onIdle: (() => void) | undefined

  constructor (spec: LoadSpec, index: number, payload: Buffer, hist: LatencyHistogram, fail: (err: Error) => void) {
    this.#qos = spec.qos
    this.#hist = hist
    this.#fail = fail
    this.clientId = publisherClientId(index)
    this.#protocolVersion = spec.protocolVersion ?? 4
    const opts = { protocolVersion: this.#protocolVersion }
    const topic = publisherTopic(index)
    if (spec.qos === 1) {
      this.#perUnit = 1
      this.#window = spec.window
      if (spec.window >= RING) throw new LoadError(`window ${spec.window} must be below ${RING}`)
      const packets: Buffer[] = []
      for (let k = 0; k < RING; k++) {
        packets.push(mqttPacket.generate({ cmd: 'publish', topic, payload, qos: 1, dup: false, retain: false, messageId: k + 1 }, opts))
      }
      this.#unitBytes = (packets[0] as Buffer).length
      if (packets.some((p) => p.length !== this.#unitBytes)) throw new LoadError('pre-generated PUBLISH packets differ in length')
      this.#ring = Buffer.concat(packets)
      this.#units = RING
      this.#sentAt = new Float64Array(RING)
    } else {
      this.#perUnit = Math.max(1, Math.floor(spec.window / 2))
      this.#window = Math.max(1, Math.floor(spec.window / this.#perUnit))
      const publish = mqttPacket.generate({ cmd: 'publish', topic, payload, qos: 0, dup: false, retain: false }, opts)
      const unit = Buffer.concat([...Array.from({ length: this.#perUnit }, () => publish), PINGREQ])
      this.#unitBytes = unit.length
      this.#ring = Buffer.concat(Array.from({ length: this.#window }, () => unit))
      this.#units = this.#window
      this.#sentAt = new Float64Array(this.#window)
    }
    this.#refillAt = spec.qos === 1 ? Math.max(1, Math.floor(this.#window / REFILL_DIVISOR)) : 1
    // onread: reads land in one buffer per connection instead of a new Buffer per read.
    this.socket = net.connect({
      host: spec.host, port: spec.port, noDelay: true,
      onread: { buffer: Buffer.allocUnsafe(READ_BUFFER_BYTES), callback: (n: number, buf: Uint8Array) => { this.#onData(buf as Buffer, n); return true } },
    })
    this.socket.on('error', (err) => { if (!this.#closing) fail(new LoadError(`${this.clientId}: ${err.message}`)) })
    this.socket.on('close', () => { if (!this.#closing) fail(new LoadError(`${this.clientId}: the broker closed the connection`)) })
  }

  connect (): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#connack = (code) => {
        if (code === 0) resolve()
        else reject(new LoadError(`${this.clientId}: CONNACK return code ${code}`))
      }
      const connect = { cmd: 'connect', protocolId: 'MQTT', protocolVersion: this.#protocolVersion, clientId: this.clientId, clean: true, keepalive: 0 } as const
      this.socket.write(mqttPacket.generate(connect, { protocolVersion: this.#protocolVersion }))
    })
  }

  start (): void {
    this.sending = true
    this.#send(this.#window, performance.now())
  }

  async close (): Promise<void> {
    this.#closing = true
    await disconnectSocket(this.socket)
  }

  /** Writes the next `k` units of the ring, in one write unless the ring wraps. */
  #send (k: number, now: number): void {
    let from = this.#next
    while (k > 0) {
      const n = Math.min(k, this.#units - from)
      if (this.#qos === 1) {
        for (let i = from; i < from + n; i++) {
          if (this.#sentAt[i] !== 0) {
            return this.#fail(new LoadError(`${this.clientId}: packet id ${i + 1} would be reused while unacknowledged`))
          }
          this.#sentAt[i] = now
        }
      } else {
        // The ring holds exactly the units that may be in flight, so slot i is free again when it is reused.
        for (let i = from; i < from + n; i++) this.#sentAt[i] = now
      }
      this.socket.write(this.#ring.subarray(from * this.#unitBytes, (from + n) * this.#unitBytes))
      this.inflight += n
      this.written += n * this.#perUnit
      k -= n
      from = (from + n) % this.#units
    }
    this.#next = from
  }

  #onData (readBuffer: Buffer, n: number): void {
    const now = performance.now()
    let buf = readBuffer.subarray(0, n)
    if (this.#carry !== null) {
      buf = Buffer.concat([this.#carry, buf])
      this.#carry = null
    }
    let confirmed = 0
    let i = 0
    while (i + 2 <= buf.length) {
      const frame = frameAt(buf, i)
      if (frame === null) break
      const { body: j, length } = frame
      const type = (buf[i] as number) >> 4
      if (type === PUBACK && this.#qos === 1) {
        const id = buf.readUInt16BE(j)
        const sentAt = this.#sentAt[id - 1]
        if (sentAt === undefined || sentAt === 0) return this.#fail(new LoadError(`${this.clientId}: PUBACK for packet id ${id}, which is not in flight`))
        this.#sentAt[id - 1] = 0
        if (this.recording) this.#hist.record((now - sentAt) * 1000)
        confirmed++
      } else if (type === PINGRESP && this.#qos === 0) {
        if (this.inflight - confirmed <= 0) return this.#fail(new LoadError(`${this.clientId}: PINGRESP without a PINGREQ`))
        const sentAt = this.#sentAt[this.#pingHead] as number
        this.#pingHead = (this.#pingHead + 1) % this.#units
        if (this.recording) this.#hist.record((now - sentAt) * 1000)
        confirmed++
      } else if (type === CONNACK) {
        this.#connack?.(buf[j + 1] as number)
        this.#connack = undefined
      } else {
        return this.#fail(new LoadError(`${this.clientId}: unexpected packet type ${type}`))
      }
      i = j + length
    }
    if (i < buf.length) this.#carry = Buffer.from(buf.subarray(i))
    if (confirmed > 0) {
      this.inflight -= confirmed
      this.acked += confirmed * this.#perUnit
      const free = this.#window - this.inflight
      if (this.sending) {
        if (free >= this.#refillAt) this.#send(free, now)
      } else if (this.inflight === 0) {
        this.onIdle?.()
      }
    }
  }
}

function delay (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

/**
 * Connects every publisher, runs warm-up, measured window and drain, and
 * disconnects. `onPhase` is called as each phase begins (the parent samples
 * the broker's CPU and counters at 'measure' and 'drain').
 */
export async function runLoad (spec: LoadSpec, onPhase: (phase: Phase) => void): Promise<LoadResult> {
  const hist = new LatencyHistogram()
  let failure: Error | undefined
  let failed: ((err: Error) => void) | undefined
  const failurePromise = new Promise<never>((_resolve, reject) => { failed = reject })
  failurePromise.catch(() => {})
  const fail = (err: Error): void => {
    if (failure !== undefined) return
    failure = err
    failed?.(err)
  }
  const connections = spec.publishers.map((i) => {
    const payload = Buffer.alloc(spec.payloadBytes)
    for (let b = 0; b < payload.length; b++) payload[b] = (i * 31 + b * 7) & 0xff
    return new Connection(spec, i, payload, hist, fail)
  })
  const guarded = <T>(p: Promise<T>): Promise<T> => Promise.race([p, failurePromise])
  try {
    await guarded(Promise.all(connections.map((c) => c.connect())))
    onPhase('connected')
    for (const c of connections) c.start()
    await guarded(delay(spec.warmupMs))

    const cpu0 = process.cpuUsage()
    const elu0 = performance.eventLoopUtilization()
    const t0 = performance.now()
    let acked = 0
    let written = 0
    for (const c of connections) {
      acked -= c.acked
      written -= c.written
      c.recording = true
    }
    onPhase('measure')
    await guarded(delay(spec.measureMs))

    const windowMs = performance.now() - t0
    const cpu = process.cpuUsage(cpu0)
    const elu = performance.eventLoopUtilization(elu0)
    for (const c of connections) {
      acked += c.acked
      written += c.written
      c.recording = false
      c.sending = false
    }
    onPhase('drain')

    const idle = connections.map((c) => new Promise<void>((resolve) => {
      if (c.inflight === 0) return resolve()
      c.onIdle = resolve
    }))
    await guarded(Promise.race([Promise.all(idle), delay(spec.drainTimeoutMs)]))
    let unacked = 0
    let writtenTotal = 0
    for (const c of connections) {
      unacked += c.written - c.acked
      writtenTotal += c.written
    }
    return {
      windowMs, acked, written, latency: hist.serialize(),
      cpuUserMs: cpu.user / 1000, cpuSystemMs: cpu.system / 1000, eventLoopUtilization: elu.utilization, unacked, writtenTotal,
    }
  } finally {
    await Promise.all(connections.map((c) => c.close()))
  }
}
