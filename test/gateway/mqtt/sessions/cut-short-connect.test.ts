/**
 * A CONNECT cut short (its connection closed after the persistence recorded the session, markSession, and before aedes
 * registered it: the aedes patch then skips its registration) while another connection of the client id holds the
 * session leaves the session with that connection's Session Expiry Interval, on disk, as soon as it closes. It had
 * written its own interval before its CONNACK, and only the live connection's own close wrote that one back: a kill -9
 * in between restarted the session with the interval of a CONNECT that never had it (expiring too early, or never).
 *
 * A CONNECT that registered took the session over: its interval stays. With no other connection open, the cut-short
 * CONNECT's interval stays as well (the client's latest word on its session; aedes ends the session by it too).
 * The same through a real gateway and a kill -9: cut-short-connect-expiry.int.test.ts.
 */
import { EventEmitter } from 'node:events'
import { MemoryLevel } from 'memory-level'
import { describe, expect, it } from 'vitest'
import type { LevelDatabase } from '../../../../store/index.ts'
import { LevelSessionPersistence, type SessionClient, type SessionEnd } from '../../../../gateway/mqtt/sessions/persistence.ts'

/** An aedes Client as the persistence sees it: protocol version, interval, `closed`, and a connection that closes. */
interface FakeClient extends SessionClient {
  closed: boolean
  readonly conn: EventEmitter
}

function connection (id: string, version: 4 | 5, sessionExpiryInterval: number): FakeClient {
  return { id, version, sessionExpiryInterval, closed: false, conn: new EventEmitter() }
}

/** aedes' close of a registered client: `closed`, `clientDisconnect`, then the socket's `close`. */
function close (broker: EventEmitter, client: FakeClient): void {
  client.closed = true
  broker.emit('clientDisconnect', client)
  client.conn.emit('close')
}

/** The close of a connection aedes never registered: no `clientDisconnect`, only the socket's `close`. */
function cutShort (client: FakeClient): void {
  client.closed = true
  client.conn.emit('close')
}

function freshSessions (): LevelDatabase {
  const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
  return db.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
}

const clock = { now: 1_000_000 }

async function startedOn (sessions: LevelDatabase): Promise<{ persistence: LevelSessionPersistence, broker: EventEmitter }> {
  const persistence = new LevelSessionPersistence(sessions, { now: () => clock.now, maxOfflineSeconds: 86_400 })
  const broker = Object.assign(new EventEmitter(), { id: 'gw', counter: 0 })
  await persistence.setup(broker)
  return { persistence, broker }
}

/** A live connection of `dev`: its CONNECT recorded the session, then aedes registered it. */
async function live (persistence: LevelSessionPersistence, broker: EventEmitter, version: 4 | 5, interval: number): Promise<FakeClient> {
  const client = connection('dev', version, interval)
  await persistence.markSession(client)
  broker.emit('client', client)
  return client
}

/** What a kill -9 now leaves of `dev`: its end once the restarted gateway counts it offline (from the restart). */
async function endAfterKill (persistence: LevelSessionPersistence, sessions: LevelDatabase): Promise<SessionEnd | null> {
  await persistence.markSession({ id: 'flush' }) // one more write, in call order: every earlier one has settled
  const { persistence: restarted } = await startedOn(sessions)
  return restarted.sessionEnd('dev')
}

const interval = (seconds: number): SessionEnd => ({ at: clock.now + seconds * 1000, source: 'interval', seconds })
const cap: SessionEnd = { at: clock.now + 86_400_000, source: 'cap', seconds: 86_400 }

describe('a CONNECT cut short before its registration', () => {
  it('leaves the live MQTT 5 connection\'s interval on disk, not its own shorter one', async () => {
    const sessions = freshSessions()
    const { persistence, broker } = await startedOn(sessions)
    await live(persistence, broker, 5, 3600)
    const short = connection('dev', 5, 2)
    await persistence.markSession(short) // aedes' fetchSubs: written before the CONNACK it never gets
    cutShort(short)
    expect(await endAfterKill(persistence, sessions)).toEqual(interval(3600))
  })

  it('leaves it also when the cut-short CONNECT asked for 0 (the session would be dropped at the restart)', async () => {
    const sessions = freshSessions()
    const { persistence, broker } = await startedOn(sessions)
    await live(persistence, broker, 5, 3600)
    const ending = connection('dev', 5, 0)
    await persistence.markSession(ending)
    cutShort(ending)
    expect(await endAfterKill(persistence, sessions)).toEqual(interval(3600))
  })

  it('leaves a live 3.1.1 persistent session without an interval (mqtt.sessionExpirySeconds only), and the reverse', async () => {
    const sessions = freshSessions()
    const { persistence, broker } = await startedOn(sessions)
    const v311 = await live(persistence, broker, 4, 0)
    const short = connection('dev', 5, 2)
    await persistence.markSession(short)
    cutShort(short)
    expect(await endAfterKill(persistence, sessions)).toEqual(cap)

    close(broker, v311)
    await live(persistence, broker, 5, 3600)
    const other = connection('dev', 4, 0)
    await persistence.markSession(other)
    cutShort(other)
    expect(await endAfterKill(persistence, sessions)).toEqual(interval(3600))
  })

  it('a CONNECT that registered took the session over: its interval stays', async () => {
    const sessions = freshSessions()
    const { persistence, broker } = await startedOn(sessions)
    const old = await live(persistence, broker, 5, 3600)
    const next = connection('dev', 5, 2)
    await persistence.markSession(next)
    close(broker, old) // the takeover closes the old connection before aedes emits `client` for the new one
    broker.emit('client', next)
    expect(await endAfterKill(persistence, sessions)).toEqual(interval(2))
  })

  it('leaves a CONNECT still under way that recorded the session later its interval (on disk before its CONNACK), then the live one\'s', async () => {
    const sessions = freshSessions()
    const { persistence, broker } = await startedOn(sessions)
    await live(persistence, broker, 5, 3600)
    const first = connection('dev', 5, 2)
    await persistence.markSession(first)
    const second = connection('dev', 5, 60)
    await persistence.markSession(second)
    cutShort(first)
    expect(await endAfterKill(persistence, sessions)).toEqual(interval(60))
    cutShort(second)
    expect(await endAfterKill(persistence, sessions)).toEqual(interval(3600))
  })

  it('with no other connection open, goes offline with its own interval (the client\'s latest word on its session)', async () => {
    const sessions = freshSessions()
    const { persistence, broker } = await startedOn(sessions)
    close(broker, await live(persistence, broker, 5, 3600))
    const short = connection('dev', 5, 2)
    await persistence.markSession(short)
    cutShort(short)
    expect(persistence.sessionEnd('dev')).toEqual(interval(2))
    expect(await endAfterKill(persistence, sessions)).toEqual(interval(2))
  })
})
