/**
 * edgemq → edgemq: a second gateway is the upstream region. Its log must end
 * up with every record of the edge exactly once, in per-partition order —
 * also when the upstream is down for a while, and when the edge is SIGKILLed
 * during that outage and restarted. Over MQTT 5 the dedupe id travels as the
 * `edgemq-dedupe-id` user property, and a resend after a lost PUBACK is
 * dropped by the upstream as the `$dedupe/` prefix's is over 3.1.1.
 */
import net from 'node:net'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { runCliWithin } from '../helpers/cli-run.ts'
import { readWholeLog, type LoggedRecord } from '../helpers/log-reader.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../helpers/gateway-process.ts'
import { bridgeStatus, drained, freePort, publishAcked, publishAckedUntilKilled, waitFor } from '../helpers/bridge-fixtures.ts'
import { startFlakyProxy } from '../helpers/flaky-proxy.ts'

const DEVICES = ['dev-a', 'dev-b', 'dev-c', 'dev-d']

async function startRegion (dir: string, port: number): Promise<GatewayProcess> {
  const config = await writeConfig(dir, { gatewayId: 'region', mqtt: { listeners: [{ type: 'tcp', port }] } })
  return startGatewayProcess({ dataDir: `${dir}/data`, config })
}

/**
 * A broker that speaks only MQTT 3.1.1 in front of `upstreamPort`: an MQTT 5 CONNECT (protocol level 5, the byte
 * after the protocol name "MQTT") gets CONNACK 0x84 (unsupported protocol version) and the connection is closed;
 * any other connection is piped through. edgemq itself speaks MQTT 5 since issue 14, as most brokers do.
 */
async function startMqtt311Only (upstreamPort: number): Promise<{ port: number, close: () => Promise<void> }> {
  const sockets = new Set<net.Socket>()
  const server = net.createServer((client) => {
    sockets.add(client)
    client.on('close', () => sockets.delete(client))
    client.once('data', (first) => {
      // Fixed header (type, then the remaining length's bytes), protocol name length (2) and "MQTT" (4): the level.
      let at = 1
      while (((first[at] ?? 0) & 0x80) !== 0) at++
      if (first[0] === 0x10 && first[at + 1 + 6] === 5) {
        client.end(Buffer.from([0x20, 3, 0, 0x84, 0]))
        return
      }
      const upstream = net.connect(upstreamPort, '127.0.0.1')
      sockets.add(upstream)
      upstream.on('close', () => { sockets.delete(upstream); client.destroy() })
      client.on('close', () => upstream.destroy())
      upstream.on('error', () => client.destroy())
      client.on('error', () => upstream.destroy())
      upstream.write(first)
      client.pipe(upstream).pipe(client)
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () => new Promise((resolve) => { for (const s of sockets) s.destroy(); server.close(() => resolve()) }),
  }
}

async function startEdge (dir: string, regionPort: number, extra: Record<string, unknown> = {}): Promise<GatewayProcess> {
  const config = await writeConfig(dir, {
    gatewayId: 'edge-1',
    mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    bridge: {
      commitIntervalMs: 100,
      upstreams: [{ name: 'region', region: 'eu-1', url: `mqtt://127.0.0.1:${regionPort}`, kind: 'edgemq', forward: [{ stream: 'telemetry' }], reconnectMinMs: 50, reconnectMaxMs: 500, ...extra }],
    },
  })
  return startGatewayProcess({ dataDir: `${dir}/data`, config })
}

/** The telemetry payloads of a log, per device in log order. */
function byDevice (records: readonly LoggedRecord[]): Map<string, string[]> {
  const out = new Map<string, string[]>()
  for (const r of records.filter((x) => x.stream === 'default/telemetry')) {
    const device = r.payload.split(':')[0] as string
    out.set(device, [...out.get(device) ?? [], r.payload])
  }
  return out
}

function expectExactlyInOrder (regionLog: readonly LoggedRecord[], edgeLog: readonly LoggedRecord[], acked: readonly string[]): void {
  const region = byDevice(regionLog)
  const edge = byDevice(edgeLog)
  // Everything acknowledged at the edge is in the edge's log, and the region holds the edge's log exactly: same
  // records, once each, in the same per-device (so per-partition) order.
  for (const payload of acked) expect(edge.get(payload.split(':')[0] as string)).toContain(payload)
  for (const device of DEVICES) expect(region.get(device) ?? []).toEqual(edge.get(device) ?? [])
}

describe('bridge: edgemq → edgemq', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it('replicates every record exactly once, in order, and reports the drained backlog', async () => {
    const regionDir = await tempDir('edgemq-region-')
    const edgeDir = await tempDir('edgemq-edge-')
    cleanups.push(regionDir.cleanup, edgeDir.cleanup)
    const regionPort = await freePort()
    const region = await startRegion(regionDir.dir, regionPort)
    const edge = await startEdge(edgeDir.dir, regionPort)
    cleanups.push(async () => { await edge.kill(); await region.kill() })

    const acked = await publishAcked(edge.mqttUrl, DEVICES, 500)
    expect(acked).toHaveLength(2000)
    const status = await drained(edge.httpUrl, 'region')
    expect(status.forwardedMessages).toBe(2000)
    expect(status.partitions.every((p) => p.forwardedOffset === p.logEndOffset)).toBe(true)

    // The upstream's consumer group is listed with the tenant's groups, marked as the bridge's, and cannot be moved.
    const listed = await waitFor('the bridge\'s group committed at the log end', async () => {
      type Groups = { groups: Array<{ group: string, owner?: string, readOnly?: boolean, lagMessages: number }> }
      const doc = await (await fetch(`${edge.httpUrl}/v1/groups`)).json() as Groups
      const g = doc.groups.find((x) => x.group === 'bridge.region')
      return g !== undefined && g.lagMessages === 0 ? g : undefined
    })
    expect(listed).toMatchObject({ owner: 'bridge', readOnly: true })
    // The same status on the command line, as a table and as JSON; an unknown upstream is a clear error. These reads
    // and the refused moves run at once (each CLI run is a process start); the listing after them shows nothing moved.
    const [table, json, unknown, groups, reset, deleted] = await Promise.all([
      runCliWithin(['bridge', 'status', '--url', edge.httpUrl, '--partitions'], 20_000),
      runCliWithin(['bridge', 'status', '--url', edge.httpUrl, '--json', '--upstream', 'region'], 20_000),
      runCliWithin(['bridge', 'status', '--url', edge.httpUrl, '--upstream', 'nope'], 20_000),
      runCliWithin(['groups', 'list', '--url', edge.httpUrl], 20_000),
      runCliWithin(['groups', 'reset', '--url', edge.httpUrl, '--group', 'bridge.region', '--stream', 'telemetry', '--to', 'earliest'], 20_000),
      fetch(`${edge.httpUrl}/v1/groups/bridge.region`, { method: 'DELETE' }),
    ])
    expect(table.code).toBe(0)
    expect(table.stdout).toMatch(/^UPSTREAM +REGION +CONNECTED +PROTOCOL +DEDUPE-ID .*\nregion +eu-1 +yes +3\.1\.1 +topic-prefix /)
    expect(table.stdout).toMatch(/\nregion +default\/telemetry +0 +/)
    expect(JSON.parse(json.stdout)).toMatchObject({ upstreams: [{ name: 'region', connected: true, forwardedMessages: 2000, backlog: { messages: 0 } }] })
    expect(unknown.code).toBe(1)
    expect(unknown.stderr).toMatch(/CLI_UNKNOWN_UPSTREAM: no upstream named "nope" \(configured: region\)/)
    expect(groups.stdout).toMatch(/\nbridge\.region +telemetry +0 +\d+ .* bridge \(read-only\)\n/)
    expect(reset.code).toBe(1)
    expect(reset.stderr).toMatch(/HTTP_GROUP_READ_ONLY/)
    expect(deleted.status).toBe(409)
    expect(((await deleted.json()) as { error: { code: string } }).error.code).toBe('HTTP_GROUP_READ_ONLY')
    expect((await runCliWithin(['groups', 'list', '--url', edge.httpUrl, '--group', 'bridge.region', '--json'], 20_000)).stdout).toMatch(/"lagMessages": 0/)

    expect(await edge.stop()).toBe(0)
    expect(await region.stop()).toBe(0)
    const regionLog = await readWholeLog(`${regionDir.dir}/data`)
    const edgeLog = await readWholeLog(`${edgeDir.dir}/data`)
    expectExactlyInOrder(regionLog, edgeLog, acked)
    // Each replicated record names where it came from.
    expect(regionLog.filter((r) => r.stream === 'default/telemetry')).toHaveLength(2000)
  })

  it('loses nothing and duplicates nothing through an upstream outage with the edge SIGKILLed in it', async () => {
    const regionDir = await tempDir('edgemq-region-')
    const edgeDir = await tempDir('edgemq-edge-')
    cleanups.push(regionDir.cleanup, edgeDir.cleanup)
    const regionPort = await freePort()
    let region = await startRegion(regionDir.dir, regionPort)
    let edge = await startEdge(edgeDir.dir, regionPort)
    cleanups.push(async () => { await edge.kill(); await region.kill() })

    const acked = await publishAcked(edge.mqttUrl, DEVICES, 300)
    // The upstream goes away while the edge keeps taking data.
    await region.kill()
    const outage = publishAckedUntilKilled(edge.mqttUrl, DEVICES, 2000, 300) // may still be connecting at the kill
    const backlog = await waitFor('a backlog to build up', async () => {
      const s = (await bridgeStatus(edge.httpUrl))[0]
      return s !== undefined && !s.connected && s.backlog.messages > 500 ? s.backlog.messages : undefined
    })
    expect(backlog).toBeGreaterThan(500)
    await edge.kill() // SIGKILL during the outage, publishers mid-flight
    acked.push(...await outage)
    edge = await startEdge(edgeDir.dir, regionPort)
    const status = (await bridgeStatus(edge.httpUrl))[0]
    expect(status?.connected).toBe(false)
    expect(status?.backlog.messages).toBeGreaterThan(0)
    expect(status?.backlog.seconds).toBeGreaterThan(0)
    acked.push(...await publishAcked(edge.mqttUrl, DEVICES, 100, 10_000))
    region = await startRegion(regionDir.dir, regionPort)
    // SIGKILL the edge again while it drains the backlog: messages in flight and acknowledged-but-uncommitted
    // offsets are sent again after the restart, and the region's dedupe ids must absorb them.
    await waitFor('the drain to be under way', async () => {
      const s = (await bridgeStatus(edge.httpUrl))[0]
      return s !== undefined && s.forwardedMessages > 200 ? true : undefined
    }, 60_000, 5)
    await edge.kill()
    edge = await startEdge(edgeDir.dir, regionPort)
    const after = await drained(edge.httpUrl, 'region', 90_000)
    expect(after.backlog.seconds).toBe(0)

    expect(await edge.stop()).toBe(0)
    expect(await region.stop()).toBe(0)
    expectExactlyInOrder(await readWholeLog(`${regionDir.dir}/data`), await readWholeLog(`${edgeDir.dir}/data`), acked)
  })

  it('a link that drops at the first PUBLISH more times than maxDeliveryAttempts: nothing dead-lettered, every record once', async () => {
    const regionDir = await tempDir('edgemq-region-')
    const edgeDir = await tempDir('edgemq-edge-')
    cleanups.push(regionDir.cleanup, edgeDir.cleanup)
    const regionPort = await freePort()
    const region = await startRegion(regionDir.dir, regionPort)
    const proxy = await startFlakyProxy({ host: '127.0.0.1', port: regionPort }, 6)
    const edge = await startEdge(edgeDir.dir, Number(new URL(proxy.url).port), { maxDeliveryAttempts: 5 })
    cleanups.push(async () => { await edge.kill(); await proxy.close(); await region.kill() })
    // One device, so one partition: every cut hits the same lane's head (with several, round robin spreads them).
    const acked = await publishAcked(edge.mqttUrl, ['dev-a'], 1)
    acked.push(...await publishAcked(edge.mqttUrl, ['dev-a'], 300, 1))
    const status = await drained(edge.httpUrl, 'region')
    expect(proxy.cut()).toBe(6)
    expect(status.deadLettered).toBe(0)
    expect(await edge.stop()).toBe(0)
    expect(await region.stop()).toBe(0)
    const edgeLog = await readWholeLog(`${edgeDir.dir}/data`)
    expect(edgeLog.filter((r) => r.stream === 'default/dlq.region')).toEqual([])
    expectExactlyInOrder(await readWholeLog(`${regionDir.dir}/data`), edgeLog, acked)
  })

  it('over MQTT 5, PUBACKs lost on the way back: the resends carry the edgemq-dedupe-id user property, and each record is logged once', async () => {
    const regionDir = await tempDir('edgemq-region-')
    const edgeDir = await tempDir('edgemq-edge-')
    cleanups.push(regionDir.cleanup, edgeDir.cleanup)
    const regionPort = await freePort()
    const region = await startRegion(regionDir.dir, regionPort)
    cleanups.push(() => region.kill()) // also when the edge fails to start
    const proxy = await startFlakyProxy({ host: '127.0.0.1', port: regionPort }, 3, 'puback')
    cleanups.push(() => proxy.close())
    const edge = await startEdge(edgeDir.dir, Number(new URL(proxy.url).port), { mqttVersion: '5' })
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['dev-a', 'dev-b'], 200)
    const status = await drained(edge.httpUrl, 'region')
    expect(proxy.cut()).toBe(3) // three connections lost a PUBACK of a record the region had logged: each was sent again
    expect(status).toMatchObject({ mqttVersion: '5', dedupeId: 'user-property' })

    // The same at the region's ingest, from a client: an id carried twice is logged once; a property that is not
    // one id is refused with 0x83 and logs nothing.
    const client = await mqtt.connectAsync(region.mqttUrl, { protocolVersion: 5, clientId: 'replicator', reconnectPeriod: 0 })
    cleanups.push(() => client.endAsync())
    const carrying = (id: string | string[]): { qos: 1, properties: { userProperties: Record<string, string | string[]> } } =>
      ({ qos: 1, properties: { userProperties: { 'edgemq-dedupe-id': id, origin: 'test' } } })
    await client.publishAsync('devices/dev-z/telemetry/t', 'dev-z:0', carrying('other-edge/default/telemetry/0/7'))
    await client.publishAsync('devices/dev-z/telemetry/t', 'dev-z:0', carrying('other-edge/default/telemetry/0/7'))
    for (const bad of ['junk', 'other-edge/default/telemetry/0/x', ['other-edge/default/telemetry/0/8', 'other-edge/default/telemetry/0/9']]) {
      const err = await client.publishAsync('devices/dev-z/telemetry/t', 'dev-z:bad', carrying(bad)).then(() => null, (e: unknown) => e as { code?: number })
      expect(err?.code).toBe(0x83)
    }
    await client.endAsync()
    expect(await edge.stop()).toBe(0)
    expect(await region.stop()).toBe(0)
    const regionLog = await readWholeLog(`${regionDir.dir}/data`)
    expectExactlyInOrder(regionLog, await readWholeLog(`${edgeDir.dir}/data`), acked)
    expect(regionLog.filter((r) => r.payload.startsWith('dev-z:')).map((r) => r.payload)).toEqual(['dev-z:0'])
  })

  it('an upstream that refuses MQTT 5 (3.1.1 only): the bridge falls back to 3.1.1 without dedupe ids and says so', async () => {
    const regionDir = await tempDir('edgemq-region-')
    const edgeDir = await tempDir('edgemq-edge-')
    cleanups.push(regionDir.cleanup, edgeDir.cleanup)
    const regionPort = await freePort()
    const region = await startRegion(regionDir.dir, regionPort)
    const only311 = await startMqtt311Only(regionPort)
    const edge = await startEdge(edgeDir.dir, only311.port, { kind: 'mqtt' })
    cleanups.push(async () => { await edge.kill(); await only311.close(); await region.kill() })
    const acked = await publishAcked(edge.mqttUrl, DEVICES, 50)
    const status = await drained(edge.httpUrl, 'region')
    expect(status).toMatchObject({ kind: 'mqtt', mqttVersion: '3.1.1', dedupeId: 'none', forwardedMessages: acked.length })
    const lines = edge.stderr().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>)
    expect(lines.find((l) => l.msg === 'upstream connected')).toMatchObject({ upstream: 'region', mqttVersion: '3.1.1', dedupeId: 'none' })
    expect(lines.some((l) => typeof l.msg === 'string' && l.msg.startsWith('upstream refuses MQTT 5'))).toBe(true)
    const table = await runCliWithin(['bridge', 'status', '--url', edge.httpUrl], 20_000)
    expect(table.stdout).toMatch(/\nregion +eu-1 +yes +3\.1\.1 +none /)
    expect(await edge.stop()).toBe(0)
    expect(await region.stop()).toBe(0)
    // Plain topics, as any broker's subscribers would want them: no $dedupe/ prefix, so no origin header either.
    const regionLog = (await readWholeLog(`${regionDir.dir}/data`)).filter((r) => r.stream === 'default/telemetry')
    expect(regionLog).toHaveLength(acked.length)
    for (const r of regionLog) expect(r.topic).toMatch(/^devices\/dev-[a-d]\/telemetry\/t$/)
  })

  it('an upstream that is down: the first failure logged at once, then rate-limited; each reconnect logged; the error dated and resolved', async () => {
    const regionDir = await tempDir('edgemq-region-')
    const edgeDir = await tempDir('edgemq-edge-')
    cleanups.push(regionDir.cleanup, edgeDir.cleanup)
    const regionPort = await freePort() // nothing listens yet
    const edge = await startEdge(edgeDir.dir, regionPort)
    let region: GatewayProcess | null = null
    cleanups.push(async () => { await edge.kill(); await region?.kill() })
    const logLines = (msg: string): Array<Record<string, unknown>> => edge.stderr().split('\n').filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.msg === msg)

    const down = await waitFor('several failed attempts', async () => {
      const s = (await bridgeStatus(edge.httpUrl))[0]
      return s !== undefined && s.connectFailures >= 4 ? s : undefined
    })
    expect(down).toMatchObject({ connected: false, lastError: { message: expect.stringContaining('ECONNREFUSED') as unknown, resolvedAt: null } })
    const failed = logLines('upstream connection failed; retrying')
    expect(failed[0]).toMatchObject({ upstream: 'region', err: expect.stringContaining('ECONNREFUSED') as unknown })
    expect(failed.length + logLines('upstream still unreachable; retrying').length).toBeLessThan(down.connectFailures) // one line a minute at most
    const metrics = await (await fetch(`${edge.httpUrl}/metrics`)).text()
    expect(Number(/edgemq_bridge_connect_failures_total\{upstream="region"\} (\d+)/.exec(metrics)?.[1])).toBeGreaterThanOrEqual(4)

    region = await startRegion(regionDir.dir, regionPort)
    const up = await waitFor('the uplink to connect', async () => {
      const s = (await bridgeStatus(edge.httpUrl))[0]
      return s?.connected === true ? s : undefined
    })
    expect(up.lastError?.resolvedAt).not.toBeNull()
    const table = await runCliWithin(['bridge', 'status', '--url', edge.httpUrl], 20_000)
    expect(table.stdout).toMatch(/ECONNREFUSED.* \(resolved \d{4}-/)
    const connected = logLines('upstream connected')
    expect(connected).toHaveLength(1)
    expect(connected[0]?.failedAttempts).toBeGreaterThanOrEqual(4)
    expect(connected[0]?.downSeconds).toBeGreaterThan(0)

    await region.kill()
    await waitFor('the disconnect logged', () => logLines('upstream disconnected').length === 1 ? true : undefined)
    region = await startRegion(regionDir.dir, regionPort)
    const reconnected = await waitFor('the reconnect logged', () => logLines('upstream reconnected')[0])
    expect(reconnected).toMatchObject({ upstream: 'region', mqttVersion: '3.1.1', dedupeId: 'topic-prefix' })
    expect(reconnected.downSeconds).toBeGreaterThan(0)
  })

  it('holds to maxBytesPerSecond', async () => {
    const regionDir = await tempDir('edgemq-region-')
    const edgeDir = await tempDir('edgemq-edge-')
    cleanups.push(regionDir.cleanup, edgeDir.cleanup)
    const regionPort = await freePort()
    const region = await startRegion(regionDir.dir, regionPort)
    const edge = await startEdge(edgeDir.dir, regionPort, { maxBytesPerSecond: 2000 })
    cleanups.push(async () => { await edge.kill(); await region.kill() })
    await waitFor('the uplink to connect', async () => (await bridgeStatus(edge.httpUrl))[0]?.connected === true ? true : undefined)
    const client = await mqtt.connectAsync(edge.mqttUrl, { reconnectPeriod: 0 })
    const started = Date.now()
    for (let i = 0; i < 10; i++) await client.publishAsync('devices/d1/telemetry/t', Buffer.alloc(1000, 0x61), { qos: 1 })
    await client.endAsync()
    const status = await drained(edge.httpUrl, 'region')
    expect(status.forwardedMessages).toBe(10)
    // 10,000 payload bytes at 2,000 a second, with at most one second's worth sent as a burst: no sooner than 4 s.
    expect(Date.now() - started).toBeGreaterThanOrEqual(4000)
  })
})
