import { describe, expect, it } from 'vitest'
import { BatchIndex } from '../../store/batch-index.ts'

describe('BatchIndex', () => {
  it('finds the batches holding a range of offsets', () => {
    const index = new BatchIndex()
    for (const base of [0, 10, 25, 26, 40]) index.push(base)
    const logEnd = 50
    expect(index.lookup(0, 5, logEnd)).toEqual([0])
    expect(index.lookup(12, 20, logEnd)).toEqual([10, 25, 26])
    expect(index.lookup(26, 1, logEnd)).toEqual([26])
    expect(index.lookup(45, 1000, logEnd)).toEqual([40])
    expect(index.lookup(50, 1, logEnd)).toBeNull() // at the log end: nothing to read
  })

  it('answers null below its oldest entry, so the reader seeks instead', () => {
    const index = new BatchIndex()
    index.push(100)
    expect(index.lookup(99, 10, 200)).toBeNull()
    expect(new BatchIndex().lookup(0, 10, 10)).toBeNull()
  })

  it('drops batches retention deleted', () => {
    const index = new BatchIndex()
    for (const base of [0, 10, 20, 30]) index.push(base)
    index.trim(20)
    expect(index.size).toBe(2)
    expect(index.lookup(15, 10, 40)).toBeNull()
    expect(index.lookup(20, 15, 40)).toEqual([20, 30])
  })

  it('stays within its capacity by forgetting the oldest half', () => {
    const index = new BatchIndex(8)
    for (let base = 0; base < 100; base += 10) index.push(base)
    expect(index.size).toBeLessThanOrEqual(8)
    expect(index.lookup(95, 1, 100)).toEqual([90])
    expect(index.lookup(0, 1, 100)).toBeNull()
  })
})
