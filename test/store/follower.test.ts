/**
 * A follower store (a standby's: another writer owns its database) and the
 * commit gate (a synchronous replica's acknowledgement): the store's two
 * additions for replication, on memory-level, without the gateway.
 */
import { MemoryLevel } from 'memory-level'
import { afterEach, describe, expect, it } from 'vitest'
import { openLogStore, type LevelDatabase, type LogStore } from '../../store/index.ts'

const record = (text: string): { payload: Buffer, topic: string, qos: 1, clientId: string } => ({ payload: Buffer.from(text), topic: 't', qos: 1, clientId: 'c' })

describe('a follower store', () => {
  const opened: LogStore[] = []
  afterEach(async () => { for (const s of opened.splice(0)) await s.close() })

  async function pair (): Promise<{ writer: LogStore, follower: LogStore }> {
    const db = new MemoryLevel({ keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const writer = await openLogStore({ db })
    const follower = await openLogStore({ db, follower: true })
    opened.push(follower, writer)
    return { writer, follower }
  }

  it('sees nothing until refresh(), then the writer\'s streams, records and group offsets, and wakes onAppend listeners', async () => {
    const { writer, follower } = await pair()
    await writer.createStream('t/s', { partitions: 2 })
    const { partition } = await writer.append('t/s', 'k', record('one'))
    await writer.append('t/s', 'k', record('two'))
    await writer.commitOffset('g', 't/s', partition, 1)
    expect(follower.listStreams()).toEqual([])
    const woken: number[] = []
    follower.onAppend((e) => { woken.push(e.logEndOffset) })
    await follower.refresh()
    expect(follower.partitionInfo('t/s', partition).logEndOffset).toBe(2)
    expect((await follower.read('t/s', partition, 0)).records.map((r) => Buffer.from(r.payload).toString())).toEqual(['one', 'two'])
    expect(follower.fetchOffset('g', 't/s', partition)).toBe(1)
    expect(woken).toEqual([2])
    await follower.refresh()
    expect(woken).toEqual([2])
  })

  it('refuses every write with STORE_READ_ONLY and writes nothing', async () => {
    const { writer, follower } = await pair()
    await writer.createStream('t/s', { partitions: 1 })
    await follower.refresh()
    const refusals = [
      follower.append('t/s', 'k', record('x')), follower.write([]), follower.createStream('t/x', { partitions: 1 }),
      follower.commitOffset('g', 't/s', 0, 0), follower.setGroup('g', { holdsRetention: true }), follower.resetGroup('g', 't/s', { to: 'earliest' }),
      follower.deleteGroup('g'), follower.forgetDedupe('d'), follower.forgetDedupePrefix('d'), follower.enforceRetention(),
    ]
    for (const r of refusals) await expect(r).rejects.toMatchObject({ code: 'STORE_READ_ONLY' })
    expect(writer.partitionInfo('t/s', 0).logEndOffset).toBe(0)
    expect(writer.listGroups()).toEqual([])
    await expect(writer.refresh()).rejects.toMatchObject({ code: 'STORE_INVALID_ARGUMENT' })
  })
})

describe('the commit gate', () => {
  it('holds a commit\'s appends (and their readability) until it resolves, and is told the commit\'s record count', async () => {
    const db = new MemoryLevel({ keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const seen: number[] = []
    let open: () => void = () => {}
    const store = await openLogStore({
      db,
      commitGate: async ({ records }) => {
        seen.push(records)
        await new Promise<void>((resolve) => { open = resolve })
      },
    })
    await store.createStream('t/s', { partitions: 1 })
    let acked = false
    const append = store.append('t/s', 'k', record('held')).then((r) => { acked = true; return r })
    // The gate was reached: the commit is written, and waits.
    for (let i = 0; i < 1000 && seen.length === 0; i++) await new Promise((resolve) => setImmediate(resolve))
    expect(seen).toEqual([1])
    expect(acked).toBe(false)
    expect(store.partitionInfo('t/s', 0).logEndOffset).toBe(0)
    open()
    expect(await append).toEqual({ partition: 0, offset: 0 })
    expect(store.partitionInfo('t/s', 0).logEndOffset).toBe(1)
    await store.close()
  })
})
