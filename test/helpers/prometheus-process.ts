/**
 * Runs Debian's `prometheus` and `promtool` (package `prometheus`) for the
 * dashboard tests: a real Prometheus server on a free loopback port with a
 * temporary config and TSDB, and its HTTP query API.
 *
 * Missing tools: under CI=true the tests must fail (.ci/run installs the
 * package), elsewhere they are skipped with the install hint.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { writeFile } from 'node:fs/promises'
import net from 'node:net'
import path from 'node:path'
import { stringify } from 'yaml'
import { tempDir } from './gateway-process.ts'

export const INSTALL_HINT = 'install Debian\'s prometheus package (apt-get install prometheus), which provides prometheus and promtool'

export function haveTool (name: string): boolean {
  const r = spawnSync(name, ['--version'], { stdio: 'ignore' })
  return r.error === undefined && r.status === 0
}

/**
 * Whether a test that needs `tools` runs: always under CI=true (where a
 * missing tool must fail the test, see {@link requireTools}), elsewhere only
 * when they are installed.
 */
export function toolsPresentOrCi (...tools: string[]): boolean {
  return process.env.CI === 'true' || tools.every(haveTool)
}

/** Throws when a tool is missing: the test fails rather than passing without having run. */
export function requireTools (...tools: string[]): void {
  const missing = tools.filter((t) => !haveTool(t))
  if (missing.length > 0) throw new Error(`${missing.join(', ')} not found on PATH: ${INSTALL_HINT}`)
}

export function runTool (cmd: string, args: readonly string[], cwd?: string): { code: number | null, output: string } {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', timeout: 60_000 })
  if (r.error !== undefined) throw r.error
  return { code: r.status, output: `${r.stdout}${r.stderr}` }
}

export function freePort (): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo
      server.close(() => resolve(port))
    })
  })
}

const children = new Set<ChildProcess>()
process.once('exit', () => { for (const c of children) c.kill('SIGKILL') })

export type PromValue = [number, string]
export interface PromSample { readonly metric: Readonly<Record<string, string>>, readonly value: PromValue }
export interface PromRule {
  readonly name: string
  readonly type: 'alerting' | 'recording'
  readonly health: string
  readonly lastError?: string
  readonly state?: string
  readonly alerts?: ReadonlyArray<{ readonly labels: Readonly<Record<string, string>>, readonly state: string }>
}

export interface PrometheusServer {
  readonly url: string
  /** Instant query at `time` (Unix seconds; now when omitted). Rejects on an API error (bad PromQL). */
  query (expr: string, time?: number): Promise<PromSample[]>
  rules (): Promise<PromRule[]>
  readonly output: () => string
  stop (): Promise<void>
}

interface ApiResponse<T> { status: 'success' | 'error', data?: T, error?: string, errorType?: string }

async function api<T> (url: string): Promise<T> {
  const res = await fetch(url, { signal: AbortSignal.timeout(10_000) })
  const body = await res.json() as ApiResponse<T>
  if (body.status !== 'success' || body.data === undefined) throw new Error(`${url}: ${body.errorType ?? res.status} ${body.error ?? ''}`)
  return body.data
}

export interface PrometheusOptions {
  /** host:port of each scrape target (job "edgemq"). */
  readonly targets: readonly string[]
  readonly ruleFiles?: readonly string[]
  readonly scrapeIntervalSeconds?: number
  readonly timeoutMs?: number
}

/** Starts Prometheus on a free 127.0.0.1 port with a temporary config and data dir; resolves once it is ready. */
export async function startPrometheus (options: PrometheusOptions): Promise<PrometheusServer> {
  const { dir, cleanup } = await tempDir('edgemq-prometheus-')
  const interval = `${options.scrapeIntervalSeconds ?? 1}s`
  const config = path.join(dir, 'prometheus.yaml')
  await writeFile(config, stringify({
    global: { scrape_interval: interval, scrape_timeout: interval, evaluation_interval: interval },
    rule_files: options.ruleFiles ?? [],
    scrape_configs: [{ job_name: 'edgemq', static_configs: [{ targets: options.targets }] }],
  }))
  // Prometheus cannot report a port it picked itself, so one is chosen here; a lost race is retried.
  let lastError: Error | undefined
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort()
    const child = spawn('prometheus', [
      `--config.file=${config}`,
      `--storage.tsdb.path=${path.join(dir, `tsdb-${attempt}`)}`,
      `--web.listen-address=127.0.0.1:${port}`,
      '--log.level=warn',
    ], { stdio: ['ignore', 'pipe', 'pipe'] })
    children.add(child)
    let output = ''
    const keep = (d: Buffer): void => { output += d.toString(); if (output.length > 200_000) output = output.slice(-100_000) }
    child.stdout.on('data', keep)
    child.stderr.on('data', keep)
    const exited = new Promise<void>((resolve) => child.once('exit', () => { children.delete(child); resolve() }))
    const url = `http://127.0.0.1:${port}`
    const deadline = Date.now() + (options.timeoutMs ?? 20_000)
    let ready = false
    while (Date.now() < deadline && child.exitCode === null && child.signalCode === null) {
      try {
        if ((await fetch(`${url}/-/ready`, { signal: AbortSignal.timeout(1000) })).ok) { ready = true; break }
      } catch { /* not listening yet */ }
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
    const stop = async (): Promise<void> => {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM')
        const killer = setTimeout(() => child.kill('SIGKILL'), 5000)
        await exited
        clearTimeout(killer)
      }
    }
    if (!ready) {
      await stop()
      lastError = new Error(`prometheus did not become ready on ${url}:\n${output}`)
      if (/address already in use/.test(output)) continue
      break
    }
    return {
      url,
      output: () => output,
      async query (expr, time) {
        const params = new URLSearchParams({ query: expr })
        if (time !== undefined) params.set('time', String(time))
        const data = await api<{ resultType: string, result: PromSample[] | PromValue }>(`${url}/api/v1/query?${params.toString()}`)
        if (data.resultType === 'scalar') return [{ metric: {}, value: data.result as PromValue }]
        return data.result as PromSample[]
      },
      async rules () {
        const data = await api<{ groups: Array<{ rules: PromRule[] }> }>(`${url}/api/v1/rules`)
        return data.groups.flatMap((g) => g.rules)
      },
      async stop () {
        await stop()
        await cleanup()
      },
    }
  }
  await cleanup()
  throw lastError ?? new Error('prometheus did not start')
}
