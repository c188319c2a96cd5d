/**
 * ConnectionGuard's byte-level checks without a broker: valid traffic passes
 * through byte for byte however TCP splits it, and each malformed packet
 * closes the connection before its last byte reaches aedes — also when it
 * arrives one byte at a time.
 */
import { Duplex } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { ConnectionGuard, GuardGroup, type ViolationReason } from '../../../gateway/mqtt/connection-guard.ts'
import { connectPacket, packet, publishPacket, str, subscribePacket, u16, unsubscribePacket, varint } from '../../helpers/raw-mqtt.ts'

interface Run { readonly out: Buffer, readonly violations: Array<{ reason: ViolationReason, detail: string }> }

/** Feeds `chunks` to a guard over an in-memory socket; resolves with what aedes would have read and the violations. */
async function run (chunks: readonly Buffer[], maxPacketBytes = 4096): Promise<Run> {
  const socket = new Duplex({ read () {}, write (_chunk, _encoding, callback) { callback() } })
  const violations: Run['violations'] = []
  const guard = new ConnectionGuard(socket, {
    maxPacketBytes,
    maxInflight: 3,
    publishRate: 0,
    group: new GuardGroup(),
    onViolation: (reason, detail) => { violations.push({ reason, detail }) },
  })
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

  it('keeps only the variable header of a large PUBLISH, and checks it as soon as it is complete', async () => {
    // The topic is checked when the packet id arrives, long before the 3,000-byte payload.
    const big = publishPacket('a/#', Buffer.alloc(3000), 1, 9)
    const head = big.subarray(0, 3 + 2 + 3 + 2) // fixed header, topic length, topic, packet id: no payload at all
    const r = await run([head])
    expect(r.violations.map((v) => v.reason)).toEqual(['protocol'])
  })
})
