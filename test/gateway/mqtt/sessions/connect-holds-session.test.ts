/**
 * A CONNECT that resumes a session holds it from the moment the persistence records it (markSession, before the
 * CONNACK), with the Session Expiry Interval it asked for: an earlier connection of the same client id that closes
 * after that — taken over, or gone by itself while the CONNECT is still under way — neither marks the session offline
 * nor writes back its own interval. Otherwise a kill -9 before the new connection's `client` event was written found
 * the earlier interval on disk (3600 where the client had asked for 0), and the session came back after the restart.
 */
import { EventEmitter } from 'node:events'
import { MemoryLevel } from 'memory-level'
import { describe, expect, it } from 'vitest'
import type { LevelDatabase } from '../../../../store/index.ts'
import { LevelSessionPersistence, type SessionClient } from '../../../../gateway/mqtt/sessions/persistence.ts'

/** An aedes Client as the persistence sees it: protocol version, interval, `closed`, and a connection that closes. */
interface FakeClient extends SessionClient {
  closed: boolean
  readonly conn: EventEmitter
}

function connection (id: string, sessionExpiryInterval: number): FakeClient {
  return { id, version: 5, sessionExpiryInterval, closed: false, conn: new EventEmitter() }
}

/** aedes' close of a registered client: `closed`, `clientDisconnect`, then the socket's `close`. */
function close (broker: EventEmitter, client: FakeClient): void {
  client.closed = true
  broker.emit('clientDisconnect', client)
  client.conn.emit('close')
}

/** A sessions database of its own (memory-level), as a gateway's data directory holds one. */
function freshSessions (): LevelDatabase {
  const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
  return db.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
}

/** The persistence a gateway starting on `sessions` sets up (a restart, when they were written before), on `clock`. */
async function startedOn (sessions: LevelDatabase, clock: { readonly now: number }): Promise<{ persistence: LevelSessionPersistence, broker: EventEmitter }> {
  const persistence = new LevelSessionPersistence(sessions, { now: () => clock.now })
  const broker = Object.assign(new EventEmitter(), { id: 'gw', counter: 0 })
  await persistence.setup(broker)
  return { persistence, broker }
}

describe('a resuming CONNECT holds the session against the close of an earlier connection', () => {
  it("an earlier connection that closes after the resuming CONNECT was recorded (taken over, or gone by itself) writes nothing of its own: a restart finds the interval the CONNECT asked for", async () => {
    const clock = { now: 1_000_000 }
    const sessions = freshSessions()
    const { persistence, broker } = await startedOn(sessions, clock)

    const old = connection('dev', 3600)
    await persistence.markSession(old)
    broker.emit('client', old)

    const resuming = connection('dev', 0)
    await persistence.markSession(resuming) // aedes' fetchSubs: its CONNACK may go once this resolved
    // A takeover closes the old connection after that CONNACK, before aedes emits `client` for the new one; a
    // connection that goes by itself may close any time during the new CONNECT.
    close(broker, old)
    expect({ offlineSince: persistence.offlineSince('dev'), end: persistence.sessionEnd('dev') }).toEqual({ offlineSince: undefined, end: null })

    // What a kill -9 now leaves: everything written so far (one more write, in call order, settles after them).
    await persistence.markSession({ id: 'flush' })
    clock.now += 1000
    const { persistence: restarted } = await startedOn(sessions, clock)
    expect(restarted.sessionEnd('dev')).toEqual({ at: clock.now, source: 'interval', seconds: 0 })
    expect((await restarted.expireSessions()).map((end) => end.clientId)).toContain('dev')
  })

  it('so does a Clean Start 1 CONNECT with an interval that takes over a connection which asked for 0', async () => {
    const clock = { now: 1_000_000 }
    const sessions = freshSessions()
    const { persistence, broker } = await startedOn(sessions, clock)

    const old = connection('dev', 0)
    await persistence.markSession(old)
    broker.emit('client', old)
    const fresh = connection('dev', 3600)
    await persistence.cleanSubscriptions(fresh) // aedes' fetchSubs of a Clean Start 1 CONNECT: its CONNACK waits for it
    close(broker, old) // the takeover, before `client` for the new one
    await persistence.markSession({ id: 'flush' })
    clock.now += 1000
    const { persistence: restarted } = await startedOn(sessions, clock)
    // Offline from this start on, with its 3600. The old connection's close wrote its 0 and an offline mark over it.
    expect(restarted.sessionEnd('dev')).toEqual({ at: clock.now + 3_600_000, source: 'interval', seconds: 3600 })
  })

  it('the earlier connection still takes the session offline when the resuming CONNECT closed before it', async () => {
    const clock = { now: 1_000_000 }
    const sessions = freshSessions()
    const { persistence, broker } = await startedOn(sessions, clock)
    const offline: string[] = []
    persistence.onOffline((id) => offline.push(id))

    const old = connection('dev', 3600)
    await persistence.markSession(old)
    broker.emit('client', old)
    const resuming = connection('dev', 60)
    await persistence.markSession(resuming)
    resuming.closed = true
    resuming.conn.emit('close') // cut during its CONNECT: the earlier connection holds the session alone again
    expect(persistence.offlineSince('dev')).toBeUndefined()
    close(broker, old)
    // (told twice: by `clientDisconnect` and by the socket's close)
    expect({ offline: [...new Set(offline)], end: persistence.sessionEnd('dev') }).toEqual({ offline: ['dev'], end: { at: clock.now + 3_600_000, source: 'interval', seconds: 3600 } })
  })
})
