/**
 * Shared subscriptions for MQTT 5 clients (issue 14) and deleting a share's
 * consumer group (issue 13), end to end: `edgemq start` in a child process,
 * real MQTT.js clients with protocolVersion 5 and 4 (3.1.1).
 *
 * - the CONNACK says Shared Subscription Available = 1;
 * - MQTT 5 and 3.1.1 members in one share while a publisher sends and members
 *   join and leave: every message reaches some member, per device in order;
 *   an MQTT 5 member gets the publisher's properties (user properties,
 *   content type), the record's place in the log and its own SUBSCRIBE's
 *   Subscription Identifier, from the log and live, also after a persistent
 *   member's session restored the subscription; a 3.1.1 member none;
 * - SUBACK reason codes: 0x8F for a malformed `$share/`, 0x97 over
 *   mqtt.share.maxPerTenant (3.1.1: 0x80 for both); No Local on a share is
 *   a protocol error (DISCONNECT 0x82);
 * - DELETE /v1/groups/share%2F... and `edgemq groups delete`: refused with
 *   HTTP_GROUP_IN_USE while the share has a member; once it has none the
 *   group is gone, and a member subscribing again starts at the log end.
 */
import path from 'node:path'
import mqtt, { type IClientOptions, type IClientSubscribeOptions, type IPublishPacket, type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { runCli, startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { connectOk, endAll, metricValue, roundTrip, subscribeGranted, waitFor } from '../../../helpers/mqtt-probe.ts'

const V5: IClientOptions = { protocolVersion: 5, reconnectPeriod: 0 }
const V4: IClientOptions = { protocolVersion: 4, reconnectPeriod: 0 }
const TIMEOUT = 60_000

interface Got { readonly member: string, readonly packet: IPublishPacket }

function listen (client: MqttClient, member: string, into: Got[]): void {
  client.on('message', (_topic, _payload, packet) => { into.push({ member, packet }) })
}

/** SUBSCRIBE with MQTT 5 options (a Subscription Identifier); the SUBACK's codes per filter. */
function subscribeWith (client: MqttClient, filters: string[], options: IClientSubscribeOptions): Promise<number[]> {
  return new Promise((resolve, reject) => {
    client.subscribe(filters, options, (err, _granted, packet) => {
      if (packet !== undefined) resolve((packet.granted as unknown[]).map((g) => (typeof g === 'number' ? g : -1)))
      else reject(err ?? new Error('SUBACK without a packet'))
    })
  })
}

/** Payloads are `<device>:<seq>`: at each member, each device's sequence numbers rise. */
function expectPerDeviceOrder (got: readonly Got[]): void {
  const last = new Map<string, number>()
  for (const { member, packet } of got) {
    const [device, seq] = String(packet.payload).split(':') as [string, string]
    const key = `${member}|${device}`
    expect(Number(seq), `${member} got ${device}:${seq} after ${device}:${last.get(key)}`).toBeGreaterThan(last.get(key) ?? -1)
    last.set(key, Number(seq))
  }
}

interface GroupsDoc { groups: Array<{ group: string, lagMessages: number, owner?: string }> }

describe('MQTT 5 shared subscriptions', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess

  const connect = async (clientId: string, options: IClientOptions): Promise<MqttClient> => {
    const c = await connectOk(gw.mqttUrl, { clientId, ...options })
    clients.add(c)
    return c
  }
  const groups = async (): Promise<GroupsDoc> => await (await fetch(`${gw.httpUrl}/v1/groups`)).json() as GroupsDoc
  const deleteGroup = async (name: string): Promise<{ status: number, code?: string }> => {
    const res = await fetch(`${gw.httpUrl}/v1/groups/${encodeURIComponent(name)}`, { method: 'DELETE' })
    const body = await res.json() as { error?: { code?: string } }
    return { status: res.status, code: body.error?.code }
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-share-v5-')
    cleanups.push(cleanup)
    const config = await writeConfig(dir, { mqtt: { listeners: [{ type: 'tcp', port: 0 }], share: { inflight: 20, maxPerTenant: 6 } } })
    gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    cleanups.push(async () => { await gw.kill() })
  }, TIMEOUT)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('the CONNACK says Shared Subscription Available = 1', async () => {
    const client = mqtt.connect(gw.mqttUrl, { ...V5, clientId: 'connack-share' })
    clients.add(client)
    const connack = await new Promise<{ properties?: Record<string, unknown> }>((resolve) => client.once('connect', resolve))
    expect(connack.properties?.sharedSubscriptionAvailable).toBe(true)
    client.end(true)
  })

  it('MQTT 5 and 3.1.1 members share under load: all delivered, in order per device; MQTT 5 members get properties', async () => {
    const got: Got[] = []
    const filters = ['$share/mix/devices/+/telemetry/#', '$share/mix/plain/#']
    const member = async (name: string, options: IClientOptions, subscriptionIdentifier?: number): Promise<MqttClient> => {
      const c = await connect(`mix-${name}`, options)
      listen(c, name, got)
      const sub: IClientSubscribeOptions = { qos: 1, ...(subscriptionIdentifier === undefined ? {} : { properties: { subscriptionIdentifier } }) }
      expect(await subscribeWith(c, filters, sub)).toEqual([1, 1])
      return c
    }
    const a5 = await member('a5', V5, 7)
    const b4 = await member('b4', V4)
    const pub = await connect('mix-pub', V5)
    const properties = { contentType: 'text/plain', userProperties: { origin: 'test' } }
    const sent: string[] = []
    const DEVICES = 12
    for (let s = 0; s < 40; s++) {
      await Promise.all(Array.from({ length: DEVICES }, async (_, d) => {
        await pub.publishAsync(`devices/d${d}/telemetry/t`, `d${d}:${s}`, { qos: 1, properties })
        sent.push(`d${d}:${s}`)
      }))
      if (s === 10) await member('c5', V5)
      if (s === 25) await b4.unsubscribeAsync(filters[0] as string) // leaves the log part; stays in the live one
    }
    for (let i = 0; i < 9; i++) await pub.publishAsync(`plain/${i}`, `plain:${i}`, { qos: 1, properties: { userProperties: { live: String(i) } } })
    const routed = (): Got[] => got.filter((g) => g.packet.topic.startsWith('devices/'))
    const plain = (): Got[] => got.filter((g) => g.packet.topic.startsWith('plain/'))
    const delivered = (): Set<string> => new Set(routed().map((g) => String(g.packet.payload)))
    expect(await waitFor(() => delivered().size >= sent.length && plain().length >= 9, 20_000), `${delivered().size} of ${sent.length}`).toBe(true)
    expect([...delivered()].sort()).toEqual([...sent].sort())
    expectPerDeviceOrder(routed())
    expect(new Set(routed().map((g) => g.member))).toEqual(new Set(['a5', 'b4', 'c5']))
    expect(plain().map((g) => String(g.packet.payload)).sort()).toEqual(Array.from({ length: 9 }, (_, i) => `plain:${i}`))

    // From the log: the publisher's properties, the record's place, the member's own identifier (none for c5).
    for (const { member: name, packet } of routed()) {
      if (name === 'b4') { expect(packet.properties).toBeUndefined(); continue }
      expect(packet.properties).toMatchObject({ contentType: 'text/plain', userProperties: { origin: 'test' } })
      expect(Number(packet.properties?.userProperties?.['edgemq-offset'])).toBeGreaterThanOrEqual(0)
      expect(packet.properties?.subscriptionIdentifier).toBe(name === 'a5' ? 7 : undefined)
    }
    // Live (unrouted) messages go round robin, with the same properties for MQTT 5 members.
    for (const name of ['a5', 'b4', 'c5']) expect(plain().filter((g) => g.member === name)).toHaveLength(3)
    for (const { member: name, packet } of plain()) {
      if (name === 'b4') { expect(packet.properties).toBeUndefined(); continue }
      expect(packet.properties?.userProperties?.live).toBe(String(packet.payload).split(':')[1])
      expect(packet.properties?.subscriptionIdentifier).toBe(name === 'a5' ? 7 : undefined)
    }
    const group = 'default/share/mix/devices/:2B/telemetry/:23'
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_share_members', { group })).toBe(2)
    await endAll([a5, b4, pub])
  }, TIMEOUT)

  it('a persistent MQTT 5 member\'s restored $share subscription keeps its Subscription Identifier', async () => {
    const filter = '$share/p5/devices/+/telemetry/p5' // routed to the log: kept for the share while no member is connected
    const options: IClientOptions = { ...V5, clean: false, properties: { sessionExpiryInterval: 600 } }
    const first = await connect('p5-member', options)
    expect(await subscribeWith(first, [filter], { qos: 1, properties: { subscriptionIdentifier: 9 } })).toEqual([1])
    await first.endAsync()
    const pub = await connect('p5-pub', V5)
    for (let i = 0; i < 5; i++) await pub.publishAsync(`devices/d${i}/telemetry/p5`, `d${i}:0`, { qos: 1, properties: { contentType: 'alert' } })
    // Back without a SUBSCRIBE: the session's subscription joins the share again, from where the group stood.
    const got: Got[] = []
    const again = mqtt.connect(gw.mqttUrl, { ...options, clientId: 'p5-member' })
    clients.add(again)
    listen(again, 'p5', got)
    expect(await waitFor(() => got.length >= 5, 10_000), `${got.length} of 5`).toBe(true)
    expect(got.map((g) => String(g.packet.payload)).sort()).toEqual(Array.from({ length: 5 }, (_, i) => `d${i}:0`))
    for (const { packet } of got) expect(packet.properties).toMatchObject({ subscriptionIdentifier: 9, contentType: 'alert' })
    await endAll([again, pub])
  }, TIMEOUT)

  it('a share\'s group is deleted over HTTP and by the CLI once it has no member; refused while it has one', async () => {
    const filter = '$share/del/devices/+/events/#'
    const name = 'share/del/devices/:2B/events/:23'
    const got: Got[] = []
    let m = await connect('del-member', V5)
    listen(m, 'm', got)
    expect(await subscribeGranted(m, filter, 1)).toEqual([1])
    const pub = await connect('del-pub', V4)
    const DEVICES = 5
    const publish = async (tag: string): Promise<string[]> => {
      const out = Array.from({ length: DEVICES }, (_, d) => `d${d}:${tag}`)
      for (let d = 0; d < DEVICES; d++) await pub.publishAsync(`devices/d${d}/events/e`, out[d] as string, { qos: 1 })
      return out
    }
    const first = await publish('1')
    expect(await waitFor(() => got.length >= first.length, 10_000)).toBe(true)
    expect(await waitFor(async () => (await groups()).groups.find((g) => g.group === name)?.lagMessages === 0, 5000)).toBe(true)

    // A member is connected: HTTP and the CLI refuse, and the group stays.
    expect(await deleteGroup(name)).toEqual({ status: 409, code: 'HTTP_GROUP_IN_USE' })
    const refused = await runCli(['groups', 'delete', '--group', name, '--url', gw.httpUrl])
    expect(refused.code).not.toBe(0)
    expect(refused.stderr).toContain('HTTP_GROUP_IN_USE')
    expect((await groups()).groups.some((g) => g.group === name)).toBe(true)
    const one = await fetch(`${gw.httpUrl}/v1/groups/${encodeURIComponent(name)}`)
    expect(await one.json()).toMatchObject({ group: name, owner: 'share', subscription: filter })

    // Without a member (UNSUBSCRIBE), the CLI deletes it; it is listed no more, and a second delete finds nothing.
    await m.unsubscribeAsync(filter)
    const deleted = await runCli(['groups', 'delete', '--group', name, '--url', gw.httpUrl])
    expect(deleted.code, deleted.stderr).toBe(0)
    expect((await groups()).groups.some((g) => g.group === name)).toBe(false)
    expect((await fetch(`${gw.httpUrl}/v1/groups/${encodeURIComponent(name)}`)).status).toBe(404)
    expect(await deleteGroup(name)).toEqual({ status: 404, code: 'HTTP_UNKNOWN_GROUP' })
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_share_members', { group: `default/${name}` })).toBe(0)

    // Published while the share has no group: a member subscribing again starts a new group at the log end, so it gets
    // only what follows. Each device's marker comes after its earlier message in the same partition: once every marker
    // is here, an earlier message would have come before it.
    const between = await publish('2')
    m.end(true)
    got.length = 0
    m = await connect('del-member-2', V5)
    listen(m, 'm', got)
    expect(await subscribeGranted(m, filter, 1)).toEqual([1])
    const markers = await publish('3')
    expect(await waitFor(() => got.length >= markers.length, 10_000)).toBe(true)
    await roundTrip(m)
    expect(got.map((g) => String(g.packet.payload)).sort()).toEqual([...markers].sort())
    expect(got.some((g) => between.includes(String(g.packet.payload)))).toBe(false)
    expect((await groups()).groups.some((g) => g.group === name)).toBe(true)
    await endAll([m, pub])
  }, TIMEOUT)

  it('SUBACK 0x8F for a malformed $share, 0x97 over mqtt.share.maxPerTenant; 0x80 for both under 3.1.1; counted', async () => {
    const five = await connect('codes-5', V5)
    const four = await connect('codes-4', V4)
    const bad = ['$share//devices/#', '$share/g', '$share/g/', '$share/g/$replay/earliest/x', '$share']
    const before = await metricValue(gw.httpUrl, 'edgemq_mqtt_subscriptions_refused_total', { tenant: 'default', reason: 'share-invalid' })
    expect(await subscribeGranted(five, [...bad, '$share/ok/plain/#'], 1)).toEqual([...bad.map(() => 0x8f), 1])
    expect(await subscribeGranted(four, bad, 1)).toEqual(bad.map(() => 0x80))
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_subscriptions_refused_total', { tenant: 'default', reason: 'share-invalid' }))
      .toBe(before + 2 * bad.length)
    // The tenant has 5 shares by now (mix ×2, p5, del, ok); mqtt.share.maxPerTenant is 6. An existing share is never refused.
    expect(await subscribeGranted(five, ['$share/l1/plain/#', '$share/l2/plain/#', '$share/mix/plain/#'], 1)).toEqual([1, 0x97, 1])
    expect(await subscribeGranted(four, ['$share/l4/plain/#', '$share/l1/plain/#'], 1)).toEqual([0x80, 1])
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_subscriptions_refused_total', { tenant: 'default', reason: 'share-limit' })).toBe(2)
    // A refused filter leaves the connection and the others in the SUBSCRIBE working.
    await roundTrip(five)
    await endAll([five, four])
  }, TIMEOUT)

  it('No Local on a $share subscription is a protocol error: DISCONNECT 0x82 [MQTT-3.8.3-4]', async () => {
    const client = await connect('no-local', V5)
    const disconnect = new Promise<{ reasonCode?: number }>((resolve) => client.once('disconnect', resolve))
    client.subscribe('$share/nl/plain/#', { qos: 1, nl: true })
    expect((await disconnect).reasonCode).toBe(0x82)
  })

  it('only a share\'s group name may hold "/": any other is HTTP_BAD_NAME; a share\'s offsets are read-only', async () => {
    for (const bad of ['other/x', 'share/only-group', 'share//x', '../default/share/del/x']) {
      const res = await fetch(`${gw.httpUrl}/v1/groups/${encodeURIComponent(bad)}`, { method: 'DELETE' })
      expect([bad, res.status, (await res.json() as { error?: { code?: string } }).error?.code]).toEqual([bad, 400, 'HTTP_BAD_NAME'])
    }
    // The del share (subscribed again above) is read per stream, and its offsets move only with its members' PUBACKs.
    const group = `${gw.httpUrl}/v1/groups/${encodeURIComponent('share/del/devices/:2B/events/:23')}/streams/events`
    expect((await fetch(group)).status).toBe(200)
    const reset = await fetch(`${group}/reset`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"to":"earliest"}' })
    expect([reset.status, (await reset.json() as { error?: { code?: string } }).error?.code]).toEqual([409, 'HTTP_GROUP_READ_ONLY'])
  })
})
