/**
 * The connection a clean CONNECT takes over is no longer the session's holder: the session is the one that CONNECT
 * started, with the Session Expiry Interval it asked for. An MQTT 5 takeover sends the old connection a DISCONNECT and
 * closes it once its socket drains, so the new connection may be gone before it: a device whose new connection drops
 * right after its CONNACK, while the gateway still holds the half-open old one. The new connection's close then found
 * the old one still open, took it for the newest claimant and wrote its interval into the session (#heldBy), and the
 * old one's own close wrote it again with an offline mark (#wentOffline): the session the device started with 3600 s
 * ended after the old connection's 0 or 5 s (3.1.1: never), in memory and after a restart, and with 0 the gateway's
 * expiry dropped it with what the new connection had subscribed.
 *
 * Real aedes on the project's session persistence, the takeover of the old connection held (its DISCONNECT, as a
 * socket that does not drain holds it), as clean-connect-old-connection.test.ts does; then the persistence alone, on a
 * fake clock, with what else the old connection may still do (connect-holds-session.test.ts's fake clients).
 */
import { EventEmitter, once } from 'node:events'
import type { Client } from 'aedes'
import { MemoryLevel } from 'memory-level'
import { generate } from 'mqtt-packet'
import { afterEach, describe, expect, it } from 'vitest'
import type { LevelDatabase } from '../../../../store/index.ts'
import { LevelSessionPersistence, type SessionClient } from '../../../../gateway/mqtt/sessions/persistence.ts'
import { connectPacket, RawConnection } from '../../../helpers/raw-mqtt.ts'
import { closeSessionBrokers, holdTakeover, markSessionOnRead, startSessionBroker, turnsUntil } from './aedes-session-broker.ts'

afterEach(closeSessionBrokers)

function v5Connect (clean: boolean, sessionExpiryInterval: number): Buffer {
  return generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: 'dev-1', clean, keepalive: 30,
    properties: { sessionExpiryInterval } }, { protocolVersion: 5 })
}

/** The socket of an aedes Client, whose `close` the persistence listens to (its listener, added first, runs first). */
function closeOf (client: Client): Promise<unknown> {
  return once((client as unknown as { conn: NodeJS.EventEmitter }).conn, 'close')
}

/** What the persistence says of `dev-1`'s session. */
function sessionOf (persistence: LevelSessionPersistence): { connected: boolean | undefined, offlineSince: number | undefined, seconds: number | undefined } {
  return {
    connected: persistence.sessionStates().find((s) => s.clientId === 'dev-1')?.connected,
    offlineSince: persistence.offlineSince('dev-1'),
    seconds: persistence.sessionEnd('dev-1')?.seconds,
  }
}

/** `dev-1`'s stored subscriptions (not subscriptionsByClient: markSessionOnRead records the session there, as a CONNECT). */
function subscriptionsOf (persistence: LevelSessionPersistence): string[] {
  return persistence.sessionStates().find((s) => s.clientId === 'dev-1')?.subscriptions.map((s) => `${s.topic} ${s.qos}`) ?? []
}

const OLD_CONNECTIONS = [
  { name: 'MQTT 5, Session Expiry 0', connect: v5Connect(false, 0) },
  { name: 'MQTT 5, Session Expiry 5', connect: v5Connect(false, 5) },
  { name: 'MQTT 3.1.1, clean session 0', connect: connectPacket({ clientId: 'dev-1', clean: false }) },
]

describe('a connection a clean CONNECT took over, still open after the new connection dropped', () => {
  for (const { name, connect } of OLD_CONNECTIONS) {
    it(`leaves the new session its Session Expiry Interval (3600) and its offline time (old connection: ${name})`, async () => {
      const h = await startSessionBroker(markSessionOnRead)
      const old = await RawConnection.open(h.url)
      h.raw.push(old)
      old.send(connect)
      expect(await old.next('connack')).toBeDefined()
      const holder = h.broker.clients['dev-1'] as Client
      const release = holdTakeover(h, holder)

      const fresh = await RawConnection.open(h.url)
      h.raw.push(fresh)
      fresh.send(v5Connect(true, 3600))
      expect(await fresh.next('connack'), 'the CONNACK waits for the clean step, not for the takeover').toBeDefined()
      const freshClient = [...h.broker._connecting.get('dev-1') ?? []].find((c) => c !== holder) as Client
      expect(freshClient).toBeDefined()

      fresh.send(generate({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'cmd/dev-1', qos: 1 }] }, { protocolVersion: 5 }))
      expect(await fresh.next('suback')).toBeDefined()

      // The device's new connection drops while the gateway still holds the old one.
      const freshClosed = closeOf(freshClient)
      fresh.destroy()
      await freshClosed
      const oldStillOpen = !holder.closed
      const whenFreshClosed = sessionOf(h.persistence)
      const holderClosed = closeOf(holder)
      release()
      await holderClosed
      await turnsUntil(() => h.broker._registering.size === 0)
      const whenOldClosed = sessionOf(h.persistence)
      const expired = (await h.persistence.expireSessions()).map((end) => end.clientId)
      const subscriptions = subscriptionsOf(h.persistence)

      // What a kill -9 now leaves: everything written so far (one more write, in call order, settles after them).
      await h.persistence.markSession({ id: 'flush' })
      const restarted = new LevelSessionPersistence(h.sessions)
      await restarted.setup({ id: 'restarted' })

      // The session the clean CONNECT started is offline from the new connection's close, with its 3600 s; the old
      // connection's close changes nothing of it, and neither expiry nor a restart ends it.
      const session = { connected: false, offlineSince: whenFreshClosed.offlineSince ?? 'the new connection\'s close', seconds: 3600 }
      expect({
        oldStillOpen, whenFreshClosed, whenOldClosed, expired, subscriptions,
        afterKill: { ...sessionOf(restarted), expired: await restarted.expireSessions(), subscriptions: subscriptionsOf(restarted) },
      }).toEqual({
        oldStillOpen: true, whenFreshClosed: session, whenOldClosed: session, expired: [], subscriptions: ['cmd/dev-1 1'],
        afterKill: { ...session, expired: [], subscriptions: ['cmd/dev-1 1'] },
      })
    })
  }
})

/** An aedes Client as the persistence sees it: protocol version, interval, `closed`, and a connection that closes. */
interface FakeClient extends SessionClient {
  closed: boolean
  readonly conn: EventEmitter
}

function connection (sessionExpiryInterval: number): FakeClient {
  return { id: 'dev', version: 5, sessionExpiryInterval, closed: false, conn: new EventEmitter() }
}

/** aedes' close of a client: `closed`, `clientDisconnect` (a registered one), then the socket's `close`. */
function close (broker: EventEmitter, client: FakeClient): void {
  client.closed = true
  broker.emit('clientDisconnect', client)
  client.conn.emit('close')
}

async function startedOn (sessions: LevelDatabase, clock: { readonly now: number }): Promise<{ persistence: LevelSessionPersistence, broker: EventEmitter }> {
  const persistence = new LevelSessionPersistence(sessions, { now: () => clock.now })
  const broker = Object.assign(new EventEmitter(), { id: 'gw', counter: 0 })
  await persistence.setup(broker)
  return { persistence, broker }
}

describe('the persistence: a connection a clean CONNECT took over is no claimant of the session it started', () => {
  it('neither a late registration, a session read nor the close of the old connection makes it the holder again', async () => {
    const clock = { now: 1_000_000 }
    const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const sessions = db.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const { persistence, broker } = await startedOn(sessions, clock)
    const offline: string[] = []
    persistence.onOffline((id) => offline.push(id))

    const old = connection(0)
    await persistence.markSession(old)
    broker.emit('client', old)
    const fresh = connection(3600)
    await persistence.cleanSubscriptions(fresh) // at its turn to register: its CONNACK waits for it
    clock.now += 1000
    fresh.closed = true
    fresh.conn.emit('close') // closed before its registration (the takeover of `old` is still under way)
    const freshClosedAt = clock.now
    const whenFreshClosed = { offline: [...offline], end: persistence.sessionEnd('dev') }

    clock.now += 1000
    broker.emit('client', old) // what a claimant's registration does: it is not one any more
    await persistence.markSession(old) // nor a claimant's session read
    clock.now += 1000
    close(broker, old)
    await persistence.markSession({ id: 'flush' })
    clock.now += 1000
    const { persistence: restarted } = await startedOn(sessions, clock)

    const end = { at: freshClosedAt + 3_600_000, source: 'interval', seconds: 3600 }
    expect({ whenFreshClosed, offline, now: persistence.sessionEnd('dev'), afterKill: restarted.sessionEnd('dev') })
      .toEqual({ whenFreshClosed: { offline: ['dev'], end }, offline: ['dev'], now: end, afterKill: end })
  })
})
