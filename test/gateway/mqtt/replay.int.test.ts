/**
 * MQTT replay end to end: `edgemq start` in a child process on a data
 * directory seeded with known records (timestamps one second apart, appended
 * in groups so the log has many batches of different sizes), real MQTT.js
 * clients and mosquitto_sub.
 *
 * - replay by offset and by time returns exactly the expected records, in
 *   order, across store batches and the replay's read chunks;
 * - `..live` goes on after the `$done` marker until UNSUBSCRIBE;
 * - bad ranges, wildcard abuse, other tenants' topics, ACL denials and the
 *   limits each get their clear outcome (SUBACK 0x80, a log line with the
 *   code, a counted metric) while other clients carry on;
 * - a `$replay` subscription is not stored in a persistent session;
 * - 100 k records replayed to a slow QoS 1 subscriber (and to a QoS 0 one
 *   that stops reading) arrive complete and in order while the gateway's
 *   memory stays bounded.
 */
import { spawn, spawnSync } from 'node:child_process'
import net from 'node:net'
import path from 'node:path'
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt'
import mqttPacket, { type Packet } from 'mqtt-packet'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../../gateway/access/auth.ts'
import { openLogStore, type LogStore } from '../../../store/index.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { collect, endAll, metricValue, roundTrip, sleep, subscribeGranted, waitFor } from '../../helpers/mqtt-probe.ts'
import { rawConnect } from '../../helpers/raw-client.ts'

/** Seeded records are one second apart from here on. */
const BASE = Date.parse('2026-01-01T00:00:00Z')
const iso = (ms: number): string => new Date(ms).toISOString()

const STREAMS = { telemetry: { partitions: 8, retentionMs: 0 }, events: { partitions: 4, retentionMs: 0 }, commands: { partitions: 4, retentionMs: 0 } }

interface Seeded { readonly i: number, readonly partition: number, readonly offset: number, readonly topic: string, readonly payload: string, readonly timestamp: number }

/** Appends records `0..n-1` of `spec` in concurrent groups (so batches of many sizes), and returns where each landed. */
async function seed (store: LogStore, stream: string, n: number, spec: (i: number) => { key: string, topic: string, payload: string, timestamp: number }, group = 97): Promise<Seeded[]> {
  const out: Seeded[] = []
  for (let i = 0; i < n; i += group) {
    const ids = Array.from({ length: Math.min(group, n - i) }, (_, k) => i + k)
    const results = await Promise.all(ids.map((j) => {
      const r = spec(j)
      return store.append(stream, r.key, { payload: Buffer.from(r.payload), topic: r.topic, timestamp: r.timestamp, qos: 1, clientId: r.key })
    }))
    ids.forEach((j, k) => {
      const r = spec(j)
      const at = results[k] as { partition: number, offset: number }
      out.push({ i: j, partition: at.partition, offset: at.offset, topic: r.topic, payload: r.payload, timestamp: r.timestamp })
    })
  }
  return out
}

async function openSeedStore (dataDir: string, tenants: readonly string[]): Promise<LogStore> {
  const store = await openLogStore({ location: path.join(dataDir, 'db'), durability: 'async' })
  for (const tenant of tenants) for (const [name, s] of Object.entries(STREAMS)) await store.createStream(`${tenant}/${name}`, s)
  return store
}

interface Replayed { readonly records: Array<{ topic: string, payload: string, retain: boolean }>, readonly done: Record<string, unknown> }

/** Subscribes to a `$replay/...` filter and collects what arrives for it until its `$done` marker. */
async function replay (client: MqttClient, subscription: string, qos: 0 | 1 = 1, timeoutMs = 20_000): Promise<Replayed> {
  const prefix = subscription.split('/').slice(0, 2).join('/') + '/'
  const records: Array<{ topic: string, payload: string, retain: boolean }> = []
  let done: Record<string, unknown> | undefined
  const onMessage = (topic: string, payload: Buffer, packet: { retain: boolean }): void => {
    if (!topic.startsWith(prefix) || done !== undefined) return
    if (topic === `${prefix}$done`) done = JSON.parse(payload.toString()) as Record<string, unknown>
    else records.push({ topic, payload: payload.toString(), retain: packet.retain })
  }
  client.on('message', onMessage)
  try {
    expect(await subscribeGranted(client, subscription, qos)).toEqual([qos])
    expect(await waitFor(() => done !== undefined, timeoutMs), `the $done marker of ${subscription}`).toBe(true)
    return { records, done: done as Record<string, unknown> }
  } finally {
    client.off('message', onMessage)
  }
}

const haveMosquittoSub = spawnSync('mosquitto_sub', ['--help'], { stdio: 'ignore' }).error === undefined
/** Without mosquitto_sub its test is skipped, except under CI=true, where it fails (.ci/run installs mosquitto-clients). */
const withMosquittoSub = haveMosquittoSub || process.env.CI === 'true' ? it : it.skip

/** Runs mosquitto_sub to completion (bounded by -W); its exit code and stdout lines. */
function mosquittoSub (args: readonly string[]): Promise<{ code: number | null, lines: string[] }> {
  if (!haveMosquittoSub) throw new Error('mosquitto_sub is not installed (apt-get install mosquitto-clients); .ci/run installs it')
  return new Promise((resolve, reject) => {
    const child = spawn('mosquitto_sub', ['-W', '60', ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stdout.on('data', (d: Buffer) => { out += d.toString() })
    child.stderr.on('data', (d: Buffer) => { err += d.toString() })
    child.on('error', reject)
    child.on('exit', (code) => {
      if (err !== '') process.stderr.write(`mosquitto_sub: ${err}`)
      resolve({ code, lines: out.split('\n').filter((l) => l !== '') })
    })
  })
}

/** The gateway's JSON log lines whose message starts with `msg`. */
function logLines (gw: GatewayProcess, msg: string): Array<Record<string, unknown>> {
  return gw.stderr().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((l) => typeof l.msg === 'string' && l.msg.startsWith(msg))
}

describe('MQTT replay', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess
  let telemetry: Seeded[]
  let events: Seeded[]
  let acme: Seeded[]

  const connect = async (options: IClientOptions = {}): Promise<MqttClient> => {
    const client = await mqtt.connectAsync(gw.mqttUrl, { protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000, ...options })
    clients.add(client)
    return client
  }
  const refused = (reason: string, tenant = 'default'): Promise<number> => metricValue(gw.httpUrl, 'edgemq_mqtt_subscriptions_refused_total', { tenant, reason })

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-replay-')
    cleanups.push(cleanup)
    const dataDir = path.join(dir, 'data')
    const store = await openSeedStore(dataDir, ['default', 'acme', 'globex'])
    // 8,000 telemetry records from ten devices: the busiest partitions hold two devices, 1,600 records, more than one read chunk.
    telemetry = await seed(store, 'default/telemetry', 8000, (i) => ({
      key: `dev-${i % 10}`, topic: `devices/dev-${i % 10}/telemetry/${i % 2 === 0 ? 'temp' : 'hum'}`, payload: `t${i}`, timestamp: BASE + i * 1000,
    }))
    events = await seed(store, 'default/events', 100, (i) => ({
      key: `dev-${i % 10}`, topic: `devices/dev-${i % 10}/events/boot`, payload: `e${i}`, timestamp: BASE + i * 1000 + 500,
    }))
    acme = await seed(store, 'acme/telemetry', 200, (i) => {
      const device = i % 10 === 0 ? 'secret' : `sensor-${i % 4}`
      return { key: device, topic: `devices/${device}/telemetry/t`, payload: `acme-${i}`, timestamp: BASE + i * 1000 }
    })
    await seed(store, 'globex/telemetry', 100, (i) => ({ key: `g-${i % 3}`, topic: `devices/g-${i % 3}/telemetry/t`, payload: `globex-${i}`, timestamp: BASE + i * 1000 }))
    await store.close()

    const hash = await hashPassword('pw', { N: 1024, r: 8, p: 1 })
    const config = await writeConfig(dir, {
      streams: STREAMS,
      users: [
        { username: 'acme-svc', tenant: 'acme', role: 'service', password: hash },
        { username: 'sensor-1', tenant: 'acme', role: 'device', password: hash },
        { username: 'globex-svc', tenant: 'globex', role: 'service', password: hash },
      ],
      acl: [{ username: 'acme-svc', topic: 'devices/secret/#', access: 'subscribe', allow: false }],
      mqtt: { listeners: [{ type: 'tcp', port: 0, allowAnonymous: true }], replay: { maxPerClient: 2 } },
    })
    gw = await startGatewayProcess({ dataDir, config })
    cleanups.push(async () => { await gw.stop() })
  }, 120_000)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('replays an offset range exactly, in offset order, across batches and read chunks, with RETAIN and then the $done marker', async () => {
    // The partition with the most records, and a device in it; the range spans more than one read chunk (1,000).
    const counts = new Map<number, number>()
    for (const r of telemetry) counts.set(r.partition, (counts.get(r.partition) ?? 0) + 1)
    const partition = [...counts.entries()].sort((a, b) => b[1] - a[1])[0]?.[0] as number
    const size = counts.get(partition) as number
    expect(size).toBeGreaterThan(1200)
    const device = (telemetry.find((r) => r.partition === partition) as Seeded).topic.split('/')[1] as string
    const from = 37
    const to = size - 41
    const expected = telemetry.filter((r) => r.partition === partition && r.offset >= from && r.offset < to && r.topic.startsWith(`devices/${device}/`))
      .sort((a, b) => a.offset - b.offset)
    expect(expected.length).toBeGreaterThan(500)

    const client = await connect()
    const range = `${from}..${to}`
    const got = await replay(client, `$replay/${range}/devices/${device}/telemetry/#`)
    expect(got.records.map((r) => `${r.topic} ${r.payload}`)).toEqual(expected.map((r) => `$replay/${range}/${r.topic} ${r.payload}`))
    expect(got.records.every((r) => r.retain)).toBe(true)
    expect(got.done).toEqual({
      replay: `$replay/${range}/devices/${device}/telemetry/#`, records: expected.length, live: false,
      partitions: [{ stream: 'telemetry', partition, from, to }],
    })
    await client.endAsync()
  })

  withMosquittoSub('replays a time range with mosquitto_sub --retained-only, which exits at the end of the history', async () => {
    const from = BASE + 1234 * 1000
    const to = BASE + 5678 * 1000
    const range = `${iso(from)}..${iso(to)}`
    const { port } = new URL(gw.mqttUrl)
    const out = await mosquittoSub(['-h', '127.0.0.1', '-p', port, '-q', '1', '-v', '--retained-only', '-t', `$replay/${range}/devices/+/telemetry/#`])
    expect(out.code).toBe(0)
    // Merged across the eight partitions by timestamp: exactly records 1234..5677, in the order they were received.
    const expected = telemetry.filter((r) => r.timestamp >= from && r.timestamp < to).sort((a, b) => a.timestamp - b.timestamp)
    expect(expected).toHaveLength(5678 - 1234)
    expect(out.lines).toEqual(expected.map((r) => `$replay/${range}/${r.topic} ${r.payload}`))
  })

  it('replays everything by timestamp across streams, then goes on live until UNSUBSCRIBE', async () => {
    const client = await connect()
    const publisher = await connect({ clientId: 'dev-5' })
    const range = `${iso(BASE + 7990 * 1000)}..live`
    const filter = `$replay/${range}/devices/dev-5/#`
    const live: string[] = []
    client.on('message', (topic, payload, packet) => { if (topic.startsWith(`$replay/${range}/`) && !packet.retain) live.push(`${topic} ${payload.toString()}`) })
    const got = await replay(client, filter)
    // Telemetry 7995 and the one event of dev-5 after the start, merged by timestamp.
    const expected = [...telemetry, ...events].filter((r) => r.timestamp >= BASE + 7990 * 1000 && r.topic.startsWith('devices/dev-5/'))
      .sort((a, b) => a.timestamp - b.timestamp)
    expect(got.records.map((r) => r.payload)).toEqual(expected.map((r) => r.payload))
    expect(got.done).toMatchObject({ records: expected.length, live: true })

    await publisher.publishAsync('devices/dev-5/telemetry/temp', 'live-1', { qos: 1 })
    await publisher.publishAsync('devices/dev-5/events/door', 'live-2', { qos: 1 })
    await publisher.publishAsync('devices/dev-6/telemetry/temp', 'not-dev-5', { qos: 1 })
    expect(await waitFor(() => live.length >= 3, 5000)).toBe(true)
    expect(live).toEqual([
      expect.stringMatching(/\/\$done /) as unknown as string,
      `$replay/${range}/devices/dev-5/telemetry/temp live-1`,
      `$replay/${range}/devices/dev-5/events/door live-2`,
    ])

    await client.unsubscribeAsync(filter)
    await client.subscribeAsync('marker/#', { qos: 1 })
    const markers = collect(client)
    await publisher.publishAsync('devices/dev-5/telemetry/temp', 'after-unsubscribe', { qos: 1 })
    expect(await waitFor(() => logLines(gw, 'replay ended').some((l) => l.replay === filter && l.outcome === 'cancelled'), 5000)).toBe(true)
    // The replay has ended; anything it wrote to this connection is ahead of a marker written after that.
    await publisher.publishAsync('marker/x', 'marker', { qos: 1 })
    expect(await waitFor(() => markers.some((m) => m.payload === 'marker'), 5000)).toBe(true)
    expect(live).toHaveLength(3)
    await endAll([client, publisher])
  })

  it('refuses bad ranges and filters with SUBACK 0x80, a log line and a metric; the connection and other clients carry on', async () => {
    const watcher = await connect({ clientId: 'watcher' })
    const watched = collect(watcher)
    await watcher.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    const publisher = await connect({ clientId: 'dev-7' })
    const client = await connect({ clientId: 'bad-replayer' })
    const before = { range: await refused('replay-bad-range'), filter: await refused('replay-bad-filter') }

    const bad: Array<[string, string]> = [
      ['$replay/yesterday/devices/#', 'GW_REPLAY_BAD_RANGE'],
      ['$replay/2026-01-01T02:00:00/devices/#', 'GW_REPLAY_BAD_RANGE'],
      ['$replay/10..5/devices/#', 'GW_REPLAY_BAD_RANGE'],
      ['$replay/earliest..latest/devices/#', 'GW_REPLAY_BAD_RANGE'],
      ['$replay/+/devices/#', 'GW_REPLAY_BAD_RANGE'],
      ['$replay/#', 'GW_REPLAY_BAD_RANGE'],
      ['$replay/+', 'GW_REPLAY_BAD_RANGE'],
      ['$replay/earliest', 'GW_REPLAY_BAD_FILTER'],
      ['$replay', 'GW_REPLAY_BAD_FILTER'],
      ['$replay/earliest/$replay/earliest/#', 'GW_REPLAY_BAD_FILTER'],
    ]
    let sent = 0
    for (const [filter] of bad) {
      expect(await subscribeGranted(client, filter, 1), filter).toEqual([128])
      await publisher.publishAsync('devices/dev-7/telemetry/temp', `during-${sent++}`, { qos: 1 })
    }
    // An invalid filter after the range (MQTT.js would not send it).
    // An invalid filter (MQTT.js would not send it) breaks [MQTT-4.7.1-2]: that connection is closed, as for any filter.
    const raw = await rawConnect(gw.mqttUrl)
    raw.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'bad-replayer-raw', clean: true, keepalive: 30 })
    await raw.next('connack')
    raw.send({ cmd: 'subscribe', messageId: 3, subscriptions: [{ topic: '$replay/earliest/devices/#/x', qos: 1 }] })
    await raw.closed
    // One SUBSCRIBE with good and bad filters: only the bad ones are refused, and the good one replays.
    const mixed = await subscribeGranted(client, ['$replay/nope/devices/#', 'devices/dev-7/#', '$replay/earliest..100/devices/dev-7/events/#'], 1)
    expect(mixed).toEqual([128, 1, 1])

    for (const [filter, code] of bad) {
      expect(logLines(gw, 'subscription refused').some((l) => l.filter === filter && l.code === code && l.clientId === 'bad-replayer'), filter).toBe(true)
    }
    expect(await refused('replay-bad-range')).toBe(before.range + 8)
    expect(await refused('replay-bad-filter')).toBe(before.filter + 3)
    expect(await waitFor(() => watched.filter((m) => m.payload.startsWith('during-')).length === sent, 5000)).toBe(true)

    // The same connection replays normally afterwards.
    const got = await replay(client, '$replay/earliest/devices/dev-7/events/#')
    expect(got.records.map((r) => r.payload)).toEqual(events.filter((r) => r.topic.startsWith('devices/dev-7/')).map((r) => r.payload))
    await endAll([watcher, publisher, client])
  })

  it('refuses a replay over the per-client limit, and counts it', async () => {
    const client = await connect({ clientId: 'greedy' })
    const before = await refused('replay-limit')
    expect(await subscribeGranted(client, ['$replay/latest..live/devices/a/#', '$replay/latest..live/devices/b/#', '$replay/latest..live/devices/c/#'], 1)).toEqual([1, 1, 128])
    expect(await refused('replay-limit')).toBe(before + 1)
    expect(logLines(gw, 'subscription refused').some((l) => l.code === 'GW_REPLAY_LIMIT' && l.clientId === 'greedy')).toBe(true)
    // Ending one frees its slot.
    await client.unsubscribeAsync('$replay/latest..live/devices/a/#')
    expect(await waitFor(() => logLines(gw, 'replay ended').some((l) => l.replay === '$replay/latest..live/devices/a/#' && l.clientId === 'greedy'), 5000)).toBe(true)
    expect(await subscribeGranted(client, '$replay/latest..live/devices/c/#', 1)).toEqual([1])
    await client.endAsync()
  })

  it('keeps tenants apart and applies the ACL to the filter and to every record', async () => {
    const globex = await connect({ username: 'globex-svc', password: 'pw', clientId: 'globex-backend' })
    const all = await replay(globex, '$replay/earliest/#')
    expect(all.records.map((r) => r.payload)).toEqual(Array.from({ length: 100 }, (_, i) => `globex-${i}`))
    // Naming acme's topics stays inside globex's topic space: granted, and empty.
    const named = await replay(globex, '$replay/earliest/acme/#')
    expect(named.records).toEqual([])
    expect(named.done).toMatchObject({ records: 0, partitions: [] })

    const service = await connect({ username: 'acme-svc', password: 'pw', clientId: 'acme-backend' })
    const before = await refused('acl-denied', 'acme')
    expect(await subscribeGranted(service, '$replay/earliest/devices/secret/#', 1)).toEqual([128])
    const visible = await replay(service, '$replay/earliest/devices/+/telemetry/#')
    expect(visible.records.map((r) => r.payload)).toEqual(acme.filter((r) => !r.topic.startsWith('devices/secret/')).map((r) => r.payload))

    const device = await connect({ username: 'sensor-1', password: 'pw', clientId: 'sensor-1' })
    expect(await subscribeGranted(device, '$replay/earliest/devices/sensor-2/#', 1)).toEqual([128])
    expect(await subscribeGranted(device, '$replay/earliest/devices/+/telemetry/#', 1)).toEqual([128])
    const own = await replay(device, '$replay/earliest/devices/sensor-1/commands/#')
    expect(own.records).toEqual([])
    expect(await refused('acl-denied', 'acme')).toBe(before + 3)
    expect(logLines(gw, 'subscription refused').filter((l) => l.code === 'GW_REPLAY_DENIED' && l.tenant === 'acme')).toHaveLength(3)
    await endAll([globex, service, device])
  })

  it('does not let a client publish into the replay namespace', async () => {
    const client = await connect()
    const forger = await connect({ clientId: 'forger' })
    const range = 'latest..live'
    const live: string[] = []
    client.on('message', (topic, payload) => { if (topic.startsWith(`$replay/${range}/devices/`)) live.push(payload.toString()) })
    await replay(client, `$replay/${range}/devices/dev-1/#`)
    const before = await metricValue(gw.httpUrl, 'edgemq_mqtt_publishes_refused_total', { reason: 'reserved-topic' })
    await forger.publishAsync(`$replay/${range}/devices/dev-1/telemetry/temp`, 'forged', { qos: 1 }) // acknowledged, dropped
    await forger.publishAsync('devices/dev-1/telemetry/temp', 'genuine', { qos: 1 })
    expect(await waitFor(() => live.includes('genuine'), 5000)).toBe(true)
    expect(live).toEqual(['genuine'])
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_publishes_refused_total', { reason: 'reserved-topic' })).toBe(before + 1)
    await endAll([client, forger])
  })

  it('does not store a $replay subscription in a persistent session, nor restart it at the next connect', async () => {
    const first = await connect({ clientId: 'svc-persistent', clean: false })
    const firstGot = collect(first)
    expect(await subscribeGranted(first, ['devices/+/events/#', '$replay/earliest/devices/dev-2/events/#'], 1)).toEqual([1, 1])
    expect(await waitFor(() => firstGot.some((m) => m.topic.endsWith('/$done')), 10_000)).toBe(true)
    expect(firstGot.filter((m) => m.topic.startsWith('$replay/'))).toHaveLength(11) // ten events and $done
    await first.endAsync()
    // Every replay the gateway starts is active until it finishes (and counted then).
    const replaysStarted = async (): Promise<number> =>
      await metricValue(gw.httpUrl, 'edgemq_mqtt_replays_active') + await metricValue(gw.httpUrl, 'edgemq_mqtt_replays_finished_total')
    expect(await waitFor(async () => await metricValue(gw.httpUrl, 'edgemq_mqtt_replays_active') === 0, 5000)).toBe(true)
    const startedBefore = await replaysStarted()

    const again = mqtt.connect(gw.mqttUrl, { protocolVersion: 4, reconnectPeriod: 0, clientId: 'svc-persistent', clean: false })
    clients.add(again)
    const got = collect(again)
    const connack = await new Promise<{ sessionPresent: boolean }>((resolve) => again.once('connect', resolve))
    expect(connack.sessionPresent).toBe(true)
    const publisher = await connect({ clientId: 'dev-2' })
    await publisher.publishAsync('devices/dev-2/events/boot', 'after-reconnect', { qos: 1 })
    expect(await waitFor(() => got.some((m) => m.payload === 'after-reconnect'), 5000)).toBe(true) // the live subscription is back
    // A restored subscription would start its replay while the CONNECT is handled, before the gateway reads the
    // next packet: after a round trip no replay has started, so none of its messages can come.
    await roundTrip(again)
    expect(await replaysStarted()).toBe(startedBefore)
    expect(got.filter((m) => m.topic.startsWith('$replay/'))).toEqual([])
    expect(logLines(gw, 'subscription refused').filter((l) => l.clientId === 'svc-persistent')).toEqual([])
    await endAll([again, publisher])
  })
})

/**
 * A QoS 1 subscriber on a raw socket that acknowledges at most `perTick`
 * messages every `tickMs` (oldest first), and records the most it ever had
 * unacknowledged and the sequence numbers it received.
 */
class SlowSubscriber {
  readonly seqs: number[] = []
  unacked: number[] = []
  maxUnacked = 0
  done: Record<string, unknown> | undefined
  readonly #socket: net.Socket
  readonly #timer: NodeJS.Timeout

  constructor (url: string, readonly subscription: string, qos: 0 | 1, perTick: number, tickMs: number) {
    const { hostname, port } = new URL(url)
    this.#socket = net.connect(Number(port), hostname)
    this.#socket.on('error', () => {})
    const parser = mqttPacket.parser({ protocolVersion: 4 })
    parser.on('packet', (p: Packet) => {
      if (p.cmd === 'connack') this.#socket.write(mqttPacket.generate({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: subscription, qos }] }))
      if (p.cmd !== 'publish') return
      if (p.qos === 1) {
        this.unacked.push(p.messageId as number)
        this.maxUnacked = Math.max(this.maxUnacked, this.unacked.length)
      }
      if (p.topic.endsWith('/$done')) this.done = JSON.parse(String(p.payload)) as Record<string, unknown>
      else this.seqs.push(Number(String(p.payload).slice(0, 8)))
    })
    this.#socket.on('data', (d) => parser.parse(d))
    this.#socket.write(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: `slow-${qos}`, clean: true, keepalive: 0 }))
    this.#timer = setInterval(() => {
      const ids = this.unacked.splice(0, perTick)
      if (ids.length > 0) this.#socket.write(Buffer.concat(ids.map((messageId) => mqttPacket.generate({ cmd: 'puback', messageId }))))
    }, tickMs)
  }

  pause (): void { this.#socket.pause() }
  resume (): void { this.#socket.resume() }
  end (): void { clearInterval(this.#timer); this.#socket.destroy() }
}

describe('MQTT replay of 100 k records keeps the gateway\'s memory bounded', () => {
  const RECORDS = 100_000
  /** 2 KB each: 200 MB of history. */
  const PAYLOAD_BYTES = 2000
  const INFLIGHT = 100
  const HISTORY_BYTES = RECORDS * PAYLOAD_BYTES
  /**
   * How much the lowest sample of the second half of a replay may lie above
   * the idle level: what the replay keeps (a read chunk per partition, a
   * window of packets) is a few MB; 13-19 MB were measured. A single sample also sees garbage
   * between two collections (V8 lets external memory grow by some 64 MB
   * before it collects), so no single sample may reach the size of the
   * history, and the low points between collections must stay near idle. A
   * gateway that buffered the history would hold 200 MB and more, and its
   * low points would climb.
   */
  const RETAINED_BOUND_BYTES = 48 * 1024 * 1024
  const cleanups: Array<() => Promise<void>> = []
  let gw: GatewayProcess

  /**
   * What the gateway's JavaScript holds: V8 heap plus external memory, where
   * every Buffer lives (records read from the log, packets written). A gateway
   * that buffered the history would hold it here. The process' RSS is not
   * used: LevelDB and the allocator keep native memory after a first read
   * through a large log (about 120 MB here, the same for the HTTP API, no
   * more for a log four times larger), which says nothing about buffering.
   */
  const held = async (): Promise<number> =>
    await metricValue(gw.httpUrl, 'nodejs_heap_size_used_bytes') + await metricValue(gw.httpUrl, 'nodejs_external_memory_bytes')
  /** Samples `held` every 200 ms until `until` resolves: the highest sample, and the lowest of the second half. */
  const sampleWhile = async (until: Promise<unknown>): Promise<{ peak: number, floor: number }> => {
    const samples = [await held()]
    let over = false
    void until.finally(() => { over = true })
    while (!over) {
      await sleep(200)
      samples.push(await held())
    }
    return { peak: Math.max(...samples), floor: Math.min(...samples.slice(Math.floor(samples.length / 2))) }
  }
  const expectBounded = (idle: number, sampled: { peak: number, floor: number }): void => {
    expect(sampled.peak - idle).toBeLessThan(HISTORY_BYTES)
    expect(sampled.floor - idle).toBeLessThan(RETAINED_BOUND_BYTES)
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-replay-mem-')
    cleanups.push(cleanup)
    const dataDir = path.join(dir, 'data')
    const store = await openSeedStore(dataDir, ['default'])
    const filler = 'x'.repeat(PAYLOAD_BYTES - 8)
    await seed(store, 'default/telemetry', RECORDS, (i) => ({
      key: `dev-${i % 16}`, topic: `devices/dev-${i % 16}/telemetry/t`, payload: `${String(i).padStart(8, '0')}${filler}`, timestamp: BASE + i,
    }), 2000)
    await store.close()
    const config = await writeConfig(dir, { streams: STREAMS, mqtt: { listeners: [{ type: 'tcp', port: 0 }], replay: { inflight: INFLIGHT } } })
    gw = await startGatewayProcess({ dataDir, config })
    cleanups.push(async () => { await gw.stop() })
  }, 120_000)
  afterAll(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  const expectComplete = (sub: SlowSubscriber): void => {
    expect(sub.done).toMatchObject({ records: RECORDS })
    expect(sub.seqs).toHaveLength(RECORDS)
    expect(sub.seqs.every((s, i) => s === i)).toBe(true) // every record, in receive order
  }

  it('a slow QoS 1 subscriber gets all of them in order, never more than mqtt.replay.inflight unacknowledged', async () => {
    // Warm up (code loaded, buffers allocated), then take the idle level.
    const warm = new SlowSubscriber(gw.mqttUrl, '$replay/99000/devices/+/telemetry/#', 1, 1000, 5)
    expect(await waitFor(() => warm.done !== undefined, 20_000)).toBe(true)
    warm.end()
    // The warm-up replay is gone (and what it held is released) once no replay is active.
    expect(await waitFor(async () => await metricValue(gw.httpUrl, 'edgemq_mqtt_replays_active') === 0, 10_000)).toBe(true)
    const idle = await held()

    // At most 100 acks every 10 ms: some 10 k records/s, a tenth of what the gateway can send.
    const sub = new SlowSubscriber(gw.mqttUrl, '$replay/earliest/devices/+/telemetry/#', 1, INFLIGHT, 10)
    const finished = waitFor(() => sub.done !== undefined, 90_000)
    const sampled = await sampleWhile(finished)
    expect(await finished).toBe(true)
    sub.end()
    expectComplete(sub)
    expect(sub.maxUnacked).toBeLessThanOrEqual(INFLIGHT)
    expectBounded(idle, sampled)
  }, 150_000)

  it('a QoS 0 subscriber that stops reading holds the replay back instead of filling the gateway\'s memory', async () => {
    const idle = await held()
    const sub = new SlowSubscriber(gw.mqttUrl, '$replay/earliest/devices/+/telemetry/#', 0, 0, 1000)
    expect(await waitFor(() => sub.seqs.length > 0, 10_000)).toBe(true)
    sub.pause()
    // Not reading for 3 s: the socket buffers fill and the replay waits for 'drain'.
    const sampled = await sampleWhile(sleep(3000))
    expect(sub.seqs.length).toBeLessThan(RECORDS)
    sub.resume()
    expect(await waitFor(() => sub.done !== undefined, 60_000)).toBe(true)
    sub.end()
    expectComplete(sub)
    // The pause starts right after the first message, before much garbage exists: what is held while waiting shows.
    expectBounded(idle, sampled)
  }, 120_000)
})
