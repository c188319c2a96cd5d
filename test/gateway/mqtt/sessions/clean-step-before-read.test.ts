/**
 * A persistent CONNECT reads the stored session only after the clean step of a clean CONNECT of its client id queued
 * ahead of it (aedes patch, aedes.js _afterCleanSteps, _afterSessionReads). While another connection holds the id, a
 * clean CONNECT leaves its clean step for its turn to register (handlers/connect.js fetchSubs, aedes.js _writeAtTurn).
 * A persistent CONNECT that came meanwhile read the still-intact session, restored its subscriptions and got session
 * present 1; the clean step then deleted the session on disk, and the persistent CONNECT, taking the clean one over,
 * held the subscriptions in memory only: a kill -9 lost them. The clean CONNECT is earlier in the registration order,
 * so the persistent one resumes what it left: nothing [MQTT-3.1.2-6], [MQTT-3.2.2-2]. The other way round, a
 * persistent CONNECT that read the session before the clean CONNECT came (its restore held by an ACL answering later)
 * now registers first, and the clean one takes it over and discards the session (before, the clean one registered
 * first and deleted what the other had restored).
 *
 * Real aedes on the project's session persistence; the clean CONNECT waits for its turn while an earlier persistent one
 * takes the live connection over (that connection's DISCONNECT is held, as a socket that does not drain holds it), and
 * what a restart finds is read by a second persistence on the same database.
 */
import type { Client } from 'aedes'
import mqtt from 'mqtt'
import { generate } from 'mqtt-packet'
import { afterEach, describe, expect, it } from 'vitest'
import { LevelSessionPersistence } from '../../../../gateway/mqtt/sessions/persistence.ts'
import { RawConnection } from '../../../helpers/raw-mqtt.ts'
import { closeSessionBrokers, holdTakeover, startSessionBroker, turnsUntil, type SessionBroker } from './aedes-session-broker.ts'

afterEach(closeSessionBrokers)

/** The topics of `dev-1`'s stored subscriptions a kill -9 now leaves: a persistence started on the same database. */
async function subscribedAfterKill (h: SessionBroker): Promise<string[]> {
  await h.persistence.markSession({ id: 'flush' }) // one more write, in call order: every earlier one has settled
  const restarted = new LevelSessionPersistence(h.sessions)
  await restarted.setup({ id: 'restarted' })
  return (await restarted.subscriptionsByClient({ id: 'dev-1' } as never)).map((sub) => sub.topic)
}

/**
 * The live connection of `dev-1` subscribed to a/b; a persistent CONNECT taking it over, held in the takeover; a clean
 * CONNECT queued behind it (its clean step left for its turn); then a persistent CONNECT of the same id.
 */
interface Queued {
  readonly releaseTakeover: () => void
  readonly first: Promise<mqtt.MqttClient>
  readonly cleanConn: RawConnection
  readonly last: mqtt.MqttClient
}

async function cleanQueuedAheadOfPersistent (h: SessionBroker): Promise<Queued> {
  const liveClient = await mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0 })
  h.clients.push(liveClient)
  const holder = h.broker.clients['dev-1']
  if (holder === undefined) throw new Error('dev-1 is not registered')
  await liveClient.subscribeAsync('a/b', { qos: 1 })
  const releaseTakeover = holdTakeover(h, holder)
  const first = mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0 })
  await turnsUntil(() => h.broker._registering.has('dev-1'))
  const cleanConn = await RawConnection.open(h.url)
  h.raw.push(cleanConn)
  cleanConn.send(generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'dev-1', clean: true, keepalive: 30 }))
  await turnsUntil(() => (h.broker._registering.get('dev-1') ?? []).length === 1)
  const last = mqtt.connect(h.url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0 })
  h.clients.push(last)
  return { releaseTakeover, first, cleanConn, last }
}

/** The last CONNECT has read the session and queued behind the clean one, or waits to read it (the fix). */
function readOrWaiting (h: SessionBroker): boolean {
  return h.broker._registering.get('dev-1')?.length === 2 || h.broker._waitingConnects?.has('dev-1') === true
}

function connackOf (client: mqtt.MqttClient): Promise<{ sessionPresent: boolean }> {
  return new Promise((resolve) => client.once('connect', (packet) => resolve({ sessionPresent: packet.sessionPresent })))
}

describe('a persistent CONNECT behind a clean CONNECT whose clean step waits for its turn', () => {
  it('resumes what the clean step left: session present 0, no subscriptions in memory or on disk', async () => {
    const h = await startSessionBroker()
    const { releaseTakeover, first, last } = await cleanQueuedAheadOfPersistent(h)
    const connack = connackOf(last)
    await turnsUntil(() => readOrWaiting(h))
    releaseTakeover()
    h.clients.push(await first)
    const { sessionPresent } = await connack
    await turnsUntil(() => !h.broker._registering.has('dev-1'))
    const registered = h.broker.clients['dev-1'] as unknown as { subscriptions: Record<string, unknown> }
    expect({ sessionPresent, inMemory: Object.keys(registered.subscriptions), onDisk: await subscribedAfterKill(h) })
      .toEqual({ sessionPresent: false, inMemory: [], onDisk: [] })
  })

  it('resumes the session the clean CONNECT would have discarded when that one closes before its turn', async () => {
    const h = await startSessionBroker()
    const { releaseTakeover, first, cleanConn, last } = await cleanQueuedAheadOfPersistent(h)
    const connack = connackOf(last)
    await turnsUntil(() => readOrWaiting(h))
    const queuedClean = (h.broker._registering.get('dev-1') as Client[])[0] as Client
    cleanConn.destroy()
    await turnsUntil(() => queuedClean.closed)
    releaseTakeover()
    h.clients.push(await first)
    const { sessionPresent } = await connack
    await turnsUntil(() => !h.broker._registering.has('dev-1'))
    const registered = h.broker.clients['dev-1'] as unknown as { subscriptions: Record<string, unknown> }
    expect({ sessionPresent, inMemory: Object.keys(registered.subscriptions), onDisk: await subscribedAfterKill(h) })
      .toEqual({ sessionPresent: true, inMemory: ['a/b'], onDisk: ['a/b'] })
  })

  it('that read the session before a clean CONNECT came registers first, and the clean one takes it over and discards it', async () => {
    const h = await startSessionBroker()
    const liveClient = await mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0 })
    h.clients.push(liveClient)
    const holder = h.broker.clients['dev-1'] as Client
    await liveClient.subscribeAsync('a/b', { qos: 1 })
    const releaseTakeover = holdTakeover(h, holder)
    const first = mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0 })
    await turnsUntil(() => h.broker._registering.has('dev-1'))
    // The persistent CONNECT's restore of a/b, after its session read, is held in authorizeSubscribe (an ACL that
    // answers later), and the clean CONNECT comes meanwhile.
    let releaseRestore: (() => void) | undefined
    const authorize = h.broker.authorizeSubscribe.bind(h.broker)
    h.broker.authorizeSubscribe = (client, sub, done) => {
      if (releaseRestore === undefined) releaseRestore = () => { authorize(client, sub, done) }
      else authorize(client, sub, done)
    }
    const last = mqtt.connect(h.url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0 })
    h.clients.push(last)
    const connack = connackOf(last)
    await turnsUntil(() => releaseRestore !== undefined)
    const cleanConn = await RawConnection.open(h.url)
    h.raw.push(cleanConn)
    cleanConn.send(generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'dev-1', clean: true, keepalive: 30 }))
    await turnsUntil(() => [...h.broker._connecting.get('dev-1') ?? []].some((client) => (client as unknown as { _cleanPending: boolean })._cleanPending))
    releaseRestore?.()
    releaseTakeover()
    h.clients.push(await first)
    const { sessionPresent } = await connack
    await turnsUntil(() => !h.broker._registering.has('dev-1') && !h.broker._connecting.has('dev-1'))
    const registered = h.broker.clients['dev-1'] as unknown as { clean: boolean, subscriptions: Record<string, unknown> }
    expect({ sessionPresent, registeredClean: registered.clean, inMemory: Object.keys(registered.subscriptions), onDisk: await subscribedAfterKill(h) })
      .toEqual({ sessionPresent: true, registeredClean: true, inMemory: [], onDisk: [] })
  })
})
