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
import { isStoreError, openLogStore, type LevelDatabase, type LogStore, type StreamInfo } from '../../store/index.ts'
import { CliError } from './errors.ts'
import {
  groupDocs as buildGroupDocs, streamDoc as buildStreamDoc, streamDocs as buildStreamDocs, type GroupDoc, type StreamDoc,
} from '../query/documents.ts'

export type { GroupDoc, GroupStreamDoc, PartitionDoc, PartitionLagDoc, StreamDoc } from '../query/documents.ts'

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
    if (cause?.code === 'LEVEL_LOCKED') {
      throw new CliError('CLI_GATEWAY_RUNNING', `${dataDir} is locked: the gateway is running; use --url (or another edgemq --data-dir command has it open)`,
        { cause: err })
    }
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
      const have = known.length === 0 ? 'none' : known.join(', ')
      throw new CliError('CLI_UNKNOWN_STREAM', `unknown stream ${JSON.stringify(name)} in tenant ${tenant} (it has ${have})`)
    },
    async close () {
      try { await store.close() } finally { await db.close() }
    },
  }
}

/** GET /v1/streams/{name}'s answer (without `tenant`), from a stopped gateway's data. */
export function streamDoc (log: OfflineLog, info: StreamInfo): StreamDoc {
  return buildStreamDoc(log.store, log.tenant, info)
}

/** The tenant's streams, as GET /v1/streams lists them. */
export function streamDocs (log: OfflineLog): StreamDoc[] {
  return buildStreamDocs(log.store, log.tenant)
}

/** The tenant's consumer groups with their lag, as GET /v1/groups lists them. */
export function groupDocs (log: OfflineLog): Promise<GroupDoc[]> {
  return buildGroupDocs(log.store, log.tenant)
}
