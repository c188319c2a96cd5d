/**
 * A standby in service (issue 16): it follows its primary's log with the
 * same offsets and serves reads over HTTP and `$replay`, refuses writes with
 * a code (MQTT publishes: GW_STANDBY_READ_ONLY, the connection closed; HTTP
 * writes: 503 HTTP_READ_ONLY, nothing written); the primary reports lag and
 * in-sync state in /metrics, /health and `edgemq replication status`; with
 * `acks: replicated` a lost standby blocks acks (`block`) until it is back and
 * has caught up from the backlog, or does not (`degrade`). A persistent
 * session's queue, replicated, is there for its subscriber on the promoted
 * standby.
 */
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { runCli, tempDir, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { readAll, replicationAddress, replicationOf, startNode, waitFor } from './pair.ts'

const cleanups: Array<() => Promise<void>> = []
afterAll(async () => { for (const c of cleanups.reverse()) await c() })

async function pair (name: string, acks: 'local' | 'replicated', onStandbyLost: 'block' | 'degrade' = 'block'): Promise<{
  dir: string, primary: GatewayProcess, standby: GatewayProcess
}> {
  const { dir, cleanup } = await tempDir(`edgemq-standby-${name}-`)
  cleanups.push(cleanup)
  const primary = await startNode(dir, 'p', { role: 'primary', acks, onStandbyLost })
  cleanups.push(() => primary.kill())
  const standby = await startNode(dir, 's', { role: 'standby', peer: replicationAddress(primary) })
  cleanups.push(() => standby.kill())
  await waitFor(primary, 'the standby in sync', (d) => d.inSync)
  return { dir, primary, standby }
}

async function publish (url: string, device: string, count: number): Promise<void> {
  const c = await mqtt.connectAsync(url, { clientId: device, reconnectPeriod: 0 })
  for (let i = 0; i < count; i++) await c.publishAsync(`devices/${device}/telemetry/t`, JSON.stringify({ device, i }), { qos: 1 })
  await c.endAsync()
}

function metric (text: string, name: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${name} `))
  if (line === undefined) throw new Error(`no ${name} in /metrics`)
  return Number(line.split(' ')[1])
}

describe('a standby', () => {
  it('serves the primary\'s records with the same offsets, over HTTP and $replay, and refuses writes with a code', { timeout: 90_000 }, async () => {
    const { primary, standby } = await pair('reads', 'replicated')
    await publish(primary.mqttUrl, 'dev-1', 20)
    const want = await readAll(primary)
    expect(want).toHaveLength(20)
    // Acknowledged with replicated acks: the standby has the batches; its reads follow a moment later.
    let got = await readAll(standby)
    for (let i = 0; i < 200 && got.length < want.length; i++) {
      await new Promise((resolve) => setTimeout(resolve, 50))
      got = await readAll(standby)
    }
    expect(got).toEqual(want)

    // $replay on the standby: history as QoS 1 PUBLISHes, then $done.
    const reader = await mqtt.connectAsync(standby.mqttUrl, { clientId: 'reader', reconnectPeriod: 0 })
    const replayed: string[] = []
    const done = new Promise<void>((resolve) => reader.on('message', (topic, payload) => {
      if (topic.endsWith('/$done')) resolve()
      else replayed.push(payload.toString())
    }))
    await reader.subscribeAsync('$replay/earliest/devices/dev-1/#', { qos: 1 })
    await done
    expect(replayed).toEqual(want.map((r) => r.payload))
    await reader.endAsync()

    // A publish: the connection is closed, with the code in the standby's log; nothing is appended.
    const writer = await mqtt.connectAsync(standby.mqttUrl, { clientId: 'dev-2', reconnectPeriod: 0 })
    const closed = new Promise<void>((resolve) => writer.once('close', () => resolve()))
    writer.publish('devices/dev-2/telemetry/t', 'x', { qos: 1 })
    await closed
    writer.end(true)
    expect(standby.stderr()).toMatch(/GW_STANDBY_READ_ONLY/)

    // An HTTP write: 503 HTTP_READ_ONLY; the group does not appear.
    const commit = await fetch(`${standby.httpUrl}/v1/groups/g/streams/telemetry/commit`, {
      method: 'POST', body: JSON.stringify({ offsets: [{ partition: 0, offset: 0 }] }),
    })
    expect(commit.status).toBe(503)
    expect(((await commit.json()) as { error: { code: string } }).error.code).toBe('HTTP_READ_ONLY')
    expect(((await (await fetch(`${standby.httpUrl}/v1/groups`)).json()) as { groups: unknown[] }).groups).toEqual([])
    expect(await readAll(standby)).toEqual(want)

    // The primary's status, through the CLI.
    const status = await runCli(['replication', 'status', '--url', primary.httpUrl])
    expect(status.code, status.stderr).toBe(0)
    expect(status.stdout).toMatch(/^ROLE\s+EPOCH/m)
    expect(status.stdout).toMatch(/^primary\s+1\s/m)
    expect((await replicationOf(standby)).role).toBe('standby')
    // A primary is not promoted: 409 HTTP_PROMOTE_REFUSED.
    const refused = await runCli(['promote', '--url', primary.httpUrl])
    expect(refused.code).not.toBe(0)
    expect(refused.stderr).toMatch(/HTTP_PROMOTE_REFUSED/)
  })

  it('with acks replicated and onStandbyLost block: a lost standby holds acks, is counted and alerted; back, it catches up and acks resume', async () => {
    const { dir, primary, standby } = await pair('block', 'replicated', 'block')
    await publish(primary.mqttUrl, 'dev-1', 5)
    await standby.kill()
    await waitFor(primary, 'the standby out of sync', (d) => !d.inSync)
    const health = await fetch(`${primary.httpUrl}/health`)
    expect(health.status).toBe(503)
    expect(JSON.stringify(await health.json())).toMatch(/standby is not in sync/)

    const c = await mqtt.connectAsync(primary.mqttUrl, { clientId: 'dev-1', reconnectPeriod: 0 })
    let acked = false
    const ack = c.publishAsync('devices/dev-1/telemetry/t', 'held', { qos: 1 }).then(() => { acked = true })
    // The record is committed on the primary and waits for the standby: the lag counts it, and no PUBACK came.
    await waitFor(primary, 'the held write in the lag', (d) => d.lag.writes > 0 && d.primarySequence > d.appliedSequence)
    const metrics = await (await fetch(`${primary.httpUrl}/metrics`)).text()
    expect(metric(metrics, 'edgemq_replication_in_sync')).toBe(0)
    expect(metric(metrics, 'edgemq_replication_out_of_sync_total')).toBe(1)
    expect(metric(metrics, 'edgemq_replication_lag_writes')).toBeGreaterThan(0)
    expect(metric(metrics, 'edgemq_replication_lag_bytes')).toBeGreaterThan(0)
    expect(acked).toBe(false)
    expect(primary.stderr()).toMatch(/GW_WARN_STANDBY_OUT_OF_SYNC/)

    const back = await startNode(dir, 's', { role: 'standby', peer: replicationAddress(primary) })
    cleanups.push(() => back.kill())
    await ack
    await c.endAsync()
    expect(primary.stderr()).toMatch(/catching up from the backlog/)
    const doc = await waitFor(primary, 'the standby in sync again', (d) => d.inSync && d.lag.writes === 0)
    expect(doc.appliedSequence).toBe(doc.primarySequence)
  })

  it('with onStandbyLost degrade: a lost standby does not hold acks', async () => {
    const { primary, standby } = await pair('degrade', 'replicated', 'degrade')
    await standby.kill()
    await waitFor(primary, 'the standby out of sync', (d) => !d.inSync)
    await publish(primary.mqttUrl, 'dev-1', 3)
    expect(primary.stderr()).toMatch(/acknowledging on the local disk alone/)
    expect((await replicationOf(primary)).lag.writes).toBeGreaterThan(0)
  })

  it('after kill -9 of the primary and a promotion, a persistent subscriber that was offline receives every acknowledged message', { timeout: 90_000 },
    async () => {
      const { primary, standby } = await pair('session', 'replicated')
      const svc = await mqtt.connectAsync(primary.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
      await svc.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
      await svc.endAsync()
      await publish(primary.mqttUrl, 'dev-1', 20)
      await primary.kill()
      const promoted = await runCli(['promote', '--url', standby.httpUrl])
      expect(promoted.code, promoted.stderr).toBe(0)
      // Listening before CONNECT: the queued messages can arrive in the CONNACK's read, which MQTT.js emits before connectAsync resolves.
      const back = mqtt.connect(standby.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
      const got: string[] = []
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`received ${got.length} of 20: ${got.join(' ')}`)), 30_000)
        back.on('error', (err) => { clearTimeout(timer); reject(err) })
        back.on('message', (_topic, payload) => {
          got.push(payload.toString())
          if (new Set(got).size === 20) { clearTimeout(timer); resolve() }
        })
      })
      expect([...new Set(got)].sort()).toEqual(Array.from({ length: 20 }, (_, i) => JSON.stringify({ device: 'dev-1', i })).sort())
      await back.endAsync()
    })
})
