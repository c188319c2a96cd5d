/**
 * A standby's copy of a primary's log, for follower-store tests: a primary's
 * database made with a real store, and the standby's side of a snapshot
 * (replication/standby.ts): the copy marked as replaced (its log's version
 * entry deleted), emptied, then the primary's entries written in key order.
 */
import { MemoryLevel } from 'memory-level'
import { openLogStore, replacingCopyOp, type LevelDatabase } from '../../store/index.ts'

export const STREAM = 't/s'
export const RAW = { keyEncoding: 'buffer', valueEncoding: 'buffer' } as const
export type Raw = MemoryLevel<Buffer, Buffer>

const record = (text: string): { payload: Buffer, topic: string, qos: 1, clientId: string } => ({ payload: Buffer.from(text), topic: 't', qos: 1, clientId: 'c' })

/** A primary's database: `texts` appended to the one partition of {@link STREAM} in batches of ten. */
export async function primaryLog (texts: readonly string[]): Promise<Raw> {
  const db = new MemoryLevel<Buffer, Buffer>(RAW)
  const store = await openLogStore({ db: db as unknown as LevelDatabase })
  await store.createStream(STREAM, { partitions: 1 })
  for (let i = 0; i < texts.length; i += 10) await Promise.all(texts.slice(i, i + 10).map((t) => store.append(STREAM, 'k', record(t))))
  await store.close()
  return db
}

/** Every entry of `db`, in key order (what a snapshot sends). */
export async function entriesOf (db: Raw): Promise<Array<[Buffer, Buffer]>> {
  return await db.iterator().all()
}

/** The standby's side of a snapshot: the copy marked as replaced, emptied, then `entries` written. */
export async function replaceCopy (copy: Raw, entries: ReadonlyArray<[Buffer, Buffer]>): Promise<void> {
  await copy.batch([replacingCopyOp(copy as unknown as LevelDatabase)] as never)
  await copy.clear()
  if (entries.length > 0) await copy.batch(entries.map(([key, value]) => ({ type: 'put' as const, key, value })))
}
