/**
 * A live reader on a standby whose copy a snapshot rewound (the new
 * primary's log ends before the old one did): the store's read ends at the
 * new log end before the standby's store is refreshed, and the reader waits
 * there for appends, as at any log end, instead of ending its range.
 */
import { MemoryLevel } from 'memory-level'
import { afterEach, describe, expect, it } from 'vitest'
import { toApiError } from '../../../gateway/http/errors.ts'
import { PartitionReader, readRange, resolveRange, type ReadChunk } from '../../../gateway/query/read-plan.ts'
import { openLogStore, StoreError, type LevelDatabase, type LogStore } from '../../../store/index.ts'
import { entriesOf, primaryLog, replaceCopy, RAW, STREAM } from '../../store/follower-copy.ts'

describe('a live reader of a standby\'s log rewound by a snapshot', () => {
  const opened: LogStore[] = []
  afterEach(async () => { for (const s of opened.splice(0)) await s.close() })

  it('stops at the new log end for appends, and reads the new primary\'s records from there', async () => {
    const old = Array.from({ length: 180 }, (_, i) => `old-${i}`)
    const next = [...old.slice(0, 150), ...Array.from({ length: 15 }, (_, i) => `new-${150 + i}`)]
    const copy = new MemoryLevel<Buffer, Buffer>(RAW)
    await replaceCopy(copy, await entriesOf(await primaryLog(old)))
    const follower = await openLogStore({ db: copy as unknown as LevelDatabase, follower: true })
    opened.push(follower)
    const reader = new PartitionReader(follower, await resolveRange(follower, STREAM, 0, readRange({ kind: 'offset', offset: 150 }, undefined), { outside: 'fail', snapshot: false }))
    // The snapshot is in (the new primary's log ends at 160), the store not yet refreshed: it still says 180.
    await replaceCopy(copy, await entriesOf(await primaryLog(next.slice(0, 160))))
    const steps: ReadChunk[] = []
    for (let i = 0; i < 10 && steps.at(-1)?.stop !== 'log' && steps.at(-1)?.stop !== 'range'; i++) steps.push(await reader.step())
    expect(steps.flatMap((s) => s.records.map((r) => Buffer.from(r.payload).toString()))).toEqual(next.slice(150, 160))
    expect(steps.at(-1)?.stop).toBe('log')
    // The new primary appends; the standby applies and refreshes: the reader goes on from 160.
    await replaceCopy(copy, await entriesOf(await primaryLog(next)))
    await follower.refresh()
    const more = await reader.step()
    expect(more.records.map((r) => Buffer.from(r.payload).toString())).toEqual(next.slice(160))
  })

  it('answers a read of a copy being replaced over HTTP with 503 HTTP_UNAVAILABLE (retryable), not 500', () => {
    const api = toApiError(new StoreError('STORE_LOG_REPLACED', 'replaced', { details: { stream: 't/s', partition: 0 } }))
    expect({ code: api.code, status: api.status }).toEqual({ code: 'HTTP_UNAVAILABLE', status: 503 })
  })
})
