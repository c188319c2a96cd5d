/**
 * `npm run bench -- bridge`: how fast the bridge drains a backlog to a
 * Mosquitto upstream, against Mosquitto's own bridge draining the same
 * backlog between two Mosquitto instances, in the same run. One JSON line
 * per figure on stdout (see lib/report.ts); progress on stderr.
 *
 * The backlog: `--records` (default 1 M) QoS 1 messages of 100 bytes from
 * 100 devices (`dev-000` … `dev-099`, topic `devices/<id>/telemetry/t`),
 * published by 10 connections with 100 in flight each (lib/mqtt/fill.ts)
 * while the upstream is down. Both sides get it through MQTT, the same
 * publisher and the same bytes, so each holds it the way it would after an
 * outage:
 * - edgemq (`edgemq start`, `durability: sync`) appends it to
 *   `default/telemetry` (8 partitions, the device id as key) in the group
 *   commits its ingest makes under that load; the bridge's consumer group
 *   `bridge.up` holds it. GET /v1/bridge must report all of it as backlog
 *   before the upstream starts. (`--fill=store` instead appends it with the
 *   store API into the data dir before the gateway starts: quicker, with
 *   larger batches than MQTT ingest makes, and the same drain rate.)
 * - Mosquitto A (`persistence false`) queues it for its bridge to B, a
 *   client session inside A: `local_cleansession false` keeps the session
 *   and its QoS 1 queue while the bridge is down, `max_queued_messages 0`
 *   lifts the 1,000-message default cap so all of it is kept (in memory).
 *
 * Then the upstream starts: a fresh Mosquitto on the port the bridge points
 * at, with one subscriber (lib/mqtt/counter.ts, QoS 1, `#`; `$dedupe/#` for
 * edgemq's dedupe variant, since `#` does not match topics that start with
 * `$`). The upstream is started right after the bridge's failed connection
 * attempt (edgemq: GET /v1/bridge `reconnects` moved; Mosquitto: A logged
 * "Connecting bridge"), so the subscriber is subscribed before the next
 * attempt (1–2 s later on both sides) connects; the bench checks that
 * order. The clock starts when the upstream logs the bridge's CONNECT
 * ("New client connected … as <bridge client id>") and stops when the
 * subscriber has received every record. The figure is records / that time.
 * Reconnect delays and start-up are outside it; the bridge's ramp-up
 * (reading the log, filling its window) is inside.
 *
 * Settings that make the two bridges comparable:
 * - in flight: edgemq `maxInflight` and A's `max_inflight_messages` (which
 *   Mosquitto 2.0 applies to its bridge's outgoing QoS 1 messages) are both
 *   `--window` (default 100, edgemq's default);
 * - QoS 1 end to end; remote clean session on both (edgemq's uplink without
 *   command mappings is clean; A has `cleansession true`);
 * - the upstream is the same Mosquitto config for both: `persistence
 *   false`, `max_queued_messages 0` (Mosquitto drops QoS 1 messages for an
 *   online subscriber whose queue is full), `max_inflight_messages 1000`
 *   towards the subscriber. Mosquitto is single-threaded: fed by one
 *   bridge connection it tops out near 50 k msgs/s on the 2-core machine,
 *   and that bounds the baseline (`--check-upstream` shows the last hop's
 *   ceiling with 10 publishers).
 *
 * Variants (positional arguments, default both):
 * - plain   edgemq over MQTT 3.1.1 with `dedupeId: none`: records go upstream
 *           with their own topic, exactly like Mosquitto's bridge. The
 *           like-for-like figure.
 * - dedupe  edgemq's form for an upstream edgemq (`kind: edgemq`, Mosquitto
 *           standing in for it), `dedupeId: topic-prefix`: each topic is
 *           `$dedupe/bench/default/telemetry/<p>/<offset>/<topic>` (about 40
 *           bytes longer), against the same Mosquitto rounds.
 *
 * Every round starts fresh processes and directories; edgemq and Mosquitto
 * rounds alternate, the order flipping each round (as in gateway.ts), and
 * each figure is the median of its rounds, with per-round ratios.
 *
 * Arguments: variants, `--records=N`, `--rounds=N` (default 3), `--quick`
 * (100 k records, 1 round), `--window=N`, `--fill=mqtt|store`,
 * `--stall-seconds=N` (fail when the subscriber gets nothing for this long,
 * default 30), `--mosquitto=PATH`, `--edgemq=PATH` (another checkout's
 * gateway/edgemq.mjs), `--compare=PATH` (another checkout measured in the
 * same rounds as well, reported as `bridge.drain.<variant>.compare`).
 * `--profile`: one edgemq round of the first selected variant under
 * `node --cpu-prof`, and where its main thread spends the drain (the
 * .cpuprofile is kept in a temp directory, or in `--profile-dir=DIR`).
 * `--check-upstream`: the backlog's publishers straight into the upstream,
 * counted by the subscriber: the last hop's own ceiling.
 * `--source-conf=LINES`, `--upstream-conf=LINES`: extra Mosquitto config
 * lines (`;`-separated) for A, and for the upstream of both sides.
 */
import { mkdir, mkdtemp, readdir, writeFile } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { openLogStore } from '../store/index.ts'
import { findMosquitto, freePort, mosquittoVersion, processCpuSeconds, processRssBytes, processSyscalls, startEdgemq, startMosquittoWithConfig, type RunningBroker } from './lib/brokers.ts'
import { formatProfileSummary, summarizeCpuProfile } from './lib/cpu-profile.ts'
import { CountingSubscriber } from './lib/mqtt/counter.ts'
import { fill, fillDevice, fillTopic } from './lib/mqtt/fill.ts'
import { TempDirs, info, median, report, round, type ParamValue } from './lib/report.ts'
import { argv, flag, intFlag } from './lib/flags.ts'

const QUICK = argv.includes('--quick')
const PROFILE = argv.includes('--profile')
const RECORDS = intFlag('records', QUICK ? 100_000 : 1_000_000)
const ROUNDS = intFlag('rounds', QUICK ? 1 : 3)
const WINDOW = intFlag('window', 100)
const STALL_MS = intFlag('stall-seconds', 30) * 1000
const FILL = flag('fill') ?? 'mqtt'
if (FILL !== 'mqtt' && FILL !== 'store') throw new Error('--fill must be mqtt or store')
/** Extra Mosquitto config lines, `;`-separated, for trying settings: the source A, the upstream (both sides). */
const SOURCE_EXTRA = (flag('source-conf') ?? '').split(';').filter((l) => l !== '')
const UPSTREAM_EXTRA = (flag('upstream-conf') ?? '').split(';').filter((l) => l !== '')
const EDGEMQ_BIN = flag('edgemq') === undefined ? undefined : path.resolve(flag('edgemq') as string)
/** Another checkout's gateway/edgemq.mjs, measured in the same rounds (to try a change against the same Mosquitto rounds). */
const COMPARE_BIN = flag('compare') === undefined ? undefined : path.resolve(flag('compare') as string)

type Variant = 'plain' | 'dedupe'
const VARIANTS: readonly Variant[] = ['plain', 'dedupe']
const selected = argv.filter((a) => !a.startsWith('--'))
for (const v of selected) if (!VARIANTS.includes(v as Variant)) throw new Error(`unknown variant ${v}; expected ${VARIANTS.join(' or ')}`)
const variants = VARIANTS.filter((v) => selected.length === 0 || selected.includes(v))
/** The edgemq runs of every round: each variant, and with --compare each variant again on the other checkout. */
interface Contender { readonly key: string, readonly variant: Variant, readonly bin: string | undefined }
const contenders: readonly Contender[] = [
  ...variants.map((variant) => ({ key: variant, variant, bin: EDGEMQ_BIN })),
  ...(COMPARE_BIN === undefined ? [] : variants.map((variant) => ({ key: `${variant}@compare`, variant, bin: COMPARE_BIN }))),
]

const PAYLOAD_BYTES = 100
const DEVICES = 100
const FILL_CONNECTIONS = 10
const FILL_WINDOW = 100
const PARTITIONS = 8
const GATEWAY_ID = 'bench'
const UPSTREAM = 'up'
const EDGEMQ_CLIENT_ID = `edgemq-${GATEWAY_ID}-${UPSTREAM}`
const MOSQUITTO_BRIDGE_CLIENT_ID = 'bridge-a'
/** Both bridges retry every 1–2 s while the upstream is down. */
const EDGEMQ_RECONNECT_MS = 2000
const SUBSCRIBER_INFLIGHT = 1000

const dirs = new TempDirs()
const monotonicUs = (): number => Number(process.hrtime.bigint() / 1000n)
const delay = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

const LOG_LINES = ['log_dest stderr', 'log_type error', 'log_type warning', 'log_type notice']

/** The upstream: B for Mosquitto's bridge, the upstream of edgemq's. */
function upstreamConfig (port: number): string[] {
  return [
    `listener ${port} 127.0.0.1`, 'allow_anonymous true', 'persistence false',
    'max_queued_messages 0', `max_inflight_messages ${SUBSCRIBER_INFLIGHT}`, ...LOG_LINES, ...UPSTREAM_EXTRA,
  ]
}
const UPSTREAM_CONFIG = `listener on 127.0.0.1, allow_anonymous true, persistence false, max_queued_messages 0, max_inflight_messages ${SUBSCRIBER_INFLIGHT}`

/** Mosquitto A, the source, bridged to B on `upstreamPort`. */
function sourceConfig (port: number, upstreamPort: number): string[] {
  return [
    `listener ${port} 127.0.0.1`, 'allow_anonymous true', 'persistence false',
    'max_queued_messages 0', `max_inflight_messages ${WINDOW}`, ...LOG_LINES, ...SOURCE_EXTRA,
    'connection a-to-b', `address 127.0.0.1:${upstreamPort}`, 'topic # out 1', `remote_clientid ${MOSQUITTO_BRIDGE_CLIENT_ID}`,
    'bridge_protocol_version mqttv311', 'cleansession true', 'local_cleansession false',
    'restart_timeout 1 2', 'notifications false',
  ]
}
const SOURCE_CONFIG = `A: persistence false, max_queued_messages 0, max_inflight_messages ${WINDOW}; bridge: topic # out 1, mqttv311, cleansession true, local_cleansession false, restart_timeout 1 2, notifications false`

function edgemqConfig (upstreamPort: number, variant: Variant): unknown {
  return {
    gatewayId: GATEWAY_ID,
    bridge: {
      upstreams: [{
        name: UPSTREAM,
        url: `mqtt://127.0.0.1:${upstreamPort}`,
        forward: [{ stream: 'telemetry' }],
        maxInflight: WINDOW,
        reconnectMinMs: EDGEMQ_RECONNECT_MS,
        reconnectMaxMs: EDGEMQ_RECONNECT_MS,
        ...(variant === 'plain' ? { mqttVersion: '3.1.1', dedupeId: 'none' } : { kind: 'edgemq' }),
      }],
    },
  }
}

interface BridgeUpstreamStatus {
  readonly connected: boolean
  readonly reconnects: number
  readonly forwardedMessages: number
  readonly backlog: { readonly messages: number, readonly bytes: number, readonly seconds: number }
}

async function bridgeStatus (httpUrl: string): Promise<BridgeUpstreamStatus> {
  const res = await fetch(`${httpUrl}/v1/bridge`)
  if (!res.ok) throw new Error(`GET ${httpUrl}/v1/bridge: HTTP ${res.status}: ${await res.text()}`)
  const body = await res.json() as { upstreams: BridgeUpstreamStatus[] }
  const u = body.upstreams[0]
  if (u === undefined) throw new Error('GET /v1/bridge lists no upstream')
  return u
}

function timeout<T> (p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms) }),
  ])
}

/** What one drain measured. */
interface Drain {
  /** Records / seconds from the bridge's CONNECT at the upstream to the subscriber's last message. */
  readonly rate: number
  readonly connectToLastMs: number
  readonly connectToFirstMs: number
  /** Cores used from connect to the last message: the source (edgemq or A), the upstream, the bench (the subscriber). */
  readonly sourceCores: number
  readonly upstreamCores: number
  readonly subscriberCores: number
  /** The source's write and read system calls per record (all threads): how many records one socket write carries. */
  readonly sourceWritesPerRecord: number
  readonly sourceReadsPerRecord: number
  /** Messages received after the last expected one, within 500 ms (duplicates). */
  readonly extra: number
  /** Highest and lowest whole-second rate at the subscriber between the first and the last message. */
  readonly peakSecondRate: number
  readonly lowSecondRate: number
  /** From the bridge's CONNECT to the last message, on the monotonic clock in µs (a CPU profile's clock). */
  readonly window: { readonly fromUs: number, readonly toUs: number }
}

/**
 * Starts the upstream on `port`, subscribes, and measures until the
 * subscriber has `RECORDS` messages. `bridgeClientId` is how the upstream's
 * log names the bridge's connection; `afterAll` runs while everything is
 * still up (edgemq waits there for its backlog to read 0).
 */
async function drainInto (mosquitto: string, dir: string, port: number, bridgeClientId: string, filter: string, sourcePid: number, afterAll?: () => Promise<void>): Promise<Drain> {
  let connect: { at: number, atUs: number, source: number | undefined, upstream: number | undefined, bench: NodeJS.CpuUsage, sys: ReturnType<typeof processSyscalls> } | undefined
  let onConnect: () => void = () => {}
  const connected = new Promise<void>((resolve) => { onConnect = resolve })
  let upstreamPid = -1
  const upstream = await startMosquittoWithConfig(mosquitto, dir, port, upstreamConfig(port), (line) => {
    if (connect !== undefined || !line.includes(` as ${bridgeClientId} `)) return
    connect = { at: performance.now(), atUs: monotonicUs(), source: processCpuSeconds(sourcePid), upstream: processCpuSeconds(upstreamPid), bench: process.cpuUsage(), sys: processSyscalls(sourcePid) }
    onConnect()
  })
  upstreamPid = upstream.pid
  let sub: CountingSubscriber | undefined
  try {
    sub = await CountingSubscriber.subscribe({ host: upstream.host, port, clientId: 'bench-subscriber', filter, qos: 1 })
    const subscribedAt = performance.now()
    await timeout(connected, 15_000, `the bridge connecting to the upstream (${bridgeClientId})`)
    const c = connect as NonNullable<typeof connect>
    if (c.at < subscribedAt) throw new Error('the bridge connected before the subscriber had subscribed: messages may have been dropped; run again')
    const samples: number[] = []
    const sampler = setInterval(() => samples.push((sub as CountingSubscriber).received), 1000)
    try {
      await sub.waitFor(RECORDS, STALL_MS)
    } finally {
      clearInterval(sampler)
    }
    const endSource = processCpuSeconds(sourcePid)
    const endSys = processSyscalls(sourcePid)
    const endUpstream = processCpuSeconds(upstream.pid)
    const bench = process.cpuUsage(c.bench)
    const seconds = (sub.lastAt - c.at) / 1000
    const perSecond = samples.map((n, i) => n - (samples[i - 1] ?? 0)).filter((_n, i) => (samples[i - 1] ?? 0) > 0 && (samples[i] as number) < RECORDS)
    await afterAll?.()
    await delay(500)
    return {
      rate: RECORDS / seconds,
      connectToLastMs: sub.lastAt - c.at,
      connectToFirstMs: sub.firstAt - c.at,
      sourceCores: ((endSource ?? NaN) - (c.source ?? NaN)) / seconds,
      upstreamCores: ((endUpstream ?? NaN) - (c.upstream ?? NaN)) / seconds,
      subscriberCores: (bench.user + bench.system) / 1e6 / seconds,
      sourceWritesPerRecord: ((endSys?.writes ?? NaN) - (c.sys?.writes ?? NaN)) / RECORDS,
      sourceReadsPerRecord: ((endSys?.reads ?? NaN) - (c.sys?.reads ?? NaN)) / RECORDS,
      extra: sub.received - RECORDS,
      peakSecondRate: perSecond.length === 0 ? NaN : Math.max(...perSecond),
      lowSecondRate: perSecond.length === 0 ? NaN : Math.min(...perSecond),
      window: { fromUs: c.atUs, toUs: sub.lastAtUs },
    }
  } catch (err) {
    throw new Error(`${(err as Error).message}\nupstream stderr (tail):\n${upstream.stderr().slice(-3000)}`)
  } finally {
    await sub?.close()
    await upstream.stop()
  }
}

/** Appends the backlog with the store API into a data dir no gateway has opened yet (`--fill=store`). */
async function fillStore (dataDir: string): Promise<number> {
  await mkdir(dataDir, { recursive: true })
  const store = await openLogStore({ location: path.join(dataDir, 'db'), durability: 'async' })
  try {
    const stream = 'default/telemetry'
    await store.createStream(stream, { partitions: PARTITIONS })
    const devices = Array.from({ length: DEVICES }, (_v, i) => fillDevice(i))
    const payload = Buffer.alloc(PAYLOAD_BYTES, 7)
    const t0 = performance.now()
    let next = 0
    const worker = async (): Promise<void> => {
      while (next < RECORDS) {
        const i = next++
        const device = devices[i % DEVICES] as string
        await store.append(stream, device, { payload, topic: fillTopic(device), qos: 1, clientId: `fill-${Math.floor((i % DEVICES) / 10)}` })
      }
    }
    await Promise.all(Array.from({ length: FILL_CONNECTIONS * FILL_WINDOW }, worker))
    return RECORDS / ((performance.now() - t0) / 1000)
  } finally {
    await store.close()
  }
}

interface RoundResult extends Drain {
  readonly fillRate: number
  /** Resident memory of the source (edgemq or A) holding the whole backlog, before the upstream starts. */
  readonly sourceRssBytes: number
  /** edgemq: from the last message at the subscriber until GET /v1/bridge reported backlog 0 (commits every 200 ms). */
  readonly backlogZeroMs: number | null
}

async function edgemqRound (mosquitto: string, variant: Variant, nodeFlags: readonly string[] = [], bin = EDGEMQ_BIN): Promise<RoundResult & { readonly pid: number }> {
  const dir = await dirs.make(`edgemq-${variant}`)
  const dataDir = path.join(dir, 'data')
  const upstreamPort = await freePort()
  const configFile = path.join(dir, 'edgemq.json')
  await writeFile(configFile, JSON.stringify(edgemqConfig(upstreamPort, variant), null, 2))
  const storeFillRate = FILL === 'store' ? await fillStore(dataDir) : NaN
  const gw = await startEdgemq(dataDir, nodeFlags, bin, ['--config', configFile])
  const httpUrl = gw.httpUrl as string
  try {
    const fillRate = FILL === 'mqtt'
      ? (await fill({ host: gw.host, port: gw.port, messages: RECORDS, connections: FILL_CONNECTIONS, devicesPerConnection: DEVICES / FILL_CONNECTIONS, payloadBytes: PAYLOAD_BYTES, window: FILL_WINDOW })).rate
      : storeFillRate
    const sourceRssBytes = processRssBytes(gw.pid) ?? NaN
    const before = await bridgeStatus(httpUrl)
    if (before.connected) throw new Error('the bridge is connected before the upstream started')
    if (before.backlog.messages !== RECORDS) throw new Error(`GET /v1/bridge reports a backlog of ${before.backlog.messages} messages, expected ${RECORDS}`)
    // Start the upstream just after a failed attempt: the next one is 1–2 s away.
    for (const until = Date.now() + 15_000; (await bridgeStatus(httpUrl)).reconnects === before.reconnects;) {
      if (Date.now() > until) throw new Error('the bridge made no connection attempt within 15 s')
      await delay(20)
    }
    let backlogZeroMs: number | null = null
    const drain = await drainInto(mosquitto, dir, upstreamPort, EDGEMQ_CLIENT_ID, variant === 'dedupe' ? '$dedupe/#' : '#', gw.pid, async () => {
      const t0 = performance.now()
      for (const until = t0 + 10_000; performance.now() < until; await delay(20)) {
        const s = await bridgeStatus(httpUrl)
        if (s.backlog.messages === 0) { backlogZeroMs = performance.now() - t0; return }
      }
    })
    return { ...drain, fillRate, sourceRssBytes, backlogZeroMs, pid: gw.pid }
  } catch (err) {
    throw new Error(`${(err as Error).message}\nedgemq stderr (tail):\n${gw.stderr().slice(-3000)}`)
  } finally {
    const code = await gw.stop(60_000)
    if (code !== 0 && code !== null) info(`edgemq exited with code ${code}`)
    if (nodeFlags.length === 0) await dirs.remove(dir)
  }
}

async function mosquittoRound (mosquitto: string): Promise<RoundResult> {
  const dir = await dirs.make('mosquitto')
  const portA = await freePort()
  let portB = await freePort()
  while (portB === portA) portB = await freePort()
  let attempt: (() => void) | null = null
  const a: RunningBroker = await startMosquittoWithConfig(mosquitto, dir, portA, sourceConfig(portA, portB), (line) => {
    if (line.includes('Connecting bridge')) { attempt?.(); attempt = null }
  })
  try {
    const filled = await fill({ host: a.host, port: portA, messages: RECORDS, connections: FILL_CONNECTIONS, devicesPerConnection: DEVICES / FILL_CONNECTIONS, payloadBytes: PAYLOAD_BYTES, window: FILL_WINDOW })
    const sourceRssBytes = processRssBytes(a.pid) ?? NaN
    await timeout(new Promise<void>((resolve) => { attempt = resolve }), 15_000, 'a connection attempt of the Mosquitto bridge')
    const drain = await drainInto(mosquitto, dir, portB, MOSQUITTO_BRIDGE_CLIENT_ID, '#', a.pid)
    return { ...drain, fillRate: filled.rate, sourceRssBytes, backlogZeroMs: null }
  } catch (err) {
    throw new Error(`${(err as Error).message}\nmosquitto A stderr (tail):\n${a.stderr().slice(-3000)}`)
  } finally {
    await a.stop()
    await dirs.remove(dir)
  }
}

const k = (n: number): string => `${round(n / 1000, 1)} k`
const r2 = (n: number): number => round(n, 2)

function describe (who: string, r: number, x: RoundResult): void {
  const perSecond = Number.isNaN(x.peakSecondRate) ? '' : `; 1-s rates ${k(x.lowSecondRate)}–${k(x.peakSecondRate)}`
  info(`round ${r + 1}/${ROUNDS} ${who}: ${k(x.rate)} msgs/s (${round(x.connectToLastMs / 1000, 2)} s from the bridge's CONNECT, ` +
    `first message after ${round(x.connectToFirstMs, 1)} ms${perSecond}); ` +
    `cores: source ${r2(x.sourceCores)}, upstream ${r2(x.upstreamCores)}, subscriber ${r2(x.subscriberCores)}; ` +
    `source syscalls per record: ${r2(x.sourceWritesPerRecord)} writes, ${r2(x.sourceReadsPerRecord)} reads; ` +
    `fill ${k(x.fillRate)} msgs/s, source RSS with the backlog ${Math.round(x.sourceRssBytes / 2 ** 20)} MiB` +
    (x.backlogZeroMs === null ? '' : `; backlog 0 in /v1/bridge ${Math.round(x.backlogZeroMs)} ms after the last message`) +
    (x.extra === 0 ? '' : `; ${x.extra} extra messages`))
}

async function figures (mosquitto: string, version: string): Promise<void> {
  const results = new Map<string, RoundResult[]>([['mosquitto', []], ...contenders.map((c): [string, RoundResult[]] => [c.key, []])])
  const keys = [...results.keys()]
  for (let r = 0; r < ROUNDS; r++) {
    for (const key of r % 2 === 0 ? keys : [...keys].reverse()) {
      const c = contenders.find((x) => x.key === key)
      const x = c === undefined ? await mosquittoRound(mosquitto) : await edgemqRound(mosquitto, c.variant, [], c.bin)
      results.get(key)?.push(x)
      describe(c === undefined ? 'mosquitto' : `edgemq ${key}`, r, x)
    }
  }
  const rates = (key: string): number[] => (results.get(key) ?? []).map((x) => x.rate)
  const m = results.get('mosquitto') as RoundResult[]
  for (const { key, variant, bin } of contenders) {
    const e = results.get(key) as RoundResult[]
    const params: Record<string, ParamValue> = {
      edgemq: bin ?? 'this checkout',
      variant: variant === 'plain' ? 'edgemq dedupeId none: the records\' own topics, like Mosquitto\'s bridge' : 'edgemq dedupeId topic-prefix (its 3.1.1 default): $dedupe/<id>/<topic>, subscriber on $dedupe/#',
      records: RECORDS, payloadBytes: PAYLOAD_BYTES, devices: DEVICES, partitions: PARTITIONS, fill: FILL === 'mqtt' ? 'QoS 1 over MQTT while the upstream is down, 10 connections x 100 in flight' : 'store API into the data dir (edgemq); MQTT (Mosquitto)',
      inflight: WINDOW, durability: 'sync', mosquitto: version, mosquittoSource: SOURCE_CONFIG, upstream: UPSTREAM_CONFIG,
      counted: 'from the bridge\'s CONNECT at the upstream to the last of the records at a QoS 1 subscriber on the upstream',
      statistic: 'median of rounds', rounds: ROUNDS, target: '>= 1.0x',
      edgemqRounds: rates(key).map(Math.round), mosquittoRounds: rates('mosquitto').map(Math.round),
      roundRatios: e.map((x, i) => r2(x.rate / (m[i] as RoundResult).rate)),
      edgemqSeconds: e.map((x) => r2(x.connectToLastMs / 1000)), mosquittoSeconds: m.map((x) => r2(x.connectToLastMs / 1000)),
      edgemqCores: e.map((x) => r2(x.sourceCores)), mosquittoSourceCores: m.map((x) => r2(x.sourceCores)),
      upstreamCoresEdgemq: e.map((x) => r2(x.upstreamCores)), upstreamCoresMosquitto: m.map((x) => r2(x.upstreamCores)),
      subscriberCores: [...e, ...m].map((x) => r2(x.subscriberCores)),
      edgemqWritesPerRecord: e.map((x) => r2(x.sourceWritesPerRecord)), mosquittoWritesPerRecord: m.map((x) => r2(x.sourceWritesPerRecord)),
      edgemqReadsPerRecord: e.map((x) => r2(x.sourceReadsPerRecord)), mosquittoReadsPerRecord: m.map((x) => r2(x.sourceReadsPerRecord)),
      edgemqFillRates: e.map((x) => Math.round(x.fillRate)), mosquittoFillRates: m.map((x) => Math.round(x.fillRate)),
      edgemqRssMiB: e.map((x) => Math.round(x.sourceRssBytes / 2 ** 20)), mosquittoSourceRssMiB: m.map((x) => Math.round(x.sourceRssBytes / 2 ** 20)),
      edgemqBacklogZeroMs: e.map((x) => Math.round(x.backlogZeroMs ?? NaN)),
      extraMessages: [...e, ...m].map((x) => x.extra),
      loadAverage: os.loadavg().map((l) => r2(l)),
    }
    report({
      bench: `bridge.drain.${variant}${key === variant ? '' : '.compare'}`,
      unit: 'msgs/s',
      value: median(rates(key)),
      baseline: `Mosquitto ${version} bridge A -> B draining the same backlog`,
      baselineValue: median(rates('mosquitto')),
      better: 'higher',
      params,
    })
  }
}

async function profile (mosquitto: string): Promise<void> {
  const profileDir = flag('profile-dir') ?? await mkdtemp(path.join(os.tmpdir(), 'edgemq-bench-profile-'))
  await mkdir(profileDir, { recursive: true })
  const variant = variants[0] as Variant
  const x = await edgemqRound(mosquitto, variant, ['--cpu-prof', '--cpu-prof-dir', profileDir])
  describe(`edgemq ${variant} (profiled)`, 0, x)
  const files = (await readdir(profileDir)).filter((f) => f.endsWith('.cpuprofile')).sort()
  const main = files.find((f) => f.includes(`.${x.pid}.0.`)) ?? files[0]
  if (main === undefined) throw new Error(`no .cpuprofile in ${profileDir}`)
  const file = path.join(profileDir, main)
  const ours = new Set(['bridge/**/*.ts', 'store/**/*.ts', 'gateway/**/*.ts', 'mqtt', 'mqtt-packet'])
  process.stderr.write(`${formatProfileSummary(await summarizeCpuProfile(file, x.window), 30, ours)}\n`)
  info(`profile kept at ${file} (open it in Chrome DevTools > Performance, or speedscope)`)
}

/**
 * `--check-upstream`: the fill publisher straight into the upstream, with
 * the subscriber counting: how fast the last hop (the same for both
 * bridges) goes on its own, to show it is not what the figures measure.
 */
async function checkUpstream (mosquitto: string): Promise<void> {
  const dir = await dirs.make('upstream-check')
  const port = await freePort()
  const upstream = await startMosquittoWithConfig(mosquitto, dir, port, upstreamConfig(port))
  let sub: CountingSubscriber | undefined
  try {
    sub = await CountingSubscriber.subscribe({ host: upstream.host, port, clientId: 'bench-subscriber', filter: '#', qos: 1 })
    const cpu0 = processCpuSeconds(upstream.pid) ?? NaN
    const t0 = performance.now()
    const done = sub.waitFor(RECORDS, STALL_MS)
    const filled = await fill({ host: upstream.host, port, messages: RECORDS, connections: FILL_CONNECTIONS, devicesPerConnection: DEVICES / FILL_CONNECTIONS, payloadBytes: PAYLOAD_BYTES, window: FILL_WINDOW })
    await done
    const seconds = (sub.lastAt - t0) / 1000
    info(`upstream check: ${k(RECORDS / seconds)} msgs/s from ${FILL_CONNECTIONS} publishers (${FILL_WINDOW} in flight each) through the upstream to the subscriber ` +
      `(publishers acked at ${k(filled.rate)} msgs/s); upstream ${r2(((processCpuSeconds(upstream.pid) ?? NaN) - cpu0) / seconds)} cores`)
  } finally {
    await sub?.close()
    await upstream.stop()
  }
}

async function main (): Promise<number> {
  const mosquitto = findMosquitto(flag('mosquitto'))
  if (mosquitto === null) {
    const where = flag('mosquitto') === undefined ? 'looked on PATH, in /usr/sbin and /usr/local/sbin' : `no executable at ${flag('mosquitto')}`
    process.stderr.write(`[bench] bridge: mosquitto not found (${where}). Every figure of this bench needs it: as the upstream, and as the baseline's two brokers. ` +
      'Install it (`apt-get install mosquitto`) or pass --mosquitto=/path/to/mosquitto.\n')
    return 1
  }
  const t0 = performance.now()
  try {
    if (PROFILE) {
      await profile(mosquitto)
    } else if (argv.includes('--check-upstream')) {
      await checkUpstream(mosquitto)
    } else {
      const version = mosquittoVersion(mosquitto)
      info(`bridge bench: drain ${RECORDS} records (${PAYLOAD_BYTES} B) to a Mosquitto ${version} upstream, edgemq (${variants.join(', ')}) vs Mosquitto's bridge; ` +
        `${ROUNDS} rounds, ${WINDOW} in flight, fill via ${FILL}; node ${process.version}, ${os.cpus().length} cpus, load ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`)
      await figures(mosquitto, version)
    }
  } finally {
    await dirs.cleanup()
  }
  info(`bridge bench done in ${round((performance.now() - t0) / 1000, 1)} s`)
  return 0
}

process.exitCode = await main()
