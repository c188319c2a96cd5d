/**
 * A full verification of the log (what `edgemq check` runs): every batch of
 * every partition is read, its header and CRC-32 checked and its body
 * decoded, and the offsets are followed from the log start recorded in `P` to
 * the log end recorded there, so that a missing batch is a listed range, not
 * a silent hole. A partition whose stream entry is lost (it can share a
 * damaged table block with the newest batches) is found by its batch keys and
 * reported as stream `#<id>`. Works on the raw key space (format.ts), without opening a
 * LogStore, since a store refuses to open on a damaged tail and this is what
 * says where the damage is. Reads only.
 *
 * Cost: every byte of the log, one batch at a time (bounded memory).
 */
import type { AbstractLevel } from 'abstract-level'
import { isLevelCorruption } from './damage.ts'
import { decodeBatch, decodeMeta, keys, readBatchHeader } from './format.ts'
import type { LevelDatabase } from './log-store.ts'
import type { StoredRecord } from './types.ts'

type LogDb = AbstractLevel<string | Buffer | Uint8Array, Buffer, Buffer>

export interface LogDamage {
  /**
   * `missing`: no batch holds these offsets; `corrupt`: a batch holds them but
   * fails its checks; `unreadable`: LevelDB failed reading from here on;
   * `metadata`: the batches are there but the partition's metadata (or its stream's entry) is not.
   */
  readonly kind: 'missing' | 'corrupt' | 'unreadable' | 'metadata'
  /** The damaged offsets, [from, to). */
  readonly from: number
  readonly to: number
  readonly detail: string
}

export interface PartitionCheck {
  readonly stream: string
  readonly partition: number
  /** As recorded in the partition's metadata. */
  readonly logStartOffset: number
  /** As recorded in the partition's metadata (or, for data written before it was recorded, the end of the last batch). */
  readonly logEndOffset: number
  readonly batches: number
  /** Records in batches that passed every check. */
  readonly records: number
  readonly bytes: number
  readonly damage: LogDamage[]
}

export interface LogCheckReport {
  readonly partitions: PartitionCheck[]
  /** Problems outside any partition's offsets (an unreadable stream entry, a LevelDB error while listing). */
  readonly other: string[]
}

interface StreamMeta { id: number, partitions: number }

const MAX_U32 = 2 ** 32 - 1

/** An error thrown by the caller's onRecords: passed through, not reported as damage. */
class CallerFailure extends Error {
  constructor (cause: unknown) { super('onRecords failed', { cause }) }
}
interface PartitionMeta { logStart: number, bytes: number, logEnd?: number }

export interface VerifyOptions {
  /** Called with the records of every batch that passes its checks, in offset order per partition (for salvaging them). */
  readonly onRecords?: (stream: string, partition: number, records: StoredRecord[]) => void | Promise<void>
}

export async function verifyLog (db: LevelDatabase, options: VerifyOptions = {}): Promise<LogCheckReport> {
  const log = db.sublevel<Buffer, Buffer>('log', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LogDb
  const partitions: PartitionCheck[] = []
  const other: string[] = []
  const streams = await listStreams(log, other)
  const checked = new Set<string>()
  for (const [name, value] of streams) {
    let meta: StreamMeta
    try {
      meta = decodeMeta<StreamMeta>(value)
      if (!Number.isInteger(meta.id) || !Number.isInteger(meta.partitions)) throw new Error('not a stream entry')
    } catch (err) {
      other.push(`stream ${name}: its entry cannot be decoded (${message(err)}); its partitions were not checked`)
      continue
    }
    for (let p = 0; p < meta.partitions; p++) {
      checked.add(`${meta.id}/${p}`)
      partitions.push(await verifyPartition(log, name, meta.id, p, options))
    }
  }
  // A stream entry can share a damaged table block with the newest batches: the partitions are then found by their batches.
  for (const { id, partition } of await partitionsWithBatches(log, other)) {
    if (checked.has(`${id}/${partition}`)) continue
    partitions.push(await verifyPartition(log, `#${id}`, id, partition, options, `no readable stream entry names partition ${partition} of stream id ${id}`))
  }
  return { partitions, other }
}

/** The stream entries, one at a time: when LevelDB fails on a block, the entries read before it are kept. */
async function listStreams (log: LogDb, other: string[]): Promise<Array<[string, Buffer]>> {
  const streams: Array<[string, Buffer]> = []
  const iterator = log.iterator(keys.streamRange())
  try {
    for (let entries = await iterator.nextv(1); entries.length > 0; entries = await iterator.nextv(1)) {
      for (const [key, value] of entries) streams.push([keys.streamName(key), value])
    }
  } catch (err) {
    other.push(`cannot list the streams: ${message(err)}`)
  } finally {
    await iterator.close()
  }
  return streams
}

/** Every partition that holds a batch, one seek per partition (the batch keys start with stream id and partition). */
async function partitionsWithBatches (log: LogDb, other: string[]): Promise<Array<{ id: number, partition: number }>> {
  const found: Array<{ id: number, partition: number }> = []
  const { lt } = keys.batchSpace()
  let from = keys.batchSpace().gte
  for (;;) {
    let key: Buffer | undefined
    try {
      [key] = await log.keys({ gte: from, lt, limit: 1 }).all()
    } catch (err) {
      other.push(`cannot list the partitions by their batches: ${message(err)}`)
      return found
    }
    if (key === undefined) return found
    const { streamId: id, partition } = keys.batchPartition(key)
    found.push({ id, partition })
    from = partition < MAX_U32 ? keys.batch(id, partition + 1, 0) : keys.batch(id + 1, 0, 0)
  }
}

async function verifyPartition (
  log: LogDb, stream: string, id: number, partition: number, options: VerifyOptions, unnamed?: string,
): Promise<PartitionCheck> {
  const damage: Array<{ kind: LogDamage['kind'], from: number, to: number, detail: string }> = []
  let meta: PartitionMeta | undefined
  let metaProblem = 'the partition has batches but its metadata entry is gone'
  try {
    const raw = await log.get(keys.partition(id, partition))
    if (raw !== undefined) meta = decodeMeta<PartitionMeta>(raw)
  } catch (err) {
    metaProblem = `its metadata entry cannot be read (${message(err)})`
  }
  const logStart = meta?.logStart ?? 0
  let expected = logStart
  let firstBase: number | undefined
  let batches = 0
  let records = 0
  let bytes = 0
  /** A corrupt batch's header is not to be trusted: it ends where the next batch (or the log) begins. */
  let open: { to: number } | undefined
  const where = (baseOffset: number): { stream: string, partition: number, baseOffset: number } => ({ stream, partition, baseOffset })
  const iterator = log.iterator(keys.batchRange(id, partition))
  try {
    for (;;) {
      // One entry per call: when LevelDB fails on a block, classic-level drops the entries already read in that call.
      const entries = await iterator.nextv(1)
      if (entries.length === 0) break
      for (const [key, value] of entries) {
        const base = keys.batchBase(key)
        if (firstBase === undefined) {
          firstBase = base
          if (meta === undefined) expected = base // without metadata, the first batch is where the log starts
        }
        if (base < logStart) continue // retention deletes batches with the metadata in one write; none should be here
        if (open !== undefined) { open.to = Math.max(base, expected); expected = open.to; open = undefined }
        if (base > expected) damage.push({ kind: 'missing', from: expected, to: base, detail: 'no batch holds these offsets' })
        if (base < expected) damage.push({ kind: 'corrupt', from: base, to: expected, detail: `the batch at ${base} overlaps the one before it` })
        batches++
        bytes += value.length
        let decoded: StoredRecord[] | undefined
        try {
          const header = readBatchHeader(value, where(base))
          decoded = decodeBatch(value, header, where(base))
          records += header.count
          expected = Math.max(expected, base + header.count)
        } catch (err) {
          open = { to: base + 1 }
          damage.push(Object.assign(open, { kind: 'corrupt' as const, from: base, detail: message(err) }))
          expected = Math.max(expected, base + 1)
        }
        if (decoded !== undefined && options.onRecords !== undefined) {
          try {
            await options.onRecords(stream, partition, decoded)
          } catch (err) {
            throw new CallerFailure(err)
          }
        }
      }
    }
  } catch (err) {
    if (err instanceof CallerFailure) throw err.cause
    const detail = isLevelCorruption(err) ? `LevelDB reports corruption: ${message(err)}` : `LevelDB failed: ${message(err)}`
    open = { to: expected }
    damage.push(Object.assign(open, { kind: 'unreadable' as const, from: expected, detail }))
  } finally {
    await iterator.close()
  }
  const logEnd = Math.max(meta?.logEnd ?? expected, logStart)
  if (open !== undefined) {
    open.to = Math.max(open.to, logEnd)
    expected = open.to
  }
  if (expected < logEnd) {
    damage.push({ kind: 'missing', from: expected, to: logEnd, detail: `the partition's metadata records the log end at ${logEnd}, the last readable batch ends at ${expected}` })
  }
  // LevelDB reports a block it skipped only when the iterator ends: the skipped offsets are the missing ranges already listed.
  const skipped = damage.findIndex((d) => d.kind === 'unreadable' && d.to <= d.from)
  const missing = damage.filter((d) => d.kind === 'missing')
  if (skipped !== -1 && missing.length > 0) {
    for (const d of missing) d.detail = `${d.detail}; ${(damage[skipped] as LogDamage).detail}`
    damage.splice(skipped, 1)
  }
  if (meta === undefined && firstBase !== undefined) damage.unshift({ kind: 'metadata', from: firstBase, to: Math.max(expected, logEnd), detail: metaProblem })
  if (unnamed !== undefined && firstBase !== undefined) damage.unshift({ kind: 'metadata', from: firstBase, to: Math.max(expected, logEnd), detail: unnamed })
  return { stream, partition, logStartOffset: logStart, logEndOffset: Math.max(logEnd, expected), batches, records, bytes, damage }
}

function message (err: unknown): string {
  let e = err as { message?: string, cause?: unknown } | undefined
  while (e?.cause !== undefined && e.cause !== null && typeof e.cause === 'object') e = e.cause as typeof e
  return e?.message ?? String(err)
}
