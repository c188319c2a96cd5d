/**
 * Runs `edgemq start` in a child process, as a user would, and reads the
 * ports it picked from its ready line. Used by the integration tests that
 * kill the gateway with SIGKILL.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { stringify } from 'yaml'

const ROOT = path.resolve(import.meta.dirname, '../..')

/** Every gateway this test process started; SIGKILLed when it exits, so a failed test leaves no orphan. */
const children = new Set<ChildProcess>()
process.once('exit', () => { for (const c of children) c.kill('SIGKILL') })
const BIN = path.join(ROOT, 'gateway/edgemq.mjs')

export interface GatewayProcess {
  readonly child: ChildProcess
  readonly mqttUrl: string
  readonly httpUrl: string
  /** Every URL printed on the ready line, by listener name. */
  readonly urls: Readonly<Record<string, string>>
  readonly stderr: () => string
  /** The whole ready line `edgemq start` printed on stdout. */
  readonly ready: string
  /** SIGKILL, and wait for the process to be gone. */
  kill (): Promise<void>
  /** SIGTERM, and wait for the exit code. */
  stop (): Promise<number | null>
}

export async function tempDir (prefix = 'edgemq-gw-'): Promise<{ dir: string, cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix))
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) }
}

export async function writeConfig (dir: string, config: Record<string, unknown>): Promise<string> {
  const file = path.join(dir, 'edgemq.yaml')
  await writeFile(file, stringify(config))
  return file
}

/** A gateway's data directory and config file, in a temp dir of their own: it starts on them, and again after a kill -9. */
export interface GatewayFiles {
  readonly dataDir: string
  /** Starts a gateway process on the data directory and the config file. */
  start (): Promise<GatewayProcess>
  cleanup (): Promise<void>
}

/** {@link GatewayFiles} with a config of a TCP listener and HTTP on ports the OS picks, and `mqtt` keys beside the listener. */
export async function gatewayFiles (mqtt: Record<string, unknown> = {}): Promise<GatewayFiles> {
  const { dir, cleanup } = await tempDir()
  const dataDir = path.join(dir, 'data')
  const config = await writeConfig(dir, { mqtt: { listeners: [{ type: 'tcp', port: 0 }], ...mqtt }, http: { port: 0 } })
  return { dataDir, start: () => startGatewayProcess({ dataDir, config }), cleanup }
}

export function runCli (args: readonly string[], input?: string): Promise<{ code: number | null, stdout: string, stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString() })
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString() })
    child.on('exit', (code) => resolve({ code, stdout, stderr }))
    child.stdin.end(input ?? '')
  })
}

/** How long a start may take: a deadline, not a wait (the ready line ends it); a loaded 2-core machine took over 20 s. */
const START_TIMEOUT_MS = 60_000

export async function startGatewayProcess (options: { dataDir: string, config?: string, timeoutMs?: number, args?: readonly string[] }): Promise<GatewayProcess> {
  const args = [BIN, 'start', '--data-dir', options.dataDir, '--http-port', '0', ...options.args ?? []]
  if (options.config !== undefined) args.push('--config', options.config)
  else args.push('--mqtt-port', '0')
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] })
  children.add(child)
  child.once('exit', () => children.delete(child))
  let stderr = ''
  child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); if (stderr.length > 1_000_000) stderr = stderr.slice(-500_000) })
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  const line = await new Promise<string>((resolve, reject) => {
    let out = ''
    const timer = setTimeout(() => {
      // Killed, not left running: a gateway that starts after its test gave up outlives the test run otherwise.
      child.kill('SIGKILL')
      reject(new Error(`gateway did not start within ${options.timeoutMs ?? START_TIMEOUT_MS} ms:\n${stderr}`))
    }, options.timeoutMs ?? START_TIMEOUT_MS)
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString()
      const ready = out.split('\n').find((l) => l.includes(' ready: '))
      if (ready !== undefined) { clearTimeout(timer); resolve(ready) }
    })
    void exited.then((code) => { clearTimeout(timer); reject(new Error(`gateway exited with ${code} before it was ready:\n${stderr}`)) })
  })
  const urls: Record<string, string> = {}
  for (const m of line.matchAll(/(\S+) ((?:mqtts?|wss?):\/\/\S+?)(?=[,;]|$)/g)) urls[m[1] as string] = m[2] as string
  const httpUrl = /http (http:\/\/\S+?);/.exec(line)?.[1]
  const mqttUrl = Object.values(urls).find((u) => u.startsWith('mqtt://')) ?? Object.values(urls)[0]
  if (httpUrl === undefined || mqttUrl === undefined) throw new Error(`cannot read ports from: ${line}`)
  return {
    child, mqttUrl, httpUrl, urls, ready: line,
    stderr: () => stderr,
    async kill () {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
      await exited
    },
    async stop () {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode
      child.kill('SIGTERM')
      return exited
    },
  }
}
