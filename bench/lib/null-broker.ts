/**
 * A broker that does nothing: it answers CONNECT with CONNACK, every QoS 1
 * PUBLISH with a PUBACK (one write per chunk read) and PINGREQ with
 * PINGRESP, and drops everything else. `bench/gateway.ts --check-generator`
 * runs the load generator against it to show how far above the real
 * brokers' rates the generator can go on this machine. Prints
 * `null-broker listening on <port>` once it listens on the port given as
 * the first argument (0 picks one).
 */
import net, { type AddressInfo } from 'node:net'
import { frameAt } from './mqtt/frame.ts'

const CONNACK = Buffer.from([0x20, 0x02, 0x00, 0x00])
const PINGRESP = Buffer.from([0xd0, 0x00])

function serve (socket: net.Socket): void {
  socket.setNoDelay(true)
  let carry: Buffer | null = null
  socket.on('error', () => {})
  socket.on('data', (chunk: Buffer) => {
    const buf: Buffer = carry === null ? chunk : Buffer.concat([carry, chunk])
    carry = null
    const out: Buffer[] = []
    let acks: Buffer | null = null
    let nAcks = 0
    let i = 0
    while (i + 2 <= buf.length) {
      const frame = frameAt(buf, i)
      if (frame === null) break
      const { body: j, length } = frame
      const first = buf[i] as number
      const type = first >> 4
      if (type === 1) out.push(CONNACK)
      else if (type === 12) out.push(PINGRESP)
      else if (type === 14) socket.end()
      else if (type === 3 && ((first >> 1) & 3) === 1) {
        const id = buf.readUInt16BE(j + 2 + buf.readUInt16BE(j))
        acks ??= Buffer.allocUnsafe(4 * Math.ceil(buf.length / 7)) // a QoS 1 PUBLISH has at least 7 bytes
        acks[4 * nAcks] = 0x40
        acks[4 * nAcks + 1] = 0x02
        acks.writeUInt16BE(id, 4 * nAcks + 2)
        nAcks++
      }
      i = j + length
    }
    if (i < buf.length) carry = Buffer.from(buf.subarray(i))
    for (const b of out) socket.write(b)
    if (acks !== null) socket.write(acks.subarray(0, 4 * nAcks))
  })
}

const server = net.createServer(serve)
server.listen(Number(process.argv[2] ?? 0), '127.0.0.1', () => {
  process.stdout.write(`null-broker listening on ${(server.address() as AddressInfo).port}\n`)
})
process.on('SIGTERM', () => process.exit(0))
