/**
 * A QoS 2 PUBLISH whose PUBREC never reached the device because the gateway
 * was killed (kill -9): the device sends it again with DUP after the restart,
 * and the gateway finds its inbound entry (inbound-qos2.ts). Persistent
 * subscribers on the routed topic get the message exactly once across the
 * crash and the retransmission: one reading the partition through a cursor
 * (QoS 1 subscription) from the log, one keeping copies (QoS 2
 * subscription) from its queue.
 *
 * The kill comes once the PUBREC has arrived and the device acts as if it had
 * not: the gateway's state is the one of a kill before the PUBREC was sent,
 * with the append and the delivery done.
 */
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import type { Packet } from 'mqtt-packet'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { rawConnect, type RawClient } from '../../helpers/raw-client.ts'
import { cbor, keys, TAG_CURSOR, TAG_INCOMING, TAG_OUTGOING } from '../../../gateway/mqtt/sessions/format.ts'

const TOPIC = 'devices/q2r/telemetry/x'
const FILTER = 'devices/+/telemetry/#'
/** A topic no route logs: every persistent session keeps copies of its messages. */
const MARKER = 'q2r/marker'
/** A deadline for each awaited packet (a loaded machine restarts the gateway slowly), not a wait. */
const DEADLINE_MS = 60_000

async function connect (url: string, clientId: string): Promise<RawClient> {
  const c = await rawConnect(url)
  c.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId, clean: false, keepalive: 60 })
  expect(await c.next('connack', DEADLINE_MS)).toMatchObject({ returnCode: 0 })
  return c
}

/** The persistent session connects, subscribes (each filter granted at its QoS) and goes offline. */
async function subscribeAndLeave (url: string, clientId: string, subscriptions: Array<{ topic: string, qos: 1 | 2 }>): Promise<void> {
  const c = await connect(url, clientId)
  c.send({ cmd: 'subscribe', messageId: 1, subscriptions })
  expect(await c.next('suback', DEADLINE_MS)).toMatchObject({ granted: subscriptions.map((sub) => sub.qos) })
  c.send({ cmd: 'disconnect' })
  await c.closed
}

/** A persistent session subscribed to the device's topics at `qos` (and to the marker), then offline. */
async function subscribeOffline (url: string, clientId: string, qos: 1 | 2): Promise<void> {
  await subscribeAndLeave(url, clientId, [{ topic: FILTER, qos }, { topic: MARKER, qos: 1 }])
}

function publish (payload: string, qos: 1 | 2, messageId: number, dup = false): Packet {
  return { cmd: 'publish', topic: TOPIC, payload: Buffer.from(payload), qos, messageId, dup, retain: false }
}

/** A QoS 1 message from another device, on the same topic (m1's partition), acknowledged. */
async function sendQos1 (url: string, clientId: string, payload: string): Promise<void> {
  const c = await connect(url, clientId)
  c.send(publish(payload, 1, 1))
  expect(await c.next('puback', DEADLINE_MS)).toMatchObject({ messageId: 1 })
  c.end()
}

/** Runs `edit` on the sessions sublevel of the (stopped) gateway's database. */
async function editSessions<T> (dataDir: string, edit: (sessions: ClassicLevel<Buffer, Buffer>) => Promise<T>): Promise<T> {
  const root = new ClassicLevel<Buffer, Buffer>(path.join(dataDir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await root.open()
  try {
    return await edit(root.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as ClassicLevel<Buffer, Buffer>)
  } finally {
    await root.close()
  }
}

/** Sets the session's cursors (its `K` values) to `next`, or deletes them; resolves with how many there were. */
async function setCursor (dataDir: string, clientId: string, next: number | undefined): Promise<number> {
  return await editSessions(dataDir, async (sessions) => {
    let changed = 0
    for await (const [key] of sessions.iterator({ gte: Buffer.from([TAG_CURSOR]), lt: Buffer.from([TAG_CURSOR + 1]) })) {
      if (keys.parseClient(key).clientId !== clientId) continue
      if (next === undefined) await sessions.del(key)
      else {
        const value = Buffer.alloc(8)
        value.writeBigUInt64BE(BigInt(next))
        await sessions.put(key, value)
      }
      changed++
    }
    return changed
  })
}

/** The state of a kill before a copy's write: the session's queued copies gone, the inbound entries not marked delivered. */
async function unqueue (dataDir: string, clientId: string): Promise<number> {
  return await editSessions(dataDir, async (sessions) => {
    let changed = 0
    for await (const [key] of sessions.iterator({ gte: Buffer.from([TAG_OUTGOING]), lt: Buffer.from([TAG_OUTGOING + 1]) })) {
      if (keys.parseClient(key).clientId === clientId) { await sessions.del(key); changed++ }
    }
    for await (const [key, value] of sessions.iterator({ gte: Buffer.from([TAG_INCOMING]), lt: Buffer.from([TAG_INCOMING + 1]) })) {
      const entry = cbor.decode(value) as Record<string, unknown>
      if (entry.edgemqDelivered !== true) continue
      delete entry.edgemqDelivered
      await sessions.put(key, cbor.encode(entry))
      changed++
    }
    return changed
  })
}

/** A whole QoS 2 exchange of the device: PUBLISH, PUBREC, PUBREL, PUBCOMP. */
async function exchangeQos2 (c: RawClient, packet: Packet & { messageId: number }): Promise<void> {
  c.send(packet)
  expect(await c.next('pubrec', DEADLINE_MS)).toMatchObject({ messageId: packet.messageId })
  c.send({ cmd: 'pubrel', messageId: packet.messageId })
  expect(await c.next('pubcomp', DEADLINE_MS)).toMatchObject({ messageId: packet.messageId })
}

/**
 * Resumes the persistent session and takes its messages (acknowledging each at its QoS) until both ends have
 * arrived, which the device sent after everything else: `end` on the logged topic (last of the partition, read from a
 * cursor or queued as a copy) and `marker` on the unrouted one (last of the session's queue of copies). Each of the
 * two paths delivers in the order it was filled, but they interleave.
 */
async function receiveAll (url: string, clientId: string): Promise<string[]> {
  const session = await resume(url, clientId)
  await session.until(['end', 'marker'])
  session.end()
  return session.received
}

/** A resumed persistent session that acknowledges what it gets, at its QoS; `until` resolves once it has had each of `payloads`. */
async function resume (url: string, clientId: string): Promise<{ received: string[], until (payloads: string[]): Promise<void>, end (): void }> {
  const c = await rawConnect(url)
  const received: string[] = []
  const waiting: Array<{ payloads: string[], resolve: () => void }> = []
  let closed = false
  const check = (): void => {
    for (const w of waiting.splice(0)) {
      if (w.payloads.every((m) => received.includes(m))) w.resolve()
      else waiting.push(w)
    }
  }
  c.onPacket((p) => {
    if (p.cmd === 'pubrel') c.send({ cmd: 'pubcomp', messageId: p.messageId })
    if (p.cmd !== 'publish') return
    if (p.qos === 1) c.send({ cmd: 'puback', messageId: p.messageId })
    // A QoS 2 delivery is counted at its PUBLISH; its PUBREL comes once the PUBREC is in.
    if (p.qos === 2) c.send({ cmd: 'pubrec', messageId: p.messageId })
    received.push(p.payload.toString())
    check()
  })
  void c.closed.then(() => { closed = true })
  c.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId, clean: false, keepalive: 60 })
  expect(await c.next('connack', DEADLINE_MS)).toMatchObject({ returnCode: 0 })
  return {
    received,
    until: (payloads) => Promise.race([
      new Promise<void>((resolve) => { waiting.push({ payloads, resolve }); check() }),
      c.closed.then(() => { throw new Error(`${clientId} closed before ${JSON.stringify(payloads)} arrived, after ${JSON.stringify(received)}`) }),
    ]),
    end: () => { if (!closed) c.end() },
  }
}

/** Resolves once the session's cursors have committed up to the log's end (GET /v1/sessions), with a deadline. */
async function caughtUp (httpUrl: string, clientId: string): Promise<void> {
  const until = Date.now() + DEADLINE_MS
  for (;;) {
    const body = await (await fetch(`${httpUrl}/v1/sessions`)).json() as { sessions: Array<{ clientId: string, cursors: Array<{ lagMessages: number }> }> }
    const cursors = body.sessions.find((x) => x.clientId === clientId)?.cursors ?? []
    if (cursors.length > 0 && cursors.every((c) => c.lagMessages === 0)) return
    if (Date.now() > until) throw new Error(`${clientId} did not catch up: ${JSON.stringify(body)}`)
    // Each GET is a turn of the gateway's event loop; the cursor's write lands after a few.
    await new Promise((resolve) => setImmediate(resolve))
  }
}

/**
 * The device sends `m1` at QoS 2, the gateway is killed once its PUBREC is in (after `beforeKill`), and the device
 * sends it again after the restart (after `meanwhile`, given the restarted gateway).
 */
async function crashAndRetransmit (dir: string, gw: GatewayProcess, meanwhile?: (restarted: GatewayProcess) => Promise<void>,
  beforeKill?: () => Promise<void>): Promise<GatewayProcess> {
  const device = await connect(gw.mqttUrl, 'q2r-dev')
  device.send(publish('m1', 2, 7))
  expect(await device.next('pubrec', DEADLINE_MS)).toMatchObject({ messageId: 7 })
  await beforeKill?.()
  await gw.kill()
  device.end()
  const restarted = await startGatewayProcess({ dataDir: dir })
  await meanwhile?.(restarted)
  const again = await connect(restarted.mqttUrl, 'q2r-dev')
  await exchangeQos2(again, { ...publish('m1', 2, 7, true), messageId: 7 })
  // Sent after m1 on the same topic (so the same partition), at QoS 2 (a copy for a QoS 2 session, a cursor read for a QoS 1 one).
  await exchangeQos2(again, { ...publish('end', 2, 8), messageId: 8 })
  again.send({ cmd: 'publish', topic: MARKER, payload: Buffer.from('marker'), qos: 1, messageId: 9, dup: false, retain: false })
  expect(await again.next('puback', DEADLINE_MS)).toMatchObject({ messageId: 9 })
  again.end()
  return restarted
}

describe('a QoS 2 retransmission after kill -9', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  /** A fresh data directory, removed after the tests. */
  const freshDir = async (): Promise<string> => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    return dir
  }

  /**
   * A gateway on `dir` with persistent QoS 1 sessions `clientIds`, offline, whose cursors into the device's partition
   * exist before m1 (their first message there, `warm`, created them). The caller kills it (or the gateway it restarts).
   */
  const withWarmCursor = async (dir: string, ...clientIds: string[]): Promise<GatewayProcess> => {
    const gw = await startGatewayProcess({ dataDir: dir })
    for (const id of clientIds) await subscribeOffline(gw.mqttUrl, id, 1)
    const device = await connect(gw.mqttUrl, 'q2r-dev')
    device.send(publish('warm', 1, 1))
    expect(await device.next('puback', DEADLINE_MS)).toMatchObject({ messageId: 1 })
    device.end()
    return gw
  }

  /** A new persistent session q2r-above whose cursor into m1's partition starts above m1: at a record logged after its SUBSCRIBE. */
  const sessionAbove = async (gw: GatewayProcess): Promise<void> => {
    await subscribeOffline(gw.mqttUrl, 'q2r-above', 1)
    const other = await connect(gw.mqttUrl, 'q2r-other')
    other.send(publish('above', 1, 1))
    expect(await other.next('puback', DEADLINE_MS)).toMatchObject({ messageId: 1 })
    other.end()
  }

  it('is read once from the log by a persistent QoS 1 subscriber (cursor), not queued again beside it', async () => {
    const dir = await freshDir()
    let gw = await withWarmCursor(dir, 'q2r-cursor')
    cleanups.push(() => gw.kill())

    gw = await crashAndRetransmit(dir, gw)

    expect((await receiveAll(gw.mqttUrl, 'q2r-cursor')).sort()).toEqual(['end', 'm1', 'marker', 'warm'])
  })

  it('is not queued again for a QoS 1 subscriber that read it from the log after the restart, before the retransmission', async () => {
    const dir = await freshDir()
    let gw = await withWarmCursor(dir, 'q2r-cursor')
    cleanups.push(() => gw.kill())

    // The session reconnects first and reads m1 from its cursor, which moves past it, then the device sends m1 again.
    let session: Awaited<ReturnType<typeof resume>> | undefined
    gw = await crashAndRetransmit(dir, gw, async (restarted) => {
      session = await resume(restarted.mqttUrl, 'q2r-cursor')
      await session.until(['m1'])
      await caughtUp(restarted.httpUrl, 'q2r-cursor')
    })
    const connected = session as NonNullable<typeof session>
    await connected.until(['end', 'marker'])
    connected.end()
    expect([...connected.received].sort()).toEqual(['end', 'm1', 'marker', 'warm'])
  })

  it('reaches a persistent QoS 2 subscriber (copies) and a QoS 1 one (cursor) once each', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    await subscribeOffline(gw.mqttUrl, 'q2r-copies', 2)
    await subscribeOffline(gw.mqttUrl, 'q2r-cursor', 1)

    gw = await crashAndRetransmit(dir, gw)

    expect((await receiveAll(gw.mqttUrl, 'q2r-copies')).sort()).toEqual(['end', 'm1', 'marker'])
    expect((await receiveAll(gw.mqttUrl, 'q2r-cursor')).sort()).toEqual(['end', 'm1', 'marker'])
  })

  it('reaches a QoS 1 subscriber that read it from the log before the crash again (a duplicate allowed, never a loss)', async () => {
    const dir = await freshDir()
    let gw = await withWarmCursor(dir, 'q2r-before', 'q2r-cursor')
    cleanups.push(() => gw.kill())
    const killed = gw
    let before: Awaited<ReturnType<typeof resume>> | undefined
    // q2r-before reads m1 from the log and its cursor commits past it before the kill; q2r-cursor stays offline.
    gw = await crashAndRetransmit(dir, gw, undefined, async () => {
      before = await resume(killed.mqttUrl, 'q2r-before')
      await before.until(['warm', 'm1'])
      await caughtUp(killed.httpUrl, 'q2r-before')
    })
    const first = (before as NonNullable<typeof before>).received
    const after = await receiveAll(gw.mqttUrl, 'q2r-before')
    // Its cursor, loaded past m1, cannot tell that from one created above m1 while m1's delivery was cut short (the
    // cases below): m1 comes again as a copy.
    expect([...new Set([...first, ...after])].sort()).toEqual(['end', 'm1', 'marker', 'warm'])
    expect((await receiveAll(gw.mqttUrl, 'q2r-cursor')).sort()).toEqual(['end', 'm1', 'marker', 'warm'])
  })

  it('reaches a session whose cursor was created above it while its delivery was cut short by the kill', async () => {
    const dir = await freshDir()
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    await subscribeOffline(gw.mqttUrl, 'q2r-lost', 1)
    const killed = gw
    gw = await crashAndRetransmit(dir, gw, undefined, async () => {
      await sendQos1(killed.mqttUrl, 'q2r-other', 'above')
      // 'above' (offset 1) created the cursor at 1 and m1 (offset 0) was to be a copy: the kill came before the copy's
      // write. That window is too short to hit with a real kill, so the session's cursor is set to what it leaves.
      await killed.kill()
      expect(await setCursor(dir, 'q2r-lost', 1)).toBe(1)
    })
    expect((await receiveAll(gw.mqttUrl, 'q2r-lost')).sort()).toEqual(['above', 'end', 'm1', 'marker'])
  })

  it('reaches a session whose cursor was created above it after a restart, the device back after a second one', async () => {
    const dir = await freshDir()
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    await subscribeOffline(gw.mqttUrl, 'q2r-lost', 1)
    const device = await connect(gw.mqttUrl, 'q2r-dev')
    device.send(publish('m1', 2, 7))
    expect(await device.next('pubrec', DEADLINE_MS)).toMatchObject({ messageId: 7 })
    await gw.kill()
    device.end()
    // Killed between m1's append (record and inbound entry) and its delivery's cursor write: the session has no cursor.
    expect(await setCursor(dir, 'q2r-lost', undefined)).toBe(1)
    gw = await startGatewayProcess({ dataDir: dir })
    await sendQos1(gw.mqttUrl, 'q2r-other', 'above') // creates q2r-lost's cursor at 1, above m1
    expect(await gw.stop()).toBe(0) // a graceful restart
    gw = await startGatewayProcess({ dataDir: dir })
    const again = await connect(gw.mqttUrl, 'q2r-dev')
    await exchangeQos2(again, { ...publish('m1', 2, 7, true), messageId: 7 })
    await exchangeQos2(again, { ...publish('end', 2, 8), messageId: 8 })
    again.send({ cmd: 'publish', topic: MARKER, payload: Buffer.from('marker'), qos: 1, messageId: 9, dup: false, retain: false })
    expect(await again.next('puback', DEADLINE_MS)).toMatchObject({ messageId: 9 })
    again.end()
    expect((await receiveAll(gw.mqttUrl, 'q2r-lost')).sort()).toEqual(['above', 'end', 'm1', 'marker'])
  })

  it('reaches a QoS 1 subscriber reading it from the log once, when another session\'s cursor started above it after the restart', async () => {
    const dir = await freshDir()
    let gw = await withWarmCursor(dir, 'q2r-cursor')
    cleanups.push(() => gw.kill())

    gw = await crashAndRetransmit(dir, gw, async (restarted) => {
      await sessionAbove(restarted)
    })
    // Each session decides for itself: q2r-above gets m1 as a copy (its cursor will not read it), q2r-cursor from the log.
    expect((await receiveAll(gw.mqttUrl, 'q2r-cursor')).sort()).toEqual(['above', 'end', 'm1', 'marker', 'warm'])
    expect((await receiveAll(gw.mqttUrl, 'q2r-above')).sort()).toEqual(['above', 'end', 'm1', 'marker'])
  })

  it('reaches a connected session whose cursor started above it after the restart, live', async () => {
    const dir = await freshDir()
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    let above: Awaited<ReturnType<typeof resume>> | undefined
    gw = await crashAndRetransmit(dir, gw, async (restarted) => {
      await sessionAbove(restarted)
      above = await resume(restarted.mqttUrl, 'q2r-above')
      await above.until(['above'])
    })
    // m1 comes as a copy (its cursor will never read it), delivered while it is connected, not kept for its next CONNECT.
    const session = above as NonNullable<typeof above>
    await session.until(['m1', 'end', 'marker'])
    session.end()
    expect([...session.received].sort()).toEqual(['above', 'end', 'm1', 'marker'])
  })

  it('reaches a session with a cursor in its partition that subscribed to its topic after the restart, as a copy', async () => {
    const dir = await freshDir()
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    // A persistent session reading another topic of the same device (so m1's partition): its cursor there starts at `warm`.
    await subscribeAndLeave(gw.mqttUrl, 'q2r-fenced', [{ topic: 'devices/q2r/telemetry/y', qos: 1 }, { topic: MARKER, qos: 1 }])
    const device = await connect(gw.mqttUrl, 'q2r-dev')
    device.send({ cmd: 'publish', topic: 'devices/q2r/telemetry/y', payload: Buffer.from('warm'), qos: 1, messageId: 1, dup: false, retain: false })
    expect(await device.next('puback', DEADLINE_MS)).toMatchObject({ messageId: 1 })
    device.end()

    gw = await crashAndRetransmit(dir, gw, async (restarted) => {
      // After the restart, before the device sends m1 again, the session subscribes to m1's topic too: a fence above m1,
      // below which the cursor matches only the filters m1 was logged under.
      await subscribeAndLeave(restarted.mqttUrl, 'q2r-fenced', [{ topic: TOPIC, qos: 1 }])
    })
    expect((await receiveAll(gw.mqttUrl, 'q2r-fenced')).sort()).toEqual(['end', 'm1', 'marker', 'warm'])
  })

  it('reaches a session whose filter went from QoS 2 to QoS 1 after the restart (logged under QoS 2, its copy lost to the kill)', async () => {
    const dir = await freshDir()
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    await subscribeOffline(gw.mqttUrl, 'q2r-era', 2)
    await sendQos1(gw.mqttUrl, 'q2r-other', 'warm') // a QoS 1 record: the session's cursor there, at its offset
    const killed = gw
    gw = await crashAndRetransmit(dir, gw, async (restarted) => {
      // The session changes the filter to QoS 1 while its cursor is behind: a fence above m1.
      await subscribeAndLeave(restarted.mqttUrl, 'q2r-era', [{ topic: FILTER, qos: 1 }])
    }, async () => {
      // m1 was a copy for the QoS 2 filter; the kill came before that copy's write.
      await killed.kill()
      expect(await unqueue(dir, 'q2r-era')).toBeGreaterThan(0)
    })
    expect((await receiveAll(gw.mqttUrl, 'q2r-era')).sort()).toEqual(['end', 'm1', 'marker', 'warm'])
  })

  it('reaches a session that subscribed after the restart as a copy, without the messages logged before its SUBSCRIBE', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    gw = await crashAndRetransmit(dir, gw, async (restarted) => {
      // Logged into m1's partition (same device key) before anyone subscribes.
      const other = await connect(restarted.mqttUrl, 'q2r-other')
      for (const [n, body] of [[1, 'before1'], [2, 'before2']] as const) {
        other.send(publish(body, 1, n))
        expect(await other.next('puback', DEADLINE_MS)).toMatchObject({ messageId: n })
      }
      other.end()
      // Then a new persistent session subscribes: it has no cursor in that partition when m1 comes again. Given one at
      // m1's offset, it read the log from there: before1 and before2 too.
      await subscribeOffline(restarted.mqttUrl, 'q2r-late', 1)
    })
    expect((await receiveAll(gw.mqttUrl, 'q2r-late')).sort()).toEqual(['end', 'm1', 'marker'])
  })
})
