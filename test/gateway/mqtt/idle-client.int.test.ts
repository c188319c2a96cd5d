/**
 * slimClient (aedes-internals.ts) swaps parts of each aedes client for cheaper ones to make idle connections
 * lighter (issue 13). These tests run a real aedes broker on a TCP port, as listeners.ts wires it, and check that
 * the client still does all it did: packets split anywhere across reads and a packet larger than a read parse as
 * before, the parser stops holding the CONNECT (and its password) but keeps its protocol version (forgetConnectPacket,
 * which the gateway calls from preConnect), and the inbound
 * QoS 2 bound aedes keeps per client (maxInflightInbound) still closes a client that withholds PUBRELs, and the
 * shared functions that replace aedes' bound listeners still turn a parse error, a reset and a half-close into the
 * broker's events. Subscriptions and the event tables of the client and its parser are copied into fast-mode objects
 * that inherit no key: filters named like Object.prototype's members still subscribe and unsubscribe.
 */
import net, { type AddressInfo } from 'node:net'
import { Aedes } from 'aedes'
import { BufferList } from 'bl'
import { afterEach, describe, expect, it } from 'vitest'
import { forgetConnectPacket, slimClient } from '../../../gateway/mqtt/aedes-internals.ts'
import { connectPacket, packet, publishPacket, RawConnection, str, subscribePacket, u16, unsubscribePacket } from '../../helpers/raw-mqtt.ts'

interface Running { readonly url: string, readonly broker: Aedes, readonly clients: object[], close (): Promise<void> }

const running: Running[] = []

async function start (options: { maxInflightInbound?: number } = {}): Promise<Running> {
  // As the gateway wires it: slimClient after handle, forgetConnectPacket in preConnect (hooks/authenticate.ts).
  const broker = await Aedes.createBroker({ ...options, preConnect: (client, packet, done) => { forgetConnectPacket(client, packet); done(null, true) } })
  const clients: object[] = []
  const server = net.createServer((socket) => {
    const client = broker.handle(socket)
    slimClient(client)
    clients.push(client)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  const r: Running = {
    url: `mqtt://127.0.0.1:${port}`,
    broker,
    clients,
    close: async () => {
      await new Promise<void>((resolve) => broker.close(() => resolve()))
      await new Promise<void>((resolve) => server.close(() => resolve()))
    },
  }
  running.push(r)
  return r
}

afterEach(async () => {
  for (const r of running.splice(0)) await r.close()
})

/** Writes `bytes` one byte per write, each after the previous one was flushed. */
async function bytewise (conn: RawConnection, bytes: Buffer): Promise<void> {
  for (const b of bytes) {
    await new Promise<void>((resolve) => conn.socket.write(Buffer.from([b]), () => resolve()))
  }
}

describe('slimClient', () => {
  it('keeps parsing packets split across reads, and one larger than a read, after the swap', async () => {
    const r = await start()
    const sub = await RawConnection.open(r.url)
    sub.send(Buffer.concat([connectPacket({ clientId: 'sub' }), subscribePacket(1, ['t/#'], 1)]))
    expect(await sub.next('suback')).toBeDefined()

    const pub = await RawConnection.open(r.url)
    await bytewise(pub, Buffer.concat([connectPacket({ clientId: 'pub', username: 'u', password: 'secret' }), publishPacket('t/a', 'one', 1, 7)]))
    expect((await pub.next('puback'))?.messageId).toBe(7)
    const first = await sub.next('publish')
    expect(first?.cmd === 'publish' && first.topic === 't/a' && first.payload.toString()).toBe('one')

    sub.packets.length = 0
    const big = Buffer.alloc(300 * 1024, 0x5a) // many socket reads
    pub.send(publishPacket('t/b', big, 1, 8))
    const second = await sub.next('publish', 10_000)
    expect(second?.cmd === 'publish' && second.topic === 't/b' && Buffer.from(second.payload).equals(big)).toBe(true)
    pub.destroy()
    sub.destroy()
  })

  it('leaves the parser a plain BufferList, and the protocol version of the CONNECT without the packet', async () => {
    const r = await start()
    const conn = await RawConnection.open(r.url)
    conn.send(connectPacket({ clientId: 'dev', username: 'u', password: 'secret' }))
    const connack = await conn.next('connack')
    expect(connack?.cmd === 'connack' && connack.returnCode).toBe(0)
    const parser = (r.clients[0] as { _parser: { _list: unknown, settings: Record<string, unknown> } })._parser
    expect(parser._list).toBeInstanceOf(BufferList)
    expect(parser.settings).toEqual({ protocolVersion: 4, bridgeMode: undefined })
    conn.destroy()
  })

  it('keeps duplicates without inherited keys, and topic aliases made on first use', () => {
    const client = { duplicates: Object.create(null) as object, _topicAliases: new Map() }
    slimClient(client as never)
    const duplicates = client.duplicates as Record<string, number | undefined>
    expect(duplicates.constructor).toBeUndefined()
    expect('toString' in duplicates).toBe(false)
    duplicates.__proto__ = 1
    expect(Object.keys(duplicates)).toEqual(['__proto__'])
    const aliases = client._topicAliases as unknown as { get (a: number): string | undefined, set (a: number, t: string): unknown }
    expect(aliases).not.toBeInstanceOf(Map)
    expect(aliases.get(1)).toBeUndefined()
    aliases.set(1, 'a/b')
    expect(aliases.get(1)).toBe('a/b')
  })

  it('subscribes and unsubscribes filters named like inherited members, and keeps listening, after the swap of its tables', async () => {
    const r = await start()
    const conn = await RawConnection.open(r.url)
    const filters = ['constructor', 'toString', 'hasOwnProperty']
    // CONNECT and SUBSCRIBE in one write: the SUBSCRIBE waits in aedes' queue until the CONNACK (Client._connected).
    conn.send(Buffer.concat([connectPacket({ clientId: 'names' }), subscribePacket(1, filters, 1)]))
    const suback = await conn.next('suback')
    expect(suback?.cmd === 'suback' && suback.granted).toEqual([1, 1, 1])
    // Alone: aedes refuses `__proto__` beside other filters in one SUBSCRIBE ("empty topic"), with or without slimClient.
    conn.packets.length = 0
    conn.send(subscribePacket(4, ['__proto__'], 1))
    const single = await conn.next('suback')
    expect(single?.cmd === 'suback' && single.granted).toEqual([1])
    filters.push('__proto__')
    const client = r.clients[0] as { subscriptions: object, _events: object, _parser: { _events: object } }
    expect(Object.keys(client.subscriptions).sort()).toEqual([...filters].sort())
    for (const table of [client.subscriptions, client._events, client._parser._events]) expect(Object.getPrototypeOf(Object.getPrototypeOf(table))).toBeNull()
    conn.packets.length = 0
    conn.send(publishPacket('constructor', 'c', 1, 2))
    const delivered = await conn.next('publish')
    expect(delivered?.cmd === 'publish' && delivered.topic === 'constructor' && delivered.payload.toString()).toBe('c')
    conn.send(unsubscribePacket(3, filters.slice(0, 3)))
    expect(await conn.next('unsuback')).toBeDefined()
    conn.packets.length = 0
    conn.send(unsubscribePacket(5, ['__proto__']))
    expect(await conn.next('unsuback')).toBeDefined()
    expect(Object.keys(client.subscriptions)).toEqual([])
    conn.destroy()
  })

  it('turns a parse error, a connection reset and a half-close into the broker events aedes emits for them', async () => {
    const r = await start()
    const events: string[] = []
    r.broker.on('connectionError', (_c, err) => events.push(`connectionError ${err.message}`))
    r.broker.on('clientError', (c, err) => events.push(`clientError ${c.id} ${(err as NodeJS.ErrnoException).code}`))
    r.broker.on('clientDisconnect', (c) => events.push(`clientDisconnect ${c.id}`))

    const bad = await RawConnection.open(r.url)
    bad.send(packet(0x10, Buffer.concat([str('XXXX'), Buffer.from([4, 2, 0, 30]), str('bad')]))) // CONNECT with a wrong protocol name
    expect(await bad.waitClosed()).toBe(true)
    const client = r.clients[0] as { conn: NodeJS.EventEmitter, _parser: NodeJS.EventEmitter }
    for (const fn of [client.conn.listeners('error')[0], client.conn.listeners('end')[0], client._parser.listeners('error')[0]]) {
      expect((fn as () => void).name).not.toMatch(/^bound /)
    }
    expect(events[0]).toMatch(/^connectionError .*protocol/i)

    const reset = await RawConnection.open(r.url)
    reset.send(connectPacket({ clientId: 'reset' }))
    expect(await reset.next('connack')).toBeDefined()
    reset.socket.resetAndDestroy()
    const half = await RawConnection.open(r.url)
    half.send(connectPacket({ clientId: 'half' }))
    expect(await half.next('connack')).toBeDefined()
    half.socket.end()
    expect(await half.waitClosed()).toBe(true)
    const deadline = performance.now() + 5000
    while (!(events.includes('clientError reset ECONNRESET') && events.includes('clientDisconnect half')) && performance.now() < deadline) {
      await new Promise((resolve) => setImmediate(resolve))
    }
    expect(events).toContain('clientError reset ECONNRESET')
    expect(events).toContain('clientDisconnect half')
  })

  it('still closes a client over maxInflightInbound QoS 2 messages awaiting PUBREL, and completes those under it', async () => {
    const r = await start({ maxInflightInbound: 2 })
    const conn = await RawConnection.open(r.url)
    conn.send(Buffer.concat([connectPacket({ clientId: 'q2' }), publishPacket('t/q', 'x', 2, 1)]))
    expect((await conn.next('pubrec'))?.messageId).toBe(1)
    conn.send(packet(0x62, u16(1))) // PUBREL 1
    expect((await conn.next('pubcomp'))?.messageId).toBe(1)
    for (const id of [2, 3]) { // two ids awaiting PUBREL: at the bound, not over it
      conn.packets.length = 0
      conn.send(publishPacket('t/q', 'x', 2, id))
      expect((await conn.next('pubrec'))?.messageId).toBe(id)
    }
    conn.send(publishPacket('t/q', 'x', 2, 4)) // a third one
    expect(await conn.waitClosed()).toBe(true)
  })
})
