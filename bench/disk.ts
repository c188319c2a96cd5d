/**
 * `npm run bench -- disk`: bytes on disk per stored record, the figure the
 * disk-sizing formula of docs/operations.md rests on. Not a speed: the value
 * is the data directory's size divided by the records in it, and the
 * baseline is the bytes the records themselves carry (payload + key + topic
 * + client id), so the ratio is the log's overhead (negative after LevelDB's
 * Snappy compression of a compressible payload).
 *
 * Figures, each for 100-byte payloads from 1,000 devices on 8 partitions
 * (keys `dev-N`, topics `devices/dev-N/telemetry/temp`):
 * - disk.json     JSON telemetry payloads (compressible, like most fleets);
 * - disk.random   random bytes (incompressible: the worst case);
 * each measured twice: `written` right after the appends and a close (the
 * write-ahead log and level-0 tables included), `compacted` after LevelDB
 * compacted the whole key range (the steady state of a long-running log).
 *
 * Arguments: `--quick` (100 k records instead of 1 M).
 */
import { readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { ClassicLevel } from 'classic-level'
import { openLogStore } from '../store/index.ts'
import { TempDirs, info, report, round } from './lib/report.ts'

const QUICK = process.argv.includes('--quick')
const RECORDS = QUICK ? 100_000 : 1_000_000
const DEVICES = 1000
const PARTITIONS = 8
const PAYLOAD_BYTES = 100
const WINDOW = 10_000

type PayloadKind = 'json' | 'random'

function payload (kind: PayloadKind, i: number): Uint8Array {
  if (kind === 'random') return crypto.getRandomValues(new Uint8Array(PAYLOAD_BYTES))
  const reading = {
    temp: round(15 + Math.random() * 15, 2), hum: round(30 + Math.random() * 40, 1), pressure: round(990 + Math.random() * 40, 1),
    battery: Math.floor(Math.random() * 100), rssi: -Math.floor(40 + Math.random() * 50), seq: i, fw: '2.4.1', n: '',
  }
  // Filled up to the size with random digits (a nonce), not spaces that Snappy would squeeze away.
  const bare = JSON.stringify(reading).length
  reading.n = Array.from({ length: Math.max(0, PAYLOAD_BYTES - bare) }, () => Math.floor(Math.random() * 10)).join('')
  return new TextEncoder().encode(JSON.stringify(reading).slice(0, PAYLOAD_BYTES))
}

async function directoryBytes (dir: string): Promise<number> {
  let total = 0
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const file = join(dir, entry.name)
    total += entry.isDirectory() ? await directoryBytes(file) : (await stat(file)).size
  }
  return total
}

async function measure (kind: PayloadKind, dirs: TempDirs): Promise<void> {
  const dir = await dirs.make(`disk-${kind}`)
  const location = join(dir, 'db')
  const store = await openLogStore({ location, durability: 'async' })
  await store.createStream('default/telemetry', { partitions: PARTITIONS })
  let contentBytes = 0
  for (let base = 0; base < RECORDS; base += WINDOW) {
    const appends: Array<Promise<unknown>> = []
    for (let i = base; i < Math.min(RECORDS, base + WINDOW); i++) {
      const device = `dev-${i % DEVICES}`
      const topic = `devices/${device}/telemetry/temp`
      const body = payload(kind, i)
      contentBytes += body.length + device.length * 2 + topic.length
      appends.push(store.append('default/telemetry', device, { payload: body, topic, qos: 1, clientId: device }))
    }
    await Promise.all(appends)
  }
  await store.close()
  const written = await directoryBytes(location)
  const db = new ClassicLevel<Buffer, Buffer>(location, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await db.open()
  await db.compactRange(Buffer.alloc(0), Buffer.alloc(64, 0xff))
  await db.close()
  const compacted = await directoryBytes(location)
  info(`${kind}: ${RECORDS} records, ${written} bytes written, ${compacted} bytes compacted`)
  const params = { records: RECORDS, payloadBytes: PAYLOAD_BYTES, devices: DEVICES, partitions: PARTITIONS }
  for (const [state, bytes] of [['written', written], ['compacted', compacted]] as const) {
    report({
      bench: `disk.${kind}.${state}`,
      unit: 'bytes/record',
      value: bytes / RECORDS,
      baseline: 'payload + key + topic + client id bytes per record',
      baselineValue: contentBytes / RECORDS,
      better: 'lower',
      params,
    })
  }
  await dirs.remove(dir)
}

const dirs = new TempDirs()
try {
  await measure('json', dirs)
  await measure('random', dirs)
} finally {
  await dirs.cleanup()
}
