/**
 * `npm run bench -- gateway`: edgemq's MQTT ingest against Mosquitto in the
 * same run. One JSON line per figure on stdout (see lib/report.ts); progress
 * on stderr.
 *
 * Both brokers are child processes on free loopback ports: edgemq as
 * `edgemq start` with the embedded default config (`durability: sync`: a
 * PUBACK only after the record is fsync'd), Mosquitto with a temporary
 * config (`persistence false`: its in-memory best case). A fresh broker (and
 * data directory) for every round; edgemq and Mosquitto rounds alternate,
 * the order flipping each round, so drift on the shared machine hits both.
 * The load comes from a separate process (lib/load-child.ts), a minimal
 * client on mqtt-packet that is much cheaper than MQTT.js.
 *
 * Scenarios (10 publishers `dev-0` … `dev-9`, topic
 * `devices/dev-<i>/telemetry/t`, 100-byte payloads, clean sessions, no
 * subscribers; edgemq's default route appends them to `default/telemetry`):
 * - qos1    QoS 1 ingest, 100 PUBLISHes unacknowledged per connection.
 *           Figures: throughput (PUBACKs/s), PUBACK latency p50 and p99.
 * - qos0    QoS 0 ingest, 100 in flight per connection: a PINGREQ after
 *           every 50 PUBLISHes, and its PINGRESP confirms them (a broker
 *           reads a connection's packets in order; see lib/mqtt/load.ts).
 *           For edgemq the `edgemq_ingest_messages_total` counter over the
 *           window is reported beside it as a check.
 * - device  device-like load: QoS 1, one PUBLISH in flight per connection
 *           (each device waits for its PUBACK). Throughput, p50, p99, and
 *           `gateway.device.fsync-ceiling`: edgemq against the best a gateway
 *           can do when every commit holds each waiting device's record,
 *           devices / (LevelDB sync batch + loopback round trip), their
 *           means probed on this disk before each round (lib/fsync-probe.ts).
 * - qos1-v5, device-v5  the same loads with MQTT 5 clients (against
 *           Mosquitto with MQTT 5 too). Each round also runs edgemq under the
 *           3.1.1 load, next to its MQTT 5 round (the order flipping), for
 *           one more figure: edgemq's MQTT 5 throughput against its MQTT
 *           3.1.1 throughput, paired by round (issue 14: at most 10 % lower).
 *
 * Arguments: scenario names (default all), `--quick` (1 round of 2 s),
 * `--rounds=N`, `--seconds=N` (measured window, default 5), `--warmup=N`
 * (seconds, default 1), `--window=N` (in flight per connection for qos1),
 * `--generators=N` (load processes, default 1), `--mosquitto=PATH`,
 * `--edgemq=PATH` (another checkout's gateway/edgemq.mjs, to try a change),
 * `--against=PATH` (another checkout's gateway/edgemq.mjs run in every round
 * too, beside this one, the order rotating: one more figure per scenario,
 * `gateway.<scenario>.against`, this edgemq against that one paired by round,
 * so a change is judged on the same machine state as its baseline),
 * `--durability=async` (edgemq without fsync: what its CPU alone allows, to
 * compare a change's CPU cost when a shared disk drowns the sync figures).
 * `--profile`: instead of the figures, run edgemq alone under the first
 * selected scenario's load (qos1 by default) with `node --cpu-prof` and
 * print where its main thread spends its time in the measured window
 * (`--profile-seconds=N`, default 10; the .cpuprofile is kept in a temp
 * directory, or in `--profile-dir=DIR`).
 * `--check-generator`: run the qos1 and device loads against a broker that
 * does nothing (lib/null-broker.ts), to see the generator's own ceiling.
 */
import { mkdtemp, readdir, writeFile } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { edgemqCounters, findMosquitto, mosquittoVersion, processCpuSeconds, startEdgemq, startListeningChild, startMosquitto, withBrokerIn, type EdgemqCounters, type RunningBroker } from './lib/brokers.ts'
import { formatProfileSummary, summarizeCpuProfile, type ProfileWindow } from './lib/cpu-profile.ts'
import { fsyncCeiling, probeFsync, type FsyncProbe, type ProbeTimes } from './lib/fsync-probe.ts'
import { LatencyHistogram } from './lib/latency-histogram.ts'
import { LoadGenerators, type MergedLoad } from './lib/load-process.ts'
import type { LoadSpec } from './lib/mqtt/load.ts'
import { TempDirs, info, median, report, round, type ParamValue } from './lib/report.ts'
import { argv, flag, intFlag } from './lib/flags.ts'

const QUICK = argv.includes('--quick')
const PROFILE = argv.includes('--profile')
const CHECK_GENERATOR = argv.includes('--check-generator')
const ROUNDS = intFlag('rounds', QUICK ? 1 : 3)
const SECONDS = intFlag('seconds', QUICK ? 2 : 5)
const WARMUP_SECONDS = intFlag('warmup', 1, { min: 0 })
const WINDOW = intFlag('window', 100)
const GENERATORS = intFlag('generators', 1)
const PROFILE_SECONDS = intFlag('profile-seconds', 10)
/** `--durability=async`: edgemq without fsync, to see what its CPU alone allows (not a figure to compare with the targets). */
const DURABILITY = flag('durability') ?? 'sync'
if (DURABILITY !== 'sync' && DURABILITY !== 'async') throw new Error(`--durability must be sync or async, got ${DURABILITY}`)
/** Another checkout's gateway/edgemq.mjs to measure instead of this one's. */
const EDGEMQ_BIN = flag('edgemq') === undefined ? undefined : path.resolve(flag('edgemq') as string)
/** Another checkout's gateway/edgemq.mjs to measure in every round beside this one (`gateway.<scenario>.against`). */
const AGAINST_BIN = flag('against') === undefined ? undefined : path.resolve(flag('against') as string)

const PUBLISHERS = 10
const PAYLOAD_BYTES = 100
const MOSQUITTO_CONFIG = 'listener on 127.0.0.1, allow_anonymous true, persistence false, everything else default'
/** edgemq's default `mqtt.maxInflightPerClient`: packets of one connection handed to aedes at a time. */
const EDGEMQ_MAX_INFLIGHT = 1000

interface Scenario {
  readonly name: 'qos1' | 'qos0' | 'device' | 'qos1-v5' | 'device-v5'
  readonly what: string
  readonly qos: 0 | 1
  /** MQTT protocol level of the load's connections (3.1.1 unless 5). */
  readonly protocolVersion?: 5
  readonly window: number
  /** Which figures: throughput always; PUBACK latency for QoS 1. */
  readonly latency: boolean
  readonly target: string
}

const SCENARIOS: readonly Scenario[] = [
  { name: 'qos1', what: `QoS 1 ingest, ${WINDOW} in flight per connection`, qos: 1, window: WINDOW, latency: true, target: '>= 0.5x Mosquitto (first milestone), 1.0x (goal)' },
  { name: 'qos0', what: `QoS 0 ingest, ${WINDOW} in flight per connection (a PINGREQ after every ${Math.max(1, Math.floor(WINDOW / 2))})`, qos: 0, window: WINDOW, latency: false, target: 'none set' },
  { name: 'device', what: 'device-like load: QoS 1, 1 in flight per connection', qos: 1, window: 1, latency: true, target: '>= 0.5x Mosquitto' },
  {
    name: 'qos1-v5', what: `MQTT 5 QoS 1 ingest, ${WINDOW} in flight per connection`, qos: 1, window: WINDOW, latency: true, protocolVersion: 5,
    target: 'edgemq MQTT 5 >= 0.9x edgemq MQTT 3.1.1 (gateway.qos1.mqtt5-cost)',
  },
  {
    name: 'device-v5', what: 'MQTT 5 device-like load: QoS 1, 1 in flight per connection', qos: 1, window: 1, latency: true, protocolVersion: 5,
    target: 'edgemq MQTT 5 >= 0.9x edgemq MQTT 3.1.1 (gateway.device.mqtt5-cost)',
  },
]
const selected = argv.filter((a) => !a.startsWith('--'))
for (const name of selected) {
  if (!SCENARIOS.some((s) => s.name === name)) throw new Error(`unknown scenario ${name}; expected one of ${SCENARIOS.map((s) => s.name).join(', ')}`)
}
const scenarios = SCENARIOS.filter((s) => selected.length === 0 || selected.includes(s.name))

const dirs = new TempDirs()

function specFor (scenario: Scenario, broker: { host: string, port: number }, measureSeconds = SECONDS): LoadSpec {
  return {
    host: broker.host, port: broker.port, publishers: Array.from({ length: PUBLISHERS }, (_v, i) => i),
    qos: scenario.qos, protocolVersion: scenario.protocolVersion ?? 4, window: scenario.window, payloadBytes: PAYLOAD_BYTES,
    warmupMs: WARMUP_SECONDS * 1000, measureMs: measureSeconds * 1000, drainTimeoutMs: 15_000,
  }
}

/** One round on one broker, with the broker's CPU and (edgemq) ingest counter sampled over the window. */
interface RoundResult {
  readonly load: MergedLoad
  /** Cores the broker process used in the window (all its threads). */
  readonly brokerCores: number | undefined
  /** edgemq only: `edgemq_ingest_messages_total` over the window, per second. */
  readonly counterRate: number | undefined
  /**
   * edgemq only: group commits in the window: how many records each held, and the mean time from a commit's oldest
   * append to durable (`edgemq_append_duration_seconds`). Not the write alone: a follower commit's clock starts when
   * the write before it started, so under steady load it spans about two writes.
   */
  readonly commitRecords: number | undefined
  readonly commitMs: number | undefined
  /** The window on the monotonic clock, in µs (to pick the window's samples out of a CPU profile). */
  readonly window: ProfileWindow
}

async function runRound (generators: LoadGenerators, scenario: Scenario, broker: RunningBroker, measureSeconds = SECONDS): Promise<RoundResult> {
  let cpu0: number | undefined
  let cpu1: number | undefined
  let t0 = 0
  let t1 = 0
  let count0: EdgemqCounters | undefined
  let count1: EdgemqCounters | undefined
  let fromUs = 0
  let toUs = 0
  const monotonicUs = (): number => Number(process.hrtime.bigint() / 1000n)
  const load = await generators.run(specFor(scenario, broker, measureSeconds), async (phase) => {
    if (phase === 'measure') {
      if (broker.httpUrl !== undefined) count0 = await edgemqCounters(broker.httpUrl)
      t0 = performance.now()
      fromUs = monotonicUs()
      cpu0 = processCpuSeconds(broker.pid)
    } else if (phase === 'drain') {
      t1 = performance.now()
      toUs = monotonicUs()
      cpu1 = processCpuSeconds(broker.pid)
      if (broker.httpUrl !== undefined) count1 = await edgemqCounters(broker.httpUrl)
    }
  })
  if (load.unacked > 0) throw new Error(`${broker.name}: ${load.unacked} PUBLISHes were never acknowledged`)
  const seconds = (t1 - t0) / 1000
  return {
    load,
    brokerCores: cpu0 === undefined || cpu1 === undefined ? undefined : (cpu1 - cpu0) / seconds,
    counterRate: count0 === undefined || count1 === undefined ? undefined : (count1.ingested - count0.ingested) / seconds,
    commitRecords: count0 === undefined || count1 === undefined ? undefined : (count1.committedRecords - count0.committedRecords) / (count1.commits - count0.commits),
    commitMs: count0 === undefined || count1 === undefined ? undefined : (1000 * (count1.commitSeconds - count0.commitSeconds)) / (count1.commits - count0.commits),
    window: { fromUs, toUs },
  }
}

async function withBroker<T> (name: 'edgemq' | 'mosquitto', mosquitto: string, fn: (broker: RunningBroker) => Promise<T>, bin = EDGEMQ_BIN): Promise<T> {
  return await withBrokerIn(dirs, name, async (dir) => name === 'edgemq'
    ? await startEdgemq(dir, [], bin, await durabilityArgs(dir))
    : await startMosquitto(mosquitto, dir), fn)
}

/** `edgemq start` arguments for --durability=async (a config file in the round's directory); none for the default. */
async function durabilityArgs (dir: string): Promise<string[]> {
  if (DURABILITY === 'sync') return []
  const file = path.join(dir, 'edgemq-async.json')
  await writeFile(file, JSON.stringify({ store: { durability: 'async' } }))
  return ['--config', file]
}

const ms = (us: number): number => round(us / 1000, 3)
const ms3 = (milliseconds: number): number => round(milliseconds, 3)
const r2 = (n: number | undefined): number | null => (n === undefined ? null : round(n, 2))

function pairedRatios (a: readonly number[], b: readonly number[]): number[] {
  return a.map((v, i) => round(v / (b[i] as number), 2))
}

async function scenarioFigures (generators: LoadGenerators, scenario: Scenario, mosquitto: string, version: string): Promise<void> {
  const results: Record<'edgemq' | 'mosquitto', RoundResult[]> = { edgemq: [], mosquitto: [] }
  /** MQTT 5 scenarios: edgemq under the same load over MQTT 3.1.1, one round beside each MQTT 5 round. */
  const v311Rounds: number[] = []
  const v311: Scenario = { ...scenario, protocolVersion: undefined }
  /** --against: the other checkout's edgemq under the same load, a round beside each of this one's. */
  const againstRounds: number[] = []
  /** One message in flight: the disk's commit time and a loopback round trip, probed before each round (fsync-probe.ts). */
  const probes: FsyncProbe[] = []
  for (let r = 0; r < ROUNDS; r++) {
    if (scenario.window === 1) {
      const probe = await probeFsync(await dirs.make('fsync-probe'))
      probes.push(probe)
      const times = (t: ProbeTimes): string => `mean ${ms3(t.meanMs)} p50 ${ms3(t.p50Ms)} p99 ${ms3(t.p99Ms)} ms`
      info(`${scenario.name} round ${r + 1}/${ROUNDS} probe: LevelDB sync batch ${times(probe.level)}, fdatasync ${times(probe.fdatasync)}, ` +
        `loopback PUBLISH/PUBACK ${times(probe.roundTrip)}: ceiling ${Math.round(fsyncCeiling(PUBLISHERS, probe))} msgs/s`)
    }
    const order: Array<'edgemq' | 'mosquitto' | 'edgemq-3.1.1' | 'against'> = r % 2 === 0 ? ['mosquitto', 'edgemq'] : ['edgemq', 'mosquitto']
    if (scenario.protocolVersion === 5) order.splice(r % 2 === 0 ? 1 : 0, 0, 'edgemq-3.1.1')
    // Rotates through before, between and after the others, so neither edgemq always follows the same broker.
    if (AGAINST_BIN !== undefined) order.splice(r % (order.length + 1), 0, 'against')
    for (const name of order) {
      if (name === 'against') {
        const result = await withBroker('edgemq', mosquitto, (broker) => runRound(generators, scenario, broker), AGAINST_BIN)
        againstRounds.push(result.load.rate)
        info(`${scenario.name} round ${r + 1}/${ROUNDS} edgemq of ${AGAINST_BIN}: ${Math.round(result.load.rate)} msgs/s` +
          (result.counterRate === undefined ? '' : `, commits of ${Math.round(result.commitRecords ?? NaN)} records, oldest append to durable ${r2(result.commitMs)} ms`) +
          `; broker ${r2(result.brokerCores)} cores`)
        continue
      }
      if (name === 'edgemq-3.1.1') {
        const result = await withBroker('edgemq', mosquitto, (broker) => runRound(generators, v311, broker))
        v311Rounds.push(result.load.rate)
        info(`${scenario.name} round ${r + 1}/${ROUNDS} edgemq over MQTT 3.1.1: ${Math.round(result.load.rate)} msgs/s`)
        continue
      }
      const result = await withBroker(name, mosquitto, (broker) => runRound(generators, scenario, broker))
      results[name].push(result)
      const l = result.load
      info(`${scenario.name} round ${r + 1}/${ROUNDS} ${name}: ${Math.round(l.rate)} msgs/s` +
        (scenario.latency ? `, PUBACK p50 ${ms(l.latency.percentileUs(50))} ms p99 ${ms(l.latency.percentileUs(99))} ms` : '') +
        (result.counterRate === undefined ? '' : `, ingest counter ${Math.round(result.counterRate)}/s, commits of ${Math.round(result.commitRecords ?? NaN)} records, oldest append to durable ${r2(result.commitMs)} ms`) +
        `; broker ${r2(result.brokerCores)} cores, generator ${r2(l.generatorCores)} cores (event loop ${Math.round(l.generatorElu * 100)} % busy)`)
    }
  }
  const rates = (name: 'edgemq' | 'mosquitto'): number[] => results[name].map((x) => x.load.rate)
  const common: Record<string, ParamValue> = {
    publishers: PUBLISHERS, payloadBytes: PAYLOAD_BYTES, qos: scenario.qos, mqttVersion: scenario.protocolVersion === 5 ? '5' : '3.1.1',
    inFlightPerConnection: scenario.window,
    edgemqMaxInflightPerClient: EDGEMQ_MAX_INFLIGHT, durability: DURABILITY, mosquitto: version, mosquittoConfig: MOSQUITTO_CONFIG,
    seconds: SECONDS, warmupSeconds: WARMUP_SECONDS, rounds: ROUNDS,
    edgemqCores: results.edgemq.map((x) => r2(x.brokerCores) ?? NaN), mosquittoCores: results.mosquitto.map((x) => r2(x.brokerCores) ?? NaN),
    edgemqCommitRecords: results.edgemq.map((x) => Math.round(x.commitRecords ?? NaN)),
    edgemqCommitMs: results.edgemq.map((x) => r2(x.commitMs) ?? NaN),
    generatorProcesses: GENERATORS,
    generatorCores: [...results.edgemq, ...results.mosquitto].map((x) => round(x.load.generatorCores, 2)),
    generatorEventLoopBusyMax: round(Math.max(...[...results.edgemq, ...results.mosquitto].map((x) => x.load.generatorElu)), 2),
  }
  const baselineWhat = `Mosquitto ${version}, persistence false, same load`
  report({
    bench: `gateway.${scenario.name}.throughput`,
    unit: 'msgs/s',
    value: median(rates('edgemq')),
    baseline: baselineWhat,
    baselineValue: median(rates('mosquitto')),
    better: 'higher',
    params: {
      scenario: scenario.what, ...common, statistic: 'median of rounds', target: scenario.target,
      counted: scenario.qos === 1 ? 'PUBACKs received in the window' : 'PUBLISHes confirmed in the window by the PINGRESP that followed them',
      edgemqRounds: rates('edgemq').map(Math.round), mosquittoRounds: rates('mosquitto').map(Math.round),
      roundRatios: pairedRatios(rates('edgemq'), rates('mosquitto')),
      edgemqIngestCounterRounds: results.edgemq.map((x) => Math.round(x.counterRate ?? NaN)),
    },
  })
  if (probes.length > 0) {
    const ceilings = probes.map((p) => fsyncCeiling(PUBLISHERS, p))
    const of = (pick: (p: FsyncProbe) => number): number[] => probes.map((p) => ms3(pick(p)))
    report({
      bench: `gateway.${scenario.name}.fsync-ceiling`,
      unit: 'msgs/s',
      value: median(rates('edgemq')),
      baseline: `the fsync-bound ceiling: ${PUBLISHERS} devices / (mean LevelDB sync batch + mean loopback PUBLISH/PUBACK), probed before each round`,
      baselineValue: median(ceilings),
      better: 'higher',
      params: {
        scenario: scenario.what, statistic: 'median of rounds', rounds: ROUNDS, seconds: SECONDS, devices: PUBLISHERS,
        ratioToMosquitto: round(median(rates('edgemq')) / median(rates('mosquitto')), 3),
        ceilingToMosquitto: round(median(ceilings) / median(rates('mosquitto')), 3),
        ceilingRounds: ceilings.map(Math.round), roundRatios: pairedRatios(rates('edgemq'), ceilings),
        levelSyncBatchMeanMs: of((p) => p.level.meanMs), levelSyncBatchP50Ms: of((p) => p.level.p50Ms), levelSyncBatchP99Ms: of((p) => p.level.p99Ms),
        fdatasyncMeanMs: of((p) => p.fdatasync.meanMs), fdatasyncP50Ms: of((p) => p.fdatasync.p50Ms), fdatasyncP99Ms: of((p) => p.fdatasync.p99Ms),
        roundTripMeanMs: of((p) => p.roundTrip.meanMs), roundTripP50Ms: of((p) => p.roundTrip.p50Ms), roundTripP99Ms: of((p) => p.roundTrip.p99Ms),
        fdatasyncCeilingRounds: probes.map((p) => Math.round(fsyncCeiling(PUBLISHERS, p, (x) => x.fdatasync))),
        edgemqCommitMsRounds: results.edgemq.map((x) => r2(x.commitMs) ?? NaN),
        probe: 'sequential loops of at most 1000 runs or 1.5 s each after 20 unmeasured: a classic-level batch of one 100-byte put with sync: true; ' +
          'a 100-byte append + FileHandle.datasync(); a QoS 1 PUBLISH to a broker answering at once in a child process (lib/null-broker.ts)',
      },
    })
  }
  if (AGAINST_BIN !== undefined) {
    report({
      bench: `gateway.${scenario.name}.against`,
      unit: 'msgs/s',
      value: median(rates('edgemq')),
      baseline: `edgemq of ${AGAINST_BIN} under the same load, a round beside each of this one's`,
      baselineValue: median(againstRounds),
      better: 'higher',
      params: {
        scenario: scenario.what, statistic: 'median of rounds', rounds: ROUNDS, seconds: SECONDS, durability: DURABILITY,
        edgemqRounds: rates('edgemq').map(Math.round), againstRounds: againstRounds.map(Math.round), roundRatios: pairedRatios(rates('edgemq'), againstRounds),
        againstToMosquitto: round(median(againstRounds) / median(rates('mosquitto')), 3),
      },
    })
  }
  if (scenario.protocolVersion === 5) {
    report({
      bench: `gateway.${scenario.name}.mqtt5-cost`,
      unit: 'msgs/s',
      value: median(rates('edgemq')),
      baseline: 'edgemq under the same load with MQTT 3.1.1 clients, a round beside each MQTT 5 round',
      baselineValue: median(v311Rounds),
      better: 'higher',
      params: {
        scenario: scenario.what, statistic: 'median of rounds', target: '>= 0.9 (issue 14)', rounds: ROUNDS, seconds: SECONDS,
        mqtt5Rounds: rates('edgemq').map(Math.round), mqtt311Rounds: v311Rounds.map(Math.round), roundRatios: pairedRatios(rates('edgemq'), v311Rounds),
      },
    })
  }
  if (!scenario.latency) return
  const merged = (name: 'edgemq' | 'mosquitto'): LatencyHistogram => {
    const h = new LatencyHistogram()
    for (const x of results[name]) h.add(x.load.latency)
    return h
  }
  const e = merged('edgemq')
  const m = merged('mosquitto')
  for (const p of [50, 99]) {
    report({
      bench: `gateway.${scenario.name}.puback.p${p}`,
      unit: 'ms',
      value: ms(e.percentileUs(p)),
      baseline: baselineWhat,
      baselineValue: ms(m.percentileUs(p)),
      better: 'lower',
      params: {
        scenario: scenario.what, ...common, statistic: `p${p} of every PUBACK in the windows of all rounds (PUBLISH write to PUBACK read)`,
        samples: e.total, baselineSamples: m.total, edgemqMaxMs: ms(e.maxUs), mosquittoMaxMs: ms(m.maxUs),
        edgemqRoundMs: results.edgemq.map((x) => ms(x.load.latency.percentileUs(p))),
        mosquittoRoundMs: results.mosquitto.map((x) => ms(x.load.latency.percentileUs(p))),
      },
    })
  }
}

async function profileEdgemq (generators: LoadGenerators): Promise<void> {
  // Not one of `dirs`: the profile outlives the bench.
  const profileDir = flag('profile-dir') ?? await mkdtemp(path.join(os.tmpdir(), 'edgemq-bench-profile-'))
  const scenario = scenarios[0] as Scenario
  const dataDir = await dirs.make('edgemq-profiled')
  const broker = await startEdgemq(dataDir, ['--cpu-prof', '--cpu-prof-dir', profileDir], EDGEMQ_BIN, await durabilityArgs(dataDir))
  let result: RoundResult
  try {
    result = await runRound(generators, scenario, broker, PROFILE_SECONDS)
  } finally {
    const code = await broker.stop(60_000)
    if (code !== 0) info(`profiled edgemq exited with code ${code}:\n${broker.stderr().slice(-4000)}`)
  }
  info(`profiled run (${scenario.name}, ${PROFILE_SECONDS} s): ${Math.round(result.load.rate)} msgs/s, broker ${r2(result.brokerCores)} cores, ` +
    `generator ${r2(result.load.generatorCores)} cores; commits of ${Math.round(result.commitRecords ?? NaN)} records, oldest append to durable ${r2(result.commitMs)} ms`)
  // One file per thread, CPU.<date>.<time>.<pid>.<thread>.<seq>.cpuprofile; thread 0 is the main thread (tsx's
  // loader runs in a worker that writes its own).
  const files = (await readdir(profileDir)).filter((f) => f.endsWith('.cpuprofile')).sort()
  const main = files.find((f) => f.includes(`.${broker.pid}.0.`)) ?? files[0]
  if (main === undefined) throw new Error(`no .cpuprofile in ${profileDir}`)
  const file = path.join(profileDir, main)
  process.stderr.write(`${formatProfileSummary(await summarizeCpuProfile(file, result.window))}\n`)
  info(`profile kept at ${file} (open it in Chrome DevTools > Performance, or speedscope)`)
}

async function checkGenerator (generators: LoadGenerators): Promise<void> {
  const nullBroker = await startListeningChild(fileURLToPath(new URL('./lib/null-broker.ts', import.meta.url)), ['0'], 'null broker')
  const { port } = nullBroker
  try {
    for (const scenario of scenarios.filter((s) => s.qos === 1)) {
      const cpu0 = processCpuSeconds(nullBroker.pid)
      const t0 = performance.now()
      const load = await generators.run(specFor(scenario, { host: '127.0.0.1', port }), () => {})
      const cpu = (processCpuSeconds(nullBroker.pid) ?? NaN) - (cpu0 ?? NaN)
      info(`generator check, ${scenario.name} against the null broker: ${Math.round(load.rate)} msgs/s, PUBACK p50 ${ms(load.latency.percentileUs(50))} ms ` +
        `p99 ${ms(load.latency.percentileUs(99))} ms; generator ${r2(load.generatorCores)} cores (event loop ${Math.round(load.generatorElu * 100)} % busy), ` +
        `null broker ~${r2(cpu / ((performance.now() - t0) / 1000))} cores incl. warm-up`)
    }
  } finally {
    await nullBroker.stop()
  }
}

async function main (): Promise<number> {
  const mosquitto = findMosquitto(flag('mosquitto'))
  if (mosquitto === null && !PROFILE && !CHECK_GENERATOR) {
    const where = flag('mosquitto') === undefined ? 'looked on PATH, in /usr/sbin and /usr/local/sbin' : `no executable at ${flag('mosquitto')}`
    process.stderr.write(`[bench] gateway: mosquitto not found (${where}). It is the baseline of every figure of this bench. ` +
      'Install it (`apt-get install mosquitto`) or pass --mosquitto=/path/to/mosquitto.\n')
    return 1
  }
  const t0 = performance.now()
  const generators = new LoadGenerators(GENERATORS)
  try {
    if (PROFILE) {
      await profileEdgemq(generators)
    } else if (CHECK_GENERATOR) {
      await checkGenerator(generators)
    } else {
      const version = mosquittoVersion(mosquitto as string)
      info(`gateway bench: edgemq vs mosquitto ${version} (${mosquitto}), node ${process.version}, ${os.cpus().length} cpus; ` +
        `${ROUNDS} rounds of ${WARMUP_SECONDS} s warm-up + ${SECONDS} s per broker and scenario`)
      for (const scenario of scenarios) await scenarioFigures(generators, scenario, mosquitto as string, version)
    }
  } finally {
    await generators.close()
    await dirs.cleanup()
  }
  info(`gateway bench done in ${round((performance.now() - t0) / 1000, 1)} s`)
  return 0
}

process.exitCode = await main()
