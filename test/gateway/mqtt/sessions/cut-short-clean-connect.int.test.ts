/**
 * Clean CONNECTs (3.1.1 clean session = 1, MQTT 5 Clean Start = 1) cut short while a persistent subscriber of the same
 * client id is connected leave its session on disk: a kill -9 after a QoS 1 message to a routed topic was acknowledged
 * restarts the gateway with the session (CONNACK session present = 1) and its cursor, which delivers that message.
 * Each such CONNECT had discarded the stored session as it read it (subscriptions, cursors, queued copies), before its
 * registration, which the aedes patch then skips for a connection closed meanwhile: the subscriber went on with its
 * subscriptions in memory only, and after the kill its session and the message were gone. The orderings, with no timing
 * involved: cut-short-clean-connect.test.ts.
 *
 * Each CONNECT goes out with the socket's FIN right behind it: the gateway reads both at once. Nothing is written now
 * between its authentication and its registration (the clean step and the will wait for the CONNECT's turn), so the
 * gateway registers it before it sees its close, or sees the close first and leaves the session alone. Discarded as the
 * CONNECT read the session, the close was seen during that write. One registered takes the subscriber over and
 * discards the session (as it should): the subscriber connects and subscribes again. Rounds go on until one left the
 * subscriber alone (its session is what the kill tests), or for a fixed number.
 */
import mqtt from 'mqtt'
import { generate, type IConnackPacket } from 'mqtt-packet'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { gatewayFiles, type GatewayFiles, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { waitFor } from '../../../helpers/mqtt-probe.ts'
import { rawConnect, type RawClient } from '../../../helpers/raw-client.ts'
import { RawConnection } from '../../../helpers/raw-mqtt.ts'

const WAIT_MS = 20_000
/** Rounds at most: each one that took the subscriber over started a new session, which the next rounds put at risk. */
const ROUNDS = 20
const CLIENT_ID = 'sub-1'

/** The will each cut-short CONNECT carries (see the header): its close publishes it, on a topic nobody reads. */
const WILL = { topic: `status/${CLIENT_ID}`, payload: Buffer.from('gone'), qos: 0, retain: false } as const
/** The cut-short CONNECTs, in turn: 3.1.1 clean session, and MQTT 5 Clean Start with and without a Session Expiry Interval. */
const CUTS = [
  generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: CLIENT_ID, clean: true, keepalive: 30, will: WILL }),
  generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: CLIENT_ID, clean: true, keepalive: 30, will: WILL,
    properties: { sessionExpiryInterval: 60 } }, { protocolVersion: 5 }),
  generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: CLIENT_ID, clean: true, keepalive: 30, will: WILL }, { protocolVersion: 5 }),
]

describe('clean CONNECTs cut short while a persistent subscriber is connected', () => {
  let files: GatewayFiles
  let gw: GatewayProcess
  beforeAll(async () => {
    files = await gatewayFiles()
    gw = await files.start()
  })
  afterAll(async () => { await gw?.kill(); await files?.cleanup() })

  /** The persistent subscriber: a 3.1.1 clean session = 0 connection that acknowledges nothing it is sent. */
  async function subscriber (): Promise<RawClient> {
    const sub = await rawConnect(gw.mqttUrl)
    sub.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: CLIENT_ID, clean: false, keepalive: 30 })
    await sub.next('connack', WAIT_MS)
    sub.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'devices/+/telemetry/t', qos: 1 }] })
    await sub.next('suback', WAIT_MS)
    return sub
  }

  /**
   * Whether the subscriber's QoS 1 PUBLISH to a routed topic (one it does not subscribe to) was acknowledged (false:
   * its connection closed first, taken over). The PUBACK waits for the group commit that logs it: every session write
   * queued before it is on disk then.
   */
  async function acknowledged (sub: RawClient, messageId: number): Promise<boolean> {
    sub.send({ cmd: 'publish', topic: `devices/${CLIENT_ID}/telemetry/probe`, payload: Buffer.from('x'), qos: 1, messageId, retain: false, dup: false })
    return await Promise.race([
      sub.next('puback', WAIT_MS).then((ack) => ack.messageId === messageId, () => false),
      sub.closed.then(() => false),
    ])
  }

  it('keeps the subscriber\'s session across a kill -9: present after the restart, with the message acknowledged meanwhile', async () => {
    let sub = await subscriber()
    let takenOver = 0
    for (let round = 0; round < ROUNDS; round++) {
      const conn = await RawConnection.open(gw.mqttUrl)
      conn.send(CUTS[round % CUTS.length] as Buffer)
      conn.socket.end()
      expect(await conn.waitClosed(WAIT_MS), 'the gateway closes its side of the cut-short connection').toBe(true)
      if (await acknowledged(sub, 1 + round)) break
      // Registered before its close was seen: it took the session over and discarded it. A new one starts.
      takenOver++
      sub.end()
      sub = await subscriber()
    }

    const publisher = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'dev-9', reconnectPeriod: 0 })
    await publisher.publishAsync('devices/dev-9/telemetry/t', 'kept', { qos: 1 })
    await gw.kill()
    publisher.end(true)
    sub.end()

    gw = await files.start()
    const back = mqtt.connect(gw.mqttUrl, { clientId: CLIENT_ID, clean: false, reconnectPeriod: 0 })
    try {
      const received: string[] = []
      back.on('message', (_topic, payload) => { received.push(payload.toString()) })
      const connack = await new Promise<IConnackPacket>((resolve, reject) => {
        back.once('connect', resolve)
        back.once('error', reject)
      })
      expect(connack.sessionPresent, `session present after the restart (rounds taken over before: ${takenOver})`).toBe(true)
      expect(await waitFor(() => received.includes('kept'), WAIT_MS), 'the acknowledged message is delivered').toBe(true)
    } finally {
      back.end(true)
    }
  })
})
