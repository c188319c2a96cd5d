/**
 * A persistent subscriber drains a backlog from its cursors into the log
 * (gateway/mqtt/sessions/cursors.ts) while the gateway is SIGKILLed, several
 * times, and devices keep publishing meanwhile (so reading the log hands over
 * to live delivery and back). In the end it has every publish the gateway
 * acknowledged; within each connection every device's messages arrive in
 * order; a message received twice came again with DUP set. /metrics shows
 * the offline session's lag. A session offline longer than
 * mqtt.sessionExpirySeconds is dropped, and counted.
 */
import path from 'node:path'
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { scrape } from '../../../helpers/raw-mqtt.ts'

const DEVICES = 8
const BACKLOG_PER_DEVICE = 250
const LIVE_PER_DEVICE = 25
const CYCLES = 3
const WAIT_MS = 60_000

async function waitFor (check: () => boolean, what: string, ms = WAIT_MS): Promise<void> {
  const until = Date.now() + ms
  while (!check()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

/** Publishes `count` QoS 1 messages per device from `from` on; resolves with those acknowledged (a kill ends it early). */
async function publishSome (url: string, from: number, count: number, tag: string): Promise<string[]> {
  const acked: string[] = []
  await Promise.all(Array.from({ length: DEVICES }, async (_v, d) => {
    const client = await mqtt.connectAsync(url, { clientId: `dev-${d}-${tag}`, reconnectPeriod: 0 }).catch(() => null)
    if (client === null) return
    // MQTT.js keeps an unacknowledged publish of a closed client pending: the close ends the run instead
    const closed = new Promise<boolean>((resolve) => client.once('close', () => resolve(false)))
    try {
      for (let n = from; n < from + count; n++) {
        const body = `${d}:${n}`
        const ok = await Promise.race([client.publishAsync(`devices/dev-${d}/telemetry/t`, body, { qos: 1 }).then(() => true, () => false), closed])
        if (!ok) return
        acked.push(body)
      }
    } finally {
      client.end(true)
    }
  }))
  return acked
}

interface Receipt { readonly device: number, readonly n: number, readonly dup: boolean, readonly connection: number }

function subscribe (url: string, connection: number, receipts: Receipt[]): MqttClient {
  const client = mqtt.connect(url, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
  client.on('message', (_topic, payload, packet) => {
    const [device, n] = payload.toString().split(':').map(Number)
    receipts.push({ device: device as number, n: n as number, dup: packet.dup, connection })
  })
  client.on('error', () => {})
  return client
}

describe('persistent session cursors across kill -9', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it('delivers every acknowledged publish, in per-device order, duplicates only with DUP, across kills mid-drain', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    let gw: GatewayProcess = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    const first = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
    await first.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    await first.endAsync()
    const acked = new Set(await publishSome(gw.mqttUrl, 0, BACKLOG_PER_DEVICE, 'backlog'))
    expect(acked.size).toBe(DEVICES * BACKLOG_PER_DEVICE)
    // the offline session's cursors, in /metrics: one session, behind by the whole backlog
    const series = (await scrape(gw.httpUrl)).filter((s) => s.name.startsWith('edgemq_mqtt_session_') && s.labels.stream === 'telemetry')
    expect(Object.fromEntries(series.map((s) => [s.name, s.value]))).toMatchObject({
      edgemq_mqtt_session_cursor_sessions: 1, edgemq_mqtt_session_lag_messages: DEVICES * BACKLOG_PER_DEVICE,
    })

    const receipts: Receipt[] = []
    let next = BACKLOG_PER_DEVICE
    for (let cycle = 0; cycle < CYCLES; cycle++) {
      await gw.kill()
      gw = await startGatewayProcess({ dataDir: dir })
      const before = receipts.length
      const sub = subscribe(gw.mqttUrl, cycle, receipts)
      // devices publish while the subscriber drains; the kill may cut them off: only what was acknowledged counts
      const live = publishSome(gw.mqttUrl, next, LIVE_PER_DEVICE, `c${cycle}`)
      next += LIVE_PER_DEVICE
      await waitFor(() => receipts.length >= before + 300, `300 messages in cycle ${cycle}`)
      await gw.kill()
      for (const body of await live) acked.add(body)
      sub.end(true)
    }

    gw = await startGatewayProcess({ dataDir: dir })
    const last = subscribe(gw.mqttUrl, CYCLES, receipts)
    const received = (): Set<string> => new Set(receipts.map((r) => `${r.device}:${r.n}`))
    await waitFor(() => [...acked].every((body) => received().has(body)), 'every acknowledged publish')
    last.end(true)
    expect(await gw.stop()).toBe(0)

    // per device, in order within each connection
    for (let c = 0; c <= CYCLES; c++) {
      for (let d = 0; d < DEVICES; d++) {
        const seq = receipts.filter((r) => r.connection === c && r.device === d).map((r) => r.n)
        expect(seq.every((n, i) => i === 0 || n > (seq[i - 1] as number)), `connection ${c} device ${d}`).toBe(true)
      }
    }
    // a message received again came with DUP set
    const seen = new Set<string>()
    const repeatsWithoutDup: string[] = []
    for (const r of receipts) {
      const id = `${r.device}:${r.n}`
      if (seen.has(id) && !r.dup) repeatsWithoutDup.push(id)
      seen.add(id)
    }
    expect(repeatsWithoutDup).toEqual([])
  }, 240_000)

  it('expires a session offline longer than mqtt.sessionExpirySeconds: counted, and the next CONNECT finds no session', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const config = await writeConfig(dir, { mqtt: { listeners: [{ type: 'tcp', port: 0 }], sessionExpirySeconds: 1 } })
    const gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    cleanups.push(() => gw.kill())
    const sub = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
    await sub.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    await sub.endAsync()
    const expired = async (): Promise<number> => (await scrape(gw.httpUrl)).find((s) => s.name === 'edgemq_mqtt_sessions_expired_total')?.value ?? NaN
    const until = Date.now() + WAIT_MS
    while (await expired() < 1 && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 100))
    expect(await expired()).toBe(1)
    const again = mqtt.connect(gw.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
    const connack = await new Promise<{ sessionPresent: boolean }>((resolve) => again.once('connect', resolve))
    expect(connack.sessionPresent).toBe(false)
    await again.endAsync()
    expect(await gw.stop()).toBe(0)
  }, 120_000)
})
