/**
 * The lanes and their scheduler, without a broker: which lane sends next
 * (priority, then round robin, so a backlog cannot starve a higher-priority
 * stream or a sibling partition), and how far a lane's offset may move (never
 * past a record the upstream has not acknowledged).
 */
import { describe, expect, it } from 'vitest'
import { advance, createLane, LaneScheduler, rewind, skip, track, type Lane } from '../../bridge/lanes.ts'
import { parseTemplate, RECORD_VARIABLES } from '../../bridge/topic-template.ts'
import type { StoredRecord } from '../../store/index.ts'

const template = parseTemplate('{topic}', RECORD_VARIABLES)

function lane (name: string, priority: number, partition = 0, start = 0): Lane {
  return createLane({ tenant: 'default', name, partition, priority, filter: '#', template, receipts: false }, start, -1, 1000)
}

function record (offset: number): StoredRecord {
  return { offset, timestamp: 1000 + offset, key: 'd', topic: 't', payload: new Uint8Array(1), qos: 1, clientId: 'c', headers: null }
}

/** Gives `l` records [from, to) to send. */
function buffer (l: Lane, from: number, to: number): void {
  l.buffer = Array.from({ length: to - from }, (_, i) => record(from + i))
  l.bufferAt = 0
}

/** Takes `n` turns, consuming one buffered record per turn; returns the lanes' names. */
function turns (scheduler: LaneScheduler, n: number): string[] {
  const out: string[] = []
  for (let i = 0; i < n; i++) {
    const next = scheduler.next()
    if (next === null) break
    next.bufferAt++
    out.push(`${next.name}/${next.partition}`)
  }
  return out
}

describe('lane scheduler', () => {
  it('round-robins among lanes of equal priority', () => {
    const s = new LaneScheduler()
    const lanes = [lane('telemetry', 0, 0), lane('telemetry', 0, 1), lane('telemetry', 0, 2)]
    for (const l of lanes) { s.add(l); buffer(l, 0, 2) }
    expect(turns(s, 10)).toEqual(['telemetry/0', 'telemetry/1', 'telemetry/2', 'telemetry/0', 'telemetry/1', 'telemetry/2'])
  })

  it('serves a higher-priority lane first whenever it has a record, whatever the backlog of the others', () => {
    const s = new LaneScheduler()
    const backlog = lane('telemetry', 0)
    const alarms = lane('alarms', 9)
    s.add(backlog)
    s.add(alarms)
    buffer(backlog, 0, 1000)
    buffer(alarms, 0, 2)
    expect(turns(s, 3)).toEqual(['alarms/0', 'alarms/0', 'telemetry/0'])
    buffer(alarms, 2, 3) // a live record arrives mid-backlog
    expect(turns(s, 2)).toEqual(['alarms/0', 'telemetry/0'])
  })

  it('holds lower-priority lanes while a higher-priority one reads records from the log, not lanes of its priority or above', () => {
    const s = new LaneScheduler()
    const backlog = lane('telemetry', 0)
    const sibling = lane('events', 5, 1)
    const events = lane('events', 5, 0)
    for (const l of [backlog, sibling, events]) s.add(l)
    buffer(backlog, 0, 1000)
    events.reading = true // a live event appended: in the log, on its way into memory
    expect(s.next()).toBeNull()
    buffer(sibling, 0, 1)
    expect(turns(s, 2)).toEqual(['events/1'])
    buffer(events, 0, 1) // the read is in
    events.reading = false
    expect(turns(s, 3)).toEqual(['events/0', 'telemetry/0', 'telemetry/0']) // idle, it holds nothing back
  })

  it('has nothing to send when no lane has a buffered record', () => {
    const s = new LaneScheduler()
    s.add(lane('telemetry', 0))
    expect(s.next()).toBeNull()
  })
})

describe('lane offsets', () => {
  it('move only over a contiguous run of acknowledged or skipped records', () => {
    const l = lane('telemetry', 0, 0, 10)
    const a = track(l, record(10))
    const b = track(l, record(11))
    skip(l, record(12)) // filtered out while 10 and 11 are in flight: settled in its place
    const c = track(l, record(13))
    b.acked = true
    advance(l)
    expect(l.done).toBe(10) // 11 acked out of order: 10 still holds the lane
    a.acked = true
    advance(l)
    expect(l.done).toBe(13)
    expect(l.lastAcked?.offset).toBe(11)
    c.acked = true
    advance(l)
    expect(l.done).toBe(14)
    skip(l, record(14)) // nothing pending: done at once
    expect(l.done).toBe(15)
  })

  it('resume from the acknowledged offset after a rewind, dropping reads and sends in progress', () => {
    const l = lane('telemetry', 0, 0, 5)
    buffer(l, 5, 10)
    l.nextRead = 10
    l.bufferAt = 3
    track(l, record(5)).acked = true
    track(l, record(6))
    advance(l)
    const epoch = l.epoch
    rewind(l)
    expect({ nextRead: l.nextRead, done: l.done, buffered: l.buffer.length, pending: l.pending.length }).toEqual({ nextRead: 6, done: 6, buffered: 0, pending: 0 })
    expect(l.epoch).toBe(epoch + 1)
  })
})
