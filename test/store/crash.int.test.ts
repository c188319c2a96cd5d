/**
 * Crash test of the log: "ack means durable" (DESIGN.md, guarantee 1 and 4)
 * under `kill -9`.
 *
 * Each cycle spawns fixtures/crash-child.ts, which appends in `sync` mode from
 * many concurrent appenders and prints every acknowledged {partition, offset}
 * as soon as its append resolves. The parent SIGKILLs the child at a random
 * moment, reopens the store itself and checks the whole log against
 * everything ever acknowledged:
 * - every acknowledged record is at its (partition, offset), byte-identical;
 * - each partition's offsets run gapless from the log start to the log end,
 *   and every record in it (acknowledged or not) is one a child really sent;
 * - per key, records are in the order the appender sent them, and with no
 *   holes: a crash may only lose a suffix of what was in flight;
 * - nothing seen at an earlier reopen changes or disappears, and the log end
 *   never moves back, in particular never to or below an acknowledged offset.
 */
import { spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { openLogStore } from '../../store/log-store.ts'
import type { LogStore, StoredRecord } from '../../store/types.ts'
import {
  APPENDERS, CRASH_PARTITIONS, CRASH_STREAM, expectedRecord, originOf, type ExpectedRecord,
} from './fixtures/crash-child.ts'
import { killCycles } from '../helpers/kill-cycles.ts'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const CHILD = fileURLToPath(new URL('./fixtures/crash-child.ts', import.meta.url))
const CYCLES = killCycles(12)
/** A child that has not met its kill condition by then is stuck; it is killed and the cycle fails. */
const CYCLE_DEADLINE_MS = 15_000
const MAX_LISTED_FAILURES = 30

/**
 * When to pull the plug. `time` and `acks` kill in the middle of steady
 * appending; `open` kills within milliseconds of the store opening, so during
 * the first group commits, often before anything was acknowledged.
 */
type KillPlan =
  | { readonly kind: 'time', readonly afterFirstAckMs: number }
  | { readonly kind: 'acks', readonly count: number }
  | { readonly kind: 'open', readonly afterOpenMs: number }

interface Origin { readonly cycle: number, readonly appender: number, readonly seq: number }
interface Ack extends Origin { readonly partition: number, readonly offset: number }

interface CycleResult {
  readonly acks: Ack[]
  readonly signal: NodeJS.Signals | null
  readonly code: number | null
  readonly stderr: string
  readonly problems: string[]
}

function randomInt (min: number, max: number): number {
  return min + Math.floor(Math.random() * (max - min + 1))
}

function planFor (cycle: number): KillPlan {
  if (cycle % 8 === 7) return { kind: 'open', afterOpenMs: randomInt(0, 30) }
  if (cycle % 2 === 0) return { kind: 'time', afterFirstAckMs: randomInt(50, 400) }
  // Log-uniform, so that a kill right after the first few acks is as likely as one after thousands.
  return { kind: 'acks', count: Math.max(1, Math.floor(Math.exp(Math.random() * Math.log(5000)))) }
}

function describePlan (plan: KillPlan): string {
  switch (plan.kind) {
    case 'time': return `${plan.afterFirstAckMs} ms after the first ack`
    case 'acks': return `after ${plan.count} acks`
    case 'open': return `${plan.afterOpenMs} ms after the store opened`
  }
}

const idOf = (o: Origin): string => `cycle ${o.cycle} appender ${o.appender} seq ${o.seq}`

/** Runs one child until the plan kills it; resolves once its stdout is drained and it has exited. */
function runChild (dataDir: string, cycle: number, plan: KillPlan): Promise<CycleResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', CHILD, dataDir, String(cycle)], {
      cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'],
    })
    const acks: Ack[] = []
    const problems: string[] = []
    let stderr = ''
    let partial = ''
    let killed = false
    const timers: NodeJS.Timeout[] = []
    const kill = (): void => {
      if (killed) return
      killed = true
      child.kill('SIGKILL')
    }
    const killLater = (ms: number): void => { timers.push(setTimeout(kill, ms)) }
    timers.push(setTimeout(() => {
      if (!killed) problems.push(`kill condition (${describePlan(plan)}) not met within ${CYCLE_DEADLINE_MS} ms`)
      kill()
    }, CYCLE_DEADLINE_MS))

    const onLine = (line: string): void => {
      if (line === 'O') {
        if (plan.kind === 'open') killLater(plan.afterOpenMs)
        return
      }
      const m = /^A (\d+) (\d+) (\d+) (\d+)$/.exec(line)
      if (m === null) {
        problems.push(`unexpected line from the child: ${JSON.stringify(line)}`)
        return
      }
      acks.push({ cycle, partition: Number(m[1]), offset: Number(m[2]), appender: Number(m[3]), seq: Number(m[4]) })
      if (plan.kind === 'time' && acks.length === 1) killLater(plan.afterFirstAckMs)
      if (plan.kind === 'acks' && acks.length >= plan.count) kill()
    }

    child.stdout.setEncoding('utf8')
    child.stdout.on('data', (chunk: string) => {
      const lines = (partial + chunk).split('\n')
      // Whatever follows the last newline is incomplete until more arrives.
      partial = lines.pop() ?? ''
      for (const line of lines) onLine(line)
    })
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (chunk: string) => {
      if (stderr.length < 64 * 1024) stderr += chunk
    })
    child.on('error', reject)
    // 'close' rather than 'exit': it waits for stdout to be drained, so no reported ack is missed.
    // A partial last line (SIGKILL during a write) is dropped: it was never a complete report.
    child.on('close', (code, signal) => {
      for (const t of timers) clearTimeout(t)
      resolve({ acks, signal, code, stderr, problems })
    })
  })
}

function sameHeaders (a: Readonly<Record<string, string>> | null, b: Readonly<Record<string, string>> | null): boolean {
  const norm = (h: Readonly<Record<string, string>> | null): string =>
    h === null ? 'null' : JSON.stringify(Object.entries(h).sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0)))
  return norm(a) === norm(b)
}

/** Differences between a stored record and the record its payload says it is, as readable phrases. */
function recordDifferences (r: StoredRecord, want: ExpectedRecord): string[] {
  const out: string[] = []
  if (r.key !== want.key) out.push(`key ${JSON.stringify(r.key)} instead of ${JSON.stringify(want.key)}`)
  if (r.topic !== want.topic) out.push(`topic ${JSON.stringify(r.topic)} instead of ${JSON.stringify(want.topic)}`)
  if (r.clientId !== want.clientId) out.push(`clientId ${JSON.stringify(r.clientId)} instead of ${JSON.stringify(want.clientId)}`)
  if (r.qos !== want.qos) out.push(`qos ${r.qos} instead of ${want.qos}`)
  if (!sameHeaders(r.headers, want.headers)) out.push(`headers ${JSON.stringify(r.headers)} instead of ${JSON.stringify(want.headers)}`)
  const got = Buffer.from(r.payload.buffer, r.payload.byteOffset, r.payload.byteLength)
  if (!got.equals(want.payload)) {
    let i = 0
    while (i < got.length && i < want.payload.length && got[i] === want.payload[i]) i++
    out.push(`payload of ${got.length} bytes differs from the ${want.payload.length} sent, first at byte ${i}`)
  }
  return out
}

/** What the parent knows across cycles. */
class Ledger {
  /** Every acknowledged record, by partition then offset. */
  readonly acked: Array<Map<number, Origin>> = Array.from({ length: CRASH_PARTITIONS }, () => new Map())
  /** The identity of every record read at an earlier reopen, by partition then offset. */
  readonly seen: string[][] = Array.from({ length: CRASH_PARTITIONS }, () => [])
  readonly logEnd: number[] = new Array<number>(CRASH_PARTITIONS).fill(0)
  totalAcks = 0

  /** Records the acks of one cycle; two acks naming one offset mean the store handed it out twice. */
  addAcks (acks: readonly Ack[]): string[] {
    const problems: string[] = []
    for (const ack of acks) {
      const byOffset = this.acked[ack.partition]
      if (byOffset === undefined) {
        problems.push(`ack for ${idOf(ack)} names partition ${ack.partition}, outside 0..${CRASH_PARTITIONS - 1}`)
        continue
      }
      const earlier = byOffset.get(ack.offset)
      if (earlier !== undefined) {
        problems.push(`offset ${ack.partition}/${ack.offset} was acknowledged twice: for ${idOf(earlier)} and for ${idOf(ack)}`)
        continue
      }
      byOffset.set(ack.offset, { cycle: ack.cycle, appender: ack.appender, seq: ack.seq })
      this.totalAcks++
    }
    return problems
  }
}

/** Reads the whole log of the reopened store and checks it against the ledger; returns what is wrong. */
async function verify (store: LogStore, ledger: Ledger, cycle: number): Promise<{ problems: string[], records: number }> {
  const problems: string[] = []
  let records = 0
  for (let p = 0; p < CRASH_PARTITIONS; p++) {
    const info = store.partitionInfo(CRASH_STREAM, p)
    const start = info.logStartOffset
    const end = info.logEndOffset
    const acked = ledger.acked[p] as Map<number, Origin>
    const seen = ledger.seen[p] as string[]
    const previousEnd = ledger.logEnd[p] as number
    // No retention is configured, so nothing may ever leave the front of the log.
    if (start !== 0) problems.push(`partition ${p}: log start is ${start}, expected 0 (no retention configured)`)
    if (end < previousEnd) problems.push(`partition ${p}: log end went back from ${previousEnd} (at the previous reopen) to ${end}`)
    let maxAcked = -1
    for (const offset of acked.keys()) maxAcked = Math.max(maxAcked, offset)
    if (maxAcked >= end) problems.push(`partition ${p}: log end ${end} is not past the highest acknowledged offset ${maxAcked}`)

    // Per key: the last record found, so that the next one must be its successor.
    const last = new Map<string, Origin & { offset: number }>()
    let expected = start
    while (expected < end) {
      const page = await store.read(CRASH_STREAM, p, expected, { maxRecords: 10_000, maxBytes: 64 * 1024 * 1024 })
      if (page.records.length === 0) {
        problems.push(`partition ${p}: read from ${expected} returned no records although the log ends at ${end}`)
        break
      }
      for (const r of page.records) {
        const where = `partition ${p} offset ${r.offset}`
        if (r.offset !== expected) problems.push(`partition ${p}: expected offset ${expected} next, read ${r.offset} (gap or reordering)`)
        expected = r.offset + 1
        records++
        const origin = originOf(r.payload)
        if (origin === null || origin.cycle > cycle || origin.appender < 0 || origin.appender >= APPENDERS || origin.seq < 0) {
          problems.push(`${where}: payload is not a record any child sent (key ${JSON.stringify(r.key)}, ${r.payload.byteLength} bytes)`)
          continue
        }
        const id = idOf(origin)
        const want = expectedRecord(origin.cycle, origin.appender, origin.seq)
        for (const diff of recordDifferences(r, want)) problems.push(`${where} (${id}): ${diff}`)
        const home = store.partitionFor(CRASH_STREAM, want.key)
        if (home !== p) problems.push(`${where} (${id}): key ${want.key} belongs in partition ${home}`)

        const prev = last.get(want.key)
        const successor = prev === undefined || (origin.cycle === prev.cycle ? origin.seq === prev.seq + 1 : origin.cycle > prev.cycle && origin.seq === 0)
        if (!successor) {
          const after = prev === undefined ? '' : ` after ${idOf(prev)} at offset ${prev.offset}`
          problems.push(`${where}: key ${want.key} has ${id}${after}: a record of that key is missing or out of order`)
        } else if (prev === undefined && origin.seq !== 0) {
          problems.push(`${where}: first record of key ${want.key} is ${id}: seq 0 of that cycle is missing`)
        }
        last.set(want.key, { ...origin, offset: r.offset })

        const before = seen[r.offset]
        if (before !== undefined && before !== id) problems.push(`${where}: held ${before} at an earlier reopen, now ${id}`)
        seen[r.offset] = id
        const ack = acked.get(r.offset)
        if (ack !== undefined && idOf(ack) !== id) problems.push(`${where}: acknowledged as ${idOf(ack)}, holds ${id}`)
      }
    }
    for (const [offset, origin] of acked) {
      if (offset < start || offset >= end) problems.push(`partition ${p} offset ${offset}: acknowledged record ${idOf(origin)} is missing (log holds ${start}..${end - 1})`)
    }
    ledger.logEnd[p] = Math.max(previousEnd, end)
  }
  return { problems, records }
}

function report (problems: readonly string[]): string[] {
  if (problems.length <= MAX_LISTED_FAILURES) return [...problems]
  return [...problems.slice(0, MAX_LISTED_FAILURES), `... and ${problems.length - MAX_LISTED_FAILURES} more`]
}

let dataDir = ''

beforeAll(async () => {
  dataDir = await mkdtemp(join(tmpdir(), 'edgemq-crash-'))
})

afterAll(async () => {
  if (dataDir !== '') await rm(dataDir, { recursive: true, force: true })
})

it(`keeps every acknowledged record across ${CYCLES} SIGKILLs of a sync-mode appender`, async () => {
  const ledger = new Ledger()
  const summary: string[] = []
  let cyclesWithAcks = 0
  for (let cycle = 0; cycle < CYCLES; cycle++) {
    const plan = planFor(cycle)
    const run = await runChild(dataDir, cycle, plan)
    const context = `cycle ${cycle}, killed ${describePlan(plan)}`
    expect(run.problems, context).toEqual([])
    // Only SIGKILL is the expected end; an exit code means the child failed on its own.
    expect(run.signal, `${context}: child exited with code ${String(run.code)} instead of being killed; stderr:\n${run.stderr}`).toBe('SIGKILL')
    if (run.acks.length > 0) cyclesWithAcks++
    expect(report(ledger.addAcks(run.acks)), context).toEqual([])

    const store = await openLogStore({ location: dataDir })
    let checked: { problems: string[], records: number }
    try {
      checked = await verify(store, ledger, cycle)
    } finally {
      await store.close()
    }
    expect(report(checked.problems), `${context}: after reopening, with ${run.acks.length} new acks (${ledger.totalAcks} in all)`).toEqual([])
    summary.push(`cycle ${cycle}: killed ${describePlan(plan)}, ${run.acks.length} acks, log holds ${checked.records} records`)
  }
  // Every cycle but those killed soon after the open acknowledges appends before its kill (one may miss: 20 of 24 before).
  const ackingCycles = Array.from({ length: CYCLES }, (_v, c) => planFor(c)).filter((p) => p.kind !== 'open').length
  expect(cyclesWithAcks, 'cycles in which the child was killed after acknowledging appends').toBeGreaterThanOrEqual(ackingCycles - 1)
  console.info(`crash test: ${ledger.totalAcks} acknowledged records verified\n${summary.join('\n')}`)
})
