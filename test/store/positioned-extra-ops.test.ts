/**
 * An append's extraOps may hold a put whose value is made from the record's
 * position (PositionedPut): the offset is assigned by the group commit, so
 * the value is made there, and lands in the record's batch.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { openLogStore, type LevelDatabase, type LogStore, type PositionedPut, type RecordPosition } from '../../store/index.ts'
import { backends, FakeClock, payloadOf, type Backend } from './harness.ts'

for (const makeBackend of backends) {
  describe(`positioned extraOps on ${makeBackend().name}`, () => {
    let backend: Backend | undefined
    const open: LogStore[] = []
    afterEach(async () => {
      for (const s of open.splice(0)) await s.close().catch(() => {})
      await backend?.destroy()
    })

    it('writes each value made from its own record\'s stream, partition and offset, in that record\'s commit', async () => {
      backend = makeBackend()
      const db = await backend.database()
      const side = db.sublevel<Buffer, Buffer>('side', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
      const positioned = (name: string): PositionedPut => ({
        type: 'put', sublevel: side, key: Buffer.from(name), value: (at: RecordPosition) => Buffer.from(`${at.stream}/${at.partition}/${at.offset}`),
      })
      let store = await openLogStore({ db, clock: new FakeClock() })
      open.push(store)
      await store.createStream('t/s', { partitions: 4 })
      // Records before, so offsets do not start at 0; then one commit over several partitions, one key with two records.
      for (let i = 0; i < 3; i++) await store.append('t/s', 'k0', { payload: payloadOf(i) })
      const keys = ['k0', 'k1', 'k0', 'k2', 'k3', 'k1']
      const results = await Promise.all(keys.map((key, i) =>
        store.append('t/s', key, { payload: payloadOf(10 + i) }, { extraOps: [positioned(`r${i}`), { type: 'put', sublevel: side, key: Buffer.from(`plain${i}`), value: Buffer.from('p') }] })))
      await store.close()
      await db.close()
      await db.open()
      store = await openLogStore({ db, clock: new FakeClock() })
      open.push(store)
      await side.open() // a sublevel stays closed after its database reopens
      const stored = new Map((await side.iterator<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' }).all()).map(([k, v]) => [k.toString(), v.toString()]))
      keys.forEach((_key, i) => {
        const r = results[i] as { partition: number, offset: number }
        expect(stored.get(`r${i}`), `record ${i}`).toBe(`t/s/${r.partition}/${r.offset}`)
        expect(stored.get(`plain${i}`)).toBe('p')
      })
      // Two records of one key: consecutive offsets, each value its own.
      expect((results[2] as { offset: number }).offset).toBe((results[0] as { offset: number }).offset + 1)
    })
  })
}
