/**
 * HTTP long polls on a standby whose log a snapshot rewinds while they wait
 * (query/log-rewinds.ts): a poll at the old log end (180) is woken by the new
 * primary's records and answers from the new end (160), in JSON and in
 * format=batches, instead of from 180 with 160 to 179 of the new history
 * skipped. The snapshot and the appends after it are played as the standby
 * applies them (test/store/follower-copy.ts), refreshed through the tracker
 * as the gateway does.
 */
import type { ServerResponse } from 'node:http'
import { MemoryLevel } from 'memory-level'
import { afterEach, describe, expect, it } from 'vitest'
import { serveBatches } from '../../../gateway/http/batches.ts'
import { AppendWaiters, parseRecordsRequest, serveRecords, type PartitionTarget, type RecordsQuery } from '../../../gateway/http/records.ts'
import { readBatchStream, type BatchStreamItem } from '../../../gateway/cli/batches.ts'
import { followRewinds, type ReaderMovedBack } from '../../../gateway/query/log-rewinds.ts'
import { openLogStore, type LevelDatabase, type LogStore } from '../../../store/index.ts'
import { entriesOf, primaryLog, RAW, replaceCopy, STREAM } from '../../store/follower-copy.ts'

const OLD = Array.from({ length: 180 }, (_, i) => `old-${i}`)
const NEW = [...OLD.slice(0, 150), ...Array.from({ length: 25 }, (_, i) => `new-${150 + i}`)]
const TARGET: PartitionTarget = { stream: STREAM, name: 's', partition: 0 }

/** A ServerResponse that keeps what is written. */
function collector (): { res: ServerResponse, body: () => Buffer } {
  const chunks: Buffer[] = []
  const res = {
    writeHead () { return res },
    write (c: Uint8Array) { chunks.push(Buffer.from(c)); return true },
    end (c?: Uint8Array | string) { if (c !== undefined) chunks.push(Buffer.from(c)); return res },
    cork () {},
    uncork () {},
    writableNeedDrain: false,
    destroyed: false,
  }
  return { res: res as unknown as ServerResponse, body: () => Buffer.concat(chunks) }
}

describe('an HTTP long poll at a standby\'s log end that a snapshot rewinds while it waits', () => {
  const opened: LogStore[] = []
  const closers: Array<() => void> = []
  afterEach(async () => {
    for (const close of closers.splice(0)) close()
    for (const s of opened.splice(0)) await s.close()
  })

  /**
   * Serves `query` at the old log end on a standby; once the poll waits, the snapshot (the new primary's log, to 160)
   * and the new primary's next records (to 175) come in. Resolves with the response body and the readers moved back.
   */
  async function pollThroughRewind (query: RecordsQuery, serve: typeof serveRecords): Promise<{ body: Buffer, moved: ReaderMovedBack[] }> {
    const copy = new MemoryLevel<Buffer, Buffer>(RAW)
    await replaceCopy(copy, await entriesOf(await primaryLog(OLD)))
    const store = await openLogStore({ db: copy as unknown as LevelDatabase, follower: true })
    opened.push(store)
    const moved: ReaderMovedBack[] = []
    const tracker = followRewinds(store, { readerMovedBack: (m) => moved.push(m) })
    let waiting!: () => void
    const polling = new Promise<void>((resolve) => { waiting = resolve })
    const waiters = new AppendWaiters(store, (n) => { if (n > 0) waiting() })
    closers.push(() => waiters.close())
    const out = collector()
    const req = parseRecordsRequest({ offset: '180', wait: 30, ...query }, 0, 'json', (g) => g)
    const served = serve({ store, waiters, signal: new AbortController().signal }, TARGET, req, out.res)
    await polling
    await replaceCopy(copy, await entriesOf(await primaryLog(NEW.slice(0, 160))))
    await tracker.refresh()
    await replaceCopy(copy, await entriesOf(await primaryLog(NEW)))
    await tracker.refresh()
    await served
    return { body: out.body(), moved }
  }

  it('JSON: answers the new primary\'s records from the new end, and where to go on', async () => {
    const { body, moved } = await pollThroughRewind({ format: 'json' }, serveRecords)
    const doc = JSON.parse(body.toString()) as { records: Array<{ offset: number, payload: string }>, nextOffset: number }
    expect(doc.records.map((r) => [r.offset, r.payload])).toEqual(NEW.slice(160).map((t, i) => [160 + i, t]))
    expect(doc.nextOffset).toBe(175)
    expect(moved).toEqual([{ stream: STREAM, partition: 0, from: 180, to: 160 }])
  })

  it('format=batches: the head starts at the new end', async () => {
    const { body, moved } = await pollThroughRewind({ format: 'batches' }, serveBatches)
    const items: BatchStreamItem[] = []
    for await (const item of readBatchStream((async function * () { yield body })())) items.push(item)
    expect(items[0]).toMatchObject({ kind: 'head', head: { fromOffset: 160 } })
    const records = items.flatMap((x) => x.kind === 'records' ? x.records : [])
    expect(records.map((r) => [r.offset, Buffer.from(r.payload).toString()])).toEqual(NEW.slice(160).map((t, i) => [160 + i, t]))
    expect(items.at(-1)).toMatchObject({ kind: 'end', end: { nextOffset: 175 } })
    expect(moved).toEqual([{ stream: STREAM, partition: 0, from: 180, to: 160 }])
  })
})
