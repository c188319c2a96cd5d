/**
 * Outbound MQTT 5 topic aliases (topic-aliases.ts) on a real gateway over TCP: MQTT.js resolves them, a client
 * that allows none gets none, and a raw client checks that a topic is registered on the wire before its alias is
 * used alone, also when the receive maximum holds a PUBLISH back and a later QoS 0 one overtakes it.
 */
import type { MqttClient } from 'mqtt'
import type { Packet } from 'mqtt-packet'
import { pino } from 'pino'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig } from '../../../gateway/config/config.ts'
import { startGateway, type Gateway } from '../../../gateway/gateway.ts'
import { tempDir } from '../../helpers/gateway-process.ts'
import { connectOk, waitFor } from '../../helpers/mqtt-probe.ts'
import { rawConnect } from '../../helpers/raw-client.ts'

const TIMEOUT = 30_000

/** What a PUBLISH looked like on the wire: MQTT.js resolves an alias into the same packet object afterwards. */
interface Wire { readonly topic: string, readonly alias: number | undefined, readonly payload: string }

function wireOf (client: MqttClient): Wire[] {
  const seen: Wire[] = []
  client.on('packetreceive', (p) => {
    if (p.cmd === 'publish') seen.push({ topic: p.topic, alias: p.properties?.topicAlias, payload: String(p.payload) })
  })
  return seen
}

describe('MQTT 5 outbound topic aliases', () => {
  let gw: Gateway
  let url: string
  let cleanup: () => Promise<void>
  const clients = new Set<MqttClient>()
  beforeAll(async () => {
    const dir = await tempDir('edgemq-aliases-')
    cleanup = dir.cleanup
    gw = await startGateway(buildConfig({ dataDir: dir.dir, mqtt: { listeners: [{ type: 'tcp', port: 0 }] }, http: { port: 0 } }),
      { logger: pino({ level: 'silent' }) })
    url = `mqtt://127.0.0.1:${gw.listeners[0]!.port}`
  }, TIMEOUT)
  afterAll(async () => {
    for (const c of clients) c.end(true)
    await gw.close()
    await cleanup()
  }, TIMEOUT)

  const connect = async (clientId: string, properties?: { topicAliasMaximum?: number }): Promise<MqttClient> => {
    const client = await connectOk(url, { protocolVersion: 5, clientId, ...(properties === undefined ? {} : { properties }) })
    clients.add(client)
    return client
  }

  it('gives the topics an MQTT.js subscriber is sent aliases up to its Topic Alias Maximum; it reads every message under its topic', async () => {
    const sub = await connect('al-sub', { topicAliasMaximum: 2 })
    const wire = wireOf(sub)
    const got: string[] = []
    sub.on('message', (topic, payload) => got.push(`${topic} ${String(payload)}`))
    const plain = await connect('al-plain') // allows no aliases: gets none
    const plainWire = wireOf(plain)
    await sub.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    await plain.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    const publisher = await connect('al-pub')
    const sent: string[] = []
    for (let round = 0; round < 3; round++) {
      for (const t of ['a', 'b', 'c']) {
        const topic = `devices/al-pub/telemetry/${t}`
        sent.push(`${topic} ${round}`)
        await publisher.publishAsync(topic, String(round), { qos: round === 1 ? 0 : 1 })
      }
    }
    await publisher.publishAsync('devices/al-pub/telemetry/end', 'end', { qos: 1 })
    expect(await waitFor(() => got.length === 10, 5000)).toBe(true)
    expect(got.slice(0, 9)).toEqual(sent)
    // a and b got aliases 1 and 2, sent with their topic once, then alone; c (over the maximum) always with its topic.
    expect(wire.slice(0, 9).map((w) => [w.topic, w.alias])).toEqual([
      ['devices/al-pub/telemetry/a', 1], ['devices/al-pub/telemetry/b', 2], ['devices/al-pub/telemetry/c', undefined],
      ['', 1], ['', 2], ['devices/al-pub/telemetry/c', undefined],
      ['', 1], ['', 2], ['devices/al-pub/telemetry/c', undefined],
    ])
    expect(await waitFor(() => plainWire.length === 10, 5000)).toBe(true)
    expect(plainWire.every((w) => w.alias === undefined && w.topic.startsWith('devices/al-pub/'))).toBe(true)
  }, TIMEOUT)

  it('registers a topic on the wire before using its alias alone, when a held QoS 1 PUBLISH is overtaken by a QoS 0 one', async () => {
    const raw = await rawConnect(url, 5)
    raw.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clean: true, keepalive: 30, clientId: 'al-raw',
      properties: { receiveMaximum: 1, topicAliasMaximum: 5 } })
    await raw.next('connack')
    const wire: Array<{ topic: string, alias?: number, qos: number, messageId?: number, payload: string }> = []
    raw.onPacket((p: Packet) => {
      if (p.cmd === 'publish') wire.push({ topic: p.topic, alias: p.properties?.topicAlias, qos: p.qos, messageId: p.messageId, payload: String(p.payload) })
    })
    raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'devices/+/telemetry/#', qos: 1 }] })
    await raw.next('suback')
    const publisher = await connect('al-pub2')
    await publisher.publishAsync('devices/al-pub2/telemetry/u', 'first', { qos: 1 }) // unacknowledged: fills the window
    await publisher.publishAsync('devices/al-pub2/telemetry/t', 'held', { qos: 1 }) // held back
    await publisher.publishAsync('devices/al-pub2/telemetry/t', 'overtakes', { qos: 0 })
    // A QoS 0 publish has no ack to wait for: wait for it to arrive, then a round trip shows nothing else came.
    expect(await waitFor(() => wire.length >= 2, 5000)).toBe(true)
    raw.send({ cmd: 'pingreq' })
    await raw.next('pingresp')
    expect(wire.map((w) => [w.payload, w.topic, w.alias])).toEqual([
      ['first', 'devices/al-pub2/telemetry/u', 1], ['overtakes', 'devices/al-pub2/telemetry/t', 2],
    ])
    raw.send({ cmd: 'puback', messageId: wire[0]!.messageId as number })
    raw.send({ cmd: 'pingreq' })
    await raw.next('pingresp')
    expect(wire[2]).toMatchObject({ payload: 'held', topic: '', alias: 2, qos: 1 })
    raw.end()
    await raw.closed
  }, TIMEOUT)
})
