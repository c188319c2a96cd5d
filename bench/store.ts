/**
 * `npm run bench:store`: the durable log against raw classic-level holding
 * the same records, in the same run. One JSON line per figure on stdout (see
 * lib/report.ts); progress on stderr.
 *
 * Figures (store value / raw value = ratio):
 * - store.append       durable (`sync`) append throughput: 100 appenders,
 *                      8 partitions, 100-byte payloads. Each appender keeps
 *                      WINDOW (default 100) appends in flight, like a device
 *                      with that many unacknowledged QoS 1 messages, so about
 *                      10 k appends wait for each group commit (some 1,250
 *                      per partition, against raw's 1,000 per value).
 *                      Awaiting each append before the next would measure
 *                      fsync latency, not throughput. Raw:
 *                      `db.batch(ops, { sync: true })`, one write at a time,
 *                      8 puts per write, each value 1,000 pre-encoded records.
 * - store.latency.p50/p99  append()-call-to-resolve time at a fixed offered
 *                      rate (open loop, arrivals ticked once per ms, round
 *                      robin over the 100 appenders). Raw: the same driver
 *                      over a minimal leader/follower group commit that
 *                      writes the pre-encoded records of each partition as
 *                      one value per partition with `sync: true`.
 * - store.read         sequential read throughput: `read()` through every
 *                      partition with default options. Raw: iterate the raw
 *                      db of the append figure and cbor-decode each value.
 * - store.open         time to open (recover) a store holding 10 M records,
 *                      written through append(). Raw: opening a classic-level
 *                      db holding the same 10 M records as 1,000-record values.
 * - store.headers.*    what the `edgemq-user` header (stamped on every record
 *                      of an authenticated client, one username per device)
 *                      costs: the store with it against the store without it,
 *                      rounds interleaved — append and read throughput, bytes
 *                      per record, and encodeBatch / decodeBatch time of one
 *                      1,000-record batch. Not in the default run.
 *
 * Arguments: figure names to run (`append latency read open`, default all),
 * `--quick` (a tenth of every size, for trying the bench out), `--window=N`.
 */
import type { Durability } from '../store/index.ts'
import { decodeBatch, encodeBatch, readBatchHeader, type PendingRecord } from '../store/format.ts'
import { LogFixture, RAW_RECORDS_PER_VALUE, cbor, check, openRaw, openStore, type CommitTally, type Device, type RawDb, rawKey } from './lib/log-fixture.ts'
import { TempDirs, info, median, percentile, report, round } from './lib/report.ts'

const argv = process.argv.slice(2)
const QUICK = argv.includes('--quick')
const WINDOW = Number(argv.find((a) => a.startsWith('--window='))?.slice('--window='.length) ?? 100)
if (!Number.isSafeInteger(WINDOW) || WINDOW < 1) throw new Error('--window must be a positive integer')
const FIGURES = ['append', 'latency', 'read', 'open', 'headers'] as const
/** Figures run when none is named; `headers` compares two stores, not the store with raw LevelDB. */
const DEFAULT_FIGURES: readonly FigureName[] = ['append', 'latency', 'read', 'open']
type FigureName = typeof FIGURES[number]
const selected = argv.filter((a) => !a.startsWith('--'))
for (const name of selected) {
  if (!(FIGURES as readonly string[]).includes(name)) throw new Error(`unknown figure ${name}; expected one of ${FIGURES.join(', ')}`)
}
const wanted = (name: FigureName): boolean => selected.length === 0 ? DEFAULT_FIGURES.includes(name) : selected.includes(name)
const scale = (n: number): number => (QUICK ? Math.round(n / 10) : n)

const STREAM = 'bench/telemetry'
const PARTITIONS = 8
const APPENDERS = 100
const PAYLOAD_BYTES = 100
/** Records appended per round of the append figure (and then read back). */
const APPEND_RECORDS = scale(2_000_000)
/** Rounds of raw / store, interleaved, so drift on the shared machine hits both alike. */
const ROUNDS = 3
const LATENCY_RATE = 20_000
const LATENCY_SECONDS = QUICK ? 1.5 : 5
const LATENCY_WARMUP_SECONDS = QUICK ? 0.5 : 1
const LATENCY_ROUNDS = 3
const OPEN_RECORDS = scale(10_000_000)
/** In-flight appends per appender while filling the 10 M-record store: commits of about 12 k records per partition. */
const OPEN_FILL_WINDOW = 1000
/** The first open after writing, then three more for the median of a plain reopen. */
const OPEN_REPEATS = 4
/** The open figure measures recovery, not the fill: both dbs are filled without fsync (same bytes on disk) to stay in the time budget. */
const FILL_DURABILITY: Durability = 'async'

const RAW_APPEND = 'classic-level batch put, sync, 8 x 1000-record pre-encoded values per write'

const fx = new LogFixture({ stream: STREAM, partitions: PARTITIONS, appenders: APPENDERS, payloadBytes: PAYLOAD_BYTES })
const devices = fx.devices
const dirs = new TempDirs()

// ---------------------------------------------------------------- figures

/**
 * Append rounds (raw, store, interleaved); leaves the last round's dbs for
 * the read figure. With `print` false (read figure alone) one round only fills them.
 */
async function appendFigure (print: boolean): Promise<{ storeDir: string, rawDir: string }> {
  const rounds = print ? ROUNDS : 1
  const values = fx.preEncodedValues(16)
  const raw: number[] = []
  const stored: number[] = []
  const tally: CommitTally = { commits: 0, records: 0 }
  let storeDir = ''
  let rawDir = ''
  let storeBytes = 0
  for (let round = 0; round < rounds; round++) {
    if (rawDir !== '') await dirs.remove(rawDir)
    if (storeDir !== '') await dirs.remove(storeDir)
    rawDir = await dirs.make('raw')
    storeDir = await dirs.make('store')

    const db = await openRaw(rawDir)
    raw.push(await fx.rawAppend(db, APPEND_RECORDS, values))
    await db.close()

    tally.commits = 0
    tally.records = 0
    const store = await openStore(storeDir, tally)
    await store.createStream(STREAM, { partitions: PARTITIONS })
    stored.push(await fx.storeAppend(store, APPEND_RECORDS, WINDOW))
    check(fx.storeRecordCount(store) === APPEND_RECORDS, `store holds ${fx.storeRecordCount(store)} records after the append round`)
    storeBytes = store.totalBytes
    await store.close()
    info(`append round ${round + 1}/${rounds}: raw ${Math.round(raw[round] as number)} rec/s, store ${Math.round(stored[round] as number)} rec/s, ${tally.commits} commits of ${Math.round(tally.records / tally.commits)} records on average`)
  }
  if (!print) return { storeDir, rawDir }
  report({
    bench: 'store.append',
    unit: 'records/s',
    value: median(stored),
    baseline: RAW_APPEND,
    baselineValue: median(raw),
    better: 'higher',
    params: {
      records: APPEND_RECORDS, appenders: APPENDERS, window: WINDOW, partitions: PARTITIONS, payloadBytes: PAYLOAD_BYTES,
      durability: 'sync', rounds: ROUNDS, statistic: 'median',
      avgCommitRecords: Math.round(tally.records / tally.commits),
      storeBytesPerRecord: round(storeBytes / APPEND_RECORDS, 1),
      rawBytesPerRecord: round(values.reduce((n, v) => n + v.length, 0) / values.length / RAW_RECORDS_PER_VALUE, 1),
      storeRounds: stored.map((v) => Math.round(v)), rawRounds: raw.map((v) => Math.round(v)), roundRatios: pairedRatios(stored, raw),
    },
  })
  return { storeDir, rawDir }
}

async function readFigure (storeDir: string, rawDir: string): Promise<void> {
  const store = await openStore(storeDir)
  const db = await openRaw(rawDir)
  const raw: number[] = []
  const stored: number[] = []
  try {
    for (let round = 0; round < ROUNDS; round++) {
      raw.push(await fx.rawRead(db, APPEND_RECORDS))
      stored.push(await fx.storeRead(store, APPEND_RECORDS))
      info(`read round ${round + 1}/${ROUNDS}: raw ${Math.round(raw[round] as number)} rec/s, store ${Math.round(stored[round] as number)} rec/s`)
    }
  } finally {
    await store.close()
    await db.close()
  }
  report({
    bench: 'store.read',
    unit: 'records/s',
    value: median(stored),
    baseline: 'classic-level iterator over the raw db of the append figure (1000-record cbor values), cbor-decoded',
    baselineValue: median(raw),
    better: 'higher',
    params: {
      records: APPEND_RECORDS, partitions: PARTITIONS, readOptions: 'defaults (maxRecords 1000, maxBytes 1 MiB)', rounds: ROUNDS,
      statistic: 'median', storeRounds: stored.map((v) => Math.round(v)), rawRounds: raw.map((v) => Math.round(v)),
      roundRatios: pairedRatios(stored, raw),
    },
  })
}

/** The raw side of the latency figure: leader/follower group commit of pre-encoded records, nothing else. */
class RawGroupCommit {
  readonly #db: RawDb
  readonly #rows: Buffer[]
  readonly #next = new Array<number>(PARTITIONS).fill(0)
  #pending: Array<{ device: number, resolve: () => void, reject: (err: Error) => void }> = []
  #running = false
  #scheduled = false

  constructor (db: RawDb) {
    this.#db = db
    this.#rows = devices.map((d) => cbor.encode(fx.rawRow(d)))
  }

  append (device: number): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#pending.push({ device, resolve, reject })
      if (!this.#running && !this.#scheduled) {
        this.#scheduled = true
        queueMicrotask(() => { void this.#loop() })
      }
    })
  }

  async #loop (): Promise<void> {
    this.#scheduled = false
    this.#running = true
    while (this.#pending.length > 0) {
      const group = this.#pending
      this.#pending = []
      const byPartition: Buffer[][] = Array.from({ length: PARTITIONS }, () => [])
      for (const a of group) byPartition[(devices[a.device] as Device).partition]?.push(this.#rows[a.device] as Buffer)
      const ops: Array<{ type: 'put', key: Buffer, value: Buffer }> = []
      byPartition.forEach((rows, p) => {
        if (rows.length === 0) return
        ops.push({ type: 'put', key: rawKey(p, this.#next[p] as number), value: Buffer.concat(rows) })
        this.#next[p] = (this.#next[p] as number) + rows.length
      })
      try {
        await this.#db.batch(ops, { sync: true })
        for (const a of group) a.resolve()
      } catch (err) {
        for (const a of group) a.reject(err as Error)
      }
    }
    this.#running = false
  }
}

/**
 * Offers LATENCY_RATE appends/s for LATENCY_SECONDS, round robin over the
 * appenders, and returns each append's call-to-resolve time in ms, warmup
 * excluded. Open loop: arrivals do not wait for earlier appends.
 */
function drive (append: (device: number) => Promise<unknown>): Promise<Float64Array> {
  const total = Math.round(LATENCY_RATE * LATENCY_SECONDS)
  const warmup = Math.round(LATENCY_RATE * LATENCY_WARMUP_SECONDS)
  const latencies = new Float64Array(total)
  return new Promise((resolve, reject) => {
    const start = performance.now()
    let sent = 0
    let done = 0
    const tick = (): void => {
      const due = Math.min(total, Math.floor(((performance.now() - start) / 1000) * LATENCY_RATE))
      while (sent < due) {
        const i = sent++
        const t = performance.now()
        append(i % APPENDERS).then(() => {
          latencies[i] = performance.now() - t
          if (++done === total) resolve(latencies.subarray(warmup).sort())
        }, reject)
      }
      if (sent < total) setTimeout(tick, 1)
    }
    tick()
  })
}

async function latencyFigure (): Promise<void> {
  const raw: Float64Array[] = []
  const stored: Float64Array[] = []
  const tally: CommitTally = { commits: 0, records: 0 }
  for (let round = 0; round < LATENCY_ROUNDS; round++) {
    const rawDir = await dirs.make('lat-raw')
    const db = await openRaw(rawDir)
    const group = new RawGroupCommit(db)
    raw.push(await drive((d) => group.append(d)))
    await db.close()
    await dirs.remove(rawDir)

    const storeDir = await dirs.make('lat-store')
    const store = await openStore(storeDir, tally)
    await store.createStream(STREAM, { partitions: PARTITIONS })
    stored.push(await drive((d) => store.append(STREAM, (devices[d] as Device).key, (devices[d] as Device).record)))
    await store.close()
    await dirs.remove(storeDir)
    info(`latency round ${round + 1}/${LATENCY_ROUNDS}: p50 raw ${round2(percentile(raw[round] as Float64Array, 50))} ms, store ${round2(percentile(stored[round] as Float64Array, 50))} ms; p99 raw ${round2(percentile(raw[round] as Float64Array, 99))} ms, store ${round2(percentile(stored[round] as Float64Array, 99))} ms`)
  }
  const rawAll = concatSorted(raw)
  const storeAll = concatSorted(stored)
  const params = {
    offeredRate: LATENCY_RATE, seconds: LATENCY_SECONDS, warmupSeconds: LATENCY_WARMUP_SECONDS, rounds: LATENCY_ROUNDS,
    statistic: 'percentile of the samples of every round, warmup excluded',
    appenders: APPENDERS, partitions: PARTITIONS, payloadBytes: PAYLOAD_BYTES, durability: 'sync',
    samples: storeAll.length, avgCommitRecords: Math.round(tally.records / tally.commits),
    storeMaxMs: round2(storeAll[storeAll.length - 1] as number), rawMaxMs: round2(rawAll[rawAll.length - 1] as number),
    storeRoundP99Ms: stored.map((r) => round2(percentile(r, 99))), rawRoundP99Ms: raw.map((r) => round2(percentile(r, 99))),
  }
  const baseline = 'classic-level leader/follower group commit of pre-encoded records, sync, same offered rate'
  for (const p of [50, 99]) {
    report({ bench: `store.latency.p${p}`, unit: 'ms', value: percentile(storeAll, p), baseline, baselineValue: percentile(rawAll, p), better: 'lower', params })
  }
}

function round2 (n: number): number { return round(n, 2) }

/** store / raw of each round: the two ran back to back, so these show how far the machine's noise moves the ratio. */
function pairedRatios (stored: readonly number[], raw: readonly number[]): number[] {
  return stored.map((v, i) => round2(v / (raw[i] as number)))
}

function concatSorted (parts: readonly Float64Array[]): Float64Array {
  const all = new Float64Array(parts.reduce((n, p) => n + p.length, 0))
  let at = 0
  for (const p of parts) { all.set(p, at); at += p.length }
  return all.sort()
}

async function openFigure (): Promise<void> {
  const rawDir = await dirs.make('open-raw')
  const storeDir = await dirs.make('open-store')

  let t0 = performance.now()
  const db = await openRaw(rawDir)
  const rawRate = await fx.rawAppend(db, OPEN_RECORDS, fx.preEncodedValues(64), FILL_DURABILITY === 'sync')
  await db.close()
  info(`open: wrote ${OPEN_RECORDS} raw records in ${round2((performance.now() - t0) / 1000)} s (${Math.round(rawRate)} rec/s)`)

  t0 = performance.now()
  const tally: CommitTally = { commits: 0, records: 0 }
  const filling = await openStore(storeDir, tally, FILL_DURABILITY)
  await filling.createStream(STREAM, { partitions: PARTITIONS })
  const fillRate = await fx.storeAppend(filling, OPEN_RECORDS, OPEN_FILL_WINDOW)
  await filling.close()
  info(`open: appended ${OPEN_RECORDS} records to the store in ${round2((performance.now() - t0) / 1000)} s (${Math.round(fillRate)} rec/s, ${tally.commits} commits)`)

  // The first open after writing replays LevelDB's write-ahead log (a restart); later ones find it empty.
  const rawMs: number[] = []
  const storeMs: number[] = []
  for (let i = 0; i < OPEN_REPEATS; i++) {
    t0 = performance.now()
    const rawDb = await openRaw(rawDir)
    rawMs.push(performance.now() - t0)
    await rawDb.close()

    t0 = performance.now()
    const store = await openStore(storeDir)
    storeMs.push(performance.now() - t0)
    const held = fx.storeRecordCount(store)
    await store.close()
    check(held === OPEN_RECORDS, `reopened store holds ${held} records, expected ${OPEN_RECORDS}`)
    info(`open ${i + 1}/${OPEN_REPEATS}: raw ${round2(rawMs[i] as number)} ms, store ${round2(storeMs[i] as number)} ms`)
  }
  report({
    bench: 'store.open',
    unit: 'ms',
    value: storeMs[0] as number,
    baseline: 'opening a classic-level db holding the same records as 1000-record values',
    baselineValue: rawMs[0] as number,
    better: 'lower',
    params: {
      records: OPEN_RECORDS, partitions: PARTITIONS, statistic: 'first open after writing (replays the LevelDB log)',
      storeReopenMedianMs: round2(median(storeMs.slice(1))), rawReopenMedianMs: round2(median(rawMs.slice(1))),
      storeFillRate: Math.round(fillRate), fillWindow: OPEN_FILL_WINDOW, pageCache: 'warm',
    },
  })
  await dirs.remove(rawDir)
  await dirs.remove(storeDir)
}

/** The gateway's audit header (gateway/mqtt/broker.ts USER_HEADER); the bench may not import gateway/. */
const USER_HEADER = 'edgemq-user'
const HEADER_CODEC_BATCHES = QUICK ? 200 : 1000

/** Times encodeBatch and decodeBatch of one 1,000-record batch from `fx`'s devices; µs per batch (median of 5 runs). */
function codecMicros (from: LogFixture): { encodeUs: number, decodeUs: number, bytes: number } {
  const records: PendingRecord[] = []
  const now = Date.now()
  for (let i = 0; i < 1000; i++) {
    const d = from.devices[i % from.devices.length] as Device
    records.push({ timestamp: now + i, key: d.key, topic: d.topic, payload: d.payload, qos: 1, clientId: d.key, headers: d.record.headers ?? null })
  }
  const where = { stream: STREAM, partition: 0, baseOffset: 0 }
  const enc: number[] = []
  const dec: number[] = []
  let value = encodeBatch(0, records).value
  for (let run = 0; run < 5; run++) {
    let t0 = performance.now()
    for (let b = 0; b < HEADER_CODEC_BATCHES; b++) value = encodeBatch(0, records).value
    enc.push((performance.now() - t0) * 1000 / HEADER_CODEC_BATCHES)
    const header = readBatchHeader(value, where)
    t0 = performance.now()
    for (let b = 0; b < HEADER_CODEC_BATCHES; b++) decodeBatch(value, header, where)
    dec.push((performance.now() - t0) * 1000 / HEADER_CODEC_BATCHES)
  }
  return { encodeUs: median(enc), decodeUs: median(dec), bytes: value.length }
}

async function headersFigure (): Promise<void> {
  const users = new LogFixture({ stream: STREAM, partitions: PARTITIONS, appenders: APPENDERS, payloadBytes: PAYLOAD_BYTES, headers: (key) => ({ [USER_HEADER]: `user-${key}` }) })
  const variants = [{ name: 'plain', fx }, { name: 'user', fx: users }] as const
  const records = Math.round(APPEND_RECORDS / 2)
  const results = { plain: { append: [] as number[], read: [] as number[], bytes: 0, enc: [] as number[], dec: [] as number[], batch: 0 }, user: { append: [] as number[], read: [] as number[], bytes: 0, enc: [] as number[], dec: [] as number[], batch: 0 } }
  for (let r = 0; r < ROUNDS; r++) {
    for (const v of r % 2 === 0 ? variants : [...variants].reverse()) {
      const out = results[v.name]
      const codec = codecMicros(v.fx)
      out.enc.push(codec.encodeUs)
      out.dec.push(codec.decodeUs)
      out.batch = codec.bytes
      const dir = await dirs.make(`headers-${v.name}`)
      const store = await openStore(dir)
      await store.createStream(STREAM, { partitions: PARTITIONS })
      out.append.push(await v.fx.storeAppend(store, records, WINDOW))
      out.bytes = store.totalBytes / v.fx.storeRecordCount(store)
      out.read.push(await v.fx.storeRead(store, v.fx.storeRecordCount(store)))
      await store.close()
      await dirs.remove(dir)
      info(`headers round ${r + 1}/${ROUNDS} ${v.name}: append ${Math.round(out.append[r] as number)} rec/s, read ${Math.round(out.read[r] as number)} rec/s, encode ${round2(codec.encodeUs)} µs, decode ${round2(codec.decodeUs)} µs per 1,000-record batch of ${codec.bytes} bytes`)
    }
  }
  const { plain, user } = results
  const line = (bench: string, unit: string, better: 'higher' | 'lower', u: number[], p: number[]): void => {
    report({
      bench, unit, value: median(u), baseline: 'the same store and records without headers', baselineValue: median(p), better,
      params: { records, rounds: ROUNDS, statistic: 'median', header: `${USER_HEADER}: user-<device key>`, userRounds: u.map((x) => round(x)), plainRounds: p.map((x) => round(x)), roundRatios: pairedRatios(u, p) },
    })
  }
  line('store.headers.append', 'records/s', 'higher', user.append, plain.append)
  line('store.headers.read', 'records/s', 'higher', user.read, plain.read)
  line('store.headers.encode', 'µs per 1000-record batch', 'lower', user.enc, plain.enc)
  line('store.headers.decode', 'µs per 1000-record batch', 'lower', user.dec, plain.dec)
  report({ bench: 'store.headers.bytes', unit: 'bytes per record', value: round(user.bytes, 1), baseline: 'without headers', baselineValue: round(plain.bytes, 1), better: 'lower', params: { batchBytesUser: user.batch, batchBytesPlain: plain.batch } })
}

async function main (): Promise<void> {
  const t0 = performance.now()
  try {
    if (wanted('append') || wanted('read')) {
      const { storeDir, rawDir } = await appendFigure(wanted('append'))
      if (wanted('read')) await readFigure(storeDir, rawDir)
    }
    if (wanted('latency')) await latencyFigure()
    if (wanted('open')) await openFigure()
    if (wanted('headers')) await headersFigure()
  } finally {
    await dirs.cleanup()
  }
  info(`store bench done in ${round2((performance.now() - t0) / 1000)} s`)
}

await main()
