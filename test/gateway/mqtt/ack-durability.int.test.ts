/**
 * "Ack means durable", tested by killing the gateway: publishers send QoS 1
 * at full speed and record every PUBACK; the gateway is SIGKILLed at random
 * moments; after each restart every acknowledged message is in the log, in
 * per-device order. And an offline persistent session gets every
 * acknowledged message though live subscribers get theirs after the PUBACK
 * (hooks/authorize-publish.ts): the kill comes right after the first PUBACKs,
 * when each was its partition's first message for the session.
 */
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { openLogStore, type LevelDatabase } from '../../../store/index.ts'
import { publishUntilKilled, type Acked } from '../../helpers/acked-publisher.ts'
import { startGatewayProcess, tempDir } from '../../helpers/gateway-process.ts'
import { killCycles } from '../../helpers/kill-cycles.ts'

const DEVICES = 4
const CYCLES = killCycles(6)
const WINDOW = 50
/** For the persistent session: as many devices as the default stream has partitions, and kill cycles. */
const SESSION_DEVICES = 8
const SESSION_CYCLES = killCycles(3)
const WAIT_MS = 60_000

/** Polls `check` every `everyMs` until it holds (a kill that is to follow a PUBACK right away polls every millisecond). */
async function waitFor (check: () => boolean, what: string, everyMs: number): Promise<void> {
  const until = Date.now() + WAIT_MS
  while (!check()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, everyMs))
  }
}

describe('gateway ack durability under SIGKILL', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups) await c() })

  it(`keeps every acknowledged QoS 1 message across ${CYCLES} kill -9 cycles, in per-device order`, async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const acked: Acked[] = []
    const nextSeq = new Map<string, number>()
    let verifiedTotal = 0
    for (let cycle = 0; cycle < CYCLES; cycle++) {
      const gw = await startGatewayProcess({ dataDir: dir })
      const killAfter = 200 + Math.floor(Math.random() * 1200)
      // Every device is connected before the kill is timed: on a loaded machine a connect can outlast a short
      // killAfter, and a CONNECT cut by the kill is not what this test is about.
      const clients = await Promise.all(Array.from({ length: DEVICES }, async (_, d) => {
        const client = await mqtt.connectAsync(gw.mqttUrl, { clientId: `dev-${d}`, reconnectPeriod: 0, connectTimeout: 30_000 })
        client.on('error', () => {})
        return client
      }))
      const runs = clients.map((client, d) => {
        const device = `dev-${d}`
        return publishUntilKilled(client, device, nextSeq.get(device) ?? 0, acked, { window: WINDOW, maxMs: 10_000 }).then((s) => { nextSeq.set(device, s) })
      })
      await new Promise((resolve) => setTimeout(resolve, killAfter))
      await gw.kill()
      await Promise.all(runs)

      // Read the log straight from disk, as a replay would.
      const db = new ClassicLevel<Buffer, Buffer>(path.join(dir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
      await db.open()
      const store = await openLogStore({ db: db as unknown as LevelDatabase })
      const logged = new Map<string, number[]>()
      const stream = 'default/telemetry'
      for (let p = 0; p < store.streamInfo(stream).partitions; p++) {
        let offset = store.partitionInfo(stream, p).logStartOffset
        for (;;) {
          const r = await store.read(stream, p, offset, { maxRecords: 5000, maxBytes: 16 << 20 })
          if (r.records.length === 0) break
          for (const rec of r.records) {
            const body = JSON.parse(Buffer.from(rec.payload).toString()) as Acked
            expect(rec.key).toBe(body.device)
            let seqs = logged.get(body.device)
            if (seqs === undefined) logged.set(body.device, seqs = [])
            seqs.push(body.seq)
          }
          offset = r.nextOffset
        }
      }
      await store.close()
      await db.close()

      for (const [device, seqs] of logged) {
        // Per-device order: a device's records appear in the order it sent them.
        for (let i = 1; i < seqs.length; i++) expect(seqs[i], `${device} out of order at ${i}`).toBeGreaterThan(seqs[i - 1] as number)
      }
      const sets = new Map([...logged].map(([device, seqs]) => [device, new Set(seqs)]))
      const missing = acked.filter((a) => sets.get(a.device)?.has(a.seq) !== true)
      expect(missing, `cycle ${cycle}: acknowledged but not in the log`).toEqual([])
      verifiedTotal = acked.length
    }
    expect(verifiedTotal).toBeGreaterThan(CYCLES * DEVICES)
  })

  it('gives an offline persistent session every message acknowledged before a kill -9, the first of each partition too', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    // The session subscribes and leaves before anything is published: it has no cursor into any partition yet.
    const svc = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
    await svc.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
    await svc.endAsync()

    const acked: Acked[] = []
    const nextSeq = new Map<string, number>()
    const liveOutOfOrder: string[] = []
    let liveReceived = 0
    for (let cycle = 0; cycle < SESSION_CYCLES; cycle++) {
      if (cycle > 0) gw = await startGatewayProcess({ dataDir: dir })
      // A live clean subscriber gets what was acknowledged without the publishers waiting for it, in per-device order.
      const live = await mqtt.connectAsync(gw.mqttUrl, { clientId: `live-${cycle}`, reconnectPeriod: 0 })
      live.on('error', () => {})
      const lastSeq = new Map<string, number>()
      live.on('message', (_topic, payload) => {
        const { device, seq } = JSON.parse(payload.toString()) as Acked
        if (seq <= (lastSeq.get(device) ?? -1)) liveOutOfOrder.push(`cycle ${cycle}: ${device} ${seq} after ${lastSeq.get(device)}`)
        lastSeq.set(device, seq)
        liveReceived++
      })
      await live.subscribeAsync('devices/#', { qos: 1 })
      const clients = await Promise.all(Array.from({ length: SESSION_DEVICES }, async (_, d) => {
        const client = await mqtt.connectAsync(gw.mqttUrl, { clientId: `dev-${d}`, reconnectPeriod: 0, connectTimeout: 30_000 })
        client.on('error', () => {})
        return client
      }))
      // Cycle 0: the kill follows the very first PUBACK, the first message of its partition the session had. Later: a
      // few hundred PUBACKs in, while every device has a window of publishes in flight.
      const killAt = acked.length + (cycle === 0 ? 1 : 50 + Math.floor(Math.random() * 400))
      const runs = clients.map((client, d) => {
        const device = `dev-${d}`
        return publishUntilKilled(client, device, nextSeq.get(device) ?? 0, acked, { window: WINDOW, maxMs: 20_000 })
          .then((s) => { nextSeq.set(device, s) })
      })
      await waitFor(() => acked.length >= killAt, `${killAt} PUBACKs in cycle ${cycle}`, 1)
      await gw.kill()
      await Promise.all(runs)
      live.end(true)
    }
    expect(liveReceived).toBeGreaterThan(0)
    expect(liveOutOfOrder).toEqual([])

    gw = await startGatewayProcess({ dataDir: dir })
    const received = new Map<string, number[]>()
    const got = new Set<string>()
    const session = mqtt.connect(gw.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
    session.on('error', () => {})
    session.on('message', (_topic, payload) => {
      const { device, seq } = JSON.parse(payload.toString()) as Acked
      let seqs = received.get(device)
      if (seqs === undefined) received.set(device, seqs = [])
      seqs.push(seq)
      got.add(`${device}:${seq}`)
    })
    const has = (a: Acked): boolean => got.has(`${a.device}:${a.seq}`)
    await waitFor(() => acked.every(has), `every acknowledged message (${acked.length}) at the session`, 20).catch((err: Error) => {
      throw new Error(`${err.message}; missing: ${JSON.stringify(acked.filter((a) => !has(a)).slice(0, 20))}`)
    })
    session.end(true)
    for (const [device, seqs] of received) {
      for (let i = 1; i < seqs.length; i++) expect(seqs[i], `${device} out of order at ${i}`).toBeGreaterThan(seqs[i - 1] as number)
    }
    expect(await gw.stop()).toBe(0)
  })
})
