/**
 * The /v1 pull and replay API end to end: an in-process gateway on port 0,
 * data published by real MQTT.js clients, requests made with fetch.
 *
 * The reference for "exactly the expected records" is the log itself, read
 * through the store's interface, after it was checked against what the
 * publishers sent (every device's messages, in order, in its partition).
 */
import os from 'node:os'
import path from 'node:path'
import { decode as decodeCbor, decodeMultiple } from 'cbor-x'
import mqtt, { type MqttClient } from 'mqtt'
import { pino } from 'pino'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { generateApiToken, hashPassword } from '../../../gateway/access/auth.ts'
import { buildConfig } from '../../../gateway/config/config.ts'
import { startGateway, type Gateway } from '../../../gateway/gateway.ts'
import { decodeStoredBatch, type StoredRecord } from '../../../store/index.ts'
import { tempDir } from '../../helpers/gateway-process.ts'
import { metricValue, sleep, waitFor } from '../../helpers/mqtt-probe.ts'

const silent = pino({ level: 'silent' })

const USERS = {
  'acme-svc': { tenant: 'acme', role: 'service' },
  'acme-admin': { tenant: 'acme', role: 'admin' },
  'acme-dev': { tenant: 'acme', role: 'device' },
  'globex-svc': { tenant: 'globex', role: 'service' },
} as const
type Username = keyof typeof USERS
const password = (user: string): string => `pw-of-${user}`
const basic = (user: string, pw = password(user)): string => `Basic ${Buffer.from(`${user}:${pw}`).toString('base64')}`
/** Bearer tokens of apiTokens, by entry name. */
const TOKENS = {
  'acme-reader': { tenant: 'acme', role: 'service', token: generateApiToken('acme-reader') },
  'globex-reader': { tenant: 'globex', role: 'service', token: generateApiToken('globex-reader') },
  'acme-sensor': { tenant: 'acme', role: 'device', token: generateApiToken('acme-sensor') },
} as const
const bearer = (name: keyof typeof TOKENS): string => `Bearer ${TOKENS[name].token}`

const DEVICES = ['dev-1', 'dev-2', 'dev-3', 'dev-4', 'dev-5']
/** Messages per device in each phase; the phases are apart in time. */
const PHASES = [300, 40, 200] as const

interface Reading { readonly dev: string, readonly seq: number, readonly phase: number, readonly temp: number, readonly site: string }

/** A record as the JSON and NDJSON formats show it. */
interface ApiRecord {
  readonly offset: number
  readonly timestamp: number
  readonly key: string
  readonly topic: string
  readonly qos: number
  readonly clientId: string
  readonly headers?: Record<string, string>
  readonly payload: string
}

interface FetchBody {
  readonly stream: string
  readonly partition: number
  readonly records: ApiRecord[]
  readonly nextOffset: number
  readonly logStartOffset: number
  readonly logEndOffset: number
  readonly endOfRange: boolean
}

interface ErrorBody { readonly error: { readonly code: string, readonly message: string, readonly [k: string]: unknown } }

const asApi = (r: StoredRecord): ApiRecord => ({
  offset: r.offset, timestamp: r.timestamp, key: r.key, topic: r.topic, qos: r.qos, clientId: r.clientId,
  ...(r.headers === null ? {} : { headers: r.headers }), payload: Buffer.from(r.payload).toString('utf8'),
})

describe('HTTP pull and replay API', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients: MqttClient[] = []
  let gw: Gateway
  let base: string
  /** Until the gateway reports `n` record reads waiting for an append (edgemq_http_waiting_reads). */
  const readsWaiting = (n: number): Promise<boolean> => waitFor(async () => await metricValue(base, 'edgemq_http_waiting_reads') === n, 10_000)
  let mqttUrl: string
  /** Reference log per telemetry partition, read through the store. */
  const reference = new Map<number, StoredRecord[]>()
  /** Smallest timestamp of each phase. */
  const phaseStart: number[] = []

  interface CallOptions {
    user?: Username | null
    method?: string
    body?: unknown
    headers?: Record<string, string>
    signal?: AbortSignal
  }
  async function call (pathAndQuery: string, options: CallOptions = {}): Promise<Response> {
    const headers: Record<string, string> = { ...options.headers }
    const user = options.user === undefined ? 'acme-svc' : options.user
    if (user !== null) headers.authorization = basic(user)
    let body: string | undefined
    if (options.body !== undefined) {
      body = typeof options.body === 'string' ? options.body : JSON.stringify(options.body)
      headers['content-type'] = 'application/json'
    }
    return fetch(`${base}${pathAndQuery}`, { method: options.method ?? 'GET', headers, body, signal: options.signal ?? AbortSignal.timeout(20_000) })
  }
  async function getJson<T> (pathAndQuery: string, options: Parameters<typeof call>[1] = {}): Promise<T> {
    const res = await call(pathAndQuery, options)
    const text = await res.text()
    if (res.status !== 200) throw new Error(`${pathAndQuery}: ${res.status} ${text}`)
    return JSON.parse(text) as T
  }
  async function expectError (pathAndQuery: string, status: number, code: string, options: Parameters<typeof call>[1] = {}): Promise<ErrorBody['error']> {
    const res = await call(pathAndQuery, options)
    const body = await res.json() as ErrorBody
    expect({ status: res.status, code: body.error?.code }, pathAndQuery).toEqual({ status, code })
    expect(typeof body.error.message).toBe('string')
    expect(res.headers.get('content-type')).toMatch(/^application\/json/)
    return body.error
  }

  async function readAll (stream: string, partition: number): Promise<StoredRecord[]> {
    const out: StoredRecord[] = []
    let offset = gw.store.partitionInfo(stream, partition).logStartOffset
    for (;;) {
      const r = await gw.store.read(stream, partition, offset, { maxRecords: 5000, maxBytes: 64 << 20 })
      if (r.records.length === 0) return out
      out.push(...r.records)
      offset = r.nextOffset
    }
  }

  async function connect (user: Username, clientId: string): Promise<MqttClient> {
    const c = await mqtt.connectAsync(mqttUrl, { clientId, username: user, password: password(user), protocolVersion: 4, reconnectPeriod: 0 })
    clients.push(c)
    return c
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-api-')
    cleanups.push(cleanup)
    const users = await Promise.all(Object.entries(USERS).map(async ([username, u]) => ({
      username, ...u, password: await hashPassword(password(username), { N: 1024, r: 8, p: 1 }),
    })))
    const apiTokens = await Promise.all(Object.entries(TOKENS).map(async ([name, t]) => ({
      name, tenant: t.tenant, role: t.role, tokenHash: await hashPassword(t.token, { N: 1024, r: 8, p: 1 }),
    })))
    const config = buildConfig({
      dataDir: path.join(dir, 'data'),
      users,
      apiTokens,
      streams: {
        telemetry: { partitions: 2, retentionMs: 0 },
        // Tiny, so that one retention pass moves the log start.
        events: { partitions: 1, retentionMs: 0, retentionBytes: 1200 },
        commands: { partitions: 1 },
      },
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      http: { port: 0 },
      store: { retentionIntervalMs: 3_600_000 },
    })
    gw = await startGateway(config, { logger: silent })
    cleanups.push(() => gw.close())
    base = `http://127.0.0.1:${gw.http.port}`
    mqttUrl = `mqtt://127.0.0.1:${gw.listeners[0]!.port}`

    const feeder = await connect('acme-svc', 'acme-feeder')
    const commitsBefore = await metricValue(base, 'edgemq_group_commit_records_count')
    const seq = new Map<string, number>()
    for (let phase = 0; phase < PHASES.length; phase++) {
      if (phase > 0) await sleep(25)
      const sends: Array<Promise<unknown>> = []
      for (let i = 0; i < (PHASES[phase] as number); i++) {
        for (const dev of DEVICES) {
          const n = seq.get(dev) ?? 0
          seq.set(dev, n + 1)
          const reading: Reading = { dev, seq: n, phase, temp: (n * 7) % 50, site: n % 3 === 0 ? 'a' : 'b' }
          // QoS 1 without waiting for each ack: appends pile up and share group commits, so batches hold many records.
          sends.push(feeder.publishAsync(`devices/${dev}/telemetry/${n % 2 === 0 ? 'temp' : 'hum'}`, JSON.stringify(reading), { qos: 1 }))
        }
      }
      await Promise.all(sends)
    }
    const commits = await metricValue(base, 'edgemq_group_commit_records_count') - commitsBefore
    const total = DEVICES.length * PHASES.reduce((a, b) => a + b, 0)
    // Several group commits of many records each (a commit writes a batch of at most 1,000 records per
    // partition): reads cross batch boundaries, and start and end inside batches.
    expect(commits).toBeGreaterThanOrEqual(3)
    expect(commits).toBeLessThan(total / 10)

    const globex = await connect('globex-svc', 'globex-feeder')
    await globex.publishAsync('devices/dev-1/telemetry/temp', JSON.stringify({ secret: 'globex' }), { qos: 1 })

    // The reference: the log as the store has it, checked against what was sent.
    for (let p = 0; p < 2; p++) reference.set(p, await readAll('acme/telemetry', p))
    for (const dev of DEVICES) {
      const p = gw.store.partitionFor('acme/telemetry', dev)
      const mine = (reference.get(p) ?? []).filter((r) => r.key === dev).map((r) => JSON.parse(Buffer.from(r.payload).toString()) as Reading)
      expect(mine.map((r) => r.seq)).toEqual(Array.from({ length: seq.get(dev) ?? 0 }, (_, i) => i))
    }
    expect([...reference.values()].every((records) => records.length > 0)).toBe(true)
    const all = [...reference.values()].flat()
    for (let phase = 0; phase < PHASES.length; phase++) {
      phaseStart.push(Math.min(...all.filter((r) => (JSON.parse(Buffer.from(r.payload).toString()) as Reading).phase === phase).map((r) => r.timestamp)))
    }
  }, 60_000)

  afterAll(async () => {
    await Promise.all(clients.map((c) => c.endAsync().catch(() => {})))
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('lists the tenant\'s streams with partitions, offsets, bytes and timestamps', async () => {
    type StreamDoc = Record<string, unknown> & { name: string, partitions: Array<Record<string, unknown>> }
    const body = await getJson<{ tenant: string, streams: StreamDoc[] }>('/v1/streams')
    expect(body.tenant).toBe('acme')
    expect(body.streams.map((s) => s.name)).toEqual(['commands', 'events', 'telemetry'])
    const telemetry = body.streams.find((s) => s.name === 'telemetry')!
    const records = [...reference.values()].flat()
    expect(telemetry).toMatchObject({
      partitionCount: 2, retentionMs: 0, records: records.length,
      oldestTimestamp: Math.min(...records.map((r) => r.timestamp)), newestTimestamp: Math.max(...records.map((r) => r.timestamp)),
    })
    for (const p of [0, 1]) {
      const info = gw.store.partitionInfo('acme/telemetry', p)
      expect(telemetry.partitions[p]).toEqual({
        partition: p, logStartOffset: info.logStartOffset, logEndOffset: info.logEndOffset, records: info.logEndOffset - info.logStartOffset,
        bytes: info.bytes, oldestTimestamp: info.oldestTimestamp, newestTimestamp: info.newestTimestamp,
      })
    }
    expect(await getJson('/v1/streams/telemetry/partitions/1')).toMatchObject({ stream: 'telemetry', partition: 1, records: reference.get(1)!.length })
    expect(await getJson('/v1/streams/events')).toMatchObject({ tenant: 'acme', name: 'events', partitionCount: 1, retentionBytes: 1200 })
    // Another tenant sees its own streams, with its own data only.
    const globex = await getJson<{ tenant: string, streams: Array<{ name: string, records: number }> }>('/v1/streams', { user: 'globex-svc' })
    expect(globex.tenant).toBe('globex')
    expect(globex.streams.find((s) => s.name === 'telemetry')?.records).toBe(1)
  })

  it('fetches by offset exactly the log\'s records, in order, across batch boundaries, in pages of any size', async () => {
    for (const p of [0, 1]) {
      const ref = reference.get(p)!.map(asApi)
      for (const maxRecords of [1, 7, 250, 1000]) {
        if (maxRecords === 1 && ref.length > 400) {
          // Every single-record page is too slow to fetch in full; sample the start, the middle and the end.
          for (const offset of [0, 1, Math.floor(ref.length / 2), ref.length - 1]) {
            const page = await getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?offset=${offset}&maxRecords=1`)
            expect(page.records).toEqual([ref[offset]])
            expect(page.nextOffset).toBe(offset + 1)
          }
          continue
        }
        const got: ApiRecord[] = []
        let offset = 0
        for (;;) {
          const page = await getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?offset=${offset}&maxRecords=${maxRecords}`)
          expect(page.records.length).toBeLessThanOrEqual(maxRecords)
          expect(page).toMatchObject({ stream: 'telemetry', partition: p, logStartOffset: 0, logEndOffset: ref.length, endOfRange: false })
          if (page.records.length === 0) { expect(page.nextOffset).toBe(ref.length); break }
          got.push(...page.records)
          offset = page.nextOffset
        }
        expect(got).toEqual(ref)
      }
      // Random windows, bounded by endOffset: exactly [offset, endOffset).
      for (let i = 0; i < 20; i++) {
        const from = Math.floor(Math.random() * ref.length)
        const to = Math.min(ref.length, from + 1 + Math.floor(Math.random() * 1500))
        const page = await getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?offset=${from}&endOffset=${to}&maxRecords=5000&maxBytes=67108864`)
        expect(page.records).toEqual(ref.slice(from, to))
        expect(page).toMatchObject({ nextOffset: to, endOfRange: true })
      }
      // maxBytes: whole records up to the budget, and always at least one.
      const small = await getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?offset=3&maxBytes=1`)
      expect(small.records).toEqual([ref[3]])
      const budget = Buffer.byteLength(ref[3]!.payload) + Buffer.byteLength(ref[4]!.payload)
      expect((await getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?offset=3&maxBytes=${budget}`)).records).toEqual(ref.slice(3, 5))
      // The end of the log: nothing, and where to continue.
      expect(await getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?offset=latest`)).toMatchObject({ records: [], nextOffset: ref.length })
    }
  })

  it('streams NDJSON (UTF-8 or base64 payloads) and encodes CBOR with the same records', async () => {
    const p = 0
    const ref = reference.get(p)!.map(asApi)
    const res = await call(`/v1/streams/telemetry/partitions/${p}/records?format=ndjson`)
    expect(res.headers.get('content-type')).toMatch(/^application\/x-ndjson/)
    const lines = (await res.text()).trimEnd().split('\n').map((l) => JSON.parse(l) as ApiRecord & { end?: Record<string, unknown> })
    expect(lines.slice(0, -1)).toEqual(ref)
    expect(lines.at(-1)).toEqual({
      end: { stream: 'telemetry', partition: p, nextOffset: ref.length, logStartOffset: 0, logEndOffset: ref.length, endOfRange: false, records: ref.length },
    })

    const b64 = await (await call(`/v1/streams/telemetry/partitions/${p}/records?format=ndjson&payload=base64&offset=10&maxRecords=5`)).text()
    const b64Lines = b64.trimEnd().split('\n').map((l) => JSON.parse(l) as ApiRecord & { end?: { nextOffset: number } })
    expect(b64Lines.slice(0, -1).map((r) => ({ ...r, payload: Buffer.from(r.payload, 'base64').toString() }))).toEqual(ref.slice(10, 15))
    expect(b64Lines.at(-1)?.end?.nextOffset).toBe(15)

    const cborRes = await call(`/v1/streams/telemetry/partitions/${p}/records?format=cbor&offset=5&maxRecords=100`)
    expect(cborRes.headers.get('content-type')).toBe('application/cbor')
    const decoded = decodeCbor(Buffer.from(await cborRes.arrayBuffer())) as FetchBody & { records: Array<Omit<ApiRecord, 'payload'> & { payload: Uint8Array }> }
    expect(decoded.records.map((r) => ({ ...r, payload: Buffer.from(r.payload).toString() }))).toEqual(ref.slice(5, 105))
    expect(decoded).toMatchObject({ stream: 'telemetry', partition: p, nextOffset: 105, endOfRange: false })
    // Accept picks the format when the parameter is absent.
    const viaAccept = await call(`/v1/streams/telemetry/partitions/${p}/records?maxRecords=1`, { headers: { accept: 'application/x-ndjson' } })
    expect(viaAccept.headers.get('content-type')).toMatch(/^application\/x-ndjson/)
    await viaAccept.text()
  })

  /** A format=batches body read as docs/http-api.md tells a client to: a CBOR sequence of head, stored batches, end. */
  interface BatchesBody {
    head: { fromOffset: number, endOffset: number | null }
    batches: Buffer[]
    records: StoredRecord[]
    last: Record<string, Record<string, unknown>>
  }
  function decodeBatchesBody (body: Buffer): BatchesBody {
    const items = decodeMultiple(body) as unknown[]
    const head = items[0] as { stream: string, partition: number, fromOffset: number, endOffset: number | null }
    const batches = items.slice(1, -1).map((b) => Buffer.from(b as Uint8Array))
    const records = batches.flatMap((b) => decodeStoredBatch(b))
      .filter((r) => r.offset >= head.fromOffset && (head.endOffset === null || r.offset < head.endOffset))
    return { head, batches, records, last: items.at(-1) as Record<string, Record<string, unknown>> }
  }

  it('serves the stored batches unchanged (format=batches), holding exactly the records of the JSON format, also from and to inside a batch', async () => {
    for (const p of [0, 1]) {
      const { batches: stored } = await gw.store.readBatches('acme/telemetry', p, 0, { maxBytes: 64 << 20 })
      const logEnd = gw.store.partitionInfo('acme/telemetry', p).logEndOffset
      expect(stored.length).toBeGreaterThanOrEqual(2)
      const second = stored[1]!
      expect(second.count).toBeGreaterThan(10)
      const inSecond = second.baseOffset + 3
      const ranges = [
        '', `offset=${inSecond}`, `offset=${inSecond}&endOffset=${inSecond + 5}`, `offset=1&endOffset=${logEnd - 1}`,
        `from=${phaseStart[1]!}&to=${phaseStart[2]!}`, `from=${phaseStart[2]!}`, 'offset=latest',
        `offset=${second.baseOffset}&endOffset=${second.baseOffset + second.count}`,
      ]
      for (const range of ranges) {
        const res = await call(`/v1/streams/telemetry/partitions/${p}/records?format=batches&${range}`)
        expect(res.status, range).toBe(200)
        expect(res.headers.get('content-type')).toBe('application/vnd.edgemq.batches+cbor-seq')
        const got = decodeBatchesBody(Buffer.from(await res.arrayBuffer()))
        const all = 'maxRecords=100000&maxBytes=67108864'
        const json = await getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?${all}${range === '' ? '' : `&${range}`}`)
        expect(got.records.map(asApi), range).toEqual(json.records)
        expect(got.last, range).toEqual({
          end: {
            stream: 'telemetry', partition: p, nextOffset: json.nextOffset, logStartOffset: 0, logEndOffset: logEnd, endOfRange: json.endOfRange,
            records: json.records.length, batches: got.batches.length, bytes: got.batches.reduce((n, b) => n + b.length, 0),
          },
        })
        // Byte for byte what the log holds, whole batches: the first may start before fromOffset, the last run past endOffset.
        for (const b of got.batches) {
          const same = stored.find((s) => s.baseOffset === decodeStoredBatch(b)[0]!.offset)!
          expect(Buffer.compare(b, same.bytes)).toBe(0)
        }
        if (json.records.length > 0) expect(got.head.fromOffset).toBe(json.records[0]!.offset)
      }
      // The head states the range when the start or end falls inside a batch.
      const batchesOf = async (query: string): Promise<BatchesBody> =>
        decodeBatchesBody(Buffer.from(await (await call(`/v1/streams/telemetry/partitions/${p}/records?format=batches&${query}`)).arrayBuffer()))
      const mid = await batchesOf(`offset=${inSecond}&endOffset=${inSecond + 5}`)
      expect(mid.head).toEqual({ stream: 'telemetry', partition: p, fromOffset: inSecond, endOffset: inSecond + 5 })
      expect(mid.batches).toHaveLength(1)
      // maxBytes bounds the batch bytes: whole batches, at least one.
      const one = await batchesOf(`offset=${inSecond}&maxBytes=1`)
      expect(one.records.map((r) => r.offset)).toEqual(Array.from({ length: second.count - 3 }, (_, i) => inSecond + i))
      expect(one.last.end).toMatchObject({ nextOffset: second.baseOffset + second.count, endOfRange: false, batches: 1 })
    }
    // Accept chooses the format too.
    const viaAccept = await call('/v1/streams/telemetry/partitions/0/records?offset=latest', { headers: { accept: 'application/vnd.edgemq.batches+cbor-seq' } })
    expect(viaAccept.headers.get('content-type')).toBe('application/vnd.edgemq.batches+cbor-seq')
    await viaAccept.arrayBuffer()
  })

  it('long-polls format=batches, and refuses what needs decoded records', async () => {
    const start = gw.store.partitionInfo('acme/commands', 0).logEndOffset
    const pending = call('/v1/streams/commands/partitions/0/records?format=batches&offset=latest&wait=20')
      .then(async (r) => decodeBatchesBody(Buffer.from(await r.arrayBuffer())))
    expect(await readsWaiting(1)).toBe(true) // the read waits at the log's end before the record comes
    const publisher = await connect('acme-svc', 'acme-batches-publisher')
    await publisher.publishAsync('devices/dev-3/commands/reboot', JSON.stringify({ at: 1 }), { qos: 1 })
    const got = await pending
    expect(got.head.fromOffset).toBe(start)
    expect(got.records.map((r) => [r.offset, Buffer.from(r.payload).toString()])).toEqual([[start, JSON.stringify({ at: 1 })]])
    expect(got.last.end).toMatchObject({ nextOffset: start + 1, records: 1, endOfRange: false })

    for (const q of ['key=dev-1', 'topic=devices/%2B/telemetry/%23', 'where=temp%20%3E%201', 'maxRecords=10', 'payload=base64']) {
      const err = await expectError(`/v1/streams/telemetry/partitions/0/records?format=batches&${q}`, 400, 'HTTP_BAD_REQUEST')
      expect(err.parameter).toBe(q.slice(0, q.indexOf('=')))
    }
    await expectError('/v1/streams/telemetry/records?key=dev-1&format=batches', 400, 'HTTP_BAD_REQUEST')
    const end = gw.store.partitionInfo('acme/telemetry', 0).logEndOffset
    await expectError(`/v1/streams/telemetry/partitions/0/records?format=batches&offset=${end + 1}`, 416, 'HTTP_OFFSET_OUT_OF_RANGE')
  })

  it('fetches a time range through the time index: from the first record at or after `from` to the first at or after `to`', async () => {
    for (const p of [0, 1]) {
      const ref = reference.get(p)!
      const inRange = (from: number, to: number): ApiRecord[] => {
        const start = ref.findIndex((r) => r.timestamp >= from)
        const endIdx = ref.findIndex((r) => r.timestamp >= to)
        return ref.slice(start === -1 ? ref.length : start, endIdx === -1 ? ref.length : endIdx).map(asApi)
      }
      const phaseB = inRange(phaseStart[1]!, phaseStart[2]!)
      expect(phaseB.length).toBeGreaterThan(0)
      expect(phaseB.every((r) => (JSON.parse(r.payload) as Reading).phase === 1)).toBe(true)
      const iso = (t: number): string => encodeURIComponent(new Date(t).toISOString())
      const isoRange = `from=${iso(phaseStart[1]!)}&to=${iso(phaseStart[2]!)}`
      const page = await getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?${isoRange}&maxRecords=100000&maxBytes=67108864`)
      expect(page.records).toEqual(phaseB)
      expect(page.endOfRange).toBe(true)
      // The same range in small pages: continue from nextOffset with the same `to`.
      const paged: ApiRecord[] = []
      let query = `from=${phaseStart[1]}`
      for (;;) {
        const next = await getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?${query}&to=${phaseStart[2]}&maxRecords=33`)
        paged.push(...next.records)
        if (next.endOfRange) break
        query = `offset=${next.nextOffset}`
      }
      expect(paged).toEqual(phaseB)
      // NDJSON over a range, with milliseconds.
      const nd = await (await call(`/v1/streams/telemetry/partitions/${p}/records?format=ndjson&from=${phaseStart[0]}&to=${phaseStart[1]}`)).text()
      const ndLines = nd.trimEnd().split('\n').map((l) => JSON.parse(l) as ApiRecord & { end?: { endOfRange: boolean } })
      expect(ndLines.slice(0, -1)).toEqual(inRange(phaseStart[0]!, phaseStart[1]!))
      expect(ndLines.at(-1)?.end?.endOfRange).toBe(true)
      // From a time inside the data to the end; from before everything; after everything.
      const mid = ref[Math.floor(ref.length / 2)]!.timestamp
      const fetchPage = (query: string): Promise<FetchBody> => getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?${query}`)
      expect((await fetchPage(`from=${mid}&maxRecords=100000&maxBytes=67108864`)).records).toEqual(inRange(mid, Infinity))
      expect((await fetchPage('from=2000-01-01&maxRecords=3')).records).toEqual(ref.slice(0, 3).map(asApi))
      expect(await fetchPage(`from=${ref.at(-1)!.timestamp + 1}`)).toMatchObject({ records: [], nextOffset: ref.length, endOfRange: false })
      // An empty range: `to` at the first record.
      expect(await fetchPage(`to=${ref[0]!.timestamp}`)).toMatchObject({ records: [], nextOffset: 0, endOfRange: true })
    }
    // "Everything device 3 sent in phase B": the key picks the partition.
    const dev = 'dev-3'
    const p = gw.store.partitionFor('acme/telemetry', dev)
    const want = reference.get(p)!.filter((r) => r.key === dev && r.timestamp >= phaseStart[1]! && r.timestamp < phaseStart[2]!).map(asApi)
    expect(want.length).toBe(PHASES[1])
    const got = await getJson<FetchBody>(`/v1/streams/telemetry/records?key=${dev}&from=${phaseStart[1]}&to=${phaseStart[2]}`)
    expect(got).toMatchObject({ partition: p, endOfRange: true })
    expect(got.records).toEqual(want)
  })

  it('filters on the server by key, topic filter and payload expression', async () => {
    const p = 1
    const ref = reference.get(p)!
    const keys = [...new Set(ref.map((r) => r.key))]
    expect(keys.length).toBeGreaterThan(0)
    const fetchAll = async (query: string): Promise<ApiRecord[]> => {
      const text = await (await call(`/v1/streams/telemetry/partitions/${p}/records?format=ndjson&${query}`)).text()
      return text.trimEnd().split('\n').map((l) => JSON.parse(l) as ApiRecord & { end?: unknown }).filter((l) => l.end === undefined)
    }
    const doc = (r: StoredRecord): Reading => JSON.parse(Buffer.from(r.payload).toString()) as Reading
    expect(await fetchAll(`key=${keys[0]}`)).toEqual(ref.filter((r) => r.key === keys[0]).map(asApi))
    expect(await fetchAll('topic=devices/%2B/telemetry/hum')).toEqual(ref.filter((r) => r.topic.endsWith('/hum')).map(asApi))
    expect(await fetchAll('topic=devices/%2B/telemetry/hum&topic=nothing/%23')).toEqual(ref.filter((r) => r.topic.endsWith('/hum')).map(asApi))
    const where = 'temp > 30 and site = "a"'
    const hot = ref.filter((r) => doc(r).temp > 30 && doc(r).site === 'a').map(asApi)
    expect(hot.length).toBeGreaterThan(0)
    expect(await fetchAll(`where=${encodeURIComponent(where)}`)).toEqual(hot)
    const both = ref.filter((r) => r.key === keys[0] && r.topic.endsWith('/temp') && (doc(r).phase === 1 || doc(r).temp < 5)).map(asApi)
    expect(await fetchAll(`key=${keys[0]}&topic=devices/${keys[0]}/telemetry/temp&where=${encodeURIComponent('phase = 1 or temp < 5')}`)).toEqual(both)

    // A JSON page of a sparse filter: the matches up to maxRecords, and nextOffset just past the last one returned.
    const page = await getJson<FetchBody>(`/v1/streams/telemetry/partitions/${p}/records?maxRecords=3&where=${encodeURIComponent(where)}`)
    expect(page.records).toEqual(hot.slice(0, 3))
    expect(page.nextOffset).toBe(hot[2]!.offset + 1)
  })

  it('long-polls: wakes when a matching record is appended, and times out with nothing', async () => {
    const publisher = await connect('acme-svc', 'acme-poller-feed')
    const dev = 'dev-lp'
    const p = gw.store.partitionFor('acme/telemetry', dev)
    const end = gw.store.partitionInfo('acme/telemetry', p).logEndOffset

    // Wakes: the request waits at the end of the log (the gauge shows it waiting); a publish then answers it.
    const waiting = getJson<FetchBody>(`/v1/streams/telemetry/records?key=${dev}&offset=latest&wait=20`)
    expect(await readsWaiting(1)).toBe(true)
    await publisher.publishAsync(`devices/${dev}/telemetry/t`, JSON.stringify({ temp: 1 }), { qos: 1 })
    let got = await waiting
    expect(got.records.map((r) => r.payload)).toEqual([JSON.stringify({ temp: 1 })])
    expect(got.records[0]!.offset).toBe(end)
    expect(await readsWaiting(0)).toBe(true)

    // A filtered wait ignores records that do not match and keeps waiting for one that does. The store wakes the
    // waiter before the PUBACK of temp 5 can reach the publisher, so a waiting read after that ack is a second wait.
    const filtered = getJson<FetchBody>(`/v1/streams/telemetry/records?key=${dev}&offset=${got.nextOffset}&wait=20&where=${encodeURIComponent('temp > 100')}`)
    expect(await readsWaiting(1)).toBe(true)
    await publisher.publishAsync(`devices/${dev}/telemetry/t`, JSON.stringify({ temp: 5 }), { qos: 1 })
    expect(await readsWaiting(1)).toBe(true)
    await publisher.publishAsync(`devices/${dev}/telemetry/t`, JSON.stringify({ temp: 150 }), { qos: 1 })
    got = await filtered
    expect(got.records.map((r) => r.payload)).toEqual([JSON.stringify({ temp: 150 })])
    expect(got.nextOffset).toBe(end + 3)

    // NDJSON long-poll: the headers wait for the first record too.
    const nd = call(`/v1/streams/telemetry/records?key=${dev}&offset=latest&wait=20&format=ndjson`).then((r) => r.text())
    expect(await readsWaiting(1)).toBe(true)
    await publisher.publishAsync(`devices/${dev}/telemetry/t`, JSON.stringify({ temp: 7 }), { qos: 1 })
    const lines = (await nd).trimEnd().split('\n').map((l) => JSON.parse(l) as { payload?: string, end?: { nextOffset: number } })
    expect(lines.map((l) => l.payload ?? 'end')).toEqual([JSON.stringify({ temp: 7 }), 'end'])
    expect(lines[1]!.end!.nextOffset).toBe(end + 4)

    // From a time in the future: records that arrive before it are skipped, the first one at or after it is returned.
    const future = Date.now() + 800
    const later = getJson<FetchBody>(`/v1/streams/telemetry/records?key=${dev}&from=${future}&wait=20`)
    expect(await readsWaiting(1)).toBe(true)
    await publisher.publishAsync(`devices/${dev}/telemetry/t`, JSON.stringify({ temp: 8 }), { qos: 1 })
    expect(await waitFor(() => Date.now() > future, 5000)).toBe(true) // the clock passes `from` (a positive wait)
    await publisher.publishAsync(`devices/${dev}/telemetry/t`, JSON.stringify({ temp: 9 }), { qos: 1 })
    got = await later
    const firstAfter = (await readAll('acme/telemetry', p)).find((r) => r.key === dev && r.timestamp >= future)!
    expect(got.records).toEqual([asApi(firstAfter)])
    expect(firstAfter.offset).toBe(end + 5) // the record sent 100 ms in was skipped (unless this machine stalled for 700 ms)
    const logEnd = gw.store.partitionInfo('acme/telemetry', p).logEndOffset
    expect(logEnd).toBe(end + 6)

    // Times out: nothing arrives within wait=1.
    const started = performance.now()
    const empty = await getJson<FetchBody>(`/v1/streams/telemetry/records?key=${dev}&offset=latest&wait=1`)
    expect(empty).toMatchObject({ records: [], nextOffset: end + 6, endOfRange: false })
    expect(performance.now() - started).toBeGreaterThanOrEqual(950) // it waited the second it asked for

    // A client that gives up mid-wait leaves nothing behind; the next request is served normally.
    const controller = new AbortController()
    const abandoned = call(`/v1/streams/telemetry/records?key=${dev}&offset=latest&wait=30`, { signal: controller.signal }).catch(() => 'aborted')
    expect(await readsWaiting(1)).toBe(true)
    controller.abort()
    expect(await abandoned).toBe('aborted')
    expect(await readsWaiting(0)).toBe(true) // its wait ended with the connection
    expect((await getJson<FetchBody>(`/v1/streams/telemetry/records?key=${dev}&offset=${end}`)).records).toHaveLength(6)
  })

  it('commits, fetches, lists with lag, resets (earliest, latest, offset, timestamp) and deletes consumer groups, per tenant', async () => {
    const ends = [0, 1].map((p) => gw.store.partitionInfo('acme/telemetry', p).logEndOffset)
    interface Lag { partition: number, committedOffset: number | null, logStartOffset: number, logEndOffset: number, lagMessages: number, lagSeconds: number }
    interface StreamLag { group: string, stream: string, lagMessages: number, lagSeconds: number, partitions: Lag[] }

    // Fetch before any commit: no offsets, everything is lag.
    const fresh = await getJson<StreamLag>('/v1/groups/billing/streams/telemetry')
    expect(fresh.partitions.map((l) => l.committedOffset)).toEqual([null, null])
    expect(fresh.lagMessages).toBe(ends[0]! + ends[1]!)

    const committed = await getJson<StreamLag>('/v1/groups/billing/streams/telemetry/commit',
      { method: 'POST', body: { offsets: [{ partition: 0, offset: 10 }, { partition: 1, offset: ends[1] }] } })
    expect(committed.partitions.map((l) => [l.committedOffset, l.lagMessages])).toEqual([[10, ends[0]! - 10], [ends[1], 0]])
    expect(committed.partitions[0]!.lagSeconds).toBeGreaterThan(0)
    expect(committed.partitions[1]!.lagSeconds).toBe(0)
    expect(committed).toMatchObject({ group: 'billing', stream: 'telemetry', lagMessages: ends[0]! - 10 })

    interface GroupLag { group: string, lagMessages: number, lagSeconds: number, streams: StreamLag[] }
    const list = await getJson<{ tenant: string, groups: GroupLag[] }>('/v1/groups')
    expect(list.tenant).toBe('acme')
    const billing = list.groups.find((g) => g.group === 'billing')!
    expect(billing).toMatchObject({ lagMessages: ends[0]! - 10 })
    expect(billing.lagSeconds).toBeGreaterThan(0)
    expect(billing.streams.map((s) => s.stream)).toEqual(['telemetry'])
    const one = await getJson<typeof billing>('/v1/groups/billing')
    expect(one).toMatchObject({ group: 'billing', lagMessages: billing.lagMessages })
    expect(one.streams[0]!.partitions.map((l) => l.committedOffset)).toEqual([10, ends[1]])
    expect(one.lagSeconds).toBeGreaterThanOrEqual(billing.lagSeconds)

    // A pull consumer reads from its committed offset.
    const fromGroup = await getJson<FetchBody>('/v1/streams/telemetry/partitions/0/records?group=billing&maxRecords=2')
    expect(fromGroup.records).toEqual(reference.get(0)!.slice(10, 12).map(asApi))

    // Reset to a timestamp: the first offset at or after it, per partition.
    const t = phaseStart[1]!
    const resetTo = (body: Record<string, unknown>): Promise<StreamLag> =>
      getJson<StreamLag>('/v1/groups/billing/streams/telemetry/reset', { method: 'POST', body })
    const reset = await resetTo({ to: 'timestamp', timestamp: new Date(t).toISOString() })
    for (const p of [0, 1]) {
      const want = reference.get(p)!.find((r) => r.timestamp >= t)!.offset
      expect(reset.partitions[p]!.committedOffset).toBe(want)
      expect(gw.store.fetchOffset('acme/billing', 'acme/telemetry', p)).toBe(want)
    }
    const resetMs = await resetTo({ to: 'timestamp', timestamp: t, partition: 1 })
    expect(resetMs.partitions[1]!.committedOffset).toBe(reference.get(1)!.find((r) => r.timestamp >= t)!.offset)
    // Earliest / latest / offset, on one partition or all.
    expect((await resetTo({ to: 'earliest', partition: 0 })).partitions.map((l) => l.committedOffset))
      .toEqual([0, resetMs.partitions[1]!.committedOffset])
    expect((await resetTo({ to: 'latest' })).partitions.map((l) => [l.committedOffset, l.lagMessages]))
      .toEqual([[ends[0], 0], [ends[1], 0]])
    expect((await resetTo({ to: 'offset', offset: 5 })).partitions.map((l) => l.committedOffset))
      .toEqual([5, 5])

    // Tenants cannot see or touch each other's groups, even by the same name.
    expect((await getJson<{ groups: unknown[] }>('/v1/groups', { user: 'globex-svc' })).groups).toEqual([])
    await expectError('/v1/groups/billing', 404, 'HTTP_UNKNOWN_GROUP', { user: 'globex-svc' })
    await expectError('/v1/groups/billing', 404, 'HTTP_UNKNOWN_GROUP', { user: 'globex-svc', method: 'DELETE' })
    await getJson('/v1/groups/billing/streams/telemetry/commit', { user: 'globex-svc', method: 'POST', body: { offsets: [{ partition: 0, offset: 1 }] } })
    expect(gw.store.fetchOffset('acme/billing', 'acme/telemetry', 0)).toBe(5)
    expect(gw.store.fetchOffset('globex/billing', 'globex/telemetry', 0)).toBe(1)

    // Delete: gone, and deleting again is an error.
    expect(await getJson('/v1/groups/billing', { method: 'DELETE', user: 'acme-admin' })).toEqual({ group: 'billing', deleted: true })
    await expectError('/v1/groups/billing', 404, 'HTTP_UNKNOWN_GROUP')
    await expectError('/v1/groups/billing', 404, 'HTTP_UNKNOWN_GROUP', { method: 'DELETE' })
    expect(gw.store.fetchOffset('globex/billing', 'globex/telemetry', 0)).toBe(1)
  })

  it('reads exactly the retained records after retention moved the log start', async () => {
    const publisher = await connect('acme-svc', 'acme-events-feed')
    for (let round = 0; round < 6; round++) {
      await Promise.all(Array.from({ length: 5 }, (_, i) =>
        publisher.publishAsync(`devices/dev-${i}/events/e`, JSON.stringify({ round, i, pad: 'x'.repeat(40) }), { qos: 1 })))
      await sleep(5)
    }
    await getJson('/v1/groups/laggard/streams/events/commit', { method: 'POST', body: { offsets: [{ partition: 0, offset: 1 }] } })
    const report = await gw.store.enforceRetention()
    expect(report.recordsDeleted).toBeGreaterThan(0)
    const ref = (await readAll('acme/events', 0)).map(asApi)
    const start = gw.store.partitionInfo('acme/events', 0).logStartOffset
    expect(start).toBe(report.recordsDeleted)
    expect(ref[0]!.offset).toBe(start)
    expect(ref.at(-1)!.offset).toBe(29)

    const info = await getJson<{ partitions: Array<{ logStartOffset: number, logEndOffset: number, oldestTimestamp: number }> }>('/v1/streams/events')
    expect(info.partitions[0]).toMatchObject({ logStartOffset: start, logEndOffset: 30, oldestTimestamp: ref[0]!.timestamp })
    // From the (new) start, by default, in pages.
    expect((await getJson<FetchBody>('/v1/streams/events/partitions/0/records')).records).toEqual(ref)
    const paged: ApiRecord[] = []
    let offset = start
    for (;;) {
      const page = await getJson<FetchBody>(`/v1/streams/events/partitions/0/records?offset=${offset}&maxRecords=4`)
      expect(page.logStartOffset).toBe(start)
      if (page.records.length === 0) break
      paged.push(...page.records)
      offset = page.nextOffset
    }
    expect(paged).toEqual(ref)
    // Below the log start: 416, with the log start to resume from.
    const err = await expectError('/v1/streams/events/partitions/0/records?offset=0', 416, 'HTTP_OFFSET_OUT_OF_RANGE')
    expect(err).toMatchObject({ offset: 0, logStartOffset: start, logEndOffset: 30 })
    // By time: from before everything starts at the log start; from a retained record's time, exactly there.
    expect((await getJson<FetchBody>('/v1/streams/events/partitions/0/records?from=0')).records).toEqual(ref)
    const mid = ref[Math.floor(ref.length / 2)]!
    const fromMid = await getJson<FetchBody>(`/v1/streams/events/partitions/0/records?from=${mid.timestamp}`)
    expect(fromMid.records).toEqual(ref.filter((r) => r.offset >= ref.find((x) => x.timestamp >= mid.timestamp)!.offset))
    // A group whose offset retention passed reads from the log start; reset earliest goes there too.
    expect((await getJson<FetchBody>('/v1/streams/events/partitions/0/records?group=laggard')).records).toEqual(ref)
    const reset = await getJson<{ partitions: Array<{ committedOffset: number }> }>('/v1/groups/laggard/streams/events/reset',
      { method: 'POST', body: { to: 'earliest' } })
    expect(reset.partitions[0]!.committedOffset).toBe(start)
  })

  it('serves bearer tokens as their tenant, and refuses wrong, malformed and device-role ones', async () => {
    const asToken = (name: keyof typeof TOKENS, pathAndQuery: string): Promise<Response> =>
      call(pathAndQuery, { user: null, headers: { authorization: bearer(name) } })
    const acme = await asToken('acme-reader', '/v1/streams')
    expect(acme.status).toBe(200)
    expect(await acme.json()).toEqual(await getJson('/v1/streams'))
    const records = await asToken('acme-reader', '/v1/streams/telemetry/partitions/0/records?maxRecords=50')
    expect(((await records.json()) as FetchBody).records).toEqual(reference.get(0)!.slice(0, 50).map(asApi))

    // Tenant isolation: globex's token sees globex's log only, and cannot name acme's.
    const globex = await asToken('globex-reader', '/v1/streams/telemetry/records?key=dev-1')
    expect(((await globex.json()) as FetchBody).records.map((r) => r.payload)).toEqual([JSON.stringify({ secret: 'globex' })])
    type StreamList = { tenant: string, streams: Array<{ name: string, records: number }> }
    const globexStreams = (await (await asToken('globex-reader', '/v1/streams')).json()) as StreamList
    expect(globexStreams.tenant).toBe('globex')
    expect(globexStreams.streams.find((s) => s.name === 'telemetry')?.records).toBe(1)
    for (const name of ['acme%2Ftelemetry', '..%2Facme%2Ftelemetry']) {
      await expectError(`/v1/streams/${name}/partitions/0/records`, 404, 'HTTP_UNKNOWN_STREAM',
        { user: null, headers: { authorization: bearer('globex-reader') } })
    }
    await getJson('/v1/groups/acme-only/streams/telemetry/commit', { method: 'POST', body: { offsets: [{ partition: 0, offset: 1 }] } })
    const globexGroups = (await (await asToken('globex-reader', '/v1/groups')).json()) as { groups: Array<{ group: string }> }
    expect(globexGroups.groups.map((g) => g.group)).not.toContain('acme-only')
    await expectError('/v1/groups/acme-only', 404, 'HTTP_UNKNOWN_GROUP', { user: null, headers: { authorization: bearer('globex-reader') } })
    await getJson('/v1/groups/acme-only', { method: 'DELETE' })

    // Refusals, each with its challenge.
    const wrong = await call('/v1/streams', { user: null, headers: { authorization: `Bearer ${TOKENS['acme-reader'].token.slice(0, -4)}AAAA` } })
    expect(wrong.status).toBe(401)
    expect(wrong.headers.get('www-authenticate')).toBe('Bearer realm="edgemq", error="invalid_token"')
    expect(((await wrong.json()) as ErrorBody).error.code).toBe('HTTP_BAD_TOKEN')
    await expectError('/v1/streams', 401, 'HTTP_BAD_TOKEN', { user: null, headers: { authorization: `Bearer ${generateApiToken('acme-reader')}` } })
    await expectError('/v1/streams', 401, 'HTTP_BAD_TOKEN', { user: null, headers: { authorization: 'Bearer' } })
    await expectError('/v1/streams', 401, 'HTTP_BAD_TOKEN', { user: null, headers: { authorization: `Bearer ${TOKENS['acme-reader'].token} x` } })
    await expectError('/v1/streams', 401, 'HTTP_BAD_CREDENTIALS', { user: null, headers: { authorization: `Token ${TOKENS['acme-reader'].token}` } })
    const device = await asToken('acme-sensor', '/v1/streams')
    expect(device.status).toBe(403)
    expect(device.headers.get('www-authenticate')).toBe('Bearer realm="edgemq", error="insufficient_scope"')
    expect(((await device.json()) as ErrorBody).error.code).toBe('HTTP_FORBIDDEN')
    // No credentials at all: both schemes are offered.
    const none = await call('/v1/streams', { user: null })
    expect(none.headers.get('www-authenticate')).toBe('Basic realm="edgemq", charset="UTF-8", Bearer realm="edgemq"')
  })

  it('gives every bad request its error code and status', async () => {
    const end0 = gw.store.partitionInfo('acme/telemetry', 0).logEndOffset
    // Auth.
    const missing = await call('/v1/streams', { user: null })
    expect(missing.status).toBe(401)
    expect(missing.headers.get('www-authenticate')).toMatch(/^Basic realm="edgemq"/)
    expect(((await missing.json()) as ErrorBody).error.code).toBe('HTTP_AUTH_REQUIRED')
    await expectError('/v1/streams', 401, 'HTTP_BAD_CREDENTIALS', { user: null, headers: { authorization: basic('acme-svc', 'wrong') } })
    await expectError('/v1/streams', 401, 'HTTP_BAD_CREDENTIALS', { user: null, headers: { authorization: basic('nobody') } })
    await expectError('/v1/streams', 401, 'HTTP_BAD_TOKEN', { user: null, headers: { authorization: 'Bearer abc.def' } })
    await expectError('/v1/streams', 401, 'HTTP_BAD_CREDENTIALS', { user: null, headers: { authorization: 'Basic !!!' } })
    const noColon = `Basic ${Buffer.from('no-colon').toString('base64')}`
    await expectError('/v1/streams', 401, 'HTTP_BAD_CREDENTIALS', { user: null, headers: { authorization: noColon } })
    await expectError('/v1/streams', 403, 'HTTP_FORBIDDEN', { user: 'acme-dev' })
    // A right password was cached; a wrong one for the same user still fails.
    await getJson('/v1/streams')
    await expectError('/v1/streams', 401, 'HTTP_BAD_CREDENTIALS', { user: null, headers: { authorization: basic('acme-svc', 'pw-of-acme-svcX') } })

    // Streams, partitions, other tenants.
    await expectError('/v1/streams/nope/partitions/0/records', 404, 'HTTP_UNKNOWN_STREAM')
    await expectError('/v1/streams/nope', 404, 'HTTP_UNKNOWN_STREAM')
    for (const name of ['globex%2Ftelemetry', '..%2Fglobex%2Ftelemetry', 'acme%2Ftelemetry', '%2Ftelemetry']) {
      await expectError(`/v1/streams/${name}/partitions/0/records`, 404, 'HTTP_UNKNOWN_STREAM')
    }
    const globexView = await getJson<FetchBody>('/v1/streams/telemetry/records?key=dev-1', { user: 'globex-svc' })
    expect(globexView.records.map((r) => r.payload)).toEqual([JSON.stringify({ secret: 'globex' })])
    await expectError('/v1/streams/telemetry/partitions/2/records', 404, 'HTTP_UNKNOWN_PARTITION')
    await expectError('/v1/streams/telemetry/partitions/01/records', 404, 'HTTP_UNKNOWN_PARTITION')
    await expectError('/v1/streams/telemetry/partitions/-1', 404, 'HTTP_UNKNOWN_PARTITION')
    await expectError('/v1/streams/telemetry/records', 400, 'HTTP_BAD_REQUEST')

    // Offsets and times.
    expect(await expectError(`/v1/streams/telemetry/partitions/0/records?offset=${end0 + 1}`, 416, 'HTTP_OFFSET_OUT_OF_RANGE'))
      .toMatchObject({ offset: end0 + 1, logStartOffset: 0, logEndOffset: end0 })
    await expectError('/v1/streams/telemetry/partitions/0/records?offset=-1', 400, 'HTTP_BAD_REQUEST')
    await expectError('/v1/streams/telemetry/partitions/0/records?from=yesterday', 400, 'HTTP_BAD_TIME')
    await expectError('/v1/streams/telemetry/partitions/0/records?to=2024-05-01T02:00', 400, 'HTTP_BAD_TIME')
    await expectError('/v1/streams/telemetry/partitions/0/records?from=now&to=-1h', 400, 'HTTP_BAD_RANGE')
    await expectError('/v1/streams/telemetry/partitions/0/records?offset=9&endOffset=3', 400, 'HTTP_BAD_RANGE')

    // Filters.
    const bad = await expectError(`/v1/streams/telemetry/partitions/0/records?where=${encodeURIComponent('temp >> 30')}`, 400, 'HTTP_BAD_FILTER')
    expect(bad).toMatchObject({ parameter: 'where', position: 6 })
    expect((await expectError(`/v1/streams/telemetry/partitions/0/records?where=${encodeURIComponent('(temp > 1')}`, 400, 'HTTP_BAD_FILTER')).position).toBe(9)
    await expectError('/v1/streams/telemetry/partitions/0/records?topic=devices/%23/x', 400, 'HTTP_BAD_TOPIC_FILTER')

    // Parameters and formats.
    await expectError('/v1/streams/telemetry/partitions/0/records?maxRecord=5', 400, 'HTTP_BAD_REQUEST')
    await expectError('/v1/streams/telemetry/partitions/0/records?maxRecords=0', 400, 'HTTP_BAD_REQUEST')
    await expectError('/v1/streams/telemetry/partitions/0/records?wait=3600', 400, 'HTTP_BAD_REQUEST')
    await expectError('/v1/streams/telemetry/partitions/0/records?format=xml', 400, 'HTTP_BAD_REQUEST')
    await expectError('/v1/streams/telemetry/partitions/0/records?offset=1&offset=2', 400, 'HTTP_BAD_REQUEST')
    await expectError('/v1/streams?verbose=1', 400, 'HTTP_BAD_REQUEST')

    // Groups.
    await expectError('/v1/groups/bad%2Fname', 400, 'HTTP_BAD_NAME')
    await expectError('/v1/groups/-dash', 400, 'HTTP_BAD_NAME')
    await expectError('/v1/groups/nobody', 404, 'HTTP_UNKNOWN_GROUP')
    await expectError('/v1/groups/g/streams/nope', 404, 'HTTP_UNKNOWN_STREAM')
    const commit = '/v1/groups/g/streams/telemetry/commit'
    await expectError(commit, 400, 'HTTP_BAD_BODY', { method: 'POST', body: '{not json' })
    await expectError(commit, 400, 'HTTP_BAD_BODY', { method: 'POST', body: [] })
    await expectError(commit, 400, 'HTTP_BAD_BODY', { method: 'POST', body: { offsets: [] } })
    await expectError(commit, 400, 'HTTP_BAD_BODY', { method: 'POST', body: { offsets: [{ partition: 0, offset: -1 }] } })
    await expectError(commit, 400, 'HTTP_BAD_BODY', { method: 'POST', body: { offsets: [{ partition: 0, offset: 1 }, { partition: 0, offset: 2 }] } })
    await expectError(commit, 400, 'HTTP_BAD_BODY', { method: 'POST', body: { offsets: [{ partition: 0, offset: 1, extra: true }] } })
    await expectError(commit, 404, 'HTTP_UNKNOWN_PARTITION', { method: 'POST', body: { offsets: [{ partition: 7, offset: 1 }] } })
    expect(await expectError(commit, 416, 'HTTP_OFFSET_OUT_OF_RANGE', { method: 'POST', body: { offsets: [{ partition: 0, offset: end0 + 1 }] } }))
      .toMatchObject({ offset: end0 + 1, logEndOffset: end0 })
    await expectError(commit, 413, 'HTTP_BODY_TOO_LARGE', { method: 'POST', body: JSON.stringify({ offsets: [], pad: 'x'.repeat(70_000) }) })
    const reset = '/v1/groups/g/streams/telemetry/reset'
    await expectError(reset, 400, 'HTTP_BAD_BODY', { method: 'POST', body: { to: 'sometime' } })
    await expectError(reset, 400, 'HTTP_BAD_BODY', { method: 'POST', body: { to: 'offset' } })
    await expectError(reset, 400, 'HTTP_BAD_BODY', { method: 'POST', body: { to: 'earliest', offset: 3 } })
    await expectError(reset, 400, 'HTTP_BAD_TIME', { method: 'POST', body: { to: 'timestamp', timestamp: 'yesterday' } })
    await expectError(reset, 400, 'HTTP_BAD_TIME', { method: 'POST', body: { to: 'timestamp' } })
    await expectError(reset, 404, 'HTTP_UNKNOWN_PARTITION', { method: 'POST', body: { to: 'latest', partition: 2 } })
    // None of those created the group.
    await expectError('/v1/groups/g', 404, 'HTTP_UNKNOWN_GROUP')

    // Routes and methods.
    await expectError('/v1/nothing', 404, 'HTTP_NOT_FOUND')
    await expectError('/v1/streams/telemetry/partitions/0/records/extra', 404, 'HTTP_NOT_FOUND')
    const wrongMethod = await call('/v1/streams', { method: 'DELETE' })
    expect(wrongMethod.status).toBe(405)
    expect(wrongMethod.headers.get('allow')).toBe('GET')
    expect(((await wrongMethod.json()) as ErrorBody).error.code).toBe('HTTP_METHOD_NOT_ALLOWED')
    await expectError('/v1/groups/g/streams/telemetry/commit', 405, 'HTTP_METHOD_NOT_ALLOWED')
    await expectError('/metrics', 405, 'HTTP_METHOD_NOT_ALLOWED', { method: 'POST', user: null })
    await expectError('/nothing', 404, 'HTTP_NOT_FOUND', { user: null })
  })
})

describe('HTTP API without configured users', () => {
  let gw: Gateway
  const cleanups: Array<() => Promise<void>> = []
  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-api-anon-')
    cleanups.push(cleanup)
    // Bound to every address, so a request can come from a non-loopback one.
    const config = buildConfig({ dataDir: dir, mqtt: { listeners: [{ type: 'tcp', port: 0 }] }, http: { host: '0.0.0.0', port: 0 } })
    gw = await startGateway(config, { logger: silent })
    cleanups.push(() => gw.close())
  }, 30_000)
  afterAll(async () => { for (const c of cleanups.reverse()) await c().catch(() => {}) })

  it('serves loopback clients as tenant default, and nobody else', async () => {
    const res = await fetch(`http://127.0.0.1:${gw.http.port}/v1/streams`)
    expect(res.status).toBe(200)
    expect(((await res.json()) as { tenant: string }).tenant).toBe('default')
    const external = Object.values(os.networkInterfaces()).flat().find((a) => a !== undefined && a.family === 'IPv4' && !a.internal)
    if (external === undefined) return // no non-loopback address on this machine
    const remote = await fetch(`http://${external.address}:${gw.http.port}/v1/streams`)
    expect(remote.status).toBe(401)
    expect(((await remote.json()) as ErrorBody).error.code).toBe('HTTP_AUTH_REQUIRED')
    // Credentials cannot help: there are no users.
    const withCredentials = await fetch(`http://${external.address}:${gw.http.port}/v1/streams`, { headers: { authorization: basic('someone') } })
    expect(((await withCredentials.json()) as ErrorBody).error.code).toBe('HTTP_BAD_CREDENTIALS')
  })
})
