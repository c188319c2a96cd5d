/**
 * MQTT replay without sockets: the `$replay/<range>/<filter>` grammar, which
 * partitions a filter reaches, the PUBLISH encoder against mqtt-packet's
 * parser, and the replay engine on a memory-level store with a fake
 * connection — merge order, QoS 1 pacing by PUBACK, socket backpressure,
 * per-record ACL, live continuation and every way a replay ends.
 */
import { Writable } from 'node:stream'
import { MemoryLevel } from 'memory-level'
import mqttPacket, { type IPublishPacket, type Packet } from 'mqtt-packet'
import { Registry } from 'prom-client'
import { afterEach, describe, expect, it } from 'vitest'
import type { Identity } from '../../../gateway/access/auth.ts'
import { buildConfig, type AclRule } from '../../../gateway/config/config.ts'
import { GatewayError } from '../../../gateway/errors.ts'
import { createMetrics } from '../../../gateway/metrics/metrics.ts'
import { isReplayTopic, MqttReplays, parseReplaySubscription, replayPartitions, type ReplayConnection } from '../../../gateway/mqtt/replay.ts'
import { NO_PROPERTIES, publishPacketSize, recordProperties, writePublishPacket } from '../../../gateway/mqtt/publish-frames.ts'
import { filtersOverlap } from '../../../gateway/access/topics.ts'
import { openLogStore, type LevelDatabase, type LogStore } from '../../../store/index.ts'
import { followRewinds, type ReaderMovedBack } from '../../../gateway/query/log-rewinds.ts'
import { entriesOf, RAW, replaceCopy, type Raw } from '../../store/follower-copy.ts'

const NOW = Date.parse('2026-11-24T12:00:00Z')
const codeOf = (f: () => unknown): string | undefined => {
  try { f() } catch (err) { return (err as GatewayError).code }
  return undefined
}

describe('parseReplaySubscription', () => {
  it.each([
    ['$replay/earliest/devices/+/telemetry/#', { kind: 'earliest' }, { kind: 'snapshot' }, 'devices/+/telemetry/#'],
    ['$replay/latest..live/#', { kind: 'latest' }, { kind: 'live' }, '#'],
    ['$replay/1200/devices/dev-42/#', { kind: 'offset', offset: 1200 }, { kind: 'snapshot' }, 'devices/dev-42/#'],
    ['$replay/100..250/a', { kind: 'offset', offset: 100 }, { kind: 'offset', offset: 250 }, 'a'],
    ['$replay/2026-11-24T02:00:00Z..2026-11-24T03:00:00Z/devices/dev-42/#',
      { kind: 'time', timestamp: Date.parse('2026-11-24T02:00:00Z') }, { kind: 'time', timestamp: Date.parse('2026-11-24T03:00:00Z') }, 'devices/dev-42/#'],
    ['$replay/2026-11-24/x/y', { kind: 'time', timestamp: Date.parse('2026-11-24T00:00:00Z') }, { kind: 'snapshot' }, 'x/y'],
    ['$replay/-15m..live/+/x', { kind: 'time', timestamp: NOW - 15 * 60_000 }, { kind: 'live' }, '+/x'],
    ['$replay/@1764000000000..now/x', { kind: 'time', timestamp: 1764000000000 }, { kind: 'time', timestamp: NOW }, 'x'],
    ['$replay/-2h..500/x', { kind: 'time', timestamp: NOW - 7_200_000 }, { kind: 'offset', offset: 500 }, 'x'],
    ['$replay/7..7/x', { kind: 'offset', offset: 7 }, { kind: 'offset', offset: 7 }, 'x'],
  ])('%s', (subscription, start, end, filter) => {
    const range = subscription.split('/')[1]
    expect(parseReplaySubscription(subscription, NOW)).toEqual({ subscription, range, start, end, filter })
  })

  it.each([
    ['$replay', 'GW_REPLAY_BAD_FILTER'],
    ['$replay/earliest', 'GW_REPLAY_BAD_FILTER'],
    ['$replay/earliest/', 'GW_REPLAY_BAD_FILTER'],
    ['$replay/earliest/a/#/b', 'GW_REPLAY_BAD_FILTER'],
    ['$replay/earliest/a+/b', 'GW_REPLAY_BAD_FILTER'],
    ['$replay/earliest/$replay/earliest/x', 'GW_REPLAY_BAD_FILTER'],
    ['$replay/#', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/+/devices/#', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/+', 'GW_REPLAY_BAD_RANGE'],
    ['$replay//x', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/yesterday/x', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/2026-11-24T02:00:00/x', 'GW_REPLAY_BAD_RANGE'], // a date-time without a zone
    ['$replay/1714528800000000000/x', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/earliest../x', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/..live/x', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/earliest..latest/x', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/earliest..earliest/x', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/live/x', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/10..5/x', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/-1h..-2h/x', 'GW_REPLAY_BAD_RANGE'],
    ['$replay/1..2..3/x', 'GW_REPLAY_BAD_RANGE'],
  ])('%s is refused with %s', (subscription, code) => {
    expect(codeOf(() => parseReplaySubscription(subscription, NOW))).toBe(code)
  })

  it('names the subscription and the syntax in its messages', () => {
    expect(() => parseReplaySubscription('$replay/yesterday/x', NOW)).toThrow(/"\$replay\/yesterday\/x".*expected \$replay\/<range>\/<topic filter>/)
  })

  it('knows the replay namespace', () => {
    expect(['$replay', '$replay/x', '$replay/earliest/a'].map(isReplayTopic)).toEqual([true, true, true])
    expect(['$replayx/a', 'replay/a', 'a/$replay/b', '$SYS/x'].map(isReplayTopic)).toEqual([false, false, false, false])
  })
})

describe('filtersOverlap', () => {
  it.each([
    ['devices/+/telemetry/#', 'devices/dev-42/#', true], ['devices/+/telemetry/#', 'devices/+/events/#', false],
    ['devices/+/telemetry/#', '#', true], ['devices/+/telemetry/#', 'devices/dev-1/telemetry', true],
    ['devices/+/telemetry/#', 'devices/dev-1', false], ['a/#', 'a', true], ['a', 'a/#', true], ['a', 'a/+', false],
    ['a/b', 'a/b', true], ['a/b', 'a/c', false], ['+/+', 'a/b/c', false], ['+/+/#', 'a', false], ['x/+', '+/y', true],
  ])('%s and %s: %s', (a, b, expected) => {
    expect(filtersOverlap(a, b)).toBe(expected)
    expect(filtersOverlap(b, a)).toBe(expected)
  })
})

describe('replayPartitions', () => {
  const routes = buildConfig({}).routes
  const store = {
    listStreams: () => ['acme/telemetry', 'acme/events', 'acme/commands', 'globex/telemetry'].map((name) => ({ name, partitions: name.endsWith('telemetry') ? 4 : 2, retentionMs: 0, retentionBytes: 0 })),
    partitionFor: (stream: string, key: string) => (key === 'dev-42' ? (stream.endsWith('telemetry') ? 3 : 1) : 0),
  }
  const of = (filter: string): string[] => replayPartitions(routes, 'acme', filter, store).map((p) => `${p.stream}:${p.partition}`)

  it('reads only the partition of a device the filter names', () => {
    expect(of('devices/dev-42/telemetry/#')).toEqual(['acme/telemetry:3'])
    expect(of('devices/dev-42/#')).toEqual(['acme/commands:1', 'acme/events:1', 'acme/telemetry:3'])
  })

  it('reads every partition of the streams whose routes the filter can match, of the tenant only', () => {
    expect(of('devices/+/telemetry/#')).toEqual(['acme/telemetry:0', 'acme/telemetry:1', 'acme/telemetry:2', 'acme/telemetry:3'])
    expect(of('#')).toHaveLength(8)
    expect(of('+/+/events/boot')).toEqual(['acme/events:0', 'acme/events:1'])
  })

  it('reads nothing for topics no route logs', () => {
    expect(of('alarms/#')).toEqual([])
    expect(of('devices')).toEqual([])
    expect(replayPartitions(routes, 'initech', '#', store)).toEqual([])
  })
})

describe('the PUBLISH encoder', () => {
  it.each([
    [0, 0, false], [1, 10, true], [1, 200, false], [1, 20_000, true], [0, 3_000_000, true],
  ] as const)('QoS %i with a %i-byte payload (retain %s) parses back with mqtt-packet', (qos, size, retain) => {
    const topic = Buffer.from('$replay/earliest/devices/dév-42/telemetry/t')
    const payload = Buffer.alloc(size, 7)
    const out = Buffer.alloc(publishPacketSize(topic, payload, qos) + 1)
    expect(writePublishPacket(out, 1, topic, payload, qos, 4242, retain)).toBe(out.length)
    const parsed = parse(out.subarray(1))
    expect(parsed).toHaveLength(1)
    const p = parsed[0] as IPublishPacket
    expect([p.cmd, p.qos, p.retain, p.dup, p.topic, Buffer.compare(p.payload as Buffer, payload)]).toEqual(['publish', qos, retain, false, topic.toString(), 0])
    expect(p.messageId).toBe(qos === 1 ? 4242 : undefined)
  })

  it.each([
    [0, 0], [1, 10], [1, 20_000], [0, 3_000_000],
  ] as const)('frames MQTT 5 (QoS %i, %i-byte payload) with the record\'s partition, offset and time as user properties', (qos, size) => {
    const topic = Buffer.from('$replay/earliest/devices/dév-42/telemetry/t')
    const payload = Buffer.alloc(size, 7)
    const properties = recordProperties(3, { offset: 123_456_789_012, timestamp: 1_764_633_600_000 }, 1_764_633_600_000)
    const out = Buffer.alloc(publishPacketSize(topic, payload, qos, properties) + publishPacketSize(topic, payload, qos, NO_PROPERTIES))
    const at = writePublishPacket(out, 0, topic, payload, qos, 4242, true, properties)
    expect(writePublishPacket(out, at, topic, payload, qos, 4243, false, NO_PROPERTIES)).toBe(out.length)
    const [p, q] = parse(out, 5) as IPublishPacket[]
    expect([p?.topic, p?.qos, p?.retain, Buffer.compare(p?.payload as Buffer, payload)]).toEqual([topic.toString(), qos, true, 0])
    expect(p?.properties?.userProperties).toEqual({ 'edgemq-partition': '3', 'edgemq-offset': '123456789012', 'edgemq-timestamp': '1764633600000' })
    expect([q?.messageId, q?.properties, Buffer.compare(q?.payload as Buffer, payload)]).toEqual([qos === 1 ? 4243 : undefined, undefined, 0])
  })

  it('frames an expiring record\'s Message Expiry Interval as the seconds it has left [MQTT-3.3.2-6], at least 1', () => {
    const topic = Buffer.from('$replay/earliest/devices/d/telemetry/t')
    const record = { offset: 7, timestamp: 1_764_633_600_000, headers: { 'mqtt-message-expiry': '60' } }
    const left = (now: number): number | undefined => {
      const properties = recordProperties(0, record, now)
      const out = Buffer.alloc(publishPacketSize(topic, Buffer.alloc(0), 1, properties))
      writePublishPacket(out, 0, topic, Buffer.alloc(0), 1, 1, true, properties)
      return (parse(out, 5)[0] as IPublishPacket).properties?.messageExpiryInterval
    }
    expect([left(record.timestamp), left(record.timestamp + 15_000), left(record.timestamp + 59_500)]).toEqual([60, 45, 1])
    expect((parse(recordPropertiesPacket(topic), 5)[0] as IPublishPacket).properties?.messageExpiryInterval).toBeUndefined()
  })

  it.each([1, 127, 128, 16_384, 268_435_455])('frames a shared record\'s Subscription Identifier %i (a variable byte integer) beside its properties', (id) => {
    const topic = Buffer.from('devices/d/telemetry/t')
    const record = { offset: 9, timestamp: 1_764_633_600_000, headers: { 'mqtt-content-type': 'text/plain', 'mqtt-user-properties': '{"k":"v"}' } }
    const properties = recordProperties(2, record, record.timestamp, { subscriptionIds: [id] })
    const out = Buffer.alloc(publishPacketSize(topic, Buffer.from('x'), 1, properties))
    writePublishPacket(out, 0, topic, Buffer.from('x'), 1, 5, false, properties)
    const p = parse(out, 5)[0] as IPublishPacket
    expect(p.properties?.subscriptionIdentifier).toBe(id)
    expect(p.properties?.contentType).toBe('text/plain')
    expect(p.properties?.userProperties).toMatchObject({ k: 'v', 'edgemq-offset': '9' })
    expect(String(p.payload)).toBe('x')
  })
})

/** A replayed record without headers, framed for MQTT 5. */
function recordPropertiesPacket (topic: Buffer): Buffer {
  const properties = recordProperties(0, { offset: 1, timestamp: 1 }, 2)
  const out = Buffer.alloc(publishPacketSize(topic, Buffer.alloc(0), 0, properties))
  writePublishPacket(out, 0, topic, Buffer.alloc(0), 0, 0, true, properties)
  return out
}

function parse (bytes: Buffer, protocolVersion: 4 | 5 = 4): Packet[] {
  const parser = mqttPacket.parser({ protocolVersion })
  const out: Packet[] = []
  parser.on('packet', (p: Packet) => out.push(p))
  parser.on('error', (err: Error) => { throw err })
  parser.parse(bytes)
  return out
}

/** A client connection: the gateway writes into `stream`; `ack` sends PUBACKs back through `replays.acked`. */
class FakeClient implements ReplayConnection {
  readonly received: IPublishPacket[] = []
  /** Packet ids received and not acknowledged yet. */
  readonly unacked: number[] = []
  maxUnacked = 0
  closed = false
  #id = 1
  readonly #parser = mqttPacket.parser({ protocolVersion: 4 })
  readonly stream: Writable
  #replays: MqttReplays | undefined
  #held: Array<() => void> = []
  /** While true, writes are not completed: the stream fills up and write() returns false. */
  holdWrites = false

  constructor (readonly clientId = 'c1') {
    this.#parser.on('packet', (p: Packet) => {
      if (p.cmd !== 'publish') return
      this.received.push(p)
      if (p.qos === 1) {
        this.unacked.push(p.messageId as number)
        this.maxUnacked = Math.max(this.maxUnacked, this.unacked.length)
      }
    })
    this.stream = new Writable({
      highWaterMark: 16 * 1024,
      write: (chunk: Buffer, _enc, cb) => {
        this.#parser.parse(chunk)
        if (this.holdWrites) this.#held.push(() => cb())
        else cb()
      },
    })
  }

  attach (replays: MqttReplays): this { this.#replays = replays; return this }
  nextMessageId (): number { const id = this.#id; this.#id = id >= 65535 ? 1 : id + 1; return id }
  releaseWrites (): void { this.holdWrites = false; for (const cb of this.#held.splice(0)) cb() }

  /** Acknowledges the oldest `n` unacknowledged messages (all by default). */
  ack (n = this.unacked.length): void {
    for (const id of this.unacked.splice(0, n)) expect(this.#replays?.acked(this, id)).toBe(true)
  }

  payloads (): string[] { return this.received.map((p) => String(p.payload)) }
  done (): Record<string, unknown> | undefined {
    const marker = this.received.find((p) => p.topic.endsWith('/$done'))
    return marker === undefined ? undefined : JSON.parse(String(marker.payload)) as Record<string, unknown>
  }

  close (): void { this.closed = true; this.stream.destroy() }
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve))
async function until (check: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 2))
  }
}
/** Acknowledges whatever arrives until the done marker is in. */
async function ackUntilDone (client: FakeClient): Promise<void> {
  await until(() => { client.ack(); return client.done() !== undefined }, 'the done marker')
}

describe('MqttReplays', () => {
  const service: Identity = { tenant: 'acme', role: 'service', username: 'svc', clientId: 'c1' }
  let store: LogStore
  let registry: Registry
  let replays: MqttReplays
  const logs: string[] = []

  afterEach(async () => { await store?.close() })

  async function setup (options: { inflight?: number, maxPerClient?: number, maxActive?: number, acl?: AclRule[] } = {}): Promise<void> {
    store = await openLogStore({ db: new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase })
    await store.createStream('acme/telemetry', { partitions: 4 })
    await store.createStream('acme/events', { partitions: 2 })
    await store.createStream('globex/telemetry', { partitions: 4 })
    registry = new Registry()
    const metrics = createMetrics(registry, { store, diskFreeBytes: () => undefined, diskSizeBytes: () => undefined, healthy: () => true, version: 't', gatewayId: 't' })
    logs.length = 0
    const logger = { info: (_f: Record<string, unknown>, m: string) => { logs.push(m) }, warn: (_f: Record<string, unknown>, m: string) => { logs.push(m) } }
    replays = new MqttReplays({
      store, routes: buildConfig({}).routes, acl: options.acl ?? [], logger, metrics, clock: { now: () => NOW },
      limits: { inflight: options.inflight ?? 100, maxPerClient: options.maxPerClient ?? 4, maxActive: options.maxActive ?? 64 },
    })
  }

  /** `n` records from devices d0..d(devices-1), timestamps NOW - n + i, so the merged order is i; appended in groups of 50 (many batches). */
  async function seed (n: number, devices = 7, tenant = 'acme', topic = (i: number) => `devices/d${i % devices}/telemetry/t`): Promise<void> {
    for (let i = 0; i < n; i += 50) {
      await Promise.all(Array.from({ length: Math.min(50, n - i) }, (_, k) => {
        const j = i + k
        return store.append(`${tenant}/telemetry`, `d${j % devices}`, { payload: Buffer.from(`m${j}`), topic: topic(j), timestamp: NOW - n + j })
      }))
    }
  }

  function start (client: FakeClient, subscription: string, qos = 1, who: Identity = service): void {
    const ticket = replays.prepare(client, who, subscription)
    replays.start(client, ticket, `${who.tenant}/${subscription}`, qos)
  }

  async function metric (name: string, labels: Record<string, string>): Promise<number> {
    const m = await registry.getSingleMetric(name)?.get()
    return m?.values.filter((v) => Object.entries(labels).every(([k, x]) => v.labels[k] === x)).reduce((a, v) => a + v.value, 0) ?? 0
  }

  it('replays every partition merged by timestamp, in chunks and batches, then the done marker', async () => {
    await setup({ inflight: 64 })
    await seed(2345)
    const client = new FakeClient().attach(replays)
    start(client, '$replay/earliest/devices/+/telemetry/#')
    await ackUntilDone(client)
    const records = client.received.slice(0, -1)
    expect(records.map((p) => String(p.payload))).toEqual(Array.from({ length: 2345 }, (_, i) => `m${i}`))
    expect(records.every((p) => p.topic.startsWith('$replay/earliest/devices/d') && p.qos === 1 && p.retain)).toBe(true)
    expect(client.received.at(-1)?.topic).toBe('$replay/earliest/$done')
    expect(client.received.at(-1)?.retain).toBe(false)
    const done = client.done() as { records: number, live: boolean, partitions: Array<{ stream: string, to: number }> }
    expect(done.records).toBe(2345)
    expect(done.live).toBe(false)
    expect(done.partitions.map((p) => p.stream)).toEqual(['telemetry', 'telemetry', 'telemetry', 'telemetry'])
    expect(done.partitions.reduce((a, p) => a + p.to, 0)).toBe(2345)
    expect(client.maxUnacked).toBeLessThanOrEqual(64)
    await until(() => replays.active === 0, 'the replay to end')
    expect(await metric('edgemq_mqtt_replay_messages_total', { tenant: 'acme' })).toBe(2345)
    expect(await metric('edgemq_mqtt_replays_finished_total', { tenant: 'acme', outcome: 'done' })).toBe(1)
    expect(await metric('edgemq_mqtt_replays_active', { tenant: 'acme' })).toBe(0)
  })

  it('skips records whose MQTT 5 message expiry passed, whole chunks of them too, delivers the rest, and counts each skip', async () => {
    await setup({ inflight: 64 })
    // One device (one partition): 1,200 records that expired 1 s before NOW (more than a chunk of 1,000), then 300 that last.
    for (let i = 0; i < 1500; i += 50) {
      await Promise.all(Array.from({ length: 50 }, (_, k) => store.append('acme/telemetry', 'd0', {
        payload: Buffer.from(`m${i + k}`), topic: 'devices/d0/telemetry/t', timestamp: NOW - 3000 + i + k,
        headers: { 'mqtt-message-expiry': i + k < 1200 ? '1' : '3600' },
      })))
    }
    const client = new FakeClient().attach(replays)
    start(client, '$replay/earliest/devices/d0/telemetry/#')
    await ackUntilDone(client)
    expect(client.payloads().slice(0, -1)).toEqual(Array.from({ length: 300 }, (_, i) => `m${1200 + i}`))
    expect((client.done() as { records: number }).records).toBe(300)
    expect(await metric('edgemq_mqtt_expired_dropped_total', { tenant: 'acme', path: 'replay' })).toBe(1200)
  })

  it('never has more than `inflight` messages unacknowledged, and goes on as PUBACKs come', async () => {
    await setup({ inflight: 10 })
    await seed(300)
    const client = new FakeClient().attach(replays)
    start(client, '$replay/earliest/#')
    await until(() => client.unacked.length === 10, 'a full window')
    for (let i = 0; i < 5; i++) await tick()
    expect(client.received).toHaveLength(10) // waits for acks
    client.ack(4)
    for (let i = 0; i < 5; i++) await tick()
    expect(client.received).toHaveLength(10) // 6 in flight: above half the window
    client.ack(1)
    await until(() => client.received.length === 15, 'the window refilled')
    await ackUntilDone(client)
    expect(client.maxUnacked).toBe(10)
    expect(client.payloads().slice(0, -1)).toEqual(Array.from({ length: 300 }, (_, i) => `m${i}`))
  })

  it('at QoS 0 sends without waiting for acks, paced by the socket', async () => {
    await setup()
    await seed(3000)
    const client = new FakeClient().attach(replays)
    client.holdWrites = true
    start(client, '$replay/earliest/#', 0)
    await until(() => client.received.length > 0, 'the first batch')
    for (let i = 0; i < 10; i++) await tick()
    const stalled = client.received.length
    expect(stalled).toBeLessThan(3000) // the socket is full: the replay waits for 'drain'
    client.releaseWrites()
    await until(() => client.done() !== undefined, 'the done marker')
    expect(client.received.every((p) => p.qos === 0)).toBe(true)
    expect(client.payloads().slice(0, -1)).toEqual(Array.from({ length: 3000 }, (_, i) => `m${i}`))
  })

  it('replays an offset range of one device\'s partition, and a time range', async () => {
    await setup()
    await seed(700)
    const p = store.partitionFor('acme/telemetry', 'd3')
    const { records } = await store.read('acme/telemetry', p, 0, { maxRecords: 10_000 })
    const byOffset = new FakeClient().attach(replays)
    start(byOffset, '$replay/20..90/devices/d3/telemetry/#')
    await ackUntilDone(byOffset)
    expect(byOffset.payloads().slice(0, -1)).toEqual(records.filter((r) => r.offset >= 20 && r.offset < 90 && r.key === 'd3').map((r) => Buffer.from(r.payload).toString()))
    expect(byOffset.received[0]?.topic).toBe('$replay/20..90/devices/d3/telemetry/t')
    expect((byOffset.done() as { partitions: unknown[] }).partitions).toEqual([{ stream: 'telemetry', partition: p, from: 20, to: 90 }])

    const byTime = new FakeClient('c2').attach(replays)
    start(byTime, `$replay/@${NOW - 700 + 123}..@${NOW - 700 + 456}/devices/+/telemetry/#`)
    await ackUntilDone(byTime)
    expect(byTime.payloads().slice(0, -1)).toEqual(Array.from({ length: 456 - 123 }, (_, i) => `m${123 + i}`))
  })

  it('clamps offsets into the log and replays nothing for a start at the end', async () => {
    await setup()
    await seed(40, 1)
    const client = new FakeClient().attach(replays)
    start(client, '$replay/35..1000/devices/d0/#')
    await ackUntilDone(client)
    expect(client.payloads().slice(0, -1)).toEqual(['m35', 'm36', 'm37', 'm38', 'm39'])
    const latest = new FakeClient('c2').attach(replays)
    start(latest, '$replay/latest/#')
    await ackUntilDone(latest)
    expect(latest.received).toHaveLength(1)
    expect(latest.done()).toMatchObject({ records: 0 })
  })

  it('leaves out records the ACL does not let the client read, and other tenants\' records', async () => {
    await setup({ acl: [{ username: 'svc', topic: 'devices/d2/#', access: 'subscribe', allow: false }] })
    await seed(100)
    await seed(50, 3, 'globex')
    const client = new FakeClient().attach(replays)
    start(client, '$replay/earliest/#')
    await ackUntilDone(client)
    const expected = Array.from({ length: 100 }, (_, i) => i).filter((i) => i % 7 !== 2).map((i) => `m${i}`)
    expect(client.payloads().slice(0, -1)).toEqual(expected)
    expect(codeOf(() => replays.prepare(new FakeClient('c3').attach(replays), service, '$replay/earliest/devices/d2/#'))).toBe('GW_REPLAY_DENIED')
    const device: Identity = { tenant: 'acme', role: 'device', username: 'd1', clientId: 'd1' }
    expect(codeOf(() => replays.prepare(new FakeClient('d1').attach(replays), device, '$replay/earliest/devices/d2/commands/#'))).toBe('GW_REPLAY_DENIED')
    expect(codeOf(() => replays.prepare(new FakeClient('d1').attach(replays), device, '$replay/earliest/devices/d1/commands/#'))).toBeUndefined()
  })

  it('continues live after the done marker, until unsubscribed', async () => {
    await setup()
    await seed(20, 2)
    const client = new FakeClient().attach(replays)
    start(client, '$replay/earliest..live/devices/d1/#')
    await ackUntilDone(client)
    expect(client.done()).toMatchObject({ records: 10, live: true })
    await store.append('acme/telemetry', 'd1', { payload: Buffer.from('live-1'), topic: 'devices/d1/telemetry/t' })
    await store.append('acme/telemetry', 'd0', { payload: Buffer.from('other'), topic: 'devices/d0/telemetry/t' })
    await store.append('acme/events', 'd1', { payload: Buffer.from('live-2'), topic: 'devices/d1/events/boot' })
    await until(() => client.payloads().includes('live-2'), 'live records')
    expect(client.received.slice(-3).map((p) => (p.topic.endsWith('/$done') ? '$done' : String(p.payload)))).toEqual(['$done', 'live-1', 'live-2'])
    expect(client.received.at(-1)?.topic).toBe('$replay/earliest..live/devices/d1/events/boot')
    // History is retained (sent because of the new subscription), live records are not.
    expect(client.received.map((p) => p.retain)).toEqual([...Array.from({ length: 10 }, () => true), false, false, false])
    client.ack()
    replays.stop(client, ['acme/$replay/earliest..live/devices/d1/#'])
    await until(() => replays.active === 0, 'the replay to end')
    await store.append('acme/telemetry', 'd1', { payload: Buffer.from('after'), topic: 'devices/d1/telemetry/t' })
    for (let i = 0; i < 5; i++) await tick()
    expect(client.payloads()).not.toContain('after')
    expect(await metric('edgemq_mqtt_replays_finished_total', { tenant: 'acme', outcome: 'cancelled' })).toBe(1)
  })

  it('ends when the connection closes, even while waiting for acks, and frees its slot', async () => {
    await setup({ inflight: 5, maxPerClient: 1, maxActive: 1 })
    await seed(100)
    const client = new FakeClient().attach(replays)
    start(client, '$replay/earliest/#')
    await until(() => client.unacked.length === 5, 'a full window')
    expect(codeOf(() => replays.prepare(client, service, '$replay/earliest/devices/d1/#'))).toBe('GW_REPLAY_LIMIT')
    expect(codeOf(() => replays.prepare(new FakeClient('c2').attach(replays), { ...service, clientId: 'c2' }, '$replay/earliest/x'))).toBe('GW_REPLAY_LIMIT')
    client.close()
    await until(() => replays.active === 0, 'the replay to end')
    expect(replays.acked(client, client.unacked[0] as number)).toBe(true) // a late PUBACK is still recognised
    expect(codeOf(() => replays.prepare(new FakeClient('c2').attach(replays), { ...service, clientId: 'c2' }, '$replay/earliest/x'))).toBeUndefined()
  })

  it('starts over when the same filter is subscribed again, and tells PUBACKs of other packets apart', async () => {
    await setup({ inflight: 3 })
    await seed(10, 1)
    const client = new FakeClient().attach(replays)
    start(client, '$replay/earliest/#')
    await until(() => client.unacked.length === 3, 'a full window')
    start(client, '$replay/earliest/#')
    await until(() => client.unacked.length === 6, 'the second replay\'s window')
    expect(client.payloads()).toEqual(['m0', 'm1', 'm2', 'm0', 'm1', 'm2'])
    expect(replays.acked(client, 60_000)).toBe(false)
    await ackUntilDone(client)
    expect(client.payloads().slice(6, -1)).toEqual(['m3', 'm4', 'm5', 'm6', 'm7', 'm8', 'm9'])
    await until(() => replays.active === 0, 'the replays to end')
  })

  it('skips packet ids still in flight when the client\'s counter wraps', async () => {
    await setup({ inflight: 4 })
    await seed(12, 1)
    const client = new FakeClient().attach(replays)
    const ids = [65534, 65535, 1, 2, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    client.nextMessageId = () => ids.shift() as number
    start(client, '$replay/earliest/#')
    await until(() => client.unacked.length === 4, 'a full window')
    client.ack(2) // 65534 and 65535; 1 and 2 are still in flight
    await until(() => client.unacked.length === 4, 'the window refilled')
    expect(client.unacked).toEqual([1, 2, 3, 4])
    await ackUntilDone(client)
  })
})

describe('MqttReplays on a standby whose log a snapshot rewinds', () => {
  const STREAM = 'acme/telemetry'
  const OLD = Array.from({ length: 180 }, (_, i) => `old-${i}`)
  /** The new primary had the first 150 records when it took over; its own follow. */
  const NEW = [...OLD.slice(0, 150), ...Array.from({ length: 40 }, (_, i) => `new-${150 + i}`)]
  const service: Identity = { tenant: 'acme', role: 'service', username: 'svc', clientId: 'c1' }
  const opened: LogStore[] = []
  afterEach(async () => { for (const s of opened.splice(0)) await s.close() })

  /** A primary's database holding `texts` from device d1, ten records per batch. */
  async function primaryDb (texts: readonly string[]): Promise<Raw> {
    const db = new MemoryLevel<Buffer, Buffer>(RAW)
    const primary = await openLogStore({ db: db as unknown as LevelDatabase })
    await primary.createStream(STREAM, { partitions: 1 })
    for (let i = 0; i < texts.length; i += 10) {
      await Promise.all(texts.slice(i, i + 10).map((t) => primary.append(STREAM, 'd1', { payload: Buffer.from(t), topic: 'devices/d1/telemetry/t' })))
    }
    await primary.close()
    return db
  }

  it('a live replay at the old log end goes on from the new end with every record of the new history', async () => {
    const copy = new MemoryLevel<Buffer, Buffer>(RAW)
    await replaceCopy(copy, await entriesOf(await primaryDb(OLD)))
    const store = await openLogStore({ db: copy as unknown as LevelDatabase, follower: true })
    opened.push(store)
    const moved: ReaderMovedBack[] = []
    const tracker = followRewinds(store, { readerMovedBack: (m) => moved.push(m) })
    const metrics = createMetrics(new Registry(), { store, diskFreeBytes: () => undefined, diskSizeBytes: () => undefined, healthy: () => true, version: 't', gatewayId: 't' })
    const replays = new MqttReplays({
      store, routes: buildConfig({}).routes, acl: [], logger: { info: () => {}, warn: () => {} }, metrics, clock: { now: () => NOW },
      limits: { inflight: 100, maxPerClient: 4, maxActive: 64 },
    })
    const client = new FakeClient().attach(replays)
    const ticket = replays.prepare(client, service, '$replay/latest..live/devices/d1/#')
    replays.start(client, ticket, 'acme/$replay/latest..live/devices/d1/#', 1)
    await ackUntilDone(client)
    expect(client.done()).toMatchObject({ records: 0, partitions: [{ stream: 'telemetry', partition: 0, from: 180, to: 180 }] })
    // The snapshot from the new primary (its log ends at 160), then its next records, applied and refreshed as the standby does.
    await replaceCopy(copy, await entriesOf(await primaryDb(NEW.slice(0, 160))))
    await tracker.refresh()
    await replaceCopy(copy, await entriesOf(await primaryDb(NEW)))
    await tracker.refresh()
    await until(() => { client.ack(); return client.payloads().includes(NEW.at(-1) as string) }, 'the new primary\'s records')
    expect(client.payloads().slice(1)).toEqual(NEW.slice(160))
    expect(moved).toEqual([{ stream: STREAM, partition: 0, from: 180, to: 160 }])
    client.close()
    await until(() => replays.active === 0, 'the replay to end')
  })
})
