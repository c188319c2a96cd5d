/**
 * `npm run bench -- fan-in`: many devices to one live subscriber (issues 13
 * and 14). Ten QoS 1 publishers `dev-0` … `dev-9` send 100-byte payloads to
 * their routed device topics `devices/dev-<i>/telemetry/t` (the same load as
 * the gateway bench's qos1 scenario: 100 PUBLISHes unacknowledged per
 * connection, from a separate process, lib/load-child.ts), while ONE
 * subscriber holds a QoS 1 subscription to `#` and acknowledges what it gets
 * (lib/mqtt/counter.ts: plain socket, one PUBACK write per read, in this
 * process). The figure is the messages the subscriber received per second
 * in the measured window, edgemq (`edgemq start`, embedded default config,
 * `durability: sync`) against Mosquitto in the same run. One JSON line per
 * figure on stdout (lib/report.ts), progress on stderr. Beside the rate,
 * `fan-in.<variant>.cpu-per-message`: the broker process's CPU (all its
 * threads) in the window per delivered message, in µs, against Mosquitto's;
 * on a machine shared with other work it moves less than the rate does.
 *
 * Variants:
 * - clean       MQTT 3.1.1 publishers and a clean-session subscriber.
 * - clean-v5    the same with MQTT 5 publishers and subscriber (Mosquitto
 *               speaks MQTT 5 to them too). Each round also runs edgemq with
 *               the 3.1.1 clients beside its MQTT 5 round (the order
 *               flipping), for edgemq's MQTT 5 cost: `fan-in.clean-v5.mqtt5-cost`
 *               (issue 14: at most 10 % lower).
 * - persistent  MQTT 3.1.1, the subscriber with clean session = false
 *               (connected all along: live delivery to a persistent session).
 *
 * Mosquitto runs with `persistence false` (its in-memory best case),
 * `max_queued_messages 0` and `max_inflight_messages 1000` (as the bridge
 * bench's upstream); edgemq with the same window for a persistent session,
 * `mqtt.sessionInflight: 1000` (a config file holding only that key; its
 * default since 2026-12-03, 100 before). With 100 against Mosquitto's 1000 the persistent variant
 * measured the window, not the delivery: edgemq's main thread is busy with
 * ingest, a PUBACK waits its turn, and 100 messages per round trip delivered
 * 31-46 k msgs/s while 42-57 k were acknowledged (2026-12-02, load 5; the
 * session's delivery loop stopped on a full window in 1,017 of its 1,023
 * runs); with 1000, 28-41 k of 28-41 k (load 7-9; it stopped having caught
 * up with the log in 177 of 189). On a machine so loaded that edgemq gets
 * half a core both deliver what is acknowledged.
 * `--session-inflight=N` measures another window (100: the old default). With its defaults (20 in flight to a subscriber, 1,000
 * queued) it dropped 90 % of the messages for the connected subscriber under
 * this load (7 k delivered of 71 k acknowledged per second), which edgemq
 * never does: a rate of delivered messages compares only when neither drops.
 * After each round the bench waits until the subscriber has every message
 * the publishers wrote; the count missing when nothing more came for 5 s is
 * reported (`missing`), and should be 0.
 *
 * A fresh broker (and data directory) per round; edgemq and Mosquitto take
 * turns, the order flipping each round. Arguments: variant names (default
 * all), `--quick` (1 round of 2 s), `--rounds=N` (default 2), `--seconds=N`
 * (measured window, default 3), `--warmup=N` (default 1), `--mosquitto=PATH`,
 * `--edgemq=PATH` (another checkout's gateway/edgemq.mjs), `--compare=PATH`
 * (another checkout measured in the same rounds as well, beside this one:
 * `fan-in.<variant>.compare`, this checkout's rate against that one's, for a
 * before/after on a loaded machine).
 * `--session-inflight=N` (edgemq's `mqtt.sessionInflight`, default 1000).
 * `--profile`: instead of the figures, run edgemq alone under the first
 * selected variant with `node --cpu-prof` and print where its main thread
 * spends the measured window (`--profile-seconds=N`, default 10;
 * `--profile-dir=DIR` keeps the .cpuprofile there).
 */
import { mkdtemp, readdir } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { findMosquitto, mosquittoVersion, processCpuSeconds, sessionWindowArgs, startEdgemq, startMosquitto, withBrokerIn, type RunningBroker } from './lib/brokers.ts'
import { formatProfileSummary, summarizeCpuProfile, type ProfileWindow } from './lib/cpu-profile.ts'
import { argv, flag, intFlag } from './lib/flags.ts'
import { LoadGenerators, type MergedLoad } from './lib/load-process.ts'
import { CountingSubscriber } from './lib/mqtt/counter.ts'
import type { LoadSpec } from './lib/mqtt/load.ts'
import { TempDirs, info, median, report, round, type ParamValue } from './lib/report.ts'

const QUICK = argv.includes('--quick')
const PROFILE = argv.includes('--profile')
const ROUNDS = intFlag('rounds', QUICK ? 1 : 2)
const SECONDS = intFlag('seconds', QUICK ? 2 : 3)
const WARMUP_SECONDS = intFlag('warmup', 1, { min: 0 })
const PROFILE_SECONDS = intFlag('profile-seconds', 10)
const EDGEMQ_BIN = flag('edgemq') === undefined ? undefined : path.resolve(flag('edgemq') as string)
const COMPARE_BIN = flag('compare') === undefined ? undefined : path.resolve(flag('compare') as string)

const PUBLISHERS = 10
const PAYLOAD_BYTES = 100
const WINDOW = 100
/** How long the subscriber may get nothing after the load before the rest counts as missing. */
const STALL_MS = 5000
/** Mosquitto's subscriber queue: unbounded (as edgemq's), and up to SUBSCRIBER_INFLIGHT QoS 1 messages in flight to it. */
const SUBSCRIBER_INFLIGHT = 1000
const MOSQUITTO_EXTRA = ['max_queued_messages 0', `max_inflight_messages ${SUBSCRIBER_INFLIGHT}`]
const MOSQUITTO_CONFIG = `listener on 127.0.0.1, allow_anonymous true, persistence false, ${MOSQUITTO_EXTRA.join(', ')}, everything else default`
/** edgemq's window for a persistent session: Mosquitto's (see the header). */
const SESSION_INFLIGHT = intFlag('session-inflight', SUBSCRIBER_INFLIGHT, { min: 1 })
const EDGEMQ_CONFIG = `embedded default, mqtt.sessionInflight ${SESSION_INFLIGHT}`

interface Variant {
  readonly name: 'clean' | 'clean-v5' | 'persistent'
  readonly what: string
  readonly protocolVersion: 4 | 5
  readonly clean: boolean
  readonly target: string
}

const VARIANTS: readonly Variant[] = [
  { name: 'clean', what: 'MQTT 3.1.1, clean-session subscriber', protocolVersion: 4, clean: true, target: '>= 0.8x Mosquitto (issue 13)' },
  { name: 'clean-v5', what: 'MQTT 5 publishers and clean-start subscriber', protocolVersion: 5, clean: true, target: '>= 0.8x Mosquitto; MQTT 5 >= 0.9x MQTT 3.1.1 on edgemq' },
  { name: 'persistent', what: 'MQTT 3.1.1, persistent (clean session = false) subscriber, connected throughout', protocolVersion: 4, clean: false, target: '>= 0.8x Mosquitto' },
]
const selected = argv.filter((a) => !a.startsWith('--'))
for (const name of selected) {
  if (!VARIANTS.some((v) => v.name === name)) throw new Error(`unknown variant ${name}; expected one of ${VARIANTS.map((v) => v.name).join(', ')}`)
}
const variants = VARIANTS.filter((v) => selected.length === 0 || selected.includes(v.name))

const dirs = new TempDirs()
const monotonicUs = (): number => Number(process.hrtime.bigint() / 1000n)
const r2 = (n: number | undefined): number | null => (n === undefined ? null : round(n, 2))

function specFor (variant: Variant, broker: RunningBroker, measureSeconds: number): LoadSpec {
  return {
    host: broker.host, port: broker.port, publishers: Array.from({ length: PUBLISHERS }, (_v, i) => i),
    qos: 1, protocolVersion: variant.protocolVersion, window: WINDOW, payloadBytes: PAYLOAD_BYTES,
    warmupMs: WARMUP_SECONDS * 1000, measureMs: measureSeconds * 1000, drainTimeoutMs: 15_000,
  }
}

interface FanInRound {
  /** Messages the subscriber received per second in the window. */
  readonly delivered: number
  /** PUBACKs the publishers received per second in the window. */
  readonly ingest: MergedLoad
  /** Messages the publishers wrote (whole run) that never reached the subscriber. */
  readonly missing: number
  readonly brokerCores: number | undefined
  /** CPU of this process (the subscriber and the bench's bookkeeping) in the window, in cores. */
  readonly subscriberCores: number
  readonly window: ProfileWindow
}

async function runRound (generators: LoadGenerators, variant: Variant, broker: RunningBroker, measureSeconds = SECONDS): Promise<FanInRound> {
  const sub = await CountingSubscriber.subscribe({
    host: broker.host, port: broker.port, clientId: 'fan-in-subscriber', filter: '#', qos: 1, protocolVersion: variant.protocolVersion, clean: variant.clean,
  })
  try {
    let received0 = 0
    let received1 = 0
    let t0 = 0
    let t1 = 0
    let cpu0: number | undefined
    let cpu1: number | undefined
    let self0: NodeJS.CpuUsage | undefined
    let self: NodeJS.CpuUsage | undefined
    let fromUs = 0
    let toUs = 0
    const load = await generators.run(specFor(variant, broker, measureSeconds), (phase) => {
      if (phase === 'measure') {
        received0 = sub.received
        t0 = performance.now()
        fromUs = monotonicUs()
        cpu0 = processCpuSeconds(broker.pid)
        self0 = process.cpuUsage()
      } else if (phase === 'drain') {
        received1 = sub.received
        t1 = performance.now()
        toUs = monotonicUs()
        cpu1 = processCpuSeconds(broker.pid)
        self = process.cpuUsage(self0)
      }
    })
    if (load.unacked > 0) throw new Error(`${broker.name}: ${load.unacked} PUBLISHes were never acknowledged`)
    const written = load.perChild.reduce((n, r) => n + r.writtenTotal, 0)
    let missing = 0
    try {
      await sub.waitFor(written, STALL_MS)
    } catch (err) {
      missing = written - sub.received
      info(`${broker.name}: ${(err as Error).message}`)
    }
    const seconds = (t1 - t0) / 1000
    return {
      delivered: (received1 - received0) / seconds,
      ingest: load,
      missing,
      brokerCores: cpu0 === undefined || cpu1 === undefined ? undefined : (cpu1 - cpu0) / seconds,
      subscriberCores: self === undefined ? NaN : (self.user + self.system) / 1e6 / seconds,
      window: { fromUs, toUs },
    }
  } finally {
    await sub.close()
  }
}

async function withBroker<T> (name: 'edgemq' | 'mosquitto', mosquitto: string, fn: (broker: RunningBroker) => Promise<T>, bin = EDGEMQ_BIN): Promise<T> {
  return await withBrokerIn(dirs, name, async (dir) => name === 'edgemq'
    ? await startEdgemq(dir, [], bin, await sessionWindowArgs(dirs, SESSION_INFLIGHT))
    : await startMosquitto(mosquitto, dir, MOSQUITTO_EXTRA), fn)
}

/** Broker CPU per delivered message in the window, in µs. */
function cpuPerMessage (result: FanInRound): number | undefined {
  return result.brokerCores === undefined || result.delivered === 0 ? undefined : (result.brokerCores * 1e6) / result.delivered
}

function pairedRatios (a: readonly number[], b: readonly number[]): number[] {
  return a.map((v, i) => round(v / (b[i] as number), 2))
}

async function variantFigures (generators: LoadGenerators, variant: Variant, mosquitto: string, version: string): Promise<void> {
  const results: Record<'edgemq' | 'mosquitto', FanInRound[]> = { edgemq: [], mosquitto: [] }
  const v311Rounds: number[] = []
  const compareRounds: number[] = []
  const compareCpu: Array<number | undefined> = []
  const v311: Variant = { ...variant, protocolVersion: 4 }
  for (let r = 0; r < ROUNDS; r++) {
    const order: Array<'edgemq' | 'mosquitto' | 'edgemq-3.1.1' | 'compare'> = r % 2 === 0 ? ['mosquitto', 'edgemq'] : ['edgemq', 'mosquitto']
    if (variant.protocolVersion === 5) order.splice(r % 2 === 0 ? 1 : 0, 0, 'edgemq-3.1.1')
    if (COMPARE_BIN !== undefined) order.splice(order.indexOf('edgemq') + (r % 2 === 0 ? 0 : 1), 0, 'compare')
    for (const name of order) {
      if (name === 'compare') {
        const result = await withBroker('edgemq', mosquitto, (broker) => runRound(generators, variant, broker), COMPARE_BIN)
        compareRounds.push(result.delivered)
        compareCpu.push(cpuPerMessage(result))
        info(`${variant.name} round ${r + 1}/${ROUNDS} edgemq of ${COMPARE_BIN}: ${Math.round(result.delivered)} msgs/s delivered, ` +
          `${Math.round(result.ingest.rate)} PUBACKs/s, ${result.missing} missing; broker ${r2(result.brokerCores)} cores`)
        continue
      }
      if (name === 'edgemq-3.1.1') {
        const result = await withBroker('edgemq', mosquitto, (broker) => runRound(generators, v311, broker))
        v311Rounds.push(result.delivered)
        info(`${variant.name} round ${r + 1}/${ROUNDS} edgemq over MQTT 3.1.1: ${Math.round(result.delivered)} msgs/s delivered`)
        continue
      }
      const result = await withBroker(name, mosquitto, (broker) => runRound(generators, variant, broker))
      results[name].push(result)
      info(`${variant.name} round ${r + 1}/${ROUNDS} ${name}: ${Math.round(result.delivered)} msgs/s delivered, ` +
        `${Math.round(result.ingest.rate)} PUBACKs/s, ${result.missing} missing; broker ${r2(result.brokerCores)} cores, ` +
        `subscriber ${r2(result.subscriberCores)} cores, generator ${r2(result.ingest.generatorCores)} cores`)
    }
  }
  const delivered = (name: 'edgemq' | 'mosquitto'): number[] => results[name].map((x) => x.delivered)
  const common: Record<string, ParamValue> = {
    scenario: variant.what, publishers: PUBLISHERS, payloadBytes: PAYLOAD_BYTES, qos: 1, subscriberQos: 1, filter: '#',
    mqttVersion: variant.protocolVersion === 5 ? '5' : '3.1.1', cleanSession: variant.clean, inFlightPerPublisher: WINDOW,
    durability: 'sync', mosquitto: version, mosquittoConfig: MOSQUITTO_CONFIG, edgemqConfig: EDGEMQ_CONFIG, seconds: SECONDS, warmupSeconds: WARMUP_SECONDS, rounds: ROUNDS,
  }
  report({
    bench: `fan-in.${variant.name}.delivered`,
    unit: 'msgs/s',
    value: median(delivered('edgemq')),
    baseline: `Mosquitto ${version}, persistence false, same load`,
    baselineValue: median(delivered('mosquitto')),
    better: 'higher',
    params: {
      ...common, statistic: 'median of rounds', target: variant.target, counted: 'PUBLISHes the subscriber received in the window',
      edgemqRounds: delivered('edgemq').map(Math.round), mosquittoRounds: delivered('mosquitto').map(Math.round),
      roundRatios: pairedRatios(delivered('edgemq'), delivered('mosquitto')),
      edgemqIngestRounds: results.edgemq.map((x) => Math.round(x.ingest.rate)), mosquittoIngestRounds: results.mosquitto.map((x) => Math.round(x.ingest.rate)),
      edgemqMissing: results.edgemq.map((x) => x.missing), mosquittoMissing: results.mosquitto.map((x) => x.missing),
      edgemqCores: results.edgemq.map((x) => r2(x.brokerCores) ?? NaN), mosquittoCores: results.mosquitto.map((x) => r2(x.brokerCores) ?? NaN),
      subscriberCores: [...results.edgemq, ...results.mosquitto].map((x) => round(x.subscriberCores, 2)),
      generatorCores: [...results.edgemq, ...results.mosquitto].map((x) => round(x.ingest.generatorCores, 2)),
    },
  })
  // What the rate hides on a shared machine: the broker's CPU for each message it delivered (µs, all its threads).
  const cpu = (name: 'edgemq' | 'mosquitto'): Array<number | undefined> => results[name].map(cpuPerMessage)
  const cpuRounds = (rounds: Array<number | undefined>): number[] => rounds.map((x) => r2(x) ?? NaN)
  const measured = (rounds: Array<number | undefined>): number[] => rounds.filter((x): x is number => x !== undefined)
  report({
    bench: `fan-in.${variant.name}.cpu-per-message`,
    unit: 'µs',
    value: median(measured(cpu('edgemq'))),
    baseline: `Mosquitto ${version}, persistence false, same load`,
    baselineValue: median(measured(cpu('mosquitto'))),
    better: 'lower',
    params: {
      ...common, statistic: 'median of rounds', counted: 'broker process CPU (user + system, all threads) in the window / PUBLISHes the subscriber received',
      edgemqRounds: cpuRounds(cpu('edgemq')), mosquittoRounds: cpuRounds(cpu('mosquitto')),
      ...(COMPARE_BIN === undefined ? {} : { compareRounds: cpuRounds(compareCpu) }),
    },
  })
  if (COMPARE_BIN !== undefined) {
    report({
      bench: `fan-in.${variant.name}.compare`,
      unit: 'msgs/s',
      value: median(delivered('edgemq')),
      baseline: `edgemq of ${COMPARE_BIN}, a round beside each round of this checkout`,
      baselineValue: median(compareRounds),
      better: 'higher',
      params: {
        scenario: variant.what, statistic: 'median of rounds', rounds: ROUNDS, seconds: SECONDS,
        thisRounds: delivered('edgemq').map(Math.round), compareRounds: compareRounds.map(Math.round), roundRatios: pairedRatios(delivered('edgemq'), compareRounds),
      },
    })
  }
  if (variant.protocolVersion === 5) {
    report({
      bench: `fan-in.${variant.name}.mqtt5-cost`,
      unit: 'msgs/s',
      value: median(delivered('edgemq')),
      baseline: 'edgemq under the same fan-in with MQTT 3.1.1 clients, a round beside each MQTT 5 round',
      baselineValue: median(v311Rounds),
      better: 'higher',
      params: {
        scenario: variant.what, statistic: 'median of rounds', target: '>= 0.9 (issue 14)', rounds: ROUNDS, seconds: SECONDS,
        mqtt5Rounds: delivered('edgemq').map(Math.round), mqtt311Rounds: v311Rounds.map(Math.round), roundRatios: pairedRatios(delivered('edgemq'), v311Rounds),
      },
    })
  }
}

async function profileEdgemq (generators: LoadGenerators): Promise<void> {
  // Not one of `dirs`: the profile outlives the bench.
  const profileDir = flag('profile-dir') ?? await mkdtemp(path.join(os.tmpdir(), 'edgemq-bench-profile-'))
  const variant = variants[0] as Variant
  const dataDir = await dirs.make('edgemq-profiled')
  const broker = await startEdgemq(dataDir, ['--cpu-prof', '--cpu-prof-dir', profileDir], EDGEMQ_BIN, await sessionWindowArgs(dirs, SESSION_INFLIGHT))
  let result: FanInRound
  try {
    result = await runRound(generators, variant, broker, PROFILE_SECONDS)
  } finally {
    const code = await broker.stop(60_000)
    if (code !== 0) info(`profiled edgemq exited with code ${code}:\n${broker.stderr().slice(-4000)}`)
  }
  info(`profiled run (${variant.name}, ${PROFILE_SECONDS} s): ${Math.round(result.delivered)} msgs/s delivered, ${Math.round(result.ingest.rate)} PUBACKs/s, ` +
    `broker ${r2(result.brokerCores)} cores`)
  const files = (await readdir(profileDir)).filter((f) => f.endsWith('.cpuprofile')).sort()
  const main = files.find((f) => f.includes(`.${broker.pid}.0.`)) ?? files[0]
  if (main === undefined) throw new Error(`no .cpuprofile in ${profileDir}`)
  const file = path.join(profileDir, main)
  process.stderr.write(`${formatProfileSummary(await summarizeCpuProfile(file, result.window))}\n`)
  info(`profile kept at ${file}`)
}

async function main (): Promise<number> {
  const mosquitto = findMosquitto(flag('mosquitto'))
  if (mosquitto === null && !PROFILE) {
    process.stderr.write('[bench] fan-in: mosquitto not found; it is the baseline of every figure of this bench. ' +
      'Install it (`apt-get install mosquitto`) or pass --mosquitto=/path/to/mosquitto.\n')
    return 1
  }
  const t0 = performance.now()
  const generators = new LoadGenerators(1)
  try {
    if (PROFILE) {
      await profileEdgemq(generators)
    } else {
      const version = mosquittoVersion(mosquitto as string)
      info(`fan-in bench: edgemq vs mosquitto ${version}, node ${process.version}, ${os.cpus().length} cpus; ` +
        `${ROUNDS} rounds of ${WARMUP_SECONDS} s warm-up + ${SECONDS} s per broker and variant`)
      for (const variant of variants) await variantFigures(generators, variant, mosquitto as string, version)
    }
  } finally {
    await generators.close()
    await dirs.cleanup()
  }
  info(`fan-in bench done in ${round((performance.now() - t0) / 1000, 1)} s`)
  return 0
}

process.exitCode = await main()
