import { afterEach, describe, expect, it, vi } from 'vitest'
import { BurstCompaction, compactHeap, type CompactionResult } from '../../../gateway/mqtt/burst-compaction.ts'

function setup (minConnections = 3, quietMs = 1000): { bursts: BurstCompaction, compact: ReturnType<typeof vi.fn>, logs: unknown[][], warnings: unknown[][] } {
  const compact = vi.fn((): CompactionResult => ({ ms: 12, rssBefore: 300 * 1048576, rssAfter: 200 * 1048576 }))
  const logs: unknown[][] = []
  const warnings: unknown[][] = []
  const bursts = new BurstCompaction({
    minConnections, quietMs, compact, logger: { info: (...args: unknown[]) => { logs.push(args) }, warn: (...args: unknown[]) => { warnings.push(args) } } as never,
  })
  return { bursts, compact, logs, warnings }
}

describe('BurstCompaction', () => {
  afterEach(() => { vi.useRealTimers() })

  it('compacts once, quietMs after the last connection of a burst of at least minConnections, and logs what it gave back', () => {
    vi.useFakeTimers()
    const { bursts, compact, logs } = setup()
    for (let i = 0; i < 5; i++) {
      bursts.connected()
      vi.advanceTimersByTime(900) // each connection comes before the quiet period is over
    }
    expect(compact).not.toHaveBeenCalled()
    vi.advanceTimersByTime(100)
    expect(compact).toHaveBeenCalledTimes(1)
    expect(logs[0]?.[0]).toMatchObject({ connections: 5, ms: 12, rssBeforeBytes: 300 * 1048576, rssAfterBytes: 200 * 1048576 })
    expect(bursts.accepted).toBe(0)
    vi.advanceTimersByTime(60_000)
    expect(compact).toHaveBeenCalledTimes(1)
  })

  it('does not compact for fewer connections than minConnections, and counts them towards the next burst', () => {
    vi.useFakeTimers()
    const { bursts, compact } = setup()
    bursts.connected()
    bursts.connected()
    vi.advanceTimersByTime(60_000)
    expect(compact).not.toHaveBeenCalled()
    expect(bursts.accepted).toBe(2)
    bursts.connected()
    vi.advanceTimersByTime(1000)
    expect(compact).toHaveBeenCalledTimes(1)
  })

  it('does nothing after close(), also for a burst that was waiting for its quiet period', () => {
    vi.useFakeTimers()
    const { bursts, compact } = setup()
    for (let i = 0; i < 3; i++) bursts.connected()
    bursts.close()
    bursts.connected()
    vi.advanceTimersByTime(60_000)
    expect(compact).not.toHaveBeenCalled()
  })

  it('compacts at once when asked (the gateway does at the end of its start), leaving the count of a burst alone', () => {
    const { bursts, compact, logs } = setup()
    bursts.connected()
    bursts.compactNow('at start')
    expect(compact).toHaveBeenCalledTimes(1)
    expect(String(logs[0]?.[1])).toContain('heap compacted at start')
    expect(bursts.accepted).toBe(1)
  })

  it('logs a failed compaction as a warning and keeps counting', () => {
    vi.useFakeTimers()
    const { bursts, compact, warnings } = setup(1)
    compact.mockImplementationOnce(() => { throw new Error('no gc') })
    bursts.connected()
    vi.advanceTimersByTime(1000)
    expect(warnings[0]?.[0]).toEqual({ err: 'no gc' })
    bursts.connected()
    vi.advanceTimersByTime(1000)
    expect(compact).toHaveBeenCalledTimes(2)
  })
})

describe('compactHeap', () => {
  it('runs a full collection that frees unreachable objects, without exposing gc() to the application', () => {
    let garbage: Array<{ n: number, s: string }> | null = Array.from({ length: 200_000 }, (_v, n) => ({ n, s: `garbage ${n}` }))
    const withGarbage = process.memoryUsage().heapUsed
    expect(garbage.length).toBe(200_000)
    garbage = null
    const result = compactHeap()
    expect(process.memoryUsage().heapUsed).toBeLessThan(withGarbage)
    expect(result.ms).toBeGreaterThanOrEqual(0)
    expect(result.rssBefore).toBeGreaterThan(0)
    expect(result.rssAfter).toBeGreaterThan(0)
    expect((globalThis as { gc?: unknown }).gc).toBeUndefined()
    // A second call reuses the collector.
    expect(() => compactHeap()).not.toThrow()
  })
})
