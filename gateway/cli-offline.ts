/**
 * Reading a stopped gateway's data directory (`--data-dir`): the LevelDB
 * under `<dir>/db` opened with classic-level, and the log through
 * openLogStore. Streams and groups there are `<tenant>/<name>`; the commands
 * show the chosen tenant's, under the names the HTTP API uses, in the same
 * JSON shapes as the API's answers.
 *
 * LevelDB allows one process per database: while the gateway runs, opening
 * fails with LEVEL_LOCKED, reported as CLI_GATEWAY_RUNNING.
 */
import { existsSync } from 'node:fs'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import { isStoreError, openLogStore, type LevelDatabase, type LogStore, type StreamInfo } from '../store/index.ts'
import { CliError } from './cli-errors.ts'

export interface OfflineLog {
  readonly store: LogStore
  readonly tenant: string
  /** The store's name of a tenant's stream; CLI_UNKNOWN_STREAM when there is none. */
  streamInfo (name: string): StreamInfo
  close (): Promise<void>
}

export async function openDataDir (dataDir: string, tenant: string): Promise<OfflineLog> {
  const location = path.join(dataDir, 'db')
  if (!existsSync(location)) throw new CliError('CLI_NO_DATA', `${dataDir} holds no gateway data (no ${location})`)
  const db = new ClassicLevel<Buffer, Buffer>(location, { keyEncoding: 'buffer', valueEncoding: 'buffer', createIfMissing: false })
  try {
    await db.open()
  } catch (err) {
    const cause = (err as { cause?: { code?: string, message?: string } }).cause
    if (cause?.code === 'LEVEL_LOCKED') throw new CliError('CLI_GATEWAY_RUNNING', `${dataDir} is locked: the gateway is running; use --url (or another edgemq --data-dir command has it open)`, { cause: err })
    throw new CliError('CLI_NO_DATA', `cannot open ${location}: ${cause?.message ?? (err as Error).message}`, { cause: err })
  }
  let store: LogStore
  try {
    store = await openLogStore({ db: db as unknown as LevelDatabase })
  } catch (err) {
    await db.close().catch(() => {})
    throw err
  }
  return {
    store,
    tenant,
    streamInfo (name) {
      try {
        if (!name.includes('/')) return store.streamInfo(`${tenant}/${name}`)
      } catch (err) {
        if (!isStoreError(err, 'STORE_UNKNOWN_STREAM') && !isStoreError(err, 'STORE_INVALID_NAME')) throw err
      }
      const known = store.listStreams().filter((s) => s.name.startsWith(`${tenant}/`)).map((s) => s.name.slice(tenant.length + 1))
      throw new CliError('CLI_UNKNOWN_STREAM', `unknown stream ${JSON.stringify(name)} in tenant ${tenant} (it has ${known.length === 0 ? 'none' : known.join(', ')})`)
    },
    async close () {
      try { await store.close() } finally { await db.close() }
    },
  }
}

/** GET /v1/streams's partition object, from the store. */
export function partitionDoc (store: LogStore, stream: string, partition: number): PartitionDoc {
  const p = store.partitionInfo(stream, partition)
  return {
    partition,
    logStartOffset: p.logStartOffset,
    logEndOffset: p.logEndOffset,
    records: p.logEndOffset - p.logStartOffset,
    bytes: p.bytes,
    oldestTimestamp: p.oldestTimestamp,
    newestTimestamp: p.newestTimestamp,
  }
}

export interface PartitionDoc {
  readonly partition: number
  readonly logStartOffset: number
  readonly logEndOffset: number
  readonly records: number
  readonly bytes: number
  readonly oldestTimestamp: number | null
  readonly newestTimestamp: number | null
}

export interface StreamDoc {
  readonly name: string
  readonly partitionCount: number
  readonly retentionMs: number
  readonly retentionBytes: number
  readonly records: number
  readonly bytes: number
  readonly oldestTimestamp: number | null
  readonly newestTimestamp: number | null
  readonly partitions: readonly PartitionDoc[]
}

export interface PartitionLagDoc {
  readonly partition: number
  readonly committedOffset: number | null
  readonly logStartOffset: number
  readonly logEndOffset: number
  readonly lagMessages: number
  readonly lagSeconds: number
}

export interface GroupStreamDoc {
  readonly stream: string
  readonly lagMessages: number
  readonly lagSeconds: number
  readonly partitions: readonly PartitionLagDoc[]
}

export interface GroupDoc {
  readonly group: string
  readonly lagMessages: number
  readonly lagSeconds: number
  readonly streams: readonly GroupStreamDoc[]
}

/** GET /v1/streams/{name}'s answer (without `tenant`), from the store. */
export function streamDoc (log: OfflineLog, info: StreamInfo): StreamDoc {
  const partitions = Array.from({ length: info.partitions }, (_, p) => partitionDoc(log.store, info.name, p))
  let oldest: number | null = null
  let newest: number | null = null
  for (const p of partitions) {
    if (p.oldestTimestamp !== null && (oldest === null || p.oldestTimestamp < oldest)) oldest = p.oldestTimestamp
    if (p.newestTimestamp !== null && (newest === null || p.newestTimestamp > newest)) newest = p.newestTimestamp
  }
  return {
    name: info.name.slice(log.tenant.length + 1),
    partitionCount: info.partitions,
    retentionMs: info.retentionMs,
    retentionBytes: info.retentionBytes,
    records: partitions.reduce((n, p) => n + p.records, 0),
    bytes: partitions.reduce((n, p) => n + p.bytes, 0),
    oldestTimestamp: oldest,
    newestTimestamp: newest,
    partitions,
  }
}

/** The tenant's streams, as GET /v1/streams lists them. */
export function streamDocs (log: OfflineLog): StreamDoc[] {
  return log.store.listStreams().filter((s) => s.name.startsWith(`${log.tenant}/`)).map((s) => streamDoc(log, s))
}

/** The tenant's consumer groups with their lag, as GET /v1/groups lists them. */
export async function groupDocs (log: OfflineLog): Promise<GroupDoc[]> {
  const prefix = `${log.tenant}/`
  const out: GroupDoc[] = []
  for (const g of log.store.listGroups()) {
    if (!g.group.startsWith(prefix)) continue
    const streams: GroupStreamDoc[] = []
    for (const stream of Object.keys(g.offsets).filter((s) => s.startsWith(prefix)).sort()) {
      try {
        log.store.streamInfo(stream)
      } catch {
        continue // the stream is gone; its offsets mean nothing any more
      }
      const partitions = await log.store.groupLag(g.group, stream)
      streams.push({
        stream: stream.slice(prefix.length),
        lagMessages: partitions.reduce((sum, p) => sum + p.lagMessages, 0),
        lagSeconds: partitions.reduce((max, p) => Math.max(max, p.lagSeconds), 0),
        partitions,
      })
    }
    out.push({
      group: g.group.slice(prefix.length),
      lagMessages: streams.reduce((sum, s) => sum + s.lagMessages, 0),
      lagSeconds: streams.reduce((max, s) => Math.max(max, s.lagSeconds), 0),
      streams,
    })
  }
  return out
}
