/**
 * A will left by a kill -9 fires at the restart as its client would publish
 * under the config the gateway restarts with, not the one it died with: the
 * will of a user removed from the config is dropped, a user moved to another
 * tenant or demoted to a device gets no will published with its old rights,
 * and a will whose client id is no longer bound to its user is dropped. An
 * unchanged user's will still fires once.
 */
import path from 'node:path'
import type { MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../../gateway/access/auth.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { readWholeLog } from '../../helpers/log-reader.ts'
import { connectOk, endAll } from '../../helpers/mqtt-probe.ts'

const PASSWORD = 'pw'

interface User { readonly username: string, readonly tenant: string, readonly role: string, readonly clientIdPattern?: string }

const BEFORE: readonly User[] = [
  { username: 'stays', tenant: 'acme', role: 'device' },
  { username: 'removed', tenant: 'acme', role: 'device' },
  { username: 'mover', tenant: 'acme', role: 'device' },
  { username: 'demoted', tenant: 'acme', role: 'service' },
  { username: 'fleet', tenant: 'acme', role: 'device', clientIdPattern: 'fleet-*' },
]
const AFTER: readonly User[] = [
  { username: 'stays', tenant: 'acme', role: 'device' },
  { username: 'mover', tenant: 'globex', role: 'device' },
  { username: 'demoted', tenant: 'acme', role: 'device', clientIdPattern: 'demoted-*' },
  { username: 'fleet', tenant: 'acme', role: 'device', clientIdPattern: 'truck-*' },
]

async function configFile (dir: string, users: readonly User[]): Promise<string> {
  const hash = await hashPassword(PASSWORD, { N: 1024, r: 8, p: 1 })
  return writeConfig(dir, { gatewayId: 'gw-1', users: users.map((u) => ({ ...u, password: hash })), mqtt: { listeners: [{ type: 'tcp', port: 0 }] } })
}

describe('wills after a kill -9 and a config change', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  })

  it('fires a will with the rights its user has at the restart, and drops it when the user or its binding is gone', async () => {
    const { dir, cleanup } = await tempDir('edgemq-wills-config-')
    cleanups.push(cleanup)
    const dataDir = path.join(dir, 'data')
    let gw: GatewayProcess = await startGatewayProcess({ dataDir, config: await configFile(dir, BEFORE) })
    cleanups.push(() => gw.kill())
    const withWill = async (username: string, clientId: string, topic: string): Promise<void> => {
      const c = await connectOk(gw.mqttUrl, {
        clientId, username, password: PASSWORD, reconnectPeriod: 0, will: { topic, payload: Buffer.from(`${clientId}-gone`), qos: 1, retain: false },
      })
      clients.add(c)
    }
    await withWill('stays', 'stays', 'devices/stays/events/offline')
    await withWill('removed', 'removed', 'devices/removed/events/offline')
    await withWill('mover', 'mover', 'devices/mover/events/offline')
    // A service may publish for any device; as a device, "demoted" may not.
    await withWill('demoted', 'demoted-1', 'devices/stays/events/offline')
    await withWill('fleet', 'fleet-1', 'devices/fleet-1/events/offline')
    await gw.kill()

    gw = await startGatewayProcess({ dataDir, config: await configFile(dir, AFTER) })
    // The wills fire while the broker starts, before the ready line; a stop then leaves the log to read.
    await gw.kill()
    const fired = (await readWholeLog(dataDir)).filter((r) => r.payload.endsWith('-gone'))
    expect(fired.map((r) => [r.stream, r.topic, r.clientId, r.payload])).toEqual([
      ['acme/events', 'devices/stays/events/offline', 'stays', 'stays-gone'],
    ])
    const dropped = gw.stderr().split('\n').filter((l) => l.includes('will of a client connected when the gateway stopped: dropped'))
    expect(dropped).toHaveLength(3) // removed, mover, fleet-1; demoted's will is refused by the ACL as a device's publish
  }, 60_000)
})
