/**
 * edgemq → Mosquitto (a real broker, started by the test): MQTT 5 by default
 * with topics unchanged and the dedupe id a user property, 3.1.1 on request,
 * two independent upstreams, messages the upstream refuses ending in the
 * dead-letter stream while the rest flows, and a flapping link that
 * dead-letters nothing.
 */
import { chmod, writeFile } from 'node:fs/promises'
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { readWholeLog } from '../helpers/log-reader.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../helpers/gateway-process.ts'
import { bridgeStatus, drained, freePort, publishAcked, publishAckedUntilKilled, waitFor } from '../helpers/bridge-fixtures.ts'
import { mosquittoPolicy, startMosquitto, type MosquittoProcess } from '../helpers/mosquitto-process.ts'
import { startFlakyProxy } from '../helpers/flaky-proxy.ts'

const policy = mosquittoPolicy()
const bin = policy.bin

it.runIf(policy.missingInCi)('has mosquitto under CI', () => {
  expect.fail('mosquitto is missing: .ci/run installs it; the Mosquitto-upstream tests cannot run')
})
const DEVICES = ['dev-a', 'dev-b', 'dev-c']

interface Received { topic: string, payload: string, dedupeId: string | undefined }

/** A cloud-side subscriber on the upstream that records every message. */
async function collector (url: string, filter: string, options: IClientOptions = {}): Promise<{ client: MqttClient, got: Received[] }> {
  const client = await mqtt.connectAsync(url, { reconnectPeriod: 200, clean: false, clientId: `cloud-${Math.random().toString(16).slice(2)}`, ...options })
  client.on('error', () => {})
  const got: Received[] = []
  client.on('message', (topic, payload, packet) => {
    const dedupe = packet.properties?.userProperties?.['edgemq-dedupe-id']
    got.push({ topic, payload: payload.toString(), dedupeId: Array.isArray(dedupe) ? dedupe[0] : dedupe })
  })
  await client.subscribeAsync(filter, { qos: 1 })
  return { client, got }
}

function perDevice (payloads: readonly string[]): Map<string, string[]> {
  const out = new Map<string, string[]>()
  for (const p of payloads) {
    const device = p.split(':')[0] as string
    out.set(device, [...out.get(device) ?? [], p])
  }
  return out
}

async function startEdge (dir: string, upstreams: Array<Record<string, unknown>>, extra: Record<string, unknown> = {}): Promise<GatewayProcess> {
  const config = await writeConfig(dir, {
    ...extra,
    gatewayId: 'edge-1',
    mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    bridge: { commitIntervalMs: 100, upstreams: upstreams.map((u) => ({ forward: [{ stream: 'telemetry' }], reconnectMinMs: 50, reconnectMaxMs: 500, ...u })) },
  })
  return startGatewayProcess({ dataDir: `${dir}/data`, config })
}

describe.skipIf(bin === null)('bridge: edgemq → Mosquitto', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })
  const setup = async (): Promise<{ dir: string }> => {
    const t = await tempDir('edgemq-bridge-')
    cleanups.push(t.cleanup)
    return { dir: t.dir }
  }
  const mosquitto = async (dir: string, port?: number, extra: string[] = []): Promise<MosquittoProcess> => {
    const m = await startMosquitto(bin as string, dir, port ?? await freePort(), extra)
    cleanups.push(() => m.kill())
    return m
  }
  /** A Mosquitto upstream, a cloud subscriber on `filter`, an edge bridged to it; publishes 300 per device and waits until all arrived. */
  const forwardAll = async (upstream: Record<string, unknown>, filter: string, options: IClientOptions = {}): Promise<{ acked: string[], got: Received[] }> => {
    const { dir } = await setup()
    const up = await mosquitto(dir)
    const cloud = await collector(up.url, filter, options)
    cleanups.push(() => cloud.client.endAsync())
    const edge = await startEdge(dir, [{ name: 'cloud', url: up.url, ...upstream }])
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, DEVICES, 300)
    await drained(edge.httpUrl, 'cloud')
    await waitFor('the cloud subscriber to have everything', () => cloud.got.length >= acked.length ? true : undefined)
    expect(cloud.got).toHaveLength(acked.length)
    return { acked, got: cloud.got }
  }

  it('by default: MQTT 5, topics unchanged for a plain subscriber on #, the dedupe id a user property; status and log say so', async () => {
    const { dir } = await setup()
    const up = await mosquitto(dir)
    const plain = await collector(up.url, '#') // an MQTT 3.1.1 subscriber, as most cloud services are
    const v5 = await collector(up.url, 'devices/#', { protocolVersion: 5 })
    cleanups.push(() => plain.client.endAsync(), () => v5.client.endAsync())
    const edge = await startEdge(dir, [{ name: 'cloud', url: up.url }])
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, DEVICES, 300)
    const status = await drained(edge.httpUrl, 'cloud')
    expect(status).toMatchObject({ kind: 'mqtt', mqttVersion: '5', dedupeId: 'user-property' })
    await waitFor('both subscribers to have everything', () => plain.got.length >= acked.length && v5.got.length >= acked.length ? true : undefined)
    expect(plain.got).toHaveLength(acked.length)
    for (const m of plain.got) expect(m.topic).toMatch(/^devices\/dev-[a-c]\/telemetry\/t$/)
    for (const m of v5.got) expect(m.dedupeId).toMatch(/^edge-1\/default\/telemetry\/\d+\/\d+$/)
    expect(new Set(v5.got.map((m) => m.dedupeId)).size).toBe(acked.length) // one message per (partition, offset)
    for (const [device, list] of perDevice(plain.got.map((m) => m.payload))) {
      expect(list.map((p) => Number(p.split(':')[1])), device).toEqual([...Array(300).keys()])
    }
    const connected = edge.stderr().split('\n').filter((l) => l.includes('"upstream connected"')).map((l) => JSON.parse(l) as Record<string, unknown>)
    expect(connected[0]).toMatchObject({ upstream: 'cloud', mqttVersion: '5', dedupeId: 'user-property' })
  })

  it('MQTT 3.1.1 on request: topics unchanged, no dedupe id', async () => {
    const { got } = await forwardAll({ mqttVersion: '3.1.1' }, 'devices/#', { protocolVersion: 5 })
    for (const m of got) {
      expect(m.topic).toMatch(/^devices\/dev-[a-c]\/telemetry\/t$/)
      expect(m.dedupeId).toBeUndefined()
    }
    for (const [device, list] of perDevice(got.map((m) => m.payload))) {
      expect(list.map((p) => Number(p.split(':')[1])), device).toEqual([...Array(300).keys()])
    }
  })

  it('two upstreams: one stopped does not slow the other, and catches up when it is back', async () => {
    const { dir } = await setup()
    const portB = await freePort()
    const a = await mosquitto(dir)
    let b = await mosquitto(dir, portB)
    const cloudA = await collector(a.url, 'devices/#')
    cleanups.push(() => cloudA.client.endAsync())
    const edge = await startEdge(dir, [{ name: 'a', url: a.url, dedupeId: 'none' }, { name: 'b', url: b.url, dedupeId: 'none' }])
    cleanups.push(() => edge.kill())
    await waitFor('both upstreams connected', async () => (await bridgeStatus(edge.httpUrl)).every((u) => u.connected) ? true : undefined)
    await b.kill()
    const acked = await publishAcked(edge.mqttUrl, DEVICES, 400)
    const statusA = await drained(edge.httpUrl, 'a')
    expect(statusA.forwardedMessages).toBe(acked.length)
    await waitFor('upstream a to have everything', () => cloudA.got.length >= acked.length ? true : undefined)
    const statusB = (await bridgeStatus(edge.httpUrl)).find((u) => u.name === 'b')
    expect(statusB?.connected).toBe(false)
    expect(statusB?.backlog.messages).toBe(acked.length)
    expect(statusB?.reconnects).toBeGreaterThan(0)

    b = await mosquitto(dir, portB)
    const cloudB = await collector(b.url, 'devices/#')
    cleanups.push(() => cloudB.client.endAsync())
    // The collector subscribes after b is back; what b forwards before that is lost to it, so count at the edge.
    const after = await drained(edge.httpUrl, 'b')
    expect(after.forwardedMessages).toBe(acked.length)
    expect(after.backlog).toEqual({ messages: 0, bytes: 0, seconds: 0 })
  })

  it('MQTT 5: a message the upstream refuses goes to dlq.<upstream> after maxDeliveryAttempts; the rest flows', async () => {
    const { dir } = await setup()
    const acl = `${dir}/acl`
    await writeFile(acl, 'topic readwrite devices/good/#\n', { mode: 0o644 })
    await chmod(dir, 0o755) // mosquitto reads the ACL file after dropping root to its own user
    const up = await mosquitto(dir, undefined, [`acl_file ${acl}`])
    const cloud = await collector(up.url, 'devices/#', { protocolVersion: 5 })
    cleanups.push(() => cloud.client.endAsync())
    const edge = await startEdge(dir, [{ name: 'cloud', url: up.url, mqttVersion: '5', maxDeliveryAttempts: 2 }])
    cleanups.push(() => edge.kill())
    const good = await publishAcked(edge.mqttUrl, ['good'], 50)
    const bad = await publishAcked(edge.mqttUrl, ['bad'], 2)
    const more = await publishAcked(edge.mqttUrl, ['good'], 50, 50)
    const status = await drained(edge.httpUrl, 'cloud')
    expect(status.deadLettered).toBe(2)
    await waitFor('the good messages upstream', () => cloud.got.length >= 100 ? true : undefined)
    expect(cloud.got.map((m) => m.payload)).toEqual([...good, ...more])
    const metrics = await (await fetch(`${edge.httpUrl}/metrics`)).text()
    expect(metrics).toMatch(/edgemq_bridge_dead_lettered_total\{upstream="cloud",tenant="default",stream="telemetry"\} 2/)
    expect(await edge.stop()).toBe(0)
    const dlq = (await readWholeLog(`${dir}/data`)).filter((r) => r.stream === 'default/dlq.cloud')
    expect(dlq.map((r) => r.payload)).toEqual(bad)
  })

  it('MQTT 3.1.1: a message the upstream disconnects on is found by resending one at a time, and dead-lettered', async () => {
    const { dir } = await setup()
    const up = await mosquitto(dir, undefined, ['max_packet_size 2000'])
    const cloud = await collector(up.url, 'devices/#')
    cleanups.push(() => cloud.client.endAsync())
    const edge = await startEdge(dir, [{ name: 'cloud', url: up.url, mqttVersion: '3.1.1', maxDeliveryAttempts: 3 }])
    cleanups.push(() => edge.kill())
    const before = await publishAcked(edge.mqttUrl, ['d1', 'd2'], 30)
    const client = await mqtt.connectAsync(edge.mqttUrl, { reconnectPeriod: 0 })
    await client.publishAsync('devices/d1/telemetry/t', Buffer.alloc(5000, 0x61), { qos: 1 }) // bigger than the upstream takes
    await client.endAsync()
    const after = await publishAcked(edge.mqttUrl, ['d1', 'd2'], 30, 30)
    const status = await drained(edge.httpUrl, 'cloud', 60_000)
    expect(status.deadLettered).toBe(1)
    expect(status.reconnects).toBeGreaterThanOrEqual(3)
    await waitFor('everything else upstream', () => new Set(cloud.got.map((m) => m.payload)).size >= before.length + after.length ? true : undefined)
    // In order; 3.1.1 without dedupe ids is at least once (resends after each disconnect, and the canaries: an
    // acknowledged record resent to prove the link before a suspect goes alone).
    const firstArrivals = [...new Set(cloud.got.map((m) => m.payload))]
    expect(perDevice(firstArrivals)).toEqual(perDevice([...before, ...after].sort((x, y) => Number(x.split(':')[1]) - Number(y.split(':')[1]))))
    expect(await edge.stop()).toBe(0)
    const dlq = (await readWholeLog(`${dir}/data`)).filter((r) => r.stream === 'default/dlq.cloud')
    expect(dlq).toHaveLength(1)
    expect(dlq[0]?.payload).toHaveLength(5000)
  })

  it('MQTT 5: a message larger than the upstream\'s maximum packet size is dead-lettered unsent, without a disconnect', async () => {
    const { dir } = await setup()
    const up = await mosquitto(dir, undefined, ['max_packet_size 2000'])
    const cloud = await collector(up.url, 'devices/#')
    cleanups.push(() => cloud.client.endAsync())
    const edge = await startEdge(dir, [{ name: 'cloud', url: up.url }])
    cleanups.push(() => edge.kill())
    const client = await mqtt.connectAsync(edge.mqttUrl, { reconnectPeriod: 0 })
    await client.publishAsync('devices/d1/telemetry/t', Buffer.alloc(5000, 0x61), { qos: 1 })
    await client.endAsync()
    const after = await publishAcked(edge.mqttUrl, ['d1'], 20)
    const status = await drained(edge.httpUrl, 'cloud')
    expect(status).toMatchObject({ deadLettered: 1, reconnects: 0 })
    await waitFor('the rest upstream', () => cloud.got.length >= after.length ? true : undefined)
    expect(cloud.got.map((m) => m.payload)).toEqual(after)
  })

  it.each(['5', '3.1.1'])('MQTT %s: a link that drops at the first PUBLISH more times than maxDeliveryAttempts dead-letters nothing', async (mqttVersion) => {
    const { dir } = await setup()
    const up = await mosquitto(dir)
    const proxy = await startFlakyProxy({ host: '127.0.0.1', port: up.port }, 6)
    cleanups.push(() => proxy.close())
    const cloud = await collector(up.url, 'devices/#')
    cleanups.push(() => cloud.client.endAsync())
    const edge = await startEdge(dir, [{ name: 'cloud', url: proxy.url, mqttVersion, maxDeliveryAttempts: 5 }])
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['d1'], 1)
    acked.push(...await publishAcked(edge.mqttUrl, ['d1', 'd2'], 250, 1))
    const status = await drained(edge.httpUrl, 'cloud')
    expect(proxy.cut()).toBe(6)
    expect(status.deadLettered).toBe(0)
    await waitFor('every record upstream', () => acked.every((p) => cloud.got.some((m) => m.payload === p)) ? true : undefined)
    expect(await edge.stop()).toBe(0)
    expect((await readWholeLog(`${dir}/data`)).filter((r) => r.stream === 'default/dlq.cloud')).toEqual([])
  })

  it('under load through an outage and a SIGKILL: every acked record arrives, in order; duplicates only under the same dedupe id', async () => {
    const { dir } = await setup()
    await chmod(dir, 0o777) // mosquitto writes its persistence file as its own user
    const port = await freePort()
    const conf = ['persistence true', `persistence_location ${dir}/`, 'max_queued_messages 0']
    let up = await mosquitto(dir, port, conf)
    // A persistent cloud session: it keeps receiving across the broker's restart (SIGTERM saves it).
    const cloud = await collector(up.url, 'devices/#', { clientId: 'cloud-archive', protocolVersion: 5, properties: { sessionExpiryInterval: 3600 } })
    cleanups.push(() => cloud.client.endAsync())
    let edge = await startEdge(dir, [{ name: 'cloud', url: up.url }])
    cleanups.push(() => edge.kill())

    const acked = await publishAcked(edge.mqttUrl, DEVICES, 300)
    await up.stop()
    const outage = publishAckedUntilKilled(edge.mqttUrl, DEVICES, 3000, 300) // may still be connecting at the kill
    await waitFor('a backlog during the outage', async () => ((await bridgeStatus(edge.httpUrl))[0]?.backlog.messages ?? 0) > 300 ? true : undefined)
    await edge.kill()
    acked.push(...await outage)
    edge = await startEdge(dir, [{ name: 'cloud', url: up.url }])
    acked.push(...await publishAcked(edge.mqttUrl, DEVICES, 200, 10_000))
    const during = (await bridgeStatus(edge.httpUrl))[0]
    expect(during?.backlog.messages).toBeGreaterThan(0)
    up = await mosquitto(dir, port, conf)
    const after = await drained(edge.httpUrl, 'cloud', 90_000)
    expect(after.backlog).toEqual({ messages: 0, bytes: 0, seconds: 0 })

    const ids = new Map<string, string>() // payload -> dedupe id
    await waitFor('every acked record upstream', () => acked.every((p) => cloud.got.some((m) => m.payload === p)) ? true : undefined, 60_000)
    for (const m of cloud.got) {
      const id = m.dedupeId as string
      expect(id).toMatch(/^edge-1\/default\/telemetry\/\d+\/\d+$/)
      const seen = ids.get(m.payload)
      if (seen !== undefined) expect(id, `duplicate of ${m.payload} under another dedupe id`).toBe(seen)
      ids.set(m.payload, id)
    }
    // Per device, first arrivals are in sequence order (a resend repeats an earlier message, never reorders).
    const first = new Map<string, number[]>()
    const counted = new Set<string>()
    for (const m of cloud.got) {
      if (counted.has(m.payload)) continue
      counted.add(m.payload)
      const [device, seq] = m.payload.split(':') as [string, string]
      first.set(device, [...first.get(device) ?? [], Number(seq)])
    }
    for (const [device, seqs] of first) expect(seqs, device).toEqual([...seqs].sort((a, b) => a - b))
  })

  it('a high-priority stream is not starved by a rate-limited telemetry backlog', async () => {
    const { dir } = await setup()
    const port = await freePort()
    // The bridge reaches Mosquitto through a tap that lists its PUBLISHes in the order the upstream gets them: the
    // cloud subscriber's count lags that by however long Mosquitto and this process take to deliver, which no
    // setting of the bridge bounds (Mosquitto acknowledges a PUBLISH before it delivers it).
    const tap = await startFlakyProxy({ host: '127.0.0.1', port }, 0)
    cleanups.push(() => tap.close())
    // One message in flight, 200 a second, and a backlog spread over many telemetry partitions: round robin alone
    // would make a live event wait its turn behind a couple of dozen busy lanes; its priority puts it next.
    const maxInflight = 1
    const upstream = { name: 'cloud', url: tap.url, dedupeId: 'none', maxInflight, maxMessagesPerSecond: 200, forward: [{ stream: 'telemetry' }, { stream: 'events', priority: 5 }] }
    const edge = await startEdge(dir, [upstream], { streams: { telemetry: { partitions: 32 }, events: { partitions: 4 }, commands: { partitions: 4 } } })
    cleanups.push(() => edge.kill())
    const devices = Array.from({ length: 40 }, (_, i) => `dev-${i}`)
    await publishAcked(edge.mqttUrl, devices, 30) // 1,200 records: six seconds at 200/s
    const lanesBusy = (await bridgeStatus(edge.httpUrl))[0]?.partitions.filter((p) => p.stream === 'telemetry' && p.backlogMessages > 0).length
    expect(lanesBusy).toBeGreaterThan(20)
    const up = await mosquitto(dir, port)
    const cloud = await collector(up.url, 'devices/#')
    cleanups.push(() => cloud.client.endAsync())
    await waitFor('the drain to start', () => tap.published().length > 50 ? true : undefined)
    // Several events on one partition: without priority each would wait a round of the busy lanes.
    const topic = 'devices/dev-0/events/alarm'
    const events = ['fire-0', 'fire-1', 'fire-2', 'fire-3', 'fire-4']
    const client = await mqtt.connectAsync(edge.mqttUrl, { reconnectPeriod: 0 })
    const sentWhenLogged = await Promise.all(events.map(async (e) => {
      await client.publishAsync(topic, e, { qos: 1 })
      return tap.published().length
    }))
    await client.endAsync()
    await waitFor('the events upstream', () => events.every((e) => cloud.got.some((m) => m.payload === e)) ? true : undefined)
    // An event is in the log, and the bridge was told, before its PUBACK (ack means durable). By then the bridge had
    // written at most maxInflight PUBLISHes the tap had not passed on (a PUBACK comes only for what it passed on);
    // after that, no telemetry goes before an event the bridge knows of, not even while the event is read from disk:
    // event i is preceded at most by those, and by the i events before it.
    const sent = tap.published()
    const at = sent.flatMap((t, i) => t === topic ? [i] : [])
    for (const [i, n] of sentWhenLogged.entries()) expect(at[i], `event ${i}, the tap at ${n} when it was logged`).toBeLessThanOrEqual(n + maxInflight + i)
    await drained(edge.httpUrl, 'cloud', 30_000)
  })
})
