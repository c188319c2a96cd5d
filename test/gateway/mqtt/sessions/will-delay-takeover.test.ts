/**
 * MQTT 5 delayed wills (Will Delay Interval > 0) around takeovers and CONNECTs cut short, on real aedes with the
 * project's session persistence and will storage (wills.ts). A will waiting for its delay is published when the delay
 * runs out or the session ends, whichever comes first, and not at all if a new connection continues the session before
 * that [MQTT-3.1.2-8], [MQTT-3.1.3-9], 3.1.3.2.2; what stays stored is what a kill -9 fires at the next start
 * (hooks/startup-wills.ts), read here by a second persistence on the same database.
 *
 * - A connection with a delayed will taken over by a CONNECT that continues its session (Clean Start 0): its will was
 *   neither published nor deleted (wills.ts keeps a will stored while the connection that stored it is open, and
 *   aedes' scheduleWill ignores the old connection's will during a takeover), so it fired after a restart: a false
 *   "device offline". Taken over by a Clean Start 1 CONNECT, the session ends and the will is published.
 * - A CONNECT with a delayed will that closes after its turn, while its takeover is still under way, was never
 *   published (scheduleWill returned early for it too).
 * - A CONNECT cut short before its turn while nobody else holds the id, with Session Expiry 0, ends the session
 *   (aedes.js _closedBeforeRegistering, _wipeSession), which deleted a previous connection's will waiting for its
 *   delay before it was published: only aedes' timer, in memory, still had it. The same for a will of a client
 *   connected when the gateway stopped, waiting for its delay after the start (wills.ts's timer).
 * The same with a gateway process and kill -9: will-delay-takeover.int.test.ts.
 */
import type { Client } from 'aedes'
import mqtt from 'mqtt'
import { generate, type IConnectPacket } from 'mqtt-packet'
import pino from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import type { LevelDatabase } from '../../../../store/index.ts'
import { LevelSessionPersistence } from '../../../../gateway/mqtt/sessions/persistence.ts'
import { installWills, type WillPersistence } from '../../../../gateway/mqtt/wills.ts'
import { RawConnection } from '../../../helpers/raw-mqtt.ts'
import { closeSessionBrokers, holdTakeover, startSessionBroker, turnsUntil, type SessionBroker } from './aedes-session-broker.ts'

/** A broker of {@link startSessionBroker} with the wills it published and the deletes of stored wills it made. */
interface Harness extends SessionBroker {
  /** Payloads of the wills published so far (all go to `status/dev-1`), in order. */
  readonly wills: string[]
  /** For each stored will the persistence deleted (past wills.ts' owner check): the wills whose publish began before. */
  readonly deletes: string[][]
  /** For each will the persistence stored: the wills whose publish began before. */
  readonly puts: string[][]
}

afterEach(closeSessionBrokers)

/** A broker with the gateway's will storage; on `sessions`, the data of a gateway that stopped (its wills fire at start). */
async function harness (sessions?: LevelDatabase): Promise<Harness> {
  const wills: string[] = []
  const deletes: string[][] = []
  const puts: string[][] = []
  const publishing: string[] = []
  const h = await startSessionBroker((persistence) => {
    const delWill = persistence.delWill.bind(persistence)
    persistence.delWill = async (client) => {
      deletes.push([...publishing])
      return await delWill(client)
    }
    const putWill = persistence.putWill.bind(persistence)
    persistence.putWill = async (client, packet) => {
      puts.push([...publishing])
      await putWill(client, packet)
    }
    installWills({
      persistence: persistence as unknown as WillPersistence,
      logger: pino({ level: 'silent' }),
      identityOf: (client) => ({ tenant: 'default', role: 'anonymous', username: null, clientId: client.id }),
      recheck: (who) => who,
      // A will of the previous process, fired as the gateway fires it (hooks/startup-wills.ts): published, then deleted.
      fire: async (packet) => { publishing.push(String(packet.payload)); wills.push(String(packet.payload)) },
    })
  }, sessions)
  h.broker.on('publish', (packet) => { if (packet.topic === 'status/dev-1') wills.push(String(packet.payload)) })
  // The wills whose publish has begun (aedes emits `publish` only after the `published` step that deletes the will).
  const publish = h.broker.publish.bind(h.broker)
  h.broker.publish = ((packet: { topic: string, payload: Buffer | string }, ...rest: unknown[]) => {
    if (packet.topic === 'status/dev-1') publishing.push(String(packet.payload))
    return (publish as (...args: unknown[]) => unknown)(packet, ...rest)
  }) as typeof h.broker.publish
  return { ...h, wills, deletes, puts }
}

function will (payload: string, willDelayInterval?: number): NonNullable<IConnectPacket['will']> {
  return { topic: 'status/dev-1', payload: Buffer.from(payload), qos: 1, retain: false, ...(willDelayInterval === undefined ? {} : { properties: { willDelayInterval } }) }
}

/** An MQTT 5 connection of `dev-1` resuming its session (Clean Start 0), with the will `payload` after `delay` s. */
async function v5 (h: Harness, payload: string, delay: number): Promise<{ client: mqtt.MqttClient, server: Client }> {
  const client = await mqtt.connectAsync(h.url, { protocolVersion: 5, clientId: 'dev-1', clean: false, reconnectPeriod: 0,
    properties: { sessionExpiryInterval: 600 }, will: will(payload, delay) })
  h.clients.push(client)
  const server = h.broker.clients['dev-1']
  if (server === undefined) throw new Error('dev-1 is not registered')
  return { client, server }
}

/** The will a kill -9 now leaves for `dev-1`: a persistence started on the same database after every write so far. */
async function storedAfterKill (h: Harness): Promise<string | undefined> {
  await h.persistence.markSession({ id: 'flush' }) // one more write, in call order: every earlier one has settled
  const restarted = new LevelSessionPersistence(h.sessions)
  await restarted.setup({ id: 'restarted' })
  const stored = await restarted.getWill({ id: 'dev-1' })
  return stored === undefined ? undefined : String(stored.payload)
}

/** Waits (bounded) until `payload` was published as a will; whether it was. */
async function published (h: Harness, payload: string, ms = 10_000): Promise<boolean> {
  const until = Date.now() + ms
  while (!h.wills.includes(payload)) {
    if (Date.now() >= until) return false
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
  return true
}

/**
 * An MQTT 5 CONNECT of `dev-1` with Session Expiry 0, cut short while its session step (the read for Clean Start 0,
 * the clean step for 1) is held: aedes ends the session as its close would have (_closedBeforeRegistering).
 */
async function cutShortEndingTheSession (h: Harness, cleanStart: boolean): Promise<void> {
  const step = cleanStart ? 'cleanSubscriptions' : 'subscriptionsByClient'
  const original = h.persistence[step].bind(h.persistence) as (client: never) => Promise<unknown>
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  let reached = false
  Object.assign(h.persistence, {
    [step]: async (client: never) => {
      if ((client as { id: string }).id !== 'dev-1') return await original(client)
      reached = true
      await held
      return await original(client)
    },
  })
  const conn = await RawConnection.open(h.url)
  h.raw.push(conn)
  conn.send(generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: 'dev-1', clean: cleanStart, keepalive: 30,
    properties: { sessionExpiryInterval: 0 } }, { protocolVersion: 5 }))
  await turnsUntil(() => reached)
  conn.destroy()
  await turnsUntil(() => conn.closed)
  release()
  await turnsUntil(() => !h.broker._connecting.has('dev-1'))
}

const CONTINUING: Record<string, mqtt.IClientOptions> = {
  'MQTT 5, Clean Start 0': { protocolVersion: 5, clean: false, properties: { sessionExpiryInterval: 600 } },
  '3.1.1, clean session 0': { protocolVersion: 4, clean: false },
}

describe('a connection with a delayed will taken over', () => {
  for (const [kind, options] of Object.entries(CONTINUING)) {
    it(`by a CONNECT without a will that continues the session (${kind}): its will is neither published nor left stored`, async () => {
      const h = await harness()
      const { server: old } = await v5(h, 'live-gone', 300)
      const next = await mqtt.connectAsync(h.url, { clientId: 'dev-1', reconnectPeriod: 0, ...options })
      h.clients.push(next)
      await turnsUntil(() => old.closed && h.broker.clients['dev-1'] !== undefined && h.broker.clients['dev-1'] !== old)
      expect(await storedAfterKill(h)).toBeUndefined()
      expect(h.wills).toEqual([])
    })
  }

  it('by a CONNECT without a will that continues the session: the will is deleted before its CONNACK, while the old connection still closes', async () => {
    const h = await harness()
    const { server: old } = await v5(h, 'live-gone', 300)
    const releaseTakeover = holdTakeover(h, old)
    const next = await mqtt.connectAsync(h.url, { protocolVersion: 5, clientId: 'dev-1', clean: false, reconnectPeriod: 0,
      properties: { sessionExpiryInterval: 600 } })
    h.clients.push(next)
    expect(old.closed).toBe(false)
    expect(await storedAfterKill(h)).toBeUndefined()
    releaseTakeover()
    await turnsUntil(() => old.closed)
    expect(h.wills).toEqual([])
  })

  it('by a CONNECT with a will that continues the session: the new will is stored, the old one never published', async () => {
    const h = await harness()
    const { server: old } = await v5(h, 'live-gone', 300)
    await v5(h, 'next-gone', 300)
    await turnsUntil(() => old.closed)
    expect(await storedAfterKill(h)).toBe('next-gone')
    expect(h.wills).toEqual([])
  })

  it('by a Clean Start 1 CONNECT: the session ends, so the will is published now, then deleted', async () => {
    const h = await harness()
    await v5(h, 'live-gone', 300)
    const next = await mqtt.connectAsync(h.url, { protocolVersion: 5, clientId: 'dev-1', clean: true, reconnectPeriod: 0,
      properties: { sessionExpiryInterval: 600 } })
    h.clients.push(next)
    expect(await published(h, 'live-gone')).toBe(true)
    expect(await storedAfterKill(h)).toBeUndefined()
  })
})

describe('a CONNECT with a delayed will closed after its turn, while it takes the session over', () => {
  it('publishes its will once the delay ran out, and keeps it stored until then', async () => {
    const h = await harness()
    const live = await mqtt.connectAsync(h.url, { clientId: 'dev-1', clean: false, will: will('live-gone'), reconnectPeriod: 0 })
    h.clients.push(live)
    const holder = h.broker.clients['dev-1'] as Client
    const releaseTakeover = holdTakeover(h, holder)
    const conn = await RawConnection.open(h.url)
    h.raw.push(conn)
    conn.send(generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: 'dev-1', clean: false, keepalive: 30,
      will: will('cut-gone', 1), properties: { sessionExpiryInterval: 60 } }, { protocolVersion: 5 }))
    // Its turn came: its will is stored and the takeover of the live connection waits for that connection's DISCONNECT.
    await turnsUntil(() => (h.broker as unknown as { _takingOver: Set<string> })._takingOver.has('dev-1'))
    const next = [...h.broker._connecting.get('dev-1') ?? []].find((c) => c !== holder) as Client & { will: unknown }
    conn.destroy()
    // Its close went all the way (aedes' close clears the client's will once it handled it) before the takeover ends.
    await turnsUntil(() => next.closed && next.will === null)
    expect(await storedAfterKill(h)).toBe('cut-gone')
    releaseTakeover()
    expect(await published(h, 'live-gone')).toBe(true)
    expect(await published(h, 'cut-gone')).toBe(true)
    expect(h.wills).toEqual(['live-gone', 'cut-gone'])
    expect(await storedAfterKill(h)).toBeUndefined()
  })
})

describe('a Session Expiry 0 CONNECT cut short before its turn, with nobody else holding the id', () => {
  for (const cleanStart of [false, true]) {
    it(`(Clean Start ${Number(cleanStart)}) ends the session: the previous connection's will waiting for its delay is published then, and stays stored until it is`, async () => {
      const h = await harness()
      const { client: previous, server: gone } = await v5(h, 'previous-gone', 300)
      // Its network connection drops: no DISCONNECT, so its will waits for its delay, stored.
      previous.stream.destroy()
      await turnsUntil(() => gone.closed && h.broker.clients['dev-1'] === undefined)
      expect(await storedAfterKill(h)).toBe('previous-gone')

      await cutShortEndingTheSession(h, cleanStart)
      expect(await published(h, 'previous-gone')).toBe(true)
      expect(await storedAfterKill(h)).toBeUndefined()
      // Every delete of the stored will came after it was published: a kill -9 at any moment fires it or finds it fired.
      expect(h.deletes.every((before) => before.includes('previous-gone')), JSON.stringify(h.deletes)).toBe(true)
    })
  }
})

describe('a Session Expiry 0 CONNECT cut short after a restart, while a will of the previous process waits for its delay', () => {
  it('ends the session: the will is published then, and stays stored until it is', async () => {
    const before = await harness()
    const { server: connected } = await v5(before, 'previous-gone', 300)
    await before.persistence.markSession(connected) // the gateway's CONNECT hook records the session (hooks/sessions.ts)
    // The gateway stops while the device is connected: its will stays stored, to wait for its delay after the start.
    await new Promise<void>((resolve) => before.broker.close(() => resolve()))
    await turnsUntil(() => connected.closed)
    const h = await harness(before.sessions)
    expect(h.wills).toEqual([]) // waiting for its delay

    await cutShortEndingTheSession(h, false)
    expect(await published(h, 'previous-gone')).toBe(true)
    expect(await storedAfterKill(h)).toBeUndefined()
    expect(h.deletes.every((before) => before.includes('previous-gone')), JSON.stringify(h.deletes)).toBe(true)
  })
})

/**
 * A reconnect of a device whose earlier connection already closed, with its will waiting for its delay: Clean Start 1
 * ends that session [MQTT-3.1.2-4], and the will is due then (3.1.3.2.2), as when the Clean Start 1 CONNECT takes an
 * open connection over; Clean Start 0 continues the session, which cancels the will [MQTT-3.1.3-9]. Before, both
 * cancelled it: the Clean Start 1 CONNECT deleted the stored will at its turn, and its registration cleared aedes' timer
 * (or, for a will of the previous process, wills.ts cancelled its own).
 */
describe('a reconnect after the connection with a delayed will closed', () => {
  /** `dev-1` connected with a will 'previous-gone' due in 300 s, and closed without DISCONNECT: its will waits, stored. */
  async function closedWithDelayedWill (h: Harness): Promise<void> {
    const { client: previous, server: gone } = await v5(h, 'previous-gone', 300)
    previous.stream.destroy()
    await turnsUntil(() => gone.closed && h.broker.clients['dev-1'] === undefined)
    expect(await storedAfterKill(h)).toBe('previous-gone')
  }

  /** The same, left by a gateway that stopped while `dev-1` was connected: the new start times the will (wills.ts). */
  async function connectedWhenTheGatewayStopped (): Promise<Harness> {
    const before = await harness()
    const { server: connected } = await v5(before, 'previous-gone', 300)
    await before.persistence.markSession(connected) // the gateway's CONNECT hook records the session (hooks/sessions.ts)
    await new Promise<void>((resolve) => before.broker.close(() => resolve()))
    await turnsUntil(() => connected.closed)
    const h = await harness(before.sessions)
    expect(h.wills).toEqual([]) // waiting for its delay
    return h
  }

  /** `dev-1` connects again (MQTT 5) with `cleanStart`, and with the will `next-gone` if `withWill`; resolves at its CONNACK. */
  async function reconnect (h: Harness, cleanStart: boolean, withWill: boolean): Promise<void> {
    h.clients.push(await mqtt.connectAsync(h.url, { protocolVersion: 5, clientId: 'dev-1', clean: cleanStart, reconnectPeriod: 0,
      properties: { sessionExpiryInterval: 600 }, ...(withWill ? { will: will('next-gone', 300) } : {}) }))
  }

  const waiting: Record<string, () => Promise<Harness>> = {
    'on aedes\' timer': async () => { const h = await harness(); await closedWithDelayedWill(h); return h },
    'of the previous process, after a restart': connectedWhenTheGatewayStopped,
  }

  for (const [where, start] of Object.entries(waiting)) {
    for (const withWill of [false, true]) {
      it(`(${where}) Clean Start 1${withWill ? ' with a will' : ''}: the will is published by the CONNACK, stored until then`, async () => {
        const h = await start()
        await reconnect(h, true, withWill)
        expect(h.wills).toEqual(['previous-gone'])
        expect(await storedAfterKill(h)).toBe(withWill ? 'next-gone' : undefined)
        // Every delete and the new connection's store of the will came after the publish began: a kill -9 at any moment
        // fires the old will, or finds it fired.
        expect(h.deletes.every((before) => before.includes('previous-gone')), JSON.stringify(h.deletes)).toBe(true)
        if (withWill) expect(h.puts.at(-1), JSON.stringify(h.puts)).toContain('previous-gone')
        expect((h.broker as unknown as { delayedWills: Map<string, unknown> }).delayedWills.has('dev-1')).toBe(false)
      })
    }

    it(`(${where}) Clean Start 0: the session continues, so the will is cancelled: neither published nor left stored`, async () => {
      const h = await start()
      await reconnect(h, false, false)
      await turnsUntil(() => h.broker.clients['dev-1'] !== undefined)
      expect((h.broker as unknown as { delayedWills: Map<string, unknown> }).delayedWills.has('dev-1')).toBe(false)
      expect(await storedAfterKill(h)).toBeUndefined()
      expect(h.wills).toEqual([])
    })
  }
})
