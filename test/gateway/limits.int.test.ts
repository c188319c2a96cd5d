/**
 * Overload limits, against a real gateway process with a config file:
 * `mqtt.maxConnections` refuses the connection after the last allowed one,
 * `mqtt.maxPacketBytes` closes a connection that sends a bigger packet,
 * `mqtt.maxInflightPerClient` bounds a pipelining client without breaking
 * it (every acknowledgement, in order), and `mqtt.publishRatePerClient`
 * slows one fast client to about the rate while its neighbours are not
 * slowed. Every refusal is counted in /metrics and logged once.
 */
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../helpers/gateway-process.ts'
import { connectPacket, logLines, RawConnection, readWholeLog, scrape, sleep, total, waitUntil } from '../helpers/raw-mqtt.ts'

const REFUSED_CONN = 'edgemq_mqtt_connections_refused_total'
const REFUSED_PUB = 'edgemq_mqtt_publishes_refused_total'
const INGEST = 'edgemq_ingest_messages_total'
const CONNECTED = 'edgemq_mqtt_connected_clients'

const options = (clientId: string): IClientOptions => ({ clientId, protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })

async function startWith (mqttConfig: Record<string, unknown>): Promise<{ gw: GatewayProcess, dataDir: string, cleanup: () => Promise<void> }> {
  const { dir, cleanup } = await tempDir('edgemq-limits-')
  const config = await writeConfig(dir, { mqtt: { listeners: [{ type: 'tcp', port: 0 }], ...mqttConfig }, http: { port: 0 } })
  const gw = await startGatewayProcess({ dataDir: `${dir}/data`, config })
  return { gw, dataDir: `${dir}/data`, cleanup }
}

/** Publishes `count` QoS `qos` messages without waiting in between; resolves with the order the acks came in, or rejects after `ms`. */
/** Publishes `count` messages at once; `acked` fills as their PUBACKs arrive. */
async function pipeline (client: MqttClient, topic: string, count: number, qos: 1 | 2, ms: number, acked: number[] = []): Promise<{ acked: number[], elapsedMs: number }> {
  const started = performance.now()
  const all = Promise.all(Array.from({ length: count }, (_, i) =>
    client.publishAsync(topic, String(i), { qos }).then(() => { acked.push(i) })))
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`only ${acked.length}/${count} acknowledged within ${ms} ms`)), ms) })
  try {
    await Promise.race([all, timeout])
  } finally {
    clearTimeout(timer)
  }
  return { acked, elapsedMs: performance.now() - started }
}

function collect (client: MqttClient): string[] {
  const got: string[] = []
  client.on('message', (_topic, payload) => { got.push(payload.toString()) })
  return got
}

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i)

describe('limits: maxConnections, maxPacketBytes, maxInflightPerClient', () => {
  let gw: GatewayProcess
  let dataDir: string
  let cleanup: () => Promise<void>
  const clients: MqttClient[] = []

  beforeAll(async () => {
    ({ gw, dataDir, cleanup } = await startWith({ maxConnections: 3, maxInflightPerClient: 4, maxPacketBytes: 1024 }))
  })

  // A failed test must not leave its clients holding the connection budget of the next one.
  afterEach(async () => {
    for (const c of clients.splice(0)) c.end(true)
    if (gw.child.exitCode === null && gw.child.signalCode === null) await waitUntil(async () => total(await scrape(gw.httpUrl), CONNECTED) === 0, 3000)
  })

  afterAll(async () => {
    await gw?.kill()
    await cleanup?.()
  })

  async function connect (clientId: string): Promise<MqttClient> {
    const c = await mqtt.connectAsync(gw.mqttUrl, options(clientId))
    c.on('error', () => {})
    clients.push(c)
    return c
  }

  it('refuses the connection after maxConnections (3), leaves the others alone, and accepts again once one leaves', async () => {
    const [first, , third] = [await connect('lim-1'), await connect('lim-2'), await connect('lim-3')] as [MqttClient, MqttClient, MqttClient]
    const got = collect(first)
    await first.subscribeAsync('devices/lim-1/telemetry/#', { qos: 1 })
    const before = await scrape(gw.httpUrl)
    const mark = gw.stderr().length

    const over = await RawConnection.open(gw.mqttUrl)
    try {
      over.send(connectPacket({ clientId: 'over-limit' }))
      // Mosquitto closes such a connection at once; a CONNACK with a non-zero code before the close is fine too.
      expect(await over.waitClosed(3000), 'the connection beyond maxConnections is closed').toBe(true)
      const connack = over.packets.find((p) => p.cmd === 'connack') as { returnCode?: number } | undefined
      expect(connack?.returnCode, 'no successful CONNACK').not.toBe(0)
    } finally {
      over.destroy()
    }

    await first.publishAsync('devices/lim-1/telemetry/t', 'still-here', { qos: 1 })
    expect(await waitUntil(() => got.includes('still-here'), 5000), 'a connected client still publishes and receives').toBe(true)
    const after = await scrape(gw.httpUrl)
    expect(total(after, REFUSED_CONN, { reason: 'max-connections' }) - total(before, REFUSED_CONN, { reason: 'max-connections' })).toBe(1)
    expect(total(after, CONNECTED)).toBe(3)
    const lines = logLines(gw.stderr().slice(mark)).map((l) => JSON.stringify(l))
    expect(lines, 'the refusal is logged once').toHaveLength(1)
    expect(lines[0], 'the log line names the refused client').toContain('over-limit')

    await third.endAsync()
    expect(await waitUntil(async () => total(await scrape(gw.httpUrl), CONNECTED) === 2, 3000)).toBe(true)
    const again = await connect('lim-4')
    expect(again.connected).toBe(true)
  })

  it('accepts a packet under the configured maxPacketBytes (1024) and closes the connection of one over it', async () => {
    const sub = await connect('size-sub')
    const got = collect(sub)
    await sub.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    const before = await scrape(gw.httpUrl)
    const mark = gw.stderr().length

    const small = await connect('size-small')
    await small.publishAsync('devices/size-small/telemetry/t', Buffer.alloc(900, 0x61), { qos: 1 })
    const big = await connect('size-big')
    const closed = new Promise<void>((resolve) => big.once('close', () => resolve()))
    void big.publishAsync('devices/size-big/telemetry/t', Buffer.alloc(1100, 0x62), { qos: 1 }).catch(() => {})
    expect(await Promise.race([closed.then(() => 'closed'), sleep(5000).then(() => 'open')])).toBe('closed')

    expect(await waitUntil(() => got.length === 1, 3000)).toBe(true)
    // The refusal is counted when the gateway drops the oversized packet, before anything of it could be delivered.
    const refused = (samples: typeof before): number => total(samples, REFUSED_CONN, { reason: 'packet-too-large' })
    let after = before
    expect(await waitUntil(async () => refused(after = await scrape(gw.httpUrl)) > refused(before), 3000)).toBe(true)
    expect(got.map((m) => m.length), 'only the small message is delivered').toEqual([900])
    expect(total(after, INGEST) - total(before, INGEST)).toBe(1)
    expect(total(after, REFUSED_CONN, { reason: 'packet-too-large' }) - total(before, REFUSED_CONN, { reason: 'packet-too-large' })).toBe(1)
    const lines = logLines(gw.stderr().slice(mark)).map((l) => JSON.stringify(l))
    expect(lines, 'the refusal is logged once').toHaveLength(1)
    expect(lines[0]).toContain('size-big')
  })

  it('serves a client pipelining 300 QoS 1 and 100 QoS 2 publishes with maxInflightPerClient 4: every ack, in order', async () => {
    const sub = await connect('pipe-sub')
    const got = collect(sub)
    await sub.subscribeAsync('devices/pipe/telemetry/#', { qos: 1 })
    const before = await scrape(gw.httpUrl)
    const pub = await connect('pipe')

    const q1 = await pipeline(pub, 'devices/pipe/telemetry/q1', 300, 1, 30_000)
    expect(q1.acked, 'PUBACKs in the order of the PUBLISHes [MQTT-4.6.0-2]').toEqual(range(300))
    const q2 = await pipeline(pub, 'devices/pipe/telemetry/q2', 100, 2, 30_000)
    expect(q2.acked.length).toBe(100)

    expect(await waitUntil(() => got.length >= 400, 10_000), `delivered ${got.length}/400`).toBe(true)
    expect(got, 'delivered in order').toEqual([...range(300), ...range(100)].map(String))
    const after = await scrape(gw.httpUrl)
    expect(total(after, INGEST) - total(before, INGEST)).toBe(400)
    expect(total(after, REFUSED_CONN) - total(before, REFUSED_CONN)).toBe(0)
    for (const c of clients.splice(0)) await c.endAsync()

    expect(await gw.stop()).toBe(0)
    const logged = (await readWholeLog(dataDir)).filter((r) => r.clientId === 'pipe').sort((a, b) => a.offset - b.offset)
    expect(logged.map((r) => `${r.topic.split('/').at(-1) ?? ''}:${Buffer.from(r.payload).toString()}`), 'the log holds each message once, in order')
      .toEqual([...range(300).map((i) => `q1:${i}`), ...range(100).map((i) => `q2:${i}`)])
  })
})

describe('limits: publishRatePerClient', () => {
  const RATE = 50
  const BURST = 150
  let gw: GatewayProcess
  let cleanup: () => Promise<void>
  const clients: MqttClient[] = []

  beforeAll(async () => {
    ({ gw, cleanup } = await startWith({ publishRatePerClient: RATE }))
  })

  afterAll(async () => {
    for (const c of clients) c.end(true)
    await gw?.kill()
    await cleanup?.()
  })

  it(`slows a client sending ${BURST} publishes at once to about ${RATE}/s, loses nothing, and does not slow its neighbour`, async () => {
    const fast = await mqtt.connectAsync(gw.mqttUrl, options('rate-fast'))
    const calm = await mqtt.connectAsync(gw.mqttUrl, options('rate-calm'))
    clients.push(fast, calm)
    const before = await scrape(gw.httpUrl)
    const mark = gw.stderr().length

    const fastAcked: number[] = []
    const fastRun = pipeline(fast, 'devices/rate-fast/telemetry/t', BURST, 1, 60_000, fastAcked)
    // The fast client has used up its full bucket, so it is being held back now.
    expect(await waitUntil(() => fastAcked.length >= RATE, 30_000)).toBe(true)
    const calmRun = await pipeline(calm, 'devices/rate-calm/telemetry/t', 10, 1, 30_000)
    const fastDone = await fastRun

    // A full bucket lets RATE through at once; the rest comes at RATE per second: (BURST - RATE) / RATE = 2 s.
    const expectedMs = ((BURST - RATE) / RATE) * 1000
    expect(fastDone.elapsedMs, 'the fast client was slowed down').toBeGreaterThan(expectedMs * 0.6)
    expect(fastDone.elapsedMs, 'but not stopped').toBeLessThan(expectedMs * 5)
    expect(fastDone.acked).toEqual(range(BURST))
    expect(calmRun.elapsedMs, 'the neighbour is not slowed (its own bucket is full)').toBeLessThan(expectedMs / 2)

    const after = await scrape(gw.httpUrl)
    expect(total(after, INGEST) - total(before, INGEST), 'nothing is dropped').toBe(BURST + 10)
    expect(total(after, REFUSED_PUB, { reason: 'rate-limited' }) - total(before, REFUSED_PUB, { reason: 'rate-limited' }), 'counted once per slowed client')
      .toBe(1)
    const lines = logLines(gw.stderr().slice(mark)).map((l) => JSON.stringify(l))
    expect(lines, 'logged once').toHaveLength(1)
    expect(lines[0], 'naming the client').toContain('rate-fast')
  })
})
