/**
 * SessionCursors.ceiling: the highest committed offset of the sessions' cursors into a partition, which decides
 * whether a QoS 2 message delivered again after a crash may be left to the cursors (inbound-qos2.ts).
 */
import { describe, expect, it } from 'vitest'
import { SessionCursors, type SessionLog } from '../../../../gateway/mqtt/sessions/cursors.ts'

const log = {
  partitionInfo: () => ({ logStartOffset: 0, logEndOffset: 100 }),
} as unknown as SessionLog

describe('SessionCursors.ceiling', () => {
  it('is the highest cursor of the partition over every session, and undefined where no session has one', () => {
    const cursors = new SessionCursors({ log, write: async () => {}, grantedQos: () => 1, broker: () => undefined, window: 10 })
    expect(cursors.ceiling('t/s', 0)).toBeUndefined()
    cursors.load('a', 't/s', 0, 12)
    cursors.load('b', 't/s', 0, 40)
    cursors.load('c', 't/s', 1, 90)
    cursors.load('d', 't/other', 0, 95)
    expect(cursors.ceiling('t/s', 0)).toBe(40)
    expect(cursors.ceiling('t/s', 1)).toBe(90)
    expect(cursors.ceiling('t/s', 2)).toBeUndefined()
    expect(cursors.floor('t/s', 0)).toBe(12)
  })
})
