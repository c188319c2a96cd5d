/**
 * A running gateway whose data directory has damage at the front of a partition keeps its disk budget (issue 13
 * follow-up), as a user sees it: the oldest batch of one partition fails its checks (a changed byte:
 * STORE_CORRUPT_BATCH) and the oldest batch of another is gone (as LevelDB skipping a table block it cannot read:
 * STORE_DAMAGED). The gateway opens with both (only a partition's newest batch is read at start) and devices keep
 * publishing far past `store.diskBudgetBytes`. Before, every retention pass failed at the damaged partition (the
 * budget took the partition of unknown age for the oldest), so nothing was trimmed and the disk filled although the
 * other partitions held deletable records; and retention deleted past missing offsets, which turned the damage into
 * an ordinary "out of range" that `edgemq check` no longer saw.
 */
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import mqtt from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { partitionForKey, type LevelDatabase } from '../../store/index.ts'
import { runCliWithin } from '../helpers/cli-run.ts'
import { startGatewayProcess, tempDir, writeConfig } from '../helpers/gateway-process.ts'
import { metricValue, waitFor } from '../helpers/mqtt-probe.ts'
import { damageBatch } from '../store/batch-damage.ts'

const STREAM = 'default/telemetry'
const PARTITIONS = 8 // the default config's telemetry stream
/** One device per partition of the telemetry stream. */
const DEVICES = Array.from({ length: PARTITIONS }, (_, p) =>
  Array.from({ length: 200 }, (_, i) => `dev-${i}`).find((d) => partitionForKey(d, PARTITIONS) === p) as string)
const CORRUPT = 2
const MISSING = 5
const DAMAGED: readonly number[] = [CORRUPT, MISSING]
const HEALTHY = Array.from({ length: PARTITIONS }, (_, p) => p).filter((p) => !DAMAGED.includes(p))

/** Bytes of padding per payload: a record is about 460 bytes stored (measured: 60 records, 27,852 bytes). */
const PADDING = 400
/** Before the damage: rounds awaited one after the other, so each partition holds that many batches at least. */
const OLD_ROUNDS = 3
const OLD_PER_ROUND = 20
const BUDGET = 256 * 1024
/**
 * After the damage, each round gives every healthy device NEW_PER_ROUND records and each damaged one a record (its
 * appends still work: only its front is damaged). 40 rounds of 122 records of about 450 bytes of payload are some
 * 2.2 MB, about eight budgets.
 */
const NEW_ROUNDS = 40
const NEW_PER_ROUND = 20
/** Rounds between two looks at the log's bytes: some 280 kB, more than the budget. */
const ROUNDS_PER_CHECK = 5
/** How long a wait for the gateway may take: a deadline, not a wait (each ends on what it waits for). */
const DEADLINE_MS = 60_000

const BLOCKED_LINE = 'retention cannot delete past a damaged batch'

interface LogLine { readonly level: string, readonly msg: string, readonly [field: string]: unknown }

let root: string
let cleanup: () => Promise<void>

beforeAll(async () => { ({ dir: root, cleanup } = await tempDir('edgemq-damage-budget-')) })
afterAll(async () => { await cleanup?.() })

async function publishRound (client: mqtt.MqttClient, round: number, perDevice: (partition: number) => number): Promise<number> {
  const sends = DEVICES.flatMap((device, p) => Array.from({ length: perDevice(p) }, (_, i) =>
    client.publishAsync(`devices/${device}/telemetry/t`, JSON.stringify({ device, round, i, pad: 'x'.repeat(PADDING) }), { qos: 1 })))
  await Promise.all(sends)
  return sends.length
}

const partitionLabels = (p: number): Record<string, string> => ({ tenant: 'default', stream: 'telemetry', partition: String(p) })

async function partitionState (httpUrl: string, p: number): Promise<{ start: number, end: number, bytes: number }> {
  return {
    start: await metricValue(httpUrl, 'edgemq_partition_log_start_offset', partitionLabels(p)),
    end: await metricValue(httpUrl, 'edgemq_partition_log_end_offset', partitionLabels(p)),
    bytes: await metricValue(httpUrl, 'edgemq_partition_bytes', partitionLabels(p)),
  }
}

/** The gateway's complete JSON log lines (the last piece of stderr may be a line still arriving). */
function logLines (stderr: string): LogLine[] {
  return stderr.split('\n').slice(0, -1).filter((l) => l.startsWith('{"level"')).map((l) => JSON.parse(l) as LogLine)
}

async function readFrom (httpUrl: string, p: number, offset: number): Promise<{ status: number, body: { records?: unknown[], error?: { code: string, message: string } } }> {
  const res = await fetch(`${httpUrl}/v1/streams/telemetry/partitions/${p}/records?offset=${offset}&maxRecords=10`, { signal: AbortSignal.timeout(10_000) })
  return { status: res.status, body: await res.json() as { records?: unknown[], error?: { code: string, message: string } } }
}

describe('a gateway whose data has a damaged oldest batch', () => {
  it('keeps its disk budget by trimming the other partitions, keeps the damaged fronts, and says so every pass', async () => {
    const dataDir = path.join(root, 'data')

    // Old records in every partition, on a gateway without a budget; then a hard stop.
    const first = await startGatewayProcess({ dataDir })
    const before: Array<{ start: number, end: number, bytes: number }> = []
    try {
      const client = await mqtt.connectAsync(first.mqttUrl, { clientId: 'fleet-old', reconnectPeriod: 0 })
      for (let round = 0; round < OLD_ROUNDS; round++) await publishRound(client, round, () => OLD_PER_ROUND)
      await client.endAsync()
      for (let p = 0; p < PARTITIONS; p++) before.push(await partitionState(first.httpUrl, p))
    } finally {
      await first.kill()
    }
    expect(before.map((b) => b.end)).toEqual(Array(PARTITIONS).fill(OLD_ROUNDS * OLD_PER_ROUND))

    // The disk changes the oldest batch of two partitions.
    const db = new ClassicLevel<Buffer, Buffer>(path.join(dataDir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    await db.open()
    try {
      await damageBatch(db as unknown as LevelDatabase, STREAM, CORRUPT, 0, 'corrupt')
      await damageBatch(db as unknown as LevelDatabase, STREAM, MISSING, 0, 'delete')
    } finally {
      await db.close()
    }

    const config = await writeConfig(root, {
      store: { diskBudgetBytes: BUDGET, retentionIntervalMs: 100 },
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    })
    const gw = await startGatewayProcess({ dataDir, config })
    let exitCode: number | null = null
    try {
      const readErrorsAtStart = await metricValue(gw.httpUrl, 'edgemq_store_errors_total', { kind: 'read' })
      const used = (): Promise<number> => metricValue(gw.httpUrl, 'edgemq_store_disk_used_bytes')
      const client = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'fleet-new', reconnectPeriod: 0 })
      let acked = 0
      for (let round = 0; round < NEW_ROUNDS; round++) {
        acked += await publishRound(client, OLD_ROUNDS + round, (p) => DAMAGED.includes(p) ? 1 : NEW_PER_ROUND)
        // After each budget's worth of publishes, a pass brings the log back under the budget, which only the healthy
        // partitions can give: the disk stays near it all along, not only once the devices stop.
        if ((round + 1) % ROUNDS_PER_CHECK === 0) {
          expect(await waitFor(async () => await used() <= BUDGET, DEADLINE_MS),
            `after round ${round}, the log stayed over the budget at ${await used()} bytes; log:\n${gw.stderr().slice(-4000)}`).toBe(true)
        }
      }
      await client.endAsync()
      expect(acked).toBe(NEW_ROUNDS * (HEALTHY.length * NEW_PER_ROUND + DAMAGED.length))
      const ingested = await metricValue(gw.httpUrl, 'edgemq_ingest_bytes_total')
      expect(ingested, 'published well past the budget').toBeGreaterThan(5 * BUDGET)
      expect(gw.child.exitCode).toBeNull()
      expect((await fetch(`${gw.httpUrl}/health`)).status).toBe(200)

      // The healthy partitions lost their old records (their log start moved past them), the damaged ones kept their
      // front: every record from offset 0 on, the new ones added.
      for (const p of HEALTHY) {
        const now = await partitionState(gw.httpUrl, p)
        expect(now.start, `partition ${p}`).toBeGreaterThanOrEqual(before[p]!.end)
        expect(now.end, `partition ${p}`).toBe(before[p]!.end + NEW_ROUNDS * NEW_PER_ROUND)
      }
      for (const p of DAMAGED) {
        const now = await partitionState(gw.httpUrl, p)
        expect(now, `partition ${p}`).toMatchObject({ start: 0, end: before[p]!.end + NEW_ROUNDS })
        expect(now.bytes, `partition ${p}`).toBeGreaterThan(before[p]!.bytes)
      }

      // Each pass counts each damaged partition as a read error (alert EdgemqStoreErrors) and logs it.
      expect(await waitFor(async () => await metricValue(gw.httpUrl, 'edgemq_store_errors_total', { kind: 'read' }) >= readErrorsAtStart + 2 * DAMAGED.length,
        DEADLINE_MS)).toBe(true)
      // The lines come over the child's stderr, not in step with /metrics: waited for too.
      const blockedLines = (): LogLine[] => logLines(gw.stderr()).filter((l) => l.msg.startsWith(BLOCKED_LINE))
      const twiceEach = (): boolean => DAMAGED.every((p) => blockedLines().filter((l) => l.partition === p).length >= 2)
      expect(await waitFor(twiceEach, DEADLINE_MS), gw.stderr().slice(-4000)).toBe(true)
      const blocked = blockedLines()
      for (const [p, code] of [[CORRUPT, 'STORE_CORRUPT_BATCH'], [MISSING, 'STORE_DAMAGED']] as const) {
        const lines = blocked.filter((l) => l.partition === p)
        expect(lines[0]).toMatchObject({ level: 'error', code, stream: STREAM, offset: 0 })
        expect(lines[0]!.msg).toContain('edgemq check')
      }
      expect(blocked.every((l) => DAMAGED.includes(l.partition as number))).toBe(true)
      // The budget was met from the healthy partitions: never only damaged ones left over it.
      expect(gw.stderr()).not.toContain('only partitions with a damaged front batch are left')

      // A reader still meets the damage where it was, not "out of range"; a healthy partition's old records are.
      const corrupt = await readFrom(gw.httpUrl, CORRUPT, 0)
      expect(corrupt.status).toBe(500)
      expect(corrupt.body.error?.message).toMatch(/STORE_CORRUPT_BATCH/)
      const missing = await readFrom(gw.httpUrl, MISSING, 0)
      expect(missing.status).toBe(500)
      expect(missing.body.error?.message).toMatch(/STORE_DAMAGED/)
      const trimmed = await readFrom(gw.httpUrl, HEALTHY[0]!, 0)
      expect(trimmed.body.error?.code).toBe('HTTP_OFFSET_OUT_OF_RANGE')
      exitCode = await gw.stop()
    } finally {
      await gw.kill()
    }
    expect(exitCode).toBe(0)

    // `edgemq check` still finds both damages at the front, where retention left them.
    const check = await runCliWithin(['check', '--data-dir', dataDir, '--json'], DEADLINE_MS)
    expect(check.code, check.stderr).toBe(2)
    const report = JSON.parse(check.stdout) as { log: { partitions: Array<{ stream: string, partition: number, damage: Array<{ kind: string, from: number }> }> } }
    const damageOf = (p: number): Array<{ kind: string, from: number }> | undefined =>
      report.log.partitions.find((x) => x.stream === STREAM && x.partition === p)?.damage
    expect(damageOf(CORRUPT)).toEqual([expect.objectContaining({ kind: 'corrupt', from: 0 })])
    expect(damageOf(MISSING)).toEqual([expect.objectContaining({ kind: 'missing', from: 0 })])
    for (const p of HEALTHY) expect(damageOf(p), `partition ${p}`).toEqual([])
  })
})
