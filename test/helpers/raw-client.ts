/**
 * A bare MQTT 3.1.1 (or 5) client on a TCP socket, built from mqtt-packet,
 * for tests that must control the bytes: retransmissions with DUP, packets a
 * library would never send.
 */
import net from 'node:net'
import mqttPacket, { type Packet } from 'mqtt-packet'

export interface RawClient {
  send (packet: Packet): void
  /** Sends bytes as they are: a packet mqtt-packet refuses to encode. */
  write (bytes: Buffer): void
  /** Sends packets in one socket write, so the server parses them from one chunk. */
  sendAll (packets: readonly Packet[]): void
  /** Resolves with the next packet of this command (packets are queued as they arrive). */
  next (cmd: Packet['cmd'], timeoutMs?: number): Promise<Packet>
  /** Calls `listener` with each packet as it arrives (it is queued for next() as well); returns a function that stops it. */
  onPacket (listener: (packet: Packet) => void): () => void
  /** Resolves when the server closes the connection. */
  readonly closed: Promise<void>
  end (): void
}

export async function rawConnect (url: string, protocolVersion: 4 | 5 = 4): Promise<RawClient> {
  const { hostname, port } = new URL(url)
  const socket = net.connect(Number(port), hostname)
  await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject) })
  const parser = mqttPacket.parser({ protocolVersion })
  const queue: Packet[] = []
  const waiters: Array<() => void> = []
  const listeners: Array<(packet: Packet) => void> = []
  parser.on('packet', (p: Packet) => { queue.push(p); for (const w of waiters.splice(0)) w(); for (const l of listeners) l(p) })
  socket.on('data', (d) => parser.parse(d))
  socket.on('error', () => {})
  const closed = new Promise<void>((resolve) => socket.once('close', () => { resolve(); for (const w of waiters.splice(0)) w() }))
  return {
    send: (packet) => { socket.write(mqttPacket.generate(packet, { protocolVersion })) },
    write: (bytes) => { socket.write(bytes) },
    sendAll: (packets) => { socket.write(Buffer.concat(packets.map((p) => mqttPacket.generate(p, { protocolVersion })))) },
    async next (cmd, timeoutMs = 5000) {
      const until = Date.now() + timeoutMs
      for (;;) {
        const i = queue.findIndex((p) => p.cmd === cmd)
        if (i !== -1) return queue.splice(i, 1)[0] as Packet
        if (socket.destroyed || Date.now() > until) throw new Error(`no ${cmd} packet within ${timeoutMs} ms (closed: ${socket.destroyed})`)
        await new Promise<void>((resolve) => {
          waiters.push(resolve)
          setTimeout(resolve, Math.max(1, until - Date.now())).unref()
        })
      }
    },
    onPacket: (listener) => {
      listeners.push(listener)
      return () => { const i = listeners.indexOf(listener); if (i !== -1) listeners.splice(i, 1) }
    },
    closed,
    end: () => { socket.end() },
  }
}
