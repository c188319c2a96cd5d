/**
 * Damaged session data is reported, never skipped silently (DESIGN.md, "Security defaults"), and loses nothing: a
 * value of the wrong length (sessions/format.ts) is logged with GW_SESSION_CORRUPT and its key, counted in
 * edgemq_mqtt_session_damaged_entries_total{entry}, and the session goes on with a fallback that delivers more, never
 * less (docs/mqtt.md). Found by the attack probes: a `K` cursor cut to 7 bytes was skipped at load, so the session's
 * backlog in that partition was neither delivered nor reported (0 of 10); `C` and `E` values were skipped the same way.
 */
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { waitFor } from '../../../helpers/mqtt-probe.ts'
import { scrape } from '../../../helpers/raw-mqtt.ts'

const COUNT = 10
const WAIT_MS = 30_000

/** Cuts the last byte off every value of the sessions key space under these tags; returns the keys (hex). */
async function damage (dataDir: string, tags: readonly string[]): Promise<string[]> {
  const root = new ClassicLevel<Buffer, Buffer>(path.join(dataDir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await root.open()
  const sessions = root.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  const damaged: string[] = []
  try {
    for (const tag of tags) {
      const lt = String.fromCharCode(tag.charCodeAt(0) + 1)
      for await (const [key, value] of sessions.iterator({ gte: Buffer.from(tag), lt: Buffer.from(lt) })) {
        if (value.length === 0) continue // a 3.1.1 session's `C`: nothing to cut
        await sessions.put(key, value.subarray(0, value.length - 1))
        damaged.push(key.toString('hex'))
      }
    }
  } finally {
    await root.close()
  }
  return damaged
}

describe('damaged session entries', () => {
  let gw: GatewayProcess | undefined
  let cleanup: (() => Promise<void>) | undefined
  afterAll(async () => { await gw?.kill(); await cleanup?.() })

  it('a damaged cursor, session mark or offline mark is logged with its key and counted; the backlog is delivered and the session kept', async () => {
    const t = await tempDir()
    cleanup = t.cleanup
    gw = await startGatewayProcess({ dataDir: t.dir })
    const first = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
    await first.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    await first.endAsync()
    const v5 = { clientId: 'svc5', clean: false, protocolVersion: 5 as const, reconnectPeriod: 0, properties: { sessionExpiryInterval: 3600 } }
    const other = await mqtt.connectAsync(gw.mqttUrl, v5)
    await other.subscribeAsync('plain/#', { qos: 1 })
    await other.endAsync()
    const dev = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'd1', reconnectPeriod: 0 })
    for (let n = 0; n < COUNT; n++) await dev.publishAsync('devices/d1/telemetry/t', `b${n}`, { qos: 1 })
    await dev.endAsync()
    expect(await gw.stop()).toBe(0)
    // K: svc's cursor; C: svc5's interval (svc's is empty); E: both offline marks
    const damaged = await damage(t.dir, ['K', 'C', 'E'])
    expect(damaged).toHaveLength(4)

    gw = await startGatewayProcess({ dataDir: t.dir })
    const started = gw
    const again = mqtt.connect(started.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
    const got: string[] = []
    again.on('message', (_t, p) => got.push(p.toString()))
    await new Promise((resolve) => again.once('connect', resolve))
    // a later message of the same device: once it arrives, the backlog before it has come
    const dev2 = await mqtt.connectAsync(started.mqttUrl, { clientId: 'd1', reconnectPeriod: 0 })
    await dev2.publishAsync('devices/d1/telemetry/t', 'marker', { qos: 1 })
    await dev2.endAsync()
    expect(await waitFor(() => got.includes('marker'), WAIT_MS)).toBe(true)
    await again.endAsync()
    expect(got).toEqual([...Array.from({ length: COUNT }, (_, n) => `b${n}`), 'marker'])

    const kept = mqtt.connect(started.mqttUrl, v5)
    const present = await new Promise<boolean>((resolve) => kept.once('connect', (connack) => { resolve(connack.sessionPresent) }))
    await kept.endAsync()
    expect(present, 'svc5 session present').toBe(true)

    const reported = started.stderr().split('\n').filter((l) => l.includes('GW_SESSION_CORRUPT'))
    expect(damaged.filter((key) => !reported.some((l) => l.includes(key))), 'damaged keys not logged').toEqual([])
    const counts = Object.fromEntries((await scrape(started.httpUrl))
      .filter((s) => s.name === 'edgemq_mqtt_session_damaged_entries_total')
      .map((s) => [s.labels.entry, s.value]))
    expect(counts).toEqual({ cursor: 1, session: 1, offline: 2, messageId: 0, subscription: 0 }) // every kind is there, at 0 if none
  })
})
