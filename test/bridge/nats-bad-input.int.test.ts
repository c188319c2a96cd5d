/**
 * A NATS upstream that cannot take the records — down at start, the stream
 * missing, a duplicate window too short, bad credentials, a subject the
 * stream does not cover — gives a clear coded error in the log, the status
 * API and `edgemq_bridge_upstream_error`, forwards nothing, and once the
 * cause is fixed upstream drains every acknowledged record exactly once.
 * And the credentials that work: user/password and NKey over TLS with a
 * client certificate, a token, and a creds file (NATS decentralized auth);
 * a missing or garbled creds file stops the start with its own code.
 */
import { writeFile } from 'node:fs/promises'
import path from 'node:path'
import { jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import { credsAuthenticator, nkeys, type NatsConnection } from '@nats-io/transport-node'
import { afterAll, describe, expect, it } from 'vitest'
import { runCliWithin } from '../helpers/cli-run.ts'
import { bridgeStatus, drained, freePort, publishAcked, waitFor, type UpstreamStatusDoc } from '../helpers/bridge-fixtures.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../helpers/gateway-process.ts'
import { natsOperatorSetup } from '../helpers/nats-fixtures.ts'
import { natsClient, natsPolicy, readStream, startNatsServer, type NatsServerProcess } from '../helpers/nats-process.ts'
import { createPki, opensslPolicy } from '../helpers/tls-fixtures.ts'

const policy = natsPolicy()
const bin = policy.bin
const openssl = opensslPolicy()

it.runIf(policy.missingInCi)('has nats-server under CI', () => {
  expect.fail('nats-server is missing: .ci/run installs it; the NATS-upstream tests cannot run')
})

const MINUTE_NS = 60_000 * 1_000_000

async function startEdge (dir: string, upstreams: Array<Record<string, unknown>>): Promise<GatewayProcess> {
  const config = await writeConfig(dir, {
    gatewayId: 'edge-1',
    mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    bridge: {
      commitIntervalMs: 100,
      upstreams: upstreams.map((u) => ({ name: 'js', forward: [{ stream: 'telemetry' }], reconnectMinMs: 50, reconnectMaxMs: 300, ...u })),
    },
  })
  return await startGatewayProcess({ dataDir: `${dir}/data`, config })
}

async function upstreamErrorMetric (httpUrl: string, upstream: string): Promise<string[]> {
  const text = await (await fetch(`${httpUrl}/metrics`)).text()
  return [...text.matchAll(new RegExp(`^edgemq_bridge_upstream_error\\{upstream="${upstream}",code="([A-Z_]+)"\\} 1$`, 'gm'))].map((m) => m[1] as string)
}

/** Waits until upstream `name` is down with error `code`, and checks the status, the metric and the log say so. */
async function expectDownWith (edge: GatewayProcess, name: string, code: string, backlog: number): Promise<UpstreamStatusDoc> {
  const status = await waitFor(`upstream ${name} to report ${code}`, async () => {
    const s = (await bridgeStatus(edge.httpUrl)).find((u) => u.name === name)
    return s?.lastError?.code === code ? s : undefined
  })
  expect(status.connected).toBe(false)
  expect(status.lastError?.resolvedAt).toBeNull()
  expect(status.forwardedMessages).toBe(0)
  expect(status.backlog.messages).toBe(backlog)
  expect(await upstreamErrorMetric(edge.httpUrl, name)).toEqual([code])
  const logged = edge.stderr().split('\n').filter((l) => l.includes(code) || l.includes('upstream connection failed'))
  expect(logged.length, `a log line about ${code}`).toBeGreaterThan(0)
  return status
}

describe.skipIf(bin === null)('bridge: NATS upstream errors', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })
  const setup = async (): Promise<string> => {
    const t = await tempDir('edgemq-nats-bad-')
    cleanups.push(t.cleanup)
    return t.dir
  }
  const nats = async (dir: string, extra: string[] = [], port?: number): Promise<NatsServerProcess> => {
    const n = await startNatsServer(bin as string, dir, { extra, ...(port === undefined ? {} : { port }) })
    cleanups.push(() => n.kill())
    return n
  }
  const client = async (url: string, options = {}): Promise<{ nc: NatsConnection, jsm: JetStreamManager }> => {
    const nc = await natsClient(url, options)
    cleanups.push(() => nc.close())
    return { nc, jsm: await jetstreamManager(nc) }
  }
  /** After the fix: everything acknowledged arrives once; the error is resolved and the metric back to nothing. */
  const expectRecovered = async (edge: GatewayProcess, nc: NatsConnection, stream: string, acked: readonly string[]): Promise<void> => {
    const status = await drained(edge.httpUrl, 'js')
    expect(status.forwardedMessages).toBe(acked.length)
    expect(status.lastError?.resolvedAt).not.toBeNull()
    // The gauges read a status at most 250 ms old: wait for one taken after the recovery.
    await waitFor('the error gauge to clear', async () => (await upstreamErrorMetric(edge.httpUrl, 'js')).length === 0 ? true : undefined)
    const stored = await readStream(nc, stream)
    expect(new Set(stored.map((m) => m.msgId)).size).toBe(acked.length)
    expect(stored.map((m) => m.payload).sort()).toEqual([...acked].sort())
  }

  it('upstream down at start: BRIDGE_NATS_UNREACHABLE, then drains when the server comes up', async () => {
    const dir = await setup()
    const port = await freePort()
    const edge = await startEdge(dir, [{ url: `nats://127.0.0.1:${port}`, nats: { stream: { create: true } } }])
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['dev-a', 'dev-b'], 50)
    const down = await expectDownWith(edge, 'js', 'BRIDGE_NATS_UNREACHABLE', acked.length)
    expect(down.connectFailures).toBeGreaterThan(0)
    expect(down.natsServer).toBeNull() // no server has answered yet: the table's PROTOCOL says just `nats`
    const table = await runCliWithin(['bridge', 'status', '--url', edge.httpUrl], 20_000)
    expect(table.stdout).toMatch(/\njs +- +no +nats +nats-msg-id /)
    expect(edge.stderr()).toContain('upstream connection failed; retrying')
    const n = await nats(dir, [], port)
    const { nc } = await client(n.url)
    await expectRecovered(edge, nc, 'EDGEMQ', acked)
  })

  it('stream missing (create: false): BRIDGE_NATS_STREAM_MISSING, then drains once someone creates it', async () => {
    const dir = await setup()
    const n = await nats(dir)
    const edge = await startEdge(dir, [{ url: n.url }])
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['dev-a', 'dev-b'], 50)
    const down = await expectDownWith(edge, 'js', 'BRIDGE_NATS_STREAM_MISSING', acked.length)
    expect(down.lastError?.message).toMatch(/stream EDGEMQ does not exist/)
    expect(edge.stderr()).toContain('NATS upstream cannot take the records')
    const { nc, jsm } = await client(n.url)
    await jsm.streams.add({ name: 'EDGEMQ', subjects: ['edgemq.>'], duplicate_window: 120 * MINUTE_NS })
    await expectRecovered(edge, nc, 'EDGEMQ', acked)
  })

  it('a duplicate window shorter than minDuplicateWindowMs: BRIDGE_NATS_DUPLICATE_WINDOW, then drains once it is widened', async () => {
    const dir = await setup()
    const n = await nats(dir)
    const { nc, jsm } = await client(n.url)
    await jsm.streams.add({ name: 'EDGEMQ', subjects: ['edgemq.>'], duplicate_window: 2 * MINUTE_NS })
    const edge = await startEdge(dir, [{ url: n.url, nats: { minDuplicateWindowMs: 600_000, stream: { duplicateWindowMs: 600_000 } } }])
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['dev-a'], 40)
    const down = await expectDownWith(edge, 'js', 'BRIDGE_NATS_DUPLICATE_WINDOW', acked.length)
    expect(down.lastError?.message).toMatch(/duplicate window of 120000 ms, below nats.minDuplicateWindowMs 600000 ms/)
    const info = await jsm.streams.info('EDGEMQ')
    await jsm.streams.update('EDGEMQ', { ...info.config, duplicate_window: 10 * MINUTE_NS })
    await expectRecovered(edge, nc, 'EDGEMQ', acked)
  })

  it('a stream that does not cover the subjects: BRIDGE_NATS_SUBJECT_NOT_COVERED, then drains once it does', async () => {
    const dir = await setup()
    const n = await nats(dir)
    const { nc, jsm } = await client(n.url)
    await jsm.streams.add({ name: 'EDGEMQ', subjects: ['edgemq.edge-2.>'], duplicate_window: 120 * MINUTE_NS })
    const edge = await startEdge(dir, [{ url: n.url }])
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['dev-a'], 40)
    const down = await expectDownWith(edge, 'js', 'BRIDGE_NATS_SUBJECT_NOT_COVERED', acked.length)
    expect(down.lastError?.message).toMatch(/does not cover edgemq\.edge-1\.default\.telemetry\.>/)
    const info = await jsm.streams.info('EDGEMQ')
    await jsm.streams.update('EDGEMQ', { ...info.config, subjects: ['edgemq.edge-2.>', 'edgemq.edge-1.>'] })
    await expectRecovered(edge, nc, 'EDGEMQ', acked)
  })

  it('bad credentials: BRIDGE_NATS_AUTH, then drains once the server accepts them', async () => {
    const dir = await setup()
    const port = await freePort()
    let n = await nats(dir, ['authorization { token: "right-token" }'], port)
    const edge = await startEdge(dir, [{ url: n.url, nats: { token: 'edge-token', stream: { create: true } } }])
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['dev-a'], 40)
    const down = await expectDownWith(edge, 'js', 'BRIDGE_NATS_AUTH', acked.length)
    expect(down.lastError?.message).toMatch(/authorization/i)
    await n.kill()
    n = await n.restart(['authorization { token: "edge-token" }'])
    cleanups.push(() => n.kill())
    const { nc } = await client(n.url, { token: 'edge-token' })
    await expectRecovered(edge, nc, 'EDGEMQ', acked)
  })

  it('a server without JetStream: BRIDGE_NATS_NO_JETSTREAM', async () => {
    const dir = await setup()
    const n = await startNatsServer(bin as string, dir, { jetstream: false })
    cleanups.push(() => n.kill())
    const edge = await startEdge(dir, [{ url: n.url, nats: { stream: { create: true } } }])
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['dev-a'], 20)
    await expectDownWith(edge, 'js', 'BRIDGE_NATS_NO_JETSTREAM', acked.length)
  })

  it('the stream deleted mid-run: the publishes fail, the uplink stops with BRIDGE_NATS_STREAM_MISSING and resumes once it is back', async () => {
    const dir = await setup()
    const n = await nats(dir)
    const { nc, jsm } = await client(n.url)
    const add = (): Promise<unknown> => jsm.streams.add({ name: 'EDGEMQ', subjects: ['edgemq.>'], duplicate_window: 120 * MINUTE_NS })
    await add()
    const edge = await startEdge(dir, [{ url: n.url, nats: { ackTimeoutMs: 2000 } }])
    cleanups.push(() => edge.kill())
    const first = await publishAcked(edge.mqttUrl, ['dev-a'], 30)
    await drained(edge.httpUrl, 'js')
    await jsm.streams.delete('EDGEMQ')
    const second = await publishAcked(edge.mqttUrl, ['dev-a'], 30, 30)
    await waitFor('the uplink to find the stream gone', async () => {
      const s = (await bridgeStatus(edge.httpUrl))[0]
      return s?.lastError?.code === 'BRIDGE_NATS_STREAM_MISSING' && !s.connected ? true : undefined
    })
    expect(edge.stderr()).toMatch(/BRIDGE_NATS_PUBLISH|BRIDGE_NATS_STREAM_MISSING/)
    await add()
    const status = await drained(edge.httpUrl, 'js')
    expect(status.forwardedMessages).toBe(first.length + second.length)
    // The recreated stream holds what came after the deletion (what was in it went with it).
    const stored = await readStream(nc, 'EDGEMQ')
    expect(stored.map((m) => m.payload).sort()).toEqual([...second].sort())
  })

  it('a record larger than the stream\'s max_msg_size is dead-lettered after maxDeliveryAttempts; the others flow', async () => {
    const dir = await setup()
    const n = await nats(dir)
    const { nc, jsm } = await client(n.url)
    await jsm.streams.add({ name: 'EDGEMQ', subjects: ['edgemq.>'], duplicate_window: 120 * MINUTE_NS, max_msg_size: 1024 })
    const edge = await startEdge(dir, [{ url: n.url, maxDeliveryAttempts: 2 }])
    cleanups.push(() => edge.kill())
    const mqtt = await import('mqtt')
    const device = await mqtt.default.connectAsync(edge.mqttUrl, { clientId: 'dev-a' })
    await device.publishAsync('devices/dev-a/telemetry/t', 'small-1', { qos: 1 })
    await device.publishAsync('devices/dev-a/telemetry/t', Buffer.alloc(4096, 120), { qos: 1 })
    await device.publishAsync('devices/dev-a/telemetry/t', 'small-2', { qos: 1 })
    await device.endAsync()
    const status = await drained(edge.httpUrl, 'js')
    expect(status.deadLettered).toBe(1)
    expect(status.forwardedMessages).toBe(2)
    expect(edge.stderr()).toContain('message dead-lettered: the upstream refuses it')
    expect((await readStream(nc, 'EDGEMQ')).map((m) => m.payload)).toEqual(['small-1', 'small-2'])
  })

  it('an unreadable nkeySeedFile stops the gateway at start with BRIDGE_NATS_CREDENTIALS_FILE', async () => {
    const dir = await setup()
    const config = await writeConfig(dir, {
      gatewayId: 'edge-1',
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      bridge: { upstreams: [{ name: 'js', url: 'nats://127.0.0.1:4222', nats: { nkeySeedFile: path.join(dir, 'missing.nk') } }] },
    })
    await expect(startGatewayProcess({ dataDir: `${dir}/data`, config })).rejects.toThrow(/BRIDGE_NATS_CREDENTIALS_FILE|cannot read nats.nkeySeedFile/)
  })

  it('a creds file (operator, account and user JWTs) logs in; a missing or garbled one stops the start, and nothing is lost', async () => {
    const dir = await setup()
    const auth = await natsOperatorSetup(dir)
    const port = await freePort()
    const url = `nats://127.0.0.1:${port}`
    // Records acknowledged while the server is down wait in the edge's log for a restart with working credentials.
    const first = await startEdge(dir, [{ url, nats: { credsFile: auth.credsFile, stream: { create: true } } }])
    const acked = await publishAcked(first.mqttUrl, ['dev-a', 'dev-b'], 20)
    expect(await first.stop()).toBe(0)

    const garbled = path.join(dir, 'garbled.creds')
    await writeFile(garbled, new TextDecoder().decode(auth.creds).replace(/^SU[A-Z2-7]+$/m, 'not-a-seed'), { mode: 0o600 })
    const armourless = path.join(dir, 'armourless.creds')
    await writeFile(armourless, 'eyJ0eXAiOiJKV1QifQ.e30.c2ln\n', { mode: 0o600 })
    for (const credsFile of [path.join(dir, 'missing.creds'), garbled, armourless]) {
      await expect(startEdge(dir, [{ url, nats: { credsFile, stream: { create: true } } }]), credsFile).rejects.toThrow(/BRIDGE_NATS_CREDENTIALS_FILE/)
    }

    const server = await nats(dir, [...auth.config], port)
    await expect(natsClient(url)).rejects.toThrow(/Authorization Violation/) // the server wants a login
    const edge = await startEdge(dir, [{ url, nats: { credsFile: auth.credsFile, stream: { create: true } } }])
    cleanups.push(() => edge.kill())
    const more = await publishAcked(edge.mqttUrl, ['dev-a', 'dev-b'], 10, 20)
    const { nc } = await client(server.url, { authenticator: credsAuthenticator(auth.creds) })
    await expectRecovered(edge, nc, 'EDGEMQ', [...acked, ...more])
  })

  it.skipIf(!openssl.available && !openssl.missingInCi)('user/password and NKey over TLS with a client certificate, and a token: each upstream gets every record', async () => {
    const dir = await setup()
    const pki = await createPki(path.join(dir, 'pki'))
    const user = nkeys.createUser()
    const seedFile = path.join(dir, 'edge.nk')
    await writeFile(seedFile, new TextDecoder().decode(user.getSeed()), { mode: 0o600 })
    const secure = await nats(dir, [
      `tls { cert_file: "${pki.server.cert}", key_file: "${pki.server.key}", ca_file: "${pki.caFile}", verify: true }`,
      `authorization { users: [ { user: "edge", password: "s3cret" }, { nkey: "${user.getPublicKey()}" } ] }`,
    ])
    const tokenized = await nats(dir, ['authorization { token: "t0k3n" }'])
    const cert = await pki.client('edge-1')
    const tls = { ca: pki.caFile, cert: cert.cert, key: cert.key }
    const edge = await startEdge(dir, [
      { name: 'pass', url: `tls://127.0.0.1:${secure.port}`, username: 'edge', password: 's3cret', tls, nats: { stream: { create: true, name: 'PASS', subjects: ['pass.>'] }, subject: 'pass.{topic}' } },
      { name: 'nkey', url: `tls://127.0.0.1:${secure.port}`, tls, nats: { nkeySeedFile: seedFile, stream: { create: true, name: 'NKEY', subjects: ['nkey.>'] }, subject: 'nkey.{topic}' } },
      { name: 'token', url: tokenized.url, nats: { token: 't0k3n', stream: { create: true } } },
    ])
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['dev-a', 'dev-b'], 30)
    for (const name of ['pass', 'nkey', 'token']) expect((await drained(edge.httpUrl, name)).forwardedMessages).toBe(acked.length)
    const { nc: secureNc } = await client(`tls://127.0.0.1:${secure.port}`, {
      user: 'edge', pass: 's3cret', tls: { caFile: pki.caFile, certFile: cert.cert, keyFile: cert.key },
    })
    expect(await readStream(secureNc, 'PASS')).toHaveLength(acked.length)
    expect(await readStream(secureNc, 'NKEY')).toHaveLength(acked.length)
    const { nc: tokenNc } = await client(tokenized.url, { token: 't0k3n' })
    expect(await readStream(tokenNc, 'EDGEMQ')).toHaveLength(acked.length)
  })
})
