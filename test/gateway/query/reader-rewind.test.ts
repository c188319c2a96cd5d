/**
 * A reader positioned past a standby's rewound log end (query/log-rewinds.ts):
 * the old primary's log ran to 180, the new primary's, which a snapshot puts
 * on the standby, ends at 160 and goes on with records of its own. A live
 * reader at 170 or at the old end must read the new history from 160, also
 * when the first appends after the snapshot carry the log past its position
 * before it steps again, and the tracker says it moved (the gateway logs
 * both offsets and counts it). The snapshot is
 * played as the standby applies one (test/store/follower-copy.ts), the
 * refresh after it run through the tracker as the gateway does.
 */
import { MemoryLevel } from 'memory-level'
import { afterEach, describe, expect, it } from 'vitest'
import { Registry } from 'prom-client'
import { createMetrics, splitStream } from '../../../gateway/metrics/metrics.ts'
import { followRewinds, reportRewinds, type LogRewind, type ReaderMovedBack, type RewindObserver } from '../../../gateway/query/log-rewinds.ts'
import { PartitionReader, readRange, resolveRange, type ReadChunk } from '../../../gateway/query/read-plan.ts'
import { openLogStore, type LevelDatabase, type LogStore } from '../../../store/index.ts'
import { entriesOf, primaryLog, replaceCopy, RAW, STREAM, type Raw } from '../../store/follower-copy.ts'

const OLD = Array.from({ length: 180 }, (_, i) => `old-${i}`)
/** The new primary had the first 150 records when it took over; its own follow. */
const NEW = [...OLD.slice(0, 150), ...Array.from({ length: 50 }, (_, i) => `new-${150 + i}`)]

const texts = (chunks: readonly ReadChunk[]): string[] => chunks.flatMap((c) => c.records.map((r) => Buffer.from(r.payload).toString()))

describe('a reader past a standby\'s rewound log end', () => {
  const opened: LogStore[] = []
  afterEach(async () => { for (const s of opened.splice(0)) await s.close() })

  async function standby (report?: (store: LogStore) => RewindObserver): Promise<{
    copy: Raw, store: LogStore, rewinds: LogRewind[], moved: ReaderMovedBack[], refresh: () => Promise<void>
  }> {
    const copy = new MemoryLevel<Buffer, Buffer>(RAW)
    await replaceCopy(copy, await entriesOf(await primaryLog(OLD)))
    const store = await openLogStore({ db: copy as unknown as LevelDatabase, follower: true })
    opened.push(store)
    const rewinds: LogRewind[] = []
    const moved: ReaderMovedBack[] = []
    const tracker = followRewinds(store, report?.(store) ?? { rewound: (r) => rewinds.push(r), readerMovedBack: (m) => moved.push(m) })
    return { copy, store, rewinds, moved, refresh: () => tracker.refresh() }
  }

  /** The new primary's log up to `end`, as the standby has it after applying and refreshing. */
  async function newLogTo (s: { copy: Raw, refresh: () => Promise<void> }, end: number): Promise<void> {
    await replaceCopy(s.copy, await entriesOf(await primaryLog(NEW.slice(0, end))))
    await s.refresh()
  }

  /** Steps until the reader waits at the log end or its range is done. */
  async function drain (reader: PartitionReader): Promise<ReadChunk[]> {
    const steps: ReadChunk[] = []
    for (let i = 0; i < 20 && steps.at(-1)?.stop !== 'log' && steps.at(-1)?.stop !== 'range'; i++) steps.push(await reader.step())
    return steps
  }

  it.each([
    ['in the old tail (170), having read 160 to 169 of it', 160, OLD.slice(160, 170), null, 170],
    ['at the old log end (180), where every caught-up reader waits', 180, [], 'log', 180],
  ])('at %s: moves back to the new end, even when appends carried the log past it before the next step', async (_, start, first, stop, position) => {
    const s = await standby()
    const reader = new PartitionReader(s.store, await resolveRange(s.store, STREAM, 0, readRange({ kind: 'offset', offset: start }, undefined),
      { outside: 'fail', snapshot: false }), { chunkRecords: 10 })
    const step = await reader.step()
    expect({ texts: texts([step]), stop: step.stop, next: reader.next }).toEqual({ texts: first, stop, next: position })
    // The snapshot: the new primary's log ends at 160. Then its next records arrive, to 195, before the reader steps again.
    await newLogTo(s, 160)
    expect(s.rewinds).toEqual([{ stream: STREAM, partition: 0, formerEnd: 180, end: 160 }])
    await newLogTo(s, 195)
    expect(texts(await drain(reader))).toEqual(NEW.slice(160, 195))
    expect(s.moved).toEqual([{ stream: STREAM, partition: 0, from: position, to: 160 }])
    expect(reader.next).toBe(195)
  })

  it('a reader that reports its position without stepping (a long poll that timed out) reports the new end', async () => {
    const s = await standby()
    const reader = new PartitionReader(s.store, await resolveRange(s.store, STREAM, 0, readRange({ kind: 'latest' }, undefined),
      { outside: 'fail', snapshot: false }))
    await newLogTo(s, 160)
    await newLogTo(s, 185)
    expect(reader.checkRewound()).toBe(true)
    expect(reader.next).toBe(160)
    expect(reader.checkRewound()).toBe(false)
  })

  it('a reader planned after the rewind is not moved by it', async () => {
    const s = await standby()
    await newLogTo(s, 160)
    await newLogTo(s, 175)
    const reader = new PartitionReader(s.store, await resolveRange(s.store, STREAM, 0, readRange({ kind: 'offset', offset: 170 }, undefined),
      { outside: 'fail', snapshot: false }))
    await newLogTo(s, 180)
    expect(texts(await drain(reader))).toEqual(NEW.slice(170, 180))
    expect(s.moved).toEqual([])
  })

  it('a snapshot range (a $replay\'s history) rewound below its end ends at the new end instead of waiting for it', async () => {
    const s = await standby()
    const reader = new PartitionReader(s.store, await resolveRange(s.store, STREAM, 0, readRange({ kind: 'offset', offset: 150 }, undefined),
      { outside: 'fail', snapshot: true }), { chunkRecords: 20 })
    expect(texts([await reader.step()])).toEqual(OLD.slice(150, 170))
    await newLogTo(s, 160)
    const end = await reader.step()
    expect({ stop: end.stop, next: reader.next, end: reader.end }).toEqual({ stop: 'range', next: 160, end: 160 })
    // Lifted for the live part, it reads the new history from there.
    reader.openEnd()
    await newLogTo(s, 170)
    expect(texts(await drain(reader))).toEqual(NEW.slice(160, 170))
  })

  it('without a tracker, a log end seen below the position moves the reader back to it', async () => {
    const copy = new MemoryLevel<Buffer, Buffer>(RAW)
    await replaceCopy(copy, await entriesOf(await primaryLog(OLD)))
    const store = await openLogStore({ db: copy as unknown as LevelDatabase, follower: true })
    opened.push(store)
    const reader = new PartitionReader(store, await resolveRange(store, STREAM, 0, readRange({ kind: 'latest' }, undefined),
      { outside: 'fail', snapshot: false }), { rewinds: null })
    await replaceCopy(copy, await entriesOf(await primaryLog(NEW.slice(0, 160))))
    await store.refresh()
    expect((await reader.step()).stop).toBe('log')
    expect(reader.next).toBe(160)
    await replaceCopy(copy, await entriesOf(await primaryLog(NEW.slice(0, 165))))
    await store.refresh()
    expect(texts(await drain(reader))).toEqual(NEW.slice(160, 165))
  })

  it('the gateway logs each rewound partition and each reader moved back, with both offsets, and counts the readers', async () => {
    const lines: Array<Record<string, unknown>> = []
    const registry = new Registry()
    const s = await standby((store) => {
      const metrics = createMetrics(registry, { store, diskFreeBytes: () => undefined, diskSizeBytes: () => undefined, healthy: () => true, version: 't', gatewayId: 't' })
      return reportRewinds({ warn: (fields) => lines.push(fields) }, (stream) => metrics.readerRewinds.inc(splitStream(stream)))
    })
    const reader = new PartitionReader(s.store, await resolveRange(s.store, STREAM, 0, readRange({ kind: 'latest' }, undefined),
      { outside: 'fail', snapshot: false }))
    await newLogTo(s, 160)
    await newLogTo(s, 170)
    expect(texts(await drain(reader))).toEqual(NEW.slice(160, 170))
    expect(lines).toEqual([
      { code: 'GW_WARN_LOG_REWOUND', stream: STREAM, partition: 0, formerEnd: 180, end: 160 },
      { code: 'GW_WARN_READER_REWOUND', stream: STREAM, partition: 0, from: 180, to: 160 },
    ])
    const counted = (await registry.getSingleMetric('edgemq_reader_rewinds_total')?.get())?.values
    expect(counted?.map((v) => ({ labels: v.labels, value: v.value }))).toEqual([{ labels: { tenant: 't', stream: 's' }, value: 1 }])
  })
})
