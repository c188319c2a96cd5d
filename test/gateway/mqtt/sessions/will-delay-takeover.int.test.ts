/**
 * A device's MQTT 5 connection with a delayed will (Will Delay Interval > 0), taken over by its new connection that
 * continues the session without a will, has its will cancelled [MQTT-3.1.3-9]: nothing is published at the takeover,
 * and after a kill -9 and a restart the gateway fires no will for the device either. Before, the takeover left the old
 * connection's will stored (the gateway's will storage kept it for the open connection that stored it, and aedes did
 * not schedule it during a takeover), and the next start fired it after its delay: "device offline" while the device
 * had been connected all along. The orderings, without a gateway process: will-delay-takeover.test.ts.
 *
 * What proves that nothing more comes: a marker client's will with a longer delay, vanished with the gateway too, so
 * timed from the same restart. A persistent watcher of the will topics receives what was published.
 */
import type { MqttClient } from 'mqtt'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { connectOk, endAll, waitFor } from '../../../helpers/mqtt-probe.ts'
import { delayedWillDevice, WILL_WAITING } from '../../../helpers/delayed-wills.ts'

const TIMEOUT = 90_000
const WAIT_MS = 20_000

describe('a connection with a delayed will taken over by one that continues its session without a will', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  })

  it('publishes no will at the takeover, nor after a kill -9 and a restart', async () => {
    const { dir, cleanup } = await tempDir('edgemq-will-takeover-')
    cleanups.push(cleanup)
    let gw: GatewayProcess = await startGatewayProcess({ dataDir: dir })
    cleanups.push(async () => { await gw.kill() })
    const watcherOptions = { clientId: 'watcher', clean: false, reconnectPeriod: 0 }
    const watcher = await connectOk(gw.mqttUrl, watcherOptions)
    const received: string[] = []
    watcher.on('message', (_topic, payload) => { received.push(payload.toString()) })
    await watcher.subscribeAsync('devices/+/events/#', { qos: 1 })

    // The device, then the marker (its will 2 s after the device's would have been published).
    const old = await connectOk(gw.mqttUrl, delayedWillDevice('dev-9', { willDelayInterval: 1 }))
    clients.add(old)
    clients.add(await connectOk(gw.mqttUrl, delayedWillDevice('marker', { willDelayInterval: 3 })))
    const oldClosed = new Promise<void>((resolve) => old.once('close', () => resolve()))
    // The device again, on a new connection without a will, while the gateway still holds the old one.
    const next = await connectOk(gw.mqttUrl, delayedWillDevice('dev-9'))
    clients.add(next)
    await oldClosed
    // A record of the device's partition logged after any will the takeover fired; its PUBACK waits for the commit.
    await next.publishAsync('devices/dev-9/events/probe', 'probe', { qos: 1 })
    expect(await waitFor(() => received.includes('probe'), WAIT_MS), 'the watcher gets the probe').toBe(true)
    expect(received).toEqual(['probe'])
    await watcher.endAsync()
    // A session write after the takeover's (the group commit keeps call order): once its SUBACK is back, they are on disk.
    const flush = await connectOk(gw.mqttUrl, { clientId: 'flush', clean: false, reconnectPeriod: 0 })
    await flush.subscribeAsync('devices/flush/commands/#', { qos: 1 })
    await flush.endAsync()
    await gw.kill()
    await endAll(clients)
    clients.clear()

    gw = await startGatewayProcess({ dataDir: dir })
    expect(gw.stderr()).toMatch(new RegExp(`"clientId":"marker".*${WILL_WAITING}`))
    const again = mqtt.connect(gw.mqttUrl, watcherOptions)
    clients.add(again)
    const afterRestart: string[] = []
    again.on('message', (_topic, payload) => { afterRestart.push(payload.toString()) })
    expect(await waitFor(() => afterRestart.includes('marker-gone'), WAIT_MS), 'the marker\'s will is published').toBe(true)
    expect(afterRestart).toEqual(['marker-gone'])
    expect(gw.stderr()).not.toMatch(/"clientId":"dev-9".*will of a client connected/)
    expect(await gw.stop()).toBe(0)
  }, TIMEOUT)
})
