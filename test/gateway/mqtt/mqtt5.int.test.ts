/**
 * MQTT 5 on every listener (issue 14), with real clients: MQTT.js with
 * protocolVersion 5 over TCP, TLS, WebSocket and secure WebSocket, and
 * mosquitto_pub -V mqttv5, mixed with MQTT 3.1.1 clients on the same topics.
 * Each reason code the gateway answers with is provoked and asserted, and the
 * MQTT 3.1.1 behaviour for the same input is asserted beside it.
 *
 * TLS needs the openssl command and mosquitto_pub the mosquitto-clients
 * package: without them those tests skip, except under CI=true, where they
 * fail.
 */
import { spawnSync } from 'node:child_process'
import { mkdir } from 'node:fs/promises'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient, type Packet } from 'mqtt'
import { pino } from 'pino'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig } from '../../../gateway/config/config.ts'
import { startGateway } from '../../../gateway/gateway.ts'
import type { LevelDatabase } from '../../../store/index.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { readWholeLog } from '../../helpers/log-reader.ts'
import { connectOk, endAll, metricValue, subscribeGranted, waitFor } from '../../helpers/mqtt-probe.ts'
import { runTool } from '../../helpers/prometheus-process.ts'
import { rawConnect } from '../../helpers/raw-client.ts'
import { packet, str, u16, varint } from '../../helpers/raw-mqtt.ts'
import { createPki, opensslPolicy } from '../../helpers/tls-fixtures.ts'

const openssl = opensslPolicy()
/** `mosquitto_pub --version` exits 1, so haveTool() cannot tell; --help spawning at all says it is installed. */
const haveMosquittoPub = spawnSync('mosquitto_pub', ['--help'], { stdio: 'ignore' }).error === undefined
const TIMEOUT = 90_000
const V5: IClientOptions = { protocolVersion: 5 }

/** Every PUBLISH a client receives, with its properties. */
function received (client: MqttClient): IPublishPacket[] {
  const got: IPublishPacket[] = []
  client.on('message', (_topic, _payload, packet) => { got.push(packet) })
  return got
}

/** Every packet of `cmd` the client receives (PUBACKs with their reason codes, a DISCONNECT). */
function packetsOf (client: MqttClient, cmd: Packet['cmd']): Packet[] {
  const got: Packet[] = []
  client.on('packetreceive', (packet) => { if (packet.cmd === cmd) got.push(packet) })
  return got
}

/** The reason code a QoS 1 publish was answered with (0 = accepted). */
async function pubackCode (client: MqttClient, topic: string, payload: string | Buffer): Promise<number> {
  try {
    await client.publishAsync(topic, payload, { qos: 1 })
    return 0
  } catch (err) {
    return (err as { code?: number }).code ?? -1
  }
}

function closed (client: MqttClient): Promise<void> {
  return new Promise((resolve) => client.once('close', () => resolve()))
}

it('has openssl and mosquitto_pub when CI=true (.ci/run installs them)', () => {
  expect(openssl.missingInCi, 'openssl is not installed but CI=true: the TLS tests did not run').toBe(false)
  expect(haveMosquittoPub || process.env.CI !== 'true', 'mosquitto_pub is not installed but CI=true: its test did not run').toBe(true)
})

describe('MQTT 5 on the listeners of one gateway, with 3.1.1 clients on the same topics', () => {
  const clients = new Set<MqttClient>()
  const cleanups: Array<() => Promise<void>> = []
  let gw: GatewayProcess
  let tlsClient: IClientOptions = {}
  const types = openssl.available ? ['tcp', 'tls', 'ws', 'wss'] as const : ['tcp', 'ws'] as const
  const connect = async (url: string, options: IClientOptions): Promise<MqttClient> => {
    const client = await connectOk(url, { ...tlsClient, ...options })
    clients.add(client)
    return client
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-mqtt5-')
    cleanups.push(cleanup)
    const listeners: Array<Record<string, unknown>> = [{ type: 'tcp', port: 0 }, { type: 'ws', port: 0 }]
    if (openssl.available) {
      const pki = await createPki(path.join(dir, 'pki'))
      const tls = { cert: pki.server.cert, key: pki.server.key }
      listeners.push({ type: 'tls', port: 0, tls }, { type: 'wss', port: 0, tls })
      tlsClient = { ca: pki.ca }
    }
    const config = await writeConfig(dir, {
      unrouted: 'reject',
      acl: [{ role: 'anonymous', topic: 'devices/+/telemetry/forbidden/#', access: 'publish', allow: false }],
      mqtt: { listeners, maxPacketBytes: 4096 },
    })
    gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    cleanups.push(async () => { await gw.stop() })
  }, 60_000)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  for (const name of types) {
    it(`${name}: an MQTT 5 publish with properties reaches an MQTT 5 and a 3.1.1 subscriber, and is logged`, async () => {
      const url = gw.urls[name] as string
      const before = await metricValue(gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'default', stream: 'telemetry' })
      const sub5 = await connect(url, { ...V5, clientId: `sub5-${name}` })
      const sub4 = await connect(url, { clientId: `sub4-${name}` })
      const got5 = received(sub5)
      const got4 = received(sub4)
      expect(await subscribeGranted(sub5, `devices/d5-${name}/telemetry/#`, 1)).toEqual([1])
      expect(await subscribeGranted(sub4, `devices/d5-${name}/telemetry/#`, 1)).toEqual([1])
      const pub = await connect(url, { ...V5, clientId: `d5-${name}` })
      const properties = { contentType: 'text/plain', userProperties: { unit: 'C' }, correlationData: Buffer.from('c-1') }
      await pub.publishAsync(`devices/d5-${name}/telemetry/t`, '21.5', { qos: 1, properties })
      expect(await waitFor(() => got5.length > 0 && got4.length > 0, 30_000)).toBe(true)
      expect(got5.map((p) => [p.topic, String(p.payload), p.properties?.contentType, p.properties?.userProperties, String(p.properties?.correlationData)]))
        .toEqual([[`devices/d5-${name}/telemetry/t`, '21.5', 'text/plain', { unit: 'C' }, 'c-1']])
      expect(got4.map((p) => [p.topic, String(p.payload), p.properties])).toEqual([[`devices/d5-${name}/telemetry/t`, '21.5', undefined]])
      // And the reverse: a 3.1.1 publish reaches the MQTT 5 subscriber.
      const pub4 = await connect(url, { clientId: `d4-${name}` })
      await pub4.publishAsync(`devices/d5-${name}/telemetry/t`, 'from 3.1.1', { qos: 1 })
      expect(await waitFor(() => got5.length > 1, 30_000)).toBe(true)
      expect(String(got5[1]?.payload)).toBe('from 3.1.1')
      expect(await metricValue(gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'default', stream: 'telemetry' })).toBe(before + 2)
      await endAll([sub5, sub4, pub, pub4])
    }, TIMEOUT)
  }

  it.runIf(haveMosquittoPub)('mosquitto_pub -V mqttv5 -q 1 is acknowledged and delivered', async () => {
    const sub = await connect(gw.urls.tcp as string, { ...V5, clientId: 'sub-mosquitto' })
    const got = received(sub)
    expect(await subscribeGranted(sub, 'devices/x/telemetry/#', 1)).toEqual([1])
    const port = new URL(gw.urls.tcp as string).port
    const run = runTool('mosquitto_pub', ['-h', '127.0.0.1', '-p', port, '-V', 'mqttv5', '-i', 'x', '-t', 'devices/x/telemetry/t', '-m', 'hi', '-q', '1',
      '-D', 'publish', 'user-property', 'site', 'north'])
    expect(run, run.output).toMatchObject({ code: 0 })
    expect(await waitFor(() => got.length > 0, 30_000)).toBe(true)
    expect(got.map((p) => [String(p.payload), p.properties?.userProperties])).toEqual([['hi', { site: 'north' }]])
  }, TIMEOUT)

  it('keeps an MQTT 5 session with a session expiry interval: the message published while it was away is delivered', async () => {
    const url = gw.urls.tcp as string
    const options: IClientOptions = { ...V5, clientId: 'persistent-5', clean: false, properties: { sessionExpiryInterval: 600 } }
    const first = await connect(url, options)
    expect(await subscribeGranted(first, 'devices/p5/telemetry/#', 1)).toEqual([1])
    await first.endAsync()
    const pub = await connect(url, { ...V5, clientId: 'p5' })
    await pub.publishAsync('devices/p5/telemetry/t', 'while away', { qos: 1, properties: { userProperties: { n: '1' } } })
    const again = mqtt.connect(url, { ...options, reconnectPeriod: 0 })
    clients.add(again)
    const got = received(again)
    const connack = await new Promise<{ sessionPresent: boolean }>((resolve) => again.once('connect', resolve))
    expect(connack.sessionPresent).toBe(true)
    expect(await waitFor(() => got.length > 0, 30_000)).toBe(true)
    expect(got.map((p) => [String(p.payload), p.properties?.userProperties])).toEqual([['while away', { n: '1' }]])
  }, TIMEOUT)

  it('replays the log to an MQTT 5 client, each record with its partition, offset and time as user properties, then $done', async () => {
    const url = gw.urls.tcp as string
    const pub = await connect(url, { ...V5, clientId: 'd-replay5' })
    const before = Date.now()
    for (const m of ['one', 'two']) await pub.publishAsync('devices/d-replay5/telemetry/t', m, { qos: 1 })
    const after = Date.now()
    const sub = await connect(url, { ...V5, clientId: 'replayer-5' })
    const got = received(sub)
    expect(await subscribeGranted(sub, '$replay/earliest/devices/d-replay5/telemetry/#', 1)).toEqual([1])
    expect(await waitFor(() => got.some((p) => p.topic.endsWith('/$done')), 30_000)).toBe(true)
    const records = got.filter((p) => !p.topic.endsWith('/$done'))
    expect(records.map((p) => String(p.payload))).toEqual(['one', 'two'])
    const props = records.map((p) => p.properties?.userProperties as Record<string, string>)
    expect(props.map((u) => Object.keys(u).sort())).toEqual([['edgemq-offset', 'edgemq-partition', 'edgemq-timestamp'], ['edgemq-offset', 'edgemq-partition', 'edgemq-timestamp']])
    expect(Number(props[1]?.['edgemq-offset'])).toBe(Number(props[0]?.['edgemq-offset']) + 1)
    const receivedAt = Number(props[0]?.['edgemq-timestamp'])
    expect(receivedAt >= before && receivedAt <= after, `${receivedAt} within [${before}, ${after}]`).toBe(true)
    expect(JSON.parse(String(got.at(-1)?.payload))).toMatchObject({ records: 2 })
  }, TIMEOUT)

  it('advertises maximum packet size, receive maximum and topic alias maximum, and resolves an inbound topic alias', async () => {
    const url = gw.urls.tcp as string
    const sub = await connect(url, { ...V5, clientId: 'sub-alias' })
    const got = received(sub)
    expect(await subscribeGranted(sub, 'devices/d-alias/telemetry/#', 1)).toEqual([1])
    const client = mqtt.connect(url, { ...V5, clientId: 'd-alias', reconnectPeriod: 0 })
    clients.add(client)
    const connack = await new Promise<{ properties?: Record<string, unknown> }>((resolve) => client.once('connect', resolve))
    expect(connack.properties).toMatchObject({ maximumPacketSize: 4096, topicAliasMaximum: 10, receiveMaximum: 1000 }) // mqtt.maxInflightPerClient
    await client.publishAsync('devices/d-alias/telemetry/t', 'named', { qos: 1, properties: { topicAlias: 3 } })
    await client.publishAsync('', 'by alias', { qos: 1, properties: { topicAlias: 3 } })
    expect(await waitFor(() => got.length === 2, 30_000)).toBe(true)
    expect(got.map((p) => [p.topic, String(p.payload)])).toEqual([['devices/d-alias/telemetry/t', 'named'], ['devices/d-alias/telemetry/t', 'by alias']])
    // An alias nobody set up, and one over the maximum (MQTT.js refuses to send either): DISCONNECT 0x94 (topic alias invalid).
    for (const topicAlias of [4, 11]) {
      const raw = await rawConnect(url, 5)
      raw.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clean: true, keepalive: 30, clientId: `d-raw-${topicAlias}` })
      expect(await raw.next('connack')).toMatchObject({ reasonCode: 0 })
      // aedes sends a DISCONNECT only once the CONNECT is fully handled (client.connected, after the CONNACK is out and
      // the session's queue read); a PUBLISH right behind the CONNACK would just be closed. The PINGRESP says it is.
      raw.send({ cmd: 'pingreq' })
      await raw.next('pingresp')
      raw.send({ cmd: 'publish', topic: topicAlias === 4 ? '' : 'devices/d-raw/telemetry/t', payload: Buffer.from('x'), qos: 1, messageId: 1,
        retain: false, dup: false, properties: { topicAlias } })
      expect(await raw.next('disconnect')).toMatchObject({ reasonCode: 0x94 })
      await raw.closed
    }
  }, TIMEOUT)

  it('assigns a client id to an MQTT 5 client that sent an empty one, also without Clean Start (3.1.1 refuses that: MQTT-3.1.3-8)', async () => {
    const raw = await rawConnect(gw.urls.tcp as string, 5)
    // Protocol name, level 5, flags 0 (no Clean Start), keep-alive 30, no properties, an empty client id (mqtt-packet refuses to encode it).
    raw.write(packet(0x10, Buffer.concat([str('MQTT'), Buffer.from([5, 0]), u16(30), varint(0), str('')])))
    const connack = await raw.next('connack') as { reasonCode?: number, properties?: { assignedClientIdentifier?: string } }
    expect(connack.reasonCode).toBe(0)
    expect(connack.properties?.assignedClientIdentifier).toMatch(/^aedes_/)
    raw.end()
    await raw.closed
  }, TIMEOUT)

  it('refuses enhanced authentication (an Authentication Method in CONNECT) with CONNACK 0x8C; a plain v5 login on the same listener works', async () => {
    // The gateway has no AUTH exchange (MQTT 5 §4.12): a client asking for one is told so instead of being let in on username/password alone.
    const raw = await rawConnect(gw.urls.tcp as string, 5)
    raw.send({
      cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clean: true, keepalive: 30, clientId: 'd-scram',
      properties: { authenticationMethod: 'SCRAM-SHA-256', authenticationData: Buffer.from('n,,n=user,r=abc') },
    })
    expect(await raw.next('connack')).toMatchObject({ reasonCode: 0x8c })
    await raw.closed
    const plain = await connect(gw.urls.tcp as string, { ...V5, clientId: 'd-scram', reconnectPeriod: 0 })
    expect(plain.connected).toBe(true)
    await plain.endAsync()
  }, TIMEOUT)

  it('tells an MQTT 5 client whose keep-alive ran out DISCONNECT 0x8D', async () => {
    const raw = await rawConnect(gw.urls.tcp as string, 5)
    raw.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clean: true, keepalive: 1, clientId: 'd-silent' })
    expect(await raw.next('connack')).toMatchObject({ reasonCode: 0 })
    // Then silence: the gateway gives up after 1.5 keep-alives [MQTT-3.1.2-24].
    expect(await raw.next('disconnect', 10_000)).toMatchObject({ reasonCode: 0x8d })
    await raw.closed
  }, TIMEOUT)

  it('tells the MQTT 5 client whose session another connection takes over DISCONNECT 0x8E', async () => {
    const url = gw.urls.tcp as string
    const first = await connect(url, { ...V5, clientId: 'd-twice', reconnectPeriod: 0 })
    const disconnect = new Promise<{ reasonCode?: number }>((resolve) => first.once('disconnect', resolve))
    await connect(url, { ...V5, clientId: 'd-twice', reconnectPeriod: 0 })
    expect((await disconnect).reasonCode).toBe(0x8e)
  }, TIMEOUT)

  it('keeps an MQTT 5 message\'s properties in the log: HTTP gives them as headers, $replay as properties', async () => {
    const url = gw.urls.tcp as string
    const pub = await connect(url, { ...V5, clientId: 'd-props' })
    const properties = {
      contentType: 'application/json', payloadFormatIndicator: true, responseTopic: 'devices/d-props/commands/reply',
      correlationData: Buffer.from([0, 1, 2, 255]), messageExpiryInterval: 3600, userProperties: { unit: 'C', tag: ['a', 'b'] },
    }
    await pub.publishAsync('devices/d-props/telemetry/t', '{"t":1}', { qos: 1, properties })
    const sub = await connect(url, { ...V5, clientId: 'replayer-props' })
    const got = received(sub)
    expect(await subscribeGranted(sub, '$replay/earliest/devices/d-props/telemetry/#', 1)).toEqual([1])
    expect(await waitFor(() => got.some((p) => p.topic.endsWith('/$done')), 30_000)).toBe(true)
    const replayed = got[0]?.properties
    expect(replayed).toMatchObject({ contentType: 'application/json', payloadFormatIndicator: true, responseTopic: 'devices/d-props/commands/reply' })
    expect(replayed?.correlationData).toEqual(Buffer.from([0, 1, 2, 255]))
    expect(replayed?.userProperties).toMatchObject({ unit: 'C', tag: ['a', 'b'] })
    const user = replayed?.userProperties as Record<string, string>
    const res = await fetch(`${gw.httpUrl}/v1/streams/telemetry/partitions/${user['edgemq-partition']}/records?offset=${user['edgemq-offset']}&maxRecords=1`)
    const body = await res.json() as { records: Array<{ topic: string, headers?: Record<string, string> }> }
    expect(body.records.map((r) => [r.topic, r.headers])).toEqual([['devices/d-props/telemetry/t', {
      'mqtt-content-type': 'application/json', 'mqtt-payload-format': 'utf-8', 'mqtt-response-topic': 'devices/d-props/commands/reply',
      'mqtt-correlation-data': 'AAEC/w==', 'mqtt-message-expiry': '3600', 'mqtt-user-properties': '{"unit":"C","tag":["a","b"]}',
    }]])
  }, TIMEOUT)

  it('does not deliver to a returning MQTT 5 session a message whose expiry interval ran out while it was away', async () => {
    const url = gw.urls.tcp as string
    const options: IClientOptions = { ...V5, clientId: 'expiring-5', clean: false, properties: { sessionExpiryInterval: 600 } }
    const first = await connect(url, options)
    expect(await subscribeGranted(first, 'devices/d-exp/telemetry/#', 1)).toEqual([1])
    await first.endAsync()
    const pub = await connect(url, { ...V5, clientId: 'd-exp' })
    await pub.publishAsync('devices/d-exp/telemetry/t', 'short-lived', { qos: 1, properties: { messageExpiryInterval: 1 } })
    const sent = Date.now()
    await pub.publishAsync('devices/d-exp/telemetry/t', 'lasting', { qos: 1, properties: { messageExpiryInterval: 3600 } })
    expect(await waitFor(() => Date.now() > sent + 1000, 5000)).toBe(true) // the first one's second is over
    const again = mqtt.connect(url, { ...options, reconnectPeriod: 0 })
    clients.add(again)
    const got = received(again)
    // "lasting" was logged after "short-lived": once it is here, "short-lived" would have come before it.
    expect(await waitFor(() => got.length > 0, 30_000)).toBe(true)
    expect(got.map((p) => String(p.payload))).toEqual(['lasting'])
    const left = got[0]?.properties?.messageExpiryInterval as number
    expect(left > 0 && left <= 3600).toBe(true) // the time left [MQTT-3.3.2-6]
  }, TIMEOUT)

  it('answers 0x87 (ACL, $replay) and 0x90 (unrouted: reject) on the PUBACK with a reason string, and keeps the MQTT 5 connection', async () => {
    const url = gw.urls.tcp as string
    const client = await connect(url, { ...V5, clientId: 'd-codes' })
    const acks = packetsOf(client, 'puback')
    expect(await pubackCode(client, 'devices/d-codes/telemetry/forbidden/x', 'no')).toBe(0x87)
    expect(await pubackCode(client, '$replay/earliest/devices/x', 'no')).toBe(0x87)
    expect(await pubackCode(client, 'nowhere/x', 'no')).toBe(0x90)
    expect(await pubackCode(client, 'devices/d-codes/telemetry/ok', 'yes')).toBe(0)
    expect(acks.map((p) => [(p as { reasonCode?: number }).reasonCode, (p as { properties?: { reasonString?: string } }).properties?.reasonString]))
      .toEqual([[0x87, 'publishing to devices/d-codes/telemetry/forbidden/x is not allowed'],
        [0x87, '$replay/earliest/devices/x: $replay and $share are subscriptions, not topics'],
        [0x90, 'no route for topic nowhere/x'], [0, undefined]])
    expect(client.connected).toBe(true)
  }, TIMEOUT)

  it('leaves the reason string out when the client asked for no problem information', async () => {
    const client = await connect(gw.urls.tcp as string, { ...V5, clientId: 'd-quiet', properties: { requestProblemInformation: false } })
    const acks = packetsOf(client, 'puback')
    expect(await pubackCode(client, 'nowhere/x', 'no')).toBe(0x90)
    expect((acks[0] as { properties?: unknown }).properties).toBeUndefined()
  }, TIMEOUT)

  it('closes an MQTT 3.1.1 connection for an unrouted QoS 1 publish, as before (it has no reason codes)', async () => {
    const client = await connect(gw.urls.tcp as string, { clientId: 'd-v4', reconnectPeriod: 0 })
    const gone = closed(client)
    client.publish('nowhere/x', 'no', { qos: 1 })
    await gone
  }, TIMEOUT)

  it('tells an MQTT 5 client DISCONNECT 0x95 for a packet over maxPacketBytes; a 3.1.1 client is just closed', async () => {
    const url = gw.urls.tcp as string
    // MQTT.js keeps to the maximum packet size the CONNACK advertises: a raw client that does not.
    const v5 = await rawConnect(url, 5)
    v5.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clean: true, keepalive: 30, clientId: 'd-big5' })
    expect(await v5.next('connack')).toMatchObject({ reasonCode: 0 })
    v5.send({ cmd: 'publish', topic: 'devices/d-big5/telemetry/t', payload: Buffer.alloc(5000), qos: 1, messageId: 1, retain: false, dup: false })
    expect(await v5.next('disconnect')).toMatchObject({ reasonCode: 0x95 })
    await v5.closed
    const v4 = await connect(url, { clientId: 'd-big4', reconnectPeriod: 0 })
    const disconnects = packetsOf(v4, 'disconnect')
    const gone = closed(v4)
    v4.publish('devices/d-big4/telemetry/t', Buffer.alloc(5000), { qos: 1 })
    await gone
    expect(disconnects).toEqual([])
  }, TIMEOUT)
})

describe('MQTT 5: a failed durable append is a reason code, not "not authorized"', () => {
  /** classic-level whose writes throw `failure` while it is set. */
  interface Faulty { url: string, healthUrl: string, dir: string, fail: (err: Error | null) => void, close: () => Promise<void>, cleanup: () => Promise<void> }
  async function gatewayWithFaults (): Promise<Faulty> {
    const { dir, cleanup } = await tempDir('edgemq-mqtt5-faults-')
    await mkdir(dir, { recursive: true })
    const db = new ClassicLevel<Buffer, Buffer>(path.join(dir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    let failure: Error | null = null
    db.hooks.prewrite.add(() => { if (failure !== null) throw failure })
    const config = buildConfig({ dataDir: dir, mqtt: { listeners: [{ type: 'tcp', port: 0 }] }, http: { port: 0 } })
    const gw = await startGateway(config, { logger: pino({ level: 'silent' }), database: db as unknown as LevelDatabase })
    let closing: Promise<void> | undefined
    return {
      url: `mqtt://127.0.0.1:${gw.listeners[0]!.port}`,
      healthUrl: `http://127.0.0.1:${gw.http.port}/health`,
      dir,
      fail: (err) => { failure = err },
      close: () => (closing ??= gw.close()),
      cleanup,
    }
  }

  it('answers 0x97 while the disk is full and 0x80 for another write failure; nothing refused is logged, the connection stays; stop is 0x8B',
    async () => {
    const gw = await gatewayWithFaults()
    try {
      const client = await connectOk(gw.url, { ...V5, clientId: 'd-disk' })
      const acks = packetsOf(client, 'puback')
      expect(await pubackCode(client, 'devices/d-disk/telemetry/t', 'before')).toBe(0)
      gw.fail(Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' }))
      expect(await pubackCode(client, 'devices/d-disk/telemetry/t', 'full')).toBe(0x97)
      gw.fail(new Error('IO error: device gone'))
      expect(await pubackCode(client, 'devices/d-disk/telemetry/t', 'broken')).toBe(0x80)
      expect((await fetch(gw.healthUrl)).status).toBe(503)
      gw.fail(null)
      expect(await pubackCode(client, 'devices/d-disk/telemetry/t', 'after')).toBe(0)
      expect((await fetch(gw.healthUrl)).status).toBe(200) // healthy again without a retried append
      expect((acks[1] as { properties?: { reasonString?: string } }).properties?.reasonString).toMatch(/ENOSPC/)
      expect(client.connected).toBe(true)
      // A graceful stop tells MQTT 5 clients DISCONNECT 0x8B (server shutting down).
      const disconnect = new Promise<{ reasonCode?: number }>((resolve) => client.once('disconnect', resolve))
      await gw.close()
      expect((await disconnect).reasonCode).toBe(0x8b)
      client.end(true)
      expect((await readWholeLog(gw.dir)).map((r) => r.payload)).toEqual(['before', 'after'])
    } finally {
      await gw.close().catch(() => {})
      await gw.cleanup()
    }
  }, TIMEOUT)
})
