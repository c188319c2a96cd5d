/**
 * The writer's leader/follower group commit (log-store.ts header): appends
 * that arrive while a commit's write is on its way to the disk all go out
 * together in the next write, which starts as soon as that one finished,
 * with no timer. This is what lets devices that keep one message in flight
 * share fsyncs (BENCHMARKS.md, gateway device).
 */
import { MemoryLevel } from 'memory-level'
import { afterEach, describe, expect, it } from 'vitest'
import { openLogStore, type CommitStats, type LevelDatabase, type LogStore } from '../../store/index.ts'
import { payloadOf } from './harness.ts'

type PrivateBatch = (operations: readonly unknown[], options: unknown) => Promise<void>

describe('group commit', () => {
  let store: LogStore | undefined
  afterEach(async () => { await store?.close() })

  it('takes every append that arrived during a write into the next write, started as soon as that one finished', async () => {
    const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const commits: CommitStats[] = []
    store = await openLogStore({ db: db as unknown as LevelDatabase, observer: { onCommit: (c) => { commits.push(c) } } })
    await store.createStream('t/s', { partitions: 8 })
    // Hold each write until released, as a slow fsync would, and count the writes that started.
    const target = db as unknown as { _batch: PrivateBatch }
    const write = target._batch.bind(db)
    const held: Array<() => void> = []
    let started = 0
    let onStart: (() => void) | undefined
    target._batch = async (operations, options) => {
      started++
      onStart?.()
      await new Promise<void>((resolve) => held.push(resolve))
      return write(operations, options)
    }
    const nextStart = (): Promise<void> => new Promise((resolve) => { onStart = resolve })

    const firstStarted = nextStart()
    const first = store.append('t/s', 'dev-0', { payload: payloadOf(0) })
    await firstStarted
    // Nine devices publish while the first write is held: none of them starts a write of its own.
    const rest = Array.from({ length: 9 }, (_, i) => store!.append('t/s', `dev-${i + 1}`, { payload: payloadOf(i + 1) }))
    await new Promise((resolve) => setImmediate(resolve))
    expect(started).toBe(1)
    const secondStarted = nextStart()
    held.shift()!()
    await first
    // The second write began on its own once the first was done: all nine records in it.
    await secondStarted
    expect(started).toBe(2)
    held.shift()!()
    const results = await Promise.all(rest)
    expect(commits.map((c) => c.records)).toEqual([1, 9])
    expect(new Set(results.map((r) => `${r.partition}/${r.offset}`)).size).toBe(9)
    target._batch = write
  })
})
