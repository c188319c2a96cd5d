/**
 * Takeover with `acks: replicated` (issue 16): publishers send QoS 1 at full
 * speed to the primary and record every PUBACK; the primary is SIGKILLed at a
 * random moment; `edgemq promote` makes the standby primary in the next epoch.
 * Every acknowledged message is in the new primary's log at the offset the
 * old primary gave it, in per-device order; a consumer group's offset
 * committed on the old primary is there; the new primary takes publishes.
 * The old primary then comes back configured as primary, finds its peer
 * primary in a newer epoch, follows it as a standby and sets its own former
 * data aside in a file. Roles alternate over the cycles.
 */
import { readdir } from 'node:fs/promises'
import path from 'node:path'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { publishUntilKilled, type Acked } from '../../helpers/acked-publisher.ts'
import { runCli, tempDir, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { offlineRecords, readAll, replicationAddress, replicationOf, startNode, waitFor } from './pair.ts'
import { killCycles } from '../../helpers/kill-cycles.ts'

const DEVICES = 4
const CYCLES = killCycles(6)
const WINDOW = 20

describe('standby takeover under SIGKILL with replicated acks', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it(`keeps every acknowledged message, its offset and the group offsets across ${CYCLES} kill -9 + promote cycles`, { timeout: 600_000 }, async () => {
    const { dir, cleanup } = await tempDir('edgemq-takeover-')
    cleanups.push(cleanup)
    let primary: GatewayProcess = await startNode(dir, 'a', { role: 'primary', acks: 'replicated' })
    cleanups.push(() => primary.kill())
    let primaryName = 'a'
    let standby: GatewayProcess = await startNode(dir, 'b', { role: 'standby', peer: replicationAddress(primary) })
    cleanups.push(() => standby.kill())
    let standbyName = 'b'
    const acked: Acked[] = []
    const nextSeq = new Map<string, number>()

    // A consumer group's commit, replicated like every other write (asynchronously: it is no append).
    const first = await mqtt.connectAsync(primary.mqttUrl, { clientId: 'dev-0', reconnectPeriod: 0 })
    await waitFor(primary, 'the standby in sync', (d) => d.inSync)
    await first.publishAsync('devices/dev-0/telemetry/seq', JSON.stringify({ device: 'dev-0', seq: -1 }), { qos: 1 })
    await first.endAsync()
    const commit = await fetch(`${primary.httpUrl}/v1/groups/billing/streams/telemetry/commit`, {
      method: 'POST', body: JSON.stringify({ offsets: [{ partition: 0, offset: 0 }, { partition: 1, offset: 0 }, { partition: 2, offset: 0 }] }),
    })
    expect(commit.status).toBe(200)

    for (let cycle = 0; cycle < CYCLES; cycle++) {
      await waitFor(primary, 'the standby in sync', (d) => d.inSync)
      const clients = await Promise.all(Array.from({ length: DEVICES }, async (_, d) => {
        const client = await mqtt.connectAsync(primary.mqttUrl, { clientId: `dev-${d}`, reconnectPeriod: 0, connectTimeout: 30_000 })
        client.on('error', () => {})
        return client
      }))
      const runs = clients.map((client, d) => {
        const device = `dev-${d}`
        return publishUntilKilled(client, device, nextSeq.get(device) ?? 0, acked, { window: WINDOW, maxMs: 20_000 }).then((s) => { nextSeq.set(device, s) })
      })
      const ackedBefore = acked.length
      // Killed at a random moment once the load runs (some messages acknowledged in this cycle).
      const killAfter = 50 + Math.floor(Math.random() * 400)
      for (let i = 0; i < 2000 && acked.length < ackedBefore + killAfter; i++) await new Promise((resolve) => setTimeout(resolve, 10))
      await primary.kill()
      await Promise.all(runs)
      expect(acked.length).toBeGreaterThan(ackedBefore)

      const promoted = await runCli(['promote', '--url', standby.httpUrl, '--json'])
      expect(promoted.code, promoted.stderr).toBe(0)
      const doc = JSON.parse(promoted.stdout) as { role: string, epoch: number, listen: string }
      expect(doc.role).toBe('primary')
      expect(doc.epoch).toBe(cycle + 2)

      // Every acknowledged message, at the offset the killed primary gave it, in per-device order.
      const before = await offlineRecords(path.join(dir, primaryName))
      const after = await readAll(standby)
      const byPayload = new Map(after.map((r) => [r.payload, r]))
      for (const a of acked) {
        const payload = JSON.stringify({ device: a.device, seq: a.seq })
        const now = byPayload.get(payload)
        expect(now, `acknowledged ${payload} missing after the takeover`).toBeDefined()
        expect({ partition: now?.partition, offset: now?.offset }).toEqual(before.get(payload))
      }
      for (let d = 0; d < DEVICES; d++) {
        const seqs = after.filter((r) => r.key === `dev-${d}`).sort((x, y) => x.offset - y.offset).map((r) => (JSON.parse(r.payload) as Acked).seq)
        expect(seqs).toEqual([...seqs].sort((x, y) => x - y))
      }
      // Acknowledged appends waited for every write before them, the commit included.
      const group = await (await fetch(`${standby.httpUrl}/v1/groups/billing/streams/telemetry`)).json() as { partitions: Array<{ committedOffset: number | null }> }
      expect(group.partitions.map((p) => p.committedOffset)).toEqual([0, 0, 0, null])


      // The old primary comes back as configured (primary), sees the newer epoch and follows; its data is set aside, not deleted.
      const back = await startNode(dir, primaryName, { role: 'primary', acks: 'replicated', peer: doc.listen })
      cleanups.push(() => back.kill())
      await waitFor(back, 'the former primary to follow as standby', (d) => d.role === 'standby' && d.inSync && d.epoch === cycle + 2)
      expect(back.stderr()).toMatch(/GW_WARN_DEMOTED/)
      expect(back.stderr()).toMatch(/GW_WARN_SET_ASIDE/)
      expect((await readdir(path.join(dir, primaryName, 'set-aside'))).length).toBeGreaterThan(0)
      await waitFor(standby, 'the former primary in sync', (d) => d.inSync)
      // Byte for byte the same log; a standby's reads follow its applied writes a moment later (the store re-reads after each apply).
      const want = (await readAll(standby)).map((r) => `${r.partition}/${r.offset}/${r.payload}`)
      let copy: string[] = []
      for (let i = 0; i < 200 && copy.length < want.length; i++) {
        copy = (await readAll(back)).map((r) => `${r.partition}/${r.offset}/${r.payload}`)
        if (copy.length < want.length) await new Promise((resolve) => setTimeout(resolve, 50))
      }
      expect(copy).toEqual(want)

      // The new primary takes publishes (with acks: replicated and onStandbyLost: block, only now that its standby is back).
      const c = await mqtt.connectAsync(standby.mqttUrl, { clientId: 'dev-9', reconnectPeriod: 0 })
      await c.publishAsync('devices/dev-9/telemetry/seq', JSON.stringify({ device: 'dev-9', seq: cycle }), { qos: 1 })
      await c.endAsync()

      ;[primary, standby] = [standby, back]
      ;[primaryName, standbyName] = [standbyName, primaryName]
      expect((await replicationOf(primary)).role).toBe('primary')
    }
  })
})
