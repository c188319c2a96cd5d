/**
 * Tenants and ACLs end to end, with real MQTT.js clients against `edgemq
 * start`: two tenants (acme, globex), each with a device user and a service
 * user. A globex client can neither publish into nor subscribe to acme's
 * topics whatever filter it uses, and acme's messages land in acme's streams
 * only; devices are held to devices/<client id>/…; configured rules with %u
 * and %c work and a deny rule wins over the built-in allow.
 *
 * Every test records what it expects in the log; the last test stops the
 * gateway and compares the whole log on disk with that ledger, so a denied
 * publish that was appended anyway is caught even when nobody received it.
 */
import path from 'node:path'
import type { IClientOptions, MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../gateway/access/auth.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../helpers/gateway-process.ts'
import { readWholeLog } from '../helpers/log-reader.ts'
import { collect, connectOk, endAll, metricValue, roundTrip, subscribeGranted, tryConnect, waitFor, type Received } from '../helpers/mqtt-probe.ts'

const TIMEOUT = 30_000
/** An unrouted globex topic whose retained message is the last one a wide globex subscription gets (see its test). */
const BARRIER_TOPIC = '~barrier'

/**
 * The device users are fleet logins (users[].clientIdPattern): each may connect as any sensor-* client id, so
 * the same client id can be in use in both tenants at once.
 */
const USERS = {
  'acme-dev': { tenant: 'acme', role: 'device', clientIdPattern: 'sensor-*' },
  'acme-svc': { tenant: 'acme', role: 'service' },
  'globex-dev': { tenant: 'globex', role: 'device', clientIdPattern: 'sensor-*' },
  'globex-svc': { tenant: 'globex', role: 'service' },
} as const
type Username = keyof typeof USERS
const password = (user: Username): string => `pw-of-${user}`

/** Every filter a curious globex client might try on acme's topics. */
const PROBE_FILTERS = [
  '#', '+/#', '+', '+/+', '+/+/+', '+/+/+/+', '+/+/+/+/+', '+/+/+/+/+/+',
  'acme/#', 'acme/+/#', 'acme/devices/#', 'acme/devices/+/telemetry/#', 'acme/devices/sensor-a/telemetry/t1',
  'devices/#', 'devices/+/telemetry/#', 'devices/+/events/#', 'devices/+/commands/#', 'devices/sensor-a/#',
  'devices/sensor-a/telemetry/t1', 'devices/sensor-a/commands/#', '/acme/#', '../acme/#', '$SYS/#', 'acme-unrouted/#',
]

describe('tenants are isolated; ACLs hold', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess
  let dataDir: string
  /** stream (<tenant>/<stream>) → payloads the log must hold, in any order. */
  const expectedLog = new Map<string, string[]>()
  const appended = (stream: string, ...payloads: string[]): void => { expectedLog.set(stream, [...(expectedLog.get(stream) ?? []), ...payloads]) }

  const connect = async (user: Username, clientId: string, extra: IClientOptions = {}): Promise<MqttClient> => {
    const client = await connectOk(gw.mqttUrl, { clientId, username: user, password: password(user), ...extra })
    clients.add(client)
    return client
  }
  const ingest = (tenant: string, stream: string): Promise<number> =>
    metricValue(gw.httpUrl, 'edgemq_ingest_messages_total', { tenant, stream })
  const payloads = (got: readonly Received[]): string[] => got.map((m) => m.payload)

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-tenants-')
    cleanups.push(cleanup)
    dataDir = path.join(dir, 'data')
    // A cheap scrypt cost keeps the many logins fast; the format is the one `edgemq passwd` prints.
    const users = await Promise.all(Object.entries(USERS).map(async ([username, u]) => ({
      username, ...u, password: await hashPassword(password(username as Username), { N: 1024, r: 8, p: 1 }),
    })))
    const config = await writeConfig(dir, {
      users,
      acl: [
        { role: 'device', topic: 'users/%u/inbox/#', access: 'subscribe' },
        { role: 'device', topic: 'shared/%u/%c', access: 'publish' },
        { username: 'acme-dev', topic: 'devices/%c/telemetry/blocked/#', access: 'publish', allow: false },
        { role: 'service', topic: 'admin/#', access: 'subscribe', allow: false },
      ],
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    })
    gw = await startGatewayProcess({ dataDir, config })
    cleanups.push(async () => { await gw.stop() })
  }, 60_000)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('a globex client never receives acme\'s messages, whatever it subscribes to, and cannot publish into acme', async () => {
    const acmeSvc = await connect('acme-svc', 'acme-backend')
    const acmeSvcGot = collect(acmeSvc)
    expect(await subscribeGranted(acmeSvc, '#', 1)).toEqual([1])
    const acmeDev = await connect('acme-dev', 'sensor-a')
    const acmeDevGot = collect(acmeDev)
    expect(await subscribeGranted(acmeDev, 'devices/sensor-a/commands/#', 1)).toEqual([1])

    // The globex service may use these filters in its own tenant (granted or not, it must see nothing of acme's).
    const globexSvc = await connect('globex-svc', 'globex-backend')
    const globexSvcGot = collect(globexSvc)
    for (const filter of PROBE_FILTERS) expect([1, 128], filter).toContain((await subscribeGranted(globexSvc, filter, 1))[0])
    // The globex device is held to its own command topics.
    const globexDev = await connect('globex-dev', 'sensor-g')
    const globexDevGot = collect(globexDev)
    for (const filter of PROBE_FILTERS) expect(await subscribeGranted(globexDev, filter, 1), filter).toEqual([128])
    expect(await subscribeGranted(globexDev, 'devices/sensor-g/commands/#', 1)).toEqual([1])

    // acme's traffic: QoS 1 and 0, retained, events, a command, an unrouted topic.
    await acmeDev.publishAsync('devices/sensor-a/telemetry/t1', 'acme-secret-telemetry', { qos: 1 })
    await acmeDev.publishAsync('devices/sensor-a/telemetry/t1', 'acme-secret-qos0', { qos: 0 })
    await acmeDev.publishAsync('devices/sensor-a/telemetry/state', 'acme-secret-retained', { qos: 1, retain: true })
    await acmeDev.publishAsync('devices/sensor-a/events/boot', 'acme-secret-event', { qos: 1 })
    await acmeSvc.publishAsync('devices/sensor-a/commands/reboot', 'acme-secret-command', { qos: 1 })
    await acmeSvc.publishAsync('acme-unrouted/x', 'acme-secret-unrouted', { qos: 1 })
    appended('acme/telemetry', 'acme-secret-telemetry', 'acme-secret-qos0', 'acme-secret-retained')
    appended('acme/events', 'acme-secret-event')
    appended('acme/commands', 'acme-secret-command')

    // globex trying to get in: the device by ACL, the service by naming acme's topics (they stay in globex).
    for (const topic of ['devices/sensor-a/telemetry/t1', 'acme/devices/sensor-a/telemetry/t1', 'devices/sensor-a/commands/reboot', 'acme/devices/sensor-a/commands/reboot']) {
      await globexDev.publishAsync(topic, 'globex-intrusion-device', { qos: 1 })
    }
    await globexSvc.publishAsync('acme/devices/sensor-a/commands/reboot', 'globex-intrusion-mounted', { qos: 1 })
    await globexSvc.publishAsync('devices/sensor-a/commands/reboot', 'globex-own-command', { qos: 1 })
    await globexSvc.publishAsync('devices/sensor-a/telemetry/t1', 'globex-own-telemetry', { qos: 1 })
    appended('globex/commands', 'globex-own-command')
    appended('globex/telemetry', 'globex-own-telemetry')
    // A globex will naming acme's topic fires inside globex.
    const willer = await connect('globex-svc', 'globex-willer', { will: { topic: 'devices/sensor-a/commands/reboot', payload: Buffer.from('globex-will'), qos: 1, retain: false } })
    willer.stream.destroy()
    clients.delete(willer)
    appended('globex/commands', 'globex-will') // a will on a routed topic is logged like any publish

    const acmeWanted = ['acme-secret-telemetry', 'acme-secret-qos0', 'acme-secret-retained', 'acme-secret-event', 'acme-secret-command', 'acme-secret-unrouted']
    expect(await waitFor(() => acmeWanted.every((p) => payloads(acmeSvcGot).includes(p)), 5000)).toBe(true)
    expect(await waitFor(() => payloads(acmeDevGot).includes('acme-secret-command'), 5000)).toBe(true)
    // globex's own traffic reaches globex (so the quiet checks below are not vacuous).
    expect(await waitFor(() => ['globex-own-command', 'globex-own-telemetry', 'globex-will'].every((p) => payloads(globexSvcGot).includes(p)), 5000)).toBe(true)
    await Promise.all([acmeSvc, acmeDev, globexSvc, globexDev].map((c) => roundTrip(c))) // what they have not got will not come

    expect(payloads(acmeSvcGot).sort()).toEqual([...acmeWanted].sort())
    expect(acmeDevGot).toEqual([{ topic: 'devices/sensor-a/commands/reboot', payload: 'acme-secret-command' }])
    expect(payloads(globexSvcGot).filter((p) => p.startsWith('acme'))).toEqual([])
    expect(payloads(globexDevGot)).toEqual([])
    // The service's copy of its own command to "sensor-a" is globex's sensor-a, on globex's topic names.
    expect(globexSvcGot.every((m) => !m.topic.startsWith('acme/') || m.payload === 'globex-intrusion-mounted')).toBe(true)

    // A late globex subscriber does not get acme's retained message; a late acme one does. The gateway sends the
    // retained messages of a SUBSCRIBE one filter after the other, each filter's in key (topic) order, and the
    // wide filter comes last: globex's retained "~barrier" (no ASCII topic sorts after "~") is the last message sent.
    await globexSvc.publishAsync(BARRIER_TOPIC, 'globex-barrier', { qos: 1, retain: true })
    const lateGlobex = await connect('globex-svc', 'globex-late')
    const lateGlobexGot = collect(lateGlobex)
    await subscribeGranted(lateGlobex, ['devices/sensor-a/telemetry/state', 'acme/devices/sensor-a/telemetry/state', '#'], 1)
    const lateAcme = await connect('acme-svc', 'acme-late')
    const lateAcmeGot = collect(lateAcme)
    await subscribeGranted(lateAcme, 'devices/sensor-a/telemetry/state', 1)
    expect(await waitFor(() => lateAcmeGot.length > 0, 5000)).toBe(true)
    expect(lateAcmeGot).toEqual([{ topic: 'devices/sensor-a/telemetry/state', payload: 'acme-secret-retained' }])
    expect(await waitFor(() => payloads(lateGlobexGot).includes('globex-barrier'), 5000)).toBe(true)
    expect(payloads(lateGlobexGot).filter((p) => p.startsWith('acme'))).toEqual([])
    await globexSvc.publishAsync(BARRIER_TOPIC, '', { qos: 1, retain: true }) // cleared: later wide subscriptions do not get it

    expect(await ingest('acme', 'telemetry')).toBe(3)
    expect(await ingest('acme', 'events')).toBe(1)
    expect(await ingest('acme', 'commands')).toBe(1)
    expect(await ingest('globex', 'telemetry')).toBe(1)
    expect(await ingest('globex', 'commands')).toBe(2)
    expect(await ingest('default', 'telemetry')).toBe(0)
    await endAll([acmeSvc, acmeDev, globexSvc, globexDev, lateGlobex, lateAcme])
  }, TIMEOUT)

  it('a device publishes only under devices/<its client id>/; a denied PUBLISH is acknowledged but neither logged nor delivered', async () => {
    const svc = await connect('acme-svc', 'acme-acl-watch')
    const got = collect(svc, { live: true })
    expect(await subscribeGranted(svc, '#', 1)).toEqual([1])
    const dev = await connect('acme-dev', 'sensor-b')
    const telemetryBefore = await ingest('acme', 'telemetry')
    const denied = ['devices/sensor-c/telemetry/x', 'devices/acme-dev/telemetry/x', 'devices/sensor-bb/telemetry/x', 'telemetry/sensor-b',
      'sensor-b/devices/telemetry', 'devices', 'acme/devices/sensor-b/telemetry/x', 'admin/alerts']
    for (const topic of denied) {
      // PUBACK comes back (as Mosquitto does), so a device does not retry forever.
      await dev.publishAsync(topic, `denied ${topic}`, { qos: 1 })
    }
    await dev.publishAsync('devices/sensor-b/telemetry/ok', 'allowed telemetry', { qos: 1 })
    await dev.publishAsync('devices/sensor-b/anything/else', 'allowed unrouted', { qos: 1 })
    appended('acme/telemetry', 'allowed telemetry')
    // Same publisher, same subscriber: had a denied message been delivered, it would have come first.
    expect(await waitFor(() => payloads(got).includes('allowed unrouted'), 5000)).toBe(true)
    expect(payloads(got)).toEqual(['allowed telemetry', 'allowed unrouted'])
    expect(await ingest('acme', 'telemetry')).toBe(telemetryBefore + 1)
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_publishes_refused_total', { tenant: 'acme', reason: 'acl-denied' })).toBeGreaterThanOrEqual(denied.length)
    await endAll([svc, dev])
  }, TIMEOUT)

  it('a denied SUBSCRIBE gets SUBACK 0x80 and receives nothing on that filter', async () => {
    const dev = await connect('acme-dev', 'sensor-d')
    const got = collect(dev)
    const filters = ['#', 'devices/+/commands/#', 'devices/sensor-e/commands/#', 'devices/sensor-d/telemetry/#', 'devices/sensor-d/#',
      'devices/sensor-d/+/reboot', 'users/+/inbox/#', 'devices/sensor-d/commands/#', 'devices/sensor-d/commands/reboot']
    expect(await subscribeGranted(dev, filters, 1)).toEqual([128, 128, 128, 128, 128, 128, 128, 1, 1])
    const svc = await connect('acme-svc', 'acme-commander')
    for (const topic of ['devices/sensor-e/commands/reboot', 'devices/sensor-d/telemetry/t', 'devices/sensor-d/events/e', 'users/acme-dev/other']) {
      await svc.publishAsync(topic, `not for sensor-d: ${topic}`, { qos: 1 })
    }
    await svc.publishAsync('devices/sensor-d/commands/reboot', 'for sensor-d', { qos: 1 })
    appended('acme/commands', 'not for sensor-d: devices/sensor-e/commands/reboot', 'for sensor-d')
    appended('acme/telemetry', 'not for sensor-d: devices/sensor-d/telemetry/t')
    appended('acme/events', 'not for sensor-d: devices/sensor-d/events/e')
    // Two granted filters match the command; MQTT 3.1.1 allows one copy per matching subscription.
    expect(await waitFor(() => got.length > 0, 5000)).toBe(true)
    await roundTrip(dev) // after the PUBACKs: what it has not got will not come
    expect([...new Set(payloads(got))]).toEqual(['for sensor-d'])
    await endAll([dev, svc])
  }, TIMEOUT)

  it('configured rules: %u in a subscribe rule, %u and %c in a publish rule', async () => {
    const dev = await connect('acme-dev', 'sensor-u')
    const devGot = collect(dev)
    expect(await subscribeGranted(dev, ['users/acme-dev/inbox/#', 'users/sensor-u/inbox/#', 'users/acme-svc/inbox/#', 'users/+/inbox/#'], 1)).toEqual([1, 128, 128, 128])
    const svc = await connect('acme-svc', 'acme-mailer')
    const svcGot = collect(svc)
    expect(await subscribeGranted(svc, 'shared/#', 1)).toEqual([1])
    await svc.publishAsync('users/acme-svc/inbox/x', 'not yours', { qos: 1 })
    await svc.publishAsync('users/acme-dev/inbox/hello', 'you have mail', { qos: 1 })
    expect(await waitFor(() => devGot.length > 0, 5000)).toBe(true)
    expect(devGot).toEqual([{ topic: 'users/acme-dev/inbox/hello', payload: 'you have mail' }])

    for (const topic of ['shared/sensor-u/acme-dev', 'shared/acme-dev/sensor-x', 'shared/acme-svc/sensor-u', 'shared/acme-dev/sensor-u/more']) {
      await dev.publishAsync(topic, `denied ${topic}`, { qos: 1 })
    }
    await dev.publishAsync('shared/acme-dev/sensor-u', 'by %u and %c', { qos: 1 })
    expect(await waitFor(() => svcGot.length > 0, 5000)).toBe(true)
    expect(svcGot).toEqual([{ topic: 'shared/acme-dev/sensor-u', payload: 'by %u and %c' }])
    await endAll([dev, svc])
  }, TIMEOUT)

  it('a deny rule wins over the built-in allow (publish), and applies only to whom it names', async () => {
    const svc = await connect('acme-svc', 'acme-deny-watch')
    const got = collect(svc, { live: true })
    expect(await subscribeGranted(svc, 'devices/#', 1)).toEqual([1])
    const dev = await connect('acme-dev', 'sensor-x')
    const before = await ingest('acme', 'telemetry')
    await dev.publishAsync('devices/sensor-x/telemetry/blocked/a', 'blocked by rule', { qos: 1 })
    await dev.publishAsync('devices/sensor-x/telemetry/blocked', 'blocked by rule (parent level)', { qos: 1 })
    await dev.publishAsync('devices/sensor-x/telemetry/open', 'not blocked', { qos: 1 })
    appended('acme/telemetry', 'not blocked')
    expect(await waitFor(() => got.length > 0, 5000)).toBe(true)
    await roundTrip(svc) // after the PUBACKs: what it has not got will not come
    expect(payloads(got)).toEqual(['not blocked'])
    expect(await ingest('acme', 'telemetry')).toBe(before + 1)

    // The rule names acme-dev; globex's device is not affected.
    const gsvc = await connect('globex-svc', 'globex-deny-watch')
    const ggot = collect(gsvc, { live: true })
    expect(await subscribeGranted(gsvc, 'devices/#', 1)).toEqual([1])
    const gdev = await connect('globex-dev', 'sensor-gx')
    await gdev.publishAsync('devices/sensor-gx/telemetry/blocked/a', 'globex not blocked', { qos: 1 })
    appended('globex/telemetry', 'globex not blocked')
    expect(await waitFor(() => ggot.length > 0, 5000)).toBe(true)
    expect(payloads(ggot)).toEqual(['globex not blocked'])
    await endAll([svc, dev, gsvc, gdev])
  }, TIMEOUT)

  it('a deny rule wins over the built-in allow (subscribe): SUBACK 0x80 for the filter it covers', async () => {
    const svc = await connect('acme-svc', 'acme-admin-probe')
    expect(await subscribeGranted(svc, ['admin/#', 'admin/alerts', 'admin/+', 'devices/#'], 1)).toEqual([128, 128, 128, 1])
    await endAll([svc])
  }, TIMEOUT)

  it('a subscribe deny rule is not bypassed with a wider filter: a "#" subscriber does not receive admin/… messages', async () => {
    const watcher = await connect('acme-svc', 'acme-wide')
    const got = collect(watcher, { live: true })
    expect(await subscribeGranted(watcher, '#', 1)).toEqual([1])
    const publisher = await connect('acme-svc', 'acme-admin-publisher')
    await publisher.publishAsync('admin/alerts', 'admin only', { qos: 1 })
    await publisher.publishAsync('ops/after', 'marker', { qos: 1 })
    expect(await waitFor(() => payloads(got).includes('marker'), 5000)).toBe(true)
    expect(payloads(got)).toEqual(['marker'])
    await endAll([watcher, publisher])
  }, TIMEOUT)

  it('a globex client using an acme device\'s client id does not disconnect the acme device', async () => {
    const acmeDev = await connect('acme-dev', 'sensor-p')
    const got = collect(acmeDev)
    expect(await subscribeGranted(acmeDev, 'devices/sensor-p/commands/#', 1)).toEqual([1])
    let closed = false
    acmeDev.on('close', () => { closed = true })
    const intruder = await tryConnect(gw.mqttUrl, { clientId: 'sensor-p', username: 'globex-dev', password: password('globex-dev') })
    if (intruder.ok) clients.add(intruder.client)
    await roundTrip(acmeDev) // a takeover would have closed it before the intruder's CONNACK
    expect(closed).toBe(false)
    const svc = await connect('acme-svc', 'acme-p-commander')
    await svc.publishAsync('devices/sensor-p/commands/ping', 'still there?', { qos: 1 })
    appended('acme/commands', 'still there?')
    expect(await waitFor(() => got.length > 0, 5000)).toBe(true)
    await endAll([acmeDev, svc, ...(intruder.ok ? [intruder.client] : [])])
  }, TIMEOUT)

  it('a globex client using an acme device\'s client id neither reads nor wipes the acme device\'s persistent session', async () => {
    const acmeDev = await connect('acme-dev', 'sensor-q', { clean: false })
    expect(await subscribeGranted(acmeDev, 'devices/sensor-q/commands/#', 1)).toEqual([1])
    await acmeDev.endAsync()
    clients.delete(acmeDev)
    const svc = await connect('acme-svc', 'acme-q-commander')
    await svc.publishAsync('devices/sensor-q/commands/update', 'queued for sensor-q', { qos: 1 })
    appended('acme/commands', 'queued for sensor-q')

    // globex's device takes the same client id, first with a persistent session, then with a clean one.
    for (const clean of [false, true]) {
      const intruder = await tryConnect(gw.mqttUrl, { clientId: 'sensor-q', clean, username: 'globex-dev', password: password('globex-dev') })
      if (intruder.ok) {
        const stolen = collect(intruder.client)
        await roundTrip(intruder.client) // read after its CONNECT is done, queued messages included
        expect(stolen, `clean=${clean}`).toEqual([])
        await intruder.client.endAsync()
      }
    }

    const back = await connectOk(gw.mqttUrl, { clientId: 'sensor-q', clean: false, username: 'acme-dev', password: password('acme-dev'), protocolVersion: 4, reconnectPeriod: 0 })
    clients.add(back)
    const got = collect(back)
    expect(await waitFor(() => got.length > 0, 15_000)).toBe(true)
    expect(got).toEqual([{ topic: 'devices/sensor-q/commands/update', payload: 'queued for sensor-q' }])
    await endAll([back, svc])
  }, TIMEOUT)

  it('the log on disk: each tenant\'s streams hold exactly its own accepted messages; nothing denied was appended', async () => {
    await endAll(clients)
    clients.clear()
    expect(await gw.stop()).toBe(0)
    const log = await readWholeLog(dataDir)
    const byStream = new Map<string, string[]>()
    for (const r of log) byStream.set(r.stream, [...(byStream.get(r.stream) ?? []), r.payload])
    const sorted = (m: Map<string, string[]>): Record<string, string[]> =>
      Object.fromEntries([...m].filter(([, v]) => v.length > 0).map(([k, v]) => [k, [...v].sort()]).sort(([a], [b]) => (a as string).localeCompare(b as string)))
    expect(sorted(byStream)).toEqual(sorted(expectedLog))
    // Records carry the publisher's topic without the tenant prefix, keyed by the device id level.
    for (const r of log) {
      expect(r.topic.startsWith('acme/') || r.topic.startsWith('globex/'), r.topic).toBe(false)
      expect(r.key).toBe(r.topic.split('/')[1])
    }
    // ... and the client id the publisher sent.
    const telemetry = log.find((r) => r.payload === 'acme-secret-telemetry')
    expect(telemetry).toMatchObject({ stream: 'acme/telemetry', clientId: 'sensor-a', key: 'sensor-a', topic: 'devices/sensor-a/telemetry/t1' })
  }, TIMEOUT)
})
