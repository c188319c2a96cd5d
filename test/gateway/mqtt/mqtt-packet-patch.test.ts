/**
 * patches/mqtt-packet+9.0.2.patch reads whether mqtt-packet's debug namespaces are on once per chunk parsed and per
 * packet written, instead of calling a disabled debug() some twenty times per packet (the gateway's CPU per message,
 * issue 13). MQTT.js in the same process uses the same mqtt-packet, so what it does must not change: packets parse and
 * serialize as before, and `DEBUG=mqtt-packet:*` (or debug.enable at run time) still logs both ways. The patch also
 * reads header bytes, numbers and topics off the parser's buffer list in place: a packet arriving in pieces (a byte at
 * a time, a topic's UTF-8 character split between two reads) parses as one arriving whole.
 */
import { createRequire } from 'node:module'
import { once } from 'node:events'
import { PassThrough } from 'node:stream'
import { afterEach, describe, expect, it } from 'vitest'

const require = createRequire(import.meta.url)
const mqttPacket = require('mqtt-packet') as typeof import('mqtt-packet')
interface Debug {
  enable (namespaces: string): void
  disable (): string
  log: (...args: unknown[]) => void
}
const debug = require('debug') as Debug

const PUBLISH = { cmd: 'publish', topic: 'devices/dev-1/telemetry/t', payload: Buffer.from('x'.repeat(100)), qos: 1, messageId: 42, retain: false, dup: false } as const

/** The packets parsed from `bytes` read in chunks of `chunk` bytes (by default two reads, split inside the topic). */
function parseAll (bytes: Buffer, chunk?: number): unknown[] {
  const parser = mqttPacket.parser({ protocolVersion: 4 })
  const packets: unknown[] = []
  parser.on('packet', (p) => packets.push(p))
  parser.on('error', (err) => { throw err })
  if (chunk === undefined) {
    parser.parse(bytes.subarray(0, 7))
    parser.parse(bytes.subarray(7))
  } else {
    for (let at = 0; at < bytes.length; at += chunk) parser.parse(bytes.subarray(at, at + chunk))
  }
  return packets
}

/** What writeToStream writes (it corks the stream until the next tick). */
async function writeAll (): Promise<Buffer> {
  const stream = new PassThrough()
  mqttPacket.writeToStream(PUBLISH, stream, { protocolVersion: 4 })
  await once(stream, 'readable')
  return stream.read() as Buffer
}

describe('mqtt-packet as patched', () => {
  const originalLog = debug.log
  afterEach(() => {
    debug.disable()
    debug.log = originalLog
  })

  it('parses and writes as it did, logging nothing while its debug namespaces are off', async () => {
    const lines: unknown[][] = []
    debug.log = (...args) => { lines.push(args) }
    const bytes = mqttPacket.generate(PUBLISH)
    expect((await writeAll()).equals(bytes)).toBe(true)
    const [packet] = parseAll(Buffer.concat([bytes, bytes])) as Array<Record<string, unknown>>
    expect(packet).toMatchObject({ cmd: 'publish', topic: PUBLISH.topic, qos: 1, messageId: 42, payload: PUBLISH.payload })
    expect(lines).toEqual([])
  })

  it('parses packets arriving a byte at a time, or split inside a UTF-8 character, as packets arriving whole', () => {
    const publish = mqttPacket.generate({ ...PUBLISH, topic: 'devices/gerät-ü/telemetry/t' })
    const puback = mqttPacket.generate({ cmd: 'puback', messageId: 513 })
    const big = mqttPacket.generate({ ...PUBLISH, payload: Buffer.alloc(300, 7) }) // a two-byte remaining length
    const stream = Buffer.concat([publish, puback, big, puback])
    const whole = parseAll(stream, stream.length)
    expect(whole).toHaveLength(4)
    expect(whole[0]).toMatchObject({ topic: 'devices/gerät-ü/telemetry/t', messageId: 42 })
    expect(whole[1]).toMatchObject({ cmd: 'puback', messageId: 513 })
    expect(whole[2]).toMatchObject({ length: big.length - 3, payload: Buffer.alloc(300, 7) })
    for (const chunk of [1, 2, 3, 5, 13]) expect(parseAll(stream, chunk)).toEqual(whole)
  })

  it('logs the parser and the writer once their namespaces are enabled at run time', async () => {
    const lines: string[] = []
    debug.log = (...args) => { lines.push(String(args[0])) }
    debug.enable('mqtt-packet:*')
    const bytes = await writeAll()
    expect(lines.some((l) => l.includes('mqtt-packet:writeToStream') && l.includes('publish: packet'))).toBe(true)
    expect(parseAll(bytes)).toHaveLength(1)
    expect(lines.some((l) => l.includes('mqtt-packet:parser') && l.includes('_parsePublish'))).toBe(true)
    const logged = lines.length
    debug.disable()
    expect(parseAll(bytes)).toHaveLength(1)
    expect(lines).toHaveLength(logged)
  })
})
