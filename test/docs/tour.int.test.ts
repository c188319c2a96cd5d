/**
 * The README's five-minute tour, run as written against a fresh gateway:
 * each command line of its blocks, with only the addresses changed to the
 * ports this gateway picked (tests bind port 0) and `npx edgemq` run as
 * `node gateway/edgemq.mjs`. Up to the kill -9 step; the bridge step is the
 * bridge tests' ground.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { readFileSync } from 'node:fs'
import path from 'node:path'
import mqtt from 'mqtt'
import { describe, expect, it } from 'vitest'
import { tempDir } from '../helpers/gateway-process.ts'
import { runCommand, startService, type ServiceProcess } from '../helpers/service-process.ts'

const ROOT = path.resolve(import.meta.dirname, '../..')
const BIN = path.join(ROOT, 'gateway/edgemq.mjs')

/** The tour's code blocks, in order, up to (not including) the bridge step. */
function tourBlocks (): Array<{ lang: string, code: string }> {
  const readme = readFileSync(path.join(ROOT, 'README.md'), 'utf8')
  const start = readme.indexOf('## A five-minute tour')
  const end = readme.indexOf('\n## ', start + 1)
  if (start < 0) throw new Error('README.md lost its five-minute tour')
  const blocks = [...readme.slice(start, end).matchAll(/```(sh|js)\n([\s\S]*?)```/g)].map((m) => ({ lang: m[1] as string, code: m[2] as string }))
  const bridge = blocks.findIndex((b) => b.code.includes('region.yaml'))
  return bridge < 0 ? blocks : blocks.slice(0, bridge)
}

interface Background { readonly child: ChildProcess, out: string }

function background (line: string, env: Record<string, string>): Background {
  const child = spawn('bash', ['-c', line], { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  const bg: Background = { child, out: '' }
  child.stdout.on('data', (d: Buffer) => { bg.out += d.toString() })
  child.stderr.on('data', (d: Buffer) => { bg.out += d.toString() })
  return bg
}

/** Resolves once `bg` printed `text`; rejects after `ms` (a bound, not a pause) or when it exits without. */
function printed (bg: Background, text: string, ms = 20_000): Promise<void> {
  return new Promise((resolve, reject) => {
    const check = (): void => {
      if (!bg.out.includes(text)) return
      clearTimeout(timer)
      bg.child.stdout?.off('data', check)
      resolve()
    }
    const timer = setTimeout(() => reject(new Error(`did not print ${text} within ${ms} ms; printed:\n${bg.out}`)), ms)
    bg.child.stdout?.on('data', check)
    bg.child.once('exit', () => setImmediate(() => { check(); reject(new Error(`exited without printing ${text}; printed:\n${bg.out}`)) }))
    check()
  })
}

describe("README's five-minute tour", () => {
  it('runs as written on a fresh gateway', async () => {
    for (const tool of ['mosquitto_sub', 'mosquitto_pub', 'curl']) {
      const found = await runCommand(['sh', '-c', `command -v ${tool}`], { cwd: ROOT })
      expect(found.code, `${tool} is needed to run the tour (.ci/run installs it)`).toBe(0)
    }
    const { dir, cleanup } = await tempDir('edgemq-tour-')
    const startGateway = (mqttPort: number, httpPort: number): Promise<ServiceProcess> =>
      startService([process.execPath, BIN, 'start', '--data-dir', path.join(dir, 'data'), '--mqtt-port', String(mqttPort), '--http-port', String(httpPort)], { cwd: dir })
    let gw = await startGateway(0, 0)
    const mqttPort = Number(new URL(gw.mqttUrl).port)
    const httpPort = Number(new URL(gw.httpUrl).port)
    // The client commands' default address is 127.0.0.1:9464; EDGEMQ_URL is how a user points them elsewhere.
    const env = { EDGEMQ_URL: gw.httpUrl }
    const address = (line: string): string => line
      .replaceAll('npx edgemq', `node ${BIN}`)
      .replaceAll('-h 127.0.0.1', `-h 127.0.0.1 -p ${mqttPort}`)
      .replaceAll('mqtt://127.0.0.1:1883', gw.mqttUrl)
      .replaceAll('127.0.0.1:9464', `127.0.0.1:${httpPort}`)
    const backgrounds: Background[] = []
    const outputs = new Map<string, string>()

    try {
      for (const block of tourBlocks()) {
        if (block.lang === 'js') {
          const result = await runCommand([process.execPath, '--input-type=module', '-e', address(block.code)], { cwd: ROOT })
          expect(result.code, result.stderr).toBe(0)
          continue
        }
        for (const raw of block.code.split('\n')) {
          if (raw.trim() === '') continue
          // A comment after two spaces either says what the line prints, or explains it.
          const [, command = '', comment] = /^(.*?)(?:\s{2,}#\s*(.*))?$/.exec(raw) ?? []
          if (command.startsWith('kill -9 ')) {
            await gw.stop('SIGKILL')
            gw = await startGateway(mqttPort, httpPort)
            continue
          }
          if (command.endsWith('&')) {
            const bg = background(address(command.slice(0, -1)), env)
            backgrounds.push(bg)
            // The tour's reader starts a subscriber and then publishes: wait until it receives, not for a while.
            const probe = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'tour-probe', reconnectPeriod: 0 })
            try {
              const received = printed(bg, 'tour-probe')
              const tick = setInterval(() => { void probe.publishAsync('devices/tour-probe/telemetry/probe', 'tour-probe', { qos: 0 }) }, 100)
              await received.finally(() => clearInterval(tick))
            } finally {
              await probe.endAsync()
            }
            continue
          }
          if (comment !== undefined && /[{}]|\//.test(comment)) {
            // The comment is the output: run until it is printed (a subscriber runs until Ctrl-C).
            const bg = background(address(command), env)
            backgrounds.push(bg)
            await printed(bg, comment)
            bg.child.kill('SIGINT')
            outputs.set(command, bg.out)
            continue
          }
          const result = await runCommand(['bash', '-c', address(command)], { cwd: ROOT, env })
          // `timeout N` ends a command on purpose: 124 is its exit status then.
          expect(result.code === 0 || (command.startsWith('timeout ') && result.code === 124), `${command}\n${result.stderr}`).toBe(true)
          outputs.set(command, result.stdout)
        }
      }

      const first = backgrounds[0]
      await printed(first as Background, 'devices/dev-42/telemetry/temp {"temp": 21.5}')
      const output = (start: string): string => [...outputs].find(([c]) => c.startsWith(start))?.[1] ?? ''
      expect(output('curl -s 127.0.0.1:9464/metrics')).toMatch(/^edgemq_ingest_messages_total\{tenant="default",stream="telemetry"\} [1-9]/m)
      expect(output("curl -s '127.0.0.1:9464/v1/streams/telemetry/records?key=dev-42")).toContain('"payload":"{\\"temp\\": 21.5}"')
      expect(output("mosquitto_sub -h 127.0.0.1 -q 1 -v --retained-only -t '$replay/")).toContain('devices/dev-42/telemetry/temp {"temp": 21.5}')
      expect(output('npx edgemq replay')).toContain('"key":"dev-42"')
    } finally {
      for (const bg of backgrounds) bg.child.kill('SIGKILL')
      await gw.stop('SIGKILL')
      await cleanup()
    }
  })
})

describe("docs/http-api.md's examples", () => {
  it('run as written against a fresh gateway holding one of dev-42\'s readings', async () => {
    const doc = readFileSync(path.join(ROOT, 'docs/http-api.md'), 'utf8')
    const block = /### Examples[\s\S]*?```sh\n([\s\S]*?)```/.exec(doc)?.[1]
    expect(block, 'docs/http-api.md lost its examples block').toBeDefined()
    const { dir, cleanup } = await tempDir('edgemq-api-examples-')
    const gw = await startService([process.execPath, BIN, 'start', '--data-dir', path.join(dir, 'data'), '--mqtt-port', '0', '--http-port', '0'], { cwd: dir })
    try {
      const device = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'dev-42', reconnectPeriod: 0 })
      await device.publishAsync('devices/dev-42/telemetry/temp', '{"temp": 22.0}', { qos: 1 })
      await device.endAsync()
      const script = ['set -euo pipefail', (block as string).replaceAll('127.0.0.1:9464', new URL(gw.httpUrl).host)].join('\n')
      const result = await runCommand(['bash', '-c', script], { cwd: ROOT })
      expect(result.code, result.stderr).toBe(0)
      expect(result.stdout).not.toContain('"error"')
      // The commit moved group billing to the end of partition 5, where dev-42's one record is.
      const group = await (await fetch(`${gw.httpUrl}/v1/groups/billing/streams/telemetry`)).json() as { partitions: Array<{ partition: number, committedOffset: number | null }> }
      expect(group.partitions.find((p) => p.partition === 5)?.committedOffset).toBe(1)
      // The where example found the reading above 21.5.
      expect(result.stdout).toContain('"payload":"{\\"temp\\": 22.0}"')
    } finally {
      await gw.stop('SIGKILL')
      await cleanup()
    }
  })
})
