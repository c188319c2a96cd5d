/**
 * Attacks on the binding of logins to client ids and topics, against
 * `edgemq start`: a username or client id holding `$` is literal in the ACL's
 * `%u` / `%c` (a JavaScript replacement string read `$$` as `$`, so device
 * `m$$1` got device `m$1`'s topics), and a client id bound to a user is that
 * user's alone — an anonymous client or a service without a pattern cannot
 * take over a device's (or a bound service's) session, while the same id in
 * another tenant stays free.
 */
import path from 'node:path'
import type { MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../../gateway/access/auth.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { collect, connectOk, endAll, metricValue, roundTrip, subscribeGranted, tryConnect, waitFor } from '../../helpers/mqtt-probe.ts'

const TIMEOUT = 60_000
const PASSWORD = 'pw'

describe('login binding under attack', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess

  const connect = async (username: string | undefined, clientId: string, clean = true): Promise<MqttClient> => {
    const client = await connectOk(gw.mqttUrl, { clientId, clean, ...(username === undefined ? {} : { username, password: PASSWORD }) })
    clients.add(client)
    return client
  }
  const refusedCode = async (username: string | undefined, clientId: string): Promise<number | null> => {
    const outcome = await tryConnect(gw.mqttUrl, { clientId, clean: true, ...(username === undefined ? {} : { username, password: PASSWORD }) })
    if (outcome.ok) {
      clients.add(outcome.client)
      return 0
    }
    return outcome.returnCode
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-login-binding-')
    cleanups.push(cleanup)
    const hash = await hashPassword(PASSWORD, { N: 1024, r: 8, p: 1 })
    const config = await writeConfig(dir, {
      users: [
        { username: 'm$1', tenant: 'acme', role: 'device' },
        { username: 'm$$1', tenant: 'acme', role: 'device' },
        { username: 'dev-9', tenant: 'default', role: 'device' },
        { username: 'historian', tenant: 'acme', role: 'service', clientIdPattern: 'historian-*' },
        { username: 'ops', tenant: 'acme', role: 'service' },
        { username: 'globex-ops', tenant: 'globex', role: 'service' },
      ].map((u) => ({ ...u, password: hash })),
      // An anonymous listener beside the users: its clients are tenant "default", where device dev-9 lives.
      mqtt: { listeners: [{ name: 'tcp', type: 'tcp', port: 0, allowAnonymous: true }] },
    })
    gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    cleanups.push(async () => { await gw.kill() })
  }, TIMEOUT)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('takes a $ in a username literally in the ACL: device m$$1 gets its own topics, not device m$1\'s', async () => {
    const victim = await connect('m$1', 'm$1')
    const victimGot = collect(victim)
    expect(await subscribeGranted(victim, 'devices/m$1/commands/#', 1)).toEqual([1])
    const attacker = await connect('m$$1', 'm$$1')
    expect(await subscribeGranted(attacker, 'devices/m$1/commands/#', 1)).toEqual([128])
    expect(await subscribeGranted(attacker, 'devices/m$$1/commands/#', 1)).toEqual([1])
    // A command to the victim posted from the attacker's namespace is refused (acknowledged, dropped).
    await attacker.publishAsync('devices/m$1/commands/unlock', 'forged', { qos: 1 })
    const ops = await connect('ops', 'ops-console')
    await ops.publishAsync('devices/m$1/commands/reboot', 'real', { qos: 1 })
    expect(await waitFor(() => victimGot.length > 0, 10_000)).toBe(true)
    await roundTrip(victim)
    expect(victimGot.map((m) => m.payload)).toEqual(['real'])
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_publishes_refused_total', { tenant: 'acme', reason: 'acl-denied' })).toBe(1)
    await endAll([victim, attacker, ops])
  }, TIMEOUT)

  it('refuses a device\'s or a bound service\'s client id to anonymous clients and unbound services, and leaves the owner connected', async () => {
    const device = await connect('dev-9', 'dev-9', false)
    let deviceClosed = 0
    device.on('close', () => { deviceClosed++ })
    const commands = collect(device)
    expect(await subscribeGranted(device, 'devices/dev-9/commands/#', 1)).toEqual([1])
    const historian = await connect('historian', 'historian-1', false)
    let historianClosed = 0
    historian.on('close', () => { historianClosed++ })
    const before = await metricValue(gw.httpUrl, 'edgemq_mqtt_connections_refused_total', { reason: 'client-id-not-bound' })

    expect(await refusedCode(undefined, 'dev-9')).toBe(2) // anonymous, same tenant ("default")
    expect(await refusedCode('ops', 'm$1')).toBe(2) // a service of acme, as an acme device's id
    expect(await refusedCode('ops', 'historian-1')).toBe(2) // as the id a bound service owns
    expect(await refusedCode(undefined, 'historian-1')).toBe(0) // tenant "default": another client-id space
    expect(await refusedCode('globex-ops', 'historian-1')).toBe(0) // tenant globex: likewise
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_connections_refused_total', { reason: 'client-id-not-bound' })).toBe(before + 3)

    // The owners kept their connections; the device still gets what an anonymous client sends it.
    const anonymous = await connect(undefined, 'console')
    await anonymous.publishAsync('devices/dev-9/commands/reboot', 'c1', { qos: 1 })
    expect(await waitFor(() => commands.length === 1, 10_000)).toBe(true)
    await roundTrip(historian)
    expect([deviceClosed, historianClosed]).toEqual([0, 0])
    await endAll([device, historian, anonymous])
  }, TIMEOUT)
})
