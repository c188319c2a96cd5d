/**
 * One HTTP client must not stall the others: while the heaviest record reads
 * the API accepts run (100 topic filters, a 4 KB where expression, every
 * format over 60,000 records), a steady MQTT publisher's PUBACKs keep coming.
 * The read that once stalled the gateway for seconds (1,100 repeated topic
 * filters) is refused with a code.
 */
import path from 'node:path'
import { Worker } from 'node:worker_threads'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { openLogStore } from '../../../store/index.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'

const STREAMS = { telemetry: { partitions: 1, retentionMs: 0 }, events: { partitions: 4, retentionMs: 0 }, commands: { partitions: 4, retentionMs: 0 } }
const RECORDS = 60_000

interface Fetched { readonly status: number, readonly bytes: number, readonly text: string }

/**
 * Fetches the URLs at once in a worker thread and reads every body to its end: receiving tens of MB on the
 * test's own event loop would delay the publisher's PUBACK handling there, and be blamed on the gateway.
 */
function fetchInWorker (urls: readonly string[]): Promise<Fetched[]> {
  const code = `
    const { parentPort, workerData } = require('node:worker_threads')
    Promise.all(workerData.map(async (url) => {
      const res = await fetch(url)
      const body = Buffer.from(await res.arrayBuffer())
      return { status: res.status, bytes: body.length, text: body.subarray(0, 1000).toString() }
    })).then((r) => parentPort.postMessage(r), (err) => parentPort.postMessage({ error: String(err) }))`
  const worker = new Worker(code, { eval: true, workerData: urls })
  return new Promise((resolve, reject) => {
    worker.once('message', (m: Fetched[] | { error: string }) => {
      void worker.terminate()
      if ('error' in m) reject(new Error(m.error))
      else resolve(m)
    })
    worker.once('error', reject)
  })
}

/** A where expression near the 4,096-character limit: forty clauses, each parsed from every record's JSON and evaluated. */
function heavyWhere (): string {
  const clauses = Array.from({ length: 40 }, (_, i) => `(readings.${i % 4}.value > ${1000 + i} and site = "plant-${i}" and not (temp < -${i}))`)
  return `${clauses.join(' or ')} or temp >= 0`
}

describe('HTTP reads and MQTT acks', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it('keeps PUBACKs flowing while the heaviest reads run, and refuses too many topic filters', async () => {
    const { dir, cleanup } = await tempDir('edgemq-fairness-')
    cleanups.push(cleanup)
    const dataDir = path.join(dir, 'data')
    const store = await openLogStore({ location: path.join(dataDir, 'db'), durability: 'async' })
    for (const [name, s] of Object.entries(STREAMS)) await store.createStream(`default/${name}`, s)
    for (let i = 0; i < RECORDS; i += 1000) {
      await Promise.all(Array.from({ length: 1000 }, (_, k) => {
        const n = i + k
        const payload = JSON.stringify({ temp: n % 40, site: `plant-${n % 7}`, readings: [1, 2, 3, 4].map((v) => ({ value: v * n })) })
        const dev = `dev-${n % 50}`
        return store.append('default/telemetry', dev, { payload: Buffer.from(payload), topic: `devices/${dev}/telemetry/t${n % 100}`, qos: 1, clientId: dev })
      }))
    }
    await store.close()
    const config = await writeConfig(dir, { streams: STREAMS, mqtt: { listeners: [{ type: 'tcp', port: 0 }] } })
    const gw: GatewayProcess = await startGatewayProcess({ dataDir, config })
    cleanups.push(() => gw.kill())
    const publisher = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'steady', reconnectPeriod: 0 })
    cleanups.push(() => publisher.endAsync(true))

    /** Publishes QoS 1 one at a time until `until` settles (at most `max`); each PUBACK's latency in ms. */
    const publish = async (until: Promise<unknown>, max: number): Promise<number[]> => {
      let done = false
      void until.finally(() => { done = true })
      const latencies: number[] = []
      while (!done && latencies.length < max) {
        const t0 = performance.now()
        await publisher.publishAsync('devices/steady/telemetry/tick', String(latencies.length), { qos: 1 })
        latencies.push(performance.now() - t0)
      }
      return latencies
    }

    const records = `${gw.httpUrl}/v1/streams/telemetry/partitions/0/records`
    // The read from the issue: 1,100 filters matching nothing, over every record.
    const tooMany = new URLSearchParams([...Array.from({ length: 1100 }, (_, i): [string, string] => ['topic', `x${i}`]), ['maxRecords', '100000']])
    const baseline = await publish(new Promise(() => {}), 200)

    // The heaviest reads within the limits, and that one, all at once.
    const filters = Array.from({ length: 100 }, (_, i): [string, string] => ['topic', `devices/+/telemetry/x${i}/#`])
    const heavy = [
      new URLSearchParams([...filters, ['maxRecords', '100000'], ['format', 'json']]),
      new URLSearchParams([['where', heavyWhere()], ['maxRecords', '100000'], ['maxBytes', String(64 * 1024 * 1024)], ['format', 'json']]),
      new URLSearchParams([['where', heavyWhere()], ['format', 'ndjson']]),
      new URLSearchParams([['maxRecords', '100000'], ['maxBytes', String(64 * 1024 * 1024)], ['format', 'cbor']]),
      new URLSearchParams([['format', 'ndjson'], ['payload', 'base64']]),
      new URLSearchParams([['format', 'batches']]),
    ]
    const reads = fetchInWorker([tooMany, ...heavy].map((q) => `${records}?${q.toString()}`))
    const during = await publish(reads, 20_000)
    const [refused, ...results] = await reads

    // The issue asks that no request delay other clients' acks by more than 100 ms; this test guards against the
    // stall itself, on a machine it shares. Unsliced, the read with 1,100 filters held every PUBACK for 11-16 s
    // (measured here). Sliced, the gateway's main thread never runs one request for more than ~10 ms of CPU, but
    // a PUBACK still takes several turns of the event loop, and with the 2 cores at a load of 15 (other test
    // runs) a CPU-bound gateway gets a fraction of a core and its GC pauses stretch: the slowest PUBACK during
    // the reads was then 0.8-1.5 s, against 50-110 ms before them. So the bound is 3 s, or twenty times the
    // quiet baseline when the machine is slower still: far above load noise, far below a stall.
    const baselineMax = Math.max(...baseline)
    const duringMax = Math.max(...during)
    const bound = Math.max(3000, 20 * baselineMax)
    expect(during.length, 'the publisher ran while the reads did').toBeGreaterThan(1)
    const what = `slowest PUBACK ${duringMax.toFixed(0)} ms during the reads (${during.length} publishes), ${baselineMax.toFixed(0)} ms before`
    expect(duringMax, what).toBeLessThan(bound)

    expect(refused?.status).toBe(400)
    expect((JSON.parse(refused?.text ?? '') as { error: { code: string } }).error.code).toBe('HTTP_TOO_MANY_VALUES')
    expect(results.map((r) => r.status)).toEqual(heavy.map(() => 200))
    expect(results[1]?.bytes, 'the where read returns every record').toBeGreaterThan(RECORDS * 100)
  }, 180_000)
})
