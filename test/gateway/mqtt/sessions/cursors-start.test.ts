/**
 * Where a session's cursor into a partition started in this process (SessionCursors.startOf) and whether it was loaded
 * past a record (readBeforeStart): together they decide, per session, what a QoS 2 message delivered again after a
 * crash is for it (persistence.ts #enqueue): nothing when its cursor was past the record at the restart (it had the
 * record before the crash), a copy when its cursor was created above the record since (it will never read it), else
 * its cursor.
 */
import { describe, expect, it } from 'vitest'
import { SessionCursors, type SessionLog } from '../../../../gateway/mqtt/sessions/cursors.ts'

const log = {
  partitionInfo: () => ({ logStartOffset: 0, logEndOffset: 100 }),
} as unknown as SessionLog

describe('SessionCursors.startOf and readBeforeStart', () => {
  it('tell a cursor loaded past a record from one created above it in this process', async () => {
    const cursors = new SessionCursors({ log, write: async () => {}, grantedQos: () => 1, subscriptionsMatching: () => [], broker: () => undefined, window: 10 })
    const at = (offset: number, partition = 0): { stream: string, partition: number, offset: number } => ({ stream: 't/s', partition, offset })
    expect(cursors.startOf('a', 't/s', 0)).toBeUndefined()
    expect(cursors.readBeforeStart('a', at(5))).toBe(false)
    cursors.load('a', 't/s', 0, 12)
    cursors.load('b', 't/s', 1, 90)
    expect(cursors.startOf('a', 't/s', 0)).toBe(12)
    expect(cursors.readBeforeStart('a', at(11))).toBe(true) // below where it was loaded: it had it
    expect(cursors.readBeforeStart('a', at(12))).toBe(false) // it reads it from the log
    expect(cursors.readBeforeStart('a', at(11, 1))).toBe(false) // no cursor of its own in partition 1
    expect(cursors.readBeforeStart('b', at(11, 1))).toBe(true)
    // A session's first message of a partition creates its cursor there, at that message: above a record, never read it.
    await cursors.enqueue('e', at(70))
    expect(cursors.startOf('e', 't/s', 0)).toBe(70)
    expect(cursors.readBeforeStart('e', at(41))).toBe(false)
    // A later message of a partition that has the cursor already does not move its start.
    await cursors.enqueue('e', at(80))
    expect(cursors.startOf('e', 't/s', 0)).toBe(70)
  })
})
