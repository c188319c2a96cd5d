/**
 * A share's start is durable from its first SUBACK on. docs/mqtt.md: "A share that never committed starts at the log
 * end as of its first SUBSCRIBE"; "after a restart or kill -9, the share resumes at its committed offsets". So a
 * message acknowledged after the first SUBACK reaches the share, also when the gateway is killed right after: the
 * SUBACK waits until the group and its start offsets are written (share-groups.ts prepare). Found by the attack
 * probes: the offsets were written after the SUBACK, one awaited commit per partition (6 of 16 lost).
 */
import path from 'node:path'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { waitFor } from '../../../helpers/mqtt-probe.ts'

/**
 * Many partitions, a device in each: the devices' messages are written in a group commit or two, while a share start
 * written one partition after the other took as many writes as partitions (the probe lost 6 of 16 with 8 partitions).
 */
const PARTITIONS = 64
const DEVICES = 64
const WAIT_MS = 30_000

describe('shared subscriptions: kill -9 right after a share\'s first SUBSCRIBE', () => {
  let gw: GatewayProcess | undefined
  let cleanup: (() => Promise<void>) | undefined
  afterAll(async () => { await gw?.kill(); await cleanup?.() })

  it('every message acknowledged after the first SUBACK reaches the share after a kill -9', async () => {
    const t = await tempDir()
    cleanup = t.cleanup
    const config = await writeConfig(t.dir, {
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      http: { port: 0 },
      streams: { telemetry: { partitions: PARTITIONS }, events: { partitions: 1 }, commands: { partitions: 1 } },
    })
    const dataDir = path.join(t.dir, 'data')
    gw = await startGatewayProcess({ dataDir, config })
    const devices = await Promise.all(Array.from({ length: DEVICES }, (_v, d) => mqtt.connectAsync(gw!.mqttUrl, { clientId: `sd-${d}`, reconnectPeriod: 0 })))
    const member = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'w1', clean: false, reconnectPeriod: 0 })
    await member.subscribeAsync('$share/g/devices/+/telemetry/#', { qos: 1 })
    member.end(true)
    // one message per device (so in most partitions), each acknowledged, right after the SUBACK
    await Promise.all(devices.map((dev, d) => dev.publishAsync(`devices/sd-${d}/telemetry/t`, `m${d}`, { qos: 1 })))
    await gw.kill()
    for (const dev of devices) dev.end(true)
    gw = await startGatewayProcess({ dataDir, config })
    const again = mqtt.connect(gw.mqttUrl, { clientId: 'w1', clean: false, reconnectPeriod: 0 })
    const got = new Set<string>()
    again.on('message', (_t, p) => got.add(p.toString()))
    await new Promise((resolve) => again.once('connect', resolve))
    // a second round after the restart: once all of it arrived, the first round had its chance
    const later = await Promise.all(Array.from({ length: DEVICES }, (_v, d) => mqtt.connectAsync(gw!.mqttUrl, { clientId: `sd-${d}`, reconnectPeriod: 0 })))
    await Promise.all(later.map((dev, d) => dev.publishAsync(`devices/sd-${d}/telemetry/t`, `n${d}`, { qos: 1 })))
    for (const dev of later) await dev.endAsync()
    expect(await waitFor(() => Array.from({ length: DEVICES }, (_v, d) => `n${d}`).every((m) => got.has(m)), WAIT_MS)).toBe(true)
    again.end(true)
    const missing = Array.from({ length: DEVICES }, (_v, d) => `m${d}`).filter((m) => !got.has(m))
    expect(missing, 'acknowledged before the kill, never delivered to the share').toEqual([])
  })
})
