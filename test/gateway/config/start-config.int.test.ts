/**
 * What `edgemq start` refuses before it serves anything: a listener on a
 * non-loopback address with no users (GW_INSECURE_LISTENER, unless the
 * listener says allowAnonymous: true, which starts with a warning), and
 * invalid config files (GW_CONFIG_INVALID naming the key). Every run has a
 * deadline: a gateway that starts when it should refuse is killed and the
 * test fails.
 */
import { existsSync } from 'node:fs'
import { writeFile } from 'node:fs/promises'
import path from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { runCliWithin } from '../../helpers/cli-run.ts'
import { startGatewayProcess, tempDir, writeConfig } from '../../helpers/gateway-process.ts'
import { connectOk, endAll, subscribeGranted, collect, waitFor } from '../../helpers/mqtt-probe.ts'

const DEADLINE_MS = 20_000
const TIMEOUT = 40_000
const HASH = 'scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA='

const cleanups: Array<() => Promise<void>> = []
afterAll(async () => { for (const c of cleanups.reverse()) await c().catch(() => {}) })

async function scratch (): Promise<string> {
  const { dir, cleanup } = await tempDir('edgemq-start-')
  cleanups.push(cleanup)
  return dir
}

/** Runs `edgemq start --config <file>` expecting a refusal; returns stderr. */
async function startRefused (dir: string, file: string): Promise<string> {
  const dataDir = path.join(dir, 'data')
  const r = await runCliWithin(['start', '--config', file, '--data-dir', dataDir, '--http-port', '0'], DEADLINE_MS)
  expect(r.timedOut, `gateway did not exit:\n${r.stdout}\n${r.stderr}`).toBe(false)
  expect(r.code, r.stderr).toBe(1)
  expect(r.stdout).not.toContain(' ready: ')
  return r.stderr
}

describe('secure by default', () => {
  it('a non-loopback listener with no users refuses to start (GW_INSECURE_LISTENER), before touching the data dir or binding', async () => {
    const dir = await scratch()
    const file = await writeConfig(dir, { mqtt: { listeners: [{ name: 'lan', type: 'tcp', host: '0.0.0.0', port: 0 }] } })
    const stderr = await startRefused(dir, file)
    expect(stderr).toContain('GW_INSECURE_LISTENER')
    expect(stderr).toContain('lan')
    expect(stderr).toContain('0.0.0.0')
    // It failed before opening the database: the data directory was never created.
    expect(existsSync(path.join(dir, 'data'))).toBe(false)
  }, TIMEOUT)

  it('one insecure listener among loopback ones refuses the whole start; so does an IPv6 wildcard address', async () => {
    const dir = await scratch()
    for (const host of ['0.0.0.0', '::']) {
      const file = await writeConfig(dir, {
        mqtt: { listeners: [{ name: 'local', type: 'tcp', host: '127.0.0.1', port: 0 }, { name: 'exposed', type: 'ws', host, port: 0 }] },
      })
      const stderr = await startRefused(dir, file)
      expect(stderr, host).toContain('GW_INSECURE_LISTENER')
      expect(stderr, host).toContain('exposed')
      expect(existsSync(path.join(dir, 'data'))).toBe(false)
    }
  }, TIMEOUT)

  it('allowAnonymous: true on a non-loopback listener starts, logs a warning, and accepts anonymous clients', async () => {
    const dir = await scratch()
    const file = await writeConfig(dir, { mqtt: { listeners: [{ name: 'lan', type: 'tcp', host: '0.0.0.0', port: 0, allowAnonymous: true }] } })
    const gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config: file })
    try {
      const warning = gw.stderr().split('\n').find((l) => l.includes('allowAnonymous'))
      expect(warning, gw.stderr()).toBeDefined()
      expect(JSON.parse(warning as string)).toMatchObject({ level: 'warn', code: 'GW_WARN_ANONYMOUS_LISTENER', listener: 'lan', host: '0.0.0.0' })
      const port = new URL(gw.urls.lan as string).port
      const client = await connectOk(`mqtt://127.0.0.1:${port}`, { clientId: 'anon-lan' })
      const got = collect(client)
      expect(await subscribeGranted(client, 'devices/anon-lan/telemetry/#', 1)).toEqual([1])
      await client.publishAsync('devices/anon-lan/telemetry/t', 'hi', { qos: 1 })
      expect(await waitFor(() => got.length > 0, 5000)).toBe(true)
      await endAll([client])
    } finally {
      expect(await gw.stop()).toBe(0)
    }
  }, TIMEOUT)
})

interface BadConfig {
  readonly name: string
  readonly config: Record<string, unknown> | string
  /** Strings stderr must contain besides GW_CONFIG_INVALID (the key, and what is wrong with it). */
  readonly mentions: readonly string[]
}

const TLS_FILES = { cert: '/nonexistent/server.crt', key: '/nonexistent/server.key' }

const BAD_CONFIGS: readonly BadConfig[] = [
  { name: 'unknown top-level key', config: { mqttt: {} }, mentions: ['unknown key', '"mqttt"'] },
  { name: 'unknown nested key', config: { mqtt: { listeners: [{ type: 'tcp', port: 0, tlsx: {} }] } }, mentions: ['unknown key', 'mqtt.listeners.0.tlsx'] },
  { name: 'unknown key in a user', config: { users: [{ username: 'a', tenant: 'acme', role: 'device', passwd: HASH }] }, mentions: ['unknown key', 'users.0.passwd'] },
  { name: 'port out of range', config: { mqtt: { listeners: [{ type: 'tcp', port: 70000 }] } }, mentions: ['mqtt.listeners.0.port'] },
  { name: 'value of the wrong type', config: { shutdownTimeoutMs: 'soon' }, mentions: ['shutdownTimeoutMs', 'integer'] },
  { name: 'nested value of the wrong type', config: { http: { host: 42 } }, mentions: ['http.host', 'string'] },
  { name: 'value below its minimum', config: { mqtt: { listeners: [{ type: 'tcp', port: 0 }], maxPacketBytes: 10 } }, mentions: ['mqtt.maxPacketBytes'] },
  { name: 'unknown listener type', config: { mqtt: { listeners: [{ type: 'udp' }] } }, mentions: ['mqtt.listeners.0.type', 'tcp'] },
  { name: 'unknown role', config: { users: [{ username: 'a', tenant: 'acme', role: 'root' }] }, mentions: ['users.0.role', 'device'] },
  { name: 'password that is not a hash', config: { users: [{ username: 'a', tenant: 'acme', role: 'device', password: 'hunter2' }] }, mentions: ['users.0.password', 'edgemq passwd'] },
  { name: 'bad tenant name', config: { users: [{ username: 'a', tenant: 'ac me', role: 'device' }] }, mentions: ['users.0.tenant'] },
  { name: 'acl access that does not exist', config: { acl: [{ topic: 'x/#', access: 'read' }] }, mentions: ['acl.0.access'] },
  { name: 'acl rule without a topic', config: { acl: [{ access: 'publish' }] }, mentions: ['missing key', 'acl.0.topic'] },
  // `+` inside a level is matched as text: a deny rule on it would deny nothing.
  { name: 'acl rule with a + inside a level', config: { acl: [{ topic: 'devices/secret-+/#', access: 'subscribe', allow: false }] }, mentions: ['acl.0.topic', 'secret-+'] },
  { name: 'acl rule with # before the last level', config: { acl: [{ topic: 'x/#', access: 'both' }, { topic: 'devices/#/telemetry', access: 'publish' }] }, mentions: ['acl.1.topic'] },
  { name: 'route naming an unknown stream', config: { routes: [{ filter: 'devices/+/metrics/#', stream: 'metrics' }] }, mentions: ['routes.0.stream', 'metrics'] },
  { name: 'route with an invalid filter', config: { routes: [{ filter: 'devices/#/x', stream: 'telemetry' }] }, mentions: ['routes.0.filter'] },
  { name: 'tls listener without tls', config: { mqtt: { listeners: [{ type: 'tls', port: 0 }] } }, mentions: ['mqtt.listeners.0.tls'] },
  { name: 'requestCert without a CA', config: { mqtt: { listeners: [{ type: 'tls', port: 0, tls: { ...TLS_FILES, requestCert: true } }] } }, mentions: ['mqtt.listeners.0.tls.ca'] },
  { name: 'two listeners with one name', config: { mqtt: { listeners: [{ type: 'tcp', port: 0 }, { type: 'tcp', port: 0 }] } }, mentions: ['mqtt.listeners.1.name', 'tcp'] },
  { name: 'two users with one name', config: { users: [{ username: 'a', tenant: 't', role: 'device' }, { username: 'a', tenant: 'u', role: 'device' }] }, mentions: ['users.1.username'] },
  { name: 'a YAML syntax error', config: 'mqtt:\n  listeners: [\n', mentions: ['not valid YAML', 'line 3'] },
  { name: 'a duplicate YAML key', config: 'http:\n  port: 0\n  port: 1\n', mentions: ['not valid YAML', 'unique', 'port: 1'] },
  { name: 'a config that is not a mapping', config: '- just\n- a list\n', mentions: ['mapping'] },
]

describe.concurrent('config errors: `edgemq start --config` exits 1 naming the key', () => {
  for (const bad of BAD_CONFIGS) {
    it(bad.name, async () => {
      const dir = await scratch()
      const file = typeof bad.config === 'string'
        ? await writeFile(path.join(dir, 'edgemq.yaml'), bad.config).then(() => path.join(dir, 'edgemq.yaml'))
        // Were the config wrongly accepted, the gateway must still bind nothing but a free loopback port.
        : await writeConfig(dir, { mqtt: { listeners: [{ type: 'tcp', port: 0 }] }, ...bad.config })
      const stderr = await startRefused(dir, file)
      expect(stderr).toContain('GW_CONFIG_INVALID')
      expect(stderr).toContain(file)
      for (const m of bad.mentions) expect(stderr).toContain(m)
      expect(existsSync(path.join(dir, 'data'))).toBe(false)
    }, TIMEOUT)
  }

  it('a config file that does not exist', async () => {
    const dir = await scratch()
    const stderr = await startRefused(dir, path.join(dir, 'missing.yaml'))
    expect(stderr).toContain('GW_CONFIG_INVALID')
    expect(stderr).toContain('missing.yaml')
  }, TIMEOUT)

  it('an unreadable TLS certificate file stops start-up with GW_TLS_FILES naming tls.cert', async () => {
    const dir = await scratch()
    const file = await writeConfig(dir, { mqtt: { listeners: [{ name: 'secure', type: 'tls', port: 0, tls: TLS_FILES }] } })
    const stderr = await startRefused(dir, file)
    expect(stderr).toContain('GW_TLS_FILES')
    expect(stderr).toContain('tls.cert')
    expect(stderr).toContain('/nonexistent/server.crt')
  }, TIMEOUT)
})
