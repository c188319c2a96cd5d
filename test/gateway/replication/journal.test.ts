/**
 * The primary's write journal: the in-memory backlog of database writes a
 * standby catches up from, and the pins that keep what a standby still needs
 * (the writes since its snapshot's point, then since its ack) beyond the
 * backlog, up to maxPinnedBytes. Driven through the `write` event as
 * abstract-level emits it.
 */
import { EventEmitter } from 'node:events'
import { describe, expect, it } from 'vitest'
import { WriteJournal, type WriteEmitter } from '../../../gateway/replication/journal.ts'

const META = Buffer.from('!replication!')
const KIB = 1024

/** A journal of at most `maxBytes` (and `maxPinnedBytes` for pins), and a function that writes one entry of `bytes` (key and value). */
function journalOf (maxBytes: number, maxPinnedBytes?: number): { journal: WriteJournal, write: (bytes: number) => void } {
  const db = new EventEmitter()
  const journal = new WriteJournal(db as unknown as WriteEmitter, {
    ignorePrefix: META, maxBytes, ...(maxPinnedBytes === undefined ? {} : { maxPinnedBytes }), now: () => 0,
  })
  let n = 0
  const write = (bytes: number): void => {
    const key = Buffer.from(`k${String(n++).padStart(7, '0')}`)
    db.emit('write', [{ type: 'put', encodedKey: key, encodedValue: Buffer.alloc(bytes - key.length) }])
  }
  return { journal, write }
}

describe('the write journal', () => {
  it('keeps the newest maxBytes of writes: an older position is gone (a standby there needs a snapshot)', () => {
    const { journal, write } = journalOf(64 * KIB)
    for (let i = 0; i < 100; i++) write(KIB)
    expect(journal.lastSeq).toBe(100)
    expect(journal.keptBytes).toBe(64 * KIB)
    expect(journal.since(36)?.map((e) => e.seq)).toEqual(Array.from({ length: 64 }, (_, i) => 37 + i))
    expect(journal.since(35)).toBeNull()
    expect(journal.pin(35, () => {})).toBeNull()
    expect(journal.totalBytesAt(36)).toBe(36 * KIB)
    expect(journal.totalBytesAt(100)).toBe(100 * KIB)
    expect(journal.totalBytesAt(35)).toBeUndefined()
  })

  it('keeps every write after a pin beyond maxBytes, until the pin moves on or is released', () => {
    const { journal, write } = journalOf(64 * KIB, 1024 * KIB)
    for (let i = 0; i < 10; i++) write(KIB)
    let lost = 0
    const pin = journal.pin(10, () => { lost++ })
    expect(pin).not.toBeNull()
    // Ten backlogs written after the pin's position: all still there.
    for (let i = 0; i < 640; i++) write(KIB)
    expect(journal.since(10)?.length).toBe(640)
    expect(journal.keptBytes).toBeGreaterThanOrEqual(640 * KIB)
    // Moved on (the standby acknowledged up to 600): what is before it goes back to the backlog's bound.
    pin?.moveTo(600)
    write(KIB)
    expect(journal.since(600)?.length).toBe(51)
    expect(journal.keptBytes).toBe(64 * KIB)
    pin?.moveTo(500)
    expect(pin?.seq).toBe(600)
    pin?.release()
    for (let i = 0; i < 64; i++) write(KIB)
    expect(journal.since(600)).toBeNull()
    expect(journal.keptBytes).toBe(64 * KIB)
    expect(lost).toBe(0)
  })

  it('drops a pin that would keep over maxPinnedBytes, once, and trims back to maxBytes', () => {
    const { journal, write } = journalOf(64 * KIB, 256 * KIB)
    write(KIB)
    const kept: number[] = []
    const pin = journal.pin(1, (bytes) => { kept.push(bytes) })
    for (let i = 0; i < 256; i++) write(KIB)
    expect(kept).toEqual([])
    expect(journal.since(1)?.length).toBe(256)
    write(KIB)
    expect(kept).toEqual([257 * KIB])
    expect(pin?.lost).toBe(true)
    expect(journal.since(1)).toBeNull()
    expect(journal.keptBytes).toBe(64 * KIB)
    for (let i = 0; i < 300; i++) write(KIB)
    expect(kept).toHaveLength(1)
  })

  it('never keeps less for a pin than the backlog: maxPinnedBytes below maxBytes counts as maxBytes', () => {
    const { journal, write } = journalOf(64 * KIB, 16 * KIB)
    let lost = false
    journal.pin(0, () => { lost = true })
    for (let i = 0; i < 64; i++) write(KIB)
    expect(lost).toBe(false)
    write(KIB)
    expect(lost).toBe(true)
  })

  it('keeps the newest write however large, pinned or not', () => {
    const { journal, write } = journalOf(64 * KIB, 128 * KIB)
    let lost = false
    journal.pin(0, () => { lost = true })
    write(512 * KIB)
    // Over both bounds, and kept: it is the newest (the pin loses nothing yet).
    expect(journal.since(0)?.map((e) => e.seq)).toEqual([1])
    expect(lost).toBe(false)
    write(512 * KIB)
    expect(lost).toBe(true)
    expect(journal.since(1)?.map((e) => e.seq)).toEqual([2])
    expect(journal.keptBytes).toBe(512 * KIB)
  })
})
