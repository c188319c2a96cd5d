/**
 * Connections that die in the middle of their CONNECT do not leave a persistent session counted as connected (a
 * session with a connection left never goes offline, so it never expires and its cursors hold retention for ever).
 * Unpatched aedes emitted `client` also for a connection closed during its CONNECT, with no `clientDisconnect` after
 * it (persistence.ts #connected keeps the open Client objects, not a count). A client id is hammered with CONNECTs
 * whose sockets close at once; then it connects, subscribes and leaves cleanly: with mqtt.sessionExpirySeconds = 1
 * its session expires. Found by the attack probes: failed with 20 rounds as with 200, passed with none.
 *
 * The same hammering while a connection holds the client id leaves that connection as it was: registered (the next
 * CONNECT takes it over), subscribed, and counted once in edgemq_mqtt_connected_clients. Unpatched aedes let a
 * connection closed during its CONNECT take the live one's registry entry (aedes-patch.test.ts).
 */
import path from 'node:path'
import mqtt from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { collectPayloads, metricValue, waitFor } from '../../../helpers/mqtt-probe.ts'
import { connectPacket, RawConnection, subscribePacket } from '../../../helpers/raw-mqtt.ts'

const ROUNDS = 200

describe('CONNECT churn and session expiry', () => {
  let gw: GatewayProcess
  let cleanup: () => Promise<void>
  beforeAll(async () => {
    const t = await tempDir()
    cleanup = t.cleanup
    const config = await writeConfig(t.dir, { mqtt: { listeners: [{ type: 'tcp', port: 0 }], sessionExpirySeconds: 1 }, http: { port: 0 } })
    gw = await startGatewayProcess({ dataDir: path.join(t.dir, 'data'), config })
  })
  afterAll(async () => { await gw?.kill(); await cleanup?.() })

  it('a session whose client id saw many CONNECTs cut short still expires once its last connection left', async () => {
    const id = 'churn'
    for (let round = 0; round < ROUNDS; round++) {
      const conn = await RawConnection.open(gw.mqttUrl)
      // the CONNECT, sometimes with a SUBSCRIBE behind it, and the socket gone after a varying number of turns
      conn.send(round % 2 === 0 ? connectPacket({ clientId: id, clean: false }) : Buffer.concat([connectPacket({ clientId: id, clean: false }), subscribePacket(1, ['devices/+/telemetry/#'], 1)]))
      for (let turn = 0; turn < round % 5; turn++) await new Promise((resolve) => setImmediate(resolve))
      conn.destroy()
    }
    const c = await mqtt.connectAsync(gw.mqttUrl, { clientId: id, clean: false, reconnectPeriod: 0 })
    await c.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    await c.endAsync()
    const expiredLine = (): boolean => gw.stderr().split('\n').some((l) => l.includes('persistent session expired') && l.includes(`"${id}"`))
    expect(await waitFor(expiredLine, 20_000), 'its expiry logged').toBe(true)
  })

  it('CONNECTs cut short leave one registered connection on the client id, counted once, with its subscription', async () => {
    const id = 'held'
    const live = await mqtt.connectAsync(gw.mqttUrl, { clientId: id, clean: false, reconnectPeriod: 0 })
    let liveOpen = true
    live.once('close', () => { liveOpen = false })
    await live.subscribeAsync(`cmd/${id}`, { qos: 1 })
    // A CONNECT read whole may take the live connection over before its own close is seen; one closed during its
    // CONNECT must not unregister the live one, or the next CONNECT would leave two connections on the session.
    for (let round = 0; round < ROUNDS; round++) {
      const conn = await RawConnection.open(gw.mqttUrl)
      conn.send(connectPacket({ clientId: id, clean: false }))
      for (let turn = 0; turn < round % 5; turn++) await new Promise((resolve) => setImmediate(resolve))
      conn.destroy()
    }
    const device = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'cmd-sender', reconnectPeriod: 0 })
    const counted = (): Promise<boolean> => waitFor(async () => await metricValue(gw.httpUrl, 'edgemq_mqtt_connected_clients') === (liveOpen ? 1 : 0) + 1, 10_000)
    expect(await counted(), 'the open connections, none of the 200').toBe(true)
    const next = await mqtt.connectAsync(gw.mqttUrl, { clientId: id, clean: false, reconnectPeriod: 0 })
    const got = collectPayloads(next)
    expect(await waitFor(() => !liveOpen, 10_000), 'the next CONNECT with the id takes over a live connection').toBe(true)
    expect(await waitFor(async () => await metricValue(gw.httpUrl, 'edgemq_mqtt_connected_clients') === 2, 10_000)).toBe(true)
    await device.publishAsync(`cmd/${id}`, 'after the churn', { qos: 1 })
    expect(await waitFor(() => got.includes('after the churn'), 10_000), 'the session kept its subscription').toBe(true)
    await next.endAsync()
    await device.endAsync()
  })
})
