/**
 * The surfaces that read the log agree: for the same range and topic filter,
 * the HTTP API (GET …/records, NDJSON), `edgemq replay` from a stopped
 * gateway's data directory, `edgemq replay` over HTTP (stored batches, or
 * NDJSON filtered by the gateway) and MQTT `$replay` return the same
 * records — the ones the seed says the range holds. They all plan and read
 * through gateway/query/read-plan.ts; this test holds them to it end to end.
 *
 * The log: 3,000 records of six devices in `default/telemetry` (4
 * partitions), one second apart, appended in concurrent groups so that the
 * partitions hold many batches of different sizes.
 */
import path from 'node:path'
import { PassThrough } from 'node:stream'
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ApiClient } from '../../../gateway/cli/http-client.ts'
import { openDataDir } from '../../../gateway/cli/offline.ts'
import { httpSource, offlineSource, replay, type Position, type ReadSpec, type ReplaySource } from '../../../gateway/cli/replay.ts'
import { openLogStore, partitionForKey } from '../../../store/index.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { subscribeGranted, waitFor } from '../../helpers/mqtt-probe.ts'

const BASE = Date.parse('2026-01-01T00:00:00Z')
const N = 3000
const DEVICES = 6
const PARTITIONS = 4
const STREAMS = {
  telemetry: { partitions: PARTITIONS, retentionMs: 0 }, events: { partitions: 1, retentionMs: 0 }, commands: { partitions: 1, retentionMs: 0 },
}

interface Seeded {
  readonly i: number
  readonly key: string
  readonly topic: string
  readonly partition: number
  readonly offset: number
  readonly timestamp: number
}

/** A request as every surface can ask it: a range (start and optional end) and one topic filter; `key` reads that device's partition. */
interface Case {
  readonly name: string
  readonly from: Position
  readonly to: Position | undefined
  readonly topic: string
  readonly key?: string
}

const payloadOf = (i: number): string => `{"i":${i}}`

describe('every surface reads the same records for the same request', () => {
  let seeded: Seeded[] = []
  let dataDir: string
  let gw: GatewayProcess | undefined
  let client: MqttClient | undefined
  const cleanups: Array<() => Promise<void>> = []
  /** What each surface returned, per case: sorted payloads. */
  const results = new Map<string, Map<string, string[]>>()

  const cases: Case[] = [
    {
      name: 'a time range, one topic of every device',
      from: { kind: 'time', timestamp: BASE + 400_000 }, to: { kind: 'time', timestamp: BASE + 2_100_500 }, topic: 'devices/+/telemetry/temp',
    },
    { name: 'everything', from: { kind: 'earliest' }, to: undefined, topic: 'devices/+/telemetry/#' },
    {
      name: 'a time range wider than the log',
      from: { kind: 'time', timestamp: BASE - 3_600_000 }, to: { kind: 'time', timestamp: BASE + 10 * 86_400_000 }, topic: '#',
    },
    { name: 'from after the last record', from: { kind: 'time', timestamp: BASE + 86_400_000 }, to: undefined, topic: '#' },
    {
      name: 'an offset range of one device',
      from: { kind: 'offset', offset: 50 }, to: { kind: 'offset', offset: 300 }, topic: 'devices/dev-3/#', key: 'dev-3',
    },
  ]

  /** The records the seed says a case holds. */
  function expected (c: Case): string[] {
    const partition = c.key === undefined ? undefined : (seeded.find((r) => r.key === c.key) as Seeded).partition
    return seeded.filter((r) => {
      if (partition !== undefined && r.partition !== partition) return false
      if (!matches(c.topic, r.topic)) return false
      const at = (p: Position): number => p.kind === 'time' ? (r.timestamp >= p.timestamp ? 1 : -1) : p.kind === 'offset' ? (r.offset >= p.offset ? 1 : -1) : 1
      return at(c.from) > 0 && (c.to === undefined || at(c.to) < 0)
    }).map((r) => payloadOf(r.i)).sort()
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-surfaces-')
    cleanups.push(cleanup)
    dataDir = path.join(dir, 'data')
    const store = await openLogStore({ location: path.join(dataDir, 'db'), durability: 'async' })
    for (const [name, s] of Object.entries(STREAMS)) await store.createStream(`default/${name}`, s)
    for (let i = 0; i < N; i += 89) {
      const group = Array.from({ length: Math.min(89, N - i) }, (_, k) => i + k)
      const results = await Promise.all(group.map((j) => {
        const key = `dev-${j % DEVICES}`
        const topic = `devices/${key}/telemetry/${j % 3 === 0 ? 'temp' : 'hum'}`
        return store.append('default/telemetry', key, { payload: Buffer.from(payloadOf(j)), topic, timestamp: BASE + j * 1000, qos: 1, clientId: key })
          .then((at) => ({ i: j, key, topic, partition: at.partition, offset: at.offset, timestamp: BASE + j * 1000 }))
      }))
      seeded.push(...results)
    }
    await store.close()
    seeded = seeded.sort((a, b) => a.i - b.i)
    for (const c of cases) results.set(c.name, new Map())

    // A stopped gateway's data directory first: the gateway's LevelDB lock keeps it from being read while it runs.
    const log = await openDataDir(dataDir, 'default')
    try {
      for (const c of cases) results.get(c.name)?.set('cli --data-dir', await cliReplay(offlineSource(log), c))
    } finally {
      await log.close()
    }

    const config = await writeConfig(dir, { streams: STREAMS, mqtt: { listeners: [{ type: 'tcp', port: 0, allowAnonymous: true }] } })
    gw = await startGatewayProcess({ dataDir, config })
    client = await mqtt.connectAsync(gw.mqttUrl, { protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })
    for (const c of cases) {
      const surfaces = results.get(c.name) as Map<string, string[]>
      surfaces.set('http', await httpRecords(gw.httpUrl, c))
      surfaces.set('cli --url', await cliReplay(httpSource(new ApiClient({ url: gw.httpUrl })), c))
      surfaces.set('$replay', await mqttReplay(client, c))
    }
  }, 180_000)

  afterAll(async () => {
    await client?.endAsync().catch(() => {})
    await gw?.stop()
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it.each(cases.map((c) => [c.name, c] as const))('%s', (_name, c) => {
    const want = expected(c)
    const got = results.get(c.name) as Map<string, string[]>
    expect([...got.keys()].sort()).toEqual(['$replay', 'cli --data-dir', 'cli --url', 'http'])
    for (const [surface, payloads] of got) expect(payloads, surface).toEqual(want)
  })

  it('covers ranges that hold records and ranges that hold none', () => {
    expect(cases.map((c) => expected(c).length > 0)).toEqual([true, true, true, false, true])
  })
})

/** A bare-bones topic matcher for the expectation: the read path's own matcher is under test. */
function matches (filter: string, topic: string): boolean {
  const f = filter.split('/')
  const t = topic.split('/')
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true
    if (i >= t.length || (f[i] !== '+' && f[i] !== t[i])) return false
  }
  return f.length === t.length
}

/** `#` is no filter at all to the API and the CLI (so their unfiltered paths, stored batches included, are compared too). */
function topicsOf (c: Case): string[] {
  return c.topic === '#' ? [] : [c.topic]
}

async function cliReplay (source: ReplaySource, c: Case): Promise<string[]> {
  const spec: ReadSpec = {
    stream: 'telemetry', partition: undefined, from: c.from, to: c.to, maxRecords: undefined,
    filters: { keys: c.key === undefined ? [] : [c.key], topics: topicsOf(c), where: undefined },
  }
  const stdout = new PassThrough()
  const chunks: Buffer[] = []
  stdout.on('data', (d: Buffer) => chunks.push(d))
  await replay(source, spec, { format: 'ndjson', payload: 'utf8', out: undefined }, { stdout, stderr: new PassThrough(), progress: false })
  return Buffer.concat(chunks).toString().split('\n').filter((l) => l !== '').map((l) => (JSON.parse(l) as { payload: string }).payload).sort()
}

async function httpRecords (url: string, c: Case): Promise<string[]> {
  const query = new URLSearchParams({ format: 'ndjson' })
  for (const t of topicsOf(c)) query.append('topic', t)
  if (c.key !== undefined) query.append('key', c.key)
  const position = (p: Position | undefined, start: boolean): void => {
    if (p?.kind === 'time') query.set(start ? 'from' : 'to', String(p.timestamp))
    else if (p?.kind === 'offset') query.set(start ? 'offset' : 'endOffset', String(p.offset))
    else if (p !== undefined) query.set('offset', p.kind)
  }
  position(c.from, true)
  position(c.to, false)
  const out: string[] = []
  // The partition of the device asked for, as the CLI and $replay read it; else every partition.
  const partitions = c.key === undefined ? Array.from({ length: PARTITIONS }, (_, p) => p) : [partitionForKey(c.key, PARTITIONS)]
  for (const p of partitions) {
    const res = await fetch(`${url}/v1/streams/telemetry/partitions/${p}/records?${query.toString()}`)
    const body = await res.text()
    expect(res.status, body).toBe(200)
    const lines = body.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as { payload?: string, end?: unknown })
    expect(lines.at(-1)?.end, 'the NDJSON end line').toBeDefined()
    for (const l of lines) if (l.payload !== undefined) out.push(l.payload)
  }
  return out.sort()
}

async function mqttReplay (client: MqttClient, c: Case): Promise<string[]> {
  const at = (p: Position): string => p.kind === 'time' ? `@${p.timestamp}` : p.kind === 'offset' ? String(p.offset) : p.kind
  const range = c.to === undefined ? at(c.from) : `${at(c.from)}..${at(c.to)}`
  const subscription = `$replay/${range}/${c.topic}`
  const prefix = `$replay/${range}/`
  const payloads: string[] = []
  let done = false
  const onMessage = (topic: string, payload: Buffer): void => {
    if (!topic.startsWith(prefix) || done) return
    if (topic === `${prefix}$done`) done = true
    else payloads.push(payload.toString())
  }
  client.on('message', onMessage)
  try {
    expect(await subscribeGranted(client, subscription, 1)).toEqual([1])
    expect(await waitFor(() => done, 30_000), `the $done marker of ${subscription}`).toBe(true)
    await client.unsubscribeAsync(subscription)
  } finally {
    client.off('message', onMessage)
  }
  return payloads.sort()
}
