/**
 * When a will stored by a previous process is due (wills.ts, willDueAt): its
 * MQTT 5 Will Delay Interval after its session went offline, or the
 * session's end, whichever comes first (3.1.3.2.2); at once without a delay,
 * with a delay that is not a positive number, or without a session.
 */
import { describe, expect, it } from 'vitest'
import { willDelayOf, willDueAt } from '../../../gateway/mqtt/wills.ts'

const will = (willDelayInterval?: unknown): Record<string, unknown> => ({ topic: 't', properties: willDelayInterval === undefined ? undefined : { willDelayInterval } })

describe('will delay at startup', () => {
  const now = 1_000_000
  it('counts the delay from when the session went offline, capped by the session\'s end', () => {
    expect(willDueAt(will(10), now - 4000, null, now)).toBe(now + 6000)
    expect(willDueAt(will(10), now - 20_000, null, now)).toBe(now - 10_000) // overdue: the caller fires it at once
    expect(willDueAt(will(0xffffffff), now, now + 2000, now)).toBe(now + 2000)
    expect(willDueAt(will(1), now, now + 2000, now)).toBe(now + 1000)
  })

  it('fires at once a 3.1.1 will, a will without a session, and a delay that is not a positive number', () => {
    expect(willDueAt({ topic: 't' }, now - 1000, null, now)).toBe(now)
    expect(willDueAt(will(10), undefined, null, now)).toBe(now)
    for (const bad of [0, -5, Number.NaN, Infinity, '10', null]) expect(willDelayOf(will(bad))).toBe(0)
    expect(willDueAt(will(-5), now - 1000, null, now)).toBe(now)
  })
})
