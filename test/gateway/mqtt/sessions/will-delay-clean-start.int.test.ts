/**
 * A device whose MQTT 5 will waits for its Will Delay Interval after a kill -9 of the gateway (the device was connected
 * then) connects again with Clean Start 1: that ends its old session [MQTT-3.1.2-4], and a delayed will is sent when its
 * session ends, if that comes before the delay (3.1.3.2.2). So the will is published by the new connection's CONNACK
 * and deleted then: a kill -9 right after the CONNACK leaves no will for the next start. Before, the CONNECT deleted the
 * stored will and the gateway's timer was cancelled as for a device continuing its session: never published. The
 * orderings, and the same on aedes' own timer, without a gateway process: will-delay-takeover.test.ts.
 */
import type { MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { connectOk, endAll, waitFor } from '../../../helpers/mqtt-probe.ts'
import { delayedWillDevice, WILL_WAITING } from '../../../helpers/delayed-wills.ts'

const TIMEOUT = 90_000
const WAIT_MS = 20_000

describe('a Clean Start 1 reconnect while a will of the previous process waits for its delay', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  })

  it('has the will logged by its CONNACK and deleted: after a kill -9 then, the will is delivered once and the start finds none', async () => {
    const { dir, cleanup } = await tempDir('edgemq-will-clean-start-')
    cleanups.push(cleanup)
    let gw: GatewayProcess = await startGatewayProcess({ dataDir: dir })
    cleanups.push(async () => { await gw.kill() })
    const watcherOptions = { clientId: 'watcher', clean: false, reconnectPeriod: 0 }
    const watcher = await connectOk(gw.mqttUrl, watcherOptions)
    await watcher.subscribeAsync('devices/+/events/#', { qos: 1 })
    await watcher.endAsync()
    clients.add(await connectOk(gw.mqttUrl, delayedWillDevice('dev-9', { willDelayInterval: 300 })))
    await gw.kill()
    await endAll(clients)
    clients.clear()

    gw = await startGatewayProcess({ dataDir: dir })
    expect(gw.stderr()).toMatch(new RegExp(`"clientId":"dev-9".*${WILL_WAITING}`))
    // The device again, starting a new session; the gateway is killed as soon as it has the CONNACK.
    clients.add(await connectOk(gw.mqttUrl, delayedWillDevice('dev-9', { clean: true })))
    await gw.kill()
    await endAll(clients)
    clients.clear()

    // The will was logged by then and is stored no more: the watcher's session has it, the start finds none.
    gw = await startGatewayProcess({ dataDir: dir })
    expect(gw.stderr()).not.toMatch(/"clientId":"dev-9".*will of a client connected/)
    const again = await connectOk(gw.mqttUrl, watcherOptions)
    clients.add(again)
    const received: string[] = []
    again.on('message', (_topic, payload) => { received.push(payload.toString()) })
    expect(await waitFor(() => received.includes('dev-9-gone'), WAIT_MS), 'the watcher gets the will').toBe(true)
    expect(received).toEqual(['dev-9-gone'])
    expect(await gw.stop()).toBe(0)
  }, TIMEOUT)
})
