/**
 * OutboundTopicAliases (topic-aliases.ts) on PUBLISH packets as mqtt-packet frames them, read back by mqtt-packet's
 * MQTT 5 parser as a client reads them.
 */
import mqttPacket, { type Packet } from 'mqtt-packet'
import { describe, expect, it } from 'vitest'
import { MAX_ALIASES, OutboundTopicAliases } from '../../../gateway/mqtt/topic-aliases.ts'

const V5 = { protocolVersion: 5 } as const
const frame = (p: Packet): Buffer => mqttPacket.generate(p, V5)

function parse (bytes: Buffer): Packet[] {
  const parser = mqttPacket.parser(V5)
  const out: Packet[] = []
  parser.on('packet', (p: Packet) => out.push(p))
  parser.parse(bytes)
  return out
}

describe('OutboundTopicAliases', () => {
  const withProps = (topic: string, qos: 0 | 1, messageId: number, payload: string): Buffer => frame({
    cmd: 'publish', topic, payload: Buffer.from(payload), qos, messageId: qos === 0 ? undefined : messageId, retain: false, dup: false,
    properties: { contentType: 'text/plain', userProperties: { k: 'v' } },
  })

  it('sends a topic once with a new alias, then the alias alone; keeps ids, properties and payloads; stops at the maximum', () => {
    const aliases = new OutboundTopicAliases(2)
    const out = aliases.rewrite(Buffer.concat([
      withProps('a/b', 1, 1, 'one'), frame({ cmd: 'puback', messageId: 9 }), withProps('a/b', 0, 0, 'two'),
      withProps('c', 1, 2, 'x'.repeat(200)), withProps('d', 1, 3, 'three'), withProps('c', 0, 0, 'four'),
    ]))
    const packets = parse(out) as Array<Packet & { topic?: string, payload?: Buffer, messageId?: number, properties?: Record<string, unknown> }>
    expect(packets.map((p) => [p.cmd, p.topic ?? undefined, p.properties?.topicAlias, p.messageId ?? undefined])).toEqual([
      ['publish', 'a/b', 1, 1], ['puback', undefined, undefined, 9], ['publish', '', 1, undefined],
      ['publish', 'c', 2, 2], ['publish', 'd', undefined, 3], ['publish', '', 2, undefined],
    ])
    for (const p of packets.filter((q) => q.cmd === 'publish')) expect(p.properties).toMatchObject({ contentType: 'text/plain', userProperties: { k: 'v' } })
    expect(packets.filter((p) => p.cmd === 'publish').map((p) => String(p.payload))).toEqual(['one', 'two', 'x'.repeat(200), 'three', 'four'])
    expect(aliases.size).toBe(2)
  })

  it('gives no more than MAX_ALIASES aliases, whatever the client allows', () => {
    const aliases = new OutboundTopicAliases(65535)
    const out = aliases.rewrite(Buffer.concat(Array.from({ length: MAX_ALIASES + 5 }, (_, i) => withProps(`t/${i}`, 0, 0, 'p'))))
    const alias = parse(out).map((p) => (p as { properties?: { topicAlias?: number } }).properties?.topicAlias)
    expect(alias.filter((a) => a !== undefined)).toHaveLength(MAX_ALIASES)
    expect(Math.max(...alias.map((a) => a ?? 0))).toBe(MAX_ALIASES)
  })
})
