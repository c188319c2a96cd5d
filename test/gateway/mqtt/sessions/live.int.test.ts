/**
 * A persistent subscriber that stays connected while many devices publish at
 * once gets every message live, and nothing is left for its next connection:
 * the first message of each partition a session is sent creates its cursor
 * into the log, and those first messages arrive together from ten devices
 * spread over the default stream's eight partitions. (A regression lost
 * exactly one message per partition here: 192 of 200.) Every device's
 * messages arrive in the order it sent them. A later connection that resumes
 * the session gets what was published while it was away, also an MQTT 5
 * connection whose session ends with it (Session Expiry 0), which used to get
 * nothing at all.
 */
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir } from '../../../helpers/gateway-process.ts'
import { waitFor } from '../../../helpers/mqtt-probe.ts'

const DEVICES = 10
const ROUNDS = 20

function collect (client: MqttClient): string[] {
  const got: string[] = []
  client.on('message', (_topic, payload) => { got.push(payload.toString()) })
  return got
}

describe('a connected persistent subscriber', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it.each([4, 5] as const)(`MQTT protocol level %s: gets every message of ${DEVICES} devices publishing at once, live and in per-device order`, async (version) => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(async () => { await gw.kill() })
    const sub = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'svc-live', clean: false, protocolVersion: version, reconnectPeriod: 0,
      ...(version === 5 ? { properties: { sessionExpiryInterval: 3600 } } : {}) })
    const got = collect(sub)
    await sub.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    const pubs = await Promise.all(Array.from({ length: DEVICES }, async (_, d) =>
      await mqtt.connectAsync(gw.mqttUrl, { clientId: `dev-${d}`, protocolVersion: version, reconnectPeriod: 0 })))
    const sent: string[] = []
    for (let r = 0; r < ROUNDS; r++) {
      await Promise.all(pubs.map(async (p, d) => {
        await p.publishAsync(`devices/dev-${d}/telemetry/t`, `dev-${d} ${r}`, { qos: 1 })
        sent.push(`dev-${d} ${r}`)
      }))
    }
    await waitFor(() => got.length >= sent.length, 20_000)
    expect([...sent].filter((m) => !got.includes(m))).toEqual([])
    for (let d = 0; d < DEVICES; d++) {
      const mine = got.filter((m) => m.startsWith(`dev-${d} `)).map((m) => Number(m.split(' ')[1]))
      expect(mine, `dev-${d}`).toEqual(Array.from({ length: ROUNDS }, (_, r) => r))
    }
    await sub.endAsync()
    // Offline: what is published now waits in the session. The next connection resumes it (Clean Start 0); an MQTT 5
    // one with no Session Expiry property ends the session with itself [MQTT-3.1.2-11], yet gets the backlog while
    // connected, then everything published live, and nothing acknowledged before.
    const offline = ['o1', 'o2', 'o3']
    for (const body of offline) await pubs[3]!.publishAsync('devices/dev-3/telemetry/t', body, { qos: 1 })
    const again = mqtt.connect(gw.mqttUrl, { clientId: 'svc-live', clean: false, protocolVersion: version, reconnectPeriod: 0 })
    const late = collect(again)
    const connack = await new Promise<{ sessionPresent: boolean }>((resolve) => again.once('connect', resolve))
    expect(connack.sessionPresent).toBe(true)
    await again.publishAsync('devices/dev-0/telemetry/t', 'barrier', { qos: 1 })
    await waitFor(() => late.includes('barrier') && offline.every((m) => late.includes(m)), 20_000)
    expect(late).toEqual([...offline, 'barrier'])
    await again.endAsync()
    // MQTT 5: that connection ended the session; 3.1.1 (clean = false) keeps it.
    const last = mqtt.connect(gw.mqttUrl, { clientId: 'svc-live', clean: false, protocolVersion: version, reconnectPeriod: 0 })
    const lastConnack = await new Promise<{ sessionPresent: boolean }>((resolve) => last.once('connect', resolve))
    expect(lastConnack.sessionPresent).toBe(version === 4)
    await last.endAsync()
    for (const p of pubs) await p.endAsync()
  }, 120_000)
})
