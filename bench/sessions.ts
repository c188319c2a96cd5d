/**
 * `npm run bench -- sessions`: persistent MQTT sessions against Mosquitto in
 * the same run. One JSON line per figure on stdout (see lib/report.ts);
 * progress on stderr.
 *
 * Both brokers are child processes on free loopback ports, fresh (with a
 * fresh data directory) for every round: edgemq as `edgemq start` with the
 * embedded default config (`durability: sync`), Mosquitto in memory
 * (`persistence false`) with its queue limits lifted (`max_queued_messages
 * 0`, `max_queued_bytes 0`: by default it drops a persistent session's
 * messages past 1,000) and `max_inflight_messages` equal to edgemq's
 * outgoing window (`mqtt.sessionInflight`, its default 1,000 unless
 * `--window=N`).
 *
 * The load: 8 publishers (lib/mqtt/fill.ts, 100 in flight each) send
 * `--messages` (default 20,000) QoS 1 messages of 100 bytes for 80 devices
 * on `devices/<device>/telemetry/t`, which the default route appends to the
 * log, 8 partitions.
 *
 * Figures:
 * - `sessions.offline-drain`: a clean = false QoS 1 subscriber to
 *   `devices/+/telemetry/#` subscribes and leaves; the messages are
 *   published; it reconnects and acknowledges everything (one write of
 *   PUBACKs per read). Messages per second from its CONNACK to the last
 *   message, against Mosquitto; in the params each broker's CPU time per
 *   message, and edgemq's main thread's part of it (the rest is V8's
 *   compiler and GC threads, and LevelDB's).
 * - `sessions.ingest-offline-subscribers`: the publishers' rate (first
 *   PUBLISH to last PUBACK) with 10 such offline persistent subscribers,
 *   against the same gateway's rate with none. Mosquitto's rates with and
 *   without are in the params, and so is edgemq's CPU time per message in
 *   both (with their ratio, none / offline: steadier on a shared machine).
 *
 * Rounds alternate the brokers, the order flipping each round; each figure
 * is the median of rounds. Arguments: `--messages=N` (or EDGEMQ_BENCH_MESSAGES),
 * `--rounds=N` (default 1), `--mosquitto=PATH`, `--edgemq=PATH` (another
 * checkout's gateway/edgemq.mjs, to compare a change), `--drain-only` (no
 * ingest rounds: the drain figure alone, a third of the machine time), `--warm` (a second offline
 * session gets the same backlog and drains it, unmeasured, just before the measured one: the gateway's drain
 * code is then compiled, as in a gateway that has served reconnects before; without it each round's fresh
 * gateway drains with cold code, and V8's compiler threads took about a quarter of its CPU in the drain),
 * `--node-flags="…"` (node and V8 flags for the gateway's process, to try one: `--max-semi-space-size=32`).
 *
 * `--profile`: instead of the figures, one edgemq drain round under
 * `node --cpu-prof`; prints where the gateway's main thread spent the drain
 * (from the subscriber's CONNECT to its last message) on stderr, and keeps
 * the .cpuprofile in a temp directory (or `--profile-dir=DIR`).
 * `--profile-interval=US` samples every US µs (node's default is 1,000: a
 * 100 k drain busy for 0.5 s gives only 500 samples, too few to rank
 * functions of 1–2 %).
 */
import { readFileSync } from 'node:fs'
import { mkdir, mkdtemp, readdir } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { findMosquitto, mosquittoVersion, processCpuSeconds, sessionWindowArgs, startEdgemq, startMosquitto, withBrokerIn, type RunningBroker } from './lib/brokers.ts'
import { fill } from './lib/mqtt/fill.ts'
import { runSubscriber } from './lib/replay-clients.ts'
import { TempDirs, info, median, report, round } from './lib/report.ts'
import { argv, flag, intFlag } from './lib/flags.ts'
import { formatProfileSummary, summarizeCpuProfile } from './lib/cpu-profile.ts'
import { buildConfig } from '../gateway/config/config.ts'

const MESSAGES = intFlag('messages', 20_000, { env: 'EDGEMQ_BENCH_MESSAGES' })
const ROUNDS = intFlag('rounds', 1)
const EDGEMQ_BIN = flag('edgemq') === undefined ? undefined : path.resolve(flag('edgemq') as string)
const PROFILE = argv.includes('--profile')
const DRAIN_ONLY = argv.includes('--drain-only')
const WARM = argv.includes('--warm')
/** `--node-flags="--max-semi-space-size=32 …"`: node/V8 flags for the gateway's process in the measured rounds (experiments). */
const NODE_FLAGS = (flag('node-flags') ?? '').split(' ').filter((f) => f !== '')
const PUBLISHERS = 8
const DEVICES_PER_PUBLISHER = 10
const PUBLISH_WINDOW = 100
const PAYLOAD_BYTES = 100
const OFFLINE_SUBSCRIBERS = 10
const FILTER = 'devices/+/telemetry/#'
/**
 * `mqtt.sessionInflight`, outgoing QoS 1/2 deliveries unacknowledged per session: edgemq's default unless
 * `--window=N`. Mosquitto gets the same, and edgemq gets it in a config file (a checkout given by `--edgemq` too,
 * whatever its default).
 */
const OUTGOING_WINDOW = intFlag('window', buildConfig({}).mqtt.sessionInflight, { min: 1 })
const TIMEOUT_MS = 600_000
const MOSQUITTO_LINES = ['max_queued_messages 0', 'max_queued_bytes 0', `max_inflight_messages ${OUTGOING_WINDOW}`]

const dirs = new TempDirs()

type Name = 'edgemq' | 'mosquitto'

async function withBroker<T> (name: Name, mosquitto: string, fn: (broker: RunningBroker) => Promise<T>, nodeFlags: readonly string[] = []): Promise<T> {
  return await withBrokerIn(dirs, name,
    async (dir) => name === 'edgemq' ? await startEdgemq(dir, nodeFlags, EDGEMQ_BIN, await sessionWindowArgs(dirs, OUTGOING_WINDOW)) : await startMosquitto(mosquitto, dir, MOSQUITTO_LINES), fn)
}

/** Connects a clean = false session, subscribes at QoS 1 and drops the connection once the SUBACK is in. */
async function leaveSession (broker: RunningBroker, clientId: string): Promise<void> {
  await runSubscriber({
    host: broker.host, port: broker.port, clientId, clean: false, subscribe: FILTER, wantTopics: false, until: () => false, timeoutMs: 500,
  }).catch((err: Error) => { if (!/still waiting/.test(err.message)) throw err })
}

function publish (broker: RunningBroker): Promise<{ rate: number }> {
  return fill({
    host: broker.host, port: broker.port, messages: MESSAGES, connections: PUBLISHERS, devicesPerConnection: DEVICES_PER_PUBLISHER,
    payloadBytes: PAYLOAD_BYTES, window: PUBLISH_WINDOW,
  })
}

interface DrainRound {
  readonly rate: number
  readonly firstMs: number
  readonly brokerCores: number | undefined
  /** CPU seconds of the broker's main thread in the drain (undefined without /proc). */
  readonly mainThreadSeconds: number | undefined
  readonly publishRate: number
  /** The drain on the monotonic clock in µs (a CPU profile's clock). */
  readonly window: { readonly fromUs: number, readonly toUs: number }
}

/** The broker's CPU time per message drained, in µs. */
const cpuUsPerMessage = (d: DrainRound): number => d.brokerCores === undefined ? NaN : d.brokerCores / d.rate * 1e6

/** The broker's main thread's CPU time per message drained, in µs; the rest of cpuUsPerMessage is its other threads'. */
const mainThreadUsPerMessage = (d: DrainRound): number => d.mainThreadSeconds === undefined ? NaN : d.mainThreadSeconds / MESSAGES * 1e6

/**
 * CPU seconds of a process's main thread (/proc/<pid>/task/<pid>/stat: utime + stime): the rest of the process's CPU
 * is its other threads'. For edgemq those are V8's helpers (GC, and the optimizing compiler: a fresh gateway compiles
 * its drain path during the first drain), the libuv threadpool (LevelDB reads and writes) and LevelDB's compaction.
 */
function mainThreadSeconds (pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/task/${pid}/stat`, 'utf8')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(fields[11]) + Number(fields[12])) / 100 // USER_HZ, as processCpuSeconds reads it on Linux
  } catch {
    return undefined
  }
}

const nowUs = (): number => Number(process.hrtime.bigint() / 1000n)

async function drainRound (broker: RunningBroker, n: number): Promise<DrainRound> {
  const clientId = `persistent-${n}`
  await leaveSession(broker, clientId)
  if (WARM) await leaveSession(broker, `warm-${n}`)
  const { rate: publishRate } = await publish(broker)
  if (WARM) {
    const w = await runSubscriber({ host: broker.host, port: broker.port, clientId: `warm-${n}`, clean: false, wantTopics: false, until: (c) => c === MESSAGES, timeoutMs: TIMEOUT_MS })
    if (w.received !== MESSAGES) throw new Error(`${broker.name}: the warm-up drain got ${w.received} of ${MESSAGES}`)
  }
  const cpu0 = processCpuSeconds(broker.pid)
  const main0 = mainThreadSeconds(broker.pid)
  const fromUs = nowUs()
  const r = await runSubscriber({ host: broker.host, port: broker.port, clientId, clean: false, wantTopics: false, until: (c) => c === MESSAGES, timeoutMs: TIMEOUT_MS })
  const cpu1 = processCpuSeconds(broker.pid)
  const main1 = mainThreadSeconds(broker.pid)
  const toUs = nowUs()
  if (r.received !== MESSAGES) throw new Error(`${broker.name}: drained ${r.received} of ${MESSAGES}`)
  return {
    rate: MESSAGES / (r.ms / 1000), firstMs: r.firstMs, publishRate, window: { fromUs, toUs },
    brokerCores: cpu0 === undefined || cpu1 === undefined ? undefined : (cpu1 - cpu0) / (r.ms / 1000),
    mainThreadSeconds: main0 === undefined || main1 === undefined ? undefined : main1 - main0,
  }
}

interface IngestRound {
  readonly rate: number
  /** The broker's CPU time per message published, in µs: steadier than the rate on a shared machine. */
  readonly cpuUs: number
}

async function ingestRound (broker: RunningBroker, subscribers: number, n: number): Promise<IngestRound> {
  for (let s = 0; s < subscribers; s++) await leaveSession(broker, `offline-${n}-${s}`)
  const cpu0 = processCpuSeconds(broker.pid)
  const { rate } = await publish(broker)
  const cpu1 = processCpuSeconds(broker.pid)
  return { rate, cpuUs: cpu0 === undefined || cpu1 === undefined ? NaN : (cpu1 - cpu0) / MESSAGES * 1e6 }
}

/** `--profile`: one edgemq drain round under the CPU profiler, summarised over the drain. */
async function profile (mosquitto: string): Promise<void> {
  const profileDir = flag('profile-dir') ?? await mkdtemp(path.join(os.tmpdir(), 'edgemq-bench-profile-'))
  await mkdir(profileDir, { recursive: true })
  let pid = -1
  const interval = flag('profile-interval')
  const nodeFlags = ['--cpu-prof', '--cpu-prof-dir', profileDir, ...(interval === undefined ? [] : ['--cpu-prof-interval', String(intFlag('profile-interval', 1000))])]
  const d = await withBroker('edgemq', mosquitto, async (b) => { pid = b.pid; return await drainRound(b, 0) }, nodeFlags)
  info(`edgemq (profiled): drain ${Math.round(d.rate)} msgs/s (first after ${round(d.firstMs, 1)} ms, broker ${round(d.brokerCores ?? NaN, 2)} cores)`)
  const files = (await readdir(profileDir)).filter((f) => f.endsWith('.cpuprofile')).sort()
  const main = files.find((f) => f.includes(`.${pid}.0.`)) ?? files[0]
  if (main === undefined) throw new Error(`no .cpuprofile in ${profileDir}`)
  const file = path.join(profileDir, main)
  process.stderr.write(`${formatProfileSummary(await summarizeCpuProfile(file, d.window), 30)}\n`)
  info(`profile kept at ${file} (open it in Chrome DevTools > Performance, or speedscope); the drain is ${d.window.fromUs}..${d.window.toUs} µs of its clock`)
}

async function main (): Promise<number> {
  const mosquitto = findMosquitto(flag('mosquitto'))
  if (mosquitto === null) {
    process.stderr.write('[bench] sessions: mosquitto not found (apt-get install mosquitto, or --mosquitto=PATH): it is the baseline\n')
    return 1
  }
  if (PROFILE) {
    try {
      await profile(mosquitto)
    } finally {
      await dirs.cleanup()
    }
    return 0
  }
  const version = mosquittoVersion(mosquitto)
  const drains: Record<Name, DrainRound[]> = { edgemq: [], mosquitto: [] }
  const ingest: Record<Name, { none: IngestRound[], offline: IngestRound[] }> = { edgemq: { none: [], offline: [] }, mosquitto: { none: [], offline: [] } }
  info(`sessions bench: ${MESSAGES} messages, ${ROUNDS} rounds, edgemq vs mosquitto ${version}`)
  try {
    for (let n = 0; n < ROUNDS; n++) {
      const order: Name[] = n % 2 === 0 ? ['mosquitto', 'edgemq'] : ['edgemq', 'mosquitto']
      for (const name of order) {
        const d = await withBroker(name, mosquitto, (b) => drainRound(b, n), name === 'edgemq' ? NODE_FLAGS : [])
        drains[name].push(d)
        const cores = round(d.brokerCores ?? NaN, 2)
        info(`round ${n + 1} ${name}: drain ${Math.round(d.rate)} msgs/s (first after ${round(d.firstMs, 1)} ms, broker ${cores} cores, `
          + `${round(cpuUsPerMessage(d), 2)} µs CPU per message, ${round(mainThreadUsPerMessage(d), 2)} of it on the main thread)`)
        if (DRAIN_ONLY) continue
        const none = await withBroker(name, mosquitto, (b) => ingestRound(b, 0, n))
        const offline = await withBroker(name, mosquitto, (b) => ingestRound(b, OFFLINE_SUBSCRIBERS, n))
        ingest[name].none.push(none)
        ingest[name].offline.push(offline)
        info(`round ${n + 1} ${name}: ingest ${Math.round(none.rate)} msgs/s with no subscriber, ${Math.round(offline.rate)} with ${OFFLINE_SUBSCRIBERS} offline `
          + `(${round(none.cpuUs, 2)} and ${round(offline.cpuUs, 2)} µs CPU per message)`)
      }
    }
  } finally {
    await dirs.cleanup()
  }
  const rates = (name: Name): number[] => drains[name].map((d) => d.rate)
  const common = {
    messages: MESSAGES, publishers: PUBLISHERS, devices: PUBLISHERS * DEVICES_PER_PUBLISHER, publishWindow: PUBLISH_WINDOW, payloadBytes: PAYLOAD_BYTES,
    rounds: ROUNDS, statistic: 'median of rounds', durability: 'sync', warmDrain: WARM, mosquitto: version, mosquittoConfig: `persistence false, ${MOSQUITTO_LINES.join(', ')}`,
  }
  report({
    bench: 'sessions.offline-drain', unit: 'msgs/s', value: median(rates('edgemq')), better: 'higher',
    baseline: `Mosquitto ${version} draining the same backlog to the same reconnecting persistent session`,
    baselineValue: median(rates('mosquitto')),
    params: {
      ...common, filter: FILTER, outgoingWindow: OUTGOING_WINDOW, target: '>= 0.5x Mosquitto (first milestone), 1.0x (goal)',
      edgemqRounds: rates('edgemq').map(Math.round), mosquittoRounds: rates('mosquitto').map(Math.round),
      edgemqFirstMessageMs: drains.edgemq.map((d) => round(d.firstMs, 1)),
      edgemqCores: drains.edgemq.map((d) => round(d.brokerCores ?? NaN, 2)), mosquittoCores: drains.mosquitto.map((d) => round(d.brokerCores ?? NaN, 2)),
      // CPU per message moves less than the rates on a shared machine, where both brokers wait to be scheduled.
      edgemqCpuUsPerMessage: drains.edgemq.map((d) => round(cpuUsPerMessage(d), 2)),
      mosquittoCpuUsPerMessage: drains.mosquitto.map((d) => round(cpuUsPerMessage(d), 2)),
      // The main thread's share of it: what the rest is (V8 compiling a fresh gateway's drain path, GC, LevelDB) shows in the difference.
      edgemqMainThreadCpuUsPerMessage: drains.edgemq.map((d) => round(mainThreadUsPerMessage(d), 2)),
      edgemqPublishRounds: drains.edgemq.map((d) => Math.round(d.publishRate)),
    },
  })
  if (DRAIN_ONLY) return 0
  const ingestRates = (name: Name, kind: 'none' | 'offline'): number[] => ingest[name][kind].map((r) => r.rate)
  const ingestCpu = (name: Name, kind: 'none' | 'offline'): number[] => ingest[name][kind].map((r) => round(r.cpuUs, 2))
  report({
    bench: 'sessions.ingest-offline-subscribers', unit: 'msgs/s', value: median(ingestRates('edgemq', 'offline')), better: 'higher',
    baseline: 'the same gateway, same load, no subscriber', baselineValue: median(ingestRates('edgemq', 'none')),
    params: {
      ...common, offlineSubscribers: OFFLINE_SUBSCRIBERS, filter: FILTER, target: '>= 0.8x the same gateway with none',
      edgemqOfflineRounds: ingestRates('edgemq', 'offline').map(Math.round), edgemqNoneRounds: ingestRates('edgemq', 'none').map(Math.round),
      mosquittoOfflineRounds: ingestRates('mosquitto', 'offline').map(Math.round), mosquittoNoneRounds: ingestRates('mosquitto', 'none').map(Math.round),
      mosquittoRatio: round(median(ingestRates('mosquitto', 'offline')) / median(ingestRates('mosquitto', 'none')), 2),
      // The same ratio in CPU per message (none / offline), which a loaded machine moves less than the rates.
      edgemqCpuUsPerMessageOffline: ingestCpu('edgemq', 'offline'), edgemqCpuUsPerMessageNone: ingestCpu('edgemq', 'none'),
      edgemqCpuRatio: round(median(ingestCpu('edgemq', 'none')) / median(ingestCpu('edgemq', 'offline')), 2),
    },
  })
  return 0
}

process.exitCode = await main()
