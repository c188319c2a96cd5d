/**
 * The bridge's bad inputs, each with a clear outcome and nothing lost: a bad
 * upstream config stops `edgemq start` naming the key; an unreadable TLS file
 * is BRIDGE_TLS_FILES; only a user with an ACL replicate grant can pass
 * off its publishes as replicated records ($dedupe/), never a device; and
 * when the disk budget deletes records an upstream has not forwarded, they
 * are counted per upstream and the uplink carries on.
 */
import { mkdir } from 'node:fs/promises'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../gateway/access/auth.ts'
import { runCliWithin } from '../helpers/cli-run.ts'
import { startGatewayProcess, tempDir, writeConfig } from '../helpers/gateway-process.ts'
import { drained, freePort, publishAcked, waitFor } from '../helpers/bridge-fixtures.ts'
import { tryConnect } from '../helpers/mqtt-probe.ts'

async function startRefused (dir: string, config: Record<string, unknown>): Promise<string> {
  const file = await writeConfig(dir, config)
  const r = await runCliWithin(['start', '--config', file, '--data-dir', `${dir}/data`, '--http-port', '0'], 30_000)
  expect(r.timedOut, `gateway did not exit:\n${r.stderr}`).toBe(false)
  expect(r.code, r.stderr).toBe(1)
  return r.stderr
}

describe('bridge bad inputs', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it.each([
    [{ forward: [{ stream: 'nope' }] }, 'GW_CONFIG_INVALID', '"bridge.upstreams.0.forward.0.stream" names unknown stream "nope"'],
    [{ url: 'tcp://cloud:1883' }, 'GW_CONFIG_INVALID', '"bridge.upstreams.0.url" must start with mqtt://, mqtts://, ws:// or wss://'],
    [{ topicTemplate: 'sites/{site}/{device}' }, 'GW_CONFIG_INVALID', '"bridge.upstreams.0.topicTemplate" unknown variable {device}'],
    [{ url: 'mqtts://127.0.0.1:8883', tls: { ca: '/nonexistent/ca.pem' } }, 'BRIDGE_TLS_FILES', 'upstream cloud: cannot read tls.ca /nonexistent/ca.pem'],
  ])('edgemq start refuses %j', async (upstream, code, message) => {
    const { dir, cleanup } = await tempDir('edgemq-bridge-bad-')
    cleanups.push(cleanup)
    const stderr = await startRefused(dir, { bridge: { upstreams: [{ name: 'cloud', url: 'mqtt://127.0.0.1:1', ...upstream }] } })
    expect(stderr).toContain(code)
    expect(stderr).toContain(message)
  })

  it('refuses $dedupe/ publishes from devices and from services without a replicate grant, takes them from a bridge user', async () => {
    const { dir, cleanup } = await tempDir('edgemq-bridge-bad-')
    cleanups.push(cleanup)
    const hash = await hashPassword('pw', { N: 1024, r: 8, p: 1 })
    const config = await writeConfig(dir, {
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      users: [
        { username: 'dev-1', password: hash, tenant: 'default', role: 'device' },
        { username: 'historian', password: hash, tenant: 'default', role: 'service' },
        { username: 'edge', password: hash, tenant: 'default', role: 'service' },
      ],
      acl: [
        { role: 'device', topic: '$dedupe/#', access: 'publish' }, { role: 'device', topic: '#', access: 'replicate' }, // even when an ACL would let it
        { username: 'edge', topic: '#', access: 'replicate' },
      ],
    })
    const gw = await startGatewayProcess({ dataDir: `${dir}/data`, config })
    cleanups.push(() => gw.kill())
    for (const [username, clientId] of [['dev-1', 'dev-1'], ['historian', 'historian-1']] as const) {
      const client = await tryConnect(gw.mqttUrl, { username, password: 'pw', clientId })
      if (!client.ok) throw new Error(client.error)
      const closed = new Promise<void>((resolve) => client.client.once('close', () => resolve()))
      client.client.publish('$dedupe/edge-9/default/telemetry/0/7/devices/dev-1/telemetry/t', 'forged', { qos: 1 })
      await closed // no negative PUBACK in 3.1.1: the connection is closed
    }
    const service = await mqtt.connectAsync(gw.mqttUrl, { username: 'edge', password: 'pw', reconnectPeriod: 0 })
    await service.publishAsync('$dedupe/edge-9/default/telemetry/0/7/devices/dev-1/telemetry/t', 'real', { qos: 1 })
    await service.publishAsync('$dedupe/edge-9/default/telemetry/0/7/devices/dev-1/telemetry/t', 'real', { qos: 1 }) // a resend
    await service.endAsync()
    const metrics = await (await fetch(`${gw.httpUrl}/metrics`)).text()
    expect(metrics).toMatch(/edgemq_mqtt_publishes_refused_total\{tenant="default",reason="invalid-topic"\} 2/)
    expect(metrics).toMatch(/edgemq_ingest_messages_total\{tenant="default",stream="telemetry"\} 1\n/)
    const res = await fetch(`${gw.httpUrl}/v1/streams/telemetry/records?key=dev-1&format=json`, { headers: { authorization: `Basic ${Buffer.from('edge:pw').toString('base64')}` } })
    const body = await res.json() as { records: Array<{ topic: string, payload: string, headers: Record<string, string> | null }> }
    expect(body.records.map((r) => [r.topic, r.payload, r.headers?.['edgemq-origin']])).toEqual([['devices/dev-1/telemetry/t', 'real', 'edge-9/default/telemetry/0/7']])
  })

  it('counts records the disk budget deleted before an upstream forwarded them, and carries on after them', async () => {
    const { dir, cleanup } = await tempDir('edgemq-bridge-bad-')
    cleanups.push(cleanup)
    const port = await freePort() // nothing listens: the upstream is down throughout
    await mkdir(`${dir}/region`)
    const config = await writeConfig(dir, {
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      store: { diskBudgetBytes: 20_000, retentionIntervalMs: 100 },
      streams: { telemetry: { partitions: 1 }, events: { partitions: 1 }, commands: { partitions: 1 } },
      bridge: { upstreams: [{ name: 'cloud', url: `mqtt://127.0.0.1:${port}`, forward: [{ stream: 'telemetry' }], reconnectMinMs: 50, reconnectMaxMs: 200 }] },
    })
    const gw = await startGatewayProcess({ dataDir: `${dir}/data`, config })
    cleanups.push(() => gw.kill())
    for (let i = 0; i < 10; i++) await publishAcked(gw.mqttUrl, ['d1'], 20, i * 20, 1) // twenty small commits each
    const dropped = await waitFor('records dropped before forwarding', async () => {
      const m = /edgemq_bridge_dropped_records_total\{upstream="cloud"\} (\d+)/.exec(await (await fetch(`${gw.httpUrl}/metrics`)).text())
      return m !== null && Number(m[1]) > 0 ? Number(m[1]) : undefined
    }, 20_000)
    // The upstream comes back: the uplink resumes after the deleted records and forwards everything still in the
    // log — forwarded plus dropped is everything that was acknowledged.
    const regionConfig = await writeConfig(`${dir}/region`, { gatewayId: 'region', mqtt: { listeners: [{ type: 'tcp', port }] } })
    const region = await startGatewayProcess({ dataDir: `${dir}/region/data`, config: regionConfig })
    cleanups.push(() => region.kill())
    const after = await drained(gw.httpUrl, 'cloud')
    const finalDropped = Number(/edgemq_bridge_dropped_records_total\{upstream="cloud"\} (\d+)/.exec(await (await fetch(`${gw.httpUrl}/metrics`)).text())?.[1])
    expect(finalDropped).toBeGreaterThanOrEqual(dropped)
    expect(after.forwardedMessages + finalDropped).toBe(200)
    expect(gw.stderr()).toMatch(/disk budget/)
  })
})
