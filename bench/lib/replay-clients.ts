/**
 * Minimal MQTT clients for the replay bench, on plain `net` sockets with a
 * hand-written walk over the frames that arrive (frameAt), so they cost
 * little beside the broker:
 * - a QoS 1 subscriber that acknowledges every PUBLISH (one write of PUBACKs
 *   per read) and counts them until `until` says stop (edgemq: the `$done`
 *   marker; Mosquitto: the number of queued messages), timed from its
 *   CONNACK;
 * - a QoS 1 publisher that fills a broker with a backlog (Mosquitto's queue
 *   for an offline persistent session, the baseline).
 */
import net from 'node:net'
import { performance } from 'node:perf_hooks'
import mqttPacket from 'mqtt-packet'
import { frameAt } from './mqtt/frame.ts'

const CONNACK = 2
const PUBLISH = 3
const PUBACK = 4
const SUBACK = 9
const READ_BUFFER_BYTES = 256 * 1024

export interface SubscriberSpec {
  readonly host: string
  readonly port: number
  readonly clientId: string
  readonly clean: boolean
  /** Subscribe to this filter at QoS 1 after the CONNACK; omit to only receive a session's queue. */
  readonly subscribe?: string
  /** Called for every PUBLISH with its topic (only when `wantTopics`) and the count so far; true ends the run. */
  readonly until: (count: number, topic: string | null) => boolean
  /** Decode each PUBLISH's topic for `until` (costs a string per message). */
  readonly wantTopics: boolean
  readonly timeoutMs: number
  /** Ends the run (as `until` would) when it resolves: for subscribers that share one count (a shared subscription's members). */
  readonly stop?: Promise<void>
  /** MQTT 3.1.1 (4, the default) or 5: a v5 PUBLISH has properties after its packet id, which are not read. */
  readonly protocolVersion?: 4 | 5
}

export interface SubscriberResult {
  /** PUBLISH packets received (the one that ended the run included). */
  readonly received: number
  /** From the CONNACK read (the SUBSCRIBE follows it at once) to the last PUBLISH read, in ms. */
  readonly ms: number
  /** From the same start to the first PUBLISH read, in ms. */
  readonly firstMs: number
  readonly cpuUserMs: number
  readonly cpuSystemMs: number
}

/** Connects, subscribes, acknowledges every QoS 1 PUBLISH, and resolves when `until` holds. */
export function runSubscriber (spec: SubscriberSpec): Promise<SubscriberResult> {
  const protocolVersion = spec.protocolVersion ?? 4
  return new Promise((resolve, reject) => {
    let carry: Buffer | null = null
    let received = 0
    let started = 0
    let first = 0
    let finished = false
    const cpu = process.cpuUsage()
    const acks: number[] = []
    const finish = (err: Error | null): void => {
      if (finished) return
      finished = true
      clearTimeout(timer)
      socket.destroy()
      if (err !== null) return reject(err)
      const used = process.cpuUsage(cpu)
      resolve({ received, ms: performance.now() - started, firstMs: first - started, cpuUserMs: used.user / 1000, cpuSystemMs: used.system / 1000 })
    }
    const timer = setTimeout(() => finish(new Error(`${spec.clientId}: ${received} messages after ${spec.timeoutMs} ms, still waiting`)), spec.timeoutMs)
    void spec.stop?.then(() => finish(null))
    const onData = (chunk: Buffer): void => {
      const buf: Buffer = carry === null ? chunk : Buffer.concat([carry, chunk])
      carry = null
      let i = 0
      let done = false
      for (;;) {
        const frame = frameAt(buf, i)
        if (frame === null) break
        const type = (buf[i] as number) >> 4
        if (type === CONNACK) {
          if (buf[frame.body + 1] !== 0) return finish(new Error(`${spec.clientId}: CONNACK return code ${buf[frame.body + 1]}`))
          started = performance.now()
          if (spec.subscribe !== undefined) {
            socket.write(mqttPacket.generate({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: spec.subscribe, qos: 1 }] }, { protocolVersion }))
          }
        } else if (type === SUBACK) {
          // MQTT 5: the reason codes follow the properties (their length, one byte here: none are expected).
          const code = buf[frame.body + 2 + (protocolVersion === 5 ? 1 + (buf[frame.body + 2] as number) : 0)] as number
          if (code >= 0x80) return finish(new Error(`${spec.clientId}: SUBACK refused ${spec.subscribe} (0x${code.toString(16)})`))
        } else if (type === PUBLISH && !done) {
          const qos = ((buf[i] as number) >> 1) & 3
          const topicLength = buf.readUInt16BE(frame.body)
          if (qos > 0) acks.push(buf.readUInt16BE(frame.body + 2 + topicLength))
          if (received++ === 0) first = performance.now()
          const topic = spec.wantTopics ? buf.toString('utf8', frame.body + 2, frame.body + 2 + topicLength) : null
          done = spec.until(received, topic)
        }
        i = frame.body + frame.length
      }
      if (i < buf.length) carry = Buffer.from(buf.subarray(i))
      if (acks.length > 0) {
        const out = Buffer.allocUnsafe(acks.length * 4)
        for (let k = 0; k < acks.length; k++) {
          out[k * 4] = 0x40
          out[k * 4 + 1] = 2
          out.writeUInt16BE(acks[k] as number, k * 4 + 2)
        }
        acks.length = 0
        socket.write(out)
      }
      if (done) finish(null)
    }
    const socket = net.connect({
      host: spec.host, port: spec.port, noDelay: true,
      onread: { buffer: Buffer.allocUnsafe(READ_BUFFER_BYTES), callback: (n: number, b: Uint8Array) => { onData(Buffer.from((b as Buffer).subarray(0, n))); return true } },
    })
    socket.on('error', (err) => finish(err))
    socket.on('close', () => finish(new Error(`${spec.clientId}: the broker closed the connection after ${received} messages`)))
    socket.on('connect', () => {
      socket.write(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion, clientId: spec.clientId, clean: spec.clean, keepalive: 0 },
        { protocolVersion }))
    })
  })
}

/**
 * Publishes `count` QoS 1 messages of `payloadBytes` on `topic(i)`, keeping
 * up to `window` unacknowledged, and resolves when all are acknowledged.
 */
export function publishBacklog (spec: { host: string, port: number, clientId: string, count: number, payloadBytes: number, window: number,
  topic: (i: number) => string, timeoutMs: number }): Promise<void> {
  return new Promise((resolve, reject) => {
    const payload = Buffer.alloc(spec.payloadBytes, 0x61)
    let sent = 0
    let acked = 0
    let carry: Buffer | null = null
    let finished = false
    const finish = (err: Error | null): void => {
      if (finished) return
      finished = true
      clearTimeout(timer)
      socket.end(Buffer.from([0xe0, 0x00]))
      if (err === null) resolve()
      else reject(err)
    }
    const timer = setTimeout(() => finish(new Error(`${spec.clientId}: ${acked} of ${spec.count} acknowledged after ${spec.timeoutMs} ms`)), spec.timeoutMs)
    const refill = (): void => {
      const parts: Buffer[] = []
      while (sent < spec.count && sent - acked < spec.window) {
        parts.push(mqttPacket.generate({ cmd: 'publish', topic: spec.topic(sent), payload, qos: 1, dup: false, retain: false, messageId: (sent % 65535) + 1 }))
        sent++
      }
      if (parts.length > 0) socket.write(Buffer.concat(parts))
    }
    const socket = net.connect({ host: spec.host, port: spec.port, noDelay: true })
    socket.on('error', (err) => finish(err))
    socket.on('close', () => finish(new Error(`${spec.clientId}: the broker closed the connection after ${acked} acknowledgements`)))
    socket.on('connect', () => {
      socket.write(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: spec.clientId, clean: true, keepalive: 0 }))
    })
    socket.on('data', (chunk: Buffer) => {
      const buf: Buffer = carry === null ? chunk : Buffer.concat([carry, chunk])
      carry = null
      let i = 0
      for (;;) {
        const frame = frameAt(buf, i)
        if (frame === null) break
        const type = (buf[i] as number) >> 4
        if (type === CONNACK) refill()
        else if (type === PUBACK) acked++
        i = frame.body + frame.length
      }
      if (i < buf.length) carry = Buffer.from(buf.subarray(i))
      if (acked === spec.count) finish(null)
      else if (spec.count - sent > 0 && sent - acked <= spec.window / 2) refill()
    })
  })
}
