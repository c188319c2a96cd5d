/**
 * "Ack means durable", tested by killing the gateway: publishers send QoS 1
 * at full speed and record every PUBACK; the gateway is SIGKILLed at random
 * moments; after each restart every acknowledged message is in the log, in
 * per-device order.
 */
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { openLogStore, type LevelDatabase } from '../../../store/index.ts'
import { publishUntilKilled, type Acked } from '../../helpers/acked-publisher.ts'
import { startGatewayProcess, tempDir } from '../../helpers/gateway-process.ts'

const DEVICES = 4
const CYCLES = 10
const WINDOW = 50

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
})
