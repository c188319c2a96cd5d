/**
 * Sessions survive a gateway SIGKILL: a persistent subscriber that was
 * offline receives every QoS 1 message the gateway acknowledged while it was
 * away, even when the kill comes right after the last PUBACK; retained
 * messages survive too. (Stock aedes queues offline messages after the
 * PUBACK, so it loses these.)
 */
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir } from '../../../helpers/gateway-process.ts'
import { readWholeLog } from '../../../helpers/log-reader.ts'

function collect (client: MqttClient): string[] {
  const got: string[] = []
  client.on('message', (topic, payload) => { got.push(`${topic} ${payload.toString()}`) })
  return got
}

async function waitFor (check: () => boolean, ms: number): Promise<void> {
  const until = Date.now() + ms
  while (!check() && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 25))
}

describe('persistent sessions across SIGKILL', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups) await c() })

  it('delivers every acknowledged QoS 1 message to an offline persistent subscriber after a kill -9 right after the PUBACK', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    let gw = await startGatewayProcess({ dataDir: dir })
    const sub = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'svc-sub', clean: false, reconnectPeriod: 0 })
    await sub.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    await sub.endAsync()

    const pub = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'dev-7', reconnectPeriod: 0 })
    const acked: string[] = []
    for (let batch = 0; batch < 10; batch++) {
      await Promise.all(Array.from({ length: 20 }, (_, i) => {
        const body = `m${batch * 20 + i}`
        return pub.publishAsync('devices/dev-7/telemetry/t', body, { qos: 1 }).then(() => { acked.push(`devices/dev-7/telemetry/t ${body}`) })
      }))
    }
    await pub.publishAsync('devices/dev-7/telemetry/last', 'retained-state', { qos: 1, retain: true })
    await gw.kill() // no grace: the queue must already be on disk
    pub.end(true)

    gw = await startGatewayProcess({ dataDir: dir })
    // Listen before connecting: the queued messages follow the CONNACK at once.
    const again = mqtt.connect(gw.mqttUrl, { clientId: 'svc-sub', clean: false, reconnectPeriod: 0 })
    const got = collect(again)
    const connack = await new Promise<{ sessionPresent: boolean }>((resolve) => again.once('connect', resolve))
    expect(connack.sessionPresent).toBe(true)
    await waitFor(() => acked.every((m) => got.includes(m)), 10_000)
    expect(acked.filter((m) => !got.includes(m))).toEqual([])
    expect(acked).toHaveLength(200)
    await again.endAsync()

    const fresh = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'late-joiner', reconnectPeriod: 0 })
    const retained = collect(fresh)
    await fresh.subscribeAsync('devices/dev-7/telemetry/last', { qos: 1 })
    await waitFor(() => retained.length > 0, 5000)
    expect(retained).toEqual(['devices/dev-7/telemetry/last retained-state'])
    await fresh.endAsync()
    expect(await gw.stop()).toBe(0)
  })

  it('publishes a device\'s will when it drops off, to subscribers and into the log', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const gw = await startGatewayProcess({ dataDir: dir })
    const watcher = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'watcher', reconnectPeriod: 0 })
    const got = collect(watcher)
    await watcher.subscribeAsync('devices/+/events/#', { qos: 1 })
    const device = await mqtt.connectAsync(gw.mqttUrl, {
      clientId: 'dev-w', reconnectPeriod: 0, will: { topic: 'devices/dev-w/events/offline', payload: Buffer.from('gone'), qos: 1, retain: false },
    })
    device.stream.destroy() // no DISCONNECT: the gateway sees the connection drop
    await waitFor(() => got.length > 0, 5000)
    expect(got).toEqual(['devices/dev-w/events/offline gone'])
    await watcher.endAsync()
    expect(await gw.stop()).toBe(0)
    const wills = (await readWholeLog(dir)).filter((r) => r.stream === 'default/events')
    expect(wills.map((r) => [r.key, r.topic, r.payload])).toEqual([['dev-w', 'devices/dev-w/events/offline', 'gone']])
  })
})
