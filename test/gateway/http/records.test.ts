/**
 * AppendWaiters: the long-poll wake-up over LogStore.onAppend, on a
 * memory-level store. Every way a wait ends removes it.
 */
import { MemoryLevel } from 'memory-level'
import { afterEach, describe, expect, it } from 'vitest'
import { AppendWaiters } from '../../../gateway/http/records.ts'
import { openLogStore, type LevelDatabase, type LogStore } from '../../../store/index.ts'

describe('AppendWaiters', () => {
  let store: LogStore
  let waiters: AppendWaiters | undefined

  afterEach(async () => {
    waiters?.close()
    await store?.close()
  })

  /** Every size the waiters reported (what the edgemq_http_waiting_reads gauge is set to). */
  let reported: number[] = []

  async function setup (): Promise<AppendWaiters> {
    store = await openLogStore({ db: new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase })
    await store.createStream('acme/telemetry', { partitions: 2 })
    reported = []
    waiters = new AppendWaiters(store, (n) => reported.push(n))
    return waiters
  }

  it('wakes the waiters of the partition that received records, and only those', async () => {
    const w = await setup()
    const p = store.partitionFor('acme/telemetry', 'k')
    const signal = new AbortController().signal
    const otherController = new AbortController()
    const woken: string[] = []
    // Both wait 10 s: only an append wakes "mine" before the test's own timeout; "other" ends when aborted.
    const mine = w.wait('acme/telemetry', p, 10_000, signal).then(() => woken.push('mine'))
    const other = w.wait('acme/telemetry', 1 - p, 10_000, otherController.signal).then(() => woken.push('other'))
    expect(w.size).toBe(2)
    await store.append('acme/telemetry', 'k', { payload: Buffer.from('x') })
    await mine
    expect(woken).toEqual(['mine'])
    expect(w.size).toBe(1)
    otherController.abort()
    await other
    expect(woken).toEqual(['mine', 'other'])
    expect(w.size).toBe(0)
    expect(reported).toEqual([1, 2, 1, 0]) // each wait reported as it starts and as it ends
  })

  it('ends on timeout, on abort and on close, leaving nothing behind', async () => {
    const w = await setup()
    const controller = new AbortController()
    const started = performance.now()
    await w.wait('acme/telemetry', 0, 100, controller.signal)
    expect(performance.now() - started).toBeGreaterThanOrEqual(90)
    const aborted = w.wait('acme/telemetry', 0, 10_000, controller.signal)
    const closed = w.wait('acme/telemetry', 1, 10_000, new AbortController().signal)
    expect(w.size).toBe(2)
    controller.abort()
    await aborted
    expect(w.size).toBe(1)
    w.close()
    await closed
    expect(w.size).toBe(0)
    expect(reported.at(-1)).toBe(0)
    // After close, and with an aborted signal, a wait returns at once.
    await w.wait('acme/telemetry', 0, 10_000, new AbortController().signal)
    const another = new AppendWaiters(store)
    await another.wait('acme/telemetry', 0, 10_000, controller.signal)
    another.close()
  })
})
