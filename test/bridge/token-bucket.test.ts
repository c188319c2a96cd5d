/**
 * The upstream's rate limit, on a fake clock: what a user sees as
 * `maxMessagesPerSecond` / `maxBytesPerSecond` (a burst of up to one second's
 * worth, then the configured rate, and how long the uplink waits).
 */
import { describe, expect, it } from 'vitest'
import { TokenBucket } from '../../bridge/token-bucket.ts'

describe('token bucket', () => {
  it('has no limit when both rates are 0', () => {
    expect(new TokenBucket(0, 0).limited).toBe(false)
    expect(new TokenBucket(10, 0).limited).toBe(true)
    expect(new TokenBucket(0, 1000).limited).toBe(true)
  })

  it('lets one second of messages through at once, then one per 1/rate', () => {
    const bucket = new TokenBucket(5, 0)
    let now = 1_000_000
    const burst: number[] = []
    for (let i = 0; i < 5; i++) burst.push(bucket.take(100, now))
    expect(burst).toEqual([0, 0, 0, 0, 0])
    expect(bucket.take(100, now)).toBe(200) // the sixth waits for a fifth of a second
    now += 100
    expect(bucket.take(100, now)).toBe(100) // half-way there: nothing is taken by a refused take
    now += 100
    expect(bucket.take(100, now)).toBe(0)
    expect(bucket.take(100, now)).toBe(200)
  })

  it('does not bank more than one second of tokens over an idle spell', () => {
    const bucket = new TokenBucket(2, 0)
    let now = 0
    expect(bucket.take(1, now)).toBe(0)
    now += 60_000
    expect([bucket.take(1, now), bucket.take(1, now)]).toEqual([0, 0])
    expect(bucket.take(1, now)).toBe(500)
  })

  it('limits payload bytes per second, and lets a message larger than a second\'s worth through once the bucket holds it', () => {
    const bucket = new TokenBucket(0, 1000)
    let now = 5_000
    expect(bucket.take(600, now)).toBe(0)
    expect(bucket.take(600, now)).toBe(200) // 400 bytes left: 200 more take 200 ms
    now += 200
    expect(bucket.take(600, now)).toBe(0)
    expect(bucket.take(2500, now)).toBe(2500) // empty bucket, filled up to the message's size
    now += 2500
    expect(bucket.take(2500, now)).toBe(0)
  })

  it('waits for whichever limit is shorter of tokens', () => {
    const bucket = new TokenBucket(100, 1000)
    const now = 0
    expect(bucket.take(1000, now)).toBe(0)
    expect(bucket.take(10, now)).toBe(10) // messages are plentiful, bytes are not
  })
})
