/**
 * Reads a stopped gateway's log straight from its data directory, as a replay
 * would: every record of every stream, in partition then offset order.
 */
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import { openLogStore, type LevelDatabase } from '../../store/index.ts'

export interface LoggedRecord {
  readonly stream: string
  readonly partition: number
  readonly offset: number
  readonly key: string
  readonly topic: string
  readonly clientId: string
  readonly payload: string
}

/** All records of all streams of the gateway whose data directory is `dataDir` (the gateway must be stopped). */
export async function readWholeLog (dataDir: string): Promise<LoggedRecord[]> {
  const db = new ClassicLevel<Buffer, Buffer>(path.join(dataDir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await db.open()
  try {
    const store = await openLogStore({ db: db as unknown as LevelDatabase })
    const out: LoggedRecord[] = []
    try {
      for (const info of store.listStreams()) {
        for (let p = 0; p < info.partitions; p++) {
          let offset = store.partitionInfo(info.name, p).logStartOffset
          for (;;) {
            const r = await store.read(info.name, p, offset, { maxRecords: 5000, maxBytes: 16 << 20 })
            if (r.records.length === 0) break
            for (const rec of r.records) {
              out.push({
                stream: info.name, partition: p, offset: rec.offset, key: rec.key, topic: rec.topic,
                clientId: rec.clientId, payload: Buffer.from(rec.payload).toString(),
              })
            }
            offset = r.nextOffset
          }
        }
      }
    } finally {
      await store.close()
    }
    return out
  } finally {
    await db.close()
  }
}
