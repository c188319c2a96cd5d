/**
 * The replication link cut, not the processes (issue 16): the standby
 * reaches its primary through a proxy that the test cuts under QoS 1 load
 * with `acks: replicated`, then heals.
 *
 * - `onStandbyLost: block`, the link a black hole: acknowledgements stop (no
 *   PUBACK for anything the standby lacks), the primary leaves the in-sync
 *   state after maxLagMs; each side finds the other silent and drops the
 *   connection; healed, the standby reconnects and the acks resume.
 * - An HTTP offset commit waits for the standby like a PUBACK (`block`), and
 *   is answered at once while the standby is cut off (`degrade`); a link cut
 *   with nothing being written is found by its silence.
 * - `degrade`, the connections reset: acks go on, with the log line and the
 *   counter; healed, the standby catches up from the primary's backlog.
 * - `degrade` with more written during the cut than the backlog keeps: the
 *   standby catches up with one snapshot, though the load writes two
 *   backlogs while it is copied (the link stalls early in the copy until
 *   they are written). Before the primary kept those writes for it,
 *   the copy ended with them gone and another snapshot began, again and
 *   again under steady load: the standby never caught up.
 * - the same with `catchUpBytes` smaller than what the load writes during
 *   the stall: the standby is dropped (logged, counted) and catches up with
 *   a later snapshot once the load has stopped.
 *
 * Each ends with the standby's stored batches byte-identical to the
 * primary's and every acknowledged message on the standby. Throughout the
 * cut the standby stays a standby in the primary's epoch and refuses writes:
 * it never promotes itself, so no two nodes take writes in one epoch.
 */
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { parseHostPort, type HostPort } from '../../../gateway/replication/config-schema.ts'
import { tempDir, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { startLinkProxy, type LinkProxy } from '../../helpers/link-proxy.ts'
import { startLoad } from './load.ts'
import {
  expectIdenticalBatches, expectPayloads, metricOf, replicationAddress, replicationOf, startNode, waitFor, waitForLog, type NodeOptions,
} from './pair.ts'

const MAX_LAG_MS = 500
/**
 * maxLagMs and the standby's silenceMs of the tests that stall the link while a snapshot is copied, until the load has
 * written what the test waits for: the standby would drop a silent link (as it should), ending the copy the test is
 * about; with its default 5 s a loaded machine whose load wrote too slowly failed the test. (The primary does not drop a
 * standby for silence before it acknowledged its snapshot; a large maxLagMs keeps that out of the test all the same.)
 */
const STALL_MAX_LAG_MS = 60_000
const STALL_SILENCE_MS = 120_000
const MIB = 1024 * 1024
/** backlogBytes of the tests that need a snapshot: the smallest allowed. */
const BACKLOG = MIB
const cleanups: Array<() => Promise<void>> = []
afterAll(async () => { for (const c of cleanups.reverse()) await c() })

/** A primary and a standby that reaches it through a proxy, in sync. */
async function cutPair (name: string, options: Pick<NodeOptions, 'onStandbyLost' | 'backlogBytes' | 'catchUpBytes' | 'maxLagMs' | 'silenceMs'>): Promise<{
  primary: GatewayProcess, standby: GatewayProcess, proxy: LinkProxy
}> {
  const { dir, cleanup } = await tempDir(`edgemq-linkcut-${name}-`)
  cleanups.push(cleanup)
  const { silenceMs, ...primaryOptions } = options
  const primary = await startNode(dir, 'p', { role: 'primary', acks: 'replicated', maxLagMs: MAX_LAG_MS, ...primaryOptions })
  cleanups.push(() => primary.kill())
  const proxy = await startLinkProxy(parseHostPort(replicationAddress(primary)) as HostPort)
  cleanups.push(() => proxy.close())
  const standby = await startNode(dir, 's', { role: 'standby', peer: proxy.address, ...(silenceMs === undefined ? {} : { silenceMs }) })
  cleanups.push(() => standby.kill())
  await waitFor(primary, 'the standby in sync', (d) => d.inSync)
  return { primary, standby, proxy }
}

/** The standby during a cut: still a standby in epoch 1, and a publish to it is refused (the connection closed, the code logged). */
async function expectStillStandby (standby: GatewayProcess): Promise<void> {
  expect(await replicationOf(standby)).toMatchObject({ role: 'standby', epoch: 1, connected: expect.any(Boolean) as unknown })
  const refusedBefore = standby.stderr().split('GW_STANDBY_READ_ONLY').length
  const writer = await mqtt.connectAsync(standby.mqttUrl, { clientId: 'intruder', reconnectPeriod: 0 })
  const closed = new Promise<void>((resolve) => writer.once('close', () => resolve()))
  writer.publish('devices/intruder/telemetry/seq', 'split brain?', { qos: 1 })
  await closed
  writer.end(true)
  expect(standby.stderr().split('GW_STANDBY_READ_ONLY').length).toBe(refusedBefore + 1)
}

/** Waits (bounded) until the node lists the consumer group. */
async function expectGroup (gw: GatewayProcess, group: string): Promise<void> {
  const deadline = Date.now() + 30_000
  for (;;) {
    const doc = await (await fetch(`${gw.httpUrl}/v1/groups`)).json() as { groups: Array<{ group: string }> }
    if (doc.groups.some((g) => g.group === group)) return
    if (Date.now() > deadline) throw new Error(`no group ${group} on ${gw.httpUrl}: ${JSON.stringify(doc)}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

/** Occurrences of `text` in a node's log. */
function count (gw: GatewayProcess, text: string): number {
  return gw.stderr().split(text).length - 1
}

/**
 * Under load, with the link cut (reset) for far over a backlog of writes: a snapshot it is, of a database far larger
 * than the link's buffers hold (two sockets' kernel buffers and the primary's send window). The link is healed for the
 * start of the copy only, then stalls 1 MiB into it, so the copy waits on the link while the load writes on (for as
 * long as it takes: neither side's silence limit is reached, see STALL_SILENCE_MS). Returns the primary's state as the
 * copy began.
 */
async function stallSnapshot (primary: GatewayProcess, standby: GatewayProcess, proxy: LinkProxy, load: Awaited<ReturnType<typeof startLoad>>):
Promise<Awaited<ReturnType<typeof waitFor>>> {
  await load.ackedAtLeast(100, 'acks before the cut')
  proxy.cut('reset')
  await waitFor(primary, 'the primary to find its standby out of sync', (d) => !d.inSync)
  await waitFor(primary, 'a database larger than the link buffers written while cut off', (d) => (d.lag.bytes ?? 0) > 48 * MIB)
  await expectStillStandby(standby)
  proxy.heal()
  proxy.cutAfter(MIB)
  return await waitFor(primary, 'the snapshot to begin', (d) => d.connected && d.snapshotting)
}

/** Once the link healed: the standby in sync again, the load stopped, both logs byte-identical, every acknowledged message on the standby. */
async function inSyncAndIdentical (primary: GatewayProcess, standby: GatewayProcess, load: Awaited<ReturnType<typeof startLoad>>): Promise<void> {
  await waitFor(primary, 'the standby in sync again', (d) => d.inSync)
  await load.stop()
  await expectIdenticalBatches(primary, standby)
  await expectPayloads(standby, load.payloads(), 'acknowledged messages on the standby')
}

describe('the replication link cut under load, acks: replicated', () => {
  it('block: no PUBACK for what the standby lacks while the link is a black hole; healed, acks resume and the logs are identical',
    { timeout: 120_000 }, async () => {
      const { primary, standby, proxy } = await cutPair('block', { onStandbyLost: 'block' })
      const load = await startLoad(primary.mqttUrl, { devices: 4, window: 10, maxMs: 90_000 })
      await load.ackedAtLeast(200, 'acks before the cut')

      proxy.cut('drop')
      await waitFor(primary, 'the primary to find its standby out of sync', (d) => !d.inSync)
      const ackedAtLoss = load.acked.length
      expect(primary.stderr()).toMatch(/GW_WARN_STANDBY_OUT_OF_SYNC.*acknowledgements wait for it/)
      // A commit is held: written on the primary, not acknowledged by the standby.
      expect((await replicationOf(primary)).lag.writes).toBeGreaterThan(0)
      // The black hole sends no reset: each side finds the other silent and drops the connection (the standby then tries again).
      await waitForLog(primary, /no word from the standby/)
      await waitForLog(standby, /no word from the primary: reconnecting/)
      expect((await replicationOf(primary)).connected).toBe(false)
      await expectStillStandby(standby)
      // Nothing reaches the standby through the black hole, so its log is what it had at the cut: every PUBACK so far is in it.
      await expectPayloads(standby, load.payloads(), 'acknowledged messages on the cut-off standby')
      // And no PUBACK came since the primary found the standby out of sync (the held commit is still held).
      expect((await replicationOf(primary)).lag.writes).toBeGreaterThan(0)
      expect(load.acked.length).toBe(ackedAtLoss)
      expect(await metricOf(primary, 'edgemq_replication_in_sync')).toBe(0)

      proxy.heal()
      await load.ackedAtLeast(ackedAtLoss + 200, 'acks after the link healed')
      await inSyncAndIdentical(primary, standby, load)
      expect((await replicationOf(primary)).epoch).toBe(1)
      expect((await replicationOf(standby)).epoch).toBe(1)
    })

  it('block: an HTTP offset commit is answered once the standby has it; degrade: at once while the standby is cut off', { timeout: 120_000 }, async () => {
    for (const onStandbyLost of ['block', 'degrade'] as const) {
      const { primary, standby, proxy } = await cutPair(`http-${onStandbyLost}`, { onStandbyLost })
      const load = await startLoad(primary.mqttUrl, { devices: 1, window: 1, maxMs: 30_000 })
      await load.ackedAtLeast(3, 'records to commit offsets of')
      await load.stop()
      proxy.cut('drop')
      const { primarySequence } = await waitFor(primary, 'the primary to find its standby out of sync', (d) => !d.inSync)
      let answered = false
      const commit = fetch(`${primary.httpUrl}/v1/groups/billing/streams/telemetry/commit`, {
        method: 'POST', body: JSON.stringify({ offsets: [{ partition: 0, offset: 0 }] }),
      }).then((res) => { answered = true; return res })
      if (onStandbyLost === 'block') {
        // Written on the primary (its journal has one more write), not answered: the standby does not have it.
        await waitFor(primary, 'the commit written on the primary', (d) => d.primarySequence > primarySequence)
        const groups = await (await fetch(`${primary.httpUrl}/v1/groups`)).json() as { groups: Array<{ group: string }> }
        expect(groups.groups.map((g) => g.group)).toEqual(['billing'])
        expect(answered).toBe(false)
        proxy.heal()
      }
      const res = await commit
      expect(res.status).toBe(200)
      await res.body?.cancel()
      if (onStandbyLost === 'degrade') proxy.heal()
      // The standby has the group (at once under block: answered after its ack; its reads follow its applies a moment later).
      await expectGroup(standby, 'billing')
    }
  })

  it('degrade: acks go on through a reset link, with the alert; healed, the standby catches up from the backlog, byte-identical',
    { timeout: 120_000 }, async () => {
      const { primary, standby, proxy } = await cutPair('degrade', { onStandbyLost: 'degrade' })
      const load = await startLoad(primary.mqttUrl, { devices: 4, window: 10, maxMs: 90_000 })
      await load.ackedAtLeast(200, 'acks before the cut')
      const outOfSyncBefore = await metricOf(primary, 'edgemq_replication_out_of_sync_total')
      const backlogCatchUps = count(primary, 'catching up from the backlog')
      const snapshots = count(primary, 'sending a snapshot')
      expect(await metricOf(primary, 'edgemq_replication_catch_ups_total{from="backlog"}')).toBe(backlogCatchUps)
      expect(await metricOf(primary, 'edgemq_replication_catch_ups_total{from="snapshot"}')).toBe(snapshots)

      proxy.cut('reset')
      await waitFor(primary, 'the primary to find its standby out of sync', (d) => !d.inSync)
      const ackedAtLoss = load.acked.length
      await load.ackedAtLeast(ackedAtLoss + 500, 'acks while the standby is cut off')
      expect(primary.stderr()).toMatch(/GW_WARN_STANDBY_OUT_OF_SYNC.*acknowledging on the local disk alone/)
      expect(await metricOf(primary, 'edgemq_replication_out_of_sync_total')).toBe(outOfSyncBefore + 1)
      expect(await metricOf(primary, 'edgemq_replication_lag_writes')).toBeGreaterThan(0)
      const health = await fetch(`${primary.httpUrl}/health`)
      expect(health.status).toBe(503)
      await health.body?.cancel()
      await expectStillStandby(standby)

      proxy.heal()
      await inSyncAndIdentical(primary, standby, load)
      expect(count(primary, 'catching up from the backlog')).toBe(backlogCatchUps + 1)
      expect(count(primary, 'sending a snapshot')).toBe(snapshots)
      expect(await metricOf(primary, 'edgemq_replication_catch_ups_total{from="backlog"}')).toBe(backlogCatchUps + 1)
      expect(await metricOf(primary, 'edgemq_replication_catch_ups_total{from="snapshot"}')).toBe(snapshots)
      expect((await replicationOf(standby)).epoch).toBe(1)
    })

  it('degrade: a cut longer than the backlog ends in one snapshot, though two backlogs are written while it is copied; byte-identical',
    { timeout: 180_000 }, async () => {
      const { primary, standby, proxy } = await cutPair('snapshot', { onStandbyLost: 'degrade', backlogBytes: BACKLOG, maxLagMs: STALL_MAX_LAG_MS, silenceMs: STALL_SILENCE_MS })
      const load = await startLoad(primary.mqttUrl, { devices: 4, window: 10, maxMs: 150_000, padding: 1000 })
      const snapshots = count(primary, 'sending a snapshot')
      const copying = await stallSnapshot(primary, standby, proxy, load)
      const written = await waitFor(primary, 'two backlogs written during the copy', (d) => (d.lag.bytes ?? 0) > (copying.lag.bytes ?? 0) + 2 * BACKLOG)
      // Still copying: the writes since the snapshot's point are more than the backlog keeps; the primary keeps them for the standby.
      expect(written).toMatchObject({ connected: true, snapshotting: true })
      expect(await metricOf(primary, 'edgemq_replication_backlog_bytes')).toBeGreaterThan(2 * BACKLOG)

      proxy.heal()
      await inSyncAndIdentical(primary, standby, load)
      // One snapshot, counted; none started over (the load kept writing throughout).
      expect(count(primary, 'sending a snapshot')).toBe(snapshots + 1)
      expect(await metricOf(primary, 'edgemq_replication_catch_ups_total{from="snapshot"}')).toBe(snapshots + 1)
      expect(await metricOf(primary, 'edgemq_replication_catch_up_overflows_total')).toBe(0)
      expect(primary.stderr()).not.toMatch(/GW_WARN_STANDBY_CATCH_UP_OVERFLOW/)
      expect(standby.stderr()).not.toMatch(/GW_WARN_SET_ASIDE/)
    })

  it('degrade: past catchUpBytes written while a snapshot is copied, the standby is dropped (logged, counted); a later snapshot catches it up',
    { timeout: 180_000 }, async () => {
      const { primary, standby, proxy } = await cutPair('overflow', {
        onStandbyLost: 'degrade', backlogBytes: BACKLOG, catchUpBytes: 2 * MIB, maxLagMs: STALL_MAX_LAG_MS, silenceMs: STALL_SILENCE_MS,
      })
      const load = await startLoad(primary.mqttUrl, { devices: 4, window: 10, maxMs: 150_000, padding: 1000 })
      const snapshots = count(primary, 'sending a snapshot')
      await stallSnapshot(primary, standby, proxy, load)
      // The load writes on: past catchUpBytes (2 MiB) since the snapshot's point, the primary gives up on this copy.
      await waitForLog(primary, /GW_WARN_STANDBY_CATCH_UP_OVERFLOW.*since its snapshot began .* passed replication\.catchUpBytes/)
      expect(await metricOf(primary, 'edgemq_replication_catch_up_overflows_total')).toBe(1)
      expect(await metricOf(primary, 'edgemq_replication_backlog_bytes')).toBeLessThanOrEqual(2 * MIB)
      await waitFor(primary, 'the standby dropped', (d) => !d.connected)

      await load.stop()
      proxy.heal()
      await inSyncAndIdentical(primary, standby, load)
      expect(count(primary, 'sending a snapshot')).toBe(snapshots + 2)
      expect(await metricOf(primary, 'edgemq_replication_catch_up_overflows_total')).toBe(1)
    })
})
