/**
 * A clean CONNECT (3.1.1 clean session = 1, MQTT 5 Clean Start = 1) that takes a session over discards it at its turn
 * to register (aedes patch, aedes.js _writeAtTurn), before the takeover closes the connection that held it, and its
 * CONNACK waits only for that write: an MQTT 5 connection taken over is sent a DISCONNECT first, and aedes waits for
 * it to drain (up to 60 s) before closing it. Meanwhile the old connection's packets are still handled, and what they
 * wrote landed in the new session, which the persistence knows by client id only:
 * - a QoS 2 PUBLISH stored its packet id (awaiting a PUBREL that never comes), so the new connection's PUBLISH with
 *   that id was taken for a retransmission and dropped, PUBREC and all;
 * - a SUBSCRIBE stored its subscription: the clean session held it, and after a kill -9 it was restored;
 * - its PUBREL deleted, and its close (3.1.1 clean session) wiped, the new connection's inbound QoS 2 packets, so a
 *   retransmission of the new connection's PUBLISH was delivered twice;
 * - a message matched to the old subscriptions before the clean step was queued after it, into the new session.
 * The session persistence now marks the connections open at the clean step as discarded: their session-state writes
 * are refused (QoS 2 store, SUBSCRIBE: aedes closes the connection, nothing acknowledged) or change nothing.
 *
 * Real aedes on the project's session persistence; the takeover of the old connection is held (its DISCONNECT, as a
 * socket that does not drain holds it). The same through a gateway process and a kill -9:
 * clean-connect-old-connection.int.test.ts.
 */
import type { Client } from 'aedes'
import { MemoryLevel } from 'memory-level'
import { generate } from 'mqtt-packet'
import { afterEach, describe, expect, it } from 'vitest'
import type { LevelDatabase } from '../../../../store/index.ts'
import { LevelSessionPersistence, type SessionClient } from '../../../../gateway/mqtt/sessions/persistence.ts'
import { connectPacket, packet, publishPacket, RawConnection, subscribePacket, u16 } from '../../../helpers/raw-mqtt.ts'
import { closeSessionBrokers, holdTakeover, markSessionOnRead, startSessionBroker, turnsUntil, type SessionBroker } from './aedes-session-broker.ts'

afterEach(closeSessionBrokers)

const DEV: SessionClient = { id: 'dev-1' }

/** What a kill -9 now leaves of `dev-1`: a persistence started on the same database after every write so far. */
async function afterKill (h: SessionBroker): Promise<{ subscriptions: string[], incoming: number[] }> {
  await h.persistence.markSession({ id: 'flush' }) // one more write, in call order: every earlier one has settled
  const restarted = new LevelSessionPersistence(h.sessions)
  await restarted.setup({ id: 'restarted' })
  return {
    subscriptions: (await restarted.subscriptionsByClient(DEV)).map((s) => `${s.topic} ${s.qos}`),
    incoming: [7, 8].filter((id) => restarted.hasIncomingPacket(DEV, id)),
  }
}

/** The payloads `dev-1` published that aedes delivered (its `publish` event, emitted before the PUBREC goes out). */
function publishedBy (h: SessionBroker): string[] {
  const published: string[] = []
  h.broker.on('publish', (p, client) => { if (client?.id === 'dev-1') published.push(p.payload.toString()) })
  return published
}

/**
 * `dev-1` connected on a raw socket (`old`, 3.1.1 with `clean`), then a clean CONNECT of `dev-1` (`fresh`, the bytes
 * given) that takes it over, with that takeover held: resolves once `fresh` has its CONNACK (the clean step is
 * written), the old connection still open.
 */
async function takeoverHeld (h: SessionBroker, clean: boolean, connect: Buffer): Promise<{ old: RawConnection, fresh: RawConnection, release: () => void, holder: Client }> {
  const old = await RawConnection.open(h.url)
  h.raw.push(old)
  old.send(connectPacket({ clientId: 'dev-1', clean }))
  expect(await old.next('connack')).toBeDefined()
  const holder = h.broker.clients['dev-1'] as Client
  const release = holdTakeover(h, holder)
  const fresh = await RawConnection.open(h.url)
  h.raw.push(fresh)
  fresh.send(connect)
  expect(await fresh.next('connack'), 'the CONNACK waits for the clean step, not for the takeover').toBeDefined()
  expect(holder.closed).toBe(false)
  return { old, fresh, release, holder }
}

const CLEAN_311 = connectPacket({ clientId: 'dev-1', clean: true })
const CLEAN_START_3600 = generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: 'dev-1', clean: true, keepalive: 30,
  properties: { sessionExpiryInterval: 3600 } }, { protocolVersion: 5 })

describe('the connection a clean CONNECT takes over, while its takeover is under way', () => {
  it('stores no QoS 2 packet id in the new session: the new connection\'s PUBLISH with that id is delivered', async () => {
    const h = await startSessionBroker(markSessionOnRead)
    const published = publishedBy(h)
    const { old, fresh, release } = await takeoverHeld(h, false, CLEAN_311)

    old.send(publishPacket('up/dev-1', 'old', 2, 7))
    await old.next('pubrec') // refused: the connection closes (nothing acknowledged); before, a PUBREC
    fresh.send(publishPacket('up/dev-1', 'new', 2, 7))
    expect(await fresh.next('pubrec')).toBeDefined()
    expect(published).toContain('new')
    expect(published).not.toContain('old')

    release()
    await turnsUntil(() => h.broker.clients['dev-1'] !== undefined && !h.broker.clients['dev-1'].closed && h.broker._registering.size === 0)
    fresh.send(packet(0x62, u16(7))) // PUBREL
    expect(await fresh.next('pubcomp')).toBeDefined()
    expect(await afterKill(h)).toEqual({ subscriptions: [], incoming: [] })
  })

  it('stores no subscription in the new session (MQTT 5 Clean Start with a Session Expiry Interval): none after a kill -9', async () => {
    const h = await startSessionBroker(markSessionOnRead)
    const { old, release } = await takeoverHeld(h, false, CLEAN_START_3600)

    old.send(subscribePacket(1, ['cmd/dev-1'], 1))
    await old.next('suback') // refused: the connection closes; before, a SUBACK
    release()
    await turnsUntil(() => h.broker.clients['dev-1'] !== undefined && h.broker._registering.size === 0)
    expect(h.persistence.sessionStates().find((s) => s.clientId === 'dev-1')?.subscriptions).toEqual([])
    expect(await afterKill(h)).toEqual({ subscriptions: [], incoming: [] })
  })

  it('leaves the new connection\'s inbound QoS 2 packets alone: its PUBREL and its close (3.1.1 clean) delete none', async () => {
    const h = await startSessionBroker(markSessionOnRead)
    const published = publishedBy(h)
    const { old, fresh, release, holder } = await takeoverHeld(h, true, CLEAN_311)

    fresh.send(publishPacket('up/dev-1', 'new', 2, 7))
    fresh.send(publishPacket('up/dev-1', 'newer', 2, 8))
    expect(await fresh.next('pubrec')).toBeDefined()
    await turnsUntil(() => fresh.packets.filter((p) => p.cmd === 'pubrec').length === 2)
    old.send(packet(0x62, u16(7))) // PUBREL of an id the old connection no longer has
    expect(await old.next('pubcomp')).toBeDefined()
    release()
    await turnsUntil(() => holder.closed && h.broker.clients['dev-1'] !== undefined && h.broker._registering.size === 0)
    await h.persistence.markSession({ id: 'flush' })

    expect([7, 8].filter((id) => h.persistence.hasIncomingPacket(DEV, id))).toEqual([7, 8])
    fresh.send(publishPacket('up/dev-1', 'new', 2, 7)) // a retransmission (its PUBREC lost): not delivered again
    await turnsUntil(() => fresh.packets.filter((p) => p.cmd === 'pubrec').length === 3)
    expect(published).toEqual(['new', 'newer'])
    expect(await afterKill(h)).toEqual({ subscriptions: [], incoming: [7, 8] })
  })
})

describe('a message matched to a session before its clean step', () => {
  it('is not queued into the session the clean step started', async () => {
    const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const sessions = db.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const persistence = new LevelSessionPersistence(sessions)
    await persistence.setup({ id: 'b1' })
    const dev: SessionClient = { id: 'dev-1', version: 5, sessionExpiryInterval: 3600 }
    await persistence.markSession(dev)
    await persistence.addSubscriptions(dev, [{ topic: 'cmd/dev-1', qos: 1 }])
    const subs = await persistence.subscriptionsByTopic('cmd/dev-1') // aedes' publish: matched, then queued turns later
    await persistence.cleanSubscriptions(dev)
    await persistence.outgoingEnqueueCombi(subs, { cmd: 'publish', topic: 'cmd/dev-1', payload: Buffer.from('x'), qos: 1, brokerId: 'b1', brokerCounter: 1 })
    expect(persistence.sessionStates().find((s) => s.clientId === 'dev-1')?.queued).toBe(0)
    const restarted = new LevelSessionPersistence(sessions)
    await restarted.setup({ id: 'b1' })
    expect(restarted.sessionStates().find((s) => s.clientId === 'dev-1')?.queued).toBe(0)
  })
})
