/**
 * Who a client is, end to end against `edgemq start`: a device login is bound
 * to its client id (refused with CONNACK 2 otherwise, before any session is
 * touched), every record an authenticated client sends names its user in the
 * `edgemq-user` header on every read path, and replicated ($dedupe/) records
 * need an ACL replicate grant and dedupe only within the stream they land in,
 * so another tenant cannot have a bridge's records dropped.
 */
import path from 'node:path'
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../../gateway/access/auth.ts'
import { runCliWithin } from '../../helpers/cli-run.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { collect, connectOk, endAll, metricValue, subscribeGranted, tryConnect, waitFor, type Received } from '../../helpers/mqtt-probe.ts'

const TIMEOUT = 60_000
const PASSWORD = 'pw'

interface JsonRecord { readonly clientId: string, readonly topic: string, readonly payload: string, readonly headers?: Record<string, string> }

describe('client identity and replicated records', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess

  const login = (username: string, clientId: string, extra: mqtt.IClientOptions = {}): mqtt.IClientOptions =>
    ({ username, password: PASSWORD, clientId, ...extra })
  const connect = async (username: string, clientId: string, extra: mqtt.IClientOptions = {}): Promise<MqttClient> => {
    const client = await connectOk(gw.mqttUrl, login(username, clientId, extra))
    clients.add(client)
    return client
  }
  const records = async (user: string, stream: string, key: string): Promise<JsonRecord[]> => {
    const res = await fetch(`${gw.httpUrl}/v1/streams/${stream}/records?key=${key}&format=json`, {
      headers: { authorization: `Basic ${Buffer.from(`${user}:${PASSWORD}`).toString('base64')}` },
    })
    expect(res.status).toBe(200)
    return (await res.json() as { records: JsonRecord[] }).records
  }
  const refusedLogLines = (): Array<Record<string, unknown>> => gw.stderr().split('\n').filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.reason === 'client-id-not-bound')

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-identity-')
    cleanups.push(cleanup)
    const hash = await hashPassword(PASSWORD, { N: 1024, r: 8, p: 1 })
    const config = await writeConfig(dir, {
      users: [
        { username: 'line-7', tenant: 'acme', role: 'device' },
        { username: 'victim-9', tenant: 'acme', role: 'device' },
        { username: 'fleet', tenant: 'acme', role: 'device', clientIdPattern: 'fleet-*' },
        { username: 'ops', tenant: 'acme', role: 'service' },
        { username: 'acme-bridge', tenant: 'acme', role: 'service' },
        { username: 'globex-bridge', tenant: 'globex', role: 'service' },
      ].map((u) => ({ ...u, password: hash })),
      acl: [{ username: 'acme-bridge', topic: 'devices/#', access: 'replicate' }, { username: 'globex-bridge', topic: '#', access: 'replicate' }],
      mqtt: { listeners: [{ name: 'tcp', type: 'tcp', port: 0 }] },
    })
    gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    cleanups.push(async () => { await gw.kill() })
  }, TIMEOUT)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('refuses a device login using another device\'s client id; the victim\'s session, commands and records are untouched', async () => {
    const victim = await connect('victim-9', 'victim-9', { clean: false })
    let victimClosed = 0
    victim.on('close', () => { victimClosed++ })
    const commands = collect(victim)
    expect(await subscribeGranted(victim, 'devices/victim-9/commands/#', 1)).toEqual([1])
    await victim.publishAsync('devices/victim-9/telemetry/t', 'from the victim', { qos: 1 })

    // user line-7 as client id victim-9, with clean = true: would take over and wipe the victim's session.
    const impostor = await tryConnect(gw.mqttUrl, login('line-7', 'victim-9', { clean: true }))
    expect(impostor.ok ? 0 : impostor.returnCode).toBe(2) // identifier rejected
    // Nor does an empty client id (the gateway would pick one) get around the binding.
    const anonymousId = await tryConnect(gw.mqttUrl, login('line-7', ''))
    expect(anonymousId.ok ? 0 : anonymousId.returnCode).toBe(2)
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_connections_refused_total', { listener: 'tcp', reason: 'client-id-not-bound' })).toBe(2)
    expect(refusedLogLines().map((l) => l.clientId)).toEqual(['victim-9', ''])

    // The victim is still connected and still gets its commands...
    const ops = await connect('ops', 'ops-console')
    await ops.publishAsync('devices/victim-9/commands/reboot', 'c1', { qos: 1 })
    expect(await waitFor(() => commands.length === 1, 10_000)).toBe(true)
    expect(victimClosed).toBe(0)
    // ...and its persistent session survived: a command sent while it is away waits for it.
    await victim.endAsync()
    await ops.publishAsync('devices/victim-9/commands/reboot', 'c2', { qos: 1 })
    const queued: Received[] = []
    const back = mqtt.connect(gw.mqttUrl, { ...login('victim-9', 'victim-9', { clean: false }), protocolVersion: 4, reconnectPeriod: 0 })
    clients.add(back)
    back.on('message', (topic, payload) => queued.push({ topic, payload: payload.toString() }))
    const connack = await new Promise<{ sessionPresent: boolean }>((resolve) => back.once('connect', resolve))
    expect(connack.sessionPresent).toBe(true)
    expect(await waitFor(() => queued.length === 1, 10_000)).toBe(true)
    expect(queued).toEqual([{ topic: 'devices/victim-9/commands/reboot', payload: 'c2' }])

    // Only the victim's own record is in its partition, and it names its user.
    expect((await records('ops', 'telemetry', 'victim-9')).map((r) => [r.clientId, r.headers?.['edgemq-user'], r.payload]))
      .toEqual([['victim-9', 'victim-9', 'from the victim']])
    await endAll([back, ops])
  }, TIMEOUT)

  it('lets a user with a clientIdPattern connect as any id the pattern allows, and no other', async () => {
    const ok = await connect('fleet', 'fleet-3')
    await ok.publishAsync('devices/fleet-3/telemetry/t', 'from fleet-3', { qos: 1 })
    const outside = await tryConnect(gw.mqttUrl, login('fleet', 'line-7'))
    expect(outside.ok ? 0 : outside.returnCode).toBe(2)
    const own = await connect('line-7', 'line-7')
    await own.publishAsync('devices/line-7/telemetry/t', 'from line-7', { qos: 1 })
    await endAll([ok, own])
    // The user is on the HTTP read path and on `edgemq replay`.
    expect((await records('ops', 'telemetry', 'fleet-3')).map((r) => [r.clientId, r.headers?.['edgemq-user']])).toEqual([['fleet-3', 'fleet']])
    const replay = await runCliWithin(['replay', '--stream', 'telemetry', '--url', gw.httpUrl, '--user', 'ops', '--password', PASSWORD, '--no-progress'], 30_000)
    expect(replay.code, replay.stderr).toBe(0)
    const replayed = replay.stdout.trim().split('\n').map((l) => JSON.parse(l) as JsonRecord)
    expect(new Set(replayed.map((r) => `${r.clientId} by ${r.headers?.['edgemq-user']}`)))
      .toEqual(new Set(['victim-9 by victim-9', 'fleet-3 by fleet', 'line-7 by line-7']))
  }, TIMEOUT)

  it('keeps another tenant\'s dedupe ids from dropping a bridge\'s records, and needs a replicate grant for the topic', async () => {
    const topic = (offset: number): string => `$dedupe/edge-1/acme/telemetry/0/${offset}/devices/d/telemetry/t`
    // A client of tenant globex, allowed to replicate into globex, takes the ids of edge-1's offsets 0..9 first.
    const globex = await connect('globex-bridge', 'globex-bridge-1')
    for (let i = 0; i < 10; i++) await globex.publishAsync(topic(i), `forged-${i}`, { qos: 1 })
    // The real edge gateway's bridge then replicates offsets 0..19 into acme, one of them twice (a resend).
    const bridge = await connect('acme-bridge', 'edgemq-edge-1-region')
    for (let i = 0; i < 20; i++) await bridge.publishAsync(topic(i), `real-${i}`, { qos: 1 })
    await bridge.publishAsync(topic(5), 'real-5', { qos: 1 })
    const acme = await records('ops', 'telemetry', 'd')
    expect(acme.map((r) => r.payload)).toEqual(Array.from({ length: 20 }, (_, i) => `real-${i}`))
    expect(acme[0]?.headers).toEqual({ 'edgemq-origin': 'edge-1/acme/telemetry/0/0', 'edgemq-user': 'acme-bridge' })
    expect((await records('globex-bridge', 'telemetry', 'd')).map((r) => r.payload)).toEqual(Array.from({ length: 10 }, (_, i) => `forged-${i}`))
    // acme-bridge's grant covers devices/# only: a replicated record for another topic closes the connection.
    const closed = new Promise<void>((resolve) => bridge.once('close', () => resolve()))
    bridge.publish('$dedupe/edge-1/acme/events/0/0/alarms/x', 'outside the grant', { qos: 1 })
    await closed
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_publishes_refused_total', { tenant: 'acme', reason: 'invalid-topic' })).toBe(1)
    await endAll([globex, bridge])
  }, TIMEOUT)

  it('takes an MQTT 5 bridge\'s dedupe id from its edgemq-dedupe-id user property, with the same grant, and not as a user property', async () => {
    const carrying = (id: string): mqtt.IClientPublishOptions => ({ qos: 1, properties: { userProperties: { 'edgemq-dedupe-id': id, site: 'edge-1' } } })
    const bridge = await connect('acme-bridge', 'edgemq-edge-1-region-v5', { protocolVersion: 5 })
    for (const i of [0, 1, 0]) await bridge.publishAsync('devices/d5/telemetry/t', `real-${i}`, carrying(`edge-1/acme/telemetry/0/${100 + i}`))
    const acme = await records('ops', 'telemetry', 'd5')
    expect(acme.map((r) => r.payload)).toEqual(['real-0', 'real-1']) // the resend of offset 100 was acknowledged, not logged
    expect(acme[0]?.headers).toEqual({
      'edgemq-origin': 'edge-1/acme/telemetry/0/100', 'edgemq-user': 'acme-bridge', 'mqtt-user-properties': JSON.stringify({ site: 'edge-1' }),
    })
    // Without a replicate grant (ops), or outside it: 0x87, and nothing logged.
    const ops = await connect('ops', 'ops-v5', { protocolVersion: 5 })
    const refused = await ops.publishAsync('devices/d5/telemetry/t', 'forged', carrying('edge-1/acme/telemetry/0/200')).then(() => null, (e: unknown) => e as { code?: number })
    expect(refused?.code).toBe(0x87)
    const outside = await bridge.publishAsync('alarms/x', 'outside', carrying('edge-1/acme/events/0/0')).then(() => null, (e: unknown) => e as { code?: number })
    expect(outside?.code).toBe(0x87)
    expect((await records('ops', 'telemetry', 'd5')).map((r) => r.payload)).toEqual(['real-0', 'real-1'])
    await endAll([bridge, ops])
  }, TIMEOUT)
})
