/**
 * A TCP proxy in front of an MQTT broker that cuts the link the moment a
 * client sends a PUBLISH, for the first `drops` connections that send one,
 * then forwards everything: a flapping link, as the bridge sees it (the
 * CONNECT/CONNACK pass, the PUBLISH never reaches the broker). With `cutOn:
 * 'puback'` it cuts when the broker's first PUBACK comes back instead: the
 * broker has the PUBLISH, the client never learns it, and resends it.
 * With no drops it is a tap: `published()` lists the topics of the PUBLISHes
 * the client sent, in the order they reached the broker.
 */
import { createConnection, createServer, type Server, type Socket } from 'node:net'

export interface FlakyProxy {
  readonly url: string
  /** Connections cut at a PUBLISH so far. */
  readonly cut: () => number
  /** The topic of every PUBLISH forwarded from a client to the broker so far, in order (all connections). */
  readonly published: () => readonly string[]
  close (): Promise<void>
}

/** Splits off the complete MQTT packets at the start of `buf`: [packets, rest]. */
function packets (buf: Buffer): [Buffer[], Buffer] {
  const out: Buffer[] = []
  let at = 0
  for (;;) {
    let length = 0
    let multiplier = 1
    let i = at + 1
    for (; i < buf.length && i < at + 5; i++) {
      const byte = buf[i] as number
      length += (byte & 0x7f) * multiplier
      multiplier *= 128
      if ((byte & 0x80) === 0) break
    }
    if (i >= buf.length || ((buf[i] as number) & 0x80) !== 0) break // the length is not all here yet
    const end = i + 1 + length
    if (end > buf.length) break
    out.push(buf.subarray(at, end))
    at = end
  }
  return [out, buf.subarray(at)]
}

/** The topic of a whole PUBLISH packet: after the fixed header, a two-byte length and the name. */
function topicOf (p: Buffer): string {
  let i = 1
  while (((p[i] as number) & 0x80) !== 0) i++
  return p.toString('utf8', i + 3, i + 3 + p.readUInt16BE(i + 1))
}

export async function startFlakyProxy (target: { host: string, port: number }, drops: number, cutOn: 'publish' | 'puback' = 'publish'): Promise<FlakyProxy> {
  let cut = 0
  const published: string[] = []
  const sockets = new Set<Socket>()
  const server: Server = createServer((client) => {
    const upstream = createConnection(target)
    for (const s of [client, upstream]) {
      sockets.add(s)
      s.on('close', () => sockets.delete(s))
      s.on('error', () => {})
    }
    upstream.on('close', () => client.destroy())
    client.on('close', () => upstream.destroy())
    // Forwards `from` to `to` packet by packet, cutting both at the first packet of type `cutType` while drops are left.
    const relay = (from: Socket, to: Socket, cutType: number | null): void => {
      let pending: Buffer = Buffer.alloc(0)
      from.on('data', (chunk: Buffer) => {
        const [whole, rest] = packets(Buffer.concat([pending, chunk]))
        pending = rest
        for (const p of whole) {
          if (((p[0] as number) >> 4) === cutType && cut < drops) {
            cut++
            client.destroy()
            upstream.destroy()
            return
          }
          if (from === client && ((p[0] as number) >> 4) === 3) published.push(topicOf(p))
          to.write(p)
        }
      })
    }
    relay(client, upstream, cutOn === 'publish' ? 3 : null)
    relay(upstream, client, cutOn === 'puback' ? 4 : null)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  if (address === null || typeof address === 'string') throw new Error('proxy has no port')
  return {
    url: `mqtt://127.0.0.1:${address.port}`,
    cut: () => cut,
    published: () => published,
    async close () {
      for (const s of sockets) s.destroy()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    },
  }
}
