import { describe, expect, it } from 'vitest'
import { CpuSlice, slicedPieces } from '../../../gateway/http/cpu-slice.ts'

describe('CpuSlice', () => {
  it('says the slice is used up only once its time has run out, reading the clock every 64 units', () => {
    let now = 0
    let reads = 0
    const slice = new CpuSlice(10, () => { reads++; return now })
    for (let i = 0; i < 200; i++) expect(slice.tick()).toBe(false)
    expect(reads).toBe(1 + 3) // the start, then every 64 units
    now = 10
    let ticks = 1
    while (!slice.tick()) ticks++
    expect(ticks).toBeLessThanOrEqual(64)
    // A large payload counts for its bytes: the clock is read at once.
    expect(slice.tick(64 * 256)).toBe(true)
  })

  it('resumes one waiting slice per turn of the event loop, the waiting ones in turn', async () => {
    const events: string[] = []
    let ticking = true
    const turn = (): void => {
      if (!ticking) return
      events.push('turn')
      setImmediate(turn)
    }
    setImmediate(turn)
    const work = async (name: string): Promise<void> => {
      const slice = new CpuSlice(0, () => 0)
      for (let i = 0; i < 3; i++) {
        await slice.yield()
        events.push(name)
      }
    }
    await Promise.all([work('a'), work('b')])
    ticking = false
    expect(events.filter((e) => e !== 'turn')).toEqual(['a', 'b', 'a', 'b', 'a', 'b'])
    // Never two slices in one turn: a turn of the loop (where I/O runs) between any two.
    for (let i = 1; i < events.length; i++) expect(events[i] === 'turn' || events[i - 1] === 'turn', events.join(' ')).toBe(true)
  })

  it('encodes items in pieces cut where the slice runs out, the last piece marked', async () => {
    let now = 0
    const slice = new CpuSlice(10, () => (now += 5)) // 5 ms pass between two clock reads: a slice is 128 items
    const items = Array.from({ length: 300 }, (_, i) => i)
    const pieces = await slicedPieces(slice, items, () => 0, (piece, last) => ({ piece: [...piece], last }))
    expect(pieces.map((p) => p.piece.length)).toEqual([128, 128, 44])
    expect(pieces.flatMap((p) => p.piece)).toEqual(items)
    expect(pieces.map((p) => p.last)).toEqual(pieces.map((_, i) => i === pieces.length - 1))
    expect(await slicedPieces(slice, [], () => 0, () => 1)).toEqual([])
  })
})
