import { describe, expect, it } from 'vitest'
import { fnv1a, partitionForKey } from '../../store/partitioner.ts'

describe('partitioner', () => {
  it('matches the published FNV-1a 32-bit test vectors', () => {
    expect(fnv1a('')).toBe(0x811c9dc5)
    expect(fnv1a('a')).toBe(0xe40c292c)
    expect(fnv1a('foobar')).toBe(0xbf9cf968)
  })

  it('hashes the UTF-8 bytes of non-ASCII keys', () => {
    // "é" is C3 A9 in UTF-8: FNV-1a over those two bytes.
    const expected = Math.imul(Math.imul(0x811c9dc5 ^ 0xc3, 0x01000193) ^ 0xa9, 0x01000193) >>> 0
    expect(fnv1a('é')).toBe(expected)
  })

  it('pins where device keys land, so records never move partitions across versions', () => {
    expect(['dev-1', 'dev-2', 'device-42', 'sensor/7', 'ü-1'].map((k) => partitionForKey(k, 8))).toEqual([6, 3, 0, 1, 4])
    expect(partitionForKey('device-42', 1)).toBe(0)
    const spread = new Set(Array.from({ length: 1000 }, (_, i) => partitionForKey(`dev-${i}`, 8)))
    expect(spread.size).toBe(8)
  })
})
