/**
 * MQTT 5 Receive Maximum both ways (receive-maximum.ts), and a failed durable
 * append of a QoS 2 PUBLISH answered on its PUBREC (inbound-qos2.ts), on a
 * real gateway over TCP with raw MQTT 5 clients (they control exactly which
 * acknowledgements go back) and MQTT.js.
 */
import { mkdir } from 'node:fs/promises'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import type { MqttClient } from 'mqtt'
import type { Packet } from 'mqtt-packet'
import { pino } from 'pino'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig } from '../../../gateway/config/config.ts'
import { startGateway, type Gateway } from '../../../gateway/gateway.ts'
import type { LevelDatabase } from '../../../store/index.ts'
import { tempDir } from '../../helpers/gateway-process.ts'
import { readWholeLog } from '../../helpers/log-reader.ts'
import { connectOk, metricValue, waitFor } from '../../helpers/mqtt-probe.ts'
import { rawConnect, type RawClient } from '../../helpers/raw-client.ts'

const TIMEOUT = 30_000
/** mqtt.maxInflightPerClient of these gateways: the receive maximum their CONNACK advertises. */
const WINDOW = 3

interface TestGateway {
  readonly url: string
  readonly httpUrl: string
  readonly dir: string
  /** Makes every LevelDB write throw `err` (null: writes work again). */
  fail (err: Error | null): void
  close (): Promise<void>
  /** Removes the data directory (after close). */
  cleanup (): Promise<void>
}

async function startTestGateway (): Promise<TestGateway> {
  const { dir, cleanup } = await tempDir('edgemq-recvmax-')
  await mkdir(dir, { recursive: true })
  const db = new ClassicLevel<Buffer, Buffer>(path.join(dir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  let failure: Error | null = null
  db.hooks.prewrite.add(() => { if (failure !== null) throw failure })
  const config = buildConfig({ dataDir: dir, mqtt: { listeners: [{ type: 'tcp', port: 0 }], maxInflightPerClient: WINDOW }, http: { port: 0 } })
  const gw: Gateway = await startGateway(config, { logger: pino({ level: 'silent' }), database: db as unknown as LevelDatabase })
  let closing: Promise<void> | undefined
  return {
    url: `mqtt://127.0.0.1:${gw.listeners[0]!.port}`,
    httpUrl: `http://127.0.0.1:${gw.http.port}`,
    dir,
    fail: (err) => { failure = err },
    close: () => (closing ??= gw.close()),
    cleanup,
  }
}

/** A raw client connected with these CONNECT properties; the CONNACK is checked and returned. */
async function connectRaw (url: string, clientId: string, version: 4 | 5 = 5, properties?: { receiveMaximum?: number }): Promise<{ raw: RawClient, connack: Packet }> {
  const raw = await rawConnect(url, version)
  raw.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: version, clean: true, keepalive: 30, clientId, ...(properties === undefined ? {} : { properties }) })
  const connack = await raw.next('connack')
  expect(connack).toMatchObject(version === 5 ? { reasonCode: 0 } : { returnCode: 0 })
  return { raw, connack }
}

/** A PINGREQ/PINGRESP round trip: everything the gateway wrote before it has arrived. */
async function roundTrip (raw: RawClient): Promise<void> {
  raw.send({ cmd: 'pingreq' })
  await raw.next('pingresp')
}

function publish (id: number, payload: string, qos: 1 | 2, topic = 'devices/d-in/telemetry/t'): Packet {
  return { cmd: 'publish', topic, payload: Buffer.from(payload), qos, messageId: id, retain: false, dup: false }
}

describe('MQTT 5 Receive Maximum', () => {
  let gw: TestGateway
  const clients = new Set<MqttClient>()
  beforeAll(async () => { gw = await startTestGateway() }, TIMEOUT)
  afterAll(async () => {
    for (const c of clients) c.end(true)
    await gw.close()
    await gw.cleanup()
  }, TIMEOUT)

  it('advertises mqtt.maxInflightPerClient as the receive maximum, and disconnects a client over it with 0x93 (3.1.1 unchanged)', async () => {
    const { raw, connack } = await connectRaw(gw.url, 'd-in')
    expect((connack as { properties?: { receiveMaximum?: number } }).properties?.receiveMaximum).toBe(WINDOW)
    // QoS 2 exchanges stay in flight until PUBCOMP, so the client decides how many are open.
    for (let id = 1; id <= WINDOW; id++) raw.send(publish(id, `m${id}`, 2))
    for (let id = 1; id <= WINDOW; id++) expect(await raw.next('pubrec')).toMatchObject({ reasonCode: 0 })
    // One finished (PUBREL → PUBCOMP) frees one place: the next PUBLISH is fine.
    raw.send({ cmd: 'pubrel', messageId: 1 })
    expect(await raw.next('pubcomp')).toMatchObject({ messageId: 1 })
    raw.send(publish(WINDOW + 1, `m${WINDOW + 1}`, 2))
    expect(await raw.next('pubrec')).toMatchObject({ messageId: WINDOW + 1, reasonCode: 0 })
    // A retransmission of an open exchange takes no second place.
    raw.send({ cmd: 'publish', topic: 'devices/d-in/telemetry/t', payload: Buffer.from('m2'), qos: 2, messageId: 2, retain: false, dup: true })
    expect(await raw.next('pubrec')).toMatchObject({ messageId: 2, reasonCode: 0 })
    // WINDOW open; one more is over the receive maximum.
    raw.send(publish(WINDOW + 2, 'over', 2))
    expect(await raw.next('disconnect')).toMatchObject({ reasonCode: 0x93 })
    await raw.closed
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_connections_refused_total', { reason: 'receive-maximum' })).toBe(1)

    // MQTT 3.1.1 has no receive maximum: the same exchanges are just answered.
    const { raw: old } = await connectRaw(gw.url, 'd-in-311', 4)
    for (let id = 1; id <= WINDOW + 2; id++) old.send(publish(id, `o${id}`, 2, 'devices/d-in-311/telemetry/t'))
    for (let id = 1; id <= WINDOW + 2; id++) expect(await old.next('pubrec')).toMatchObject({ messageId: id })
    await roundTrip(old)
    old.end()
    await old.closed
    expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_connections_refused_total', { reason: 'receive-maximum' })).toBe(1)
  }, TIMEOUT)

  for (const qos of [1, 2] as const) {
    it(`never has more QoS ${qos} PUBLISHes unacknowledged towards an MQTT 5 subscriber than its receive maximum (2), and delivers all once it acks`,
      async () => {
        const { raw } = await connectRaw(gw.url, `sub-${qos}`, 5, { receiveMaximum: 2 })
        raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: `devices/+/telemetry/rm${qos}`, qos }] })
        await raw.next('suback')
        const got: string[] = []
        const unacked: number[] = []
        let most = 0
        raw.onPacket((p) => {
          if (p.cmd === 'publish') {
            got.push(String(p.payload))
            unacked.push(p.messageId as number)
            most = Math.max(most, unacked.length)
            if (qos === 2) raw.send({ cmd: 'pubrec', messageId: p.messageId as number })
          } else if (p.cmd === 'pubrel') {
            // Still unacknowledged: a QoS 2 delivery ends with the PUBCOMP, sent below.
          }
        })
        const publisher = await connectOk(gw.url, { protocolVersion: 5, clientId: `pub-${qos}` })
        clients.add(publisher)
        const count = 8
        for (let i = 0; i < count; i++) await publisher.publishAsync(`devices/pub/telemetry/rm${qos}`, `p${i}`, { qos })
        // Each publish was delivered (written towards the subscriber) before its ack: a round trip shows what got out.
        await roundTrip(raw)
        expect(got).toEqual(['p0', 'p1'])
        for (let round = 0; got.length < count && round < count; round++) {
          const id = unacked.shift() as number
          raw.send(qos === 1 ? { cmd: 'puback', messageId: id } : { cmd: 'pubcomp', messageId: id })
          await roundTrip(raw)
          expect(unacked.length).toBeLessThanOrEqual(2)
        }
        expect(got).toEqual(Array.from({ length: count }, (_, i) => `p${i}`))
        expect(most).toBe(2)
        raw.end()
        await raw.closed
      }, TIMEOUT)
  }

  it('paces a $replay to an MQTT 5 client by its receive maximum (2), below the replay\'s own window', async () => {
    const publisher = await connectOk(gw.url, { protocolVersion: 5, clientId: 'rp-pub' })
    clients.add(publisher)
    const count = 6
    for (let i = 0; i < count; i++) await publisher.publishAsync('devices/rp-pub/telemetry/t', `r${i}`, { qos: 1 })
    const { raw } = await connectRaw(gw.url, 'rp-sub', 5, { receiveMaximum: 2 })
    const got: string[] = []
    const unacked: number[] = []
    raw.onPacket((p) => {
      if (p.cmd !== 'publish') return
      got.push(p.topic.endsWith('$done') ? '$done' : String(p.payload))
      if ((p.qos ?? 0) > 0) unacked.push(p.messageId as number)
    })
    raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: '$replay/earliest/devices/rp-pub/#', qos: 1 }] })
    await raw.next('suback')
    let acked = 0
    for (let round = 0; !got.includes('$done') && round < 3 * count; round++) {
      // A replay writes as soon as its window has room: wait (bounded) until it has filled the client's window of 2, or
      // sent what is left, then check nothing more came. Waits for packets, not a count of round trips: a loaded
      // machine can take longer than a hundred of them to start the replay.
      const deadline = Date.now() + 30_000
      while (unacked.length < Math.min(2, count - acked) && !got.includes('$done') && Date.now() < deadline) await roundTrip(raw)
      await roundTrip(raw)
      expect(unacked.length).toBeLessThanOrEqual(2)
      if (got.includes('$done')) break
      expect(unacked.length, `nothing in flight after round ${round}: ${got.join(' ')}`).toBeGreaterThan(0)
      raw.send({ cmd: 'puback', messageId: unacked.shift() as number })
      acked++
    }
    expect(got).toEqual([...Array.from({ length: count }, (_, i) => `r${i}`), '$done'])
    raw.end()
    await raw.closed
  }, TIMEOUT)

  it('an MQTT.js subscriber with receiveMaximum 1 gets every QoS 2 message of a burst, in order (MQTT.js disconnects a broker over it: 0x93)',
    async () => {
      const sub = await connectOk(gw.url, { protocolVersion: 5, clientId: 'js-sub', properties: { receiveMaximum: 1 } })
      clients.add(sub)
      const errors: Error[] = []
      sub.on('error', (err) => errors.push(err))
      const got: string[] = []
      const count = 30
      const all = new Promise<void>((resolve, reject) => {
        sub.on('message', (_t, payload) => { got.push(String(payload)); if (got.length === count) resolve() })
        sub.once('close', () => reject(new Error(`subscriber closed after ${got.length} messages: ${errors.map((e) => e.message).join('; ')}`)))
      })
      await sub.subscribeAsync('devices/+/telemetry/burst', { qos: 2 })
      // MQTT.js does not keep to the server's receive maximum itself: the publisher keeps WINDOW in flight.
      const publisher = await connectOk(gw.url, { protocolVersion: 5, clientId: 'js-pub' })
      clients.add(publisher)
      for (let i = 0; i < count; i += WINDOW) {
        const batch = Array.from({ length: Math.min(WINDOW, count - i) }, (_, k) => `b${i + k}`)
        await Promise.all(batch.map((payload) => publisher.publishAsync('devices/js-pub/telemetry/burst', payload, { qos: 2 })))
      }
      await all
      expect(got).toEqual(Array.from({ length: count }, (_, i) => `b${i}`))
      expect(errors).toEqual([])
      expect(sub.connected).toBe(true)
    }, TIMEOUT)
})

describe('MQTT 5: a QoS 2 PUBLISH whose durable append failed is answered on its PUBREC', () => {
  let gw: TestGateway
  beforeAll(async () => { gw = await startTestGateway() }, TIMEOUT)
  afterAll(async () => { await gw.close(); await gw.cleanup() }, TIMEOUT)

  it('PUBREC 0x97 while the disk is full, 0x80 for another write failure; the connection stays, the id can be used again, nothing refused is logged',
    async () => {
      const { raw } = await connectRaw(gw.url, 'd-q2')
      const topic = 'devices/d-q2/telemetry/t'
      raw.send(publish(1, 'before', 2, topic))
      expect(await raw.next('pubrec')).toMatchObject({ messageId: 1, reasonCode: 0 })
      raw.send({ cmd: 'pubrel', messageId: 1 })
      await raw.next('pubcomp')
      gw.fail(Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' }))
      raw.send(publish(2, 'full', 2, topic))
      const full = await raw.next('pubrec') as { messageId?: number, reasonCode?: number, properties?: { reasonString?: string } }
      expect(full).toMatchObject({ messageId: 2, reasonCode: 0x97 })
      expect(full.properties?.reasonString).toMatch(/ENOSPC/)
      gw.fail(new Error('IO error: device gone'))
      raw.send(publish(3, 'broken', 2, topic))
      expect(await raw.next('pubrec')).toMatchObject({ messageId: 3, reasonCode: 0x80 })
      gw.fail(null)
      // The refused exchanges are over (MQTT 5 4.3.3): the same packet id carries a new message, which is logged.
      raw.send(publish(2, 'after', 2, topic))
      expect(await raw.next('pubrec')).toMatchObject({ messageId: 2, reasonCode: 0 })
      raw.send({ cmd: 'pubrel', messageId: 2 })
      await raw.next('pubcomp')
      raw.end()
      await raw.closed
      // MQTT 3.1.1 has no reason code on PUBREC: the append is retried until the disk is back, then acknowledged.
      const { raw: old } = await connectRaw(gw.url, 'd-q2-311', 4)
      gw.fail(Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' }))
      const failedBefore = await metricValue(gw.httpUrl, 'edgemq_mqtt_publishes_refused_total')
      old.send(publish(1, 'retried', 2, 'devices/d-q2-311/telemetry/t'))
      // The gateway turns unhealthy at the failed write; no PUBREC has been sent for it.
      expect(await waitFor(async () => (await fetch(`${gw.httpUrl}/health`)).status === 503, 5000)).toBe(true)
      gw.fail(null)
      expect(await old.next('pubrec', 10_000)).toMatchObject({ messageId: 1 })
      expect(await metricValue(gw.httpUrl, 'edgemq_mqtt_publishes_refused_total')).toBe(failedBefore)
      old.end()
      await old.closed
      await gw.close()
      expect((await readWholeLog(gw.dir)).map((r) => String(r.payload))).toEqual(['before', 'after', 'retried'])
    }, TIMEOUT)
})
