/**
 * Session expiry across kill -9 (sessions/expiry.ts), from both its sources:
 * an MQTT 5 Session Expiry Interval and the gateway-wide
 * mqtt.sessionExpirySeconds. A session whose time ran out while the gateway
 * was dead is gone after the restart, dropped before any client could
 * connect, counted and logged with the bound that ended it; one whose time has
 * not run out is kept; a session whose connection the kill ended counts its
 * time from the restart and ends then. Without the cap, 3.1.1 persistent
 * sessions and MQTT 5 sessions that never expire are kept.
 */
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { waitFor } from '../../../helpers/mqtt-probe.ts'
import { scrape } from '../../../helpers/raw-mqtt.ts'

const TIMEOUT = 60_000

function v5 (clientId: string, sessionExpiryInterval: number): IClientOptions {
  return { protocolVersion: 5, clientId, clean: false, reconnectPeriod: 0, properties: { sessionExpiryInterval } }
}

async function connect (url: string, options: IClientOptions): Promise<{ client: MqttClient, sessionPresent: boolean }> {
  const client = mqtt.connect(url, options)
  const connack = await new Promise<{ sessionPresent: boolean }>((resolve, reject) => {
    client.once('connect', resolve)
    client.once('error', reject)
  })
  return { client, sessionPresent: connack.sessionPresent }
}

/** Connects, subscribes (so the session holds state) and, unless `stay`, disconnects with DISCONNECT. */
async function subscribed (url: string, options: IClientOptions, stay = false): Promise<MqttClient> {
  const { client } = await connect(url, options)
  await client.subscribeAsync(`devices/${options.clientId}/commands/#`, { qos: 1 })
  if (!stay) await client.endAsync()
  return client
}

async function expiredCount (httpUrl: string): Promise<number> {
  return (await scrape(httpUrl)).find((s) => s.name === 'edgemq_mqtt_sessions_expired_total')?.value ?? NaN
}

async function sessionPresent (url: string, options: IClientOptions): Promise<boolean> {
  const { client, sessionPresent } = await connect(url, options)
  await client.endAsync()
  return sessionPresent
}

describe('MQTT 5 session expiry across kill -9', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c().catch(() => {}) })

  it('ends the sessions whose interval ran out while the gateway was dead, and the ones its death disconnected on time', async () => {
    const { dir, cleanup } = await tempDir('edgemq-session-expiry-')
    cleanups.push(cleanup)
    let gw: GatewayProcess = await startGatewayProcess({ dataDir: dir })
    cleanups.push(async () => { await gw.kill() })
    const url = gw.mqttUrl
    await subscribed(url, v5('long', 3600))
    await subscribed(url, v5('never', 0xffffffff))
    await subscribed(url, { clientId: 'v311', clean: false, reconnectPeriod: 0 })
    // Connected when the gateway dies: the kill ends their connections.
    const alive = [await subscribed(url, v5('alive-short', 1), true), await subscribed(url, v5('alive-long', 3600), true)]
    await subscribed(url, v5('short', 2))
    const shortGone = Date.now()
    // A session write after short's offline mark (the group commit keeps call order): once its SUBACK is back, the mark is on disk.
    await subscribed(url, v5('flush', 3600))
    const before = gw
    await gw.kill()
    for (const c of alive) c.end(true)
    // The 2 s interval of "short" has run out (counted from its DISCONNECT) before the gateway is back.
    expect(await waitFor(() => Date.now() > shortGone + 2000, 5000)).toBe(true)

    gw = await startGatewayProcess({ dataDir: dir })
    const url2 = gw.mqttUrl
    const ends = (log: string): string[] => [...log.matchAll(/"clientId":"([^"]+)".*"bound":"([^"]+)".*persistent session expired/g)].map((m) => `${m[1]} ${m[2]}`)
    // Ended before the kill (a loaded machine may take 2 s to get there) or while the gateway started, before its listeners
    // accepted anyone: logged already.
    expect([...ends(before.stderr()), ...ends(gw.stderr())]).toEqual(['short Session Expiry Interval'])
    expect(await sessionPresent(url2, v5('short', 1))).toBe(false)
    expect(await sessionPresent(url2, v5('long', 3600))).toBe(true)
    expect(await sessionPresent(url2, v5('never', 0xffffffff))).toBe(true)
    expect(await sessionPresent(url2, { clientId: 'v311', clean: false, reconnectPeriod: 0 })).toBe(true)
    expect(await sessionPresent(url2, v5('alive-long', 3600))).toBe(true)
    // "alive-short" lost its connection at the kill: its second runs from the restart, and the gateway says when it ends.
    expect(await waitFor(() => /"clientId":"alive-short".*persistent session expired/.test(gw.stderr()), 10_000)).toBe(true)
    expect(await sessionPresent(url2, v5('alive-short', 1))).toBe(false)
    expect(await expiredCount(gw.httpUrl)).toBe(ends(gw.stderr()).length) // every end this process logged, counted
    expect(await gw.stop()).toBe(0)
  }, TIMEOUT)

  it('ends sessions by mqtt.sessionExpirySeconds across kill -9 too, 3.1.1 and MQTT 5 alike, the shorter bound winning', async () => {
    const { dir, cleanup } = await tempDir('edgemq-session-expiry-')
    cleanups.push(cleanup)
    const config = await writeConfig(dir, { mqtt: { listeners: [{ type: 'tcp', port: 0 }], sessionExpirySeconds: 3 } })
    let gw: GatewayProcess = await startGatewayProcess({ dataDir: `${dir}/data`, config })
    cleanups.push(async () => { await gw.kill() })
    // An MQTT 5 client asking for longer than the cap is told the cap in the CONNACK.
    const asked = mqtt.connect(gw.mqttUrl, v5('v5-long', 3600))
    const connack = await new Promise<{ properties?: { sessionExpiryInterval?: number } }>((resolve) => asked.once('connect', resolve))
    expect(connack.properties?.sessionExpiryInterval).toBe(3)
    await asked.subscribeAsync('devices/v5-long/commands/#', { qos: 1 })
    await asked.endAsync()
    await subscribed(gw.mqttUrl, { clientId: 'v311', clean: false, reconnectPeriod: 0 })
    const gone = Date.now()
    await subscribed(gw.mqttUrl, v5('v5-short', 1))
    const before = gw
    await gw.kill()
    expect(await waitFor(() => Date.now() > gone + 3000, 10_000)).toBe(true)
    gw = await startGatewayProcess({ dataDir: `${dir}/data`, config })
    // Each ends once, by the bound that is its shorter: before the kill, while the gateway started (before any CONNECT), or,
    // if the kill came before its disconnect was stored (v5-short), 1 s after the start.
    const ends = (log: string): string[] => [...log.matchAll(/"clientId":"([^"]+)".*"bound":"([^"]+)".*persistent session expired/g)].map((m) => `${m[1]} ${m[2]}`)
    const all = (): string[] => [...ends(before.stderr()), ...ends(gw.stderr())].sort()
    expect(await waitFor(() => all().length >= 3, 10_000)).toBe(true)
    expect(all()).toEqual(['v311 mqtt.sessionExpirySeconds', 'v5-long mqtt.sessionExpirySeconds', 'v5-short Session Expiry Interval'])
    expect(await expiredCount(gw.httpUrl)).toBe(ends(gw.stderr()).length)
    expect(await sessionPresent(gw.mqttUrl, { clientId: 'v311', clean: false, reconnectPeriod: 0 })).toBe(false)
    expect(await sessionPresent(gw.mqttUrl, v5('v5-long', 3600))).toBe(false)
    expect(await gw.stop()).toBe(0)
  }, TIMEOUT)

  it('keeps a deadline across a graceful restart, and forgets it when the client comes back in time', async () => {
    const { dir, cleanup } = await tempDir('edgemq-session-expiry-')
    cleanups.push(cleanup)
    let gw: GatewayProcess = await startGatewayProcess({ dataDir: dir })
    cleanups.push(async () => { await gw.kill() })
    await subscribed(gw.mqttUrl, v5('back-in-time', 2))
    const gone = Date.now()
    expect(await sessionPresent(gw.mqttUrl, v5('back-in-time', 3600))).toBe(true) // back in time, now with a long interval
    await subscribed(gw.mqttUrl, v5('stopped-short', 1), true)
    expect(await gw.stop()).toBe(0) // a graceful stop disconnects it (0x8B): its deadline is stored
    // The 2 s interval of "back-in-time" would have run out by now had its return not cancelled it.
    expect(await waitFor(() => Date.now() > gone + 2000, 5000)).toBe(true)
    gw = await startGatewayProcess({ dataDir: dir })
    expect(await sessionPresent(gw.mqttUrl, v5('back-in-time', 3600))).toBe(true)
    // Ended at the start if its second ran out during the restart, else by a timer: logged either way.
    expect(await waitFor(() => /"clientId":"stopped-short".*persistent session expired/.test(gw.stderr()), 10_000)).toBe(true)
    expect(await sessionPresent(gw.mqttUrl, v5('stopped-short', 1))).toBe(false)
    expect(await gw.stop()).toBe(0)
  }, TIMEOUT)
})
