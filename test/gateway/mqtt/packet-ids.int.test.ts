/**
 * skipHeldPacketIds (aedes-internals.ts): aedes writes retained messages on SUBSCRIBE (and every delivery to a clean
 * session) with the id it takes from the client's counter, without asking the session persistence, so the counter
 * itself must skip the ids persistent sessions' deliveries from the log hold (sessions/cursors.ts), also where it
 * wraps from 65,535 to 1. A real aedes broker on a TCP port, a raw client.
 */
import net, { type AddressInfo } from 'node:net'
import { Aedes, type Client } from 'aedes'
import { afterEach, describe, expect, it } from 'vitest'
import { nextPacketId, releaseHeldPacketIds, skipHeldPacketIds } from '../../../gateway/mqtt/aedes-internals.ts'
import { connectPacket, RawConnection, subscribePacket, waitUntil } from '../../helpers/raw-mqtt.ts'

const closers: Array<() => Promise<void>> = []
/** The test's holder of packet ids. */
const HOLDER = {}
afterEach(async () => { for (const close of closers.splice(0).reverse()) await close() })

/** A broker whose clients' counters stand at `start` and skip `held`. */
async function start (start: number, held: ReadonlySet<number>): Promise<{ url: string, broker: Aedes }> {
  const broker = await Aedes.createBroker()
  const server = net.createServer((socket) => {
    const client: Client = broker.handle(socket)
    ;(client as unknown as { _nextId: number })._nextId = start // aedes starts it at random
    skipHeldPacketIds(client, HOLDER, (id) => held.has(id))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  closers.push(async () => {
    await new Promise<void>((resolve) => broker.close(() => resolve()))
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  return { url: `mqtt://127.0.0.1:${(server.address() as AddressInfo).port}`, broker }
}

describe('skipHeldPacketIds', () => {
  it('keeps aedes\' retained QoS 1 deliveries off held packet ids, across the wrap from 65,535 to 1', async () => {
    const held = new Set([65534, 65535, 1, 3])
    const { url, broker } = await start(65533, held)
    for (let i = 0; i < 4; i++) {
      await new Promise<void>((resolve, reject) => {
        broker.publish({ cmd: 'publish', topic: `r/${i}`, payload: Buffer.from(`v${i}`), qos: 1, retain: true, dup: false }, (err) => {
          if (err === undefined || err === null) resolve(); else reject(err)
        })
      })
    }
    const sub = await RawConnection.open(url)
    closers.push(async () => { sub.destroy() })
    sub.send(Buffer.concat([connectPacket({ clientId: 'sub' }), subscribePacket(1, ['r/#'], 1)]))
    expect(await sub.next('suback')).toBeDefined()
    expect(await waitUntil(() => sub.packets.filter((p) => p.cmd === 'publish').length === 4, 10_000)).toBe(true)
    const ids = sub.packets.flatMap((p) => p.cmd === 'publish' && p.retain ? [p.messageId as number] : [])
    expect(ids).toEqual([65533, 2, 4, 5])
  })

  it('is what nextPacketId (replays, shares, cursors) reads too, and skips what every holder holds', async () => {
    const counter = { _nextId: 6 }
    const client = counter as unknown as Client
    const cursors = {}
    const replay = {}
    skipHeldPacketIds(client, cursors, (id) => id === 7)
    skipHeldPacketIds(client, replay, (id) => id === 9)
    expect([nextPacketId(client), nextPacketId(client), nextPacketId(client)]).toEqual([6, 8, 10])
    skipHeldPacketIds(client, cursors, (id) => id === 11) // a holder's later predicate replaces its earlier one
    counter._nextId = 7
    expect([nextPacketId(client), nextPacketId(client), nextPacketId(client), nextPacketId(client)]).toEqual([7, 8, 10, 12])
    releaseHeldPacketIds(client, replay)
    counter._nextId = 9
    expect(nextPacketId(client)).toBe(9)
  })
})
