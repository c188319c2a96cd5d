/**
 * GET /v1/sessions and `edgemq sessions` end to end: an in-process gateway on
 * port 0, two tenants, real MQTT.js clients. A persistent subscriber of tenant
 * acme goes offline, a device publishes, the lag shows in messages and
 * seconds, a copy of an unrouted message is counted as queued; the subscriber
 * reconnects and drains, the lag goes to 0. Tenant
 * globex, whose own persistent session has the same client id, never sees
 * acme's, nor acme globex's.
 */
import path from 'node:path'
import mqtt, { type MqttClient } from 'mqtt'
import { pino } from 'pino'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../../gateway/access/auth.ts'
import { sessionsTable } from '../../../gateway/cli/sessions.ts'
import { buildConfig } from '../../../gateway/config/config.ts'
import { startGateway, type Gateway } from '../../../gateway/gateway.ts'
import { MAX_SESSIONS_PER_PAGE, type SessionDoc } from '../../../gateway/query/sessions.ts'
import { runCliWithin } from '../../helpers/cli-run.ts'
import { tempDir } from '../../helpers/gateway-process.ts'
import { sleep, waitFor } from '../../helpers/mqtt-probe.ts'

const silent = pino({ level: 'silent' })
const USERS = {
  'acme-svc': { tenant: 'acme', role: 'service' },
  'acme-dev': { tenant: 'acme', role: 'device' },
  'globex-svc': { tenant: 'globex', role: 'service' },
  'initech-svc': { tenant: 'initech', role: 'service' },
} as const
type Username = keyof typeof USERS
const password = (user: string): string => `pw-${user}`
const basic = (user: Username): string => `Basic ${Buffer.from(`${user}:${password(user)}`).toString('base64')}`
const MESSAGES = 50

describe('GET /v1/sessions and edgemq sessions', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients: MqttClient[] = []
  let gw: Gateway
  let base: string
  let mqttUrl: string

  afterAll(async () => {
    for (const c of clients) c.end(true)
    for (const c of cleanups.reverse()) await c()
  })

  async function connect (user: Username, clientId: string, clean = true): Promise<MqttClient> {
    const c = await mqtt.connectAsync(mqttUrl, { clientId, username: user, password: password(user), protocolVersion: 4, reconnectPeriod: 0, clean })
    clients.push(c)
    return c
  }

  async function call (pathAndQuery: string, user: Username = 'acme-svc'): Promise<{ status: number, body: unknown }> {
    const res = await fetch(`${base}${pathAndQuery}`, { headers: { authorization: basic(user) } })
    return { status: res.status, body: await res.json() }
  }

  async function sessions (user: Username = 'acme-svc'): Promise<{ tenant: string, sessions: SessionDoc[] }> {
    const res = await call('/v1/sessions', user)
    expect(res.status).toBe(200)
    return res.body as { tenant: string, sessions: SessionDoc[] }
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-sessions-')
    cleanups.push(cleanup)
    const users = await Promise.all(Object.entries(USERS).map(async ([username, u]) => ({
      username, ...u, password: await hashPassword(password(username), { N: 1024, r: 8, p: 1 }),
    })))
    const config = buildConfig({
      dataDir: path.join(dir, 'data'),
      users,
      streams: { telemetry: { partitions: 1, retentionMs: 0 } },
      routes: [{ filter: 'devices/+/telemetry/#', stream: 'telemetry', keyLevel: 1 }],
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      http: { port: 0 },
    })
    gw = await startGateway(config, { logger: silent })
    cleanups.push(() => gw.close())
    base = `http://127.0.0.1:${gw.http.port}`
    mqttUrl = `mqtt://127.0.0.1:${gw.listeners[0]!.port}`
  })

  it('shows an offline persistent subscriber\'s lag in messages and seconds, 0 once it drained, and only to its tenant', async () => {
    // The same client id in two tenants: two sessions, each seen by its own tenant only.
    const sub = await connect('acme-svc', 'billing', false)
    await sub.subscribeAsync({ 'devices/+/telemetry/#': { qos: 1 }, 'alerts/#': { qos: 1 } })
    await sub.endAsync()
    const other = await connect('globex-svc', 'billing', false)
    await other.subscribeAsync('globex-only/#', { qos: 1 })
    await other.endAsync()

    const dev = await connect('acme-dev', 'acme-dev')
    const firstSent = Date.now()
    for (let i = 0; i < MESSAGES; i++) await dev.publishAsync('devices/acme-dev/telemetry/t', `m${i}`, { qos: 1 })
    // No route sends alerts/ to the log: the session keeps a copy.
    const ops = await connect('acme-svc', 'ops')
    await ops.publishAsync('alerts/fire', 'a1', { qos: 1 })
    // The lag in seconds is now − the first unacknowledged record's timestamp: let the clock pass it (an event, not a sleep).
    const lastAcked = Date.now()
    while (Date.now() <= lastAcked) await sleep(1)

    const acme = await sessions()
    expect(acme.tenant).toBe('acme')
    expect(acme.sessions).toHaveLength(1)
    const offline = acme.sessions[0]!
    expect(offline).toMatchObject({
      clientId: 'billing', connected: false, lagMessages: MESSAGES, queued: 1,
    })
    expect(offline.offlineSince).toBeGreaterThan(0)
    expect([...offline.subscriptions].sort((a, b) => a.filter.localeCompare(b.filter)))
      .toEqual([{ filter: 'alerts/#', qos: 1 }, { filter: 'devices/+/telemetry/#', qos: 1 }])
    expect(offline.cursors).toHaveLength(1)
    expect(offline.cursors[0]).toMatchObject({ stream: 'telemetry', partition: 0, logEndOffset: MESSAGES, lagMessages: MESSAGES })
    expect(offline.lagSeconds).toBeGreaterThan(0)
    expect(offline.lagSeconds).toBeLessThanOrEqual((Date.now() - firstSent) / 1000)
    expect(offline.cursors[0]!.lagSeconds).toBe(offline.lagSeconds)

    const globex = await sessions('globex-svc')
    expect(globex).toEqual({
      tenant: 'globex',
      sessions: [{
        clientId: 'billing', connected: false, offlineSince: expect.any(Number) as number, subscriptions: [{ filter: 'globex-only/#', qos: 1 }],
        lagMessages: 0, lagSeconds: 0, cursors: [], queued: 0,
      }],
      next: null,
    })
    expect(sessionsTable(acme.sessions)).toMatch(/^billing +offline since \S+ +telemetry +0 +\d+ +50 +\d+ +[\d.]+ +1 +.*devices\/\+\/telemetry\/# \(qos 1\)/m)

    // The CLI prints the same document.
    const cli = await runCliWithin(['sessions', '--url', base, '--user', 'acme-svc', '--password', password('acme-svc'), '--json'], 60_000)
    expect(cli.code).toBe(0)
    expect((JSON.parse(cli.stdout) as { sessions: SessionDoc[] }).sessions.map((s) => [s.clientId, s.lagMessages])).toEqual([['billing', MESSAGES]])

    // Reconnect: it drains everything, the cursor catches up, the lag is 0 in messages and seconds.
    const again = mqtt.connect(mqttUrl, { clientId: 'billing', username: 'acme-svc', password: password('acme-svc'), clean: false, reconnectPeriod: 0 })
    clients.push(again)
    let got = 0
    again.on('message', () => { got++ })
    expect(await waitFor(() => got >= MESSAGES + 1, 20_000)).toBe(true)
    expect(await waitFor(async () => (await sessions()).sessions[0]?.lagMessages === 0, 20_000)).toBe(true)
    const drained = (await sessions()).sessions[0]!
    expect(drained).toMatchObject({ clientId: 'billing', connected: true, offlineSince: null, lagMessages: 0, lagSeconds: 0 })
    expect(await waitFor(async () => (await sessions()).sessions[0]?.queued === 0, 20_000)).toBe(true)
    expect(drained.cursors[0]).toMatchObject({ nextOffset: MESSAGES, lagMessages: 0, lagSeconds: 0 })
    await again.endAsync()
  })

  it('pages by client id: limit and after over HTTP; the CLI follows next through every page', async () => {
    // One page more than the largest: MAX_SESSIONS_PER_PAGE + 1 persistent sessions of tenant initech.
    const count = MAX_SESSIONS_PER_PAGE + 1
    const ids = Array.from({ length: count }, (_, i) => `s-${String(i).padStart(5, '0')}`)
    for (let i = 0; i < count; i += 50) {
      await Promise.all(ids.slice(i, i + 50).map(async (id) => {
        const c = await connect('initech-svc', id, false)
        await c.subscribeAsync(`jobs/${id}`, { qos: 1 })
        await c.endAsync()
      }))
    }
    const first = await call('/v1/sessions?limit=2', 'initech-svc')
    expect(first.status).toBe(200)
    const page1 = first.body as { sessions: SessionDoc[], next: string | null }
    expect(page1.sessions.map((x) => x.clientId)).toEqual(['s-00000', 's-00001'])
    expect(page1.next).toBe('s-00001')
    const page2 = (await call(`/v1/sessions?limit=2&after=${page1.next!}`, 'initech-svc')).body as { sessions: SessionDoc[], next: string | null }
    expect(page2.sessions.map((x) => x.clientId)).toEqual(['s-00002', 's-00003'])
    const last = (await call(`/v1/sessions?after=${ids[count - 3]!}`, 'initech-svc')).body as { sessions: SessionDoc[], next: string | null }
    expect(last).toMatchObject({ next: null })
    expect(last.sessions.map((x) => x.clientId)).toEqual(ids.slice(count - 2))
    // The default page is the largest; the CLI gets both pages, every session once, in order.
    const full = (await call('/v1/sessions', 'initech-svc')).body as { sessions: SessionDoc[], next: string | null }
    expect(full.sessions).toHaveLength(MAX_SESSIONS_PER_PAGE)
    expect(full.next).toBe(ids[MAX_SESSIONS_PER_PAGE - 1])
    const cli = await runCliWithin(['sessions', '--url', base, '--user', 'initech-svc', '--password', password('initech-svc'), '--json'], 60_000)
    expect(cli.code).toBe(0)
    expect((JSON.parse(cli.stdout) as { sessions: SessionDoc[] }).sessions.map((x) => x.clientId)).toEqual(ids)
    // Bad page parameters: 400, nothing else changes.
    for (const bad of ['limit=0', `limit=${MAX_SESSIONS_PER_PAGE + 1}`, 'limit=ten', 'limit=1&limit=2', 'after=a&after=b']) {
      const res = await call(`/v1/sessions?${bad}`, 'initech-svc')
      expect(res.status, bad).toBe(400)
      expect(res.body, bad).toMatchObject({ error: { code: 'HTTP_BAD_REQUEST' } })
    }
  }, 120_000)

  it('refuses unknown query parameters with 400 and an unauthenticated caller with 401; the CLI a wrong password and unknown flags', async () => {
    const res = await call('/v1/sessions?tenant=globex')
    expect(res.status).toBe(400)
    expect(res.body).toMatchObject({ error: { code: 'HTTP_BAD_REQUEST' } })
    const anonymous = await fetch(`${base}/v1/sessions`)
    expect(anonymous.status).toBe(401)
    // The CLI: a wrong password and an unknown flag each fail with a message and a non-zero exit.
    const wrong = await runCliWithin(['sessions', '--url', base, '--user', 'acme-svc', '--password', 'wrong'], 60_000)
    expect(wrong.code).not.toBe(0)
    expect(wrong.stderr).toMatch(/CLI_AUTH/)
    const unknown = await runCliWithin(['sessions', '--url', base, '--tenant', 'globex'], 60_000)
    expect(unknown.code).not.toBe(0)
    expect(unknown.stderr).toMatch(/unknown option '--tenant'/)
  })

  it('is described in /v1/openapi.json', async () => {
    const res = await call('/v1/openapi.json')
    expect(res.status).toBe(200)
    expect(Object.keys((res.body as { paths: Record<string, unknown> }).paths)).toContain('/v1/sessions')
  })
})
