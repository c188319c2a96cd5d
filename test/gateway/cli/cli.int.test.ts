/**
 * The client commands end to end: a real gateway child process, data from
 * real MQTT.js publishers, the `edgemq` CLI run as a user would. The
 * reference for "exactly the expected records" is the HTTP API's JSON fetch
 * (tested on its own in api.int.test.ts); after the gateway stops, the
 * offline reads (--data-dir) must equal the online ones byte for byte.
 */
import { spawn } from 'node:child_process'
import { readdir, readFile, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import path from 'node:path'
import { decodeMultiple } from 'cbor-x'
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { apiTokenName, generateApiToken, hashPassword, verifyPassword } from '../../../gateway/access/auth.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { sleep, waitFor } from '../../helpers/mqtt-probe.ts'

const ROOT = path.resolve(import.meta.dirname, '../../..')
const BIN = path.join(ROOT, 'gateway/edgemq.mjs')
const USER = 'acme-svc'
const PASSWORD = 'pw-of-acme-svc'
/** A bearer token of tenant acme (apiTokens), for --token and EDGEMQ_TOKEN. */
const TOKEN = generateApiToken('acme-cli')
const DEVICES = ['dev-1', 'dev-2', 'dev-3', 'dev-4', 'dev-5']
/** Messages per device in each phase; the phases are apart in time. */
const PHASES = [120, 30, 80] as const

interface Reading { readonly dev: string, readonly seq: number, readonly phase: number, readonly temp: number, readonly site: string }
interface ApiRecord { readonly offset: number, readonly timestamp: number, readonly key: string, readonly topic: string, readonly qos: number, readonly clientId: string, readonly payload: string }
/** A CLI output record: the API's record and its partition. */
type CliRecord = ApiRecord & { readonly partition: number }

interface Run { readonly code: number | null, readonly stdout: string, readonly stderr: string }

/** Runs `edgemq …` with a deadline, optionally with extra environment variables. */
function edgemq (args: readonly string[], env: Record<string, string> = {}, timeoutMs = 20_000): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, EDGEMQ_USER: '', EDGEMQ_PASSWORD: '', EDGEMQ_TOKEN: '', ...env } })
    let stdout = ''
    let stderr = ''
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString() })
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString() })
    child.on('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr }) })
  })
}

const lines = (text: string): CliRecord[] => text.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as CliRecord)
const reading = (r: ApiRecord): Reading => JSON.parse(r.payload) as Reading

/** Asserts a failed run: non-zero exit, nothing on stdout, `edgemq: <code>:` on stderr. */
function expectFailure (run: Run, code: string): void {
  expect({ code: run.code === 0 ? 0 : 'non-zero', stdout: run.stdout, error: /^edgemq: ([A-Z_]+):/.exec(run.stderr)?.[1] }, run.stderr)
    .toEqual({ code: 'non-zero', stdout: '', error: code })
}

describe('edgemq replay, tail, streams and groups', () => {
  let gw: GatewayProcess
  let dataDir: string
  let cleanup: () => Promise<void>
  const clients: MqttClient[] = []
  /** The log per telemetry partition, as the API serves it. */
  const reference = new Map<number, ApiRecord[]>()
  const phaseStart: number[] = []
  let auth: string[]
  /** Online outputs, compared with the offline ones once the gateway is stopped. */
  const online: Record<string, string> = {}

  async function api<T> (pathAndQuery: string, init: { method?: string, body?: unknown } = {}): Promise<T> {
    const res = await fetch(`${gw.httpUrl}${pathAndQuery}`, {
      method: init.method ?? 'GET',
      headers: { authorization: `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString('base64')}`, 'content-type': 'application/json' },
      body: init.body === undefined ? undefined : JSON.stringify(init.body),
    })
    const text = await res.text()
    if (!res.ok) throw new Error(`${pathAndQuery}: ${res.status} ${text}`)
    return JSON.parse(text) as T
  }

  /** The CLI's view of the reference: partition order, then offset order. */
  function expected (partitions: readonly number[], keep: (r: ApiRecord, index: number, all: ApiRecord[]) => boolean = () => true): CliRecord[] {
    return partitions.flatMap((p) => (reference.get(p) ?? []).filter(keep).map((r) => ({ partition: p, ...r })))
  }

  /** Records of a partition in [first index with ts >= from, first index with ts >= to): the API's time-range rule. */
  function timeRange (p: number, from: number, to: number): ApiRecord[] {
    const all = reference.get(p) ?? []
    const start = all.findIndex((r) => r.timestamp >= from)
    const endAt = all.findIndex((r) => r.timestamp >= to)
    return start < 0 ? [] : all.slice(start, endAt < 0 ? all.length : endAt)
  }

  beforeAll(async () => {
    ({ dir: dataDir, cleanup } = await tempDir('edgemq-cli-'))
    const config = await writeConfig(dataDir, {
      users: [{ username: USER, tenant: 'acme', role: 'service', password: await hashPassword(PASSWORD, { N: 1024, r: 8, p: 1 }) }],
      apiTokens: [{ name: 'acme-cli', tenant: 'acme', role: 'service', tokenHash: await hashPassword(TOKEN, { N: 1024, r: 8, p: 1 }) }],
      streams: { telemetry: { partitions: 2, retentionMs: 0 }, events: { partitions: 1, retentionMs: 0 }, commands: { partitions: 1 } },
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    })
    gw = await startGatewayProcess({ dataDir: path.join(dataDir, 'data'), config })
    auth = ['--url', gw.httpUrl, '--user', USER, '--password', PASSWORD]

    const feeder = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'acme-feeder', username: USER, password: PASSWORD, protocolVersion: 4, reconnectPeriod: 0 })
    clients.push(feeder)
    const seq = new Map<string, number>()
    for (let phase = 0; phase < PHASES.length; phase++) {
      if (phase > 0) await sleep(30)
      const sends: Array<Promise<unknown>> = []
      for (let i = 0; i < PHASES[phase]!; i++) {
        for (const dev of DEVICES) {
          const n = seq.get(dev) ?? 0
          seq.set(dev, n + 1)
          const r: Reading = { dev, seq: n, phase, temp: (n * 7) % 50, site: n % 3 === 0 ? 'a' : 'b' }
          sends.push(feeder.publishAsync(`devices/${dev}/telemetry/${n % 2 === 0 ? 'temp' : 'hum'}`, JSON.stringify(r), { qos: 1 }))
        }
      }
      await Promise.all(sends)
    }
    for (const p of [0, 1]) {
      reference.set(p, (await api<{ records: ApiRecord[] }>(`/v1/streams/telemetry/partitions/${p}/records?maxRecords=100000&maxBytes=67108864`)).records)
    }
    const all = [...reference.values()].flat()
    expect(all.length).toBe(DEVICES.length * PHASES.reduce((a, b) => a + b, 0))
    expect([...reference.values()].every((records) => records.length > 0)).toBe(true)
    for (let phase = 0; phase < PHASES.length; phase++) phaseStart.push(Math.min(...all.filter((r) => reading(r).phase === phase).map((r) => r.timestamp)))
  }, 60_000)

  afterAll(async () => {
    await Promise.all(clients.map((c) => c.endAsync().catch(() => {})))
    await gw?.kill()
    await cleanup?.()
  }, 30_000)

  it('replays every partition, in partition then offset order, as NDJSON', async () => {
    const run = await edgemq(['replay', '--stream', 'telemetry', ...auth])
    expect(run.code, run.stderr).toBe(0)
    expect(run.stderr).toBe('') // piped: no progress bar, nothing else
    expect(lines(run.stdout)).toEqual(expected([0, 1]))
    online.all = run.stdout
  })

  it('replays an offset range of one partition', async () => {
    const run = await edgemq(['replay', '--stream', 'telemetry', '--partition', '1', '--from', '100', '--to', '250', ...auth])
    expect(run.code, run.stderr).toBe(0)
    expect(lines(run.stdout)).toEqual(expected([1], (r) => r.offset >= 100 && r.offset < 250))
    expect(lines(run.stdout)).toHaveLength(150)
    // --max-records ends a replay early, stored batches or filtered NDJSON alike.
    const [first5, first5Filtered] = await Promise.all([
      edgemq(['replay', '--stream', 'telemetry', '--partition', '1', '--from', '100', '--max-records', '5', ...auth]),
      edgemq(['replay', '--stream', 'telemetry', '--partition', '1', '--from', '100', '--max-records', '5', '--topic', '#', ...auth]),
    ])
    for (const r of [first5, first5Filtered]) {
      expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: '' })
      expect(lines(r.stdout)).toEqual(expected([1], (x) => x.offset >= 100 && x.offset < 105))
    }
  })

  it('replays a time range, given as ISO 8601 or @epoch ms, through every partition', async () => {
    const from = phaseStart[1]!
    const to = phaseStart[2]!
    const want = [0, 1].flatMap((p) => timeRange(p, from, to).map((r) => ({ partition: p, ...r })))
    expect(want.length).toBe(DEVICES.length * PHASES[1])
    const iso = await edgemq(['replay', '--stream', 'telemetry', '--from', new Date(from).toISOString(), '--to', new Date(to).toISOString(), ...auth])
    expect(iso.code, iso.stderr).toBe(0)
    expect(lines(iso.stdout)).toEqual(want)
    const ms = await edgemq(['replay', '--stream', 'telemetry', '--from', `@${from}`, '--to', `@${to}`, ...auth])
    expect(ms.stdout).toBe(iso.stdout)
    online.time = iso.stdout
  })

  it('filters by device, topic and --where, as the API does', async () => {
    const [device, topic, where] = await Promise.all([
      edgemq(['replay', '--stream', 'telemetry', '--device', 'dev-2', '--from', `@${phaseStart[1]!}`, ...auth]),
      edgemq(['replay', '--stream', 'telemetry', '--topic', 'devices/+/telemetry/hum', '--topic', 'devices/dev-1/#', ...auth]),
      edgemq(['replay', '--stream', 'telemetry', '--where', 'temp > 30 and site = "a"', ...auth]),
    ])
    for (const run of [device, topic, where]) expect({ code: run.code, stderr: run.stderr }).toEqual({ code: 0, stderr: '' })
    const devPartition = [0, 1].find((p) => reference.get(p)!.some((r) => r.key === 'dev-2'))!
    expect(lines(device.stdout)).toEqual(timeRange(devPartition, phaseStart[1]!, Infinity).filter((r) => r.key === 'dev-2').map((r) => ({ partition: devPartition, ...r })))
    expect(lines(device.stdout).length).toBe(PHASES[1] + PHASES[2])
    expect(lines(topic.stdout)).toEqual(expected([0, 1], (r) => r.topic.endsWith('/hum') || r.key === 'dev-1'))
    const hot = expected([0, 1], (r) => reading(r).temp > 30 && reading(r).site === 'a')
    expect(hot.length).toBeGreaterThan(0)
    expect(lines(where.stdout)).toEqual(hot)
    online.where = where.stdout
  })

  it('writes JSON and CBOR, to stdout or --out', async () => {
    const out = path.join(dataDir, 'replay.json')
    const json = await edgemq(['replay', '--stream', 'telemetry', '--partition', '0', '--format', 'json', '--out', out, ...auth])
    expect(json.code, json.stderr).toBe(0)
    expect(json.stdout).toBe('')
    expect(JSON.parse(await readFile(out, 'utf8'))).toEqual(expected([0]))
    const cbor = await new Promise<Buffer>((resolve) => {
      const child = spawn(process.execPath, [BIN, 'replay', '--stream', 'telemetry', '--partition', '0', '--format', 'cbor', ...auth], { cwd: ROOT })
      const chunks: Buffer[] = []
      child.stdout.on('data', (d: Buffer) => chunks.push(d))
      child.on('close', () => resolve(Buffer.concat(chunks)))
    })
    const docs = decodeMultiple(cbor) as Array<Record<string, unknown> & { payload: Uint8Array }>
    expect(docs.map((d) => ({ ...d, payload: Buffer.from(d.payload).toString('utf8') }))).toEqual(expected([0]))
    const empty = await edgemq(['replay', '--stream', 'commands', '--format', 'json', ...auth])
    expect(JSON.parse(empty.stdout)).toEqual([])
  })

  it('leaves an existing --out file as it was when the replay fails, and replaces it when it succeeds', async () => {
    const out = path.join(dataDir, 'kept.ndjson')
    await writeFile(out, 'the previous replay\n')
    const failed = await edgemq(['replay', '--stream', 'telemetry', '--partition', '0', '--from', '999999999', '--out', out, ...auth])
    expect(failed.code).not.toBe(0)
    expect(failed.stderr).toMatch(/OUT_OF_RANGE/)
    expect(await readFile(out, 'utf8')).toBe('the previous replay\n')
    expect((await readdir(dataDir)).filter((f) => f.includes('kept.ndjson'))).toEqual(['kept.ndjson'])
    const ok = await edgemq(['replay', '--stream', 'telemetry', '--partition', '0', '--out', out, ...auth])
    expect(ok.code, ok.stderr).toBe(0)
    expect(lines(await readFile(out, 'utf8'))).toEqual(expected([0]))
    expect((await readdir(dataDir)).filter((f) => f.includes('kept.ndjson'))).toEqual(['kept.ndjson'])
  })

  it('lists streams as a table and as the API\'s JSON', async () => {
    const [tableRun, jsonRun] = await Promise.all([
      edgemq(['streams', ...auth]),
      edgemq(['streams', '--json', ...auth]),
    ])
    expect(tableRun.code, tableRun.stderr).toBe(0)
    const rows = tableRun.stdout.trim().split('\n').map((l) => l.split(/\s{2,}/))
    expect(rows[0]).toEqual(['STREAM', 'PARTITION', 'LOG-START', 'LOG-END', 'RECORDS', 'BYTES', 'OLDEST', 'NEWEST'])
    const viaApi = await api<{ streams: Array<{ name: string, partitions: Array<{ partition: number, logEndOffset: number, bytes: number }> }> }>('/v1/streams')
    expect(rows.slice(1).map((r) => [r[0], Number(r[1]), Number(r[3]), Number(r[5])]))
      .toEqual(viaApi.streams.flatMap((s) => s.partitions.map((p) => [s.name, p.partition, p.logEndOffset, p.bytes])))
    expect(JSON.parse(jsonRun.stdout)).toEqual(viaApi)
  })

  it('lists, resets and deletes consumer groups', async () => {
    await api('/v1/groups/billing/streams/telemetry/commit', { method: 'POST', body: { offsets: [{ partition: 0, offset: 10 }] } })
    await api('/v1/groups/audit/streams/telemetry/commit', { method: 'POST', body: { offsets: [{ partition: 1, offset: 7 }] } })
    const env = { EDGEMQ_USER: USER, EDGEMQ_PASSWORD: PASSWORD }
    const url = ['--url', gw.httpUrl]
    const committed = (stdout: string, group: string): Array<[number, string]> => stdout.trim().split('\n').slice(1).map((l) => l.split(/\s+/))
      .filter((c) => c[0] === group && c[1] === 'telemetry').map((c) => [Number(c[2]), c[3] as string])

    // Credentials from the environment; `groups` alone lists.
    const list = await edgemq(['groups', ...url], env)
    expect(list.code, list.stderr).toBe(0)
    expect(committed(list.stdout, 'billing')).toEqual([[0, '10'], [1, '-']])
    expect(committed(list.stdout, 'audit')).toEqual([[0, '-'], [1, '7']])

    const end = [0, 1].map((p) => reference.get(p)!.at(-1)!.offset + 1)
    const latest = await edgemq(['groups', 'reset', '--group', 'billing', '--stream', 'telemetry', '--to', 'latest', ...url], env)
    expect(latest.code, latest.stderr).toBe(0)
    expect(committed(latest.stdout, 'billing')).toEqual([[0, String(end[0])], [1, String(end[1])]])

    const t = phaseStart[2]!
    const byTime = await edgemq(['groups', 'reset', '--group', 'billing', '--stream', 'telemetry', '--to', new Date(t).toISOString(), ...url], env)
    expect(committed(byTime.stdout, 'billing')).toEqual([0, 1].map((p) => [p, String(timeRange(p, t, Infinity)[0]!.offset)]))

    const one = await edgemq(['groups', 'reset', '--group', 'billing', '--stream', 'telemetry', '--to', '5', '--partition', '1', '--json', ...url], env)
    const doc = JSON.parse(one.stdout) as { partitions: Array<{ partition: number, committedOffset: number, lagMessages: number }> }
    expect(doc.partitions[1]).toMatchObject({ partition: 1, committedOffset: 5, lagMessages: end[1]! - 5 })

    const deleted = await edgemq(['groups', 'delete', '--group', 'billing', ...url], env)
    expect(deleted.code, deleted.stderr).toBe(0)
    const after = await edgemq(['groups', 'list', '--json', ...url], env)
    expect((JSON.parse(after.stdout) as { groups: Array<{ group: string }> }).groups.map((g) => g.group)).toEqual(['audit'])
    expectFailure(await edgemq(['groups', 'delete', '--group', 'billing', ...url], env), 'CLI_UNKNOWN_GROUP')
  })

  it('tail prints the records appended after it started, then stops when interrupted', async () => {
    const events = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'acme-events', username: USER, password: PASSWORD, protocolVersion: 4, reconnectPeriod: 0 })
    clients.push(events)
    for (let i = 0; i < 5; i++) await events.publishAsync('devices/dev-9/events/boot', JSON.stringify({ n: -1 - i }), { qos: 1 })
    const child = spawn(process.execPath, [BIN, 'tail', '--stream', 'events', ...auth], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString() })
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString() })
    const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)))
    // Keep appending until tail has printed 10 records (it needs a moment to start).
    let n = 0
    const want = 10
    const printed = (): number => stdout.split('\n').filter((l) => l !== '').length
    const ok = waitFor(() => printed() >= want, 20_000)
    const publisher = (async () => {
      while (printed() < want && child.exitCode === null) {
        await events.publishAsync('devices/dev-9/events/tick', JSON.stringify({ n: n++ }), { qos: 1 })
        await sleep(50)
      }
    })()
    const [printedInTime] = await Promise.all([ok, publisher])
    expect(printedInTime).toBe(true)
    child.kill('SIGINT')
    expect(await exited, stderr).toBe(0)
    const got = lines(stdout)
    expect(got.length).toBeGreaterThanOrEqual(want)
    // Only new records (offset 5 on), gapless, in order, with their payloads.
    expect(got[0]!.offset).toBeGreaterThanOrEqual(5)
    expect(got.map((r) => r.offset)).toEqual(got.map((_, i) => got[0]!.offset + i))
    const seqs = got.map((r) => (JSON.parse(r.payload) as { n: number }).n)
    expect(seqs.every((s) => s >= 0)).toBe(true)
    expect(seqs).toEqual(seqs.map((_, i) => seqs[0]! + i))

    // --max-records ends a tail by itself.
    const bounded = await edgemq(['tail', '--stream', 'events', '--from', 'earliest', '--max-records', '3', ...auth])
    expect(bounded.code, bounded.stderr).toBe(0)
    expect(lines(bounded.stdout).map((r) => r.offset)).toEqual([0, 1, 2])
  })

  it('authenticates with a bearer token from --token or EDGEMQ_TOKEN', async () => {
    const url = ['--url', gw.httpUrl]
    const [byFlag, byEnv, streams] = await Promise.all([
      edgemq(['replay', '--stream', 'telemetry', '--token', TOKEN, ...url]),
      edgemq(['replay', '--stream', 'telemetry', ...url], { EDGEMQ_TOKEN: TOKEN }),
      edgemq(['streams', '--json', ...url], { EDGEMQ_TOKEN: TOKEN }),
    ])
    for (const run of [byFlag, byEnv, streams]) expect({ code: run.code, stderr: run.stderr }).toEqual({ code: 0, stderr: '' })
    expect(lines(byFlag.stdout)).toEqual(expected([0, 1]))
    expect(byEnv.stdout).toBe(byFlag.stdout)
    expect((JSON.parse(streams.stdout) as { tenant: string }).tenant).toBe('acme')
    // A flag of one kind overrides the environment of the other.
    const flagOverEnv = await edgemq(['streams', '--user', USER, '--password', PASSWORD, ...url], { EDGEMQ_TOKEN: 'emq_x_garbage' })
    expect(flagOverEnv.code, flagOverEnv.stderr).toBe(0)
  })

  it('makes tokens with `edgemq token`: the token, and the config entry holding its hash', async () => {
    const run = await edgemq(['token', '--name', 'ci-reader', '--tenant', 'acme', '--role', 'admin', '--json'])
    expect(run.code, run.stderr).toBe(0)
    const { token, apiToken } = JSON.parse(run.stdout) as { token: string, apiToken: { name: string, tenant: string, role: string, tokenHash: string } }
    expect(apiTokenName(token)).toBe('ci-reader')
    expect(apiToken).toMatchObject({ name: 'ci-reader', tenant: 'acme', role: 'admin', tokenHash: expect.stringMatching(/^scrypt\$16384\$/) })
    expect(await verifyPassword(apiToken.tokenHash, token)).toBe(true)
    const human = await edgemq(['token', '--name', 'ops'])
    expect(human.code, human.stderr).toBe(0)
    const [, tokenLine, , entryLine] = human.stdout.split('\n')
    expect(apiTokenName(tokenLine!)).toBe('ops')
    expect(entryLine).toMatch(/^- \{ name: ops, tenant: default, role: service, tokenHash: "scrypt\$[^"]+" \}$/)
  })

  it('gives each bad input its error and a non-zero exit', async () => {
    const closed = await new Promise<number>((resolve) => {
      const server = createServer().listen(0, '127.0.0.1', () => {
        const { port } = server.address() as { port: number }
        server.close(() => resolve(port))
      })
    })
    const cases: Array<[string, string[]]> = [
      ['CLI_UNKNOWN_STREAM', ['replay', '--stream', 'nope', ...auth]],
      ['CLI_UNKNOWN_PARTITION', ['replay', '--stream', 'telemetry', '--partition', '2', ...auth]],
      ['CLI_BAD_TIME', ['replay', '--stream', 'telemetry', '--from', '2024-05-01T02:00', ...auth]],
      ['CLI_BAD_TIME', ['replay', '--stream', 'telemetry', '--to', 'tomorrow', ...auth]],
      ['CLI_BAD_RANGE', ['replay', '--stream', 'telemetry', '--partition', '0', '--from', '20', '--to', '10', ...auth]],
      ['CLI_BAD_FILTER', ['replay', '--stream', 'telemetry', '--where', 'temp > > 30', ...auth]],
      ['CLI_BAD_TOPIC_FILTER', ['replay', '--stream', 'telemetry', '--topic', 'devices/#/x', ...auth]],
      ['CLI_OFFSET_OUT_OF_RANGE', ['replay', '--stream', 'telemetry', '--partition', '0', '--from', '999999', ...auth]],
      ['CLI_BAD_ARGUMENT', ['replay', '--stream', 'telemetry', '--from', '3', ...auth]],
      ['CLI_AUTH', ['replay', '--stream', 'telemetry', '--url', gw.httpUrl, '--user', USER, '--password', 'wrong']],
      ['CLI_AUTH', ['streams', '--url', gw.httpUrl]],
      ['CLI_UNREACHABLE', ['replay', '--stream', 'telemetry', '--url', `http://127.0.0.1:${closed}`]],
      ['CLI_UNREACHABLE', ['tail', '--stream', 'telemetry', '--url', `http://127.0.0.1:${closed}`]],
      ['CLI_GATEWAY_RUNNING', ['replay', '--stream', 'telemetry', '--data-dir', path.join(dataDir, 'data'), '--tenant', 'acme']],
      ['CLI_NO_DATA', ['streams', '--data-dir', path.join(dataDir, 'no-such-dir')]],
      ['CLI_BAD_ARGUMENT', ['streams', '--data-dir', path.join(dataDir, 'data'), '--url', gw.httpUrl]],
      ['CLI_AUTH', ['streams', '--url', gw.httpUrl, '--token', generateApiToken('acme-cli')]],
      ['CLI_AUTH', ['streams', '--url', gw.httpUrl, '--token', 'not-a-token']],
      ['CLI_BAD_ARGUMENT', ['streams', '--url', gw.httpUrl, '--token', TOKEN, '--user', USER]],
      ['CLI_BAD_ARGUMENT', ['streams', '--url', gw.httpUrl, '--token', 'has space']],
      ['CLI_BAD_ARGUMENT', ['streams', '--data-dir', path.join(dataDir, 'data'), '--token', TOKEN]],
      ['CLI_BAD_ARGUMENT', ['token', '--name', 'bad name']],
      ['CLI_BAD_ARGUMENT', ['token', '--name', 'ok', '--tenant', 'a/b']],
    ]
    // A few at a time: two dozen CLI processes at once on a shared 2-core machine can outlast the per-run deadline; and six
    // at once under a load average of 15-30 outlasted 20 s (a run killed at its deadline prints nothing), so 60 s here.
    const runs: Run[] = []
    for (let i = 0; i < cases.length; i += 6) runs.push(...await Promise.all(cases.slice(i, i + 6).map(([, args]) => edgemq(args, {}, 60_000))))
    // Both credentials in the environment: ambiguous, refused.
    expectFailure(await edgemq(['streams', '--url', gw.httpUrl], { EDGEMQ_TOKEN: TOKEN, EDGEMQ_USER: USER, EDGEMQ_PASSWORD: PASSWORD }), 'CLI_BAD_ARGUMENT')
    cases.forEach(([code], i) => expectFailure(runs[i]!, code))
    const byCode = (code: string, nth = 0): Run => runs.filter((_, i) => cases[i]![0] === code)[nth]!
    expect(byCode('CLI_GATEWAY_RUNNING').stderr).toContain('the gateway is running; use --url')
    expect(byCode('CLI_BAD_FILTER').stderr).toContain('position 7:\n  temp > > 30\n         ^')
    expect(byCode('CLI_OFFSET_OUT_OF_RANGE').stderr).toContain(`up to ${reference.get(0)!.length} (exclusive)`)
    expect(byCode('CLI_UNREACHABLE').stderr).toContain(`127.0.0.1:${closed}`)
  })

  it('reads the same records from a stopped gateway\'s data directory', async () => {
    await Promise.all(clients.map((c) => c.endAsync().catch(() => {})))
    online.streams = (await edgemq(['streams', '--json', ...auth])).stdout
    expect(await gw.stop()).toBe(0)
    const offline = ['--data-dir', path.join(dataDir, 'data'), '--tenant', 'acme']
    // One at a time: LevelDB lets one process open the data directory.
    const all = await edgemq(['replay', '--stream', 'telemetry', ...offline])
    const time = await edgemq(['replay', '--stream', 'telemetry', '--from', new Date(phaseStart[1]!).toISOString(), '--to', new Date(phaseStart[2]!).toISOString(), ...offline])
    const where = await edgemq(['replay', '--stream', 'telemetry', '--where', 'temp > 30 and site = "a"', ...offline])
    const streams = await edgemq(['streams', '--json', ...offline])
    const groups = await edgemq(['groups', 'list', ...offline])
    const unknown = await edgemq(['replay', '--stream', 'nope', ...offline])
    expect(all.code, all.stderr).toBe(0)
    expect(all.stdout).toBe(online.all)
    expect(time.stdout).toBe(online.time)
    expect(where.stdout).toBe(online.where)
    expect(JSON.parse(streams.stdout)).toEqual(JSON.parse(online.streams!))
    expect(groups.stdout.trim().split('\n').slice(1).map((l) => l.split(/\s+/).slice(0, 4))).toEqual([['audit', 'telemetry', '0', '-'], ['audit', 'telemetry', '1', '7']])
    expectFailure(unknown, 'CLI_UNKNOWN_STREAM')
    // Another tenant's data is not there under this tenant's names.
    expectFailure(await edgemq(['replay', '--stream', 'telemetry', '--data-dir', path.join(dataDir, 'data'), '--tenant', 'globex']), 'CLI_UNKNOWN_STREAM')
  })
})
