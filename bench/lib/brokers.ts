/**
 * The brokers of the gateway bench, each a child process on a free port:
 * edgemq as a user runs it (`edgemq start`, default config, so `durability:
 * sync`), and Mosquitto with a temporary config (loopback listener,
 * anonymous clients, no persistence: its in-memory best case) as the
 * baseline. Also: CPU time of a process from /proc, and edgemq's ingest and
 * group-commit counters from /metrics.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { accessSync, constants, readFileSync } from 'node:fs'
import { writeFile } from 'node:fs/promises'
import net, { type AddressInfo } from 'node:net'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { info, type TempDirs } from './report.ts'

const EDGEMQ = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../gateway/edgemq.mjs')
const HOST = '127.0.0.1'
const STDERR_KEEP = 20_000

export interface RunningBroker {
  readonly name: 'edgemq' | 'mosquitto'
  readonly pid: number
  readonly host: string
  readonly port: number
  /** edgemq only: the HTTP base URL (for /metrics). */
  readonly httpUrl?: string
  /** The last few kilobytes the broker wrote on stderr. */
  stderr (): string
  /** SIGTERM, then SIGKILL if it has not exited after `graceMs`; resolves with the exit code. */
  stop (graceMs?: number): Promise<number | null>
}

/** Every broker still running; SIGKILLed if the bench exits early. */
const running = new Set<ChildProcess>()
process.once('exit', () => { for (const c of running) c.kill('SIGKILL') })

/** The mosquitto executable: `explicit` if given, else the first on PATH, /usr/sbin or /usr/local/sbin; null when none. */
export function findMosquitto (explicit?: string): string | null {
  const candidates = explicit !== undefined
    ? [explicit]
    : [...(process.env.PATH ?? '').split(path.delimiter).filter((d) => d !== ''), '/usr/sbin', '/usr/local/sbin'].map((d) => path.join(d, 'mosquitto'))
  for (const file of candidates) {
    try {
      accessSync(file, constants.X_OK)
      return file
    } catch {
      // not there; try the next one
    }
  }
  return null
}

export function mosquittoVersion (bin: string): string {
  const out = spawnSync(bin, ['-h'], { encoding: 'utf8' })
  return /mosquitto version (\S+)/.exec(`${out.stdout}${out.stderr}`)?.[1] ?? 'unknown'
}

/** A port that was free a moment ago (bound to port 0 and released). */
export async function freePort (): Promise<number> {
  const [port] = await freePorts(1)
  return port as number
}

/**
 * `count` distinct ports the OS picks on loopback, all held open together
 * until every one is known (picked one after another, a closed port can be
 * handed out again). Another process may still take one before its caller
 * listens there; callers that spawn servers retry on `address already in use`.
 */
export async function freePorts (count: number): Promise<number[]> {
  const servers: net.Server[] = []
  try {
    for (let i = 0; i < count; i++) {
      const server = net.createServer()
      servers.push(server)
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject)
        server.listen(0, HOST, () => resolve())
      })
    }
    return servers.map((s) => (s.address() as AddressInfo).port)
  } finally {
    await Promise.all(servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))))
  }
}

function track (child: ChildProcess): { stderr: () => string, exited: Promise<number | null> } {
  running.add(child)
  let tail = ''
  child.stderr?.on('data', (d: Buffer) => { tail = (tail + d.toString()).slice(-STDERR_KEEP) })
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => { running.delete(child); resolve(code) }))
  return { stderr: () => tail, exited }
}

function stopper (child: ChildProcess, exited: Promise<number | null>): (graceMs?: number) => Promise<number | null> {
  return async (graceMs = 15_000) => {
    if (child.exitCode !== null || child.signalCode !== null) return child.exitCode
    child.kill('SIGTERM')
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
    const code = await exited
    clearTimeout(timer)
    return code
  }
}

async function waitForPort (port: number, exited: Promise<number | null>, stderr: () => string, what: string, timeoutMs = 10_000): Promise<void> {
  let gone = false
  void exited.then(() => { gone = true })
  const until = Date.now() + timeoutMs
  for (;;) {
    if (gone) throw new Error(`${what} exited before it listened on port ${port}:\n${stderr()}`)
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host: HOST, port }, () => { s.destroy(); resolve(true) })
      s.once('error', () => resolve(false))
    })
    if (ok) return
    if (Date.now() > until) throw new Error(`${what} did not listen on port ${port} within ${timeoutMs} ms:\n${stderr()}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

/**
 * Mosquitto on a free loopback port, anonymous, `persistence false`; its
 * config goes into `dir`. Everything else stays at Mosquitto's defaults,
 * `set_tcp_nodelay false` included: with Nagle on, the PUBACKs of a window
 * of QoS 1 messages leave in few segments, and Mosquitto ran the qos1 load
 * about twice as fast as with `set_tcp_nodelay true` here (127 k against
 * 66 k msgs/s), while one-in-flight latency did not change. `extraConfig`
 * lines are appended (the replay bench lifts the queue limits).
 */
export async function startMosquitto (bin: string, dir: string, extraConfig: readonly string[] = []): Promise<RunningBroker> {
  const port = await freePort()
  const config = path.join(dir, 'mosquitto.conf')
  await writeFile(config, [
    `listener ${port} ${HOST}`,
    'allow_anonymous true',
    'persistence false',
    'log_dest stderr',
    'log_type error',
    'log_type warning',
    ...extraConfig,
    '',
  ].join('\n'), { mode: 0o644 })
  const child = spawn(bin, ['-c', config], { stdio: ['ignore', 'ignore', 'pipe'] })
  const { stderr, exited } = track(child)
  await waitForPort(port, exited, stderr, 'mosquitto')
  return { name: 'mosquitto', pid: child.pid ?? -1, host: HOST, port, stderr, stop: stopper(child, exited) }
}

/**
 * Mosquitto with the given config lines (the listener, logging to stderr
 * and anything else is up to the caller) on `port`, which must be free.
 * `onLine` sees every line Mosquitto writes on stderr as it arrives (the
 * bridge bench watches for "Connecting bridge" and "New client connected").
 * Resolves once the port accepts connections.
 */
export async function startMosquittoWithConfig (bin: string, dir: string, port: number, lines: readonly string[], onLine?: (line: string) => void): Promise<RunningBroker> {
  const config = path.join(dir, `mosquitto-${port}.conf`)
  await writeFile(config, `${lines.join('\n')}\n`, { mode: 0o644 })
  const child = spawn(bin, ['-c', config], { stdio: ['ignore', 'ignore', 'pipe'] })
  const { stderr, exited } = track(child)
  if (onLine !== undefined) {
    let partial = ''
    child.stderr?.on('data', (d: Buffer) => {
      const text = partial + d.toString()
      const parts = text.split('\n')
      partial = parts.pop() ?? ''
      for (const line of parts) onLine(line)
    })
  }
  await waitForPort(port, exited, stderr, `mosquitto (${config})`)
  return { name: 'mosquitto', pid: child.pid ?? -1, host: HOST, port, stderr, stop: stopper(child, exited) }
}

/**
 * `edgemq start` arguments for a config file of the embedded default with `mqtt.sessionInflight` set: a bench that
 * gives Mosquitto a window gives edgemq the same one, whatever the default of the checkout it runs.
 */
export async function sessionWindowArgs (dirs: TempDirs, sessionInflight: number): Promise<string[]> {
  const file = path.join(await dirs.make('edgemq-config'), 'edgemq.json')
  await writeFile(file, JSON.stringify({ mqtt: { sessionInflight } }))
  return ['--config', file]
}

/**
 * `edgemq start --data-dir <dataDir> --mqtt-port 0 --http-port 0` with the
 * embedded default config; `nodeFlags` go before the script (`--cpu-prof`).
 * `bin` is this checkout's gateway/edgemq.mjs unless another is given (to
 * compare a change against the same Mosquitto rounds). `startArgs` follow
 * the others (`['--config', file]`; the flags above still override the
 * file's data dir and ports).
 */
export async function startEdgemq (dataDir: string, nodeFlags: readonly string[] = [], bin = EDGEMQ, startArgs: readonly string[] = []): Promise<RunningBroker> {
  const child = spawn(process.execPath, [...nodeFlags, bin, 'start', '--data-dir', dataDir, '--mqtt-port', '0', '--http-port', '0', ...startArgs], {
    cwd: path.resolve(path.dirname(bin), '..'), stdio: ['ignore', 'pipe', 'pipe'],
  })
  const { stderr, exited } = track(child)
  const line = await new Promise<string>((resolve, reject) => {
    let out = ''
    const timer = setTimeout(() => reject(new Error(`edgemq did not start within 30 s:\n${stderr()}`)), 30_000)
    child.stdout?.on('data', (d: Buffer) => {
      out += d.toString()
      const ready = out.split('\n').find((l) => l.includes(' ready: '))
      if (ready !== undefined) { clearTimeout(timer); resolve(ready) }
    })
    void exited.then((code) => { clearTimeout(timer); reject(new Error(`edgemq exited with ${code} before it was ready:\n${stderr()}`)) })
  })
  const mqtt = /mqtt tcp mqtt:\/\/([^:\s]+):(\d+)/.exec(line)
  const http = /http (http:\/\/\S+?);/.exec(line)
  if (mqtt === null || http === null) throw new Error(`cannot read the ports from edgemq's ready line: ${line}`)
  return {
    name: 'edgemq', pid: child.pid ?? -1, host: mqtt[1] as string, port: Number(mqtt[2]), httpUrl: http[1] as string,
    stderr, stop: stopper(child, exited),
  }
}

/** A bench helper server in a child process (`node --import tsx <script> …args`) that prints `listening on <port>` when ready. */
export interface ListeningChild { readonly port: number, readonly pid: number, stop (): Promise<void> }

export async function startListeningChild (script: string, args: readonly string[], what: string): Promise<ListeningChild> {
  const child = spawn(process.execPath, ['--import', 'tsx', script, ...args], { stdio: ['ignore', 'pipe', 'inherit'] })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  running.add(child)
  void exited.then(() => running.delete(child))
  const port = await new Promise<number>((resolve, reject) => {
    let out = ''
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString()
      const m = /listening on (\d+)/.exec(out)
      if (m !== null) resolve(Number(m[1]))
    })
    child.once('exit', (code) => reject(new Error(`${what} exited with ${code}`)))
  })
  return { port, pid: child.pid ?? -1, stop: async () => { child.kill('SIGTERM'); await exited } }
}

let clockTicks: number | undefined

/** User + system CPU seconds of a process and all its threads so far (Linux /proc); undefined elsewhere. */
export function processCpuSeconds (pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // Fields after the command name (which may contain spaces) in parentheses; utime and stime are fields 14 and 15.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    clockTicks ??= Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100
    return (Number(fields[11]) + Number(fields[12])) / clockTicks
  } catch {
    return undefined
  }
}

/** Resident memory of a process now, in bytes (VmRSS of /proc/<pid>/status); undefined elsewhere. */
export function processRssBytes (pid: number): number | undefined {
  try {
    const kb = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]
    return kb === undefined ? undefined : Number(kb) * 1024
  } catch {
    return undefined
  }
}

/** Write and read system calls of a process so far (`syscw`, `syscr` of /proc/<pid>/io, all threads); undefined elsewhere. */
export function processSyscalls (pid: number): { readonly writes: number, readonly reads: number } | undefined {
  try {
    const io = readFileSync(`/proc/${pid}/io`, 'utf8')
    const field = (name: string): number => Number(new RegExp(`^${name}: (\\d+)$`, 'm').exec(io)?.[1] ?? NaN)
    return { writes: field('syscw'), reads: field('syscr') }
  } catch {
    return undefined
  }
}

/** Counters read from edgemq's GET /metrics (each summed over its labels). */
export interface EdgemqCounters {
  /** `edgemq_ingest_messages_total`: records appended. */
  readonly ingested: number
  /** `edgemq_group_commit_records` count and sum: group commits (LevelDB writes) and the records in them. */
  readonly commits: number
  readonly committedRecords: number
  /** `edgemq_append_duration_seconds_sum`: per commit, oldest append to durable. */
  readonly commitSeconds: number
}

export async function edgemqCounters (httpUrl: string): Promise<EdgemqCounters> {
  const res = await fetch(`${httpUrl}/metrics`)
  if (!res.ok) throw new Error(`GET ${httpUrl}/metrics: HTTP ${res.status}`)
  const sums = new Map<string, number>()
  for (const line of (await res.text()).split('\n')) {
    if (line.startsWith('#')) continue
    const name = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line)?.[0]
    if (name === undefined) continue
    sums.set(name, (sums.get(name) ?? 0) + Number(line.slice(line.lastIndexOf(' ') + 1)))
  }
  return {
    ingested: sums.get('edgemq_ingest_messages_total') ?? NaN,
    commits: sums.get('edgemq_group_commit_records_count') ?? NaN,
    committedRecords: sums.get('edgemq_group_commit_records_sum') ?? NaN,
    commitSeconds: sums.get('edgemq_append_duration_seconds_sum') ?? NaN,
  }
}

/**
 * Starts a broker in a fresh directory of `dirs`, runs `fn` with it, then stops it and removes the directory; a
 * failure carries the tail of the broker's stderr, and an unclean exit is reported.
 */
export async function withBrokerIn<T> (dirs: TempDirs, name: string, start: (dir: string) => Promise<RunningBroker>,
  fn: (broker: RunningBroker) => Promise<T>): Promise<T> {
  const dir = await dirs.make(name)
  const broker = await start(dir)
  try {
    return await fn(broker)
  } catch (err) {
    throw new Error(`${(err as Error).message}\n${name} stderr (tail):\n${broker.stderr().slice(-4000)}`)
  } finally {
    const code = await broker.stop()
    if (code !== 0 && code !== null) info(`${name} exited with code ${code}`)
    await dirs.remove(dir)
  }
}
