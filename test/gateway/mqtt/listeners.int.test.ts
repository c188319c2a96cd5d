/**
 * The four MQTT front doors of `edgemq start` — TCP, TLS, WebSocket (/mqtt)
 * and secure WebSocket — with real MQTT.js clients, and TLS client
 * certificates: requestCert refuses clients without a certificate or with
 * one from another CA; certIdentity makes the certificate's CN the user, with
 * that user's tenant and role.
 *
 * Certificates are made with the openssl command at test time
 * (test/helpers/tls-fixtures.ts); without openssl the TLS tests skip (tcp
 * and ws still run), except under CI=true, where one test fails instead.
 */
import path from 'node:path'
import type { IClientOptions, MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../../gateway/access/auth.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { collect, connectOk, endAll, metricValue, roundTrip, subscribeGranted, tryConnect, waitFor } from '../../helpers/mqtt-probe.ts'
import { createPki, loadKeyPair, opensslPolicy, type Pki } from '../../helpers/tls-fixtures.ts'

const openssl = opensslPolicy()
const TIMEOUT = 30_000

interface Harness {
  pki: Pki
  gw: GatewayProcess
  clients: Set<MqttClient>
  cleanups: Array<() => Promise<void>>
}

async function startWith (h: Pick<Harness, 'cleanups'>, dir: string, config: Record<string, unknown>): Promise<GatewayProcess> {
  const file = await writeConfig(dir, config)
  const gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config: file })
  h.cleanups.push(async () => { await gw.stop() })
  return gw
}

function track (h: Pick<Harness, 'clients'>, client: MqttClient): MqttClient {
  h.clients.add(client)
  return client
}

async function teardown (h: Partial<Harness> & Pick<Harness, 'clients' | 'cleanups'>): Promise<void> {
  await endAll(h.clients)
  for (const c of h.cleanups.reverse()) await c().catch(() => {})
}

it('has the openssl command to make test certificates when CI=true (.ci/run installs it)', () => {
  expect(openssl.missingInCi, 'openssl is not installed but CI=true: the TLS listener tests did not run').toBe(false)
})

// tcp and ws run everywhere; tls and wss need the certificates openssl makes.
describe('MQTT listeners: tcp, tls, ws, wss', () => {
  const h: Harness = { clients: new Set(), cleanups: [] } as unknown as Harness
  const types = openssl.available ? ['tcp', 'tls', 'ws', 'wss'] as const : ['tcp', 'ws'] as const
  let tlsClient: IClientOptions = {}

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-listeners-')
    h.cleanups.push(cleanup)
    const listeners: Array<Record<string, unknown>> = [{ type: 'tcp', port: 0 }, { type: 'ws', port: 0 }]
    if (openssl.available) {
      h.pki = await createPki(path.join(dir, 'pki'))
      const tls = { cert: h.pki.server.cert, key: h.pki.server.key }
      listeners.push({ type: 'tls', port: 0, tls }, { type: 'wss', port: 0, tls })
      tlsClient = { ca: h.pki.ca }
    }
    h.gw = await startWith(h, dir, { mqtt: { listeners } })
  }, 60_000)
  afterAll(() => teardown(h), 30_000)

  it('prints a URL for every listener on the ready line', () => {
    expect(h.gw.urls.tcp).toMatch(/^mqtt:\/\/127\.0\.0\.1:\d+$/)
    expect(h.gw.urls.ws).toMatch(/^ws:\/\/127\.0\.0\.1:\d+\/mqtt$/)
    if (openssl.available) {
      expect(h.gw.urls.tls).toMatch(/^mqtts:\/\/127\.0\.0\.1:\d+$/)
      expect(h.gw.urls.wss).toMatch(/^wss:\/\/127\.0\.0\.1:\d+\/mqtt$/)
    }
  })

  for (const name of types) {
    it(`${name}: connect, subscribe, publish QoS 1, receive; the message is logged`, async () => {
      const url = h.gw.urls[name] as string
      const opts = name === 'tls' || name === 'wss' ? tlsClient : {}
      const before = await metricValue(h.gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'default', stream: 'telemetry' })
      const sub = track(h, await connectOk(url, { ...opts, clientId: `sub-${name}` }))
      const got = collect(sub)
      expect(await subscribeGranted(sub, `devices/dev-${name}/telemetry/#`, 1)).toEqual([1])
      const pub = track(h, await connectOk(url, { ...opts, clientId: `dev-${name}` }))
      await pub.publishAsync(`devices/dev-${name}/telemetry/temp`, `hello over ${name}`, { qos: 1 })
      expect(await waitFor(() => got.length > 0, 5000)).toBe(true)
      expect(got).toEqual([{ topic: `devices/dev-${name}/telemetry/temp`, payload: `hello over ${name}` }])
      expect(await metricValue(h.gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'default', stream: 'telemetry' })).toBe(before + 1)
      await endAll([sub, pub])
    }, TIMEOUT)
  }

  it('delivers across listeners (publish over tcp, receive over ws / wss)', async () => {
    const over = openssl.available ? 'wss' : 'ws'
    const sub = track(h, await connectOk(h.gw.urls[over] as string, { ...tlsClient, clientId: 'cross-sub' }))
    const got = collect(sub)
    expect(await subscribeGranted(sub, 'devices/cross/telemetry/#', 1)).toEqual([1])
    const pub = track(h, await connectOk(h.gw.urls.tcp as string, { clientId: 'cross' }))
    await pub.publishAsync('devices/cross/telemetry/x', 'across', { qos: 1 })
    expect(await waitFor(() => got.length > 0, 5000)).toBe(true)
    expect(got.map((m) => m.payload)).toEqual(['across'])
  }, TIMEOUT)

  it('a WebSocket client on another path is not served', async () => {
    const url = (h.gw.urls.ws as string).replace(/\/mqtt$/, '/other')
    const outcome = await tryConnect(url, { clientId: 'wrong-path' }, 5000)
    expect(outcome).toMatchObject({ ok: false, returnCode: null })
  }, TIMEOUT)

  it.skipIf(!openssl.available)('a TLS client that does not trust the server certificate does not connect', async () => {
    const outcome = await tryConnect(h.gw.urls.tls as string, { clientId: 'no-ca' })
    expect(outcome).toMatchObject({ ok: false, returnCode: null })
  }, TIMEOUT)
})

describe.skipIf(!openssl.available)('TLS client certificates: requestCert and certIdentity', () => {
  const h: Harness = { clients: new Set(), cleanups: [] } as unknown as Harness
  let devCert: { cert: Buffer, key: Buffer }
  let svcCert: { cert: Buffer, key: Buffer }
  let strangerCert: { cert: Buffer, key: Buffer }
  let foreignDevCert: { cert: Buffer, key: Buffer }
  let foreignSvcCert: { cert: Buffer, key: Buffer }
  const GLOBEX_PASSWORD = 'globex-pw'

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-mtls-')
    h.cleanups.push(cleanup)
    const pki = h.pki = await createPki(path.join(dir, 'pki'))
    devCert = await loadKeyPair(await pki.client('acme-dev-1'))
    svcCert = await loadKeyPair(await pki.client('acme-svc'))
    strangerCert = await loadKeyPair(await pki.client('stranger'))
    foreignDevCert = await loadKeyPair(await pki.foreignClient('acme-dev-1'))
    foreignSvcCert = await loadKeyPair(await pki.foreignClient('acme-svc'))
    const server = { cert: pki.server.cert, key: pki.server.key, ca: pki.caFile, requestCert: true }
    h.gw = await startWith(h, dir, {
      users: [
        { username: 'acme-dev-1', tenant: 'acme', role: 'device' },
        { username: 'acme-svc', tenant: 'acme', role: 'service' },
        { username: 'globex-svc', tenant: 'globex', role: 'service', password: await hashPassword(GLOBEX_PASSWORD, { N: 1024, r: 8, p: 1 }) },
      ],
      mqtt: {
        listeners: [
          { name: 'tcp', type: 'tcp', port: 0 },
          { name: 'mtls', type: 'tls', port: 0, allowAnonymous: true, tls: server },
          { name: 'certid', type: 'tls', port: 0, tls: { ...server, certIdentity: true } },
          { name: 'wss-certid', type: 'wss', port: 0, tls: { ...server, certIdentity: true } },
        ],
      },
    })
  }, 60_000)
  afterAll(() => teardown(h), 30_000)

  const tlsOpts = (pair?: { cert: Buffer, key: Buffer }): IClientOptions => ({ ca: h.pki.ca, ...(pair ?? {}) })

  it('requestCert: a client without a certificate is refused', async () => {
    for (const name of ['mtls', 'certid', 'wss-certid']) {
      const outcome = await tryConnect(h.gw.urls[name] as string, { ...tlsOpts(), clientId: `nocert-${name}` })
      expect(outcome, name).toMatchObject({ ok: false, returnCode: null })
    }
  }, TIMEOUT)

  it('requestCert: a client certificate from another CA is refused, even with a configured user\'s CN', async () => {
    for (const name of ['mtls', 'certid', 'wss-certid']) {
      for (const pair of [foreignDevCert, foreignSvcCert]) {
        const outcome = await tryConnect(h.gw.urls[name] as string, { ...tlsOpts(pair), clientId: `foreign-${name}` })
        expect(outcome, name).toMatchObject({ ok: false, returnCode: null })
      }
    }
  }, TIMEOUT)

  it('requestCert without certIdentity: a certificate from the CA is accepted and the client works', async () => {
    const sub = track(h, await connectOk(h.gw.urls.mtls as string, { ...tlsOpts(strangerCert), clientId: 'mtls-sub' }))
    const got = collect(sub)
    expect(await subscribeGranted(sub, 'devices/mtls-dev/telemetry/#', 1)).toEqual([1])
    const pub = track(h, await connectOk(h.gw.urls.mtls as string, { ...tlsOpts(devCert), clientId: 'mtls-dev' }))
    await pub.publishAsync('devices/mtls-dev/telemetry/t', 'over mutual TLS', { qos: 1 })
    expect(await waitFor(() => got.length > 0, 5000)).toBe(true)
    expect(got.map((m) => m.payload)).toEqual(['over mutual TLS'])
    // Anonymous on this listener means tenant "default".
    expect(await metricValue(h.gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'default', stream: 'telemetry' })).toBe(1)
    await endAll([sub, pub])
  }, TIMEOUT)

  it('certIdentity: the CN is the user — a device cert gets the device role in its tenant, a service cert the service role', async () => {
    const url = h.gw.urls.certid as string
    // The acme service, by certificate only: no username, no password.
    const svc = track(h, await connectOk(url, { ...tlsOpts(svcCert), clientId: 'acme-backend' }))
    const svcGot = collect(svc)
    expect(await subscribeGranted(svc, 'devices/+/telemetry/#', 1)).toEqual([1])
    // A globex service (password login) listening to everything of its own tenant.
    const globex = track(h, await connectOk(h.gw.urls.tcp as string, { clientId: 'globex-backend', username: 'globex-svc', password: GLOBEX_PASSWORD }))
    const globexGot = collect(globex)
    expect(await subscribeGranted(globex, '#', 1)).toEqual([1])

    const dev = track(h, await connectOk(url, { ...tlsOpts(devCert), clientId: 'acme-dev-1' }))
    const devGot = collect(dev)
    // Device role: its own command topics only.
    expect(await subscribeGranted(dev, ['#', 'devices/+/telemetry/#', 'devices/acme-dev-1/commands/#'], 1)).toEqual([128, 128, 1])
    await dev.publishAsync('devices/acme-dev-1/telemetry/temp', '21.5', { qos: 1 })
    expect(await waitFor(() => svcGot.length > 0, 5000)).toBe(true)
    expect(svcGot).toEqual([{ topic: 'devices/acme-dev-1/telemetry/temp', payload: '21.5' }])
    // The service role may command the device.
    await svc.publishAsync('devices/acme-dev-1/commands/reboot', 'now', { qos: 1 })
    expect(await waitFor(() => devGot.length > 0, 5000)).toBe(true)
    expect(devGot).toEqual([{ topic: 'devices/acme-dev-1/commands/reboot', payload: 'now' }])
    await roundTrip(globex) // after the PUBACKs: what it has not got will not come
    expect(globexGot).toEqual([])
    expect(await metricValue(h.gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'acme', stream: 'telemetry' })).toBe(1)
    expect(await metricValue(h.gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'acme', stream: 'commands' })).toBe(1)
    await endAll([svc, globex, dev])
  }, TIMEOUT)

  it('certIdentity: the certificate, not the CONNECT username, decides who the client is', async () => {
    // A device certificate claiming to be the service user must not get the service role.
    const outcome = await tryConnect(h.gw.urls.certid as string, { ...tlsOpts(devCert), clientId: 'acme-dev-1', username: 'acme-svc', password: 'anything' })
    if (outcome.ok) {
      track(h, outcome.client)
      expect(await subscribeGranted(outcome.client, '#', 1)).toEqual([128])
      await endAll([outcome.client])
    } else {
      expect([4, 5]).toContain(outcome.returnCode)
    }
  }, TIMEOUT)

  it('certIdentity: a device certificate is bound to its client id, like a device login', async () => {
    const outcome = await tryConnect(h.gw.urls.certid as string, { ...tlsOpts(devCert), clientId: 'acme-dev-2' })
    expect(outcome.ok ? 0 : outcome.returnCode).toBe(2) // identifier rejected
    expect(await metricValue(h.gw.httpUrl, 'edgemq_mqtt_connections_refused_total', { listener: 'certid', reason: 'client-id-not-bound' })).toBe(1)
  }, TIMEOUT)

  it('certIdentity: a CN that is not a configured user is refused', async () => {
    const outcome = await tryConnect(h.gw.urls.certid as string, { ...tlsOpts(strangerCert), clientId: 'stranger' })
    expect(outcome.ok).toBe(false)
    expect([4, 5]).toContain(outcome.ok ? 0 : outcome.returnCode)
    // Nor does a password login get around it for an unknown name.
    const withPassword = await tryConnect(h.gw.urls.certid as string, { ...tlsOpts(strangerCert), clientId: 'stranger', username: 'stranger', password: 'x' })
    expect(withPassword.ok).toBe(false)
  }, TIMEOUT)

  it('certIdentity over secure WebSocket: the CN is the user', async () => {
    const url = h.gw.urls['wss-certid'] as string
    const svc = track(h, await connectOk(url, { ...tlsOpts(svcCert), clientId: 'acme-backend-ws' }))
    const got = collect(svc)
    expect(await subscribeGranted(svc, 'devices/+/events/#', 1)).toEqual([1])
    const dev = track(h, await connectOk(url, { ...tlsOpts(devCert), clientId: 'acme-dev-1' }))
    expect(await subscribeGranted(dev, '#', 1)).toEqual([128])
    await dev.publishAsync('devices/acme-dev-1/events/boot', 'up', { qos: 1 })
    expect(await waitFor(() => got.length > 0, 5000)).toBe(true)
    expect(got).toEqual([{ topic: 'devices/acme-dev-1/events/boot', payload: 'up' }])
    const stranger = await tryConnect(url, { ...tlsOpts(strangerCert), clientId: 'stranger-ws' })
    expect(stranger.ok).toBe(false)
    await endAll([svc, dev])
  }, TIMEOUT)
})
