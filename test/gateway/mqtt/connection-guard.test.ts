/**
 * ConnectionGuard's byte-level checks without a broker: valid traffic passes
 * through byte for byte however TCP splits it, and each malformed packet
 * closes the connection before its last byte reaches aedes — also when it
 * arrives one byte at a time.
 */
import { Duplex } from 'node:stream'
import mqttPacket, { type Packet } from 'mqtt-packet'
import { describe, expect, it } from 'vitest'
import { ConnectionGuard, GuardGroup, type PubackTaker, type ViolationReason } from '../../../gateway/mqtt/connection-guard.ts'
import { connectPacket, packet, publishPacket, str, subscribePacket, u16, unsubscribePacket, varint } from '../../helpers/raw-mqtt.ts'

interface Run { readonly out: Buffer, readonly violations: Array<{ reason: ViolationReason, detail: string }> }

/** Feeds `chunks` to a guard over an in-memory socket; resolves with what aedes would have read and the violations. */
async function run (chunks: readonly Buffer[], maxPacketBytes = 4096, pubacks?: PubackTaker): Promise<Run> {
  const socket = new Duplex({ read () {}, write (_chunk, _encoding, callback) { callback() } })
  const violations: Run['violations'] = []
  const guard = new ConnectionGuard(socket, {
    maxPacketBytes,
    maxInflight: 3,
    publishRate: 0,
    group: new GuardGroup(),
    onViolation: (reason, detail) => { violations.push({ reason, detail }) },
  })
  if (pubacks !== undefined) guard.pubacks = pubacks
  const out: Buffer[] = []
  guard.on('data', (d: Buffer) => out.push(d))
  guard.on('error', () => {})
  const done = new Promise<void>((resolve) => { guard.once('end', resolve); guard.once('close', resolve) })
  for (const c of chunks) {
    if (socket.destroyed) break
    socket.push(c)
    await new Promise((resolve) => setImmediate(resolve))
  }
  if (!socket.destroyed) socket.push(null)
  await Promise.race([done, new Promise((resolve) => setTimeout(resolve, 2000))])
  return { out: Buffer.concat(out), violations }
}

const bytewise = (b: Buffer): Buffer[] => Array.from(b, (x) => Buffer.from([x]))

/** Deterministic pseudo-random splits (so a failure reproduces). */
function splits (b: Buffer, seed: number): Buffer[] {
  const parts: Buffer[] = []
  let x = seed
  for (let at = 0; at < b.length;) {
    x = (x * 1103515245 + 12345) % 2147483648
    const n = 1 + (x % 23)
    parts.push(b.subarray(at, at + n))
    at += n
  }
  return parts
}

const VALID = Buffer.concat([
  connectPacket({ clientId: 'dev-1', username: 'u', password: 'p' }),
  subscribePacket(1, ['devices/dev-1/commands/#', 'a/+/b', 'h\u00e9llo/\u4e16\u754c']),
  publishPacket('devices/dev-1/telemetry/t', 'zero', 0),
  publishPacket('devices/dev-1/telemetry/\u00e9t\u00e9', 'one', 1, 1),
  publishPacket('devices/dev-1/telemetry/t', Buffer.alloc(1000, 7), 2, 65535),
  publishPacket('t', Buffer.alloc(0), 1, 2), // empty payload: the packet ends with the packet id
  packet(0x62, u16(65535)), // PUBREL
  packet(0x40, u16(1)), // PUBACK
  unsubscribePacket(3, ['a/+/b', 'h\u00e9llo/\u4e16\u754c']),
  packet(0xc0, Buffer.alloc(0)), // PINGREQ
  packet(0xe0, Buffer.alloc(0)), // DISCONNECT
])

describe('ConnectionGuard', () => {
  it('passes valid traffic through byte for byte, whole, one byte at a time, or split anywhere', async () => {
    for (const chunks of [[VALID], bytewise(VALID), splits(VALID, 1), splits(VALID, 2), splits(VALID, 3)]) {
      const r = await run(chunks)
      expect(r.violations).toEqual([])
      expect(r.out.equals(VALID)).toBe(true)
    }
  })

  const prefix = Buffer.concat([connectPacket({ clientId: 'dev-1' }), publishPacket('ok/topic', 'fine', 1, 1)])
  const bad: Array<[string, Buffer, ViolationReason, RegExp]> = [
    ['QoS 1 PUBLISH with packet id 0', publishPacket('a/b', 'x', 1, 0), 'protocol', /packet id 0/],
    ['QoS 2 PUBLISH with packet id 0', publishPacket('a/b', 'x', 2, 0), 'protocol', /packet id 0/],
    ['PUBLISH with + in the topic', publishPacket('a/+/b', 'x', 0), 'protocol', /wildcard/],
    ['PUBLISH with # in the topic', publishPacket('a/#', 'x', 1, 4), 'protocol', /wildcard/],
    ['PUBLISH with U+0000 in the topic', publishPacket('a/\u0000', 'x', 1, 4), 'protocol', /U\+0000/],
    ['PUBLISH with invalid UTF-8 in the topic', publishPacket(Buffer.from([0x61, 0xc3]), 'x', 1, 4), 'protocol', /UTF-8/],
    ['PUBLISH with a UTF-16 surrogate encoded in the topic', publishPacket(Buffer.from([0xed, 0xa0, 0x80]), 'x', 0), 'protocol', /UTF-8/],
    ['PUBLISH with an empty topic', publishPacket('', 'x', 1, 4), 'protocol', /empty topic/],
    ['PUBLISH shorter than its topic length', packet(0x30, Buffer.concat([u16(50), Buffer.from('abc')])), 'protocol', /shorter/],
    ['PUBLISH with no room for its packet id', packet(0x32, str('abc')), 'protocol', /shorter/],
    ['PUBLISH with both QoS bits', packet(0x36, Buffer.concat([str('a'), u16(1)])), 'malformed-header', /QoS bits/],
    ['SUBSCRIBE without filters', subscribePacket(5, []), 'protocol', /without a topic filter/],
    ['SUBSCRIBE with packet id 0', subscribePacket(0, ['a']), 'protocol', /packet id 0/],
    ['SUBSCRIBE with U+0000 in a filter', subscribePacket(5, ['a', 'b\u0000']), 'protocol', /U\+0000/],
    ['SUBSCRIBE with QoS 3', subscribePacket(5, ['a'], 3), 'protocol', /options/],
    ['SUBSCRIBE with a filter missing its QoS byte', packet(0x82, Buffer.concat([u16(5), str('a')])), 'protocol', /QoS byte/],
    ['SUBSCRIBE with wrong fixed-header flags', packet(0x80, Buffer.concat([u16(5), str('a'), Buffer.from([0])])), 'malformed-header', /flags/],
    ['UNSUBSCRIBE without filters', unsubscribePacket(5, []), 'protocol', /without a topic filter/],
    ['UNSUBSCRIBE with an empty filter', unsubscribePacket(5, ['']), 'protocol', /empty topic filter/],
    ['UNSUBSCRIBE with invalid UTF-8', unsubscribePacket(5, [Buffer.from([0xff])]), 'protocol', /UTF-8/],
    ['reserved packet type 0', packet(0x00, Buffer.alloc(0)), 'malformed-header', /reserved/],
    ['reserved packet type 15', packet(0xf0, Buffer.alloc(0)), 'malformed-header', /reserved/],
    ['PUBREL with flags 0', packet(0x60, u16(1)), 'malformed-header', /flags/],
    ['remaining length over four bytes', Buffer.from([0x30, 0xff, 0xff, 0xff, 0xff, 0x01]), 'malformed-header', /longer than 4 bytes/],
    ['packet over maxPacketBytes (header only)', Buffer.concat([Buffer.from([0x30]), varint(10 * 1024 * 1024)]), 'packet-too-large', /exceeds maxPacketBytes/],
  ]

  for (const [title, bytes, reason, detail] of bad) {
    it(`closes the connection on a ${title}, before the packet reaches aedes (whole and byte by byte)`, async () => {
      for (const chunks of [[prefix, bytes], bytewise(Buffer.concat([prefix, bytes]))]) {
        const r = await run(chunks)
        expect(r.violations.map((v) => v.reason)).toEqual([reason])
        expect(r.violations[0]?.detail).toMatch(detail)
        // aedes never saw the whole bad packet; of the prefix it saw at most what came before it.
        expect(r.out.length).toBeLessThan(prefix.length + bytes.length)
        expect(r.out.equals(Buffer.concat([prefix, bytes]).subarray(0, r.out.length))).toBe(true)
      }
    })
  }

  it('hands a PUBACK taker the short PUBACKs it holds, cut from what aedes reads, whole or split anywhere; the rest pass', async () => {
    const traffic = Buffer.concat([
      connectPacket({ clientId: 'sub' }),
      ...Array.from({ length: 12 }, (_v, k) => packet(0x40, u16(k + 1))), // more than maxInflight (3) in a row
      publishPacket('t', 'x', 1, 40),
      packet(0x40, u16(8)),
      packet(0xc0, Buffer.alloc(0)), // PINGREQ
      packet(0x40, u16(12)), // again: the taker holds it no more
    ])
    for (const chunks of [[traffic], bytewise(traffic), splits(traffic, 1), splits(traffic, 2)]) {
      const held = new Set([2, 4, 6, 8, 10, 12])
      const taken: number[] = []
      let reads = 0
      const r = await run(chunks, 4096, {
        take: (id) => { if (!held.delete(id)) return false; taken.push(id); return true },
        taken: () => { reads++ },
      })
      expect(r.violations).toEqual([])
      const parser = mqttPacket.parser({ protocolVersion: 4 })
      const passed: Packet[] = []
      parser.on('packet', (p: Packet) => passed.push(p))
      parser.parse(r.out)
      const acks = passed.flatMap((p) => p.cmd === 'puback' ? [p.messageId as number] : [])
      // every PUBACK exactly once: taken, or passed to aedes in order with everything else
      expect([...taken, ...acks].sort((a, b) => a - b)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12, 12])
      expect(passed.map((p) => p.cmd).filter((c) => c !== 'puback')).toEqual(['connect', 'publish', 'pingreq'])
      expect(reads).toBeLessThanOrEqual(chunks.length)
      if (chunks.length === 1) expect([taken, reads]).toEqual([[2, 4, 6, 8, 10, 12], 1])
    }
  })

  it('keeps only the variable header of a large PUBLISH, and checks it as soon as it is complete', async () => {
    // The topic is checked when the packet id arrives, long before the 3,000-byte payload.
    const big = publishPacket('a/#', Buffer.alloc(3000), 1, 9)
    const head = big.subarray(0, 3 + 2 + 3 + 2) // fixed header, topic length, topic, packet id: no payload at all
    const r = await run([head])
    expect(r.violations.map((v) => v.reason)).toEqual(['protocol'])
  })
})

/** MQTT 5 frames, as mqtt-packet (MQTT.js's encoder) writes them. */
const v5 = (p: Packet): Buffer => mqttPacket.generate(p, { protocolVersion: 5 })
describe('ConnectionGuard, writes', () => {
  const options = (): ConstructorParameters<typeof ConnectionGuard>[1] => ({
    maxPacketBytes: 4096, maxInflight: 10, publishRate: 0, group: new GuardGroup(), onViolation: () => {},
  })

  it('sends what was written in one turn of the event loop in one socket write, in order, even across setImmediate callbacks', async () => {
    const writes: Buffer[] = []
    const socket = new Duplex({ read () {}, write (chunk: Buffer, _encoding, callback) { writes.push(chunk); callback() } })
    const guard = new ConnectionGuard(socket, options())
    const acked: number[] = []
    // aedes delivers each message from its own setImmediate callback.
    await new Promise<void>((resolve) => {
      for (let i = 1; i <= 3; i++) setImmediate(() => guard.write(Buffer.from([0x40, 2, 0, i]), () => { acked.push(i); if (i === 3) resolve() }))
    })
    await new Promise((resolve) => setImmediate(resolve))
    expect(acked).toEqual([1, 2, 3])
    expect(writes).toEqual([Buffer.from([0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3])])
  })

  it('sends the acks of a group commit once the microtasks that wrote them are done, before the next check phase (flushSoon)', async () => {
    const writes: Buffer[] = []
    const socket = new Duplex({ read () {}, write (chunk: Buffer, _encoding, callback) { writes.push(chunk); callback() } })
    const group = new GuardGroup()
    const guard = new ConnectionGuard(socket, { ...options(), group })
    let checked = false
    setImmediate(() => { checked = true })
    // As a commit's resolution: each append's promise chain writes its PUBACK, in microtasks of one turn.
    await Promise.all([1, 2, 3].map(async (i) => {
      await Promise.resolve()
      group.flushSoon(guard)
      guard.write(Buffer.from([0x40, 2, 0, i]))
    }))
    group.flushSoon({}) // not one of the group's connections: ignored
    await new Promise((resolve) => process.nextTick(resolve))
    expect(checked).toBe(false)
    expect(writes).toEqual([Buffer.from([0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3])])
    // Later writes wait for the check phase again.
    guard.write(Buffer.from([0x40, 2, 0, 4]))
    await new Promise((resolve) => process.nextTick(resolve))
    expect(writes).toHaveLength(1)
    await new Promise((resolve) => setImmediate(resolve))
    expect(writes).toEqual([Buffer.from([0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3]), Buffer.from([0x40, 2, 0, 4])])
  })

  it('holds a write until the socket drains once the socket asked for it, and flushes before it ends', async () => {
    const writes: Buffer[] = []
    let release: (() => void) | undefined
    const socket = new Duplex({
      writableHighWaterMark: 4,
      read () {},
      write (chunk: Buffer, _encoding, callback) { writes.push(chunk); release = () => callback() },
    })
    const guard = new ConnectionGuard(socket, options())
    guard.write(Buffer.alloc(8, 1))
    await new Promise((resolve) => setImmediate(resolve))
    expect(socket.writableNeedDrain).toBe(true)
    let second = false
    guard.write(Buffer.alloc(2, 2), () => { second = true })
    await new Promise((resolve) => setImmediate(resolve))
    expect(second).toBe(false)
    release?.() // the 8 bytes are out; the socket starts on the 2 flushed after them
    await new Promise((resolve) => setImmediate(resolve))
    expect(second).toBe(false)
    release?.() // now the socket is empty: 'drain'
    await new Promise((resolve) => setImmediate(resolve))
    expect(second).toBe(true)
    const finished = new Promise((resolve) => socket.once('finish', resolve))
    guard.end(Buffer.from([0xe0, 0]))
    await new Promise((resolve) => setImmediate(resolve))
    release?.()
    await finished
    expect(Buffer.concat(writes)).toEqual(Buffer.concat([Buffer.alloc(8, 1), Buffer.alloc(2, 2), Buffer.from([0xe0, 0])]))
  })
})

const CONNECT5 = v5({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clean: true, keepalive: 30, clientId: 'dev-5',
  properties: { sessionExpiryInterval: 300, receiveMaximum: 10, topicAliasMaximum: 4, requestProblemInformation: true } })

describe('ConnectionGuard, MQTT 5 framing (the CONNECT\'s protocol level decides)', () => {
  const valid = Buffer.concat([
    CONNECT5,
    v5({ cmd: 'subscribe', messageId: 1, properties: { subscriptionIdentifier: 7, userProperties: { a: 'b' } },
      subscriptions: [{ topic: 'devices/dev-5/commands/#', qos: 1, nl: true, rap: true, rh: 2 }, { topic: 'a/+/b', qos: 2, nl: false, rap: false, rh: 1 },
        { topic: '$share/g/a/#', qos: 1, nl: false }, { topic: '$sharex/a', qos: 1, nl: true }] }),
    v5({ cmd: 'publish', topic: 'devices/dev-5/telemetry/t', payload: Buffer.from('hi'), qos: 1, messageId: 2, retain: false, dup: false,
      properties: { topicAlias: 1, contentType: 'text/plain', payloadFormatIndicator: true, userProperties: { k: ['v1', 'v2'] } } }),
    // An empty topic with the alias registered above (MQTT 5 3.3.2.3.4).
    v5({ cmd: 'publish', topic: '', payload: Buffer.from('again'), qos: 0, retain: false, dup: false, properties: { topicAlias: 1 } }),
    v5({ cmd: 'puback', messageId: 9, reasonCode: 0x10, properties: { reasonString: 'no matching subscribers' } }),
    v5({ cmd: 'unsubscribe', messageId: 3, properties: { userProperties: { why: 'done' } }, unsubscriptions: ['a/+/b'] }),
    v5({ cmd: 'auth', reasonCode: 0x18, properties: { authenticationMethod: 'x' } }),
    v5({ cmd: 'disconnect', reasonCode: 0, properties: { sessionExpiryInterval: 0 } }),
  ])

  it('passes valid MQTT 5 traffic through byte for byte, whole, one byte at a time, or split anywhere', async () => {
    for (const chunks of [[valid], bytewise(valid), splits(valid, 4), splits(valid, 5)]) {
      const r = await run(chunks)
      expect(r.violations).toEqual([])
      expect(r.out.equals(valid)).toBe(true)
    }
  })

  const subscribe5 = (options: number): Buffer => packet(0x82, Buffer.concat([u16(5), varint(0), str('a/b'), Buffer.from([options])]))
  const bad: Array<[string, Buffer, ViolationReason, RegExp]> = [
    ['SUBSCRIBE with retain handling 3', subscribe5(0x31), 'protocol', /options/],
    ['SUBSCRIBE with a reserved option bit', subscribe5(0x41), 'protocol', /options/],
    ['SUBSCRIBE with No Local on a shared subscription', v5({ cmd: 'subscribe', messageId: 6,
      subscriptions: [{ topic: 'a/b', qos: 1, nl: true }, { topic: '$share/g/a/#', qos: 1, nl: true }] }), 'protocol', /No Local on a shared/],
    ['SUBSCRIBE with properties longer than the packet', packet(0x82, Buffer.concat([u16(5), varint(40), str('a')])), 'protocol', /properties/],
    ['SUBSCRIBE with properties and no filter', packet(0x82, Buffer.concat([u16(5), varint(2), Buffer.from([0x0b, 1])])), 'protocol', /without a topic filter/],
    ['UNSUBSCRIBE with a cut-off property length', packet(0xa2, Buffer.concat([u16(5), Buffer.from([0x80])])), 'protocol', /properties/],
    ['PUBLISH with a wildcard topic', v5({ cmd: 'publish', topic: 'a/#', payload: Buffer.from('x'), qos: 0, retain: false, dup: false }), 'protocol', /wildcard/],
    ['AUTH with flags', packet(0xf1, Buffer.alloc(0)), 'malformed-header', /flags/],
  ]
  for (const [title, bytes, reason, detail] of bad) {
    it(`closes an MQTT 5 connection on a ${title} (whole and byte by byte)`, async () => {
      for (const chunks of [[CONNECT5, bytes], bytewise(Buffer.concat([CONNECT5, bytes]))]) {
        const r = await run(chunks)
        expect(r.violations.map((v) => v.reason)).toEqual([reason])
        expect(r.violations[0]?.detail).toMatch(detail)
      }
    })
  }

  it('still refuses MQTT 5 framing from a 3.1.1 client: AUTH, an empty topic, subscription options', async () => {
    const connect4 = connectPacket({ clientId: 'dev-4' })
    for (const bytes of [packet(0xf0, Buffer.alloc(0)), publishPacket('', 'x', 0), subscribePacket(5, ['a'], 0x24)]) {
      const r = await run([connect4, bytes])
      expect(r.violations).toHaveLength(1)
    }
  })

  it('holds QoS 1 PUBLISHes beyond the client\'s receive maximum, makes writes wait past 256 KiB held, and lets them out on PUBACKs split anywhere',
    async () => {
      const written: Buffer[] = []
      const socket = new Duplex({ read () {}, write (chunk: Buffer, _encoding, callback) { written.push(chunk); callback() } })
      const guard = new ConnectionGuard(socket, { maxPacketBytes: 4096, maxInflight: 3, publishRate: 0, group: new GuardGroup(), onViolation: () => {} })
      guard.on('data', () => {})
      socket.push(CONNECT5)
      await new Promise((resolve) => setImmediate(resolve))
      // What aedes sets from the CONNECT (lib/handlers/connect.js): the client's receive maximum.
      Object.assign(guard, { client: { receiveMaximum: 1 } })
      const publish = (id: number): Buffer => v5({ cmd: 'publish', topic: 'a/b', payload: Buffer.alloc(100 * 1024, id), qos: 1, messageId: id, retain: false, dup: false })
      const wrote = (): number[] => {
        const ids: number[] = []
        const parser = mqttPacket.parser({ protocolVersion: 5 })
        parser.on('packet', (p: Packet) => { if (p.cmd === 'publish') ids.push(p.messageId as number) })
        parser.parse(Buffer.concat(written))
        return ids
      }
      /** Writes reach the socket once per event-loop turn: a few turns at most. */
      const turns = async (until: () => boolean): Promise<void> => {
        for (let i = 0; i < 20 && !until(); i++) await new Promise((resolve) => setImmediate(resolve))
      }
      let drained = 0
      guard.on('drain', () => { drained++ })
      for (let id = 1; id <= 4; id++) guard.write(publish(id))
      await turns(() => wrote().length >= 1)
      expect(wrote()).toEqual([1]) // 2, 3, 4 held: 300 KiB, over the limit, so the last write has not completed
      expect(guard.writableLength).toBeGreaterThan(0)
      const drain = new Promise((resolve) => guard.once('drain', resolve))
      for (const byte of v5({ cmd: 'puback', messageId: 1 })) socket.push(Buffer.from([byte]))
      await drain
      await turns(() => wrote().length >= 2)
      expect(wrote()).toEqual([1, 2])
      socket.push(v5({ cmd: 'puback', messageId: 2 }))
      socket.push(v5({ cmd: 'puback', messageId: 3 }))
      await turns(() => wrote().length >= 4)
      expect(wrote()).toEqual([1, 2, 3, 4])
      expect(drained).toBeGreaterThan(0)
      guard.destroy()
    })

  it('after the CONNACK, tells an MQTT 5 client why with a DISCONNECT (0x95, 0x81, 0x82), never a 3.1.1 client nor before the CONNACK', async () => {
    const cases: Array<[Buffer, Buffer, boolean, number | null]> = [
      [CONNECT5, Buffer.concat([Buffer.from([0x30]), varint(10 * 1024 * 1024)]), true, 0x95],
      [CONNECT5, packet(0x00, Buffer.alloc(0)), true, 0x81],
      [CONNECT5, subscribe5(0x31), true, 0x82],
      [CONNECT5, subscribe5(0x31), false, null],
      [connectPacket({ clientId: 'dev-4' }), subscribePacket(5, ['a'], 3), true, null],
    ]
    for (const [connect, bytes, connacked, code] of cases) {
      const written: Buffer[] = []
      const socket = new Duplex({ read () {}, write (chunk: Buffer, _encoding, callback) { written.push(chunk); callback() } })
      const guard = new ConnectionGuard(socket, { maxPacketBytes: 4096, maxInflight: 3, publishRate: 0, group: new GuardGroup(), onViolation: () => {} })
      guard.on('data', () => {})
      if (connacked) guard.write(Buffer.from([0x20, 3, 0, 0, 0])) // aedes' CONNACK
      guard.on('error', () => {})
      const closed = new Promise((resolve) => socket.once('close', resolve))
      socket.push(connect)
      socket.push(bytes)
      await closed
      const connack = connacked ? [Buffer.from([0x20, 3, 0, 0, 0])] : []
      expect(Buffer.concat(written)).toEqual(Buffer.concat([...connack, ...(code === null ? [] : [Buffer.from([0xe0, 2, code, 0])])]))
    }
  })
})
