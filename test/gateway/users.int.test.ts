/**
 * Users and passwords end to end: a hash printed by `edgemq passwd` (password
 * on stdin) works as users[].password; a wrong password or an unknown user
 * gets CONNACK 4; with users configured an anonymous client gets CONNACK 5,
 * unless its listener has allowAnonymous: true (then it is tenant "default").
 */
import path from 'node:path'
import type { MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { runCli, startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../helpers/gateway-process.ts'
import { collect, connectOk, endAll, metricValue, roundTrip, subscribeGranted, tryConnect, waitFor } from '../helpers/mqtt-probe.ts'

const TIMEOUT = 30_000
const PASSWORD = 'correct horse battery staple'

describe('users, passwords and anonymous clients', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess
  let closedUrl: string
  let openUrl: string
  let firstHash: string

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-users-')
    cleanups.push(cleanup)
    const passwd = await runCli(['passwd'], `${PASSWORD}\n`)
    expect(passwd.code, passwd.stderr).toBe(0)
    const hash = firstHash = passwd.stdout.trim()
    expect(hash).toMatch(/^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$/)
    const config = await writeConfig(dir, {
      users: [
        { username: 'alice', password: hash, tenant: 'acme', role: 'service' },
        { username: 'cert-only', tenant: 'acme', role: 'device' },
      ],
      mqtt: {
        listeners: [
          { name: 'closed', type: 'tcp', port: 0 },
          { name: 'open', type: 'tcp', port: 0, allowAnonymous: true },
        ],
      },
    })
    gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    cleanups.push(async () => { await gw.stop() })
    closedUrl = gw.urls.closed as string
    openUrl = gw.urls.open as string
  }, 60_000)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('a hash from `edgemq passwd` logs the user in', async () => {
    const client = await connectOk(closedUrl, { clientId: 'alice-1', username: 'alice', password: PASSWORD })
    clients.add(client)
    expect(client.connected).toBe(true)
    await endAll([client])
  }, TIMEOUT)

  it('`edgemq passwd` salts: two hashes of one password differ, and both verify', async () => {
    const again = await runCli(['passwd'], PASSWORD)
    expect(again.code, again.stderr).toBe(0)
    expect(again.stdout.trim()).not.toBe(firstHash)
    const { dir, cleanup } = await tempDir('edgemq-users2-')
    cleanups.push(cleanup)
    const config = await writeConfig(dir, {
      users: [{ username: 'bob', password: again.stdout.trim(), tenant: 'acme', role: 'service' }],
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    })
    const gw2 = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    try {
      const client = await connectOk(gw2.mqttUrl, { clientId: 'bob-1', username: 'bob', password: PASSWORD })
      await endAll([client])
    } finally {
      expect(await gw2.stop()).toBe(0)
    }
  }, TIMEOUT)

  it('`edgemq passwd` with an empty password fails', async () => {
    const r = await runCli(['passwd'], '\n')
    expect(r.code).toBe(1)
    expect(r.stdout).toBe('')
    expect(r.stderr).toContain('GW_BAD_PASSWORD_HASH')
  }, TIMEOUT)

  it('a wrong password gets CONNACK 4', async () => {
    const outcome = await tryConnect(closedUrl, { clientId: 'alice-2', username: 'alice', password: `${PASSWORD}!` })
    expect(outcome).toMatchObject({ ok: false, returnCode: 4 })
    // The password of another listener does not matter: the open listener checks credentials too.
    const open = await tryConnect(openUrl, { clientId: 'alice-3', username: 'alice', password: 'wrong' })
    expect(open).toMatchObject({ ok: false, returnCode: 4 })
  }, TIMEOUT)

  it('an unknown user gets CONNACK 4', async () => {
    const outcome = await tryConnect(closedUrl, { clientId: 'mallory-1', username: 'mallory', password: PASSWORD })
    expect(outcome).toMatchObject({ ok: false, returnCode: 4 })
  }, TIMEOUT)

  it('a user without a password (certificate-only) cannot log in with any password', async () => {
    for (const password of ['', 'x', PASSWORD]) {
      const outcome = await tryConnect(closedUrl, { clientId: 'cert-only-1', username: 'cert-only', password })
      expect(outcome, JSON.stringify(password)).toMatchObject({ ok: false, returnCode: 4 })
    }
    const noPassword = await tryConnect(closedUrl, { clientId: 'cert-only-2', username: 'cert-only' })
    expect(noPassword).toMatchObject({ ok: false, returnCode: 4 })
  }, TIMEOUT)

  it('with users configured an anonymous client gets CONNACK 5', async () => {
    const outcome = await tryConnect(closedUrl, { clientId: 'anon-1' })
    expect(outcome).toMatchObject({ ok: false, returnCode: 5 })
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_connections_refused_total', { listener: 'closed', reason: 'not-authorized' })).toBeGreaterThanOrEqual(1)
  }, TIMEOUT)

  it('allowAnonymous: true admits anonymous clients, as tenant "default", isolated from the users\' tenant', async () => {
    const alice = await connectOk(closedUrl, { clientId: 'alice-watch', username: 'alice', password: PASSWORD })
    clients.add(alice)
    const aliceGot = collect(alice)
    expect(await subscribeGranted(alice, '#', 1)).toEqual([1])

    const anon = await connectOk(openUrl, { clientId: 'anon-dev' })
    clients.add(anon)
    const anonGot = collect(anon)
    expect(await subscribeGranted(anon, 'devices/+/telemetry/#', 1)).toEqual([1])
    const before = await metricValue(gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'default', stream: 'telemetry' })
    await anon.publishAsync('devices/anon-dev/telemetry/t', 'anonymous hello', { qos: 1 })
    expect(await waitFor(() => anonGot.length > 0, 5000)).toBe(true)
    expect(anonGot.map((m) => m.payload)).toEqual(['anonymous hello'])
    expect(await metricValue(gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'default', stream: 'telemetry' })).toBe(before + 1)
    expect(await metricValue(gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'acme' })).toBe(0)
    // anon's PUBACK came after the message was written to every matching subscriber: after a round trip on alice's
    // connection, what alice has not got will not come.
    await roundTrip(alice)
    expect(aliceGot).toEqual([])
    await endAll([alice, anon])
  }, TIMEOUT)

  it('the user logs in on the allowAnonymous listener too, with the user\'s tenant', async () => {
    const alice = await connectOk(openUrl, { clientId: 'alice-open', username: 'alice', password: PASSWORD })
    clients.add(alice)
    await alice.publishAsync('devices/x/telemetry/t', 'from alice', { qos: 1 })
    expect(await metricValue(gw.httpUrl, 'edgemq_ingest_messages_total', { tenant: 'acme', stream: 'telemetry' })).toBe(1)
    await endAll([alice])
  }, TIMEOUT)
})
