/**
 * A persistent session's deliveries from the log (gateway/mqtt/sessions/cursors.ts), against a gateway process:
 * the window an MQTT 5 client's Receive Maximum sets, PUBACKs the gateway must ignore, and a client that leaves in
 * the middle of a drain and comes back. The crash side (kill -9 mid-drain) is session-cursors-crash.int.test.ts.
 */
import net from 'node:net'
import mqtt from 'mqtt'
import mqttPacket, { type IPublishPacket, type Packet } from 'mqtt-packet'
import { afterAll, describe, expect, it } from 'vitest'
import { buildConfig } from '../../../../gateway/config/config.ts'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { rawConnect, type RawClient } from '../../../helpers/raw-client.ts'

const DEVICES = 8
const WAIT_MS = 60_000

/** Publishes `count` QoS 1 messages per device, `<device>:<n>`, each acknowledged before the next. */
async function publishAll (url: string, count: number): Promise<void> {
  await Promise.all(Array.from({ length: DEVICES }, async (_v, d) => {
    const client = await mqtt.connectAsync(url, { clientId: `dev-${d}`, reconnectPeriod: 0 })
    for (let n = 0; n < count; n++) await client.publishAsync(`devices/dev-${d}/telemetry/t`, `${d}:${n}`, { qos: 1 })
    await client.endAsync()
  }))
}

/** An MQTT 5 connection that speaks packets by hand, so PUBACKs go out only when the test sends them. */
class RawV5 {
  readonly packets: Packet[] = []
  #waiters: Array<() => void> = []
  private constructor (readonly socket: net.Socket) {
    const parser = mqttPacket.parser({ protocolVersion: 5 })
    parser.on('packet', (p: Packet) => { this.packets.push(p); for (const w of this.#waiters.splice(0)) w() })
    socket.on('data', (d: Buffer) => parser.parse(d))
    socket.on('error', () => {})
    socket.on('close', () => { for (const w of this.#waiters.splice(0)) w() })
  }

  static async open (url: string): Promise<RawV5> {
    const { hostname, port } = new URL(url)
    const socket = net.connect({ host: hostname, port: Number(port) })
    await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject) })
    return new RawV5(socket)
  }

  send (packet: Packet): void {
    this.socket.write(mqttPacket.generate(packet, { protocolVersion: 5 }))
  }

  /** Waits until `check` holds on the packets received (or fails after WAIT_MS). */
  async until (check: () => boolean, what: string): Promise<void> {
    const deadline = Date.now() + WAIT_MS
    while (!check()) {
      if (this.socket.destroyed || Date.now() > deadline) throw new Error(`waiting for ${what}: ${this.socket.destroyed ? 'closed' : 'timed out'}`)
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 1000)
        this.#waiters.push(() => { clearTimeout(timer); resolve() })
      })
    }
  }

  publishes (): IPublishPacket[] {
    return this.packets.filter((p): p is IPublishPacket => p.cmd === 'publish')
  }

  close (): void { this.socket.destroy() }
}

function connectV5 (raw: RawV5, clientId: string, receiveMaximum?: number): void {
  raw.send({
    cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clean: false, keepalive: 60, clientId,
    properties: { sessionExpiryInterval: 3600, ...(receiveMaximum === undefined ? {} : { receiveMaximum }) },
  })
}

/** Every device's numbers in the order received. */
function perDevice (bodies: readonly string[]): Map<number, number[]> {
  const out = new Map<number, number[]>()
  for (const body of bodies) {
    const [d, n] = body.split(':').map(Number) as [number, number]
    out.set(d, [...out.get(d) ?? [], n])
  }
  return out
}

/** Waits until the gateway has seen every one of these persistent sessions go offline (GET /v1/sessions). */
async function offline (gw: GatewayProcess, clientIds: readonly string[]): Promise<void> {
  const deadline = Date.now() + WAIT_MS
  for (;;) {
    const res = await fetch(`${gw.httpUrl}/v1/sessions`)
    const { sessions } = await res.json() as { sessions: Array<{ clientId: string, connected: boolean }> }
    if (sessions.filter((x) => clientIds.includes(x.clientId) && !x.connected).length === clientIds.length) return
    if (Date.now() > deadline) throw new Error(`sessions ${clientIds.join(', ')} still connected after ${WAIT_MS} ms`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

describe('persistent session deliveries from the log', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  /** A gateway process on a data directory of its own; both go after the tests. */
  async function gateway (): Promise<GatewayProcess> {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    return gw
  }

  it('keeps an MQTT 5 client\'s Receive Maximum, ignores unknown and repeated PUBACKs, and delivers everything in per-device order', async () => {
    const gw = await gateway()
    const PER_DEVICE = 40
    const RECEIVE_MAXIMUM = 5
    const setup = await RawV5.open(gw.mqttUrl)
    connectV5(setup, 'small')
    await setup.until(() => setup.packets.some((p) => p.cmd === 'connack'), 'CONNACK')
    setup.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'devices/+/telemetry/#', qos: 1 }] })
    await setup.until(() => setup.packets.some((p) => p.cmd === 'suback'), 'SUBACK')
    setup.close()
    await publishAll(gw.mqttUrl, PER_DEVICE)

    const raw = await RawV5.open(gw.mqttUrl)
    cleanups.push(async () => raw.close())
    connectV5(raw, 'small', RECEIVE_MAXIMUM)
    const total = DEVICES * PER_DEVICE
    const outstanding: number[] = []
    let seen = 0
    let most = 0
    let pings = 0
    const take = (): void => {
      for (const p of raw.publishes().slice(seen)) outstanding.push(p.messageId as number)
      seen = raw.publishes().length
      most = Math.max(most, outstanding.length)
    }
    while (seen < total) {
      await raw.until(() => raw.publishes().length >= Math.min(total, seen - outstanding.length + RECEIVE_MAXIMUM), 'a full window')
      // A round trip after the window filled: a gateway past the window would have sent more by the PINGRESP.
      raw.send({ cmd: 'pingreq' })
      const want = ++pings
      await raw.until(() => raw.packets.filter((p) => p.cmd === 'pingresp').length >= want, 'PINGRESP')
      take()
      // A PUBACK for an id not outstanding, and (after the first) one repeated: neither frees a place in the window.
      const unknown = [1, 2, 3, 4, 5, 6].find((id) => !outstanding.includes(id)) as number
      raw.send({ cmd: 'puback', messageId: unknown, reasonCode: 0 })
      raw.send({ cmd: 'puback', messageId: outstanding[0] as number, reasonCode: 0 })
      raw.send({ cmd: 'puback', messageId: outstanding.shift() as number, reasonCode: 0 })
    }
    take()
    expect(most).toBeLessThanOrEqual(RECEIVE_MAXIMUM)
    const bodies = raw.publishes().map((p) => String(p.payload))
    expect(new Set(bodies).size).toBe(total)
    for (const [d, ns] of perDevice(bodies)) expect(ns, `device ${d}`).toEqual(Array.from({ length: PER_DEVICE }, (_v, n) => n))
    expect(raw.publishes().every((p) => p.qos === 1 && p.dup === false && p.topic.startsWith('devices/'))).toBe(true)
    raw.close()
    expect(await gw.stop()).toBe(0)
  }, 120_000)

  it('a connected persistent subscriber gets the first message of every partition (ten devices publishing one message at once)', async () => {
    const gw = await gateway()
    const sub = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
    cleanups.push(async () => { sub.end(true) })
    const got = new Set<string>()
    sub.on('message', (_t, payload) => got.add(payload.toString()))
    await sub.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    await Promise.all(Array.from({ length: 10 }, async (_v, d) => {
      const client = await mqtt.connectAsync(gw.mqttUrl, { clientId: `dev-${d}`, reconnectPeriod: 0 })
      await client.publishAsync(`devices/dev-${d}/telemetry/t`, `${d}:0`, { qos: 1 })
      await client.endAsync()
    }))
    const deadline = Date.now() + WAIT_MS
    while (got.size < 10 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
    expect([...got].sort()).toEqual(Array.from({ length: 10 }, (_v, d) => `${d}:0`).sort())
    sub.end(true)
    expect(await gw.stop()).toBe(0)
  }, 120_000)

  for (const version of [4, 5] as const) {
    it(`sends what it left unacknowledged again with the same packet ids and DUP set (MQTT ${version === 4 ? '3.1.1' : '5'}) [MQTT-4.4.0-1]`, async () => {
      const gw = await gateway()
      const PER_DEVICE = 5
      const total = DEVICES * PER_DEVICE
      const open = async (): Promise<RawClient> => {
        const raw = await rawConnect(gw.mqttUrl, version)
        cleanups.push(async () => { raw.end() })
        raw.send({
          cmd: 'connect', protocolId: 'MQTT', protocolVersion: version, clean: false, keepalive: 60, clientId: `ids-${version}`,
          ...(version === 5 ? { properties: { sessionExpiryInterval: 3600 } } : {}),
        })
        await raw.next('connack')
        return raw
      }
      const receive = async (raw: RawClient, n: number): Promise<IPublishPacket[]> => {
        const out: IPublishPacket[] = []
        while (out.length < n) out.push(await raw.next('publish', WAIT_MS) as IPublishPacket)
        return out
      }
      const setup = await open()
      setup.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'devices/+/telemetry/#', qos: 1 }] })
      await setup.next('suback')
      setup.end()
      await setup.closed
      await publishAll(gw.mqttUrl, PER_DEVICE)

      // The first connection acknowledges a quarter of what it gets (after a PINGRESP: all of it was sent), then drops.
      const first = await open()
      const got = await receive(first, total)
      const acked = got.filter((_p, i) => i % 4 === 0)
      for (const p of acked) first.send({ cmd: 'puback', messageId: p.messageId as number })
      first.send({ cmd: 'pingreq' })
      await first.next('pingresp')
      first.end()
      await first.closed

      const second = await open()
      const again = await receive(second, total - acked.length)
      const idOf = new Map(got.map((p) => [String(p.payload), p.messageId]))
      expect(again.map((p) => String(p.payload)).sort()).toEqual(got.filter((p) => !acked.includes(p)).map((p) => String(p.payload)).sort())
      for (const p of again) expect([String(p.payload), p.messageId, p.dup]).toEqual([String(p.payload), idOf.get(String(p.payload)), true])
      second.end()
      expect(await gw.stop()).toBe(0)
    }, 120_000)
  }

  it('keeps a subscriber alive whose only packets are PUBACKs the gateway takes from the bytes (keepalive 1 s, 3 s of PUBACKs)', async () => {
    const gw = await gateway()
    const connect = async (keepalive: number): Promise<RawClient> => {
      const raw = await rawConnect(gw.mqttUrl, 4)
      cleanups.push(async () => { raw.end() })
      raw.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: false, keepalive, clientId: 'slow' })
      await raw.next('connack')
      return raw
    }
    const setup = await connect(60)
    setup.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'devices/+/telemetry/#', qos: 1 }] })
    await setup.next('suback')
    setup.end()
    await setup.closed
    await publishAll(gw.mqttUrl, 4) // 32 messages
    // aedes closes a client silent for 1.5 keepalives: 32 PUBACKs 100 ms apart are its only packets for 3.2 s
    const slow = await connect(1)
    for (let n = 0; n < DEVICES * 4; n++) {
      const p = await slow.next('publish', WAIT_MS)
      await new Promise((resolve) => setTimeout(resolve, 100))
      slow.send({ cmd: 'puback', messageId: p.messageId as number })
    }
    slow.send({ cmd: 'pingreq' })
    await slow.next('pingresp')
    slow.end()
    expect(await gw.stop()).toBe(0)
  }, 120_000)

  it('keeps a message\'s RETAIN for MQTT 5 subscriptions with Retain As Published, and only for them, live and after a reconnect', async () => {
    const gw = await gateway()
    const got = new Map<string, Array<[string, boolean]>>()
    const subscriber = async (clientId: string, version: 4 | 5, rap?: boolean): Promise<mqtt.MqttClient> => {
      const client = mqtt.connect(gw.mqttUrl, {
        clientId, clean: false, protocolVersion: version, reconnectPeriod: 0, ...(version === 5 ? { properties: { sessionExpiryInterval: 3600 } } : {}),
      })
      cleanups.push(async () => { client.end(true) })
      // Listening before the CONNECT: the offline message goes out right after the CONNACK, and MQTT.js handles a
      // PUBLISH in the CONNACK's socket read (and acknowledges it) before connectAsync's caller could listen.
      client.on('message', (_t, payload, packet) => got.set(clientId, [...got.get(clientId) ?? [], [payload.toString(), packet.retain]]))
      await new Promise<void>((resolve, reject) => { client.once('connect', () => resolve()); client.once('error', reject) })
      // Once: a SUBSCRIBE on the reconnect would also get the retained message, as retained.
      if (rap !== undefined) await client.subscribeAsync('devices/+/telemetry/#', { qos: 1, ...(version === 5 ? { rap } : {}) })
      return client
    }
    const subs = [await subscriber('rap', 5, true), await subscriber('plain', 5, false), await subscriber('v311', 4, false)]
    const device = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'dev-r', reconnectPeriod: 0 })
    await device.publishAsync('devices/dev-r/telemetry/t', 'kept', { qos: 1, retain: true })
    await device.publishAsync('devices/dev-r/telemetry/t', 'live', { qos: 1 })
    const received = async (n: number): Promise<void> => {
      const deadline = Date.now() + WAIT_MS
      while ([...got.values()].flat().length < n && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
    }
    await received(6)
    // offline: read from the log on the next connection (published around a disconnect: disconnect-race.int.test.ts)
    for (const sub of subs) await sub.endAsync()
    await device.publishAsync('devices/dev-r/telemetry/t', 'later', { qos: 1, retain: true })
    await device.endAsync()
    await subscriber('rap', 5)
    await subscriber('plain', 5)
    await subscriber('v311', 4)
    await received(9)
    expect(got.get('rap')).toEqual([['kept', true], ['live', false], ['later', true]])
    expect(got.get('plain')).toEqual([['kept', false], ['live', false], ['later', false]])
    expect(got.get('v311')).toEqual([['kept', false], ['live', false], ['later', false]])
    expect(await gw.stop()).toBe(0)
  }, 120_000)

  it('drains a backlog of many stored batches to 3.1.1 and MQTT 5 sessions: each record once, in per-device order, with its topic, payload, properties and RETAIN 0', async () => {
    const gw = await gateway()
    const PER_DEVICE = 150
    const total = DEVICES * PER_DEVICE
    const subscribers = [{ clientId: 'drain-v311', version: 4 as const }, { clientId: 'drain-v5', version: 5 as const }]
    // The listener goes on before the CONNACK: a resumed session's backlog can come in the same read as its CONNACK, and
    // MQTT.js emits those messages before connectAsync's promise lets a caller listen (CI lost a batch of 100 that way).
    const connect = async (clientId: string, version: 4 | 5, onMessage?: mqtt.OnMessageCallback): Promise<mqtt.MqttClient> => {
      const client = mqtt.connect(gw.mqttUrl, {
        clientId, clean: false, protocolVersion: version, reconnectPeriod: 0, ...(version === 5 ? { properties: { sessionExpiryInterval: 3600 } } : {}),
      })
      if (onMessage !== undefined) client.on('message', onMessage)
      await new Promise<void>((resolve, reject) => { client.once('connect', () => { resolve() }); client.once('error', reject) })
      return client
    }
    for (const { clientId, version } of subscribers) {
      const client = await connect(clientId, version)
      await client.subscribeAsync('devices/+/telemetry/#', { qos: 1, ...(version === 5 ? { properties: { subscriptionIdentifier: 9 } } : {}) })
      await client.endAsync()
    }
    await offline(gw, subscribers.map((x) => x.clientId))

    // What device d sends as its n-th message: a third with user properties, content type, correlation data and a
    // response topic, a third with an expiry and a UTF-8 payload format, a third binary without properties; some retained.
    const payloadOf = (d: number, n: number): Buffer => n % 3 === 2
      ? Buffer.from([d, n >> 8, n & 0xff, ...Array.from({ length: n % 40 }, (_v, k) => (d * 31 + n + k * 7) & 0xff)])
      : Buffer.from(`${d}:${n}:${'x'.repeat(n % 40)}`)
    const propertiesOf = (d: number, n: number): mqtt.IClientPublishOptions['properties'] => n % 3 === 0
      ? { userProperties: { seq: String(n), device: `dev-${d}` }, contentType: 'application/x-test', correlationData: Buffer.from([d, n & 0xff]), responseTopic: `replies/dev-${d}` }
      : n % 3 === 1 ? { messageExpiryInterval: 3600, payloadFormatIndicator: true } : undefined
    // All of a device's messages in flight at once: the gateway's group commits store them as batches of many records.
    await Promise.all(Array.from({ length: DEVICES }, async (_v, d) => {
      const device = await mqtt.connectAsync(gw.mqttUrl, { clientId: `dev-${d}`, protocolVersion: 5, reconnectPeriod: 0 })
      await Promise.all(Array.from({ length: PER_DEVICE }, (_w, n) => device.publishAsync(`devices/dev-${d}/telemetry/t`, payloadOf(d, n),
        { qos: 1, retain: n % 10 === 5, properties: propertiesOf(d, n) })))
      await device.endAsync()
    }))

    const got = new Map<string, Array<{ topic: string, payload: Buffer, packet: IPublishPacket }>>()
    await Promise.all(subscribers.map(async ({ clientId, version }) => {
      const received: Array<{ topic: string, payload: Buffer, packet: IPublishPacket }> = []
      got.set(clientId, received)
      let done = (): void => {}
      const all = new Promise<void>((resolve) => { done = resolve })
      const client = await connect(clientId, version, (topic, payload, packet) => {
        received.push({ topic, payload, packet })
        if (received.length === total) done()
      })
      cleanups.push(async () => { client.end(true) })
      if (received.length < total) await Promise.race([all, new Promise((_r, reject) => setTimeout(() => reject(new Error(`${clientId}: ${received.length} of ${total}`)), WAIT_MS))])
      await client.endAsync()
    }))
    expect(await gw.stop()).toBe(0)

    for (const { clientId, version } of subscribers) {
      const received = got.get(clientId) ?? []
      const order = new Map<number, number[]>()
      for (const { topic, payload, packet } of received) {
        const d = Number(/^devices\/dev-(\d+)\/telemetry\/t$/.exec(topic)?.[1])
        // Binary payloads start with the device number, text ones with its digit.
        const n = (payload[0] as number) < DEVICES ? (payload[1] as number) << 8 | (payload[2] as number) : Number(payload.toString().split(':')[1])
        order.set(d, [...order.get(d) ?? [], n])
        const what = `${clientId} dev-${d} #${n}`
        expect(payload.equals(payloadOf(d, n)), what).toBe(true)
        expect({ qos: packet.qos, retain: packet.retain, dup: packet.dup }, what).toEqual({ qos: 1, retain: false, dup: false })
        if (version === 4) {
          expect(packet.properties, what).toBeUndefined()
          continue
        }
        const { subscriptionIdentifier, messageExpiryInterval, ...rest } = packet.properties ?? {}
        expect([subscriptionIdentifier].flat(), what).toEqual([9])
        if (n % 3 === 1) {
          expect(messageExpiryInterval, what).toBeGreaterThan(3500)
          expect(messageExpiryInterval, what).toBeLessThanOrEqual(3600)
        } else {
          expect(messageExpiryInterval, what).toBeUndefined()
        }
        const { messageExpiryInterval: _sent, ...sent } = propertiesOf(d, n) ?? {}
        expect(rest, what).toEqual(sent)
      }
      expect(received, clientId).toHaveLength(total)
      for (let d = 0; d < DEVICES; d++) expect(order.get(d), `${clientId} dev-${d}`).toEqual(Array.from({ length: PER_DEVICE }, (_v, n) => n))
    }
  }, 120_000)

  it('a subscriber that leaves in the middle of a drain gets the rest when it comes back, the unacknowledged ones with DUP', async () => {
    const gw = await gateway()
    const PER_DEVICE = 250
    const first = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
    await first.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    await first.endAsync()
    await publishAll(gw.mqttUrl, PER_DEVICE)

    const got: Array<{ body: string, dup: boolean, connection: number }> = []
    const subscribe = (connection: number): mqtt.MqttClient => {
      const client = mqtt.connect(gw.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
      client.on('message', (_t, payload, packet) => got.push({ body: payload.toString(), dup: packet.dup, connection }))
      client.on('error', () => {})
      return client
    }
    const leaving = subscribe(0)
    const deadline = Date.now() + WAIT_MS
    while (got.length < 300 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10))
    leaving.end(true) // gone mid-drain, without a DISCONNECT, some PUBACKs never sent
    await new Promise((resolve) => leaving.stream.once('close', resolve))
    const back = subscribe(1)
    cleanups.push(async () => { back.end(true) })
    const all = (): boolean => new Set(got.map((g) => g.body)).size === DEVICES * PER_DEVICE
    while (!all() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
    expect(all()).toBe(true)
    back.end(true)
    expect(await gw.stop()).toBe(0)
    for (const c of [0, 1]) {
      for (const [d, ns] of perDevice(got.filter((g) => g.connection === c).map((g) => g.body))) {
        expect(ns.every((n, i) => i === 0 || n > (ns[i - 1] as number)), `connection ${c} device ${d}`).toBe(true)
      }
    }
    // the second connection starts, per device, where the first one's acknowledgements ended: repeats carry DUP
    const firstBodies = new Set(got.filter((g) => g.connection === 0).map((g) => g.body))
    const repeats = got.filter((g) => g.connection === 1 && firstBodies.has(g.body))
    expect(repeats.every((g) => g.dup)).toBe(true)
    expect(repeats.length).toBeLessThanOrEqual(buildConfig({}).mqtt.sessionInflight) // at most the window was unacknowledged
  }, 120_000)
})
