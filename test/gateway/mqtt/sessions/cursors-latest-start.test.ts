/**
 * SessionCursors.latestStart: the highest offset at which a session's cursor into a partition started in this process,
 * which decides whether a QoS 2 message delivered again after a crash may be left to the cursors (inbound-qos2.ts).
 */
import { describe, expect, it } from 'vitest'
import { SessionCursors, type SessionLog } from '../../../../gateway/mqtt/sessions/cursors.ts'

const log = {
  partitionInfo: () => ({ logStartOffset: 0, logEndOffset: 100 }),
} as unknown as SessionLog

describe('SessionCursors.latestStart', () => {
  it('is the highest start of the partition\'s cursors over every session: loaded values and offsets created at', async () => {
    const cursors = new SessionCursors({ log, write: async () => {}, grantedQos: () => 1, subscriptionsMatching: () => [], broker: () => undefined, window: 10 })
    expect(cursors.latestStart('t/s', 0)).toBeUndefined()
    cursors.load('a', 't/s', 0, 12)
    cursors.load('b', 't/s', 0, 40)
    cursors.load('c', 't/s', 1, 90)
    cursors.load('d', 't/other', 0, 95)
    expect(cursors.latestStart('t/s', 0)).toBe(40)
    expect(cursors.latestStart('t/s', 1)).toBe(90)
    expect(cursors.latestStart('t/s', 2)).toBeUndefined()
    // A session's first message of a partition creates its cursor there, at that message.
    await cursors.enqueue('e', { stream: 't/s', partition: 0, offset: 70 })
    await cursors.enqueue('f', { stream: 't/s', partition: 2, offset: 5 })
    expect(cursors.latestStart('t/s', 0)).toBe(70)
    expect(cursors.latestStart('t/s', 2)).toBe(5)
    // A later message of a partition that has the cursor already does not move its start.
    await cursors.enqueue('f', { stream: 't/s', partition: 2, offset: 9 })
    expect(cursors.latestStart('t/s', 2)).toBe(5)
  })
})
