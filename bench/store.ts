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
 *
 * Arguments: figure names to run (`append latency read open`, default all),
 * `--quick` (a tenth of every size, for trying the bench out), `--window=N`.
 */
import { ClassicLevel } from 'classic-level'
import { Encoder } from 'cbor-x'
import { randomBytes } from 'node:crypto'
import { openLogStore, partitionForKey, type CommitStats, type Durability, type LogStore, type RecordInput } from '../store/index.ts'
import { TempDirs, info, median, percentile, report, round } from './lib/report.ts'

const argv = process.argv.slice(2)
const QUICK = argv.includes('--quick')
const WINDOW = Number(argv.find((a) => a.startsWith('--window='))?.slice('--window='.length) ?? 100)
if (!Number.isSafeInteger(WINDOW) || WINDOW < 1) throw new Error('--window must be a positive integer')
const FIGURES = ['append', 'latency', 'read', 'open'] as const
type FigureName = typeof FIGURES[number]
const selected = argv.filter((a) => !a.startsWith('--'))
for (const name of selected) {
  if (!(FIGURES as readonly string[]).includes(name)) throw new Error(`unknown figure ${name}; expected one of ${FIGURES.join(', ')}`)
}
const wanted = (name: FigureName): boolean => selected.length === 0 || selected.includes(name)
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

/**
 * The raw side stores the same records (same keys, topics, client ids,
 * 100-byte payloads) as the plainest LevelDB log would: one cbor array of
 * `[timestamp, key, topic, payload, qos, clientId, headers]` rows per value,
 * RAW_RECORDS_PER_VALUE rows each (the layout behind DESIGN.md's measured
 * facts). It deliberately does not reuse the store's batch encoder, so the
 * baseline stays fixed while the store's format changes; each figure reports
 * both sides' bytes per record.
 */
const RAW_RECORDS_PER_VALUE = 1000
const cbor = new Encoder({ useRecords: false, structuredClone: false, mapsAsObjects: true, variableMapSize: true })

interface Device {
  readonly key: string
  readonly partition: number
  readonly record: RecordInput
  readonly topic: string
  readonly payload: Buffer
}

function makeDevices (): Device[] {
  const devices: Device[] = []
  for (let i = 0; i < APPENDERS; i++) {
    const key = `dev-${String(i).padStart(3, '0')}`
    const topic = `devices/${key}/telemetry`
    const payload = randomBytes(PAYLOAD_BYTES)
    const record: RecordInput = { payload, topic, qos: 1, clientId: key }
    devices.push({ key, partition: partitionForKey(key, PARTITIONS), record, topic, payload })
  }
  return devices
}

const devices = makeDevices()
const dirs = new TempDirs()

// ---------------------------------------------------------------- raw helpers

type RawDb = ClassicLevel<Buffer, Buffer>

async function openRaw (location: string): Promise<RawDb> {
  const db = new ClassicLevel<Buffer, Buffer>(location, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await db.open()
  return db
}

function rawRow (d: Device): unknown[] {
  return [Date.now(), d.key, d.topic, d.payload, 1, d.key, null]
}

/** `count` distinct values of RAW_RECORDS_PER_VALUE rows each, encoded before any timing starts. */
function preEncodedValues (count: number): Buffer[] {
  const values: Buffer[] = []
  for (let v = 0; v < count; v++) {
    const rows: unknown[] = []
    for (let i = 0; i < RAW_RECORDS_PER_VALUE; i++) rows.push(rawRow(devices[(v * 7 + i) % APPENDERS] as Device))
    values.push(cbor.encode(rows))
  }
  return values
}

/** Same shape as the store's batch keys: tag, stream id, partition, base offset. */
function rawKey (partition: number, base: number): Buffer {
  const key = Buffer.allocUnsafe(17)
  key[0] = 0x42
  key.writeUInt32BE(1, 1)
  key.writeUInt32BE(partition, 5)
  key.writeUInt32BE(Math.floor(base / 2 ** 32), 9)
  key.writeUInt32BE(base % 2 ** 32, 13)
  return key
}

/** Writes `records` as 8-value sync batches; returns records/s. */
async function rawAppend (db: RawDb, records: number, values: readonly Buffer[], sync = true): Promise<number> {
  const perWrite = PARTITIONS * RAW_RECORDS_PER_VALUE
  const writes = Math.ceil(records / perWrite)
  const t0 = performance.now()
  for (let w = 0; w < writes; w++) {
    const ops: Array<{ type: 'put', key: Buffer, value: Buffer }> = new Array(PARTITIONS)
    for (let p = 0; p < PARTITIONS; p++) {
      ops[p] = { type: 'put', key: rawKey(p, w * RAW_RECORDS_PER_VALUE), value: values[(w * PARTITIONS + p) % values.length] as Buffer }
    }
    await db.batch(ops, { sync })
  }
  return (writes * perWrite) / ((performance.now() - t0) / 1000)
}

/** Iterates the whole raw db and cbor-decodes every value; returns records/s. */
async function rawRead (db: RawDb, expected: number): Promise<number> {
  const t0 = performance.now()
  let records = 0
  let bytes = 0
  const iterator = db.iterator()
  try {
    for (;;) {
      const entries = await iterator.nextv(8)
      if (entries.length === 0) break
      for (const [, value] of entries) {
        const rows = cbor.decode(value) as unknown[][]
        for (const row of rows) bytes += (row[3] as Uint8Array).byteLength
        records += rows.length
      }
    }
  } finally {
    await iterator.close()
  }
  const seconds = (performance.now() - t0) / 1000
  check(records === expected && bytes === expected * PAYLOAD_BYTES, `raw read saw ${records} records, expected ${expected}`)
  return records / seconds
}

// ---------------------------------------------------------------- store helpers

interface CommitTally { commits: number, records: number }

async function openStore (location: string, tally?: CommitTally, durability: Durability = 'sync'): Promise<LogStore> {
  const onCommit = tally === undefined ? undefined : (s: CommitStats): void => { tally.commits++; tally.records += s.records }
  return openLogStore({ location, durability, observer: { onCommit } })
}

/** One appender: keeps `window` appends in flight until it has appended `count`. */
function appender (store: LogStore, device: Device, count: number, window: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let issued = 0
    let done = 0
    const next = (): void => {
      issued++
      store.append(STREAM, device.key, device.record).then(onDone, reject)
    }
    const onDone = (): void => {
      if (++done === count) resolve()
      else if (issued < count) next()
    }
    if (count === 0) resolve()
    for (let k = 0; k < window && k < count; k++) next()
  })
}

/** Appends `records` spread over the appenders; returns records/s. */
async function storeAppend (store: LogStore, records: number, window: number): Promise<number> {
  const perAppender = Math.ceil(records / APPENDERS)
  const t0 = performance.now()
  await Promise.all(devices.map((d) => appender(store, d, perAppender, window)))
  return (perAppender * APPENDERS) / ((performance.now() - t0) / 1000)
}

/** Reads every partition from its start to its end with default read options; returns records/s. */
async function storeRead (store: LogStore, expected: number): Promise<number> {
  const t0 = performance.now()
  let records = 0
  let bytes = 0
  for (let p = 0; p < PARTITIONS; p++) {
    const info = store.partitionInfo(STREAM, p)
    let offset = info.logStartOffset
    while (offset < info.logEndOffset) {
      const result = await store.read(STREAM, p, offset)
      for (const r of result.records) bytes += r.payload.byteLength
      records += result.records.length
      offset = result.nextOffset
    }
  }
  const seconds = (performance.now() - t0) / 1000
  check(records === expected && bytes === expected * PAYLOAD_BYTES, `store read saw ${records} records, expected ${expected}`)
  return records / seconds
}

function storeRecordCount (store: LogStore): number {
  let n = 0
  for (let p = 0; p < PARTITIONS; p++) n += store.partitionInfo(STREAM, p).logEndOffset
  return n
}

function check (ok: boolean, message: string): void {
  if (!ok) throw new Error(`bench check failed: ${message}`)
}

// ---------------------------------------------------------------- figures

/**
 * Append rounds (raw, store, interleaved); leaves the last round's dbs for
 * the read figure. With `print` false (read figure alone) one round only fills them.
 */
async function appendFigure (print: boolean): Promise<{ storeDir: string, rawDir: string }> {
  const rounds = print ? ROUNDS : 1
  const values = preEncodedValues(16)
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
    raw.push(await rawAppend(db, APPEND_RECORDS, values))
    await db.close()

    tally.commits = 0
    tally.records = 0
    const store = await openStore(storeDir, tally)
    await store.createStream(STREAM, { partitions: PARTITIONS })
    stored.push(await storeAppend(store, APPEND_RECORDS, WINDOW))
    check(storeRecordCount(store) === APPEND_RECORDS, `store holds ${storeRecordCount(store)} records after the append round`)
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
      raw.push(await rawRead(db, APPEND_RECORDS))
      stored.push(await storeRead(store, APPEND_RECORDS))
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
    this.#rows = devices.map((d) => cbor.encode(rawRow(d)))
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
  const rawRate = await rawAppend(db, OPEN_RECORDS, preEncodedValues(64), FILL_DURABILITY === 'sync')
  await db.close()
  info(`open: wrote ${OPEN_RECORDS} raw records in ${round2((performance.now() - t0) / 1000)} s (${Math.round(rawRate)} rec/s)`)

  t0 = performance.now()
  const tally: CommitTally = { commits: 0, records: 0 }
  const filling = await openStore(storeDir, tally, FILL_DURABILITY)
  await filling.createStream(STREAM, { partitions: PARTITIONS })
  const fillRate = await storeAppend(filling, OPEN_RECORDS, OPEN_FILL_WINDOW)
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
    const held = storeRecordCount(store)
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

async function main (): Promise<void> {
  const t0 = performance.now()
  try {
    if (wanted('append') || wanted('read')) {
      const { storeDir, rawDir } = await appendFigure(wanted('append'))
      if (wanted('read')) await readFigure(storeDir, rawDir)
    }
    if (wanted('latency')) await latencyFigure()
    if (wanted('open')) await openFigure()
  } finally {
    await dirs.cleanup()
  }
  info(`store bench done in ${round2((performance.now() - t0) / 1000)} s`)
}

await main()
