/**
 * UNSUBSCRIBE removes the subscription, although the gateway stores every
 * subscription mounted under the client's tenant: for a clean session, for a
 * persistent one (it is not restored at the next connect), for a client of a
 * named tenant, and when the UNSUBSCRIBE is sent before the CONNACK arrived.
 */
import path from 'node:path'
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../../gateway/access/auth.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { collect, endAll, waitFor, type Received } from '../../helpers/mqtt-probe.ts'
import { rawConnect } from '../../helpers/raw-client.ts'

describe('UNSUBSCRIBE', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess

  const connect = async (options: IClientOptions): Promise<MqttClient> => {
    const client = await mqtt.connectAsync(gw.mqttUrl, { protocolVersion: 4, reconnectPeriod: 0, ...options })
    clients.add(client)
    return client
  }
  /** Publishes `body` and a marker, waits for the marker at `got`, and says whether `body` arrived. */
  const delivered = async (publisher: MqttClient, got: Received[], topic: string, body: string): Promise<boolean> => {
    await publisher.publishAsync(topic, body, { qos: 1 })
    await publisher.publishAsync('marker/x', `marker-${body}`, { qos: 1 })
    expect(await waitFor(() => got.some((m) => m.payload === `marker-${body}`), 5000)).toBe(true)
    return got.some((m) => m.payload === body)
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-unsub-')
    cleanups.push(cleanup)
    const config = await writeConfig(dir, {
      users: [{ username: 'acme-svc', tenant: 'acme', role: 'service', password: await hashPassword('pw', { N: 1024, r: 8, p: 1 }) }],
      mqtt: { listeners: [{ type: 'tcp', port: 0, allowAnonymous: true }] },
    })
    gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    cleanups.push(async () => { await gw.stop() })
  }, 60_000)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('stops deliveries to a clean session, in the default tenant and in a named one', async () => {
    for (const auth of [{}, { username: 'acme-svc', password: 'pw' }]) {
      const sub = await connect({ clientId: 'unsub-clean', ...auth })
      const pub = await connect({ clientId: 'unsub-pub', ...auth })
      const got = collect(sub)
      await sub.subscribeAsync(['devices/+/telemetry/#', 'marker/#'], { qos: 1 })
      expect(await delivered(pub, got, 'devices/d1/telemetry/t', 'before')).toBe(true)
      await sub.unsubscribeAsync('devices/+/telemetry/#')
      expect(await delivered(pub, got, 'devices/d1/telemetry/t', 'after')).toBe(false)
      await sub.endAsync()
      await pub.endAsync()
    }
  })

  it('removes a persistent session\'s subscription, so the next connect does not restore it', async () => {
    const sub = await connect({ clientId: 'unsub-persistent', clean: false })
    await sub.subscribeAsync(['devices/+/events/#', 'marker/#'], { qos: 1 })
    await sub.unsubscribeAsync('devices/+/events/#')
    await sub.endAsync()

    const again = await connect({ clientId: 'unsub-persistent', clean: false })
    const got = collect(again)
    const pub = await connect({ clientId: 'unsub-pub-2' })
    expect(await delivered(pub, got, 'devices/d2/events/e', 'after-reconnect')).toBe(false)
    await again.endAsync()
    await pub.endAsync()
  })

  it('applies an UNSUBSCRIBE sent in the same write as the CONNECT and SUBSCRIBE, before the CONNACK', async () => {
    const raw = await rawConnect(gw.mqttUrl)
    raw.sendAll([
      { cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'unsub-pipelined', clean: true, keepalive: 30 },
      { cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'devices/+/commands/#', qos: 1 }, { topic: 'marker/#', qos: 1 }] },
      { cmd: 'unsubscribe', messageId: 2, unsubscriptions: ['devices/+/commands/#'] },
    ])
    await raw.next('connack')
    await raw.next('suback')
    await raw.next('unsuback')
    const pub = await connect({ clientId: 'unsub-pub-3' })
    // The gateway hands a QoS 1 message to its subscribers before it sends the PUBACK, so a command delivered to
    // the raw client would reach it before the marker published after that PUBACK.
    await pub.publishAsync('devices/d3/commands/c', 'command', { qos: 1 })
    await pub.publishAsync('marker/x', 'marker-raw', { qos: 0 })
    const first = await raw.next('publish')
    expect(first.cmd === 'publish' && first.payload.toString()).toBe('marker-raw')
    raw.end()
    await pub.endAsync()
  })
  it('answers an UNSUBSCRIBE of a 100-level filter (which it never granted) with an UNSUBACK, and keeps the connection', async () => {
    const deep = Array.from({ length: 100 }, (_, i) => `l${i}`).join('/')
    const raw = await rawConnect(gw.mqttUrl)
    raw.sendAll([
      { cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'unsub-deep', clean: true, keepalive: 30 },
      { cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: deep, qos: 1 }, { topic: 'marker/#', qos: 1 }] },
      { cmd: 'unsubscribe', messageId: 2, unsubscriptions: [deep, 'marker/#'] },
      { cmd: 'pingreq' },
    ])
    await raw.next('connack')
    const suback = await raw.next('suback')
    expect(suback.cmd === 'suback' && suback.granted).toEqual([128, 1])
    expect(await raw.next('unsuback')).toMatchObject({ messageId: 2 })
    await raw.next('pingresp')
    raw.end()
  })
})
