/**
 * Shared subscriptions `$share/<group>/<filter>` end to end: `edgemq start`
 * in a child process, real MQTT.js 3.1.1 clients.
 *
 * - each message reaches exactly one member, routed (from the log, a device's
 *   messages in order per member) and unrouted (live, round robin);
 * - members join, leave (UNSUBSCRIBE) and one's socket is destroyed while a
 *   publisher sends: every message reaches some member, per device in order
 *   at each member, none lost;
 * - the share is a consumer group: listed by /v1/groups with its lag; after
 *   every member left and a kill -9 it resumes at its committed offset, and a
 *   persistent member's restored subscription re-joins;
 * - bad inputs: SUBACK 0x80 per bad filter, counted; publishing to a
 *   `$share` topic is refused and delivered nowhere;
 * - tenants: the same group name in two tenants is two groups, neither sees
 *   the other's messages; the ACL applies to the inner filter.
 */
import path from 'node:path'
import type { IClientOptions, MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../../../gateway/access/auth.ts'
import { runCli, startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { connectOk, endAll, metricValue, roundTrip, subscribeGranted, waitFor } from '../../../helpers/mqtt-probe.ts'

interface Got { readonly member: string, readonly topic: string, readonly payload: string }

/** Records every message a member receives, tagged with the member's name. */
function listen (client: MqttClient, member: string, into: Got[]): void {
  client.on('message', (topic, payload) => { into.push({ member, topic, payload: payload.toString() }) })
}

/** Payloads are `<device>:<seq>`: at each member, each device's sequence numbers must rise. */
function expectPerDeviceOrder (got: readonly Got[]): void {
  const last = new Map<string, number>()
  for (const g of got) {
    const [device, seq] = g.payload.split(':') as [string, string]
    const key = `${g.member}|${device}`
    const before = last.get(key) ?? -1
    expect(Number(seq), `${g.member} got ${g.payload} after ${device}:${before}`).toBeGreaterThan(before)
    last.set(key, Number(seq))
  }
}

interface GroupsDoc { groups: Array<{ group: string, lagMessages: number, streams: Array<{ stream: string, partitions: Array<{ committedOffset: number | null }> }> }> }

async function groups (httpUrl: string, auth?: string): Promise<GroupsDoc> {
  const res = await fetch(`${httpUrl}/v1/groups`, { headers: auth === undefined ? {} : { authorization: auth } })
  expect(res.status).toBe(200)
  return await res.json() as GroupsDoc
}

describe('shared subscriptions (one tenant, anonymous on loopback)', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess
  let dataDir: string
  let config: string

  const connect = async (clientId: string, extra: IClientOptions = {}): Promise<MqttClient> => {
    const c = await connectOk(gw.mqttUrl, { clientId, reconnectPeriod: 0, ...extra })
    clients.add(c)
    return c
  }
  const publishAll = async (pub: MqttClient, topic: (device: string) => string, devices: number, perDevice: number, from = 0): Promise<string[]> => {
    const sent: string[] = []
    for (let s = from; s < from + perDevice; s++) {
      await Promise.all(Array.from({ length: devices }, async (_, d) => {
        const payload = `d${d}:${s}`
        await pub.publishAsync(topic(`d${d}`), payload, { qos: 1 })
        sent.push(payload)
      }))
    }
    return sent
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-share-')
    cleanups.push(cleanup)
    dataDir = path.join(dir, 'data')
    config = await writeConfig(dir, { mqtt: { listeners: [{ type: 'tcp', port: 0 }], share: { inflight: 20 } } })
    gw = await startGatewayProcess({ dataDir, config })
    cleanups.push(async () => { await gw.kill() })
  }, 60_000)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('bad $share subscriptions get SUBACK 0x80 each, counted; a good one in the same SUBSCRIBE is granted', async () => {
    const c = await connect('bad-share')
    // MQTT.js checks wildcards itself: filters with a misplaced one are the raw client's test (share-topic.test.ts covers the parser).
    const bad = ['$share//devices/#', '$share/g', '$share/g/', '$share/g/$share/h/x', '$share', '$share/g/$replay/earliest/x']
    const before = await metricValue(gw.httpUrl, 'edgemq_mqtt_subscriptions_refused_total', { tenant: 'default', reason: 'share-invalid' })
    expect(await subscribeGranted(c, [...bad, '$share/ok/devices/+/telemetry/#'], 1)).toEqual([...bad.map(() => 128), 1])
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_subscriptions_refused_total', { tenant: 'default', reason: 'share-invalid' }))
      .toBe(before + bad.length)
    expect(gw.stderr()).toContain('GW_SHARE_BAD_SUBSCRIPTION')
    // A QoS 2 share is granted QoS 1: a share delivers at most QoS 1.
    expect(await subscribeGranted(c, '$share/q2/devices/+/events/#', 2)).toEqual([1])
    c.end(true)
  })

  it('publishing to a $share topic is refused (acknowledged, logged nowhere) and reaches no subscriber', async () => {
    const sub = await connect('share-literal')
    const got: Got[] = []
    listen(sub, 'literal', got)
    expect(await subscribeGranted(sub, ['$share/lit/x', '#'], 1)).toEqual([1, 1])
    const pub = await connect('share-literal-pub')
    const before = await metricValue(gw.httpUrl, 'edgemq_mqtt_publishes_refused_total', { tenant: 'default', reason: 'reserved-topic' })
    await pub.publishAsync('$share/lit/x', 'nope', { qos: 1 })
    await pub.publishAsync('marker/after', 'marker', { qos: 1 })
    expect(await waitFor(() => got.some((g) => g.payload === 'marker'), 5000)).toBe(true)
    expect(got.map((g) => g.payload)).toEqual(['marker'])
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_publishes_refused_total', { tenant: 'default', reason: 'reserved-topic' })).toBe(before + 1)
    sub.end(true)
    pub.end(true)
  })

  it('each message reaches exactly one member: routed from the log (in order per device) and unrouted round robin', async () => {
    const got: Got[] = []
    const members = await Promise.all(['m1', 'm2', 'm3'].map(async (name) => {
      const c = await connect(`once-${name}`)
      listen(c, name, got)
      expect(await subscribeGranted(c, ['$share/once/devices/+/telemetry/#', '$share/once/plain/#'], 1)).toEqual([1, 1])
      return c
    }))
    const pub = await connect('once-pub')
    const sent = await publishAll(pub, (d) => `devices/${d}/telemetry/t`, 12, 25)
    for (let i = 0; i < 30; i++) await pub.publishAsync(`plain/${i}`, `plain:${i}`, { qos: 1 })
    const routed = (): Got[] => got.filter((g) => g.topic.startsWith('devices/'))
    const plain = (): Got[] => got.filter((g) => g.topic.startsWith('plain/'))
    expect(await waitFor(() => routed().length >= sent.length && plain().length >= 30, 15_000), `${routed().length} of ${sent.length}`).toBe(true)
    for (const m of members) await roundTrip(m)
    expect(routed().map((g) => g.payload).sort()).toEqual([...sent].sort())
    expect(plain().map((g) => g.payload).sort()).toEqual(Array.from({ length: 30 }, (_, i) => `plain:${i}`).sort())
    expectPerDeviceOrder(routed())
    // Partitions are spread over the members; live messages go round robin.
    for (const name of ['m1', 'm2', 'm3']) {
      expect(routed().some((g) => g.member === name), `${name} got routed messages`).toBe(true)
      expect(plain().filter((g) => g.member === name)).toHaveLength(10)
    }
    // The share is a consumer group of the log, listed with its lag; it reaches 0 once every record is acknowledged.
    const name = 'share/once/devices/:2B/telemetry/:23'
    expect(await waitFor(async () => (await groups(gw.httpUrl)).groups.find((g) => g.group === name)?.lagMessages === 0, 5000)).toBe(true)
    const doc = (await groups(gw.httpUrl)).groups.find((g) => g.group === name) as unknown as Record<string, unknown>
    expect(doc).toMatchObject({ owner: 'share', readOnly: true, subscription: '$share/once/devices/+/telemetry/#' })
    const cli = await runCli(['groups', '--url', gw.httpUrl])
    expect(cli.code, cli.stderr).toBe(0)
    expect(cli.stdout.split('\n').filter((l) => l.startsWith(`${name} `) && l.endsWith('mqtt $share (read-only)')).length).toBe(8)
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_share_members', { group: `default/${name}` })).toBe(3)
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_share_messages_total', { group: `default/${name}` })).toBe(sent.length)
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_share_messages_total', { group: 'default/share/once/plain/:23' })).toBe(30)
    await endAll(members)
    pub.end(true)
  })

  it('members join and leave under load, one socket is destroyed mid-flight: every message reaches a member, in order per device', async () => {
    const got: Got[] = []
    const filter = '$share/churn/devices/+/telemetry/#'
    const member = async (name: string): Promise<MqttClient> => {
      const c = await connect(`churn-${name}`)
      listen(c, name, got)
      expect(await subscribeGranted(c, filter, 1)).toEqual([1])
      return c
    }
    const m1 = await member('m1')
    // From round 10 on m1 sends no PUBACK (and reads nothing more): its window fills, so it dies holding records.
    let stalled = false
    const handle = m1.handleMessage.bind(m1)
    m1.handleMessage = (packet, done) => { if (!stalled) handle(packet, done) }
    const m2 = await member('m2')
    const pub = await connect('churn-pub')
    const sent: string[] = []
    let m2Got = -1
    const DEVICES = 16
    const ROUNDS = 60
    for (let s = 0; s < ROUNDS; s++) {
      sent.push(...await publishAll(pub, (d) => `devices/${d}/telemetry/t`, DEVICES, 1, s))
      if (s === 10) stalled = true
      if (s === 15) await member('m3')
      // Mid-flight: m1 has unacknowledged records (window 20); its socket dies without a DISCONNECT.
      if (s === 30) { m1.stream.destroy(); m1.end(true) }
      if (s === 40) await member('m4')
      if (s === 45) {
        await m2.unsubscribeAsync(filter)
        m2Got = got.filter((g) => g.member === 'm2').length
      }
    }
    const firsts = (): Set<string> => new Set(got.map((g) => g.payload))
    expect(await waitFor(() => firsts().size >= sent.length, 20_000), `${firsts().size} of ${sent.length} delivered`).toBe(true)
    expect([...firsts()].sort()).toEqual([...sent].sort())
    expectPerDeviceOrder(got)
    expect(new Set(got.map((g) => g.member))).toEqual(new Set(['m1', 'm2', 'm3', 'm4']))
    // m2 left with UNSUBSCRIBE: nothing of the share reached it after its UNSUBACK.
    await roundTrip(m2)
    expect(got.filter((g) => g.member === 'm2')).toHaveLength(m2Got)
    // m1 left holding unacknowledged records, which went to the others.
    const left = gw.stderr().split('\n').filter((l) => l.includes('"share member left"') && l.includes('"churn-m1"'))
    expect(left).toHaveLength(1)
    expect((JSON.parse(left[0] as string) as { released: number }).released).toBeGreaterThan(0)
    pub.end(true)
  }, 60_000)

  it('a backlog many windows long drains to members that join late; a kill -9 while one holds records loses nothing', async () => {
    const filter = '$share/backlog/devices/+/telemetry/#'
    const got: Got[] = []
    // The share exists (and starts at the log end) from its first SUBSCRIBE; its member leaves at once.
    const first = await connect('backlog-first')
    expect(await subscribeGranted(first, filter, 1)).toEqual([1])
    first.end(true)
    const pub = await connect('backlog-pub')
    const sent = await publishAll(pub, (d) => `devices/${d}/telemetry/t`, 20, 40)
    pub.end(true)
    const opts: IClientOptions = { clean: false }
    const member = async (name: string, session: number): Promise<MqttClient> => {
      const c = await connect(`backlog-${name}`, opts)
      listen(c, `${name}#${session}`, got)
      if (session === 0) expect(await subscribeGranted(c, filter, 1)).toEqual([1])
      return c
    }
    const a = await member('a', 0)
    expect(await waitFor(() => got.length >= 100, 10_000)).toBe(true)
    // b joins while a holds records of every partition: the partitions moving to b wait for a's PUBACKs.
    const b = await member('b', 0)
    // After 50 messages b stops acknowledging: the gateway is killed while b holds unacknowledged records.
    let bGot = 0
    const handle = b.handleMessage.bind(b)
    b.handleMessage = (packet, done) => { if (++bGot <= 50) handle(packet, done) }
    expect(await waitFor(() => bGot > 50, 10_000)).toBe(true)
    await gw.kill()
    clients.delete(a)
    clients.delete(b)
    gw = await startGatewayProcess({ dataDir, config })
    // Both reconnect; their restored $share subscriptions join again, from the group's committed offsets.
    await member('a', 1)
    await member('b', 1)
    const delivered = (): Set<string> => new Set(got.map((g) => g.payload))
    expect(await waitFor(() => delivered().size >= sent.length, 20_000), `${delivered().size} of ${sent.length}`).toBe(true)
    expect([...delivered()].sort()).toEqual([...sent].sort())
    expectPerDeviceOrder(got)
    expect(got.some((g) => g.member === 'b#1')).toBe(true)
  }, 60_000)

  it('after every member left and a kill -9, the share resumes at its committed offset; a persistent member re-joins on reconnect', async () => {
    const filter = '$share/durable/devices/+/events/#'
    const opts: IClientOptions = { clean: false }
    let got: Got[] = []
    let m = await connect('durable-svc', opts)
    listen(m, 'svc', got)
    expect(await subscribeGranted(m, filter, 1)).toEqual([1])
    let pub = await connect('durable-pub')
    const first = await publishAll(pub, (d) => `devices/${d}/events/e`, 5, 20)
    expect(await waitFor(() => got.length >= first.length, 10_000)).toBe(true)
    await roundTrip(m)
    const name = 'share/durable/devices/:2B/events/:23'
    expect(await waitFor(async () => (await groups(gw.httpUrl)).groups.find((g) => g.group === name)?.lagMessages === 0, 5000)).toBe(true)
    m.end(true)
    clients.delete(m)
    // No member: the log keeps what the share has not consumed.
    const second = await publishAll(pub, (d) => `devices/${d}/events/e`, 5, 10, 20)
    expect((await groups(gw.httpUrl)).groups.find((g) => g.group === name)?.lagMessages).toBe(second.length)
    pub.end(true)
    clients.delete(pub)
    await gw.kill()
    gw = await startGatewayProcess({ dataDir, config })
    got = []
    m = await connect('durable-svc', opts)
    listen(m, 'svc', got)
    // No SUBSCRIBE: the persistent session's $share subscription is restored and joins the share again.
    expect(await waitFor(() => got.length >= second.length, 10_000), `${got.length} of ${second.length}`).toBe(true)
    await roundTrip(m)
    pub = await connect('durable-pub-2')
    await pub.publishAsync('devices/d0/events/e', 'd0:30', { qos: 1 })
    expect(await waitFor(() => got.some((g) => g.payload === 'd0:30'), 5000)).toBe(true)
    await roundTrip(m)
    expect(got.map((g) => g.payload).sort()).toEqual([...second, 'd0:30'].sort())
    expectPerDeviceOrder(got)
  }, 60_000)
})

describe('shared subscriptions across tenants', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess
  const USERS = { 'acme-svc': 'acme', 'globex-svc': 'globex', 'acme-dev': 'acme' } as const
  type User = keyof typeof USERS

  const connect = async (user: User, clientId: string): Promise<MqttClient> => {
    const c = await connectOk(gw.mqttUrl, { clientId, username: user, password: `pw-${user}`, reconnectPeriod: 0 })
    clients.add(c)
    return c
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-share-tenants-')
    cleanups.push(cleanup)
    const users = await Promise.all(Object.entries(USERS).map(async ([username, tenant]) => ({
      username, tenant, role: username.endsWith('-dev') ? 'device' : 'service', password: await hashPassword(`pw-${username}`, { N: 1024, r: 8, p: 1 }),
    })))
    const config = await writeConfig(dir, { users, mqtt: { listeners: [{ type: 'tcp', port: 0 }], share: { maxPerTenant: 4 } } })
    gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    cleanups.push(async () => { await gw.kill() })
  }, 60_000)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('the same group name in two tenants is two groups: each gets only its own tenant\'s messages, both ways', async () => {
    const got: Got[] = []
    const acme = await connect('acme-svc', 'acme-worker')
    const globex = await connect('globex-svc', 'globex-worker')
    listen(acme, 'acme', got)
    listen(globex, 'globex', got)
    for (const c of [acme, globex]) expect(await subscribeGranted(c, ['$share/w/devices/+/telemetry/#', '$share/w/plain/#'], 1)).toEqual([1, 1])
    const acmePub = await connect('acme-svc', 'acme-pub')
    const globexPub = await connect('globex-svc', 'globex-pub')
    for (let i = 0; i < 10; i++) {
      await acmePub.publishAsync(`devices/a${i}/telemetry/t`, `acme:${i}`, { qos: 1 })
      await globexPub.publishAsync(`devices/g${i}/telemetry/t`, `globex:${i}`, { qos: 1 })
      await acmePub.publishAsync(`plain/${i}`, `acme-plain:${i}`, { qos: 1 })
      await globexPub.publishAsync(`plain/${i}`, `globex-plain:${i}`, { qos: 1 })
    }
    expect(await waitFor(() => got.length >= 40, 10_000), `${got.length} of 40`).toBe(true)
    await roundTrip(acme)
    await roundTrip(globex)
    expect(got.filter((g) => g.member === 'acme').map((g) => g.payload).sort())
      .toEqual([...Array.from({ length: 10 }, (_, i) => `acme:${i}`), ...Array.from({ length: 10 }, (_, i) => `acme-plain:${i}`)].sort())
    expect(got.filter((g) => g.member === 'globex').map((g) => g.payload).sort())
      .toEqual([...Array.from({ length: 10 }, (_, i) => `globex:${i}`), ...Array.from({ length: 10 }, (_, i) => `globex-plain:${i}`)].sort())
    // Each tenant lists its own share group, not the other's.
    const auth = (u: User): string => `Basic ${Buffer.from(`${u}:pw-${u}`).toString('base64')}`
    const name = 'share/w/devices/:2B/telemetry/:23'
    expect((await groups(gw.httpUrl, auth('acme-svc'))).groups.map((g) => g.group)).toContain(name)
    expect((await groups(gw.httpUrl, auth('globex-svc'))).groups.map((g) => g.group)).toContain(name)
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_share_members', { tenant: 'acme', group: `acme/${name}` })).toBe(1)
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_share_members', { tenant: 'globex', group: `globex/${name}` })).toBe(1)
  })

  it('the inner filter needs subscribe access: a device may not share another device\'s telemetry', async () => {
    const dev = await connect('acme-dev', 'acme-dev')
    const before = await metricValue(gw.httpUrl, 'edgemq_mqtt_subscriptions_refused_total', { tenant: 'acme', reason: 'acl-denied' })
    expect(await subscribeGranted(dev, ['$share/w/devices/+/telemetry/#', '$share/w/devices/acme-dev/commands/#'], 1)).toEqual([128, 1])
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_subscriptions_refused_total', { tenant: 'acme', reason: 'acl-denied' })).toBe(before + 1)
  })

  it('a tenant has at most mqtt.share.maxPerTenant shares: one more is refused, an existing one and other tenants\' are not', async () => {
    // acme has 3 shares by now (w on telemetry, on plain/#, on the device's commands), globex 2.
    const acme = await connect('acme-svc', 'acme-many')
    expect(await subscribeGranted(acme, ['$share/new1/plain/#', '$share/new2/plain/#', '$share/w/plain/#'], 1)).toEqual([1, 128, 1])
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_subscriptions_refused_total', { tenant: 'acme', reason: 'share-limit' })).toBe(1)
    expect(gw.stderr()).toContain('GW_SHARE_LIMIT')
    const globex = await connect('globex-svc', 'globex-more')
    expect(await subscribeGranted(globex, ['$share/new1/plain/#', '$share/new2/plain/#', '$share/new3/plain/#'], 1)).toEqual([1, 1, 128])
  })
})
