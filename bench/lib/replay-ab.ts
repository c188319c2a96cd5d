/**
 * A paired A/B of the HTTP replay: two checkouts' `edgemq start` serving
 * copies of one log at the same time, fetched in turns (the order flips
 * every round), so both see the same load on a shared machine. `npm run
 * bench -- replay` with `--edgemq=` runs one checkout after the other, a
 * minute apart; on a busy machine its figures drift more between runs than
 * a change moves them, and a paired round does not.
 *
 *   node --import tsx bench/lib/replay-ab.ts --base=../other/gateway/edgemq.mjs [--records=N] [--rounds=N] [--ndjson-only]
 *
 * The log is replay.ts's: RECORDS records of 100-byte JSON in partition 0
 * of `default/telemetry`, stored batches of 1,000. Each round fetches the
 * whole partition as NDJSON (counting lines) and as format=batches
 * (decoding every record) from each side. One JSON line per format: the
 * medians of records/s and of the server's CPU per record (µs, all
 * threads, from /proc), and the ratio this checkout / base of each round.
 * Lives in lib/ so that `npm run bench` does not run it (it needs --base).
 */
import { cp, mkdtemp, rm } from 'node:fs/promises'
import http from 'node:http'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { readBatchStream } from '../../gateway/cli/batches.ts'
import { processCpuSeconds, startEdgemq, type RunningBroker } from './brokers.ts'
import { LogFixture, openStore } from './log-fixture.ts'
import { info, median } from './report.ts'

const argv = process.argv.slice(2)
const flag = (name: string): string | undefined => argv.find((a) => a.startsWith(`--${name}=`))?.split('=')[1]
const BASE = flag('base')
if (BASE === undefined) throw new Error('--base=PATH (another checkout\'s gateway/edgemq.mjs) is required')
const RECORDS = Number(flag('records') ?? 1_000_000)
const ROUNDS = Number(flag('rounds') ?? 8)
const FORMATS = argv.includes('--ndjson-only') ? ['ndjson'] as const : ['ndjson', 'batches'] as const
const THIS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../gateway/edgemq.mjs')

function jsonPayload (key: string): Buffer {
  const head = `{"dev":"${key}","temp":21.5,"hum":48,"site":"a","fw":"1.4.2","pad":"`
  return Buffer.from(`${head}${'x'.repeat(100 - head.length - 2)}"}`)
}

interface Fetch { readonly rate: number, readonly cpuUsPerRecord: number }

function fetchAll (server: RunningBroker, format: 'ndjson' | 'batches'): Promise<Fetch> {
  const url = `${server.httpUrl ?? ''}/v1/streams/telemetry/partitions/0/records?format=${format}`
  return new Promise((resolve, reject) => {
    const cpu0 = processCpuSeconds(server.pid) ?? NaN
    const t0 = performance.now()
    http.get(url, (res) => {
      const body = res as AsyncIterable<Buffer>
      const counted = format === 'ndjson' ? countLines(body) : countRecords(body)
      counted.then((n) => {
        if (n !== RECORDS) throw new Error(`${url}: ${n} records, expected ${RECORDS}`)
        const seconds = (performance.now() - t0) / 1000
        resolve({ rate: n / seconds, cpuUsPerRecord: ((processCpuSeconds(server.pid) ?? NaN) - cpu0) / n * 1e6 })
      }).catch(reject)
    }).once('error', reject)
  })
}

async function countLines (body: AsyncIterable<Buffer>): Promise<number> {
  let lines = 0
  for await (const chunk of body) for (let at = chunk.indexOf(10); at >= 0; at = chunk.indexOf(10, at + 1)) lines++
  return lines - 1 // the end line
}

async function countRecords (body: AsyncIterable<Buffer>): Promise<number> {
  let records = 0
  for await (const item of readBatchStream(body)) if (item.kind === 'records') records += item.records.length
  return records
}

const root = await mkdtemp(path.join(os.tmpdir(), 'edgemq-replay-ab-'))
try {
  const fx = new LogFixture({ stream: 'default/telemetry', partitions: 8, appenders: 100, payloadBytes: 100, payload: jsonPayload, onlyPartition: 0 })
  const mine = path.join(root, 'this')
  const store = await openStore(path.join(mine, 'db'), undefined, 'async')
  await store.createStream(fx.stream, { partitions: fx.partitions })
  await fx.storeAppend(store, RECORDS, 100)
  await store.close()
  const theirs = path.join(root, 'base')
  await cp(mine, theirs, { recursive: true })
  const servers = { this: await startEdgemq(mine, [], THIS), base: await startEdgemq(theirs, [], BASE) }
  const got = new Map<string, Fetch[]>()
  try {
    for (let r = 0; r < ROUNDS; r++) {
      for (const format of FORMATS) {
        for (const side of r % 2 === 0 ? ['this', 'base'] as const : ['base', 'this'] as const) {
          const f = await fetchAll(servers[side], format)
          got.set(`${format} ${side}`, [...got.get(`${format} ${side}`) ?? [], f])
          info(`round ${r + 1}/${ROUNDS} ${format} ${side}: ${Math.round(f.rate)} rec/s, ${f.cpuUsPerRecord.toFixed(2)} µs server CPU per record`)
        }
      }
    }
  } finally {
    await servers.this.stop(60_000)
    await servers.base.stop(60_000)
  }
  for (const format of FORMATS) {
    const a = got.get(`${format} this`) ?? []
    const b = got.get(`${format} base`) ?? []
    const paired = a.map((f, i) => f.rate / (b[i]?.rate ?? NaN))
    process.stdout.write(`${JSON.stringify({
      bench: `replay-ab.http.${format}`, unit: 'records/s', records: RECORDS, rounds: ROUNDS, base: BASE,
      value: Math.round(median(a.map((f) => f.rate))), baselineValue: Math.round(median(b.map((f) => f.rate))),
      medianPairedRatio: Number(median(paired).toFixed(3)), pairedRatios: paired.map((x) => Number(x.toFixed(2))),
      cpuUsPerRecord: Number(median(a.map((f) => f.cpuUsPerRecord)).toFixed(2)),
      baselineCpuUsPerRecord: Number(median(b.map((f) => f.cpuUsPerRecord)).toFixed(2)),
    })}\n`)
  }
} finally {
  await rm(root, { recursive: true, force: true })
}
