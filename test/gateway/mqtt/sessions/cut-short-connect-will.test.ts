/**
 * A CONNECT stores its will at its turn to register, before the takeover of the connection that holds its client id
 * and before its CONNACK (aedes patch, aedes.js _writeAtTurn); one closed before its turn stores and publishes none.
 * aedes stored the will in a step before the registration (handlers/connect.js storeWill): a CONNECT closed after that
 * and before its registration (the aedes patch then skips registering it, and the connection that holds the id goes on)
 * had replaced or deleted that connection's stored will, so a kill -9 fired the cut-short CONNECT's will or none for
 * the live connection's session, and its close published its own will ("device offline") while the device was up.
 *
 * Real aedes on the project's session persistence; a CONNECT waits for its turn while an earlier one of its id takes
 * the live connection over (that connection's DISCONNECT is held, as a socket that does not drain holds it), and what a
 * restart finds is read by a second persistence on the same database. The same through a real gateway, with FIN behind
 * the CONNECTs and a kill -9: cut-short-connect-will.int.test.ts.
 */
import type { Client } from 'aedes'
import mqtt from 'mqtt'
import { generate, type IConnectPacket } from 'mqtt-packet'
import pino from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import { LevelSessionPersistence } from '../../../../gateway/mqtt/sessions/persistence.ts'
import { installWills, type WillPersistence } from '../../../../gateway/mqtt/wills.ts'
import { RawConnection } from '../../../helpers/raw-mqtt.ts'
import { closeSessionBrokers, holdTakeover, startSessionBroker, turnsUntil, type SessionBroker } from './aedes-session-broker.ts'

/** A broker of {@link startSessionBroker} with the wills published so far. */
interface Harness extends SessionBroker {
  /** Payloads of the wills published so far (all go to `status/dev-1`), in order. */
  readonly wills: string[]
}

afterEach(closeSessionBrokers)

/** The broker of {@link startSessionBroker} with the gateway's will storage (wills.ts: a stored will is deleted only for the connection that stored it). */
async function harness (): Promise<Harness> {
  const h = await startSessionBroker((persistence) => {
    installWills({
      persistence: persistence as unknown as WillPersistence,
      logger: pino({ level: 'silent' }),
      identityOf: () => undefined,
      recheck: (who) => who,
      fire: async () => {},
    })
  })
  const wills: string[] = []
  h.broker.on('publish', (packet) => { if (packet.topic === 'status/dev-1') wills.push(String(packet.payload)) })
  return { ...h, wills }
}

function will (payload: string, willDelayInterval?: number): NonNullable<IConnectPacket['will']> {
  return { topic: 'status/dev-1', payload: Buffer.from(payload), qos: 1, retain: false, ...(willDelayInterval === undefined ? {} : { properties: { willDelayInterval } }) }
}

/** The connection that holds `dev-1`: persistent, with the will `live-gone`. */
async function live (h: Harness): Promise<{ client: mqtt.MqttClient, server: Client }> {
  const client = await mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, will: will('live-gone'), reconnectPeriod: 0 })
  h.clients.push(client)
  const server = h.broker.clients['dev-1']
  if (server === undefined) throw new Error('dev-1 is not registered')
  return { client, server }
}

/** Sends `connect` on a new socket; resolves with aedes' client once it waits for its turn to register behind another. */
async function queued (h: Harness, connect: Buffer): Promise<{ conn: RawConnection, client: Client }> {
  const conn = await RawConnection.open(h.url)
  h.raw.push(conn)
  conn.send(connect)
  await turnsUntil(() => (h.broker._registering.get('dev-1') ?? []).length === 1)
  return { conn, client: (h.broker._registering.get('dev-1') as Client[])[0] as Client }
}

/** The will a kill -9 now leaves for `dev-1`: a persistence started on the same database after every write so far. */
async function storedAfterKill (h: Harness): Promise<string | undefined> {
  await h.persistence.markSession({ id: 'flush' }) // one more write, in call order: every earlier one has settled
  const restarted = new LevelSessionPersistence(h.sessions)
  await restarted.setup({ id: 'restarted' })
  const stored = await restarted.getWill({ id: 'dev-1' })
  return stored === undefined ? undefined : String(stored.payload)
}

const CUT_SHORT = {
  '3.1.1 persistent': generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'dev-1', clean: false, keepalive: 30, will: will('cut-gone') }),
  '3.1.1 clean': generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'dev-1', clean: true, keepalive: 30, will: will('cut-gone') }),
  'MQTT 5 Clean Start with a will delay': generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: 'dev-1', clean: true, keepalive: 30,
    will: will('cut-gone', 30), properties: { sessionExpiryInterval: 60 } }, { protocolVersion: 5 }),
}

describe('a CONNECT closed while it waits for its turn to register', () => {
  for (const [kind, connect] of Object.entries(CUT_SHORT)) {
    it(`${kind}: publishes no will, and the stored will is that of the connection that took the session over`, async () => {
      const h = await harness()
      const { server: holder } = await live(h)
      const releaseTakeover = holdTakeover(h, holder)
      // The device again: its registration takes the live connection over and waits for that connection's DISCONNECT.
      const connacks: Client[] = []
      h.broker.on('connackSent', (_packet, client) => { connacks.push(client) })
      const next = mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, will: will('next-gone'), reconnectPeriod: 0 })
      await turnsUntil(() => h.broker._registering.has('dev-1'))

      const cut = await queued(h, connect)
      expect(connacks).not.toContain(cut.client) // its CONNACK waits for its turn
      cut.conn.destroy()
      await turnsUntil(() => cut.client.closed)
      releaseTakeover()
      h.clients.push(await next)
      await turnsUntil(() => !h.broker._registering.has('dev-1'))

      expect(h.broker.clients['dev-1']).not.toBe(cut.client)
      expect(h.broker.clients['dev-1']).not.toBe(holder)
      // The connection taken over fires its will (as a takeover always did); the cut-short CONNECT fires none.
      await turnsUntil(() => h.wills.length > 0)
      expect(await storedAfterKill(h)).toBe('next-gone')
      expect(h.wills).toEqual(['live-gone'])
    })
  }
})

describe('a CONNECT at its turn to register', () => {
  it('stores its will before it takes the live connection over, which fires its own will and leaves the new one stored', async () => {
    const h = await harness()
    const { server: holder } = await live(h)
    // The new will's write is held, as a slow disk holds it: the takeover goes on meanwhile, the CONNACK waits.
    const putWill = h.persistence.putWill.bind(h.persistence)
    let release = (): void => {}
    const written = new Promise<void>((resolve) => { release = resolve })
    let storedAtTakeover: string | undefined
    h.persistence.putWill = async (client, packet) => {
      const write = putWill(client, packet)
      await write
      await written
    }
    const connacks: Client[] = []
    h.broker.on('connackSent', (_packet, client) => { if (client !== holder) connacks.push(client) }) // the holder's may come late
    h.broker.on('clientDisconnect', async (client) => {
      if (client === holder) storedAtTakeover = String((await h.persistence.getWill({ id: 'dev-1' }))?.payload)
    })

    const next = mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, will: will('next-gone'), reconnectPeriod: 0 })
    await turnsUntil(() => h.broker.clients['dev-1'] !== undefined && h.broker.clients['dev-1'] !== holder)
    await turnsUntil(() => h.wills.length > 0 && storedAtTakeover !== undefined)
    expect({ storedAtTakeover, wills: h.wills, connacks: connacks.length }).toEqual({ storedAtTakeover: 'next-gone', wills: ['live-gone'], connacks: 0 })
    release()
    h.clients.push(await next)
    expect(await storedAfterKill(h)).toBe('next-gone')
  })

  it('publishes its will when it closes after its turn came, even before its CONNACK: it took the session over', async () => {
    const h = await harness()
    const { server: holder } = await live(h)
    const putWill = h.persistence.putWill.bind(h.persistence)
    let arrived = (_client: Client): void => {}
    const atTurn = new Promise<Client>((resolve) => { arrived = resolve })
    let release = (): void => {}
    const written = new Promise<void>((resolve) => { release = resolve })
    h.persistence.putWill = async (client, packet) => {
      arrived(client as Client)
      await putWill(client, packet)
      await written
    }
    const conn = await RawConnection.open(h.url)
    h.raw.push(conn)
    conn.send(generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'dev-1', clean: false, keepalive: 30, will: will('cut-gone') }))
    const client = await atTurn
    conn.destroy()
    await turnsUntil(() => client.closed && holder.closed)
    release()
    await turnsUntil(() => h.wills.length === 2)
    expect([...h.wills].sort()).toEqual(['cut-gone', 'live-gone'])
    expect(await storedAfterKill(h)).toBeUndefined()
  })
})
