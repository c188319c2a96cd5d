/**
 * CONNECTs with a will, cut short while the device's live connection holds its client id, publish no will while that
 * connection is up, and leave its will stored: after a kill -9 the gateway fires the live connection's will for the
 * device, not theirs. aedes stored a CONNECT's will before its registration (storeWill), which the aedes patch skips
 * for a connection closed meanwhile: each such CONNECT replaced the live connection's stored will with its own, and its
 * close published its own ("device offline" while the device was up) and deleted it, so after a kill -9 no will, or
 * the wrong one, fired for the live connection's session. The orderings, with no timing involved:
 * cut-short-connect-will.test.ts.
 *
 * Each CONNECT goes out with the socket's FIN right behind it; it resumes a session (clean = 0), so the gateway writes
 * the session's mark before its registration, and the close is seen during that write or after its registration. One
 * registered takes the live connection over (as it should): both wills fire, and the device connects again. Rounds go
 * on until enough of them left the live connection alone. The will topic is routed, so each will is a record of the
 * device's partition, delivered to the watcher in order with the live connection's probe that ends each round.
 */
import mqtt from 'mqtt'
import { generate } from 'mqtt-packet'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { gatewayFiles, type GatewayFiles, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { readWholeLog } from '../../../helpers/log-reader.ts'
import { waitFor } from '../../../helpers/mqtt-probe.ts'
import { rawConnect, type RawClient } from '../../../helpers/raw-client.ts'
import { RawConnection } from '../../../helpers/raw-mqtt.ts'

const WAIT_MS = 20_000
/** Rounds that must leave the live connection alone before the kill. */
const ROUNDS_LEFT_ALONE = 12
/** A bound on all rounds: a gateway where most cut-short CONNECTs take the live connection over fails the test. */
const MAX_ROUNDS = 150
const CLIENT_ID = 'dev-7'
const WILL_TOPIC = `devices/${CLIENT_ID}/events/offline`
const CUT_WILL = 'cut-gone'

const cutWill = { topic: WILL_TOPIC, payload: Buffer.from(CUT_WILL), qos: 1, retain: false } as const
/** The cut-short CONNECTs, in turn: 3.1.1 persistent session, and MQTT 5 resuming a session with an interval. */
const CUTS = [
  generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: CLIENT_ID, clean: false, keepalive: 30, will: cutWill }),
  generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: CLIENT_ID, clean: false, keepalive: 30, will: cutWill,
    properties: { sessionExpiryInterval: 60 } }, { protocolVersion: 5 }),
]

describe('CONNECTs with a will cut short while the device\'s live connection is up', () => {
  let files: GatewayFiles
  let gw: GatewayProcess
  beforeAll(async () => {
    files = await gatewayFiles()
    gw = await files.start()
  })
  afterAll(async () => { await gw?.kill(); await files?.cleanup() })

  /** The device's live connection, the `n`th: 3.1.1 persistent session with the will `live-gone-<n>`. */
  async function live (n: number): Promise<RawClient> {
    const conn = await rawConnect(gw.mqttUrl)
    conn.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: CLIENT_ID, clean: false, keepalive: 30,
      will: { topic: WILL_TOPIC, payload: Buffer.from(`live-gone-${n}`), qos: 1, retain: false } })
    await conn.next('connack', WAIT_MS)
    return conn
  }

  /**
   * Whether the live connection's QoS 1 probe to the device's partition was acknowledged (false: its connection
   * closed first, taken over). Its PUBACK waits for the group commit that logs it: a will fired before it is logged too.
   */
  async function acknowledged (conn: RawClient, messageId: number): Promise<boolean> {
    conn.send({ cmd: 'publish', topic: `devices/${CLIENT_ID}/events/probe-${messageId}`, payload: Buffer.from('x'), qos: 1, messageId, retain: false, dup: false })
    return await Promise.race([
      conn.next('puback', WAIT_MS).then((ack) => ack.messageId === messageId, () => false),
      conn.closed.then(() => false),
    ])
  }

  it('publishes none of their wills while it is up, and fires its will at the restart after a kill -9', async () => {
    const watcher = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'watcher', clean: true, reconnectPeriod: 0 })
    const seen: string[] = []
    watcher.on('message', (topic, payload) => { seen.push(topic === WILL_TOPIC ? payload.toString() : topic.slice(topic.lastIndexOf('/') + 1)) })
    await watcher.subscribeAsync(`devices/${CLIENT_ID}/events/#`, { qos: 1 })
    const cutWills = (): number => seen.filter((p) => p === CUT_WILL).length

    let n = 0
    let conn = await live(n)
    let leftAlone = 0
    let takenOver = 0
    /** Rounds that left the live connection alone and published the cut-short CONNECT's will all the same. */
    const falseAlarms: number[] = []
    try {
      for (let round = 0; leftAlone < ROUNDS_LEFT_ALONE; round++) {
        expect(round, `rounds until ${ROUNDS_LEFT_ALONE} left the live connection alone`).toBeLessThan(MAX_ROUNDS)
        const before = cutWills()
        const cut = await RawConnection.open(gw.mqttUrl)
        cut.send(CUTS[round % CUTS.length] as Buffer)
        cut.socket.end()
        expect(await cut.waitClosed(WAIT_MS), 'the gateway closes its side of the cut-short connection').toBe(true)
        const messageId = 1 + round
        if (await acknowledged(conn, messageId)) {
          leftAlone++
          // The probe is a record of the device's partition logged after any will the cut-short CONNECT fired.
          expect(await waitFor(() => seen.includes(`probe-${messageId}`), WAIT_MS), 'the watcher gets the probe').toBe(true)
          if (cutWills() > before) falseAlarms.push(round)
          continue
        }
        // Registered before its close was seen: it took the live connection over, whose will fires, then its own.
        takenOver++
        expect(await waitFor(() => seen.includes(`live-gone-${n}`) && cutWills() > before, WAIT_MS), 'both wills of a takeover fire').toBe(true)
        conn.end()
        conn = await live(++n)
      }
    } finally {
      watcher.end(true)
    }

    await gw.kill()
    conn.end()
    const logged = (await readWholeLog(files.dataDir)).filter((r) => r.topic === WILL_TOPIC)
    gw = await files.start()
    await gw.kill()
    const fired = (await readWholeLog(files.dataDir)).filter((r) => r.topic === WILL_TOPIC && !logged.some((l) => l.offset === r.offset && l.partition === r.partition))
    expect({ falseAlarms, firedAtRestart: fired.map((r) => r.payload) }, `rounds taken over: ${takenOver}`)
      .toEqual({ falseAlarms: [], firedAtRestart: [`live-gone-${n}`] })
  })
})
