/**
 * Sessions survive a gateway SIGKILL: a persistent subscriber that was
 * offline receives every QoS 1 message the gateway acknowledged while it was
 * away, even when the kill comes right after the last PUBACK; retained
 * messages survive too. (Stock aedes queues offline messages after the
 * PUBACK, so it loses these.) Sessions that subscribe, or unsubscribe and
 * subscribe again, while devices publish get everything sent after their
 * SUBACK: the gateway matches a topic's sessions once, not once per message
 * (persistence.ts, TopicMatch), and must see every change.
 */
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { publishUntilKilled, type Acked } from '../../../helpers/acked-publisher.ts'
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

/** `{device, seq}` of every acked-publisher message the client receives, in order. */
function collectAcked (client: MqttClient, into: Acked[] = []): Acked[] {
  client.on('message', (topic, payload) => { if (topic.endsWith('/telemetry/seq')) into.push(JSON.parse(payload.toString()) as Acked) })
  return into
}

const FILTER = 'devices/+/telemetry/#'
const PUBLISHERS = 4
const WINDOW = 20

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

  it('gives sessions that subscribe, or unsubscribe and subscribe again, while devices publish every message sent after the SUBACK, across a kill -9', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    // Sessions offline from the start: the gateway has matched the devices' topics, and their cursors exist, before
    // the subscriptions below change.
    for (let s = 0; s < 3; s++) {
      const away = await mqtt.connectAsync(gw.mqttUrl, { clientId: `away-${s}`, clean: false, reconnectPeriod: 0 })
      await away.subscribeAsync(FILTER, { qos: 1 })
      await away.endAsync()
    }
    const acked: Acked[] = []
    let stop = false
    const devices = await Promise.all(Array.from({ length: PUBLISHERS }, async (_, d) => {
      const client = await mqtt.connectAsync(gw.mqttUrl, { clientId: `dev-${d}`, reconnectPeriod: 0 })
      client.on('error', () => {})
      return client
    }))
    const runs = devices.map((client, d) => publishUntilKilled(client, `dev-${d}`, 0, acked, { window: WINDOW, maxMs: 60_000, stop: () => stop }))
    /**
     * The seq from which each device's messages were sent after this moment: a device has at most WINDOW unacknowledged,
     * so nothing at or past its highest acknowledged seq + WINDOW had been sent yet.
     */
    const sentAfterNow = (): Map<string, number> => {
      const from = new Map<string, number>()
      for (const a of acked) from.set(a.device, Math.max(from.get(a.device) ?? 0, a.seq + 1 + WINDOW))
      for (let d = 0; d < PUBLISHERS; d++) if (!from.has(`dev-${d}`)) from.set(`dev-${d}`, WINDOW)
      return from
    }
    const moreAcked = async (n: number): Promise<void> => {
      const target = acked.length + n
      await waitFor(() => acked.length >= target, 30_000)
      expect(acked.length).toBeGreaterThanOrEqual(target)
    }
    await moreAcked(200)

    // A new session subscribes (to an unrouted topic too) and leaves.
    const late = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'late', clean: false, reconnectPeriod: 0 })
    const lateBefore = collectAcked(late) // while connected it gets some live
    await late.subscribeAsync({ [FILTER]: { qos: 1 }, 'site/#': { qos: 1 } })
    const lateFrom = sentAfterNow()
    await late.endAsync()
    await moreAcked(200)

    // A session subscribes, drops its only subscription (and with it its cursors) and subscribes again.
    const resub = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'resub', clean: false, reconnectPeriod: 0 })
    const resubGot = collectAcked(resub)
    await resub.subscribeAsync(FILTER, { qos: 1 })
    await moreAcked(100)
    await resub.unsubscribeAsync(FILTER)
    await resub.subscribeAsync(FILTER, { qos: 1 })
    const resubFrom = sentAfterNow()
    await resub.endAsync()
    await moreAcked(200)

    // An unrouted topic: a copy per session, not a cursor.
    const site = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'site', reconnectPeriod: 0 })
    for (let i = 0; i < 5; i++) await site.publishAsync('site/alerts', `alert-${i}`, { qos: 1 })
    await site.endAsync()
    stop = true
    await Promise.all(runs)
    await gw.kill() // no grace: what the sessions need of every acknowledged message is on disk

    gw = await startGatewayProcess({ dataDir: dir })
    const expected = (from: Map<string, number>): Acked[] => acked.filter((a) => a.seq >= (from.get(a.device) ?? Infinity))
    const key = (a: Acked): string => `${a.device}:${a.seq}`
    const lateExpected = expected(lateFrom)
    const resubExpected = expected(resubFrom)
    expect(lateExpected.length).toBeGreaterThan(100)
    expect(resubExpected.length).toBeGreaterThan(100)

    const lateAgain = mqtt.connect(gw.mqttUrl, { clientId: 'late', clean: false, reconnectPeriod: 0 })
    const lateGot = collectAcked(lateAgain)
    const alerts: string[] = []
    lateAgain.on('message', (topic, payload) => { if (topic === 'site/alerts') alerts.push(payload.toString()) })
    const resubAgain = mqtt.connect(gw.mqttUrl, { clientId: 'resub', clean: false, reconnectPeriod: 0 })
    collectAcked(resubAgain, resubGot)
    const has = (got: Acked[], want: Acked[]): Acked[] => {
      const seen = new Set(got.map(key))
      return want.filter((a) => !seen.has(key(a)))
    }
    const lateAll = (): Acked[] => [...lateBefore, ...lateGot]
    await waitFor(() => has(lateAll(), lateExpected).length === 0 && has(resubGot, resubExpected).length === 0 && alerts.length === 5, 30_000)
    expect(has(lateAll(), lateExpected).slice(0, 10)).toEqual([])
    expect(has(resubGot, resubExpected).slice(0, 10)).toEqual([])
    expect(alerts).toEqual(['alert-0', 'alert-1', 'alert-2', 'alert-3', 'alert-4'])
    // Per-device order in what the connection after the restart got.
    for (let d = 0; d < PUBLISHERS; d++) {
      const seqs = lateGot.filter((a) => a.device === `dev-${d}`).map((a) => a.seq)
      for (let i = 1; i < seqs.length; i++) expect(seqs[i], `dev-${d} out of order at ${i}`).toBeGreaterThan(seqs[i - 1] as number)
    }
    await Promise.all([lateAgain.endAsync(), resubAgain.endAsync()])
    expect(await gw.stop()).toBe(0)
  })

  it('keeps a QoS 2 persistent subscriber that unsubscribes and subscribes again while devices publish at QoS 2, and releases all it was sent', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    const sub = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'q2', clean: false, reconnectPeriod: 0 })
    let closed = false
    sub.on('close', () => { closed = true })
    // Packet ids of QoS 2 PUBLISHes received and not released yet (a PUBREL lets MQTT.js hand the message over).
    const unreleased = new Set<number>()
    let released = 0
    sub.on('packetreceive', (packet) => {
      if (packet.cmd === 'publish' && packet.qos === 2) unreleased.add(packet.messageId as number)
      if (packet.cmd === 'pubrel' && unreleased.delete(packet.messageId as number)) released++
    })
    await sub.subscribeAsync(FILTER, { qos: 2 })
    let stop = false
    const devices = await Promise.all(Array.from({ length: PUBLISHERS }, async (_, d) => {
      const client = await mqtt.connectAsync(gw.mqttUrl, { clientId: `q2-dev-${d}`, reconnectPeriod: 0 })
      client.on('error', () => {})
      return client
    }))
    // WINDOW publishes in flight per device, so some are between aedes' enqueue step and its delivery at each SUBSCRIBE.
    const runs = devices.map(async (client, d) => {
      let i = 0
      const one = async (): Promise<void> => {
        while (!stop && i < 5000) await client.publishAsync(`devices/q2-dev-${d}/telemetry/t`, `m${i++}`, { qos: 2 })
      }
      await Promise.all(Array.from({ length: WINDOW }, one))
    })
    for (let round = 0; round < 30 && !closed; round++) {
      await sub.unsubscribeAsync(FILTER)
      await sub.subscribeAsync(FILTER, { qos: 2 })
    }
    stop = true
    await Promise.all(runs)
    await waitFor(() => closed || unreleased.size === 0, 30_000)
    expect({ closed, unreleased: [...unreleased].slice(0, 10) }).toEqual({ closed: false, unreleased: [] })
    expect(released).toBeGreaterThan(0)
    await Promise.all([sub.endAsync(), ...devices.map(async (client) => { await client.endAsync() })])
    expect(await gw.stop()).toBe(0)
  })
})
