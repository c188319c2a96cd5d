/**
 * LogStore.onAppend: the wake-up long-poll readers wait on. Run against
 * every backend, like the conformance suite.
 */
import { afterEach, describe, expect, it } from 'vitest'
import type { AppendEvent, LogStore } from '../../store/index.ts'
import { backends, FakeClock, payloadOf, type Backend } from './harness.ts'

for (const makeBackend of backends) {
  describe(`LogStore.onAppend on ${makeBackend().name}`, () => {
    let backend: Backend
    let store: LogStore | undefined

    afterEach(async () => {
      await store?.close().catch(() => {})
      store = undefined
      await backend?.destroy()
    })

    async function open (logger?: { warn: () => void, error: (fields: Record<string, unknown>, msg: string) => void }): Promise<LogStore> {
      backend = makeBackend()
      store = await backend.open({ clock: new FakeClock(), ...(logger === undefined ? {} : { logger }) })
      await store.createStream('acme/telemetry', { partitions: 4 })
      return store
    }

    it('reports each partition of a group commit once, with its new log end, when the records are readable', async () => {
      const s = await open()
      const events: AppendEvent[] = []
      const readable: Array<Promise<number>> = []
      const stop = s.onAppend((e) => {
        // Started inside the listener: the records must already be there.
        readable.push(s.read(e.stream, e.partition, 0).then((r) => r.records.length))
      })
      s.onAppend((e) => { events.push(e) })
      const keys = ['a', 'b', 'c', 'd', 'e', 'f']
      // One tick: a single group commit holding every partition these keys map to.
      const results = await Promise.all(keys.flatMap((k) => [0, 1].map((i) => s.append('acme/telemetry', k, { payload: payloadOf(i) }))))
      const ends = new Map<number, number>()
      for (const r of results) ends.set(r.partition, Math.max(ends.get(r.partition) ?? 0, r.offset + 1))
      expect(events.map((e) => e.partition).sort()).toEqual([...ends.keys()].sort())
      for (const e of events) expect(e).toEqual({ stream: 'acme/telemetry', partition: e.partition, logEndOffset: ends.get(e.partition) })
      expect(await Promise.all(readable)).toEqual(events.map((e) => e.logEndOffset))
      stop()

      // A later lone append: one event for its partition only.
      events.length = 0
      const next = await s.append('acme/telemetry', 'a', { payload: payloadOf(9) })
      expect(events).toEqual([{ stream: 'acme/telemetry', partition: next.partition, logEndOffset: next.offset + 1 }])
    })

    it('stops calling a removed listener; a listener that throws is logged and harms nothing', async () => {
      const logged: string[] = []
      const s = await open({ warn: () => {}, error: (_fields, msg) => { logged.push(msg) } })
      const seen: number[] = []
      const stop = s.onAppend((e) => { seen.push(e.logEndOffset) })
      s.onAppend(() => { throw new Error('listener bug') })
      const after: number[] = []
      s.onAppend((e) => { after.push(e.logEndOffset) })

      const first = await s.append('acme/telemetry', 'k', { payload: payloadOf(1) })
      stop()
      const second = await s.append('acme/telemetry', 'k', { payload: payloadOf(2) })
      expect(seen).toEqual([first.offset + 1])
      expect(after).toEqual([first.offset + 1, second.offset + 1])
      expect(logged).toEqual(['append listener threw', 'append listener threw'])
      expect((await s.read('acme/telemetry', first.partition, 0)).records).toHaveLength(2)
      expect(() => s.onAppend(null as unknown as () => void)).toThrow(expect.objectContaining({ code: 'STORE_INVALID_ARGUMENT' }))
    })
  })
}
