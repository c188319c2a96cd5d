/**
 * Our aedes patch (patches/aedes+2.0.0-beta.1.patch) holds the packet id of each QoS 1/2 delivery aedes writes on the
 * connection (lib/client.js writeQoS; for those no persistence keeps in flight — every delivery to a clean session,
 * retained messages on SUBSCRIBE, one whose copy a full session queue dropped — it is the only holder) until the
 * PUBACK, or the PUBCOMP, reaches aedes; aedes' own take (lib/qos-packet.js) and the gateway's
 * (aedes-internals.ts nextPacketId) pass over it. Before, such an id was free the moment it was written: once the
 * counter came round (65,535 ids later, or sooner when a replay or a share member takes ids too), a second PUBLISH went
 * out with the id of one still unacknowledged [MQTT-2.2.1-3]. Each case sets the counter back onto the held id instead
 * of sending 65,535 messages (packet-id-holders.int.test.ts goes round the counter for real). A real aedes broker on
 * a TCP port, a raw client.
 */
import net, { type AddressInfo } from 'node:net'
import { Aedes, type Client } from 'aedes'
import type { Packet } from 'mqtt-packet'
import { afterEach, describe, expect, it } from 'vitest'
import { nextPacketId } from '../../../gateway/mqtt/aedes-internals.ts'
import { rawConnect, type RawClient } from '../../helpers/raw-client.ts'

const closers: Array<() => Promise<void>> = []
afterEach(async () => { for (const close of closers.splice(0).reverse()) await close() })

/** aedes' packet id counter, which it starts at random. */
type Counter = Client & { _nextId: number }

/** A broker, and the aedes client of the connection it accepted last. */
async function start (): Promise<{ broker: Aedes, connect: (clientId: string, options?: { clean?: boolean, protocolVersion?: 4 | 5 }) => Promise<{ raw: RawClient, client: Counter }> }> {
  const broker = await Aedes.createBroker()
  let last: Counter | undefined
  const server = net.createServer((socket) => { last = broker.handle(socket) as Counter })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  closers.push(async () => {
    await new Promise<void>((resolve) => broker.close(() => resolve()))
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  const url = `mqtt://127.0.0.1:${(server.address() as AddressInfo).port}`
  return {
    broker,
    async connect (clientId, { clean = true, protocolVersion = 4 } = {}) {
      const raw = await rawConnect(url, protocolVersion)
      closers.push(async () => { raw.end() })
      raw.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion, clientId, clean, keepalive: 60 })
      expect(await raw.next('connack')).toMatchObject(protocolVersion === 5 ? { reasonCode: 0 } : { returnCode: 0 })
      return { raw, client: last as Counter }
    },
  }
}

async function publish (broker: Aedes, topic: string, qos: 1 | 2, retain = false): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    broker.publish({ cmd: 'publish', topic, payload: Buffer.from(topic), qos, retain, dup: false }, (err) => {
      if (err === undefined || err === null) resolve(); else reject(err)
    })
  })
}

/** Resolves once aedes has handled every packet sent before: it handles a connection's packets in order. */
async function handled (raw: RawClient): Promise<void> {
  raw.send({ cmd: 'pingreq' })
  await raw.next('pingresp')
}

/** The id the gateway's next take gives when the counter stands at `at`. */
function takeAt (client: Counter, at: number): number {
  client._nextId = at
  return nextPacketId(client)
}

describe('aedes patch: its own deliveries that no persistence keeps hold their packet ids', () => {
  it('a QoS 1 delivery to a clean session holds its id until its PUBACK, for aedes\' next delivery and the gateway\'s takes, across the wrap', async () => {
    const { broker, connect } = await start()
    const { raw, client } = await connect('clean-1')
    raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'a', qos: 1 }] })
    await raw.next('suback')
    client._nextId = 65535
    await publish(broker, 'a', 1)
    const first = await raw.next('publish')
    expect(first.messageId).toBe(65535) // not acknowledged yet

    client._nextId = 65535 // as after 65,535 other deliveries
    await publish(broker, 'a', 1)
    const second = await raw.next('publish')
    expect(second.messageId).toBe(1)
    raw.send({ cmd: 'puback', messageId: 1 })
    await handled(raw)
    expect(takeAt(client, 65535)).toBe(1)

    raw.send({ cmd: 'puback', messageId: 65535 })
    await handled(raw)
    expect(takeAt(client, 65535)).toBe(65535)
  })

  it('a QoS 2 delivery to a clean session holds its id through PUBREC and PUBREL until its PUBCOMP', async () => {
    const { broker, connect } = await start()
    const { raw, client } = await connect('clean-2')
    raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'b', qos: 2 }] })
    await raw.next('suback')
    client._nextId = 500
    await publish(broker, 'b', 2)
    expect((await raw.next('publish')).messageId).toBe(500)
    expect(takeAt(client, 500)).toBe(501)

    raw.send({ cmd: 'pubrec', messageId: 500 })
    expect((await raw.next('pubrel')).messageId).toBe(500)
    expect(takeAt(client, 500)).toBe(501)

    raw.send({ cmd: 'pubcomp', messageId: 500 })
    await handled(raw)
    expect(takeAt(client, 500)).toBe(500)
  })

  it('an MQTT 5 PUBREC with an error reason code ends the QoS 2 flow and frees the id', async () => {
    const { broker, connect } = await start()
    const { raw, client } = await connect('clean-5', { protocolVersion: 5 })
    raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'c', qos: 2 }] })
    await raw.next('suback')
    client._nextId = 700
    await publish(broker, 'c', 2)
    expect((await raw.next('publish')).messageId).toBe(700)
    expect(takeAt(client, 700)).toBe(701)

    raw.send({ cmd: 'pubrec', messageId: 700, reasonCode: 0x80 } as Packet)
    await handled(raw)
    expect(takeAt(client, 700)).toBe(700)
  })

  it('a retained QoS 1 message sent on SUBSCRIBE to a persistent session holds its id until its PUBACK', async () => {
    const { broker, connect } = await start()
    await publish(broker, 'r', 1, true)
    const { raw, client } = await connect('persistent-r', { clean: false })
    client._nextId = 900
    raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'r', qos: 1 }] })
    const retained = await raw.next('publish')
    expect(retained).toMatchObject({ retain: true, messageId: 900 })
    expect(takeAt(client, 900)).toBe(901)

    raw.send({ cmd: 'puback', messageId: 900 })
    await handled(raw)
    expect(takeAt(client, 900)).toBe(900)
  })

  it('a client that acknowledges nothing holds at most 1,024 ids: later deliveries hold none, so a take never tries every id', async () => {
    const { broker, connect } = await start()
    const { raw, client } = await connect('never-acks')
    raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'n', qos: 1 }] })
    await raw.next('suback')
    // As after 1,023 deliveries it never acknowledged (ids 30,001 to 31,023), without sending them.
    const held = client as Counter & { _outboundInflight?: Set<number> }
    held._outboundInflight = new Set(Array.from({ length: 1023 }, (_, k) => 30001 + k))
    client._nextId = 10
    await publish(broker, 'n', 1)
    expect((await raw.next('publish')).messageId).toBe(10)
    await publish(broker, 'n', 1)
    expect((await raw.next('publish')).messageId).toBe(11)

    expect(held._outboundInflight.size).toBe(1024)
    expect(takeAt(client, 10)).toBe(11) // the 1,024th is held
    expect(takeAt(client, 11)).toBe(11) // the one past the bound is not
  })
})
