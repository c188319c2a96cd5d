/**
 * `edgemq check --data-dir DIR`: verifies a stopped gateway's data and says
 * whether anything is damaged, and exactly what. Two passes, both read-only:
 * LevelDB's block checksums of every table file (store/table-files.ts), then
 * every batch of every partition, followed offset by offset from the log
 * start to the log end its metadata records (store/verify.ts). Each damaged
 * range is listed per partition; the exit code says clean (0) or damaged (2).
 * The table pass runs before LevelDB opens the directory, so it sees the files
 * as they were found.
 */
import { createWriteStream, existsSync } from 'node:fs'
import { once } from 'node:events'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import {
  checkTableFiles, verifyLog, type LevelDatabase, type LogCheckReport, type PartitionCheck, type StoredRecord, type TableCheckReport,
} from '../../store/index.ts'
import { CliError } from './errors.ts'
import { recordJson } from './replay.ts'

export const CHECK_EXIT_DAMAGED = 2

export interface DataDirCheck {
  readonly dataDir: string
  readonly tables: TableCheckReport
  /** Null when LevelDB cannot open the database at all; `openError` says why. */
  readonly log: LogCheckReport | null
  readonly openError: string | null
  /** True when nothing is damaged. */
  readonly ok: boolean
}

export interface CheckOptions {
  /**
   * Writes every record that passes its checks to this file, one JSON object
   * per line (`edgemq replay`'s ndjson with the stream added, payloads in
   * base64), so that a directory can be abandoned without losing them.
   */
  readonly salvage?: string
}

export async function checkDataDir (dataDir: string, options: CheckOptions = {}): Promise<DataDirCheck & { salvaged: number | null }> {
  const location = path.join(dataDir, 'db')
  if (!existsSync(location)) throw new CliError('CLI_NO_DATA', `${dataDir} holds no gateway data (no ${location})`)
  const tables = await checkTableFiles(location)
  const db = new ClassicLevel<Buffer, Buffer>(location, { keyEncoding: 'buffer', valueEncoding: 'buffer', createIfMissing: false })
  try {
    await db.open()
  } catch (err) {
    const cause = (err as { cause?: { code?: string, message?: string } }).cause
    if (cause?.code === 'LEVEL_LOCKED') {
      throw new CliError('CLI_GATEWAY_RUNNING', `${dataDir} is locked: a gateway (or another edgemq --data-dir command) has it open; stop it first`,
        { cause: err })
    }
    const openError = `LevelDB cannot open ${location}: ${cause?.message ?? (err as Error).message}`
    return { dataDir, tables, log: null, openError, ok: false, salvaged: null }
  }
  const out = options.salvage === undefined ? undefined : createWriteStream(options.salvage, { flags: 'wx' })
  let salvaged = 0
  const outFailed = out === undefined ? undefined : new Promise<never>((_resolve, reject) => out.once('error', reject))
  void outFailed?.catch(() => {})
  const write = async (stream: string, partition: number, records: StoredRecord[]): Promise<void> => {
    if (out === undefined || outFailed === undefined) return
    const prefix = `{"stream":${JSON.stringify(stream)},`
    const lines = records.map((r) => prefix + recordJson({ ...r, partition, payload: Buffer.from(r.payload) }, 'base64').slice(1) + '\n').join('')
    salvaged += records.length
    if (!out.write(lines)) await Promise.race([once(out, 'drain'), outFailed])
  }
  try {
    const log = await verifyLog(db as unknown as LevelDatabase, { onRecords: write })
    if (out !== undefined && outFailed !== undefined) await Promise.race([new Promise<void>((resolve) => out.end(resolve)), outFailed])
    const ok = tables.damage.length === 0 && log.other.length === 0 && log.partitions.every((p) => p.damage.length === 0)
    return { dataDir, tables, log, openError: null, ok, salvaged: out === undefined ? null : salvaged }
  } catch (err) {
    if (out !== undefined && (err as NodeJS.ErrnoException).syscall !== undefined) {
      throw new CliError('CLI_OUTPUT', `cannot write the salvage file ${options.salvage}: ${(err as Error).message}`, { cause: err })
    }
    throw err
  } finally {
    out?.destroy()
    await db.close()
  }
}

/** The report as text: damage first in each section, then a one-line verdict. */
export function checkText (check: DataDirCheck & { salvaged: number | null }): string {
  const lines = [`edgemq check ${check.dataDir}`]
  const t = check.tables
  const tables = t.damage.length === 0 ? 'every block checksum holds' : `${t.damage.length} damaged`
  lines.push(`LevelDB table files: ${t.files} files, ${t.blocks} blocks, ${t.bytes} bytes: ${tables}`)
  for (const d of t.damage) {
    lines.push(`  DAMAGED ${d.file}: ${d.problem} at byte ${d.offset}${d.block === undefined ? '' : ` (block of ${d.block.size} bytes)`}`)
  }
  if (check.openError !== null) lines.push(`log: not checked: ${check.openError}`)
  const log = check.log
  if (log !== null) {
    const records = log.partitions.reduce((n, p) => n + p.records, 0)
    const batches = log.partitions.reduce((n, p) => n + p.batches, 0)
    const streams = new Set(log.partitions.map((p) => p.stream)).size
    lines.push(`log: ${streams} streams, ${log.partitions.length} partitions, ${records} records in ${batches} batches`)
    for (const o of log.other) lines.push(`  DAMAGED ${o}`)
    for (const p of log.partitions) lines.push(...partitionLines(p))
  }
  if (check.salvaged !== null) lines.push(`salvaged ${check.salvaged} records (every one that passed its checks)`)
  const lost = log?.partitions.reduce((n, p) => n + p.damage.reduce((m, d) => m + (d.to - d.from), 0), 0) ?? 0
  lines.push(check.ok
    ? 'result: OK, no damage found'
    : `result: DAMAGED${lost > 0 ? `: ${lost} offsets cannot be read (listed above)` : ''}; ` +
      'see docs/operations.md, "Damaged data", before starting the gateway on this directory')
  return `${lines.join('\n')}\n`
}

function partitionLines (p: PartitionCheck): string[] {
  const name = `${p.stream}[${p.partition}]`
  const head = `  ${name}: offsets ${p.logStartOffset} to ${p.logEndOffset}, ${p.records} records in ${p.batches} batches`
  if (p.damage.length === 0) return [`${head}: OK`]
  return [`${head}: DAMAGED`, ...p.damage.map((d) => d.to > d.from
    ? `    ${d.kind} offsets ${d.from} to ${d.to - 1} (${d.to - d.from} records): ${d.detail}`
    : `    ${d.kind}: ${d.detail}`)]
}
