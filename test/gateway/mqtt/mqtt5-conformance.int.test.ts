/**
 * MQTT 5 rules that Eclipse Paho's interoperability suite (paho.mqtt.testing,
 * client_test5.py) checks and the gateway broke, each with MQTT.js against a
 * gateway process on the embedded default config: a will's PUBLISH carries no
 * Will Delay Interval (test_will_message), a session resumed with Clean
 * Start 0 and Session Expiry 0 gets what was queued for it
 * (test_offline_message_queueing, test_publication_expiry), and a client's
 * Maximum Packet Size holds for what the server sends it
 * (test_maximum_packet_size), also for what a persistent session reads from the log.
 */
import path from 'node:path'
import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { connectOk, endAll, metricValue, subscribeGranted, waitFor } from '../../helpers/mqtt-probe.ts'

const TIMEOUT = 60_000
const V5: IClientOptions = { protocolVersion: 5, reconnectPeriod: 0 }

function received (client: MqttClient): IPublishPacket[] {
  const got: IPublishPacket[] = []
  client.on('message', (_topic, _payload, packet) => { got.push(packet) })
  return got
}

describe('MQTT 5 rules from the Paho interoperability suite', () => {
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess
  let cleanup: () => Promise<void> = async () => {}
  const connect = async (options: IClientOptions): Promise<MqttClient> => {
    const client = await connectOk(gw.urls.tcp as string, { ...V5, ...options })
    clients.add(client)
    return client
  }

  beforeAll(async () => {
    const made = await tempDir('edgemq-mqtt5-conformance-')
    cleanup = made.cleanup
    gw = await startGatewayProcess({ dataDir: path.join(made.dir, 'data') })
  }, 60_000)
  afterAll(async () => {
    await endAll(clients)
    await gw?.stop()
    await cleanup()
  }, 30_000)

  it('publishes a will with its user properties and without the Will Delay Interval, a CONNECT-only property (3.3.2.3)', async () => {
    const sub = await connect({ clientId: 'will-watcher' })
    const got = received(sub)
    expect(await subscribeGranted(sub, 'plant/will/+', 1)).toEqual([1])
    const dying = await connect({
      clientId: 'will-owner',
      will: { topic: 'plant/will/owner', payload: Buffer.from('gone'), qos: 1, retain: false, properties: { willDelayInterval: 0, userProperties: { a: '2' } } },
    })
    dying.stream.destroy() // no DISCONNECT: the will fires
    expect(await waitFor(() => got.length > 0, 30_000)).toBe(true)
    expect(String(got[0]?.payload)).toBe('gone')
    expect(got[0]?.properties?.userProperties).toEqual({ a: '2' })
    expect(got[0]?.properties).not.toHaveProperty('willDelayInterval')
  }, TIMEOUT)

  for (const [kind, topic] of [['unrouted (queued copies)', 'plant/queue/t'], ['routed (read from the log)', 'devices/resume-5/telemetry/t']] as const) {
    it(`delivers what was queued to a session resumed with Clean Start 0 and Session Expiry 0, ${kind} [MQTT-3.1.2-5]`, async () => {
      const clientId = `resume-${topic.length}`
      const first = await connect({ clientId, clean: true, properties: { sessionExpiryInterval: 600 } })
      expect(await subscribeGranted(first, topic, 2)).toEqual([2])
      await first.endAsync()
      const pub = await connect({ clientId: `pub-${clientId}` })
      await pub.publishAsync(topic, 'qos 1', { qos: 1 })
      await pub.publishAsync(topic, 'qos 2', { qos: 2 })
      // No Session Expiry Interval: 0, the session ends with this connection, but it resumes the stored one first.
      const again = mqtt.connect(gw.urls.tcp as string, { ...V5, clientId, clean: false })
      clients.add(again)
      const got = received(again)
      const connack = await new Promise<{ sessionPresent: boolean }>((resolve) => again.once('connect', resolve))
      expect(connack.sessionPresent).toBe(true)
      expect(await waitFor(() => got.length >= 2, 30_000)).toBe(true)
      expect(got.map((p) => String(p.payload)).sort()).toEqual(['qos 1', 'qos 2'])
    }, TIMEOUT)
  }

  it('does not send a client a PUBLISH over the Maximum Packet Size it set [MQTT-3.1.2-24], and goes on with the next that fits; counted', async () => {
    const before = await metricValue(gw.httpUrl, 'edgemq_mqtt_oversized_deliveries_total', { tenant: 'default' })
    const small = await connect({ clientId: 'small-packets', properties: { maximumPacketSize: 64 } })
    const got = received(small)
    expect(await subscribeGranted(small, 'plant/size/t', 1)).toEqual([1])
    const pub = await connect({ clientId: 'size-publisher' })
    await pub.publishAsync('plant/size/t', '.'.repeat(32), { qos: 0 })
    await pub.publishAsync('plant/size/t', '.'.repeat(64), { qos: 1 })
    await pub.publishAsync('plant/size/t', 'last', { qos: 1 })
    expect(await waitFor(() => got.some((p) => String(p.payload) === 'last'), 30_000)).toBe(true)
    expect(got.map((p) => String(p.payload).length)).toEqual([32, 4])
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_oversized_deliveries_total', { tenant: 'default' })).toBe(before + 1)
    expect(small.connected).toBe(true)
  }, TIMEOUT)
  it('skips, for a persistent session reading the log, a record whose PUBLISH would exceed its Maximum Packet Size, and goes on (found by review)', async () => {
    const before = await metricValue(gw.httpUrl, 'edgemq_mqtt_oversized_deliveries_total', { tenant: 'default' })
    const options: IClientOptions = { clientId: 'small-session', clean: false, properties: { sessionExpiryInterval: 600, maximumPacketSize: 64 } }
    const first = await connect(options)
    expect(await subscribeGranted(first, 'devices/mp/telemetry/t', 1)).toEqual([1])
    await first.endAsync()
    const pub = await connect({ clientId: 'mp' })
    await pub.publishAsync('devices/mp/telemetry/t', '.'.repeat(100), { qos: 1 })
    await pub.publishAsync('devices/mp/telemetry/t', 'offline last', { qos: 1 })
    // Listening before the CONNACK: the backlog read from the log may come in the same read as it.
    const again = mqtt.connect(gw.urls.tcp as string, { ...V5, ...options })
    clients.add(again)
    const got = received(again)
    await new Promise((resolve) => again.once('connect', resolve))
    await pub.publishAsync('devices/mp/telemetry/t', '.'.repeat(100), { qos: 1 })
    await pub.publishAsync('devices/mp/telemetry/t', 'live last', { qos: 1 })
    expect(await waitFor(() => got.some((p) => String(p.payload) === 'live last'), 30_000)).toBe(true)
    expect(got.map((p) => String(p.payload))).toEqual(['offline last', 'live last'])
    expect(again.connected).toBe(true)
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_oversized_deliveries_total', { tenant: 'default' })).toBe(before + 2)
  }, TIMEOUT)
})
