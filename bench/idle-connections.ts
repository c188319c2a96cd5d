/**
 * `npm run bench -- idle-connections`: what an idle device connection costs
 * in resident memory, edgemq against Mosquitto in the same run. One JSON
 * line per figure on stdout (see lib/report.ts); progress on stderr.
 *
 * Each broker is a child process on a free loopback port. This process opens
 * `--connections` (default 10,000) idle MQTT 3.1.1 clean-session connections
 * to it (lib/idle-clients.ts: plain sockets, one CONNECT each, then only a
 * PINGREQ every half keep-alive), and reads the broker's VmRSS from
 * /proc/<pid>/status with WARMUP_CONNECTIONS open, with half of the
 * connections open and with all of them, each once the broker has settled
 * (see settledRss); edgemq right after two full, compacting garbage
 * collections (lib/gc-on-signal.mjs, EDGEMQ_MEASURE_FLAGS), so the garbage of
 * the CONNECT burst, which V8 frees and compacts at a time of its own choosing
 * (its memory reducer, some 30-60 s after the burst), does not count; the RSS
 * it settles at before them is reported beside it.
 *
 * Beside it, **what a user sees**: edgemq started as a user starts it (no flags, nothing forced), RSS with the
 * warm-up connections once settled, with the first half once settled (see userSettledRss), and with all of them at
 * each of `--ages` (default 0,10,30,90 s) after the last CONNACK (`idle-connections.rss-per-connection-after-<age>s`)
 * and once settled again (`idle-connections.rss-per-connection-settled`, the figure to hold against the 5 KB);
 * Mosquitto the same way (its settled figure is the baseline of the forced figure too). edgemq's /metrics is read
 * only while it settles (for the size of V8's young generation, at most once per 12 quiet seconds) and right after
 * each settled reading (V8's heap used), never between the burst and the readings at `--ages`.
 * `--user-only` / `--forced-only` run one of the two edgemq views.
 *
 * Why the ages differ (measured 2026-12-02 with --trace-gc): RSS holds V8's young generation, which V8 sizes by
 * itself: it grows to 32 MB (two 16 MB semi-spaces) under the burst of CONNECTs and shrinks to about 1 MB only when
 * V8's memory reducer runs, 8 s after the gateway's own compaction (burst-compaction.ts, 5 s after the last
 * CONNECT), so some 13-15 s after the last CONNACK on a quiet machine, later on a loaded one. Read at 0 or 10 s, the second half's figure
 * carries those 31 MB (6.2 KB per connection of a 5,000 half) beside the first half read after its shrink: the
 * 9-11 KB that runs showed at 10 s. That memory is not per connection: it is V8's, back once allocation slows.
 *
 * The figure is the second half's cost: (RSS with all - RSS with half) /
 * (connections / 2), what one more connection costs once the broker's fixed
 * costs are paid. In edgemq these are large and would otherwise be spread
 * over the connections: V8's young generation (32 MB, touched by the first
 * burst of allocation, whatever causes it), code compiled on first use, and
 * mqtt-packet's 6 MB cache of packet-id buffers built on the first CONNACK.
 * The growth from WARMUP_CONNECTIONS to all, per connection, is reported too.
 *
 * edgemq runs as `edgemq start --config <file>` set up like a site with
 * devices: one device user per connection in tenant `site` (client id =
 * username, as device users are bound), the default routes, mqtt.maxConnections
 * above the count. Every CONNECT goes through authentication and the client-id
 * binding as a device's does. The users' scrypt hashes are made with N = 16
 * instead of `edgemq passwd`'s 16,384 so 10,000 logins take seconds, not
 * minutes; that changes the time of a login, not what a connection keeps.
 * Mosquitto: anonymous, `persistence false` (lib/brokers.ts).
 *
 * Both brokers inherit this process's open-file limit, and this process holds
 * the client sockets. When the soft limit is below the count plus a margin,
 * the bench runs itself again under `ulimit -n <needed>` if the hard limit
 * allows it, and otherwise refuses to start with a message.
 *
 * Arguments: `--connections=N`, `--quick` (1,000 connections), `--rounds=N`
 * (default 1: memory is not noisy like throughput), `--mosquitto=PATH`,
 * `--edgemq=PATH` (another checkout's gateway/edgemq.mjs),
 * `--heap-snapshot[=DIR]`: instead of the figures, run edgemq alone, write a
 * heap snapshot with WARMUP_CONNECTIONS and one with all (kept in DIR or
 * a temp directory) and print what the connections added, by constructor
 * (lib/heap-snapshot.ts).
 */
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { mkdtemp, readdir, writeFile } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { hashPassword } from '../gateway/access/auth.ts'
import { fileURLToPath } from 'node:url'
import { findMosquitto, mosquittoVersion, processRssBytes, startEdgemq, startMosquitto, withBrokerIn, type RunningBroker } from './lib/brokers.ts'
import { diffHeapSummaries, formatHeapDiff, summarizeHeapSnapshot } from './lib/heap-snapshot.ts'
import { IdleClients, type IdleLogin } from './lib/idle-clients.ts'
import { TempDirs, info, median, report, round } from './lib/report.ts'
import { argv, flag, intFlag } from './lib/flags.ts'

const QUICK = argv.includes('--quick')
const CONNECTIONS = intFlag('connections', QUICK ? 1000 : 10_000)
const ROUNDS = intFlag('rounds', 1)
const HEAP_SNAPSHOT = argv.some((a) => a === '--heap-snapshot' || a.startsWith('--heap-snapshot='))
const EDGEMQ_BIN = flag('edgemq') === undefined ? undefined : path.resolve(flag('edgemq') as string)
const KEEPALIVE_SECONDS = 60
const WARMUP_CONNECTIONS = 10
const HALF = Math.floor(CONNECTIONS / 2)
const TENANT = 'site'
const PASSWORD = 'device-secret'
const TARGET = '<= 5 KB per idle connection (issue 13)'
/** Seconds after the last CONNACK at which the user view reads RSS (`--ages=0,10,30,90`), ascending. */
const AGES_SECONDS: readonly number[] = (flag('ages') ?? '0,10,30,90').split(',').map(Number)
if (AGES_SECONDS.some((a, i) => !Number.isFinite(a) || a < 0 || a > 600 || (i > 0 && a <= (AGES_SECONDS[i - 1] as number)))) {
  throw new Error('--ages must be ascending seconds between 0 and 600, comma-separated')
}
/** `--forced-only` / `--user-only`: measure one of the two edgemq views (both by default). */
const FORCED_ONLY = argv.includes('--forced-only')
const USER_ONLY = argv.includes('--user-only')
/** File descriptors this process and each broker need besides the connections (listeners, LevelDB, stdio). */
const FD_MARGIN = 500

const GC_PRELOAD = fileURLToPath(new URL('./lib/gc-on-signal.mjs', import.meta.url))
/**
 * Node flags of the measured edgemq: the forced GCs compact the heap, as V8's memory reducer does on its own once
 * a process idles (a plain full GC leaves pages half full of the CONNECT burst's garbage, and RSS then varied from
 * 6 to 13 KB per connection between identical rounds).
 */
const EDGEMQ_MEASURE_FLAGS = ['--expose-gc', '--compact-on-every-full-gc', '--import', GC_PRELOAD]
const dirs = new TempDirs()
const deviceId = (i: number): string => `dev-${String(i).padStart(5, '0')}`

/** The soft open-file limit of this process (brokers inherit it); undefined off Linux. */
function openFileLimit (which: 'soft' | 'hard' = 'soft'): number | undefined {
  try {
    const m = /^Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'))
    const value = m?.[which === 'soft' ? 1 : 2]
    return value === undefined ? undefined : value === 'unlimited' ? Infinity : Number(value)
  } catch {
    return undefined
  }
}

/**
 * Runs this bench again under `sh -c 'ulimit -n <needed>'` (the soft limit may be raised up to the hard one; Node
 * cannot raise its own) and resolves with its exit code; the brokers it starts inherit the raised limit.
 */
function rerunWithFileLimit (needed: number): Promise<number> {
  const args = [...process.execArgv, fileURLToPath(import.meta.url), ...argv]
  const child = spawn('/bin/sh', ['-c', `ulimit -n ${needed} && exec "$0" "$@"`, process.execPath, ...args], {
    stdio: 'inherit', env: { ...process.env, EDGEMQ_BENCH_FILE_LIMIT_RAISED: '1' },
  })
  return new Promise((resolve) => child.once('exit', (code) => resolve(code ?? 1)))
}

async function edgemqConfig (dir: string): Promise<string> {
  const users = []
  const total = CONNECTIONS + WARMUP_CONNECTIONS
  for (let i = 0; i < total; i += 500) {
    users.push(...await Promise.all(Array.from({ length: Math.min(500, total - i) }, async (_v, k) => ({
      username: deviceId(i + k), password: await hashPassword(PASSWORD, { N: 16, r: 1, p: 1 }), tenant: TENANT, role: 'device',
    }))))
  }
  const file = path.join(dir, 'edgemq-idle.json')
  await writeFile(file, JSON.stringify({
    tenants: [TENANT],
    routes: [{ filter: 'devices/+/telemetry/#', stream: 'telemetry', keyLevel: 1 }],
    mqtt: { maxConnections: CONNECTIONS + WARMUP_CONNECTIONS + 100, listeners: [{ type: 'tcp', host: '127.0.0.1', port: 0 }] },
    users,
  }))
  return file
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

/**
 * VmRSS once it stops moving: sampled every 500 ms, settled when four samples in a row lie within 0.5 % of each
 * other (V8 finishes sweeping and its memory reducer runs a GC a few seconds after a burst of allocation), at
 * most `maxMs`. Returns the last sample.
 */
async function settledRss (pid: number, maxMs = 20_000): Promise<number> {
  const samples: number[] = []
  const until = Date.now() + maxMs
  for (;;) {
    const rss = processRssBytes(pid)
    if (rss === undefined) throw new Error(`cannot read VmRSS of pid ${pid} (/proc/${pid}/status)`)
    samples.push(rss)
    const last = samples.slice(-4)
    if (last.length === 4 && Math.max(...last) - Math.min(...last) <= 0.005 * Math.max(...last)) return rss
    if (Date.now() > until) return rss
    await sleep(500)
  }
}

/**
 * userSettledRss: RSS must not move by more than USER_SETTLE_BAND over this long, longer than the 8 s V8's memory
 * reducer waits.
 */
const USER_SETTLE_QUIET_MS = 12_000
/**
 * A fraction of RSS: 10,000 devices pinging keep about 1 MB moving in the young generation, more than 0.5 % of a
 * 170 MB gateway (with 0.5 % the gateway never settled within 150 s in a run at 15:30).
 */
const USER_SETTLE_BAND = 0.01
/** userSettledRss reads no earlier than this after the last CONNACK (the gateway compacts 5 s after the burst). */
const USER_SETTLE_MIN_MS = 20_000
/** userSettledRss gives up waiting after this long, and says so. */
const USER_SETTLE_MAX_MS = 150_000
/**
 * userSettledRss, edgemq: V8's young generation once its memory reducer has shrunk it. V8 shrinks it to twice what
 * survives, at least 1 MB (1-4 MB here with 10,000 idle devices); grown by a burst, it is 16 or 32 MB.
 */
const YOUNG_GENERATION_SHRUNK_BYTES = 8 * 1048576

/**
 * RSS as a user reads it once the gateway is done with a burst: at least USER_SETTLE_MIN_MS after `since` (the last
 * CONNACK, performance.now() time) and once a second's samples have stayed within USER_SETTLE_BAND for USER_SETTLE_QUIET_MS, so
 * that the gateway's compaction is behind it; for edgemq also once V8's memory reducer has given the young generation
 * back (`youngGeneration`, read from /metrics only then, at most once per quiet period: RSS can sit still for more than
 * 12 s with a grown one on a loaded machine, where the reducer waits for a quieter moment); at most USER_SETTLE_MAX_MS
 * after `since`. Returns the last sample, when it was read, and whether it had settled.
 */
async function userSettledRss (pid: number, since: number, youngGeneration?: () => Promise<number>):
Promise<{ readonly rss: number, readonly seconds: number, readonly settled: boolean }> {
  let samples: Array<{ at: number, rss: number }> = []
  for (;;) {
    const rss = processRssBytes(pid)
    if (rss === undefined) throw new Error(`cannot read VmRSS of pid ${pid} (/proc/${pid}/status)`)
    const at = performance.now()
    samples.push({ at, rss })
    samples = samples.filter((x) => x.at >= at - USER_SETTLE_QUIET_MS - 1000)
    const quiet = samples.filter((x) => x.at >= at - USER_SETTLE_QUIET_MS)
    let steady = (samples[0]?.at ?? at) <= at - USER_SETTLE_QUIET_MS &&
      Math.max(...quiet.map((x) => x.rss)) - Math.min(...quiet.map((x) => x.rss)) <= USER_SETTLE_BAND * rss
    if (steady && at - since >= USER_SETTLE_MIN_MS && youngGeneration !== undefined && await youngGeneration() > YOUNG_GENERATION_SHRUNK_BYTES) {
      steady = false
      samples = [] // the scrape's own garbage: a new quiet period before the next look
    }
    if ((at - since >= USER_SETTLE_MIN_MS && steady) || at - since >= USER_SETTLE_MAX_MS) {
      return { rss, seconds: (at - since) / 1000, settled: steady }
    }
    await sleep(1000)
  }
}

interface MemoryFigures {
  readonly rssBefore: number
  /** With the first half of the connections open. */
  readonly rssHalf: number
  readonly rssAfter: number
  /** edgemq: RSS settled after the connections, before the forced garbage collections. */
  readonly rssAfterNoGc: number
  /** edgemq only: its /metrics (V8 heap used and committed, external memory: Buffers, ArrayBuffers), at half and after. */
  readonly before?: NodeMemory
  readonly after?: NodeMemory
  readonly connectSeconds: number
}

interface NodeMemory {
  readonly heapUsed: number
  /** Committed by V8 for its heap, all spaces. */
  readonly heapTotal: number
  /** Committed for the young generation (new space): it grows under a burst of allocation, such as many CONNECTs. */
  readonly newSpace: number
  readonly external: number
}

async function nodeMemory (httpUrl: string): Promise<NodeMemory> {
  let text: string | undefined
  // The gateway may be busy for seconds in a forced compacting GC on a loaded machine: a few tries before giving up.
  for (let attempt = 1; text === undefined; attempt++) {
    try {
      text = await (await fetch(`${httpUrl}/metrics`)).text()
    } catch (err) {
      if (attempt === 5) throw new Error(`GET ${httpUrl}/metrics: ${String((err as Error).cause ?? err)}`, { cause: err })
      await sleep(2000)
    }
  }
  const value = (name: string): number => Number(new RegExp(`^${name} (\\S+)`, 'm').exec(text)?.[1] ?? NaN)
  return {
    heapUsed: value('nodejs_heap_size_used_bytes'), heapTotal: value('nodejs_heap_size_total_bytes'),
    newSpace: value('nodejs_heap_space_size_total_bytes\\{space="new"\\}'), external: value('nodejs_external_memory_bytes'),
  }
}

function login (broker: RunningBroker): (i: number) => IdleLogin {
  return broker.name === 'edgemq'
    ? (i) => ({ clientId: deviceId(i), username: deviceId(i), password: PASSWORD })
    : (i) => ({ clientId: deviceId(i) })
}

function openClients (clients: IdleClients, broker: RunningBroker, from: number, count: number): Promise<void> {
  const logins = login(broker)
  return clients.open({
    host: broker.host, port: broker.port, count, login: (i) => logins(from + i), keepalive: KEEPALIVE_SECONDS, concurrency: 100, connectTimeoutMs: 30_000,
  })
}

/** edgemq: two full garbage collections (SIGUSR2 to lib/gc-on-signal.mjs), done once /metrics answers again. */
async function collectGarbage (broker: RunningBroker): Promise<void> {
  if (broker.httpUrl === undefined) return
  process.kill(broker.pid, 'SIGUSR2')
  await nodeMemory(broker.httpUrl)
}

async function measure (broker: RunningBroker): Promise<MemoryFigures> {
  const warm = new IdleClients()
  const clients = new IdleClients()
  try {
    await openClients(warm, broker, CONNECTIONS, WARMUP_CONNECTIONS)
    await settledRss(broker.pid)
    await collectGarbage(broker)
    const rssBefore = await settledRss(broker.pid)
    const t0 = performance.now()
    await openClients(clients, broker, 0, HALF)
    await settledRss(broker.pid)
    await collectGarbage(broker)
    const rssHalf = await settledRss(broker.pid)
    const half = broker.httpUrl === undefined ? undefined : await nodeMemory(broker.httpUrl)
    await openClients(clients, broker, HALF, CONNECTIONS - HALF)
    const connectSeconds = (performance.now() - t0) / 1000
    const rssAfterNoGc = await settledRss(broker.pid)
    await collectGarbage(broker)
    const rssAfter = await settledRss(broker.pid)
    const after = broker.httpUrl === undefined ? undefined : await nodeMemory(broker.httpUrl)
    if (clients.dropped + warm.dropped > 0) throw new Error(`${broker.name} closed ${clients.dropped + warm.dropped} idle connections`)
    return { rssBefore, rssHalf, rssAfter, rssAfterNoGc, connectSeconds, ...(half === undefined || after === undefined ? {} : { before: half, after }) }
  } finally {
    clients.close()
    warm.close()
  }
}

/** What a user sees: VmRSS read from /proc at fixed ages after the last CONNACK and once settled, nothing forced. */
interface UserView {
  /** With WARMUP_CONNECTIONS open, settled. */
  readonly rssWarm: number
  /** With the first half open, settled (userSettledRss). */
  readonly rssHalf: number
  /** With all connections open, at each of AGES_SECONDS after the last CONNACK. */
  readonly rssAt: readonly number[]
  /** With all connections open, settled after the ages. */
  readonly rssSettled: number
  /** Seconds after the last CONNACK at which each settled reading was taken, and whether RSS had settled by then. */
  readonly settleSeconds: readonly [number, number]
  readonly unsettled: boolean
  /** edgemq only: /metrics right after each settled reading (half, all). */
  readonly half?: NodeMemory
  readonly all?: NodeMemory
  readonly connectSeconds: number
}

/** Waits until `ms` after `since` (performance.now() time); no wait if that is past. */
const sleepUntil = (since: number, ms: number): Promise<void> => sleep(Math.max(0, since + ms - performance.now()))

/**
 * The broker as a user runs it: no forced garbage collection, no flags, nothing scraped before a reading. RSS with
 * the warm-up connections once settled; with the first half once settled (userSettledRss); with all of them, at every
 * age after the last CONNACK (the first age is normally 0: what `ps` shows the moment the burst is over), then once
 * settled. edgemq's /metrics is read right after each settled reading.
 */
async function measureAsUser (broker: RunningBroker): Promise<UserView> {
  const warm = new IdleClients()
  const clients = new IdleClients()
  const rss = (): number => {
    const value = processRssBytes(broker.pid)
    if (value === undefined) throw new Error(`cannot read VmRSS of pid ${broker.pid} (/proc/${broker.pid}/status)`)
    return value
  }
  try {
    await openClients(warm, broker, CONNECTIONS, WARMUP_CONNECTIONS)
    const rssWarm = await settledRss(broker.pid)
    const t0 = performance.now()
    await openClients(clients, broker, 0, HALF)
    const halfDone = performance.now()
    const young = broker.httpUrl === undefined ? undefined : async (): Promise<number> => (await nodeMemory(broker.httpUrl as string)).newSpace
    const half = await userSettledRss(broker.pid, halfDone, young)
    const halfMemory = broker.httpUrl === undefined ? undefined : await nodeMemory(broker.httpUrl)
    const t1 = performance.now()
    await openClients(clients, broker, HALF, CONNECTIONS - HALF)
    const done = performance.now()
    const rssAt: number[] = []
    for (const age of AGES_SECONDS) {
      await sleepUntil(done, age * 1000)
      rssAt.push(rss())
    }
    const all = await userSettledRss(broker.pid, done, young)
    const allMemory = broker.httpUrl === undefined ? undefined : await nodeMemory(broker.httpUrl)
    if (clients.dropped + warm.dropped > 0) throw new Error(`${broker.name} closed ${clients.dropped + warm.dropped} idle connections`)
    return {
      rssWarm, rssHalf: half.rss, rssAt, rssSettled: all.rss, settleSeconds: [half.seconds, all.seconds], unsettled: !half.settled || !all.settled,
      ...(halfMemory === undefined || allMemory === undefined ? {} : { half: halfMemory, all: allMemory }),
      connectSeconds: (halfDone - t0 + done - t1) / 1000,
    }
  } finally {
    clients.close()
    warm.close()
  }
}

async function withBroker<T> (name: 'edgemq' | 'mosquitto', mosquitto: string, nodeFlags: readonly string[],
  fn: (broker: RunningBroker) => Promise<T>): Promise<T> {
  return await withBrokerIn(dirs, name, async (dir) => name === 'edgemq'
    ? await startEdgemq(dir, nodeFlags, EDGEMQ_BIN, ['--config', await edgemqConfig(dir)])
    : await startMosquitto(mosquitto, dir), fn)
}

const kb = (bytes: number): number => round(bytes / 1024, 2)
const perConnection = (after: number | undefined, before: number | undefined, connections = CONNECTIONS): number =>
  kb(((after ?? NaN) - (before ?? NaN)) / connections)
/** Per connection of the second half: what one more connection costs once the broker's fixed costs are paid. */
const marginal = (after: number | undefined, half: number | undefined): number => perConnection(after, half, CONNECTIONS - HALF)

/** Sends SIGUSR2 (node --heapsnapshot-signal) and waits for the snapshot file, written once /metrics answers again. */
async function snapshot (broker: RunningBroker, dir: string): Promise<string> {
  const had = new Set(await readdir(dir))
  process.kill(broker.pid, 'SIGUSR2')
  for (;;) {
    await sleep(500)
    const file = (await readdir(dir)).find((f) => f.endsWith('.heapsnapshot') && !had.has(f))
    // The snapshot is written on the main thread: an answer from /metrics means it is complete.
    if (file !== undefined) { await nodeMemory(broker.httpUrl as string); return path.join(dir, file) }
  }
}

async function heapSnapshots (): Promise<void> {
  const dir = flag('heap-snapshot') ?? await mkdtemp(path.join(os.tmpdir(), 'edgemq-bench-heap-'))
  await withBroker('edgemq', '', ['--heapsnapshot-signal=SIGUSR2', `--diagnostic-dir=${dir}`], async (broker) => {
    const warm = new IdleClients()
    const clients = new IdleClients()
    try {
      await openClients(warm, broker, CONNECTIONS, WARMUP_CONNECTIONS)
      await settledRss(broker.pid)
      const empty = await snapshot(broker, dir)
      const rss0 = processRssBytes(broker.pid) ?? NaN
      await openClients(clients, broker, 0, CONNECTIONS)
      await settledRss(broker.pid)
      const full = await snapshot(broker, dir)
      const rss1 = processRssBytes(broker.pid) ?? NaN
      info(`heap snapshots: ${empty} (${WARMUP_CONNECTIONS} connections), ${full} (${CONNECTIONS} more); ` +
        `RSS after each snapshot's GC: ${kb(rss0)} KB, ${kb(rss1)} KB ` +
        `(${perConnection(rss1, rss0)} KB per connection)`)
      const diff = diffHeapSummaries(await summarizeHeapSnapshot(empty), await summarizeHeapSnapshot(full))
      process.stderr.write(`${formatHeapDiff(diff, CONNECTIONS)}\n`)
    } finally {
      clients.close()
      warm.close()
    }
  })
}

async function main (): Promise<number> {
  const limit = openFileLimit()
  const needed = CONNECTIONS + WARMUP_CONNECTIONS + FD_MARGIN
  if (limit !== undefined && limit < needed && (openFileLimit('hard') ?? 0) >= needed && process.env.EDGEMQ_BENCH_FILE_LIMIT_RAISED === undefined) {
    info(`open-file limit ${limit} is below ${needed}: running again with \`ulimit -n ${needed}\``)
    return await rerunWithFileLimit(needed)
  }
  if (limit !== undefined && limit < needed) {
    process.stderr.write(`[bench] idle-connections: the open-file limit is ${limit} (hard ${openFileLimit('hard')}), below ${needed}. ` +
      `Raise the hard limit (\`ulimit -Hn ${needed}\` as root) or pass --connections=N.\n`)
    return 1
  }
  if (HEAP_SNAPSHOT) {
    await heapSnapshots()
    await dirs.cleanup()
    return 0
  }
  const mosquitto = findMosquitto(flag('mosquitto'))
  if (mosquitto === null) {
    process.stderr.write('[bench] idle-connections: mosquitto not found; it is the baseline. ' +
      'Install it (`apt-get install mosquitto`) or pass --mosquitto=PATH.\n')
    return 1
  }
  const version = mosquittoVersion(mosquitto)
  info(`idle-connections bench: ${CONNECTIONS} idle connections, edgemq vs mosquitto ${version}, node ${process.version}, ` +
    `${os.cpus().length} cpus, ${ROUNDS} round(s)`)
  const forced: MemoryFigures[] = []
  const users: Record<'edgemq' | 'mosquitto', UserView[]> = { edgemq: [], mosquitto: [] }
  const runs: Array<'forced' | 'edgemq' | 'mosquitto'> = [...(USER_ONLY ? [] : ['forced' as const]), ...(FORCED_ONLY ? [] : ['edgemq' as const]), 'mosquitto']
  try {
    for (let r = 0; r < ROUNDS; r++) {
      for (const run of r % 2 === 0 ? runs : [...runs].reverse()) {
        if (run === 'forced') {
          const m = await withBroker('edgemq', mosquitto, EDGEMQ_MEASURE_FLAGS, measure)
          forced.push(m)
          info(`round ${r + 1}/${ROUNDS} edgemq, forced GCs: RSS ${kb(m.rssBefore)} KB -> ${kb(m.rssHalf)} KB -> ${kb(m.rssAfter)} KB: ` +
            `${marginal(m.rssAfter, m.rssHalf)} KB per connection of the second half, ${perConnection(m.rssAfter, m.rssBefore)} KB over all` +
            ` (${marginal(m.rssAfterNoGc, m.rssHalf)} KB before the forced GC)` +
            (m.after === undefined ? '' : `; second half per connection: V8 heap used ${marginal(m.after.heapUsed, m.before?.heapUsed)} KB, ` +
              `committed ${marginal(m.after.heapTotal, m.before?.heapTotal)} KB (new space ${marginal(m.after.newSpace, m.before?.newSpace)} KB), ` +
              `external ${marginal(m.after.external, m.before?.external)} KB`) +
            `; ${CONNECTIONS} CONNECTs in ${round(m.connectSeconds, 1)} s`)
        } else {
          const u = await withBroker(run, mosquitto, [], measureAsUser)
          users[run].push(u)
          info(`round ${r + 1}/${ROUNDS} ${run} as a user sees it: RSS ${kb(u.rssWarm)} KB -> ${kb(u.rssHalf)} KB ` +
            `(half, settled at ${round(u.settleSeconds[0], 0)} s) -> ` +
            AGES_SECONDS.map((age, i) => `${kb(u.rssAt[i] ?? NaN)} KB at ${age} s`).join(', ') +
            `, ${kb(u.rssSettled)} KB settled at ${round(u.settleSeconds[1], 0)} s${u.unsettled ? ' (NOT settled: gave up waiting)' : ''}` +
            `; per connection of the second half: settled ${marginal(u.rssSettled, u.rssHalf)} KB, ` +
            AGES_SECONDS.map((age, i) => `${marginal(u.rssAt[i], u.rssHalf)} KB at ${age} s`).join(', ') +
            (u.all === undefined ? '' : ` (settled: V8 heap used ${marginal(u.all.heapUsed, u.half?.heapUsed)} KB; young generation ` +
              `${round((u.half?.newSpace ?? NaN) / 1048576, 1)} -> ${round(u.all.newSpace / 1048576, 1)} MB)`) +
            `; 10 -> all: settled ${perConnection(u.rssSettled, u.rssWarm)} KB, ` +
            AGES_SECONDS.map((age, i) => `${perConnection(u.rssAt[i], u.rssWarm)} KB at ${age} s`).join(', ') +
            `; ${CONNECTIONS} CONNECTs in ${round(u.connectSeconds, 1)} s`)
        }
      }
    }
  } finally {
    await dirs.cleanup()
  }
  const baseline = `Mosquitto ${version}, persistence false, the same idle connections (anonymous)`
  const common = {
    connections: CONNECTIONS, keepaliveSeconds: KEEPALIVE_SECONDS, protocol: 'MQTT 3.1.1, clean session', rounds: ROUNDS, statistic: 'median of rounds',
    edgemqSetup: `${CONNECTIONS} device users in tenant ${TENANT} (client id = username), default telemetry route, TCP listener`,
    target: TARGET, warmupConnections: WARMUP_CONNECTIONS,
  }
  /** Mosquitto does not collect garbage: its settled user view is its figure for both views. */
  const mosquittoPer = users.mosquitto.map((u) => marginal(u.rssSettled, u.rssHalf))
  const mosquittoOverAll = users.mosquitto.map((u) => perConnection(u.rssSettled, u.rssWarm))
  if (forced.length > 0) {
    const per = forced.map((m) => marginal(m.rssAfter, m.rssHalf))
    report({
      bench: 'idle-connections.rss-per-connection',
      unit: 'KB',
      value: median(per),
      baseline,
      baselineValue: median(mosquittoPer),
      better: 'lower',
      params: {
        ...common,
        measured: `VmRSS with all connections minus VmRSS with the first half, divided by the second half (edgemqOverAll*: from ${WARMUP_CONNECTIONS} ` +
          'connections to all, divided by all)',
        edgemqRounds: per, mosquittoRounds: mosquittoPer,
        edgemqGc: 'two full compacting GCs (global.gc, --compact-on-every-full-gc) before each RSS reading',
        edgemqOverAllKbPerConnection: forced.map((m) => perConnection(m.rssAfter, m.rssBefore)), mosquittoOverAllKbPerConnection: mosquittoOverAll,
        edgemqNoGcKbPerConnection: forced.map((m) => marginal(m.rssAfterNoGc, m.rssHalf)),
        edgemqHeapUsedKbPerConnection: forced.map((m) => marginal(m.after?.heapUsed, m.before?.heapUsed)),
        edgemqHeapCommittedKbPerConnection: forced.map((m) => marginal(m.after?.heapTotal, m.before?.heapTotal)),
        edgemqNewSpaceKbPerConnection: forced.map((m) => marginal(m.after?.newSpace, m.before?.newSpace)),
        edgemqExternalKbPerConnection: forced.map((m) => marginal(m.after?.external, m.before?.external)),
        edgemqRssBeforeKb: forced.map((m) => kb(m.rssBefore)),
        edgemqConnectSeconds: forced.map((m) => round(m.connectSeconds, 1)),
      },
    })
  }
  if (users.edgemq.length > 0) {
    const mb = (bytes: number | undefined): number => round((bytes ?? NaN) / 1048576, 1)
    const settledPer = (name: 'edgemq' | 'mosquitto'): number[] => users[name].map((u) => marginal(u.rssSettled, u.rssHalf))
    report({
      bench: 'idle-connections.rss-per-connection-settled',
      unit: 'KB',
      value: median(settledPer('edgemq')),
      baseline,
      baselineValue: median(settledPer('mosquitto')),
      better: 'lower',
      params: {
        ...common,
        measured: 'as a user reads it, nothing forced: VmRSS with all connections minus VmRSS with the first half, each once settled ' +
          `(at least ${USER_SETTLE_MIN_MS / 1000} s after the last CONNACK and within ${USER_SETTLE_BAND * 100} % for ${USER_SETTLE_QUIET_MS / 1000} s, and for ` +
          'edgemq with V8\'s young generation shrunk again: the gateway\'s compaction and V8\'s memory reducer behind it), divided by the ' +
          'second half (OverAll: minus VmRSS with ' +
          `${WARMUP_CONNECTIONS} connections, divided by all)`,
        edgemqRounds: settledPer('edgemq'), mosquittoRounds: settledPer('mosquitto'),
        edgemqOverAllKbPerConnection: users.edgemq.map((u) => perConnection(u.rssSettled, u.rssWarm)),
        mosquittoOverAllKbPerConnection: users.mosquitto.map((u) => perConnection(u.rssSettled, u.rssWarm)),
        edgemqHeapUsedKbPerConnection: users.edgemq.map((u) => marginal(u.all?.heapUsed, u.half?.heapUsed)),
        edgemqYoungGenerationMbHalf: users.edgemq.map((u) => mb(u.half?.newSpace)),
        edgemqYoungGenerationMbAll: users.edgemq.map((u) => mb(u.all?.newSpace)),
        edgemqSettledAtSeconds: users.edgemq.flatMap((u) => u.settleSeconds.map((x) => round(x, 0))),
        edgemqUnsettledRounds: users.edgemq.filter((u) => u.unsettled).length,
      },
    })
    AGES_SECONDS.forEach((age, i) => {
      const per = (name: 'edgemq' | 'mosquitto'): number[] => users[name].map((u) => marginal(u.rssAt[i], u.rssHalf))
      const overAll = (name: 'edgemq' | 'mosquitto'): number[] => users[name].map((u) => perConnection(u.rssAt[i], u.rssWarm))
      report({
        bench: `idle-connections.rss-per-connection-after-${age}s`,
        unit: 'KB',
        value: median(per('edgemq')),
        baseline,
        baselineValue: median(per('mosquitto')),
        better: 'lower',
        params: {
          ...common,
          measured: `as a user reads it, nothing forced: VmRSS ${age} s after the last CONNACK minus VmRSS with the first half ` +
            `(once settled), divided by the second half (OverAll: minus VmRSS with ${WARMUP_CONNECTIONS} connections, divided by all). ` +
            'Before V8\'s memory reducer runs (some 13-15 s after the last CONNACK) RSS also holds the young generation the burst grew ' +
            '(up to 32 MB, not per connection)',
          edgemqRounds: per('edgemq'), mosquittoRounds: per('mosquitto'),
          edgemqOverAllKbPerConnection: overAll('edgemq'), mosquittoOverAllKbPerConnection: overAll('mosquitto'),
          edgemqRssWarmKb: users.edgemq.map((u) => kb(u.rssWarm)), mosquittoRssWarmKb: users.mosquitto.map((u) => kb(u.rssWarm)),
          edgemqConnectSeconds: users.edgemq.map((u) => round(u.connectSeconds, 1)),
          mosquittoConnectSeconds: users.mosquitto.map((u) => round(u.connectSeconds, 1)),
        },
      })
    })
  }
  return 0
}

process.exitCode = await main()
