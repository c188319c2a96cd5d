/**
 * MQTT 5 Will Delay Interval across kill -9 (wills.ts, sessions/expiry.ts): a
 * will whose client vanished with the gateway is published after its delay,
 * counted from the restart, not at the restart; not at all when its client
 * comes back in time [MQTT-3.1.3-9]; and at its session's end when the delay
 * is longer than the session (MQTT 5 3.1.3.2.2). A persistent 3.1.1 watcher
 * receives what was published.
 */
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { connectOk, endAll, waitFor } from '../../helpers/mqtt-probe.ts'
import { delayedWillDevice, WILL_WAITING } from '../../helpers/delayed-wills.ts'

const TIMEOUT = 90_000

describe('MQTT 5 will delay across kill -9', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  })

  it('publishes a vanished client\'s will after its delay or at its session\'s end, and not if the client came back', async () => {
    const { dir, cleanup } = await tempDir('edgemq-will-delay-')
    cleanups.push(cleanup)
    let gw: GatewayProcess = await startGatewayProcess({ dataDir: dir })
    cleanups.push(async () => { await gw.kill() })
    const watcherOptions = { clientId: 'watcher', clean: false, reconnectPeriod: 0 }
    const watcher = await connectOk(gw.mqttUrl, watcherOptions)
    await watcher.subscribeAsync('devices/+/events/#', { qos: 1 })
    await watcher.endAsync()
    // late: a 2 s delay; back: 6 s (room for a slow start), but it reconnects at once; marker: 8 s, published after back's
    // would have been; ends: a delay far beyond its 2 s session, so published when the session ends.
    for (const [id, session, delay] of [['late', 3600, 2], ['back', 3600, 6], ['marker', 3600, 8], ['ends', 2, 0xfffffff0]] as const) {
      clients.add(await connectOk(gw.mqttUrl, delayedWillDevice(id, { sessionExpiryInterval: session, willDelayInterval: delay })))
    }
    // A session write after theirs (the group commit keeps call order): once its SUBACK is back, their wills and sessions are on disk.
    const flush = await connectOk(gw.mqttUrl, { clientId: 'flush', clean: false, reconnectPeriod: 0 })
    await flush.subscribeAsync('devices/flush/commands/#', { qos: 1 })
    await flush.endAsync()
    await gw.kill()
    await endAll(clients)
    clients.clear()

    gw = await startGatewayProcess({ dataDir: dir })
    // None fired while the gateway started: each waits, from the restart.
    for (const id of ['late', 'back', 'marker', 'ends']) expect(gw.stderr()).toMatch(new RegExp(`"clientId":"${id}".*${WILL_WAITING}`))
    const back = await connectOk(gw.mqttUrl, delayedWillDevice('back'))
    clients.add(back)
    const received: string[] = []
    const again = mqtt.connect(gw.mqttUrl, watcherOptions)
    clients.add(again)
    again.on('message', (_topic, payload) => { received.push(payload.toString()) })
    expect(await waitFor(() => ['late-gone', 'marker-gone', 'ends-gone'].every((p) => received.includes(p)), 20_000)).toBe(true)
    // marker's delay ran out after back's would have: back's will was cancelled by its return.
    expect(received.sort()).toEqual(['ends-gone', 'late-gone', 'marker-gone'])
    expect(gw.stderr()).toMatch(/"clientId":"back".*cancelled, the client is back/)
    // ends' session ended with its will: published first, then the session dropped.
    expect(await waitFor(() => /"clientId":"ends".*persistent session expired/.test(gw.stderr()), 10_000)).toBe(true)
    expect(await gw.stop()).toBe(0)
  }, TIMEOUT)
})
