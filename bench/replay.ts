/**
 * `npm run bench -- replay`: reading the log back, in the store and over the
 * HTTP API, against raw classic-level and a plain node:http server holding
 * the same records, in the same run. One JSON line per figure on stdout (see
 * lib/report.ts); progress on stderr.
 *
 * The log: 1 M records of 100 bytes (JSON text, as telemetry is) from 100
 * devices, every one of them in partition 0 of `default/telemetry`, so one
 * consumer reads one partition. Written through append() (window 100, so
 * stored batches hold 1,000 records), in a data directory that `edgemq
 * start` then serves with its default config. The raw side is
 * lib/log-fixture.ts's: 1,000-row cbor values in a classic-level db.
 *
 * Figures (value / baseline = ratio):
 * - replay.store.read      read() from the log start to its end, READ_RECORDS
 *                          records per call (what the HTTP fetch reads per
 *                          step). Baseline: iterating the raw db and
 *                          cbor-decoding every value.
 * - replay.store.batches   readBatches() over the same range, 4 MiB per call:
 *                          stored bytes, checked (CRC) but not decoded.
 *                          Same baseline (which does decode).
 * - replay.http.ndjson     one consumer fetching the partition as NDJSON
 *                          (`format=ndjson`, payloads as UTF-8) from `edgemq
 *                          start` in a child process, counting lines.
 *                          Baseline: a plain node:http child process
 *                          (lib/plain-replay-server.ts) iterating the raw db
 *                          and writing each record with JSON.stringify.
 * - replay.http.batches    the same consumer fetching `format=batches` and
 *                          decoding every record (gateway/cli/batches.ts, as
 *                          `edgemq replay` does). Baseline: the plain server
 *                          streaming the raw db's values untouched, the
 *                          client cbor-decoding them.
 *
 * Store and baseline take turns, ROUNDS rounds; figures are medians. The
 * server's CPU (all threads) over each fetch is in params.
 *
 * Arguments: figure names (`store http`, default both), `--quick` (a tenth
 * of the records), `--rounds=N`, `--edgemq=PATH` (another checkout's
 * gateway/edgemq.mjs to serve the HTTP figures, to compare a change). `--profile[=ndjson|batches]`: instead of
 * the figures, fetch the log three times from an edgemq run with `node
 * --cpu-prof` and print where its main thread spent the time (the
 * .cpuprofile is kept in a temp directory, or `--profile-dir=DIR`).
 */
import { mkdtemp, readdir } from 'node:fs/promises'
import http from 'node:http'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { READ_CHUNK_RECORDS } from '../gateway/query/read-plan.ts'
import { cborSequence, readBatchStream } from '../gateway/cli/batches.ts'
import type { LogStore } from '../store/index.ts'
import { processCpuSeconds, startEdgemq, startListeningChild, type RunningBroker } from './lib/brokers.ts'
import { formatProfileSummary, summarizeCpuProfile } from './lib/cpu-profile.ts'
import { LogFixture, cbor, check, openRaw, openStore, type CommitTally } from './lib/log-fixture.ts'
import { TempDirs, info, median, report, round } from './lib/report.ts'

const argv = process.argv.slice(2)
const flag = (name: string): string | undefined => argv.find((a) => a === `--${name}` || a.startsWith(`--${name}=`))?.split('=')[1]
const QUICK = argv.includes('--quick')
const ROUNDS = Number(flag('rounds') ?? 3)
if (!Number.isSafeInteger(ROUNDS) || ROUNDS < 1) throw new Error('--rounds must be a positive integer')
const PROFILE = argv.some((a) => a === '--profile' || a.startsWith('--profile='))
const PROFILE_FORMAT = flag('profile') ?? 'ndjson'
if (PROFILE && PROFILE_FORMAT !== 'ndjson' && PROFILE_FORMAT !== 'batches') throw new Error('--profile takes ndjson or batches')
/** Another checkout's gateway/edgemq.mjs to serve the HTTP figures instead of this one's. */
const EDGEMQ_BIN = flag('edgemq') === undefined ? undefined : path.resolve(flag('edgemq') as string)
const FIGURES = ['store', 'http'] as const
const selected = argv.filter((a) => !a.startsWith('--'))
for (const name of selected) {
  if (!(FIGURES as readonly string[]).includes(name)) throw new Error(`unknown figure ${name}; expected one of ${FIGURES.join(', ')}`)
}
const wanted = (name: typeof FIGURES[number]): boolean => selected.length === 0 || selected.includes(name)

const RECORDS = QUICK ? 100_000 : 1_000_000
const PAYLOAD_BYTES = 100
const PARTITION = 0
/** Records per read() in the store figure: what one step of the HTTP fetch reads. */
const READ_RECORDS = READ_CHUNK_RECORDS
const BATCH_READ_BYTES = 4 * 1024 * 1024

/** A JSON reading padded to exactly PAYLOAD_BYTES. */
function jsonPayload (key: string): Buffer {
  const base = `{"dev":"${key}","temp":21.5,"hum":48,"site":"a","fw":"1.4.2","pad":"`
  return Buffer.from(`${base}${'x'.repeat(PAYLOAD_BYTES - base.length - 2)}"}`)
}

// The gateway's default config: tenant `default`, stream `telemetry` with 8 partitions.
const fx = new LogFixture({ stream: 'default/telemetry', partitions: 8, appenders: 100, payloadBytes: PAYLOAD_BYTES, payload: jsonPayload, onlyPartition: PARTITION })
const dirs = new TempDirs()
const here = path.dirname(fileURLToPath(import.meta.url))

async function fill (): Promise<{ dataDir: string, rawDir: string, batches: number }> {
  const dataDir = await dirs.make('replay-data')
  const tally: CommitTally = { commits: 0, records: 0 }
  const store = await openStore(path.join(dataDir, 'db'), tally, 'async')
  await store.createStream(fx.stream, { partitions: fx.partitions })
  const rate = await fx.storeAppend(store, RECORDS, 100)
  check(fx.storeRecordCount(store) === RECORDS, `the store holds ${fx.storeRecordCount(store)} records, expected ${RECORDS}`)
  const { batches } = await countBatches(store)
  await store.close()
  const rawDir = await dirs.make('replay-raw')
  const db = await openRaw(rawDir)
  await fx.rawAppend(db, RECORDS, fx.preEncodedValues(16), false)
  await db.close()
  info(`filled ${RECORDS} records (${Math.round(rate)} rec/s, ${tally.commits} commits, ${batches} stored batches)`)
  return { dataDir, rawDir, batches }
}

async function countBatches (store: LogStore): Promise<{ batches: number, bytes: number, records: number }> {
  let batches = 0
  let bytes = 0
  let records = 0
  let offset = 0
  const end = store.partitionInfo(fx.stream, PARTITION).logEndOffset
  while (offset < end) {
    const r = await store.readBatches(fx.stream, PARTITION, offset, { maxBytes: BATCH_READ_BYTES })
    for (const b of r.batches) { batches++; bytes += b.bytes.byteLength; records += b.count }
    offset = r.nextOffset
  }
  return { batches, bytes, records }
}

async function storeFigures (dataDir: string, rawDir: string): Promise<void> {
  const store = await openStore(path.join(dataDir, 'db'))
  const db = await openRaw(rawDir)
  const raw: number[] = []
  const read: number[] = []
  const batches: number[] = []
  try {
    for (let r = 0; r < ROUNDS; r++) {
      raw.push(await fx.rawRead(db, RECORDS))
      read.push(await fx.storeRead(store, RECORDS, { maxRecords: READ_RECORDS, maxBytes: BATCH_READ_BYTES }))
      const t0 = performance.now()
      const counted = await countBatches(store)
      batches.push(RECORDS / ((performance.now() - t0) / 1000))
      check(counted.records === RECORDS, `readBatches saw ${counted.records} records`)
      info(`store round ${r + 1}/${ROUNDS}: raw ${Math.round(raw[r]!)} rec/s, read() ${Math.round(read[r]!)} rec/s, readBatches() ${Math.round(batches[r]!)} rec/s`)
    }
  } finally {
    await store.close()
    await db.close()
  }
  const baseline = 'classic-level iterator over the same records as 1000-row cbor values, cbor-decoded'
  const params = { records: RECORDS, payloadBytes: PAYLOAD_BYTES, rounds: ROUNDS, statistic: 'median', rawRounds: raw.map(Math.round) }
  report({ bench: 'replay.store.read', unit: 'records/s', value: median(read), baseline, baselineValue: median(raw), better: 'higher',
    params: { ...params, maxRecords: READ_RECORDS, storeRounds: read.map(Math.round), target: '>= 2 M records/s' } })
  report({ bench: 'replay.store.batches', unit: 'records/s', value: median(batches), baseline, baselineValue: median(raw), better: 'higher',
    params: { ...params, maxBytes: BATCH_READ_BYTES, decoded: false, storeRounds: batches.map(Math.round) } })
}

// ---------------------------------------------------------------- HTTP

interface PlainServer { readonly url: string, readonly pid: number, stop (): Promise<void> }

async function startPlainServer (rawDir: string): Promise<PlainServer> {
  const child = await startListeningChild(path.join(here, 'lib/plain-replay-server.ts'), [rawDir], 'plain replay server')
  return { url: `http://127.0.0.1:${child.port}`, pid: child.pid, stop: child.stop }
}

interface Fetched {
  readonly records: number
  /** Bytes of the response body. */
  readonly bytes: number
  readonly seconds: number
  readonly serverCores: number
}

/** GETs `url` with node:http and hands the body to `consume`; times from the request to the last byte. */
function timedGet (url: string, serverPid: number, consume: (body: AsyncIterable<Buffer>) => Promise<{ records: number }>): Promise<Fetched> {
  return new Promise((resolve, reject) => {
    const cpu0 = processCpuSeconds(serverPid) ?? NaN
    const t0 = performance.now()
    http.get(url, (res) => {
      if (res.statusCode !== 200) { reject(new Error(`GET ${url}: HTTP ${res.statusCode ?? '?'}`)); res.resume(); return }
      let bytes = 0
      const counted = (async function * () { for await (const chunk of res as AsyncIterable<Buffer>) { bytes += chunk.length; yield chunk } })()
      consume(counted).then(({ records }) => {
        const seconds = (performance.now() - t0) / 1000
        resolve({ records, bytes, seconds, serverCores: ((processCpuSeconds(serverPid) ?? NaN) - cpu0) / seconds })
      }, reject)
    }).once('error', reject)
  })
}

/** Counts NDJSON lines without parsing them (the consumer is not what is measured); the last line is the end line. */
async function countLines (body: AsyncIterable<Buffer>): Promise<{ records: number }> {
  let lines = 0
  for await (const chunk of body) {
    for (let at = chunk.indexOf(10); at >= 0; at = chunk.indexOf(10, at + 1)) lines++
  }
  return { records: lines - 1 }
}

/** Decodes a format=batches body into records, as `edgemq replay` does. */
async function decodeBatches (body: AsyncIterable<Buffer>): Promise<{ records: number }> {
  let records = 0
  let bytes = 0
  for await (const item of readBatchStream(body)) {
    if (item.kind === 'records') { records += item.records.length; for (const r of item.records) bytes += r.payload.byteLength }
    if (item.kind === 'error') throw new Error(`batches response failed: ${item.error.code} ${item.error.message}`)
  }
  check(bytes === records * PAYLOAD_BYTES, `decoded ${bytes} payload bytes for ${records} records`)
  return { records }
}

/** Decodes the plain server's CBOR sequence of raw values: every row of every value. */
async function decodeValues (body: AsyncIterable<Buffer>): Promise<{ records: number }> {
  let records = 0
  let bytes = 0
  for await (const item of cborSequence(body)) {
    if (!('bytes' in item)) continue // the end map
    const rows = cbor.decode(item.bytes) as unknown[][]
    records += rows.length
    for (const row of rows) bytes += (row[3] as Uint8Array).byteLength
  }
  check(bytes === records * PAYLOAD_BYTES, `decoded ${bytes} payload bytes for ${records} records`)
  return { records }
}

const recordsUrl = (broker: RunningBroker, format: 'ndjson' | 'batches'): string =>
  `${broker.httpUrl ?? ''}/v1/streams/telemetry/partitions/${PARTITION}/records?format=${format}`

async function httpFigures (dataDir: string, rawDir: string, storedBatches: number): Promise<void> {
  const plain = await startPlainServer(rawDir)
  const edgemq = await startEdgemq(dataDir, [], EDGEMQ_BIN)
  const results = { ndjson: [] as Fetched[], plainNdjson: [] as Fetched[], batches: [] as Fetched[], plainValues: [] as Fetched[] }
  try {
    for (let r = 0; r < ROUNDS; r++) {
      // Alternate which side goes first, so drift on the shared machine hits both alike.
      const pairs: Array<Array<() => Promise<void>>> = [
        [async () => { results.plainNdjson.push(await timedGet(`${plain.url}/ndjson`, plain.pid, countLines)) },
          async () => { results.ndjson.push(await timedGet(recordsUrl(edgemq, 'ndjson'), edgemq.pid, countLines)) }],
        [async () => { results.plainValues.push(await timedGet(`${plain.url}/values`, plain.pid, decodeValues)) },
          async () => { results.batches.push(await timedGet(recordsUrl(edgemq, 'batches'), edgemq.pid, decodeBatches)) }],
      ]
      for (const pair of pairs) for (const run of r % 2 === 0 ? pair : [...pair].reverse()) await run()
      for (const [name, list] of Object.entries(results)) {
        const f = list[r]!
        check(f.records === RECORDS, `${name} fetched ${f.records} records, expected ${RECORDS}`)
      }
      const rate = (f: Fetched): string => `${Math.round(f.records / f.seconds)} rec/s (server ${round(f.serverCores, 2)} cores)`
      info(`http round ${r + 1}/${ROUNDS}: ndjson ${rate(results.ndjson[r]!)} vs plain ${rate(results.plainNdjson[r]!)}; ` +
        `batches ${rate(results.batches[r]!)} vs plain values ${rate(results.plainValues[r]!)}`)
    }
  } finally {
    await edgemq.stop()
    await plain.stop()
  }
  const rates = (list: readonly Fetched[]): number[] => list.map((f) => f.records / f.seconds)
  const common = { records: RECORDS, payloadBytes: PAYLOAD_BYTES, consumers: 1, partitions: 1, rounds: ROUNDS, statistic: 'median', storedBatches }
  const perRound = (list: readonly Fetched[], base: readonly Fetched[]): Record<string, number[]> => ({
    roundRates: rates(list).map(Math.round), baselineRoundRates: rates(base).map(Math.round),
    serverCores: list.map((f) => round(f.serverCores, 2)), baselineServerCores: base.map((f) => round(f.serverCores, 2)),
  })
  report({
    bench: 'replay.http.ndjson', unit: 'records/s', value: median(rates(results.ndjson)),
    baseline: 'plain node:http server: raw classic-level iterator, cbor-decode, JSON.stringify per record, one write per 1000 records',
    baselineValue: median(rates(results.plainNdjson)), better: 'higher',
    params: { ...common, edgemq: EDGEMQ_BIN ?? 'this checkout', payload: 'utf8', responseBytes: results.ndjson[0]!.bytes, ...perRound(results.ndjson, results.plainNdjson), target: '>= 300 k records/s' },
  })
  report({
    bench: 'replay.http.batches', unit: 'records/s', value: median(rates(results.batches)),
    baseline: 'plain node:http server streaming the raw db\'s values untouched; the client cbor-decodes them',
    baselineValue: median(rates(results.plainValues)), better: 'higher',
    params: {
      ...common, clientDecodes: true, responseBytes: results.batches[0]!.bytes, ...perRound(results.batches, results.plainValues),
      ndjsonMedian: Math.round(median(rates(results.ndjson))),
    },
  })
}

async function profile (dataDir: string): Promise<void> {
  const profileDir = flag('profile-dir') ?? await mkdtemp(path.join(os.tmpdir(), 'edgemq-bench-profile-'))
  const format = PROFILE_FORMAT as 'ndjson' | 'batches'
  const edgemq = await startEdgemq(dataDir, ['--cpu-prof', '--cpu-prof-dir', profileDir])
  const fromUs = Number(process.hrtime.bigint() / 1000n)
  try {
    for (let i = 0; i < 3; i++) {
      const f = await timedGet(recordsUrl(edgemq, format), edgemq.pid, format === 'ndjson' ? countLines : decodeBatches)
      info(`profiled fetch ${i + 1}/3 (${format}): ${Math.round(f.records / f.seconds)} rec/s, server ${round(f.serverCores, 2)} cores`)
    }
  } finally {
    await edgemq.stop(60_000)
  }
  const toUs = Number(process.hrtime.bigint() / 1000n)
  const files = (await readdir(profileDir)).filter((f) => f.endsWith('.cpuprofile')).sort()
  const main = files.find((f) => f.includes(`.${edgemq.pid}.0.`)) ?? files[0]
  if (main === undefined) throw new Error(`no .cpuprofile in ${profileDir}`)
  const file = path.join(profileDir, main)
  process.stderr.write(`${formatProfileSummary(await summarizeCpuProfile(file, { fromUs, toUs }))}\n`)
  info(`profile kept at ${file}`)
}

async function main (): Promise<void> {
  const t0 = performance.now()
  try {
    info(`replay bench: ${RECORDS} records of ${PAYLOAD_BYTES} bytes in one partition, node ${process.version}, ${os.cpus().length} cpus, ${ROUNDS} rounds`)
    const { dataDir, rawDir, batches } = await fill()
    if (PROFILE) {
      await profile(dataDir)
      return
    }
    if (wanted('store')) await storeFigures(dataDir, rawDir)
    if (wanted('http')) await httpFigures(dataDir, rawDir, batches)
  } finally {
    await dirs.cleanup()
  }
  info(`replay bench done in ${round((performance.now() - t0) / 1000, 1)} s`)
}

await main()
