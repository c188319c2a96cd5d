/**
 * A damaged data directory is reported, never served short (issue 10):
 * records go in through a real gateway over MQTT, the gateway stops cleanly,
 * and the test damages the files the way a disk does — 64 bytes overwritten in
 * the middle of a LevelDB table block holding log batches, or one flipped byte
 * in a stored batch — then starts `edgemq start` and `edgemq check` as a user
 * would.
 */
import { cp, open, readdir, readFile } from 'node:fs/promises'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import mqtt from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { decodeMeta, encodeU64, keys } from '../../store/format.ts'
import { partitionForKey, tableBlocks, type TableBlock } from '../../store/index.ts'
import { runCliWithin } from '../helpers/cli-run.ts'
import { startGatewayProcess, tempDir } from '../helpers/gateway-process.ts'

const DEVICE = 'dev-1'
const ROUNDS = 4
const PER_ROUND = 1000
const RECORDS = ROUNDS * PER_ROUND
const PARTITION = partitionForKey(DEVICE, 8) // the default config's telemetry stream has 8 partitions

interface BatchBlock { readonly file: string, readonly block: TableBlock, readonly base: number }

let root: string
let cleanup: () => Promise<void>
/** The data directory as the gateway left it after a clean stop; each test damages a copy. */
let pristine: string
let batchBlocks: BatchBlock[]

/** The `B` keys of the partition, with the table block holding each. */
async function findBatchBlocks (dataDir: string): Promise<BatchBlock[]> {
  const db = new ClassicLevel<Buffer, Buffer>(path.join(dataDir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  const log = db.sublevel<Buffer, Buffer>('log', { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  const stream = await log.get(keys.stream('default/telemetry'))
  const { id } = decodeMeta<{ id: number }>(stream!)
  const batchKeys = await log.keys(keys.batchRange(id, PARTITION)).all()
  await db.close()
  const tables = (await readdir(path.join(dataDir, 'db'))).filter((f) => f.endsWith('.ldb')).map((f) => path.join(dataDir, 'db', f))
  const out: BatchBlock[] = []
  for (const key of batchKeys) {
    const full = Buffer.concat([Buffer.from('!log!'), key])
    for (const file of tables) {
      const block = (await tableBlocks(file)).find((b) => Buffer.compare(b.afterKey, full) < 0 && Buffer.compare(full, b.lastKey) <= 0)
      if (block !== undefined) { out.push({ file, block, base: keys.batchBase(key) }); break }
    }
  }
  return out
}

/** The offsets [from, to) of the batches in the same table block as `b` (a block can hold several small batches). */
function offsetsInBlock (b: BatchBlock): { from: number, to: number } {
  const same = (x: BatchBlock): boolean => x.file === b.file && x.block.offset === b.block.offset
  const from = batchBlocks.find(same)!.base
  const after = batchBlocks.find((x) => x.base > from && !same(x))
  return { from, to: after?.base ?? RECORDS }
}

async function overwrite (file: string, at: number, bytes: Buffer): Promise<void> {
  const handle = await open(file, 'r+')
  try { await handle.write(bytes, 0, bytes.length, at) } finally { await handle.close() }
}

async function copyOf (name: string): Promise<string> {
  const dir = path.join(root, name)
  await cp(pristine, dir, { recursive: true })
  return dir
}

/** The copy's path of a file of the pristine directory. */
function inCopy (dir: string, file: string): string {
  return path.join(dir, path.relative(pristine, file))
}

async function readAll (httpUrl: string): Promise<{ status: number, body: { records?: unknown[], error?: { code: string, message: string } } }> {
  const res = await fetch(`${httpUrl}/v1/streams/telemetry/partitions/${PARTITION}/records?offset=0&maxRecords=${RECORDS + 10}&maxBytes=67108864`)
  return { status: res.status, body: await res.json() as { records?: unknown[], error?: { code: string, message: string } } }
}

beforeAll(async () => {
  ({ dir: root, cleanup } = await tempDir('edgemq-damage-'))
  pristine = path.join(root, 'pristine')
  const gw = await startGatewayProcess({ dataDir: pristine })
  try {
    const client = await mqtt.connectAsync(gw.mqttUrl, { clientId: DEVICE, reconnectPeriod: 0 })
    // Rounds awaited one after the other, so the partition holds several batches.
    for (let round = 0; round < ROUNDS; round++) {
      await Promise.all(Array.from({ length: PER_ROUND }, (_, i) =>
        client.publishAsync(`devices/${DEVICE}/telemetry/t`, JSON.stringify({ round, i, reading: Math.sin(i) }), { qos: 1 })))
    }
    await client.endAsync()
  } finally {
    expect(await gw.stop()).toBe(0)
  }
  // LevelDB writes the write-ahead log into a table file when it next opens: open it once, so the batches are in an .ldb file.
  const db = new ClassicLevel(path.join(pristine, 'db'))
  await db.open()
  await db.close()
  batchBlocks = await findBatchBlocks(pristine)
  expect(new Set(batchBlocks.map((b) => `${b.file}:${b.block.offset}`)).size).toBeGreaterThanOrEqual(3)
}, 120_000)

afterAll(async () => { await cleanup?.() })

describe('a damaged data directory', () => {
  it('edgemq check reports an undamaged directory as OK with its counts, exit 0', async () => {
    const result = await runCliWithin(['check', '--data-dir', pristine, '--json'], 60_000)
    expect(result.code, result.stderr).toBe(0)
    const report = JSON.parse(result.stdout) as { ok: boolean, tables: { damage: unknown[] }, log: { partitions: Array<{ partition: number, records: number, damage: unknown[] }> } }
    expect(report.ok).toBe(true)
    expect(report.tables.damage).toEqual([])
    expect(report.log.partitions.find((p) => p.partition === PARTITION)).toMatchObject({ records: RECORDS, damage: [] })
    const text = await runCliWithin(['check', '--data-dir', pristine], 60_000)
    expect(text.stdout).toMatch(/result: OK/)
  })

  it('refuses to start when the table block holding the newest batch is overwritten, naming the file; check exits 2', async () => {
    const dir = await copyOf('tail')
    const last = batchBlocks[batchBlocks.length - 1]!
    await overwrite(inCopy(dir, last.file), last.block.offset + Math.floor(last.block.size / 2), Buffer.alloc(64, 0x5a))
    const start = await runCliWithin(['start', '--data-dir', dir, '--mqtt-port', '0', '--http-port', '0'], 60_000)
    expect(start.timedOut).toBe(false)
    expect(start.code).not.toBe(0)
    expect(start.stdout).not.toMatch(/ ready: /)
    expect(start.stderr).toMatch(/GW_DATA_DAMAGED/)
    expect(start.stderr).toContain(path.basename(last.file))
    expect(start.stderr).toMatch(/block checksum mismatch/)

    const check = await runCliWithin(['check', '--data-dir', dir, '--json'], 60_000)
    expect(check.code).toBe(2)
    const report = JSON.parse(check.stdout) as { ok: boolean, tables: { damage: Array<{ file: string }> }, log: { partitions: Array<{ partition: number, damage: Array<{ kind: string, from: number, to: number }> }> } }
    expect(report.ok).toBe(false)
    expect(report.tables.damage.map((d) => path.basename(d.file))).toEqual([path.basename(last.file)])
    const part = report.log.partitions.find((p) => p.partition === PARTITION)
    expect(part, check.stdout).toBeDefined()
    // The block can also hold the partition's metadata and its stream's entry (they sort after the batches): then those
    // are listed as `metadata` damage too, and the partition is still found, by its batches.
    const damage = part!.damage.filter((d) => d.kind !== 'metadata')
    const inBlock = offsetsInBlock(last)
    expect(inBlock.to).toBe(RECORDS)
    if (damage.length === part!.damage.length) {
      expect(damage).toEqual([expect.objectContaining(inBlock)])
    } else {
      // The log end went with the metadata: the damage starts at the block's first offset, its end is not known (to = from).
      expect(damage).toEqual([expect.objectContaining({ kind: 'unreadable', from: inBlock.from, to: inBlock.from })])
    }
  })

  it('serves an error, not fewer records, for a block overwritten inside the log; check lists the lost offsets', async () => {
    const dir = await copyOf('middle')
    const middle = batchBlocks[1]!
    const lost = offsetsInBlock(middle)
    expect(lost.to).toBeLessThan(RECORDS)
    await overwrite(inCopy(dir, middle.file), middle.block.offset + Math.floor(middle.block.size / 2), Buffer.alloc(64, 0x5a))
    // Opening stays cheap (a few seeks per partition): damage below the newest batch is found when read.
    const gw = await startGatewayProcess({ dataDir: dir })
    try {
      const { status, body } = await readAll(gw.httpUrl)
      expect(status).toBe(500)
      expect(body.records).toBeUndefined()
      expect(body.error?.code).toBe('HTTP_INTERNAL')
      expect(body.error?.message).toMatch(/STORE_DAMAGED/)
    } finally {
      await gw.stop()
    }
    const salvage = path.join(root, 'middle-salvage.ndjson')
    const check = await runCliWithin(['check', '--data-dir', dir, '--json', '--salvage', salvage], 60_000)
    expect(check.code).toBe(2)
    const report = JSON.parse(check.stdout) as { log: { partitions: Array<{ partition: number, damage: Array<{ from: number, to: number }> }> } }
    expect(report.log.partitions.find((p) => p.partition === PARTITION)!.damage).toEqual([expect.objectContaining(lost)])
    // Every record outside the listed range is salvaged, byte for byte: nothing is lost without being listed.
    const saved = (await readFile(salvage, 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as { stream: string, partition: number, offset: number, payload: string })
      .filter((r) => r.stream === 'default/telemetry' && r.partition === PARTITION)
    const expected = Array.from({ length: RECORDS }, (_, o) => o).filter((o) => o < lost.from || o >= lost.to)
    expect(saved.map((r) => r.offset)).toEqual(expected)
    expect(JSON.parse(Buffer.from(saved[0]!.payload, 'base64').toString())).toMatchObject({ round: 0, i: 0 })
  })

  it('serves an error for a batch whose bytes changed (CRC mismatch), and check names the batch', async () => {
    const dir = await copyOf('flipped')
    const target = batchBlocks[1]!
    const db = new ClassicLevel<Buffer, Buffer>(path.join(dir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const log = db.sublevel<Buffer, Buffer>('log', { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const stream = decodeMeta<{ id: number }>((await log.get(keys.stream('default/telemetry')))!)
    const key = keys.batch(stream.id, PARTITION, target.base)
    const value = Buffer.from((await log.get(key))!)
    value[value.length - 7] = (value[value.length - 7] as number) ^ 0x01
    await log.put(key, value, { sync: true } as object)
    await log.put(keys.offset('stuck', stream.id, PARTITION), encodeU64(target.base), { sync: true } as object)
    await db.close()
    const gw = await startGatewayProcess({ dataDir: dir })
    try {
      const { status, body } = await readAll(gw.httpUrl)
      expect(status).toBe(500)
      expect(body.records).toBeUndefined()
      expect(body.error?.message).toMatch(/STORE_CORRUPT_BATCH/)
      // The consumer group "stuck" stops at the damaged batch: /metrics still answers, with its lag in messages, no lag in
      // seconds (that needs the record), and the failed read counted.
      const scrape = await fetch(`${gw.httpUrl}/metrics`)
      expect(scrape.status).toBe(200)
      const text = await scrape.text()
      const labels = `group="stuck",tenant="default",stream="telemetry",partition="${PARTITION}"`
      expect(text).toContain(`edgemq_group_lag_messages{${labels}} ${RECORDS - target.base}`)
      expect(text).not.toContain(`edgemq_group_lag_seconds{${labels}}`)
      expect(Number(/edgemq_store_errors_total\{kind="read"\} (\d+)/.exec(text)?.[1])).toBeGreaterThanOrEqual(1)
    } finally {
      await gw.stop()
    }
    const check = await runCliWithin(['check', '--data-dir', dir], 60_000)
    expect(check.code).toBe(2)
    expect(check.stdout).toContain(`corrupt offsets ${target.base} to ${batchBlocks[2]!.base - 1}`)
  })
})
