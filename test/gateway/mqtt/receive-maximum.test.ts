/**
 * InflightWindows (receive-maximum.ts) on bytes as mqtt-packet frames them: which PUBLISHes go out and which wait
 * for the client's receive maximum, packets split across writes, and the inbound count.
 */
import mqttPacket, { type Packet } from 'mqtt-packet'
import { describe, expect, it } from 'vitest'
import { InflightWindows, receiveMaximumOf } from '../../../gateway/mqtt/receive-maximum.ts'

const V5 = { protocolVersion: 5 } as const
const frame = (p: Packet): Buffer => mqttPacket.generate(p, V5)
const pub = (messageId: number, qos: 0 | 1 | 2 = 1, payload = `m${messageId}`): Buffer =>
  frame({ cmd: 'publish', topic: 'a/b', payload: Buffer.from(payload), qos, messageId: qos === 0 ? undefined : messageId, retain: false, dup: false })
const PUBACK = 4
const PUBREC = 5
const PUBCOMP = 7

/** The packets in `bytes`, parsed as an MQTT 5 client would. */
function parse (bytes: Buffer): Packet[] {
  const parser = mqttPacket.parser(V5)
  const out: Packet[] = []
  parser.on('packet', (p: Packet) => out.push(p))
  parser.parse(bytes)
  return out
}
const ids = (bytes: Buffer | null): Array<number | undefined> => (bytes === null ? [] : parse(bytes).map((p) => (p as { messageId?: number }).messageId))

describe('InflightWindows', () => {
  it('lets out at most the client\'s receive maximum of QoS 1/2 PUBLISHes and releases the rest, in order, as they are acknowledged', () => {
    const w = new InflightWindows(10, () => 2)
    const out = w.sending(Buffer.concat([pub(1), pub(2, 2), pub(3), pub(4, 0), pub(5)]))
    // QoS 0 is not held back, nor are acks; 3 and 5 wait.
    expect(ids(out)).toEqual([1, 2, undefined])
    expect(w.held).toBe(2)
    expect(ids(w.acknowledged(PUBREC, 2, 0))).toEqual([]) // a successful PUBREC does not end a QoS 2 delivery
    expect(ids(w.acknowledged(PUBCOMP, 2, 0))).toEqual([3])
    expect(ids(w.acknowledged(PUBACK, 99, 0))).toEqual([]) // not ours
    expect(ids(w.acknowledged(PUBACK, 1, 0))).toEqual([5])
    expect(w.held).toBe(0)
    expect(w.heldBytes).toBe(0)
    expect(w.outbound).toBe(2)
    // A PUBREC with an error code ends the exchange.
    expect(w.sending(pub(6))).toHaveLength(0)
    expect(ids(w.acknowledged(PUBREC, 3, 0x80))).toEqual([6])
  })

  it('keeps later QoS 1/2 PUBLISHes behind held ones even when there is room, and acks pass the held ones', () => {
    const w = new InflightWindows(10, () => 1)
    expect(ids(w.sending(Buffer.concat([pub(1), pub(2)])))).toEqual([1])
    const puback = frame({ cmd: 'puback', messageId: 7 })
    expect(parse(w.sending(puback)).map((p) => p.cmd)).toEqual(['puback'])
    expect(ids(w.acknowledged(PUBACK, 1, 0))).toEqual([2])
  })

  it('carries a packet split across writes to the next write, at any byte', () => {
    const bytes = Buffer.concat([pub(1, 1, 'x'.repeat(300)), pub(2), pub(3)])
    for (let cut = 1; cut < bytes.length; cut++) {
      const w = new InflightWindows(10, () => 2)
      const out = Buffer.concat([w.sending(bytes.subarray(0, cut)), w.sending(bytes.subarray(cut))])
      expect(ids(out)).toEqual([1, 2])
      expect(w.held).toBe(1)
    }
  })

  it('counts the client\'s QoS 1/2 PUBLISHes until the gateway\'s PUBACK, PUBCOMP or failing PUBREC goes out', () => {
    const w = new InflightWindows(2, () => 65535)
    expect(w.received(1)).toBe(true)
    expect(w.received(2)).toBe(true)
    expect(w.received(2)).toBe(true) // a retransmission takes no second place
    w.sending(Buffer.concat([frame({ cmd: 'puback', messageId: 1 }), frame({ cmd: 'pubrec', messageId: 2 })]))
    expect(w.inbound).toBe(1) // 2 is open until its PUBCOMP
    expect(w.received(3)).toBe(true)
    expect(w.received(4)).toBe(false)
    w.sending(Buffer.concat([frame({ cmd: 'pubcomp', messageId: 2 }), frame({ cmd: 'pubrec', messageId: 3, reasonCode: 0x97 })]))
    expect(w.inbound).toBe(1)
  })

  it('reads the receive maximum of an MQTT 5 client, and 65535 for 3.1.1 or none', () => {
    expect(receiveMaximumOf({ version: 5, receiveMaximum: 20 })).toBe(20)
    expect(receiveMaximumOf({ version: 4, receiveMaximum: 20 })).toBe(65535)
    expect(receiveMaximumOf({ version: 5, receiveMaximum: 0 })).toBe(65535)
  })
})
