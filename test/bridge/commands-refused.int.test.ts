/**
 * Commands the addressed device may not take, through a real Mosquitto
 * upstream: a command an ACL deny rule keeps from the device (narrower than
 * the subscription it was granted) is never receipted "delivered" — it
 * expires, as for a device that is away — and a command whose local topic
 * would be too deep to deliver (the tenant mount takes 100 levels past the
 * broker's limit) is dropped on arrival instead of waiting forever in the
 * log, where it held the commands partition's retention.
 */
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../gateway/access/auth.ts'
import { startGatewayProcess, tempDir, writeConfig } from '../helpers/gateway-process.ts'
import { startCommandCloud, waitFor } from '../helpers/bridge-fixtures.ts'
import { mosquittoPolicy } from '../helpers/mosquitto-process.ts'

const policy = mosquittoPolicy()
const bin = policy.bin
const PASSWORD = 'pw'

it.runIf(policy.missingInCi)('has mosquitto under CI', () => {
  expect.fail('mosquitto is missing: .ci/run installs it; the commands tests cannot run')
})

describe.skipIf(bin === null)('bridge: commands a device may not take', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c().catch(() => {}) })

  it('does not receipt as delivered a command the ACL keeps from its device, and drops one too deep to deliver', async () => {
    const { dir, cleanup } = await tempDir('edgemq-commands-refused-')
    cleanups.push(cleanup)
    const { upstream: up, cloud, receiptFor } = await startCommandCloud(bin as string, dir, cleanups)

    const hash = await hashPassword(PASSWORD, { N: 1024, r: 8, p: 1 })
    const config = await writeConfig(dir, {
      gatewayId: 'edge-1',
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      users: [{ username: 'dev-1', tenant: 'default', role: 'device', password: hash }, { username: 'ops', tenant: 'default', role: 'service', password: hash }],
      acl: [{ role: 'device', topic: 'devices/%c/commands/secret/#', access: 'subscribe', allow: false }],
      bridge: {
        commitIntervalMs: 100,
        upstreams: [{
          name: 'cloud', url: up.url, mqttVersion: '5', forward: [], reconnectMinMs: 50, reconnectMaxMs: 500,
          commands: [{ remote: 'cmd/{site}/+/#', local: 'devices/+/commands/#' }],
        }],
      },
    })
    const edge = await startGatewayProcess({ dataDir: `${dir}/data`, config })
    cleanups.push(() => edge.kill())
    await waitFor('the edge to subscribe upstream', () => up.log().includes('cmd/edge-1/+/#') ? true : undefined)

    const device = await mqtt.connectAsync(edge.mqttUrl, { clientId: 'dev-1', username: 'dev-1', password: PASSWORD, reconnectPeriod: 0 })
    cleanups.push(() => device.endAsync(true))
    const got: string[] = []
    device.on('message', (topic) => { got.push(topic) })
    await device.subscribeAsync('devices/dev-1/commands/#', { qos: 1 })

    // Denied to the device by the ACL: it expires untaken, and nobody is told it was delivered.
    await cloud.publishAsync('cmd/edge-1/dev-1/secret', 'open', { qos: 1, properties: { messageExpiryInterval: 1 } })
    expect(await receiptFor('devices/dev-1/commands/secret')).toBe('expired')

    // 100 levels locally (3 + 97): no device could ever receive it.
    const deepLevels = Array.from({ length: 97 }, (_, i) => `l${i}`).join('/')
    await cloud.publishAsync(`cmd/edge-1/dev-1/${deepLevels}`, 'deep', { qos: 1 })
    await cloud.publishAsync('cmd/edge-1/dev-1/led', 'on', { qos: 1 })
    expect(await receiptFor('devices/dev-1/commands/led')).toBe('delivered')
    expect(got).toEqual(['devices/dev-1/commands/led'])
    const commandTopics = async (): Promise<string[]> => {
      const res = await fetch(`${edge.httpUrl}/v1/streams/commands/records?key=dev-1&format=json`, {
        headers: { authorization: `Basic ${Buffer.from(`ops:${PASSWORD}`).toString('base64')}` },
      })
      return ((await res.json()) as { records: Array<{ topic: string }> }).records.map((r) => r.topic)
    }
    // Either it was dropped (and said so), or it was stored to wait for a delivery that cannot happen.
    await waitFor('the deep command to be dropped or stored', async () =>
      edge.stderr().includes('command dropped: its local topic') || (await commandTopics()).some((t) => t.endsWith('/l96')) ? true : undefined)
    expect(await commandTopics()).toEqual(['devices/dev-1/commands/secret', 'devices/dev-1/commands/led'])
  })
})
