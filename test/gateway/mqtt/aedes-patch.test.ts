/**
 * Fixes the aedes patch (patches/aedes+2.0.0-beta.1.patch) makes to aedes' own behaviour, each against a real aedes
 * broker:
 * - the will sweep of a dead broker's wills runs one at a time, so a persistence whose delWill takes longer than the
 *   sweep's interval does not get a will fired twice. (aedes' suite caught it under load on the project's session
 *   persistence: "delivers old will in case of a crash", only one will delivered.)
 * - a connection that closes during its CONNECT (authorized, its session still being read) leaves the connection that
 *   holds its client id registered, is not registered itself and does not get its session's subscriptions: before, it
 *   took the live connection's registry entry, so the next CONNECT with that id did not take the live one over (two
 *   connections on one session), and it was registered closed, announced with `client` and never `clientDisconnect`.
 * - registrations of one client id take turns: a CONNECT that closed while it waited for its turn takes nothing over,
 *   and a CONNECT closed before its registration does not end the session another CONNECT of the id is resuming.
 *   (Both found by review: a half-open MQTT 5 connection, whose takeover waits for its socket to drain, kept the
 *   queue long enough for both.)
 */
import net, { type AddressInfo } from 'node:net'
import memoryPersistence from 'aedes-persistence'
import { Aedes, type Client } from 'aedes'
import mqtt from 'mqtt'
import { generate } from 'mqtt-packet'
import { afterEach, describe, expect, it, vi } from 'vitest'

/** What the test uses of aedes-persistence's memory persistence (its typings still describe the callback API). */
interface MemoryPersistence {
  setup (broker: { id: string }): Promise<void>
  subscriptionsByClient (client: { id: string }): Promise<unknown[]>
  putWill (client: { id: string }, packet: { topic: string, payload: Buffer, qos: number, retain: boolean }): Promise<void>
  delWill (client: { id: string }): Promise<unknown>
  streamWill (brokers: Record<string, number>): { toArray (): Promise<unknown[]> }
}
const memory = memoryPersistence as unknown as () => MemoryPersistence
/** aedes' emitter, which its typings do not declare. */
type WithEmitter = Aedes & {
  /** The patch's queue of CONNECTs waiting to register, by client id. */
  _registering: Map<string, Client[]>
  /** The patch's connections authenticated and not yet registered, by client id. */
  _connecting: Map<string, Set<Client>>
  mq: { on (topic: string, notify: (packet: { payload: Buffer }, cb: () => void) => void): void }
  /** aedes' registry of connected clients by id, not in its typings. */
  clients: Record<string, Client | undefined>
}

/** Waits for `done`, turn by turn of the event loop (the faked interval is not what turns it), bounded. */
async function turnsUntil (done: () => boolean | Promise<boolean>, turns = 10_000): Promise<void> {
  for (let k = 0; k < turns; k++) {
    if (await done()) return
    await new Promise((resolve) => setImmediate(resolve))
  }
  throw new Error(`not done after ${turns} turns of the event loop`)
}

afterEach(() => {
  vi.useRealTimers()
})

describe('aedes patch: the will sweep', () => {
  it('runs one sweep at a time: a will whose deletion is slow is fired once, not once per interval', async () => {
    // Only the sweep's interval is faked: aedes' own turns (setImmediate, nextTick) run for real.
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] })
    const persistence = memory()
    await persistence.setup({ id: 'another-broker' })
    await persistence.putWill({ id: 'dev-1' }, { topic: 'mywill', payload: Buffer.from('last will'), qos: 0, retain: false })
    // delWill is held until released, as a slow disk would hold it.
    const deletions: Array<() => void> = []
    const delWill = persistence.delWill.bind(persistence)
    persistence.delWill = async (client) => {
      await new Promise<void>((resolve) => deletions.push(resolve))
      return await delWill(client)
    }
    let sweeps = 0
    const streamWill = persistence.streamWill.bind(persistence)
    persistence.streamWill = (brokers) => {
      sweeps++
      return streamWill(brokers)
    }
    const heartbeatInterval = 10
    const broker = await Aedes.createBroker({ persistence: persistence as never, heartbeatInterval }) as WithEmitter
    try {
      const fired: string[] = []
      let onFired: (() => void) | undefined
      broker.mq.on('mywill', (packet, cb) => {
        fired.push(String(packet.payload))
        onFired?.()
        cb()
      })
      const firstFired = new Promise<void>((resolve) => { onFired = resolve })
      // The first sweep finds the will and fires it; its deletion is held.
      await vi.advanceTimersByTimeAsync(4 * heartbeatInterval)
      await firstFired
      await turnsUntil(() => deletions.length === 1)
      expect(sweeps).toBe(1)
      // Three more intervals while that deletion is held: no sweep starts beside it, the will is not fired again.
      for (let k = 0; k < 3; k++) await vi.advanceTimersByTimeAsync(4 * heartbeatInterval)
      expect(sweeps).toBe(1)
      expect(fired).toEqual(['last will'])
      // Deleted: the next sweep finds nothing.
      deletions.shift()?.()
      await turnsUntil(async () => (await streamWill({}).toArray()).length === 0)
      // Once the first sweep has ended, an interval sweeps again.
      await turnsUntil(async () => {
        await vi.advanceTimersByTimeAsync(4 * heartbeatInterval)
        return sweeps === 2
      }, 100)
      expect(fired).toEqual(['last will'])
    } finally {
      for (const release of deletions.splice(0)) release()
      await new Promise<void>((resolve) => broker.close(() => resolve()))
    }
  })
})

describe('aedes patch: a connection that closes during its CONNECT', () => {
  it('neither takes over the live connection of its client id nor is registered, and gets none of its subscriptions', async () => {
    const persistence = memory()
    const broker = await Aedes.createBroker({ persistence: persistence as never }) as WithEmitter
    const server = net.createServer((socket) => { broker.handle(socket) })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    const url = `mqtt://127.0.0.1:${(server.address() as AddressInfo).port}`
    const clients: mqtt.MqttClient[] = []
    try {
      const announced: Client[] = []
      broker.on('client', (client) => { announced.push(client) })
      const live = await mqtt.connectAsync(url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0 })
      clients.push(live)
      await live.subscribeAsync('cmd/dev-1', { qos: 1 })
      const liveClosed = new Promise<void>((resolve) => live.once('close', () => resolve()))

      // The second connection's session read is held; its socket closes meanwhile.
      const held: Array<{ client: Client, release: () => void }> = []
      const read = persistence.subscriptionsByClient.bind(persistence)
      persistence.subscriptionsByClient = async (client) => {
        await new Promise<void>((resolve) => held.push({ client: client as Client, release: resolve }))
        return await read(client)
      }
      const socket = net.connect((server.address() as AddressInfo).port, '127.0.0.1')
      socket.on('error', () => {})
      socket.write(generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'dev-1', clean: false, keepalive: 30 }))
      await turnsUntil(() => held.length === 1)
      const cutShort = held[0] as { client: Client, release: () => void }
      socket.destroy()
      await turnsUntil(() => cutShort.client.closed)
      persistence.subscriptionsByClient = read
      cutShort.release()
      // Its CONNECT's remaining steps, were any to run, take a few turns of the event loop with the memory persistence.
      for (let k = 0; k < 50; k++) await new Promise((resolve) => setImmediate(resolve))

      expect(broker.clients['dev-1']).toBe(announced[0])
      expect(announced).toHaveLength(1)
      expect(broker.connectedClients).toBe(1)
      expect(Object.keys((cutShort.client as unknown as { subscriptions: object }).subscriptions)).toEqual([])
      // The live connection still gets its messages, and the next CONNECT with the id takes it over.
      const got = new Promise<string>((resolve) => live.once('message', (_topic, payload) => resolve(payload.toString())))
      await new Promise<void>((resolve) => broker.publish({ cmd: 'publish', topic: 'cmd/dev-1', payload: Buffer.from('on'), qos: 1, retain: false, dup: false }, () => resolve()))
      expect(await got).toBe('on')
      const next = await mqtt.connectAsync(url, { clientId: 'dev-1', clean: false, reconnectPeriod: 0 })
      clients.push(next)
      await liveClosed
      expect(broker.clients['dev-1']).toBe(announced[1])
      expect(broker.connectedClients).toBe(1)
    } finally {
      for (const c of clients) c.end(true)
      await new Promise<void>((resolve) => broker.close(() => resolve()))
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  })
})

/** A real aedes broker on a loopback port, with `persistence`. */
async function brokerOn (persistence: MemoryPersistence): Promise<{ broker: WithEmitter, server: net.Server, port: number, url: string }> {
  const broker = await Aedes.createBroker({ persistence: persistence as never }) as WithEmitter
  const server = net.createServer((socket) => { broker.handle(socket) })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  return { broker, server, port, url: `mqtt://127.0.0.1:${port}` }
}

async function turns (n: number): Promise<void> {
  for (let k = 0; k < n; k++) await new Promise((resolve) => setImmediate(resolve))
}

describe('aedes patch: registrations of one client id take turns', () => {
  it('a CONNECT that closed while it waited for its turn takes nothing over from the newer connection registered first', async () => {
    const persistence = memory()
    const { broker, server, port, url } = await brokerOn(persistence)
    const clients: mqtt.MqttClient[] = []
    try {
      // A: an MQTT 5 device that stopped reading, its socket's buffer full: the DISCONNECT 0x8E of a takeover waits
      // for a drain (aedes' drainTimeout, 60 s by default).
      const a = net.connect(port, '127.0.0.1')
      a.on('error', () => {})
      a.write(generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: 'dev-1', clean: false, keepalive: 0, properties: { sessionExpiryInterval: 300 } }, { protocolVersion: 5 }))
      await turnsUntil(() => broker.clients['dev-1'] !== undefined)
      const serverA = broker.clients['dev-1'] as Client
      const subscribed = new Promise<void>((resolve) => broker.once('subscribe', () => resolve()))
      a.write(generate({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'big/#', qos: 0 }] } as never, { protocolVersion: 5 }))
      await subscribed
      a.pause()
      const conn = (serverA as unknown as { conn: net.Socket }).conn
      for (let k = 0; k < 400 && !conn.writableNeedDrain; k++) {
        broker.publish({ cmd: 'publish', topic: 'big/x', payload: Buffer.alloc(256 * 1024), qos: 0, retain: false, dup: false }, () => {})
        await turns(2)
      }
      expect(conn.writableNeedDrain).toBe(true)

      const connacked: Client[] = []
      broker.on('connackSent', (_packet, client) => { connacked.push(client) })
      // B takes A over; the takeover waits on A's drain.
      const b = await mqtt.connectAsync(url, { clientId: 'dev-1', clean: false, protocolVersion: 5, properties: { sessionExpiryInterval: 300 }, reconnectPeriod: 0 })
      clients.push(b)
      await turnsUntil(() => connacked.length === 1)
      const serverB = connacked[0] as Client
      const disconnects: number[] = []
      b.on('disconnect', (packet) => { disconnects.push(packet.reasonCode ?? -1) })
      // C, MQTT 5 with Session Expiry 0, waits behind B for its turn, and closes meanwhile.
      const c = mqtt.connect(url, { clientId: 'dev-1', clean: false, protocolVersion: 5, reconnectPeriod: 0 })
      c.on('error', () => {})
      await turnsUntil(() => broker._registering.get('dev-1')?.length === 1)
      const serverC = broker._registering.get('dev-1')?.[0] as Client
      expect(connacked).toEqual([serverB]) // C's CONNACK waits for its turn
      c.end(true)
      await turnsUntil(() => serverC.closed)

      // A's socket goes: B is registered, then C's turn comes.
      a.destroy()
      await turnsUntil(() => broker._registering.get('dev-1') === undefined)
      expect(disconnects).toEqual([])
      expect(serverB.closed).toBe(false)
      expect(broker.clients['dev-1']).toBe(serverB)
      expect(broker.connectedClients).toBe(1)
      expect(await persistence.subscriptionsByClient({ id: 'dev-1' })).toHaveLength(1)
    } finally {
      for (const c of clients) c.end(true)
      await new Promise<void>((resolve) => broker.close(() => resolve()))
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  })

  it('a CONNECT closed before its registration does not end the session a later CONNECT of the id is resuming', async () => {
    const persistence = memory()
    const { broker, server, port, url } = await brokerOn(persistence)
    const clients: mqtt.MqttClient[] = []
    try {
      const s = await mqtt.connectAsync(url, { clientId: 'dev-1', clean: false, protocolVersion: 5, properties: { sessionExpiryInterval: 300 }, reconnectPeriod: 0 })
      await s.subscribeAsync('cmd/dev-1', { qos: 1 })
      await s.endAsync()
      await turnsUntil(() => broker.clients['dev-1'] === undefined)
      expect(await persistence.subscriptionsByClient({ id: 'dev-1' })).toHaveLength(1)

      // Each CONNECT's session read is held once it has read.
      const held: Array<{ client: Client, release: () => void }> = []
      const read = persistence.subscriptionsByClient.bind(persistence)
      persistence.subscriptionsByClient = async (client) => {
        const subs = await read(client)
        await new Promise<void>((resolve) => held.push({ client: client as Client, release: resolve }))
        return subs
      }
      // X (MQTT 5, Session Expiry 0: its session ends with its connection), then Y (Session Expiry 300).
      const x = net.connect(port, '127.0.0.1')
      x.on('error', () => {})
      x.write(generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: 'dev-1', clean: false, keepalive: 30 }, { protocolVersion: 5 }))
      await turnsUntil(() => held.length === 1)
      const yConnack = new Promise<boolean>((resolve, reject) => {
        const y = mqtt.connect(url, { clientId: 'dev-1', clean: false, protocolVersion: 5, properties: { sessionExpiryInterval: 300 }, reconnectPeriod: 0 })
        clients.push(y)
        y.once('connect', (connack) => resolve(connack.sessionPresent))
        y.once('error', reject)
      })
      await turnsUntil(() => held.length === 2)
      x.destroy()
      await turnsUntil(() => (held[0] as { client: Client }).client.closed)
      persistence.subscriptionsByClient = read
      held[0]?.release()
      held[1]?.release()
      expect(await yConnack).toBe(true)
      await turnsUntil(() => broker.clients['dev-1'] !== undefined)
      expect(await persistence.subscriptionsByClient({ id: 'dev-1' })).toHaveLength(1)
    } finally {
      for (const c of clients) c.end(true)
      await new Promise<void>((resolve) => broker.close(() => resolve()))
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  })
})

describe('aedes patch: a CONNECT that fails', () => {
  it('is no longer counted as connecting: it keeps no session alive and is not kept in memory', async () => {
    const persistence = memory()
    const { broker, server, url } = await brokerOn(persistence)
    try {
      // The session read fails (as the gateway's markSession write fails on a full disk).
      persistence.subscriptionsByClient = async () => { throw new Error('disk full') }
      const failed = new Promise<Client>((resolve) => broker.once('clientError', (client) => { resolve(client) }))
      const c = mqtt.connect(url, { clientId: 'dev-1', clean: false, protocolVersion: 5, reconnectPeriod: 0 })
      c.on('error', () => {})
      const client = await failed
      await turnsUntil(() => client.closed)
      c.end(true)
      expect(broker._connecting.get('dev-1')).toBeUndefined()
    } finally {
      await new Promise<void>((resolve) => broker.close(() => resolve()))
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  })
})
