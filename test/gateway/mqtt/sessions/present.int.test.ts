/**
 * CONNACK's session present flag [MQTT-3.2.2-2]: 1 whenever the gateway holds
 * a persistent session, not only one with subscriptions — an inbound QoS 2
 * message awaiting PUBREL, an outgoing message awaiting its PUBACK, or
 * nothing but the session itself [MQTT-3.1.2-4] — also after a kill -9; 0 for
 * a client id never seen and after a clean session.
 */
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir } from '../../../helpers/gateway-process.ts'
import { rawConnect, type RawClient } from '../../../helpers/raw-client.ts'

async function connect (url: string, clientId: string, clean: boolean): Promise<{ c: RawClient, sessionPresent: boolean }> {
  const c = await rawConnect(url)
  c.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId, clean, keepalive: 30 })
  const connack = await c.next('connack')
  expect(connack).toMatchObject({ returnCode: 0 })
  return { c, sessionPresent: (connack as { sessionPresent: boolean }).sessionPresent }
}

async function disconnect (c: RawClient): Promise<void> {
  c.send({ cmd: 'disconnect' })
  await c.closed
}

describe('CONNACK session present', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups) await c() })

  it('is 1 for a session holding only in-flight QoS 2 or an unacknowledged delivery, also after kill -9', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())

    // A device with no subscriptions, one QoS 2 message awaiting its PUBREL.
    let { c, sessionPresent } = await connect(gw.mqttUrl, 'sp-pub', false)
    expect(sessionPresent).toBe(false)
    c.send({ cmd: 'publish', topic: 'devices/sp-pub/telemetry/x', payload: Buffer.from('a'), qos: 2, messageId: 3, dup: false, retain: false })
    await c.next('pubrec')
    await disconnect(c)

    // A subscriber that received a QoS 1 message, did not PUBACK it, and unsubscribed.
    ;({ c } = await connect(gw.mqttUrl, 'sp-sub', false))
    c.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'devices/+/events/#', qos: 1 }] })
    await c.next('suback')
    const { c: sender } = await connect(gw.mqttUrl, 'sp-sender', true)
    sender.send({ cmd: 'publish', topic: 'devices/sp-sender/events/e', payload: Buffer.from('e'), qos: 1, messageId: 1, dup: false, retain: false })
    await sender.next('puback')
    await disconnect(sender)
    await c.next('publish')
    c.send({ cmd: 'unsubscribe', messageId: 2, unsubscriptions: ['devices/+/events/#'] })
    await c.next('unsuback')
    await disconnect(c)

    for (const restart of [false, true]) {
      if (restart) {
        await gw.kill()
        gw = await startGatewayProcess({ dataDir: dir })
      }
      ;({ c, sessionPresent } = await connect(gw.mqttUrl, 'sp-pub', false))
      expect(sessionPresent, `inbound QoS 2 (restart: ${restart})`).toBe(true)
      await disconnect(c)
      ;({ c, sessionPresent } = await connect(gw.mqttUrl, 'sp-sub', false))
      expect(sessionPresent, `unacknowledged delivery (restart: ${restart})`).toBe(true)
      // The session is resumed: the unacknowledged message comes again.
      const again = await c.next('publish')
      expect(again).toMatchObject({ payload: Buffer.from('e') })
      if (restart) c.send({ cmd: 'puback', messageId: again.messageId })
      await disconnect(c)
    }

    // Exchange completed: nothing else stored, but the session itself exists [MQTT-3.1.2-4], also across kill -9.
    ;({ c } = await connect(gw.mqttUrl, 'sp-pub', false))
    c.send({ cmd: 'pubrel', messageId: 3 })
    await c.next('pubcomp')
    await disconnect(c)
    await gw.kill()
    gw = await startGatewayProcess({ dataDir: dir })
    ;({ c, sessionPresent } = await connect(gw.mqttUrl, 'sp-pub', false))
    expect(sessionPresent, 'empty persistent session').toBe(true)
    await disconnect(c)
    ;({ c, sessionPresent } = await connect(gw.mqttUrl, 'sp-new', false))
    expect(sessionPresent, 'a client id never seen').toBe(false)
    await disconnect(c)
    ;({ c, sessionPresent } = await connect(gw.mqttUrl, 'sp-new', false))
    expect(sessionPresent, 'its session, now existing').toBe(true)
    await disconnect(c)
    // A clean session discards the state [MQTT-3.2.2-1].
    ;({ c, sessionPresent } = await connect(gw.mqttUrl, 'sp-sub', true))
    expect(sessionPresent).toBe(false)
    await disconnect(c)
    ;({ c, sessionPresent } = await connect(gw.mqttUrl, 'sp-sub', false))
    expect(sessionPresent).toBe(false)
    await disconnect(c)
  })
})
