/**
 * Crash test of retention: a gateway killed while retention deletes (byte
 * limit, disk budget, dedupe ids) must open again — a false STORE_DAMAGED
 * stops a healthy gateway as surely as lost data loses it — and keep every
 * acknowledged record retention has not reached.
 *
 * Each cycle runs fixtures/retention-crash-child.ts until it has acknowledged
 * a random number of appends (or for a random time), SIGKILLs it, reopens the
 * store and reads every partition from its log start to its log end: the
 * read must be gapless (a gap is STORE_DAMAGED), every record one a child
 * sent, every acknowledged record at or above the log start present at its
 * offset, and the log end never below an acknowledged offset.
 */
import { spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { openLogStore } from '../../store/log-store.ts'
import { RETENTION_PARTITIONS, RETENTION_STREAM, retentionPayload } from './fixtures/retention-crash-child.ts'
import { killCycles } from '../helpers/kill-cycles.ts'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const CHILD = fileURLToPath(new URL('./fixtures/retention-crash-child.ts', import.meta.url))
const CYCLES = killCycles(8)
const CYCLE_DEADLINE_MS = 15_000

interface Ack { readonly partition: number, readonly offset: number, readonly payload: Buffer }

/** Runs one child until it has acknowledged `acks` appends, then SIGKILLs it. */
function runChild (dataDir: string, cycle: number, killAfterAcks: number): Promise<{ acks: Ack[], signal: NodeJS.Signals | null, stderr: string, timedOut: boolean }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', CHILD, dataDir, String(cycle)], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] })
    const acks: Ack[] = []
    let stderr = ''
    let partial = ''
    let timedOut = false
    const deadline = setTimeout(() => { timedOut = true; child.kill('SIGKILL') }, CYCLE_DEADLINE_MS)
    child.stdout.setEncoding('utf8')
    child.stdout.on('data', (chunk: string) => {
      const lines = (partial + chunk).split('\n')
      partial = lines.pop() ?? ''
      for (const line of lines) {
        const m = /^A (\d+) (\d+) (\d+) (\d+)$/.exec(line)
        if (m === null) continue
        acks.push({ partition: Number(m[1]), offset: Number(m[2]), payload: retentionPayload(cycle, Number(m[3]), Number(m[4])) })
        if (acks.length === killAfterAcks) child.kill('SIGKILL')
      }
    })
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (chunk: string) => { stderr += chunk })
    child.on('error', reject)
    child.on('close', (_code, signal) => {
      clearTimeout(deadline)
      resolve({ acks, signal, stderr, timedOut })
    })
  })
}

let dataDir = ''
beforeAll(async () => { dataDir = await mkdtemp(join(tmpdir(), 'edgemq-retention-crash-')) })
afterAll(async () => { if (dataDir !== '') await rm(dataDir, { recursive: true, force: true }) })

it(`opens, gapless and with every acknowledged record retention kept, after ${CYCLES} SIGKILLs during retention`, async () => {
  /** Every acknowledged record by partition and offset, across cycles. */
  const acked = Array.from({ length: RETENTION_PARTITIONS }, () => new Map<number, Buffer>())
  let deleted = 0
  for (let cycle = 0; cycle < CYCLES; cycle++) {
    // Log-uniform: a kill after the first few acks is as likely as one after thousands (retention runs from the start).
    const killAfter = Math.max(1, Math.floor(Math.exp(Math.random() * Math.log(4000))))
    const run = await runChild(dataDir, cycle, killAfter)
    const context = `cycle ${cycle}, killed after ${killAfter} acks`
    expect(run.timedOut, `${context}: the child did not get there; stderr:\n${run.stderr}`).toBe(false)
    expect(run.signal, `${context}: the child exited by itself; stderr:\n${run.stderr}`).toBe('SIGKILL')
    for (const a of run.acks) acked[a.partition]!.set(a.offset, a.payload)

    const store = await openLogStore({ location: dataDir })
    try {
      for (let p = 0; p < RETENTION_PARTITIONS; p++) {
        const { logStartOffset: start, logEndOffset: end } = store.partitionInfo(RETENTION_STREAM, p)
        const problems: string[] = []
        for (const offset of acked[p]!.keys()) if (offset >= end) problems.push(`acknowledged offset ${offset} is past the log end ${end}`)
        for (let from = start; from < end;) {
          const { records, nextOffset } = await store.read(RETENTION_STREAM, p, from, { maxRecords: 1000 })
          for (const r of records) {
            const want = acked[p]!.get(r.offset)
            if (want !== undefined && !Buffer.from(r.payload).equals(want)) problems.push(`offset ${r.offset} does not hold the acknowledged record`)
            if (!/^\d+\/\d+\/\d+\//.test(Buffer.from(r.payload).toString('latin1', 0, 20))) problems.push(`offset ${r.offset} holds a record no child sent`)
          }
          expect(nextOffset, `${context}: partition ${p} read from ${from}`).toBeGreaterThan(from)
          from = nextOffset
        }
        for (const offset of [...acked[p]!.keys()]) {
          if (offset < start) { acked[p]!.delete(offset); deleted++ }
        }
        expect(problems.slice(0, 20), `${context}: partition ${p} (log ${start}..${end})`).toEqual([])
      }
    } finally {
      await store.close()
    }
  }
  // Retention did run: the check above is not only about appends.
  expect(deleted).toBeGreaterThan(0)
})
