/**
 * What `edgemq start` tells an operator, read from its stderr as a log
 * shipper would: JSON lines with level names and ISO times, one line at
 * start-up, one warning line per weak setting, the gateway id it keeps in the
 * data directory, and refusals of hashes that can never match.
 */
import { spawn, spawnSync } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { hashPassword } from '../../../gateway/access/auth.ts'
import { runCliWithin } from '../../helpers/cli-run.ts'
import { startGatewayProcess, tempDir, writeConfig } from '../../helpers/gateway-process.ts'
import { connectOk, endAll, waitFor } from '../../helpers/mqtt-probe.ts'
import { logLines, type LogLine } from '../../helpers/raw-mqtt.ts'

const TIMEOUT = 60_000
const ROOT = path.resolve(import.meta.dirname, '../../..')
const BIN = path.join(ROOT, 'gateway/edgemq.mjs')
const WEAK_HASH = 'scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA='

const cleanups: Array<() => Promise<void>> = []
afterAll(async () => { for (const c of cleanups.reverse()) await c().catch(() => {}) })

async function scratch (): Promise<string> {
  const { dir, cleanup } = await tempDir('edgemq-startup-')
  cleanups.push(cleanup)
  return dir
}

const gatewayOf = (ready: string): string | undefined => /; gateway (\S+)$/.exec(ready.trim())?.[1]
const warnings = (stderr: string): LogLine[] => logLines(stderr).filter((l) => typeof l.code === 'string' && l.code.startsWith('GW_WARN_'))

describe('the gateway id', () => {
  it('is generated on the first start, kept in the data directory, and a configured one that differs is warned about once', async () => {
    const dir = await scratch()
    const dataDir = path.join(dir, 'data')
    const ids: Array<string | undefined> = []
    for (let i = 0; i < 2; i++) {
      const gw = await startGatewayProcess({ dataDir })
      ids.push(gatewayOf(gw.ready))
      expect(warnings(gw.stderr()), gw.stderr()).toEqual([])
      expect(await gw.stop()).toBe(0)
    }
    expect(ids[0]).toMatch(/^gw-[a-z0-9]+$/)
    expect(ids[1]).toBe(ids[0])
    expect((await readFile(path.join(dataDir, 'gateway-id'), 'utf8')).trim()).toBe(ids[0])

    const config = await writeConfig(dir, { gatewayId: 'plant-7', mqtt: { listeners: [{ type: 'tcp', port: 0 }] } })
    const renamed = await startGatewayProcess({ dataDir, config })
    expect(gatewayOf(renamed.ready)).toBe('plant-7')
    expect(warnings(renamed.stderr())).toEqual([
      expect.objectContaining({ level: 'warn', code: 'GW_WARN_GATEWAY_ID_CHANGED', gatewayId: 'plant-7', previous: ids[0] }),
    ])
    expect(await renamed.stop()).toBe(0)
    const again = await startGatewayProcess({ dataDir, config })
    expect(warnings(again.stderr())).toEqual([])
    expect(await again.stop()).toBe(0)
  }, TIMEOUT)
})

describe('start-up log', () => {
  it('is JSON lines with level names and ISO times, one "gateway started" line, and one warning line per weak setting', async () => {
    const dir = await scratch()
    const config = await writeConfig(dir, {
      store: { durability: 'async' },
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      users: [{ username: 'a', tenant: 'acme', role: 'device', password: WEAK_HASH }, { username: 'b', tenant: 'acme', role: 'device', password: WEAK_HASH }],
    })
    const gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    try {
      const lines = logLines(gw.stderr())
      expect(gw.stderr().trim().split('\n')).toHaveLength(lines.length) // nothing but JSON lines
      for (const l of lines) {
        expect(['trace', 'debug', 'info', 'warn', 'error', 'fatal']).toContain(l.level)
        expect(new Date(l.time).toISOString()).toBe(l.time)
      }
      expect(lines.filter((l) => l.msg === 'gateway started')).toEqual([
        expect.objectContaining({ level: 'info', gatewayId: gatewayOf(gw.ready), dataDir: path.join(dir, 'data') }),
      ])
      expect(warnings(gw.stderr()).map((l) => l.code).sort()).toEqual(['GW_WARN_ASYNC_DURABILITY', 'GW_WARN_WEAK_HASH'])
      expect(warnings(gw.stderr()).find((l) => l.code === 'GW_WARN_WEAK_HASH')).toMatchObject({ keys: ['users.0.password', 'users.1.password'] })
    } finally {
      expect(await gw.stop()).toBe(0)
    }
  }, TIMEOUT)

  it('--log-level and log.level choose the least severe level logged', async () => {
    const dir = await scratch()
    const quiet = await writeConfig(dir, { log: { level: 'warn' }, store: { durability: 'async' }, mqtt: { listeners: [{ type: 'tcp', port: 0 }] } })
    const byConfig = await startGatewayProcess({ dataDir: path.join(dir, 'a'), config: quiet })
    expect(await byConfig.stop()).toBe(0)
    expect(logLines(byConfig.stderr()).map((l) => l.level)).toEqual(['warn'])
    const byFlag = await startGatewayProcess({ dataDir: path.join(dir, 'b'), config: quiet, args: ['--log-level', 'error'] })
    expect(await byFlag.stop()).toBe(0)
    expect(logLines(byFlag.stderr())).toEqual([])
    const bad = await runCliWithin(['start', '--data-dir', path.join(dir, 'c'), '--log-level', 'loud'], 20_000)
    expect(bad.code).not.toBe(0)
    expect(bad.stdout).not.toContain(' ready: ')
  }, TIMEOUT)

  it('names a tenant\'s client by the id it sent and its tenant, and does not log a device that resets its connection', async () => {
    const dir = await scratch()
    const password = await hashPassword('pw', { N: 1024, r: 8, p: 1 })
    const config = await writeConfig(dir, {
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      users: [{ username: 'dev-1', tenant: 'acme', role: 'device', password }],
    })
    const gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    try {
      const vanishing = await connectOk(gw.mqttUrl, { clientId: 'dev-1', username: 'dev-1', password: 'pw', reconnectPeriod: 0 })
      const closed = new Promise((resolve) => vanishing.stream.once('close', resolve))
      ;(vanishing.stream as unknown as { resetAndDestroy (): void }).resetAndDestroy()
      await closed
      // A subscription to another device's commands is refused and logged: the line that shows the gateway has
      // handled the reset before it.
      const device = await connectOk(gw.mqttUrl, { clientId: 'dev-1', username: 'dev-1', password: 'pw', reconnectPeriod: 0 })
      device.subscribe('devices/dev-2/commands/#', { qos: 1 })
      expect(await waitFor(() => logLines(gw.stderr()).some((l) => l.msg.startsWith('subscription refused')), 10_000), gw.stderr()).toBe(true)
      await endAll([device])
      const lines = logLines(gw.stderr())
      expect(lines.find((l) => l.msg.startsWith('subscription refused'))).toMatchObject({ clientId: 'dev-1', tenant: 'acme' })
      expect(gw.stderr()).not.toContain('\\u0000')
      expect(lines.filter((l) => l.msg === 'client error' || l.msg === 'connection error')).toEqual([])
    } finally {
      expect(await gw.stop()).toBe(0)
    }
  }, TIMEOUT)
})

describe('start-up log on a terminal', () => {
  const hasScript = spawnSync('script', ['--version']).status === 0
  it.runIf(hasScript || process.env.CI === 'true')('is readable lines (pino-pretty), not JSON, and Ctrl-C stops the gateway gracefully', async () => {
    const dir = await scratch()
    // util-linux's script gives the gateway a pseudo-terminal as stdin, stdout and stderr. It runs the command through
    // $SHELL -c; `exec` makes the gateway the terminal's only foreground process whatever that shell is (dash would
    // otherwise stay in between and die of the Ctrl-C itself).
    const child = spawn('script', ['-qfec', `exec ${process.execPath} ${BIN} start --data-dir ${path.join(dir, 'data')} --mqtt-port 0 --http-port 0`, '/dev/null'],
      { cwd: ROOT, stdio: ['pipe', 'pipe', 'inherit'], env: { ...process.env, SHELL: '/bin/sh' } })
    let output = ''
    const exited = new Promise<number | null>((resolve) => child.once('exit', resolve))
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000)
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => { output += d.toString(); if (output.includes(' ready: ')) resolve() })
      void exited.then(() => reject(new Error(`exited before it was ready:\n${output}`)))
    })
    child.stdin.write('\u0003') // Ctrl-C: SIGINT to the terminal's foreground process, the gateway
    expect(await exited).toBe(0)
    clearTimeout(timer)
    expect(output).toMatch(/INFO.*gateway started/)
    expect(output).toMatch(/INFO.*shutting down/)
    expect(output).not.toContain('{"level"')
  }, 60_000)
})

describe('hashes refused at start', () => {
  it('a placeholder hash copied from an example (GW_BAD_PASSWORD_HASH), before the data directory is created', async () => {
    const dir = await scratch()
    for (const config of [
      { users: [{ username: 'line-7', tenant: 'acme', role: 'device', password: 'scrypt$16384$8$1$...$...' }] },
      { apiTokens: [{ name: 'ci', tenant: 'acme', role: 'service', tokenHash: 'scrypt$16384$8$1$c2FsdA==$aGFzaA==' }] },
    ]) {
      const file = await writeConfig(dir, { ...config, mqtt: { listeners: [{ type: 'tcp', port: 0 }] } })
      const r = await runCliWithin(['start', '--config', file, '--data-dir', path.join(dir, 'data'), '--http-port', '0'], 20_000)
      expect(r.timedOut).toBe(false)
      expect(r.code, r.stderr).toBe(1)
      expect(r.stderr).toMatch(/^edgemq: GW_BAD_PASSWORD_HASH: .*(users\.0\.password|apiTokens\.0\.tokenHash)/)
    }
  }, TIMEOUT)
})
