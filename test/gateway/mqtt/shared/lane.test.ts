/**
 * A share's lane (one partition): what it commits (`done`) as records are
 * sent, skipped and acknowledged out of order, and where the next owner
 * starts after the owner left holding records.
 */
import { describe, expect, it } from 'vitest'
import { Lane, type Member } from '../../../../gateway/mqtt/shared/lane.ts'

/** The member records are sent to: only its identity matters here. */
const A = { name: 'a' } as unknown as Member
const B = { name: 'b' } as unknown as Member

describe('Lane', () => {
  it('done is the oldest unacknowledged record, else next: skipped records and QoS 0 ones never hold it back', () => {
    const lane = new Lane('default/telemetry', 0, 10)
    expect(lane.done).toBe(10)
    const a = lane.sent(10, false, A)
    lane.sent(11, true, A) // QoS 0: acknowledged once written
    const c = lane.sent(13, false, A) // 12 was skipped (another topic)
    lane.next = 14
    expect(lane.unacked).toBe(2)
    expect(lane.done).toBe(10)
    lane.ack(c) // out of order
    expect(lane.done).toBe(10)
    lane.ack(a)
    expect(lane.done).toBe(14)
    expect(lane.unacked).toBe(0)
    lane.ack(a) // a repeated PUBACK changes nothing
    expect(lane.unacked).toBe(0)
  })

  it('release: the next owner starts at the oldest unacknowledged record; a read started before is told by the epoch', () => {
    const lane = new Lane('default/telemetry', 3, 0)
    const sent = Array.from({ length: 5 }, (_, i) => lane.sent(i, false, A))
    lane.next = 5
    lane.ack(sent[0]!)
    lane.ack(sent[1]!)
    lane.ack(sent[3]!)
    const epoch = lane.epoch
    lane.release()
    expect(lane.next).toBe(2)
    expect(lane.done).toBe(2)
    expect(lane.unacked).toBe(0)
    expect(lane.owner).toBeNull()
    expect(lane.epoch).not.toBe(epoch)
  })

  it('rewind (the member holding a detour left): its records go again from done, the owner stays, its late PUBACKs change nothing', () => {
    const lane = new Lane('default/telemetry', 1, 0)
    lane.owner = A
    lane.ack(lane.sent(0, false, A))
    const late = lane.sent(1, false, B)
    lane.next = 2
    expect(lane.holder).toBe(B)
    lane.rewind()
    expect(lane.next).toBe(1)
    expect(lane.owner).toBe(A)
    expect(lane.holder).toBeNull()
    const again = lane.sent(1, false, A)
    lane.next = 2
    lane.ack(late)
    expect(lane.unacked).toBe(1)
    expect(lane.done).toBe(1)
    lane.ack(again)
    expect(lane.done).toBe(2)
  })

  it('keeps a long window bounded while acknowledgements move its front', () => {
    const lane = new Lane('default/telemetry', 0, 0)
    for (let i = 0; i < 10_000; i++) {
      const s = lane.sent(i, false, A)
      lane.next = i + 1
      lane.ack(s)
      expect(lane.done).toBe(i + 1)
    }
    expect(lane.unacked).toBe(0)
  })
})
