/**
 * Where a session's cursor into a partition started in this process (SessionCursors.startOf: its value when loaded,
 * or the offset it was created at), which decides per session what a QoS 2 message delivered again after a crash,
 * or a record whose delivery came after a later record's, is for it (persistence.ts #enqueue): a cursor that started
 * above the record never reads it, and the session gets a copy; forwardLive lets that copy's live delivery through.
 */
import { describe, expect, it } from 'vitest'
import { SessionCursors, type SessionLog } from '../../../../gateway/mqtt/sessions/cursors.ts'

const log = {
  partitionInfo: () => ({ logStartOffset: 0, logEndOffset: 100 }),
} as unknown as SessionLog

describe('SessionCursors.startOf', () => {
  it('is where the cursor was loaded, or the offset of the message that created it, and stays there', async () => {
    const cursors = new SessionCursors({ log, write: async () => {}, grantedQos: () => 1, subscriptionsMatching: () => [], broker: () => undefined, window: 10 })
    const at = (offset: number, partition = 0): { stream: string, partition: number, offset: number } => ({ stream: 't/s', partition, offset })
    expect(cursors.startOf('a', 't/s', 0)).toBeUndefined()
    cursors.load('a', 't/s', 0, 12)
    cursors.load('b', 't/s', 1, 90)
    expect(cursors.startOf('a', 't/s', 0)).toBe(12)
    expect(cursors.startOf('a', 't/s', 1)).toBeUndefined()
    expect(cursors.startOf('b', 't/s', 1)).toBe(90)
    // A session's first message of a partition creates its cursor there, at that message.
    await cursors.enqueue('e', at(70))
    expect(cursors.startOf('e', 't/s', 0)).toBe(70)
    // A later message of a partition that has the cursor already does not move its start.
    await cursors.enqueue('e', at(80))
    expect(cursors.startOf('e', 't/s', 0)).toBe(70)
  })
})
