/**
 * A share's members with different read ACLs. Issue 13: "every message is delivered to some member, none lost".
 * docs/mqtt.md (shared subscriptions): a record the member of its partition may not read goes to a member that may,
 * in the device's order; only a record no connected member may read is skipped (counted, logged). Found by the
 * attack probes: the owner skipped such a record and the group committed past it (4 of 8 never delivered).
 */
import path from 'node:path'
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../../../gateway/access/auth.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { metricValue, waitFor } from '../../../helpers/mqtt-probe.ts'
import { scrape } from '../../../helpers/raw-mqtt.ts'

const DEVICES = 8
const WAIT_MS = 20_000

describe('shared subscriptions: members with different read ACLs', () => {
  let gw: GatewayProcess
  let cleanup: () => Promise<void>
  beforeAll(async () => {
    const t = await tempDir()
    cleanup = t.cleanup
    const hash = await hashPassword('pw', { N: 1024, r: 8, p: 1 })
    const config = await writeConfig(t.dir, {
      users: [{ username: 'full', tenant: 'acme', role: 'service', password: hash }, { username: 'partial', tenant: 'acme', role: 'service', password: hash }],
      acl: [{ username: 'partial', topic: 'devices/+/telemetry/secret', access: 'subscribe', allow: false }],
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      http: { port: 0 },
      streams: { telemetry: { partitions: 4 }, events: { partitions: 1 }, commands: { partitions: 1 } },
    })
    gw = await startGatewayProcess({ dataDir: path.join(t.dir, 'data'), config })
  })
  afterAll(async () => { await gw?.kill(); await cleanup?.() })

  it('a message one member may not read goes to a member that may, not nowhere', async () => {
    const got: string[] = []
    const member = async (user: string): Promise<MqttClient> => {
      const c = await mqtt.connectAsync(gw.mqttUrl, { clientId: `m-${user}`, username: user, password: 'pw', reconnectPeriod: 0 })
      c.on('message', (_t, p) => got.push(`${user} ${p.toString()}`))
      await c.subscribeAsync('$share/g/devices/+/telemetry/#', { qos: 1 })
      return c
    }
    const members = [await member('full'), await member('partial')]
    const pub = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'writer', username: 'full', password: 'pw', reconnectPeriod: 0 })
    const sent: string[] = []
    for (let d = 0; d < DEVICES; d++) {
      for (const kind of ['secret', 'open']) {
        const body = `${kind}-${d}`
        await pub.publishAsync(`devices/d${d}/telemetry/${kind}`, body, { qos: 1 })
        sent.push(body)
      }
    }
    await pub.endAsync()
    const delivered = (): Set<string> => new Set(got.map((g) => g.split(' ')[1] as string))
    await waitFor(() => sent.every((b) => delivered().has(b)), WAIT_MS)
    for (const c of members) c.end(true)
    expect(got.filter((g) => g.startsWith('partial secret')), 'the partial member never gets a secret').toEqual([])
    expect(sent.filter((b) => !delivered().has(b)), 'never delivered to any member').toEqual([])
    // A device's order holds across members: its 'open' message is sent only once its 'secret' one was acknowledged.
    const order = got.map((g) => g.split(' ')[1] as string)
    for (let d = 0; d < DEVICES; d++) expect(order.indexOf(`secret-${d}`), `d${d}`).toBeLessThan(order.indexOf(`open-${d}`))
    // The group's counters are there at 0 (increase() sees a first unreadable record), not absent.
    const series = (await scrape(gw.httpUrl)).filter((s) => ['edgemq_mqtt_share_unreadable_total', 'edgemq_mqtt_share_messages_total'].includes(s.name) && s.labels.tenant === 'acme')
    expect(series.map((s) => [s.name, s.value]).sort()).toEqual([['edgemq_mqtt_share_messages_total', 2 * DEVICES], ['edgemq_mqtt_share_unreadable_total', 0]])
  })

  it('a message no connected member may read is skipped and counted; the others are delivered', async () => {
    const got: string[] = []
    const c = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'm-only-partial', username: 'partial', password: 'pw', reconnectPeriod: 0 })
    c.on('message', (_t, p) => got.push(p.toString()))
    await c.subscribeAsync('$share/only-partial/devices/+/telemetry/#', { qos: 1 })
    const pub = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'writer2', username: 'full', password: 'pw', reconnectPeriod: 0 })
    for (let d = 0; d < DEVICES; d++) {
      for (const kind of ['secret', 'open']) await pub.publishAsync(`devices/d${d}/telemetry/${kind}`, `${kind}-${d}`, { qos: 1 })
    }
    await pub.endAsync()
    const opens = Array.from({ length: DEVICES }, (_v, d) => `open-${d}`)
    expect(await waitFor(() => opens.every((b) => got.includes(b)), WAIT_MS)).toBe(true)
    await c.endAsync()
    expect(got.filter((g) => g.startsWith('secret'))).toEqual([])
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_share_unreadable_total', { tenant: 'acme' })).toBe(DEVICES)
  })
})
