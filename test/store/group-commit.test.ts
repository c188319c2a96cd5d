/**
 * The writer's leader/follower group commit (log-store.ts header): appends
 * that arrive while a commit's write is on its way to the disk all go out
 * together in the next write, which starts as soon as that one finished,
 * with no timer. This is what lets devices that keep one message in flight
 * share fsyncs (BENCHMARKS.md, gateway device). When fewer records wait than
 * the last commit held, the writer first waits a little for the devices it
 * just acknowledged, so that two groups of devices do not take turns on the
 * disk for ever.
 */
import { MemoryLevel } from 'memory-level'
import { afterEach, beforeEach, describe, expect, it, onTestFinished, vi } from 'vitest'
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

  /**
   * A MemoryLevel whose writes wait until released, as a slow fsync; `started` resolves when the next one began;
   * after `flow` they no longer wait.
   */
  function heldDatabase (): { db: MemoryLevel<Buffer, Buffer>, release: () => void, started: () => Promise<void>, writes: () => number, flow: () => void } {
    const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const target = db as unknown as { _batch: PrivateBatch }
    const write = target._batch.bind(db)
    const held: Array<() => void> = []
    let holding = true
    let count = 0
    let onStart: (() => void) | undefined
    target._batch = async (operations, options) => {
      count++
      if (holding) await new Promise<void>((resolve) => { held.push(resolve); onStart?.() })
      return write(operations, options)
    }
    return {
      db,
      release: () => held.shift()!(),
      started: () => new Promise((resolve) => { onStart = resolve }),
      writes: () => count,
      flow: () => {
        holding = false
        for (const resolve of held.splice(0)) resolve()
      },
    }
  }

  it('writes two groups of devices that took turns on the disk together once either is acknowledged', async () => {
    // The gather's clock moves 0.1 ms a turn of the event loop, not with the wall: on a busy machine a real one ran out
    // between two turns and the groups went to the disk one record at a time (CI, 2026-12-02).
    vi.useFakeTimers({ toFake: ['performance'] })
    let ticking = true
    onTestFinished(() => { ticking = false; vi.useRealTimers() })
    void (async () => { while (ticking) { await turns(1); vi.advanceTimersByTime(0.1) } })()
    const { db, release, started, flow } = heldDatabase()
    const commits: CommitStats[] = []
    store = await openLogStore({ db: db as unknown as LevelDatabase, observer: { onCommit: (c) => { commits.push(c) } } })
    await store.createStream('t/s', { partitions: 4 })
    // Ten devices, each sending its next message a turn of the event loop after the last one is acknowledged (its
    // round trip), three messages each.
    const device = async (i: number): Promise<void> => {
      for (let m = 0; m < 3; m++) {
        await store!.append('t/s', `dev-${i}`, { payload: payloadOf(i * 10 + m) })
        await new Promise((resolve) => setImmediate(resolve))
      }
    }
    // dev-0 alone starts a write; the nine others arrive while it is on its way: the groups of 1 and 9.
    let next = started()
    const devices = [device(0)]
    await next
    for (let i = 1; i < 10; i++) devices.push(device(i))
    // The first write, then the gathered groups.
    next = started()
    release()
    await next
    flow()
    await Promise.all(devices)
    // dev-0 alone, then the nine wait for dev-0 to send again instead of going without it (dev-0 has sent all three
    // when the nine send their last).
    expect(commits.map((c) => c.records)).toEqual([1, 10, 10, 9])
    const stored = (await Promise.all([0, 1, 2, 3].map((p) => store!.read('t/s', p, 0)))).flatMap((r) => r.records)
    expect(stored).toHaveLength(30)
  })

  /** `n` turns of the event loop: a device's round trip in these tests. */
  const turns = async (n: number): Promise<void> => {
    for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve))
  }

  describe('with the clock of the gather\'s 0.5 ms stopped (it runs out only when a test moves it on)', () => {
    beforeEach(() => { vi.useFakeTimers({ toFake: ['performance'] }) })
    afterEach(() => { vi.useRealTimers() })

    it('waits for every device the last commit acknowledged, also when one of the other group waits already', async () => {
      const { db, started, flow } = heldDatabase()
      const commits: CommitStats[] = []
      store = await openLogStore({ db: db as unknown as LevelDatabase, observer: { onCommit: (c) => { commits.push(c) } } })
      await store.createStream('t/s', { partitions: 4 })
      // dev-8 takes a turn longer than the others to send again; dev-9 sends two messages, the others three.
      const device = async (i: number): Promise<void> => {
        for (let m = 0; m < (i === 9 ? 2 : 3); m++) {
          await store!.append('t/s', `dev-${i}`, { payload: payloadOf(i * 10 + m) })
          await turns(i === 8 ? 2 : 1)
        }
      }
      // Nine devices start a write together; dev-9 sends while it is on its way.
      const next = started()
      const devices = Array.from({ length: 9 }, async (_v, i) => await device(i))
      await next
      devices.push(device(9))
      await turns(1)
      flow()
      await Promise.all(devices)
      // dev-9 and all nine go together. Counting only the nine ended the gather once eight had sent again, and dev-8
      // went with the next group: [9, 9, 10, 1].
      expect(commits.map((c) => c.records)).toEqual([9, 10, 10])
    })

    it('gathers again after a gather that ran out once (a device late for one message)', async () => {
      const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
      const target = db as unknown as { _batch: PrivateBatch }
      const write = target._batch.bind(db)
      let onStart: (() => void) | undefined
      target._batch = async (operations, options) => {
        onStart?.()
        return write(operations, options)
      }
      const commits: CommitStats[] = []
      store = await openLogStore({ db: db as unknown as LevelDatabase, observer: { onCommit: (c) => { commits.push(c) } } })
      await store.createStream('t/s', { partitions: 4 })
      // Ten devices, all sending their first message together; dev-9 sends three, the others four. Its third goes only
      // once a write started without it: the gather waiting for it ran out (the clock moved past its 0.5 ms).
      const device = async (i: number): Promise<void> => {
        for (let m = 0; m < (i === 9 ? 3 : 4); m++) {
          if (i === 9 && m === 2) {
            const writing = new Promise<void>((resolve) => { onStart = () => { onStart = undefined; resolve() } })
            await turns(2) // the others have sent again: the gather waits for dev-9
            vi.advanceTimersByTime(1)
            await writing
          }
          await store!.append('t/s', `dev-${i}`, { payload: payloadOf(i * 10 + m) })
          await turns(1)
        }
      }
      await Promise.all(Array.from({ length: 10 }, async (_v, i) => await device(i)))
      // The late message goes with the nine's next ones, and the ten stay together. Turning the gather off after the
      // one that ran out wrote the late message alone and split the devices into a group of one and one of nine.
      expect(commits.map((c) => c.records)).toEqual([10, 10, 9, 10])
    })
  })

  /**
   * A store on memory-level that has made a commit of 5 records; `lone()` appends one record and says whether a turn
   * of the event loop came before the write holding it started (a gather would wait turns).
   */
  async function afterCommitOfFive (): Promise<{ side: LevelDatabase, commits: CommitStats[], lone: () => Promise<{ turned: boolean }> }> {
    const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const target = db as unknown as { _batch: PrivateBatch }
    const write = target._batch.bind(db)
    // Told when a write holding more than the side sublevel's keys (a commit of records) starts. A write of side keys
    // alone takes a turn of the event loop, as a disk write would: the writer is busy meanwhile.
    let onRecords: (() => void) | undefined
    target._batch = async (operations, options) => {
      if (operations.some((op) => !String((op as { key: unknown }).key).startsWith('!side!'))) onRecords?.()
      else await new Promise((resolve) => setImmediate(resolve))
      return write(operations, options)
    }
    const commits: CommitStats[] = []
    const opened = await openLogStore({ db: db as unknown as LevelDatabase, observer: { onCommit: (c) => { commits.push(c) } } })
    store = opened
    await opened.createStream('t/s', { partitions: 4 })
    await Promise.all(Array.from({ length: 5 }, async (_v, i) => await opened.append('t/s', `dev-${i}`, { payload: payloadOf(i) })))
    expect(commits.at(-1)?.records).toBeGreaterThan(1)
    const side = db.sublevel<Buffer, Buffer>('side', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const lone = async (): Promise<{ turned: boolean }> => {
      let turned = false
      const started = new Promise<void>((resolve) => { onRecords = resolve })
      const appended = opened.append('t/s', 'dev-0', { payload: payloadOf(5) })
      setImmediate(() => { turned = true })
      await started
      const seen = turned
      await appended
      expect(commits.at(-1)?.records).toBe(1)
      return { turned: seen }
    }
    return { side, commits, lone }
  }

  it('writes a lone append at once once the writer was idle for longer than a gather waits, however many records its last commit held', async () => {
    const { lone } = await afterCommitOfFive()
    await new Promise((resolve) => setTimeout(resolve, 5)) // a precondition: more than a gather's 0.5 ms idle
    expect(await lone()).toEqual({ turned: false })
  })

  it('writes a lone append at once while only write()s (session cursors) kept the writer busy since its last commit of records', async () => {
    const { side, lone } = await afterCommitOfFive()
    // Cursor-like writes, one after another, until told to stop: the writer does not go idle.
    let stop = false
    let chained = 0
    const writing = (async (): Promise<void> => {
      while (!stop) await store!.write([{ type: 'put', sublevel: side, key: Buffer.from('cursor'), value: Buffer.from(String(chained++)) }], { durable: false })
    })()
    await new Promise((resolve) => setTimeout(resolve, 5)) // a precondition: more than 0.5 ms since the records' commit
    const result = lone()
    stop = true
    expect(await result).toEqual({ turned: false })
    await writing
    expect(chained).toBeGreaterThan(1)
  })

  it('writes the records that wait when the devices of the last commit do not come back', async () => {
    const { db, release, started, writes } = heldDatabase()
    store = await openLogStore({ db: db as unknown as LevelDatabase })
    await store.createStream('t/s', { partitions: 4 })
    let next = started()
    const first = store.append('t/s', 'dev-0', { payload: payloadOf(0) })
    await next
    const nine = Array.from({ length: 9 }, (_, i) => store!.append('t/s', `dev-${i + 1}`, { payload: payloadOf(i + 1) }))
    next = started()
    release()
    await first
    await next
    // dev-0 sends again while the nine are written; the nine are then acknowledged and send nothing more.
    const again = store.append('t/s', 'dev-0', { payload: payloadOf(10) })
    next = started()
    release()
    await Promise.all(nine)
    await next
    expect(writes()).toBe(3)
    release()
    expect((await again).offset).toBeGreaterThanOrEqual(0)
  })
})
