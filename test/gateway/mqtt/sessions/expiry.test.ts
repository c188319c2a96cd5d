/**
 * The deadlines of gateways before the one session-expiry mechanism (their
 * `session-expiry` sublevel) become the sessions' intervals at the first
 * start, and the sublevel is emptied: a deadline counts back from the
 * session's offline mark, a connected client's interval is taken as it is,
 * an entry without a session is dropped; what ran out is ended at once.
 */
import { EventEmitter } from 'node:events'
import type { Aedes } from 'aedes'
import { MemoryLevel } from 'memory-level'
import { describe, expect, it } from 'vitest'
import type { ExtraOperation, LevelDatabase } from '../../../../store/index.ts'
import { SessionExpiry } from '../../../../gateway/mqtt/sessions/expiry.ts'
import { LevelSessionPersistence } from '../../../../gateway/mqtt/sessions/persistence.ts'

function legacyEntry (kind: number, n: number): Buffer {
  const value = Buffer.alloc(9)
  value[0] = kind
  value.writeBigUInt64BE(BigInt(n), 1)
  return value
}

describe('session expiry: deadlines of the former session-expiry key space', () => {
  it('moves them into the sessions once, ends what ran out, and empties the old key space', async () => {
    const root = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const sessions = root.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const legacy = root.sublevel<Buffer, Buffer>('session-expiry', { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const t = 1_000_000
    let now = t
    const persistence = new LevelSessionPersistence(sessions, { now: () => now })
    const broker = Object.assign(new EventEmitter(), { id: 'gw', clients: {}, scheduleSessionExpiry: () => {} })
    await persistence.setup(broker as never)
    for (const id of ['a', 'b']) {
      await persistence.markSession({ id })
      const client = { id } // aedes' events carry one Client object per connection
      broker.emit('client', client)
      broker.emit('clientDisconnect', client)
    }
    await legacy.put(Buffer.from('a'), legacyEntry(0, t + 30_000)) // a deadline 30 s after 'a' went offline
    await legacy.put(Buffer.from('b'), legacyEntry(1, 5)) // the 5 s interval of a client connected then
    await legacy.put(Buffer.from('ghost'), legacyEntry(0, t)) // no session any more
    now = t + 10_000
    const ended: string[] = []
    const expiry = new SessionExpiry({
      persistence, broker: broker as unknown as Aedes, now: () => now, onExpired: (e) => { ended.push(`${e.clientId} ${e.source} ${e.seconds}`) },
      logger: { info: () => {}, warn: () => {} },
      legacy: { db: legacy as unknown as LevelDatabase, writer: { write: async (ops: readonly ExtraOperation[]) => { await root.batch(ops as never) } } },
    })
    await expiry.start()
    expect(ended).toEqual(['b interval 5'])
    expect(persistence.sessionEnd('a')).toEqual({ at: t + 30_000, source: 'interval', seconds: 30 })
    expect(await legacy.keys().all()).toEqual([])
    expiry.stop()
  })
})
