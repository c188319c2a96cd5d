/**
 * docs/operations.md promises a systemd unit and a Dockerfile that start a
 * gateway, and a backup and restore procedure that keeps what was
 * acknowledged. These tests run what those files and blocks say, as close to
 * the real thing as this machine allows: the unit's ExecStart and the
 * image's ENTRYPOINT + CMD as child processes with their absolute paths moved
 * into a temp directory (no systemd as PID 1, no Docker engine here).
 */
import { execFileSync } from 'node:child_process'
import { cp, mkdir, readFile, writeFile } from 'node:fs/promises'
import { existsSync, readFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import mqtt from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { parse as parseYaml, stringify } from 'yaml'
import { runCommand, startService, type ServiceProcess } from '../helpers/service-process.ts'
import { tempDir } from '../helpers/gateway-process.ts'

const ROOT = path.resolve(import.meta.dirname, '../..')
const read = (file: string): string => readFileSync(path.join(ROOT, file), 'utf8')

// ---------------------------------------------------------------- systemd unit

type Unit = Record<string, Record<string, string[]>>

/** The unit file's sections and keys; a key given twice keeps both values, as systemd does for ExecStart= and Environment=. */
function parseUnit (text: string): Unit {
  const unit: Unit = {}
  let section: Record<string, string[]> | undefined
  for (const raw of text.split('\n')) {
    const line = raw.trim()
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue
    const header = /^\[(.+)\]$/.exec(line)
    if (header !== null) { section = unit[header[1] as string] = {}; continue }
    const at = line.indexOf('=')
    if (section === undefined || at < 0) throw new Error(`unit line outside a section or without '=': ${line}`)
    const key = line.slice(0, at).trim();
    (section[key] ??= []).push(line.slice(at + 1).trim())
  }
  return unit
}

const one = (unit: Unit, section: string, key: string): string => {
  const values = unit[section]?.[key]
  if (values?.length !== 1) throw new Error(`[${section}] ${key}= must be given once, is ${JSON.stringify(values)}`)
  return values[0] as string
}

/** Seconds of a systemd time span as the unit writes it (`30`, `30s`, `1min 30s`). */
function seconds (span: string): number {
  let total = 0
  for (const m of span.matchAll(/(\d+)\s*(min|s)?/g)) total += Number(m[1]) * (m[2] === 'min' ? 60 : 1)
  return total
}

/** The absolute paths the unit, the Dockerfile and the backup blocks name, moved into one temp directory per test. */
class Sandbox {
  /** With `sourceInstalled`, `/opt/edgemq` (where the systemd unit expects a clone) is this checkout. */
  constructor (readonly dir: string, readonly sourceInstalled = true) {}
  /** `/var/lib/edgemq` → `<dir>/var/lib/edgemq`. */
  map (p: string): string {
    if (this.sourceInstalled && (p === '/opt/edgemq' || p.startsWith('/opt/edgemq/'))) return ROOT + p.slice('/opt/edgemq'.length)
    return path.join(this.dir, p)
  }

  /** Every absolute path in a command line (`/usr/bin/env` stays: it is the program). */
  mapLine (line: string): string {
    return line.replace(/(?<![\w.$])\/(?:opt|etc|var)\/[\w./*-]*/g, (p) => this.map(p))
  }
}

const SYSTEMD_UNIT = 'deploy/systemd/edgemq.service'

/** The ExecStart of the unit, in the sandbox, with the shipped config copied to the unit's config path and its ports set to 0. */
async function systemdService (box: Sandbox): Promise<{ argv: string[], cwd: string, env: Record<string, string>, killSignal: NodeJS.Signals, stopSec: number }> {
  const unit = parseUnit(read(SYSTEMD_UNIT))
  const argv = one(unit, 'Service', 'ExecStart').split(/\s+/)
  const configAt = argv.indexOf('--config')
  if (configAt < 0) throw new Error('ExecStart has no --config')
  const configPath = argv[configAt + 1] as string
  const config = parseYaml(read('deploy/edgemq.yaml')) as { mqtt: { listeners: Array<{ port: number }> }, http: { port: number } }
  for (const l of config.mqtt.listeners) l.port = 0
  config.http.port = 0
  await mkdir(path.dirname(box.map(configPath)), { recursive: true })
  await writeFile(box.map(configPath), stringify(config))
  const env: Record<string, string> = {}
  for (const assignment of unit.Service?.Environment ?? []) {
    for (const m of assignment.matchAll(/"?([A-Za-z_][A-Za-z0-9_]*)=([^"\s]*)"?/g)) env[m[1] as string] = m[2] as string
  }
  const cwd = box.map(one(unit, 'Service', 'WorkingDirectory'))
  await mkdir(cwd, { recursive: true }) // StateDirectory= creates it under systemd
  return {
    argv: argv.map((a) => box.mapLine(a)),
    cwd,
    env,
    killSignal: one(unit, 'Service', 'KillSignal') as NodeJS.Signals,
    stopSec: seconds(one(unit, 'Service', 'TimeoutStopSec')),
  }
}

async function health (httpUrl: string): Promise<{ status: number, body: unknown }> {
  const res = await fetch(`${httpUrl}/health`)
  return { status: res.status, body: await res.json() }
}

describe('deploy/systemd/edgemq.service', () => {
  const unit = parseUnit(read(SYSTEMD_UNIT))

  it('passes systemd-analyze verify without a warning', async () => {
    const found = await runCommand(['sh', '-c', 'command -v systemd-analyze'], { cwd: ROOT })
    if (found.code !== 0) {
      // A missing tool fails under CI (.ci/run installs systemd), and is reported otherwise.
      expect(process.env.CI, 'systemd-analyze (package systemd) is needed to verify the unit').not.toBe('true')
      console.warn('systemd-analyze not installed: unit not verified')
      return
    }
    const result = await runCommand(['systemd-analyze', 'verify', path.join(ROOT, SYSTEMD_UNIT)], { cwd: ROOT })
    expect({ code: result.code, stderr: result.stderr }).toEqual({ code: 0, stderr: '' })
  })

  it('keeps its data in its StateDirectory, stops after shutdownTimeoutMs, and starts where it runs', () => {
    const argv = one(unit, 'Service', 'ExecStart').split(/\s+/)
    const dataDir = argv[argv.indexOf('--data-dir') + 1]
    // ProtectSystem=strict makes everything read-only except the StateDirectory: the data must be there.
    expect(dataDir).toBe(`/var/lib/${one(unit, 'Service', 'StateDirectory')}`)
    expect(one(unit, 'Service', 'WorkingDirectory')).toBe(dataDir)
    const shipped = parseYaml(read('deploy/edgemq.yaml')) as { shutdownTimeoutMs?: number }
    expect(seconds(one(unit, 'Service', 'TimeoutStopSec')) * 1000).toBeGreaterThan(shipped.shutdownTimeoutMs ?? 10_000)
  })

  it('its ExecStart runs a gateway that answers /health and stops on its KillSignal within TimeoutStopSec', async () => {
    const { dir, cleanup } = await tempDir('edgemq-systemd-')
    try {
      const service = await systemdService(new Sandbox(dir))
      const gw = await startService(service.argv, { cwd: service.cwd, env: service.env })
      expect(await health(gw.httpUrl)).toEqual({ status: 200, body: { status: 'ok', reasons: [] } })
      const stopped = await gw.stop(service.killSignal)
      expect(stopped.code).toBe(0)
      expect(stopped.ms).toBeLessThan(service.stopSec * 1000)
      expect(existsSync(path.join(dir, 'var/lib/edgemq/db'))).toBe(true)
    } finally {
      await cleanup()
    }
  })
})

// ---------------------------------------------------------------- Dockerfile

interface Instruction { readonly op: string, readonly args: string }

function parseDockerfile (text: string): Instruction[] {
  const joined = text.replace(/\\\n/g, ' ')
  return joined.split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#')).map((l) => {
    const at = l.search(/\s/)
    return { op: l.slice(0, at).toUpperCase(), args: l.slice(at + 1).trim() }
  })
}

/** Exec form (`["a", "b"]`) as JSON; shell form split on spaces. */
const words = (args: string): string[] => args.startsWith('[') ? JSON.parse(args) as string[] : args.split(/\s+/)

describe('Dockerfile', () => {
  const instructions = parseDockerfile(read('Dockerfile'))
  const all = (op: string): Instruction[] => instructions.filter((i) => i.op === op)
  const last = (op: string): Instruction => {
    const found = all(op).at(-1)
    if (found === undefined) throw new Error(`Dockerfile has no ${op}`)
    return found
  }

  it('builds on a Node release that package.json engines allows', () => {
    const engines = (JSON.parse(read('package.json')) as { engines: { node: string } }).engines.node
    const from = /^node:(\d+)/.exec(last('FROM').args)
    const minimum = /(\d+)/.exec(engines)
    expect(from, 'FROM names a node:<major> image').not.toBeNull()
    expect(Number(from?.[1])).toBeGreaterThanOrEqual(Number(minimum?.[1]))
  })

  it('copies files that exist and that .dockerignore lets into the context', () => {
    const ignored = read('.dockerignore').split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'))
    const sources = all('COPY').flatMap((c) => words(c.args).slice(0, -1))
    expect(sources.length).toBeGreaterThan(0)
    expect(sources.filter((s) => !existsSync(path.join(ROOT, s)))).toEqual([])
    expect(sources.filter((s) => ignored.some((i) => s === i || s.startsWith(`${i}/`)))).toEqual([])
  })

  describe('replayed into a temp directory', () => {
    let box: Sandbox
    let cleanup: () => Promise<void>
    let workdir: string
    let entry: string[]

    /** The image's command line in the sandbox; `node` is this Node. */
    const imageCommand = (): string[] => entry.map((w, i) => i === 0 && w === 'node' ? process.execPath : w.startsWith('/') ? box.map(w) : w)

    beforeAll(async () => {
      const t = await tempDir('edgemq-docker-')
      box = new Sandbox(t.dir, false)
      cleanup = t.cleanup
      workdir = box.map('/')
      for (const ins of instructions) {
        if (ins.op === 'WORKDIR') {
          workdir = box.map(ins.args)
          await mkdir(workdir, { recursive: true })
        } else if (ins.op === 'COPY') {
          const parts = words(ins.args)
          const dest = parts.at(-1) as string
          for (const src of parts.slice(0, -1)) {
            const into = dest.startsWith('/') ? box.map(dest) : path.join(workdir, dest)
            const target = dest.endsWith('/') ? path.join(into, path.basename(src)) : into
            await mkdir(path.dirname(target), { recursive: true })
            await cp(path.join(ROOT, src), target, { recursive: true })
          }
        } else if (ins.op === 'RUN') {
          for (const command of ins.args.split('&&').map((c) => c.trim())) {
            if (command.startsWith('npm ci')) {
              // The cache the checkout was installed from: the image's build would download the same tarballs.
              const result = await runCommand(['sh', '-c', `${command} --prefer-offline`], { cwd: workdir, timeoutMs: 240_000 })
              expect(result.code, result.stderr).toBe(0)
            } else if (command.startsWith('mkdir -p ')) {
              for (const dir of command.slice('mkdir -p '.length).split(/\s+/)) await mkdir(box.map(dir), { recursive: true })
            } else if (!command.startsWith('chown ') && !command.startsWith('npm cache clean')) {
              // chown names the image's user, and cleaning would empty this machine's npm cache.
              throw new Error(`the test does not know how to replay RUN ${command}; teach it`)
            }
          }
        }
      }
      entry = [...words(last('ENTRYPOINT').args), ...words(last('CMD').args)]
    }, 300_000)

    afterAll(async () => { await cleanup() })

    it('installs none of the packages only development needs', () => {
      // package-lock.json marks what only devDependencies pull in ("dev": true); a devDependency that a
      // runtime package also needs (@types/ws by mqtt) is not one of them.
      const lock = JSON.parse(read('package-lock.json')) as { packages: Record<string, { dev?: boolean }> }
      const devOnly = Object.entries(lock.packages).filter(([, p]) => p.dev === true).map(([where]) => where)
      expect(devOnly.length).toBeGreaterThan(0)
      expect(devOnly.filter((where) => existsSync(path.join(workdir, where)))).toEqual([])
    })

    it('refuses to start with the config baked into the image, which has no users (GW_INSECURE_LISTENER)', async () => {
      const result = await runCommand(imageCommand(), { cwd: workdir })
      expect(result.code).toBe(1)
      expect(result.stderr).toContain('GW_INSECURE_LISTENER')
    })

    it('with a mounted config that has users, starts, passes its HEALTHCHECK, serves the CLI and stops on its STOPSIGNAL', async () => {
      const configPath = entry[entry.indexOf('--config') + 1] as string
      const baked = parseYaml(await readFile(box.map(configPath), 'utf8')) as { mqtt: { listeners: Array<{ host: string, port: number }> }, http: { host: string, port: number } }
      const hash = execFileSync(process.execPath, [path.join(ROOT, 'gateway/edgemq.mjs'), 'passwd'], { input: 'secret' }).toString().trim()
      // What an operator mounts: the image's config plus users. Loopback and port 0 only because tests bind nothing else.
      const mounted = {
        ...baked,
        mqtt: { ...baked.mqtt, listeners: baked.mqtt.listeners.map((l) => ({ ...l, host: '127.0.0.1', port: 0 })) },
        http: { ...baked.http, host: '127.0.0.1', port: 0 },
        users: [{ username: 'historian', tenant: 'default', role: 'service', password: hash }],
      }
      await writeFile(box.map(configPath), stringify(mounted))
      let gw: ServiceProcess | undefined
      try {
        gw = await startService(imageCommand(), { cwd: workdir })
        expect(await health(gw.httpUrl)).toEqual({ status: 200, body: { status: 'ok', reasons: [] } })

        const check = words(last('HEALTHCHECK').args.replace(/^(--\S+\s+)*CMD\s+/, ''))
        const port = new URL(gw.httpUrl).port
        const probe = await runCommand(check.map((w, i) => i === 0 && w === 'node' ? process.execPath : w.replaceAll('127.0.0.1:9464', `127.0.0.1:${port}`)), { cwd: workdir })
        expect(probe.code).toBe(0)

        const streams = await runCommand([process.execPath, 'gateway/edgemq.mjs', 'streams', '--url', gw.httpUrl, '--user', 'historian', '--password', 'secret'], { cwd: workdir })
        expect(streams.stderr).toBe('')
        expect(streams.stdout).toMatch(/^STREAM\s+PARTITION/)

        const stopped = await gw.stop(last('STOPSIGNAL').args as NodeJS.Signals)
        expect(stopped.code).toBe(0)
      } finally {
        await gw?.stop('SIGKILL')
      }
    })
  })
})

// ---------------------------------------------------------------- backup and restore

/** The `sh` blocks that docs/operations.md marks as run by this test. */
function markedBlocks (): string[] {
  const doc = read('docs/operations.md')
  const marker = doc.indexOf('<!-- test/docs/operations.int.test.ts runs the next two blocks -->')
  if (marker < 0) throw new Error('docs/operations.md lost the marker of its backup and restore blocks')
  return [...doc.slice(marker).matchAll(/```sh\n([\s\S]*?)```/g)].slice(0, 2).map((m) => m[1] as string)
}

interface Published { readonly topic: string, readonly payload: string }

async function publish (mqttUrl: string, from: number, count: number): Promise<Published[]> {
  const client = await mqtt.connectAsync(mqttUrl, { clientId: 'backup-test', reconnectPeriod: 0 })
  const sent: Published[] = []
  try {
    for (let i = from; i < from + count; i++) {
      const message = { topic: `devices/dev-${i % 10}/telemetry/temp`, payload: JSON.stringify({ seq: i }) }
      // Resolves on the PUBACK: the record is in the log.
      await client.publishAsync(message.topic, message.payload, { qos: 1 })
      sent.push(message)
    }
  } finally {
    await client.endAsync()
  }
  return sent
}

async function stored (httpUrl: string): Promise<Published[]> {
  const stream = await (await fetch(`${httpUrl}/v1/streams/telemetry`)).json() as { partitions: Array<{ partition: number }> }
  const records: Published[] = []
  for (const { partition } of stream.partitions) {
    const body = await (await fetch(`${httpUrl}/v1/streams/telemetry/partitions/${partition}/records?format=ndjson`)).text()
    for (const line of body.trim().split('\n')) {
      const r = JSON.parse(line) as { topic?: string, payload?: string }
      if (r.topic !== undefined && r.payload !== undefined) records.push({ topic: r.topic, payload: r.payload })
    }
  }
  return records.sort((a, b) => a.payload.localeCompare(b.payload))
}

async function committed (httpUrl: string): Promise<Array<number | null>> {
  const group = await (await fetch(`${httpUrl}/v1/groups/billing/streams/telemetry`)).json() as { partitions: Array<{ committedOffset: number | null }> }
  return group.partitions.map((p) => p.committedOffset)
}

describe('docs/operations.md, backup and restore', () => {
  it('following the documented blocks, a restored gateway holds what was acknowledged before the backup', async () => {
    const [backupBlock, restoreBlock] = markedBlocks()
    expect(backupBlock).toContain('systemctl stop edgemq')
    expect(restoreBlock).toContain('systemctl start edgemq')
    const { dir, cleanup } = await tempDir('edgemq-backup-')
    const box = new Sandbox(dir)
    const service = await systemdService(box)
    let gw: ServiceProcess | undefined
    const systemctl = async (action: string): Promise<void> => {
      if (action === 'stop') {
        const stopped = await gw?.stop(service.killSignal)
        expect(stopped?.code).toBe(0)
        gw = undefined
      } else {
        gw = await startService(service.argv, { cwd: service.cwd, env: service.env })
      }
    }
    /** Runs a block: `systemctl` lines drive the service, the others run in one shell per stretch, sudo dropped. */
    const run = async (block: string): Promise<void> => {
      let shell: string[] = []
      const flush = async (): Promise<void> => {
        if (shell.length === 0) return
        const script = ['set -eu', ...shell].join('\n')
        shell = []
        const result = await runCommand(['bash', '-c', script], { cwd: dir })
        expect(result.code, `${script}\n${result.stderr}`).toBe(0)
      }
      for (const raw of block.split('\n')) {
        const line = raw.replace(/^sudo /, '').replace(/\s+#.*$/, '').trim()
        if (line === '' || line.startsWith('#')) continue
        const ctl = /^systemctl (start|stop) edgemq$/.exec(line)
        if (ctl !== null) {
          await flush()
          await systemctl(ctl[1] as string)
          continue
        }
        // The unit's user is this test's user here.
        shell.push(box.mapLine(line.replace(/ edgemq:edgemq /, ` ${os.userInfo().uid}:${os.userInfo().gid} `).replaceAll('sudo ', '')))
      }
      await flush()
    }

    try {
      await systemctl('start')
      const before = await publish(gw!.mqttUrl, 0, 120)
      const commit = await fetch(`${gw!.httpUrl}/v1/groups/billing/streams/telemetry/commit`, { method: 'POST', body: JSON.stringify({ offsets: [{ partition: 0, offset: 3 }] }) })
      expect(commit.status).toBe(200)
      const groupAtBackup = await committed(gw!.httpUrl)

      await run(backupBlock as string)
      expect(gw, 'the backup block starts the gateway again').toBeDefined()
      const after = await publish(gw!.mqttUrl, 1000, 30)
      expect((await stored(gw!.httpUrl)).length).toBe(before.length + after.length)

      await run(restoreBlock as string)
      expect(await stored(gw!.httpUrl)).toEqual([...before].sort((a, b) => a.payload.localeCompare(b.payload)))
      expect(await committed(gw!.httpUrl)).toEqual(groupAtBackup)
      // The data that was set aside still holds everything.
      expect(existsSync(box.map('/var/lib/edgemq.before-restore/db'))).toBe(true)
    } finally {
      await gw?.stop('SIGKILL')
      await cleanup()
    }
  })
})
