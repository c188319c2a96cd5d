/**
 * Runs a command line that an operator's service manager would run (a
 * systemd unit's ExecStart, a Dockerfile's ENTRYPOINT + CMD) as a child
 * process, and waits for the gateway's ready line. Used by the tests of
 * deploy/ and docs/operations.md; test/helpers/gateway-process.ts starts
 * `edgemq start` itself with fixed flags.
 */
import { spawn, type ChildProcess } from 'node:child_process'

/** Every child this test process started; SIGKILLed when it exits, so a failed test leaves no orphan. */
const children = new Set<ChildProcess>()
process.once('exit', () => { for (const c of children) c.kill('SIGKILL') })

export interface ServiceProcess {
  readonly child: ChildProcess
  readonly httpUrl: string
  readonly mqttUrl: string
  readonly stderr: () => string
  /** Sends `signal` and resolves with the exit code and how long the exit took. */
  stop (signal: NodeJS.Signals): Promise<{ code: number | null, ms: number }>
}

export interface CommandOptions {
  readonly cwd: string
  readonly env?: Readonly<Record<string, string>>
  readonly timeoutMs?: number
}

/** Runs a command to its end: exit code, stdout, stderr. */
export function runCommand (argv: readonly string[], options: CommandOptions): Promise<{ code: number | null, stdout: string, stderr: string }> {
  const [command, ...args] = argv
  if (command === undefined) throw new Error('empty command line')
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: options.cwd, env: { ...process.env, ...options.env }, stdio: ['ignore', 'pipe', 'pipe'] })
    children.add(child)
    let stdout = ''
    let stderr = ''
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`${argv.join(' ')} did not end within ${options.timeoutMs ?? 60_000} ms:\n${stderr}`)) }, options.timeoutMs ?? 60_000)
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString() })
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString() })
    child.once('error', reject)
    child.once('exit', (code) => { clearTimeout(timer); children.delete(child); resolve({ code, stdout, stderr }) })
  })
}

/** Starts a gateway command line and resolves once it printed `edgemq … ready: …`. */
export async function startService (argv: readonly string[], options: CommandOptions): Promise<ServiceProcess> {
  const [command, ...args] = argv
  if (command === undefined) throw new Error('empty command line')
  const child = spawn(command, args, { cwd: options.cwd, env: { ...process.env, ...options.env }, stdio: ['ignore', 'pipe', 'pipe'] })
  children.add(child)
  let stderr = ''
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); if (stderr.length > 1_000_000) stderr = stderr.slice(-500_000) })
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => { children.delete(child); resolve(code) }))
  const timeoutMs = options.timeoutMs ?? 30_000
  const line = await new Promise<string>((resolve, reject) => {
    let out = ''
    const timer = setTimeout(() => reject(new Error(`${argv.join(' ')} did not get ready within ${timeoutMs} ms:\n${stderr}`)), timeoutMs)
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString()
      const ready = out.split('\n').find((l) => l.includes(' ready: '))
      if (ready !== undefined) { clearTimeout(timer); resolve(ready) }
    })
    child.once('error', (err) => { clearTimeout(timer); reject(err) })
    void exited.then((code) => { clearTimeout(timer); reject(new Error(`${argv.join(' ')} exited with ${code} before it was ready:\n${stderr}`)) })
  })
  const httpUrl = /http (http:\/\/\S+?);/.exec(line)?.[1]
  const mqttUrl = /(mqtt:\/\/[^\s,;]+)/.exec(line)?.[1]
  if (httpUrl === undefined || mqttUrl === undefined) throw new Error(`cannot read the addresses from: ${line}`)
  return {
    child, httpUrl, mqttUrl,
    stderr: () => stderr,
    async stop (signal) {
      const began = performance.now()
      if (child.exitCode === null && child.signalCode === null) child.kill(signal)
      const code = await exited
      return { code, ms: performance.now() - began }
    },
  }
}
