/**
 * A subscriber that stops reading its socket (found by the attack probes): aedes' delivery to it waits for its
 * socket to drain, and once 1,000 deliveries are under way every device's ack waits for delivery (backpressure,
 * hooks/authorize-publish.ts), so one stuck `#` subscriber held the acks of every device for as long as it stayed
 * connected (2,000 of 4,000 acknowledged in 60 s). mqtt.slowSubscriberTimeoutMs closes such a connection, counted and
 * logged; a subscriber that reads gets everything and stays.
 */
import mqtt from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig } from '../../../gateway/config/config.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { metricValue, waitFor } from '../../helpers/mqtt-probe.ts'
import { connectPacket, logLines, RawConnection, subscribePacket } from '../../helpers/raw-mqtt.ts'

const MESSAGES = 4000
const PAYLOAD = 'x'.repeat(4096)

describe('mqtt.slowSubscriberTimeoutMs', () => {
  let gw: GatewayProcess
  let cleanup: () => Promise<void> = async () => {}
  beforeAll(async () => {
    const t = await tempDir('edgemq-slow-subscriber-')
    cleanup = t.cleanup
    const config = await writeConfig(t.dir, { mqtt: { listeners: [{ type: 'tcp', port: 0 }], slowSubscriberTimeoutMs: 1000 }, http: { port: 0 } })
    gw = await startGatewayProcess({ dataDir: `${t.dir}/data`, config })
  }, 60_000)
  afterAll(async () => { await gw?.kill(); await cleanup() })

  it('closes a subscriber that stopped reading, so other devices\' QoS 1 publishes keep being acknowledged; one that reads gets all and stays', async () => {
    const stuck = await RawConnection.open(gw.mqttUrl)
    stuck.send(connectPacket({ clientId: 'stuck', keepalive: 0 }))
    expect(await stuck.next('connack')).toBeDefined()
    stuck.send(subscribePacket(1, ['#'], 0))
    expect(await stuck.next('suback')).toBeDefined()
    stuck.socket.pause() // reads nothing from now on
    const reader = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'reader', reconnectPeriod: 0 })
    let read = 0
    reader.on('message', () => { read++ })
    await reader.subscribeAsync('devices/#', { qos: 1 })
    const dev = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'busy', reconnectPeriod: 0 })
    let acked = 0
    const pending: Array<Promise<unknown>> = []
    for (let n = 0; n < MESSAGES; n++) {
      pending.push(dev.publishAsync('devices/busy/telemetry/t', PAYLOAD, { qos: 1 }).then(() => { acked++ }))
      if (pending.length >= 50) await Promise.all(pending.splice(0))
    }
    await Promise.all(pending)
    expect(acked).toBe(MESSAGES)
    expect(await waitFor(() => read === MESSAGES, 30_000)).toBe(true)
    expect(reader.connected).toBe(true)
    // The stuck client's paused socket never reads its EOF: the gateway's count and log tell it was closed.
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_connections_refused_total', { reason: 'slow-subscriber' })).toBe(1)
    const closed = logLines(gw.stderr()).filter((l) => l.reason === 'slow-subscriber')
    expect(closed.map((l) => l.clientId)).toEqual(['stuck'])
    await Promise.all([dev.endAsync(), reader.endAsync()])
    stuck.destroy()
  }, 120_000)

  it('defaults to 10 s, 0 turns it off, and refuses a value that is not a non-negative integer', () => {
    expect(buildConfig({}).mqtt.slowSubscriberTimeoutMs).toBe(10_000)
    expect(buildConfig({ mqtt: { slowSubscriberTimeoutMs: 0 } }).mqtt.slowSubscriberTimeoutMs).toBe(0)
    for (const bad of [-1, 1.5, 'soon']) {
      expect(() => buildConfig({ mqtt: { slowSubscriberTimeoutMs: bad } }))
        .toThrow(expect.objectContaining({ code: 'GW_CONFIG_INVALID', message: expect.stringContaining('mqtt.slowSubscriberTimeoutMs') }))
    }
  })
})
