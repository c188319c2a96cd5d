/**
 * A clean CONNECT (3.1.1 clean session = 1, MQTT 5 Clean Start = 1) cut short while another connection of its client id
 * holds the session discards nothing of that session: the clean step runs at the CONNECT's turn to register, before its
 * CONNACK (aedes patch, handlers/connect.js fetchSubs and aedes.js _register). It ran as the CONNECT read the session
 * (aedes' fetchSubs), before it was registered: a CONNECT closed after that (the aedes patch then skips its
 * registration, so the live connection goes on) had deleted the live connection's stored subscriptions, cursors, queued
 * copies and interval, and its close the live connection's inbound QoS 2 packets: the live connection kept its
 * subscriptions in memory only, and a kill -9 lost the session.
 *
 * A CONNECT's steps from its authentication to its turn to register now run without a pause (its will too is written
 * at its turn: cut-short-connect-will.test.ts), so each test cuts the clean CONNECT short where it can still wait:
 * behind another CONNECT of the id whose takeover of the live connection is held (that connection's DISCONNECT, as a
 * socket that does not drain holds it). It closes it there, lets the takeover go on, and reads what a restart finds (a
 * second persistence on the same database). The same through a real gateway, with cursors into the log and a kill -9:
 * cut-short-clean-connect.int.test.ts.
 */
import type net from 'node:net'
import type { Client } from 'aedes'
import mqtt from 'mqtt'
import { generate } from 'mqtt-packet'
import { afterEach, describe, expect, it } from 'vitest'
import { LevelSessionPersistence, type SessionClient } from '../../../../gateway/mqtt/sessions/persistence.ts'
import { connectPacket, publishPacket, RawConnection, subscribePacket } from '../../../helpers/raw-mqtt.ts'
import { closeSessionBrokers, holdTakeover, markSessionOnRead, startSessionBroker, turnsUntil, type SessionBroker } from './aedes-session-broker.ts'

afterEach(closeSessionBrokers)

/**
 * Cuts `connect` short before its turn to register: the connection registered for `dev-1` is taken over by the one
 * `next` opens, with that takeover held; `connect`, sent then on a new socket, waits behind it, is closed there (then
 * `closing` runs to its end), and the takeover goes on. Resolves once aedes has skipped the closed CONNECT.
 */
async function cutShort (h: SessionBroker, next: () => void, connect: Buffer, closing = async (): Promise<void> => {}): Promise<void> {
  const releaseTakeover = holdTakeover(h, h.broker.clients['dev-1'] as Client)
  next()
  await turnsUntil(() => h.broker._registering.has('dev-1'))
  const conn = await RawConnection.open(h.url)
  h.raw.push(conn)
  conn.send(connect)
  await turnsUntil(() => h.broker._registering.get('dev-1')?.length === 1)
  const client = (h.broker._registering.get('dev-1') as Client[])[0] as Client
  conn.destroy()
  await turnsUntil(() => client.closed)
  await closing()
  releaseTakeover()
  await turnsUntil(() => !h.broker._registering.has('dev-1') && ![...h.broker._connecting.get('dev-1') ?? []].includes(client))
}

/** Connects the device again with `options` (clean = 0: it resumes the session); resolves once it is connected. */
function reconnect (h: SessionBroker, options: mqtt.IClientOptions): { start (): void, readonly connected: Promise<mqtt.MqttClient> } {
  let start = (): void => {}
  const connected = new Promise<mqtt.MqttClient>((resolve, reject) => {
    start = () => {
      const c = mqtt.connect(h.url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0, ...options })
      h.clients.push(c)
      c.once('connect', () => resolve(c))
      c.once('error', reject)
    }
  })
  return { start, connected }
}

/** What a kill -9 now leaves of `dev-1`: a persistence started on the same database after every write so far. */
async function afterKill (h: SessionBroker): Promise<{ subscriptions: string[], incoming: boolean, end: { source: string, seconds: number } | undefined }> {
  await h.persistence.markSession({ id: 'flush' }) // one more write, in call order: every earlier one has settled
  const restarted = new LevelSessionPersistence(h.sessions)
  await restarted.setup({ id: 'restarted' })
  const dev: SessionClient = { id: 'dev-1' }
  const end = restarted.sessionEnd('dev-1')
  return {
    subscriptions: (await restarted.subscriptionsByClient(dev)).map((s) => `${s.topic} ${s.qos}`),
    incoming: restarted.hasIncomingPacket(dev, 7),
    end: end === null ? undefined : { source: end.source, seconds: end.seconds },
  }
}

function connect5 (clean: boolean, sessionExpiryInterval: number): Buffer {
  return generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: 'dev-1', clean, keepalive: 30, properties: { sessionExpiryInterval } },
    { protocolVersion: 5 })
}

describe('a clean CONNECT cut short while another connection holds the session', () => {
  it('3.1.1: leaves the session its stored subscriptions and inbound QoS 2 packets, and its deliveries', async () => {
    const h = await startSessionBroker(markSessionOnRead)
    const live = await RawConnection.open(h.url)
    h.raw.push(live)
    live.send(connectPacket({ clientId: 'dev-1', clean: false }))
    expect(await live.next('connack')).toBeDefined()
    live.send(subscribePacket(1, ['cmd/dev-1'], 1))
    expect(await live.next('suback')).toBeDefined()
    live.send(publishPacket('up/dev-1', 'once', 2, 7)) // awaits its PUBREL: stored inbound
    expect(await live.next('pubrec')).toBeDefined()

    const next = reconnect(h, {})
    await cutShort(h, next.start, connectPacket({ clientId: 'dev-1', clean: true }))
    const resumed = await next.connected

    expect(h.broker.connectedClients).toBe(1)
    expect(await afterKill(h)).toEqual({ subscriptions: ['cmd/dev-1 1'], incoming: true, end: undefined })
    const got = new Promise<string>((resolve) => resumed.once('message', (_topic, payload) => resolve(payload.toString())))
    await new Promise<void>((resolve) => h.broker.publish({ cmd: 'publish', topic: 'cmd/dev-1', payload: Buffer.from('on'), qos: 1, retain: false, dup: false }, () => resolve()))
    expect(await got).toBe('on')
  })

  it('MQTT 5: leaves the session its subscriptions and its interval, whatever Session Expiry the Clean Start asked for', async () => {
    const h = await startSessionBroker(markSessionOnRead)
    const options: mqtt.IClientOptions = { protocolVersion: 5, properties: { sessionExpiryInterval: 3600 } }
    const live = await mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0, ...options })
    h.clients.push(live)
    await live.subscribeAsync('cmd/dev-1', { qos: 1 })

    const first = reconnect(h, options)
    await cutShort(h, first.start, connect5(true, 60)) // would start a session of its own
    await first.connected
    expect(await afterKill(h)).toEqual({ subscriptions: ['cmd/dev-1 1'], incoming: false, end: { source: 'interval', seconds: 3600 } })
    const second = reconnect(h, options)
    await cutShort(h, second.start, connect5(true, 0)) // would end the session with its connection
    expect((await second.connected).connected).toBe(true)
    expect(await afterKill(h)).toEqual({ subscriptions: ['cmd/dev-1 1'], incoming: false, end: { source: 'interval', seconds: 3600 } })
  })
})

describe('a clean CONNECT that takes the session over', () => {
  it('has it discarded, in memory before the takeover and on disk before its CONNACK', async () => {
    const h = await startSessionBroker(markSessionOnRead)
    const live = await mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0 })
    h.clients.push(live)
    await live.subscribeAsync('cmd/dev-1', { qos: 1 })
    const holder = h.broker.clients['dev-1']
    // The write of the clean step is held until released, as a slow disk would hold it.
    const clean = h.persistence.cleanSubscriptions.bind(h.persistence)
    let release: () => void = () => {}
    const written = new Promise<void>((resolve) => { release = resolve })
    let storedAtTakeover: boolean | undefined
    h.persistence.cleanSubscriptions = async (client) => {
      const write = clean(client)
      storedAtTakeover ??= h.persistence.hasSessionState(client)
      await write
      await written
    }
    const connacks: Client[] = []
    h.broker.on('connackSent', (_packet, client) => { connacks.push(client) })

    const next = mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: true, reconnectPeriod: 0 })
    // The takeover goes on while the write is held: the new connection is registered, the old one closed.
    await turnsUntil(() => h.broker.clients['dev-1'] !== undefined && h.broker.clients['dev-1'] !== holder)
    expect({ storedAtTakeover, holderClosed: holder?.closed, connacks: connacks.length }).toEqual({ storedAtTakeover: false, holderClosed: true, connacks: 0 })
    release()
    h.clients.push(await next)
    await turnsUntil(() => connacks.length > 0)
    expect(connacks[0]).toBe(h.broker.clients['dev-1'])
    expect(await afterKill(h)).toEqual({ subscriptions: [], incoming: false, end: undefined })
  })
})

describe('a clean CONNECT cut short after the connections that held the session went', () => {
  /**
   * Closes the live connection and the next one (`close`); resolves once aedes has unregistered the live one and the
   * persistence has seen the next one's socket close (it marks the session offline with that connection's interval).
   */
  async function closeBoth (h: SessionBroker, close: () => void): Promise<void> {
    const next = [...h.broker._connecting.get('dev-1') ?? []].filter((c) => !c.closed)
    const closed = next.map((c) => new Promise((resolve) => { (c as unknown as { conn: net.Socket }).conn.once('close', resolve) }))
    const unregistered = new Promise((resolve) => { h.broker.once('clientDisconnect', resolve) })
    close()
    await Promise.all([...closed, unregistered])
  }

  /** The device again on a raw socket (clean = 0), which closes before its registration with the cut-short CONNECT. */
  async function nextThatCloses (h: SessionBroker): Promise<{ start (): void, close (): void }> {
    const conn = await RawConnection.open(h.url)
    h.raw.push(conn)
    return { start: () => { conn.send(connectPacket({ clientId: 'dev-1', clean: false })) }, close: () => { conn.destroy() } }
  }

  it('discards it, as one that came after them would have (the client\'s latest word)', async () => {
    const h = await startSessionBroker(markSessionOnRead)
    const live = await RawConnection.open(h.url)
    h.raw.push(live)
    live.send(connectPacket({ clientId: 'dev-1', clean: false }))
    expect(await live.next('connack')).toBeDefined()
    live.send(subscribePacket(1, ['cmd/dev-1'], 1))
    expect(await live.next('suback')).toBeDefined()

    const next = await nextThatCloses(h)
    await cutShort(h, next.start, connectPacket({ clientId: 'dev-1', clean: true }), async () => {
      await closeBoth(h, () => { next.close(); live.destroy() })
    })
    await turnsUntil(() => h.broker._connecting.get('dev-1') === undefined && h.broker.clients['dev-1'] === undefined)
    expect(await afterKill(h)).toEqual({ subscriptions: [], incoming: false, end: undefined })
  })

  it('MQTT 5: a Clean Start with a Session Expiry Interval leaves the session it starts offline, ending by that interval', async () => {
    const h = await startSessionBroker(markSessionOnRead)
    const live = await mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, protocolVersion: 5, properties: { sessionExpiryInterval: 3600 }, reconnectPeriod: 0 })
    h.clients.push(live)
    await live.subscribeAsync('cmd/dev-1', { qos: 1 })

    const next = await nextThatCloses(h)
    await cutShort(h, next.start, connect5(true, 60), async () => {
      await closeBoth(h, () => { next.close(); live.end(true) })
    })
    await turnsUntil(() => h.broker._connecting.get('dev-1') === undefined && h.broker.clients['dev-1'] === undefined)
    expect(h.persistence.sessionEnd('dev-1')).toMatchObject({ source: 'interval', seconds: 60 }) // its expiry is timed from now
    expect(await afterKill(h)).toEqual({ subscriptions: [], incoming: false, end: { source: 'interval', seconds: 60 } })
  })
})
