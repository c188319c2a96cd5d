/**
 * Automatic promotion with the leader lease in etcd (issue 16): a real etcd
 * started by the test on free loopback ports, a primary and a standby
 * `edgemq start` in child processes, both with replication.coordination.etcd.
 *
 * - The primary SIGKILLed under QoS 1 load with replicated acks: its lease
 *   expires, the standby promotes itself (epoch 2) and takes publishes; every
 *   acknowledged message is in its log. The former primary, restarted as
 *   primary without a way to its peer, reads etcd and does not lead.
 * - etcd killed: the primary keeps acknowledging; the primary then killed,
 *   the standby says it cannot promote and stays a standby; once etcd is
 *   back and the lease runs out, it promotes.
 * - A standby that fell behind (SIGSTOPped while the primary acknowledged on
 *   its own disk) is not promoted when the lease expires, and says why.
 *
 * Without etcd the suite is skipped, except under CI=true, where one test
 * fails (.ci/run installs etcd-server).
 */
import { Etcd3 } from 'etcd3'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { findEtcd, startEtcd, type EtcdProcess } from '../../../bench/lib/etcd-server.ts'
import { publishUntilKilled, type Acked } from '../../helpers/acked-publisher.ts'
import { runCli, tempDir, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { GATEWAY_ID, readAll, replicationAddress, replicationOf, startNode, waitFor } from './pair.ts'

const bin = findEtcd()
const missingInCi = bin === null && process.env.CI === 'true'
const TTL_MS = 2000
const KEY = `/edgemq/${GATEWAY_ID}/leader`

it.runIf(missingInCi)('has etcd under CI', () => {
  expect.fail('etcd is missing: .ci/run installs etcd-server; the automatic promotion tests cannot run')
})

/** Polls (bounded) until `check` holds; `what` names it in the timeout's error. */
async function until (what: string, check: () => boolean | Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    if (await check()) return
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  throw new Error(`timed out waiting for ${what}`)
}

/** The leader key's value as etcd holds it (null: absent). */
async function leaderIn (etcd: EtcdProcess): Promise<{ node: string, epoch: number, inSync: boolean } | null> {
  const client = new Etcd3({ hosts: etcd.url })
  try {
    return await client.get(KEY).json() as { node: string, epoch: number, inSync: boolean } | null
  } finally {
    client.close()
  }
}

async function publishOne (gw: GatewayProcess, device: string, seq: number): Promise<void> {
  const c = await mqtt.connectAsync(gw.mqttUrl, { clientId: `${device}-${seq}`, reconnectPeriod: 0, connectTimeout: 30_000 })
  try {
    await c.publishAsync(`devices/${device}/telemetry/seq`, JSON.stringify({ device, seq }), { qos: 1 })
  } finally {
    await c.endAsync()
  }
}

describe.skipIf(bin === null)('automatic promotion with an etcd lease', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  /** etcd, then a primary and its standby in sync, both with the lease configured; the primary's view (in sync) is in etcd. */
  async function pair (o: { acks: 'local' | 'replicated', onStandbyLost?: 'block' | 'degrade', maxLagMs?: number }):
  Promise<{ dir: string, etcd: EtcdProcess, primary: GatewayProcess, standby: GatewayProcess }> {
    const { dir, cleanup } = await tempDir('edgemq-lease-')
    cleanups.push(cleanup)
    const etcd = await startEtcd(bin as string, dir)
    cleanups.push(() => etcd.kill())
    const lease = { endpoints: [etcd.url], leaseTtlMs: TTL_MS }
    const primary = await startNode(dir, 'a', { role: 'primary', etcd: lease, ...o })
    cleanups.push(() => primary.kill())
    const standby = await startNode(dir, 'b', { role: 'standby', peer: replicationAddress(primary), etcd: lease, maxLagMs: o.maxLagMs })
    cleanups.push(() => standby.kill())
    await waitFor(primary, 'the standby in sync', (d) => d.inSync)
    await until('the primary to publish its in-sync standby in etcd', async () => (await leaderIn(etcd))?.inSync === true)
    return { dir, etcd, primary, standby }
  }

  it('promotes an in-sync standby once the SIGKILLed primary\'s lease expires; every acknowledged message is there', { timeout: 180_000 }, async () => {
    const { dir, etcd, primary, standby } = await pair({ acks: 'replicated' })
    const before = await leaderIn(etcd)
    expect(before?.epoch).toBe(1)
    // GET /v1/replication shows the lease: held on the primary, watched (epoch 1, standby in sync) on the standby.
    type Lease = { lease: { key: string, held: boolean, reachable: boolean, leader: { epoch: number, inSync: boolean } | null } | null }
    const leaseOf = async (gw: GatewayProcess): Promise<Lease['lease']> => (await (await fetch(`${gw.httpUrl}/v1/replication`)).json() as Lease).lease
    expect(await leaseOf(primary)).toMatchObject({ key: KEY, held: true, reachable: true })
    await until('the standby to see the primary\'s word', async () => (await leaseOf(standby))?.leader?.inSync === true)
    expect(await leaseOf(standby)).toMatchObject({ key: KEY, held: false, reachable: true, leader: { epoch: 1, inSync: true } })
    const cli = await runCli(['replication', 'status', '--url', standby.httpUrl])
    expect(cli.code, cli.stderr).toBe(0)
    expect(cli.stdout).toMatch(/LEASE/)
    expect(cli.stdout).toMatch(/epoch 1, standby in sync/)

    const acked: Acked[] = []
    const clients = await Promise.all([0, 1, 2].map(async (d) => {
      const client = await mqtt.connectAsync(primary.mqttUrl, { clientId: `dev-${d}`, reconnectPeriod: 0, connectTimeout: 30_000 })
      client.on('error', () => {})
      return client
    }))
    const runs = clients.map((client, d) => publishUntilKilled(client, `dev-${d}`, 0, acked, { window: 20, maxMs: 20_000 }))
    // Killed at a random moment once the load runs.
    const killAfter = 100 + Math.floor(Math.random() * 300)
    await until('some acknowledged messages', () => acked.length >= killAfter, 30_000)
    await primary.kill()
    await Promise.all(runs)

    const doc = await waitFor(standby, 'the standby to promote itself', (d) => d.role === 'primary', 60_000)
    expect(doc.epoch).toBe(2)
    expect(standby.stderr()).toMatch(/GW_WARN_AUTO_PROMOTED/)
    const leader = await leaderIn(etcd)
    expect(leader?.epoch).toBe(2)
    expect(leader?.node).not.toBe(before?.node)

    const payloads = new Set((await readAll(standby)).map((r) => r.payload))
    const missing = acked.map((a) => JSON.stringify({ device: a.device, seq: a.seq })).filter((p) => !payloads.has(p))
    expect(missing).toEqual([])
    // Promoted from a standby's config (acks: local): it takes publishes without a standby of its own.
    await publishOne(standby, 'dev-9', 1)
    expect((await readAll(standby)).some((r) => r.payload === JSON.stringify({ device: 'dev-9', seq: 1 }))).toBe(true)
    const metrics = async (): Promise<string> => await (await fetch(`${standby.httpUrl}/metrics`)).text()
    await until('the new primary to hold the lease', async () => /edgemq_replication_lease_held 1/.test(await metrics()))

    // The former primary restarts as configured and cannot reach its peer: etcd names the other node in a newer epoch, so it does not lead.
    const back = await startNode(dir, 'a', { role: 'primary', acks: 'replicated', peer: '127.0.0.1:1', etcd: { endpoints: [etcd.url], leaseTtlMs: TTL_MS } })
    cleanups.push(() => back.kill())
    expect((await replicationOf(back)).role).toBe('standby')
    expect(back.stderr()).toMatch(/GW_WARN_DEMOTED.*the leader key in etcd names another node in epoch 2/)
  })

  it('keeps the primary serving while etcd is down, and promotes no one until etcd is back', { timeout: 180_000 }, async () => {
    const { etcd, primary, standby } = await pair({ acks: 'replicated' })
    await etcd.kill()
    await until('the standby to see etcd gone', () => standby.stderr().includes('etcd unreachable'), 30_000)
    // The primary acknowledges (through its standby) with etcd away, past its lease's TTL.
    for (let i = 0; i < 5; i++) await publishOne(primary, 'dev-1', i)
    await until('the primary to lose its lease', () => primary.stderr().includes('GW_WARN_LEASE_UNAVAILABLE'), 30_000)
    await publishOne(primary, 'dev-1', 5)

    await primary.kill()
    await until('the standby to refuse promotion', () => /GW_WARN_NO_AUTO_PROMOTION.*etcd/.test(standby.stderr()), 30_000)
    expect((await replicationOf(standby)).role).toBe('standby')
    expect(standby.stderr()).not.toMatch(/GW_WARN_AUTO_PROMOTED/)

    // etcd back: the dead primary's lease runs out there, and the standby (in sync at the last contact) takes over.
    const back = await etcd.restart()
    cleanups.push(() => back.kill())
    const doc = await waitFor(standby, 'the standby to promote itself once etcd is back', (d) => d.role === 'primary', 90_000)
    expect(doc.epoch).toBe(2)
    const payloads = new Set((await readAll(standby)).map((r) => r.payload))
    for (let i = 0; i < 6; i++) expect(payloads.has(JSON.stringify({ device: 'dev-1', seq: i }))).toBe(true)
  })

  it('does not promote a standby that was out of sync when the primary died, and says why', { timeout: 180_000 }, async () => {
    const { etcd, primary, standby } = await pair({ acks: 'local', maxLagMs: 200 })
    // The standby stops reading; the primary acknowledges alone, leaves the standby out of sync and says so in etcd.
    standby.child.kill('SIGSTOP')
    try {
      for (let i = 0; i < 20; i++) await publishOne(primary, 'dev-2', i)
      await waitFor(primary, 'the standby out of sync', (d) => !d.inSync, 30_000)
      await until('the primary to publish its out-of-sync standby in etcd', async () => (await leaderIn(etcd))?.inSync === false)
      await primary.kill()
    } finally {
      standby.child.kill('SIGCONT')
    }
    await until('the lease to expire', async () => (await leaderIn(etcd)) === null, 30_000)
    const refusal = /GW_WARN_NO_AUTO_PROMOTION.*(out of sync|behind at the primary's last contact)/
    await until('the standby to refuse promotion', () => refusal.test(standby.stderr()), 30_000)
    expect((await replicationOf(standby)).role).toBe('standby')
    const metrics = await (await fetch(`${standby.httpUrl}/metrics`)).text()
    expect(metrics).toMatch(/edgemq_replication_auto_promotions_total\{result="out_of_sync"\} 1/)
    expect(metrics).toMatch(/edgemq_replication_auto_promotions_total\{result="promoted"\} 0/)
    expect(await leaderIn(etcd)).toBeNull()
  })
})
