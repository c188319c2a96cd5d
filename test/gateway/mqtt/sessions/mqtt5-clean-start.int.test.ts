/**
 * MQTT 5 session corners with MQTT.js. Clean Start and Session Expiry Interval are two separate things in MQTT 5
 * (3.1.2.4, 3.1.2.11): Clean Start = 1 with an interval > 0 starts a new session that outlives its connection, is
 * present at the next connect (also after a kill -9) and expires like any other; a DISCONNECT may change the
 * interval, except from 0 [MQTT-3.14.2-2].
 */
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { collectPayloads, connectSession, waitFor } from '../../../helpers/mqtt-probe.ts'


const connect = async (url: string, options: IClientOptions): Promise<{ client: MqttClient, sessionPresent: boolean }> =>
  await connectSession(url, { protocolVersion: 5, ...options })

describe('MQTT 5 Clean Start and Session Expiry Interval', () => {
  let gw: GatewayProcess
  let dir: string
  let cleanup: () => Promise<void>
  beforeAll(async () => {
    const t = await tempDir()
    dir = t.dir
    cleanup = t.cleanup
    gw = await startGatewayProcess({ dataDir: dir })
  })
  afterAll(async () => { await gw?.kill(); await cleanup?.() })

  async function publish (topic: string, body: string): Promise<void> {
    const dev = await mqtt.connectAsync(gw.mqttUrl, { clientId: `pub-${body}`, reconnectPeriod: 0 })
    await dev.publishAsync(topic, body, { qos: 1 })
    await dev.endAsync()
  }

  for (const [kind, topic] of [['routed', 'devices/d1/events/e'], ['unrouted', 'plain/d1/e']] as const) {
    it(`Clean Start = 1 with Session Expiry Interval 3600 keeps the new session's ${kind} subscription and messages after a disconnect`, async () => {
      const id = `cs1-${kind}`
      const first = await connect(gw.mqttUrl, { clientId: id, clean: true, properties: { sessionExpiryInterval: 3600 } })
      expect(first.sessionPresent).toBe(false)
      await first.client.subscribeAsync(topic, { qos: 1 })
      await first.client.endAsync()
      await publish(topic, `${kind}-while-away`)
      const again = await connect(gw.mqttUrl, { clientId: id, clean: false, properties: { sessionExpiryInterval: 3600 } })
      const got = collectPayloads(again.client)
      await publish(topic, `${kind}-after`)
      const arrived = await waitFor(() => got.includes(`${kind}-after`), 30_000)
      await again.client.endAsync()
      expect({ sessionPresent: again.sessionPresent, arrived, got }).toEqual({ sessionPresent: true, arrived: true, got: [`${kind}-while-away`, `${kind}-after`] })
    })
  }

  it('a DISCONNECT may not give a session that had 0 an interval [MQTT-3.14.2-2]: the session still ends', async () => {
    const id = 'disc-raise'
    const first = await connect(gw.mqttUrl, { clientId: id, clean: false, properties: { sessionExpiryInterval: 0 } })
    await first.client.subscribeAsync('devices/+/events/#', { qos: 1 })
    await first.client.endAsync(false, { properties: { sessionExpiryInterval: 3600 } })
    const again = await connect(gw.mqttUrl, { clientId: id, clean: false, properties: { sessionExpiryInterval: 3600 } })
    await again.client.endAsync()
    expect(again.sessionPresent).toBe(false)
  })

  it('Clean Start = 1 with Session Expiry Interval 3600 and nothing subscribed starts a session: present at the next connect, also after a kill -9', async () => {
    const id = 'cs1-empty'
    const first = await connect(gw.mqttUrl, { clientId: id, clean: true, properties: { sessionExpiryInterval: 3600 } })
    expect(first.sessionPresent).toBe(false)
    await first.client.endAsync()
    const again = await connect(gw.mqttUrl, { clientId: id, clean: false, properties: { sessionExpiryInterval: 3600 } })
    expect(again.sessionPresent).toBe(true)
    await gw.kill()
    again.client.end(true)
    gw = await startGatewayProcess({ dataDir: dir })
    const after = await connect(gw.mqttUrl, { clientId: id, clean: false, properties: { sessionExpiryInterval: 3600 } })
    await after.client.endAsync()
    expect(after.sessionPresent).toBe(true)
  })

  it('a session started with Clean Start = 1 and Session Expiry Interval 1 expires once offline', async () => {
    const id = 'cs1-expires'
    const first = await connect(gw.mqttUrl, { clientId: id, clean: true, properties: { sessionExpiryInterval: 1 } })
    await first.client.subscribeAsync('devices/+/events/#', { qos: 1 })
    await first.client.endAsync()
    const expired = (): boolean => gw.stderr().split('\n').some((l) => l.includes('persistent session expired') && l.includes(`"${id}"`))
    expect(await waitFor(expired, 20_000), 'its expiry logged').toBe(true)
    const again = await connect(gw.mqttUrl, { clientId: id, clean: false, properties: { sessionExpiryInterval: 1 } })
    await again.client.endAsync()
    expect(again.sessionPresent).toBe(false)
  })
})
