/**
 * A device that mixes QoS 1 and QoS 2 publishes on one routed topic, to persistent sessions (offline and connected):
 * QoS 1 deliveries of logged messages come from the session's cursor into the log, QoS 2 deliveries are copies
 * (sessions/persistence.ts cursorsDeliver). A QoS 2 message to a QoS 1 subscription is a QoS 1 delivery: it came
 * twice, once as a copy and once from the cursor, because the QoS 2 path did not give the message its log position
 * (found by the attack probes). Each message arrives once; with a QoS 1 subscription all come in the order sent, with
 * a QoS 2 one in the order sent per QoS, which is what MQTT asks [MQTT-4.6.0-6] (two paths, docs/mqtt.md). A replicated
 * message (one carrying the bridge's dedupe id) had the same fault (found by review).
 */
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { waitFor } from '../../../helpers/mqtt-probe.ts'

const COUNT = 20
const WAIT_MS = 30_000

function receiver (client: MqttClient): string[] {
  const got: string[] = []
  client.on('message', (_t, payload) => { got.push(payload.toString()) })
  return got
}

/** What a subscription of `subQos` must get of `sent` (QoS 1 at even n, QoS 2 at odd n): all in order, or in order per QoS. */
function expectDelivered (got: readonly string[], sent: readonly string[], subQos: 1 | 2): void {
  expect([...got].sort(), `received: ${got.join(' ')}`).toEqual([...sent].sort()) // each once
  if (subQos === 1) {
    expect(got.join(' ')).toBe(sent.join(' '))
    return
  }
  const ofQos = (list: readonly string[], qos: 1 | 2): string[] => list.filter((b) => b.endsWith(':end') ? qos === 1 : (Number(b.split(':')[1]) % 2 === 0) === (qos === 1))
  for (const qos of [1, 2] as const) expect(ofQos(got, qos).join(' ')).toBe(ofQos(sent, qos).join(' '))
}

describe('mixed QoS 1 and QoS 2 publishes of a device to persistent sessions', () => {
  let gw: GatewayProcess
  let cleanup: () => Promise<void>
  beforeAll(async () => {
    const t = await tempDir()
    cleanup = t.cleanup
    gw = await startGatewayProcess({ dataDir: t.dir })
  })
  afterAll(async () => { await gw?.kill(); await cleanup?.() })

  async function publishMixed (tag: string): Promise<string[]> {
    const dev = await mqtt.connectAsync(gw.mqttUrl, { clientId: `dev-${tag}`, reconnectPeriod: 0 })
    const sent: string[] = []
    for (let n = 0; n < COUNT; n++) {
      const body = `${tag}:${n}`
      await dev.publishAsync(`devices/dev-${tag}/telemetry/t`, body, { qos: n % 2 === 0 ? 1 : 2 })
      sent.push(body)
    }
    await dev.endAsync()
    return sent
  }

  for (const [subQos, withOther] of [[2, false], [2, true], [1, false], [1, true]] as const) {
    it(`an offline session with a QoS ${subQos} subscription${withOther ? ' (beside one of the other QoS)' : ''} gets a device's QoS 1 and QoS 2 messages once each, in order`, async () => {
      const tag = `q${subQos}${withOther ? 'o' : ''}`
      const id = `svc-${tag}`
      const first = await mqtt.connectAsync(gw.mqttUrl, { clientId: id, clean: false, reconnectPeriod: 0 })
      await first.subscribeAsync(`devices/dev-${tag}/telemetry/#`, { qos: subQos })
      // a second persistent session with the other QoS on the same topic, as a real fleet has (allQos1 differs)
      if (withOther) {
        const other = await mqtt.connectAsync(gw.mqttUrl, { clientId: `${id}-other`, clean: false, reconnectPeriod: 0 })
        await other.subscribeAsync(`devices/dev-${tag}/telemetry/#`, { qos: subQos === 2 ? 1 : 2 })
        await other.endAsync()
      }
      await first.endAsync()
      const sent = await publishMixed(tag)
      const again = mqtt.connect(gw.mqttUrl, { clientId: id, clean: false, reconnectPeriod: 0 })
      const got = receiver(again)
      expect(await waitFor(() => got.length >= COUNT, WAIT_MS), `received ${got.length} of ${COUNT}: ${got.join(' ')}`).toBe(true)
      // a marker published after the backlog: once it arrives, nothing of the backlog is still on its way
      const dev = await mqtt.connectAsync(gw.mqttUrl, { clientId: `dev-${tag}`, reconnectPeriod: 0 })
      await dev.publishAsync(`devices/dev-${tag}/telemetry/t`, `${tag}:end`, { qos: 1 })
      await dev.endAsync()
      expect(await waitFor(() => got.includes(`${tag}:end`), WAIT_MS)).toBe(true)
      await again.endAsync()
      sent.push(`${tag}:end`)
      expectDelivered(got, sent, subQos)
    })
  }

  for (const subQos of [2, 1] as const) {
    it(`a connected persistent QoS ${subQos} subscriber gets a device's QoS 1 and QoS 2 messages live, once each, in order`, async () => {
      const tag = `live${subQos}`
      const sub = await mqtt.connectAsync(gw.mqttUrl, { clientId: `svc-${tag}`, clean: false, reconnectPeriod: 0 })
      const got = receiver(sub)
      await sub.subscribeAsync(`devices/dev-${tag}/telemetry/#`, { qos: subQos })
      const sent = await publishMixed(tag)
      const dev = await mqtt.connectAsync(gw.mqttUrl, { clientId: `dev-${tag}`, reconnectPeriod: 0 })
      await dev.publishAsync(`devices/dev-${tag}/telemetry/t`, `${tag}:end`, { qos: 1 })
      await dev.endAsync()
      sent.push(`${tag}:end`)
      // Order holds per topic and QoS (MQTT 3.1.1, 4.6): the QoS 1 `end` may overtake a QoS 2 message sent before it (a queued copy
      // beside a cursor's read), so everything sent is waited for, not `end` alone.
      expect(await waitFor(() => sent.every((b) => got.includes(b)), WAIT_MS), `received ${got.length}`).toBe(true)
      await sub.endAsync()
      expectDelivered(got, sent, subQos)
    })
  }

  it('an offline QoS 1 session gets a device\'s plain and retained QoS 1 messages once each, in the order sent', async () => {
    const first = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'svc-ret', clean: false, reconnectPeriod: 0 })
    await first.subscribeAsync('devices/dev-ret/telemetry/#', { qos: 1 })
    await first.endAsync()
    const dev = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'dev-ret', reconnectPeriod: 0 })
    const sent: string[] = []
    for (let n = 0; n < COUNT; n++) {
      await dev.publishAsync('devices/dev-ret/telemetry/t', `ret:${n}`, { qos: 1, retain: n % 3 === 1 })
      sent.push(`ret:${n}`)
    }
    const again = mqtt.connect(gw.mqttUrl, { clientId: 'svc-ret', clean: false, reconnectPeriod: 0 })
    const got = receiver(again)
    await new Promise((resolve) => again.once('connect', resolve))
    await dev.publishAsync('devices/dev-ret/telemetry/t', 'ret:end', { qos: 1 })
    await dev.endAsync()
    sent.push('ret:end')
    expect(await waitFor(() => got.includes('ret:end'), WAIT_MS)).toBe(true)
    await again.endAsync()
    expect(got.join(' '), `received: ${got.join(' ')}`).toBe(sent.join(' '))
  })
  it('a replicated message (it carries edgemq-dedupe-id) reaches a persistent QoS 1 session once, connected and offline', async () => {
    const topic = 'devices/dev-carried/telemetry/t'
    const options = { clientId: 'svc-carried', clean: false, reconnectPeriod: 0, protocolVersion: 5 as const, properties: { sessionExpiryInterval: 600 } }
    const sub = await mqtt.connectAsync(gw.mqttUrl, options)
    const got = receiver(sub)
    await sub.subscribeAsync(topic, { qos: 1 })
    const dev = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'dev-carried', reconnectPeriod: 0, protocolVersion: 5 })
    const carried = (n: number): { qos: 1, properties: { userProperties: Record<string, string> } } =>
      ({ qos: 1, properties: { userProperties: { 'edgemq-dedupe-id': `gwA/default/telemetry/0/${n}` } } })
    await dev.publishAsync(topic, 'carried', carried(7))
    // Its copy would be written before its ack; the marker, published after, comes from the log after it.
    await dev.publishAsync(topic, 'end', { qos: 1 })
    expect(await waitFor(() => got.includes('end'), WAIT_MS)).toBe(true)
    expect(got).toEqual(['carried', 'end'])
    await sub.endAsync()
    await dev.publishAsync(topic, 'carried offline', carried(8))
    await dev.publishAsync(topic, 'end offline', { qos: 1 })
    const again = mqtt.connect(gw.mqttUrl, options)
    const got2 = receiver(again)
    expect(await waitFor(() => got2.includes('end offline'), WAIT_MS)).toBe(true)
    expect(got2).toEqual(['carried offline', 'end offline'])
    await Promise.all([again.endAsync(), dev.endAsync()])
  })
})
