/**
 * `npx edgemq start &` then `kill $!` or `kill -9 $!` signals npm, not the
 * gateway: the gateway has to follow its launcher, or it keeps the ports and
 * the database and the README's "kill -9 and start again" fails.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import path from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { findNpmLauncher, launcherState, type ProcInfo } from '../../../gateway/cli/npm-launcher.ts'
import { tempDir } from '../../helpers/gateway-process.ts'

const ROOT = path.resolve(import.meta.dirname, '../../..')

interface NpxGateway {
  readonly npm: ChildProcess
  readonly mqttPort: number
  readonly httpUrl: string
  readonly output: () => string
}

const groups: number[] = []
afterEach(() => {
  // Whatever is left of a failed test: npm, its shell and the gateway share the process group npm leads.
  for (const pgid of groups.splice(0)) { try { process.kill(-pgid, 'SIGKILL') } catch { /* gone */ } }
})

async function npxStart (dataDir: string, mqttPort: number, httpPort: number): Promise<NpxGateway> {
  const npm = spawn('npx', ['edgemq', 'start', '--data-dir', dataDir, '--mqtt-port', String(mqttPort), '--http-port', String(httpPort)],
    { cwd: ROOT, detached: true, stdio: ['ignore', 'pipe', 'pipe'] })
  groups.push(npm.pid!)
  let output = ''
  npm.stderr!.on('data', (d: Buffer) => { output += d.toString() })
  const line = await new Promise<string>((resolve, reject) => {
    npm.stdout!.on('data', (d: Buffer) => {
      output += d.toString()
      const ready = output.split('\n').find((l) => l.includes(' ready: '))
      if (ready !== undefined) resolve(ready)
    })
    npm.once('exit', (code) => reject(new Error(`npx edgemq start exited with ${code}:\n${output}`)))
  })
  const m = /mqtt:\/\/127\.0\.0\.1:(\d+).*http (http:\/\/\S+?);/.exec(line)
  if (m === null) throw new Error(`cannot read ports from ${line}`)
  return { npm, mqttPort: Number(m[1]), httpUrl: m[2]!, output: () => output }
}

/** Resolves once the gateway's HTTP port stops answering: the process that held it is gone. */
async function gone (httpUrl: string, deadlineMs = 15_000): Promise<void> {
  const deadline = Date.now() + deadlineMs
  while (Date.now() < deadline) {
    try {
      await fetch(`${httpUrl}/health`, { signal: AbortSignal.timeout(2000) })
    } catch {
      return
    }
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  throw new Error(`${httpUrl} still answers ${deadlineMs} ms after npm was stopped`)
}

describe('npx edgemq start', () => {
  it('kill -9 of npm kills the gateway, and the next start on the same ports and data dir succeeds; kill of npm stops it cleanly', async () => {
    const { dir, cleanup } = await tempDir()
    try {
      const first = await npxStart(dir, 0, 0)
      const httpPort = Number(new URL(first.httpUrl).port)
      first.npm.kill('SIGKILL')
      await gone(first.httpUrl)

      const second = await npxStart(dir, first.mqttPort, httpPort)
      expect(second.mqttPort).toBe(first.mqttPort)
      const health = await fetch(`${second.httpUrl}/health`)
      expect(health.status).toBe(200)
      second.npm.kill('SIGTERM')
      await gone(second.httpUrl)
      // A clean stop: the gateway logged its shutdown (a SIGKILL would have left no line).
      await expect.poll(() => second.output(), { timeout: 10_000 }).toMatch(/shutting down/)
    } finally {
      await cleanup()
    }
  }, 90_000)
})

describe('launcher state', () => {
  const procs = (table: Record<number, ProcInfo>) => (pid: number): ProcInfo | undefined => table[pid]
  it('finds npm behind the shell it runs the bin with, and nothing when npm did not start us', () => {
    const read = procs({ 20: { comm: 'sh', state: 'S', ppid: 10 }, 10: { comm: 'npm exec edgemq', state: 'S', ppid: 1 } })
    expect(findNpmLauncher(true, 20, read)).toEqual({ pid: 10, parentPid: 20 })
    expect(findNpmLauncher(false, 20, read)).toBeUndefined()
    expect(findNpmLauncher(true, 10, read)).toEqual({ pid: 10, parentPid: 10 })
  })
  it('follows no other parent, even when npm_execpath came down from an npm further up', () => {
    const read = procs({ 30: { comm: 'node', state: 'S', ppid: 10 }, 20: { comm: 'sh', state: 'S', ppid: 30 }, 10: { comm: 'npm test', state: 'S', ppid: 1 } })
    expect(findNpmLauncher(true, 30, read)).toBeUndefined()
    expect(findNpmLauncher(true, 20, read)).toBeUndefined()
  })
  it('tells a stopped npm (its shell died, we were reparented) from a killed one (shell left, npm gone or a zombie)', () => {
    const launcher = { pid: 10, parentPid: 20 }
    expect(launcherState(launcher, 20, procs({ 10: { comm: 'npm', state: 'S', ppid: 1 } }))).toBeUndefined()
    expect(launcherState(launcher, 1, procs({}))).toBe('stopped')
    expect(launcherState(launcher, 20, procs({}))).toBe('killed')
    expect(launcherState(launcher, 20, procs({ 10: { comm: 'npm', state: 'Z', ppid: 1 } }))).toBe('killed')
  })
})
