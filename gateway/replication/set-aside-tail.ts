/**
 * The tail a former primary set aside, named once the new primary's snapshot
 * is in ({@link nameTail}: offsets from terms.ts), and extracted as records
 * an operator can read ({@link extractTail}): the
 * set-aside copy (`<time>.cbor`, CBOR [key, value] pairs of the whole former
 * database) is loaded — the log's entries only — into a temporary LevelDB
 * beside it, read by a read-only store over the ranges terms.ts named, and
 * written as NDJSON (`<time>.cbor.tail.ndjson`: stream, partition, offset,
 * timestamp, key, topic, clientId, qos, headers, payload in base64). The
 * temporary database is removed afterwards; the `.cbor` copy stays whole.
 * Costs a pass over the copy and disk for its log while it runs.
 */
import { createReadStream, createWriteStream } from 'node:fs'
import { rm, writeFile } from 'node:fs/promises'
import { once } from 'node:events'
import { ClassicLevel } from 'classic-level'
import { DecoderStream } from 'cbor-x'
import type { Logger } from 'pino'
import { openLogStore, type LevelDatabase } from '../../store/index.ts'
import { logEnds, lostTail, nextTerm, type OffsetRange } from './terms.ts'

/** The store's sublevel (`log`) as abstract-level prefixes its keys in the root's key space. */
const LOG_PREFIX = Buffer.from('!log!')

/** Writes the records of `ranges` found in the set-aside copy `cborFile` to `out` as NDJSON; how many it wrote. */
export async function extractTail (cborFile: string, ranges: readonly OffsetRange[], out: string): Promise<number> {
  const tmp = `${cborFile}.tmp-db`
  const db = new ClassicLevel<Buffer, Buffer>(tmp, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await db.open()
  try {
    let ops: Array<{ type: 'put', key: Buffer, value: Buffer }> = []
    const decoder = createReadStream(cborFile).pipe(new DecoderStream())
    for await (const entry of decoder as AsyncIterable<[Uint8Array, Uint8Array]>) {
      const key = Buffer.from(entry[0])
      if (key.length < LOG_PREFIX.length || !key.subarray(0, LOG_PREFIX.length).equals(LOG_PREFIX)) continue
      ops.push({ type: 'put', key, value: Buffer.from(entry[1]) })
      if (ops.length >= 1000) {
        await db.batch(ops)
        ops = []
      }
    }
    if (ops.length > 0) await db.batch(ops)
    const store = await openLogStore({ db: db as unknown as LevelDatabase, follower: true })
    const file = createWriteStream(out, { flags: 'wx' })
    let written = 0
    try {
      for (const r of ranges) {
        let offset = Math.max(r.from, store.partitionInfo(r.stream, r.partition).logStartOffset)
        while (offset < r.to) {
          const read = await store.read(r.stream, r.partition, offset, { maxRecords: 1000, maxBytes: 16 << 20 })
          if (read.records.length === 0) break
          for (const rec of read.records) {
            if (rec.offset >= r.to) break
            const line = JSON.stringify({
              stream: r.stream, partition: r.partition, offset: rec.offset, timestamp: rec.timestamp, key: rec.key, topic: rec.topic,
              clientId: rec.clientId, qos: rec.qos, headers: rec.headers, payload: Buffer.from(rec.payload).toString('base64'),
            })
            if (!file.write(`${line}\n`)) await once(file, 'drain')
            written++
          }
          offset = read.nextOffset
        }
      }
    } finally {
      file.end()
      await once(file, 'close')
      await store.close()
    }
    return written
  } finally {
    await db.close()
    await rm(tmp, { recursive: true, force: true })
  }
}

/** What a demoted node keeps (metadata `aside`) until the snapshot tells it which set-aside records the new primary lacks. */
export interface PendingAside {
  readonly file: string
  /** The epoch this node wrote in as primary. */
  readonly epoch: number
  /** Its log end offsets then, per stream and partition. */
  readonly ends: Record<string, number[]>
}

/** The log ends of the data about to be set aside, read by a second, read-only store over the same database. */
export async function formerLogEnds (root: LevelDatabase): Promise<Record<string, number[]>> {
  const store = await openLogStore({ db: root, follower: true })
  try {
    return logEnds(store)
  } finally {
    await store.close()
  }
}

/**
 * After the snapshot that replaced a former primary's data (`root` now holds the new primary's copy, its terms among it):
 * writes `<file>.tail.json` (the ranges) and `<file>.tail.ndjson` (the records) and logs GW_WARN_SET_ASIDE_TAIL.
 */
export async function nameTail (root: LevelDatabase, pending: PendingAside, log: Logger): Promise<void> {
  const next = await nextTerm(root, pending.epoch)
  if (next === null) {
    log.warn({ file: pending.file, epoch: pending.epoch },
      'the new primary\'s copy names no term after this node\'s: any record of the set-aside copy may be a tail it lacks')
  } else {
    const ranges = lostTail(pending.ends, next)
    const records = ranges.reduce((n, r) => n + r.to - r.from, 0)
    const file = `${pending.file}.tail.json`
    // The records themselves, readable; the offsets stand without them if this fails (the .cbor copy holds them either way).
    const recordsFile = records === 0 ? null : `${pending.file}.tail.ndjson`
    const extracted = recordsFile === null ? 0 : await extractTail(pending.file, ranges, recordsFile).catch((err: unknown) => {
      log.error({ err: (err as Error).message, file: pending.file }, 'could not extract the tail\'s records from the set-aside copy')
      return null
    })
    const doc = {
      setAside: pending.file, formerEpoch: pending.epoch, nextEpoch: next.epoch, records, ranges, recordsFile: extracted === null ? null : recordsFile,
    }
    await writeFile(file, `${JSON.stringify(doc, null, 2)}\n`)
    log.warn({ code: 'GW_WARN_SET_ASIDE_TAIL', file, records, extracted, ranges: ranges.slice(0, 20) },
      `of the data set aside in ${pending.file}, ${records} records are a tail the new primary (epoch ${next.epoch}) lacks; ` +
      `their offsets are in ${file}${extracted === null || recordsFile === null ? '' : `, the records in ${recordsFile}`}`)
  }
}
