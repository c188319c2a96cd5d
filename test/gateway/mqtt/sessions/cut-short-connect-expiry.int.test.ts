/**
 * A CONNECT cut short while another connection holds its client id's session leaves that session the live
 * connection's Session Expiry Interval on disk, so a kill -9 right after it does not restart the session with the
 * cut-short CONNECT's interval. That CONNECT had written its own interval when aedes read the session (markSession,
 * before the CONNACK it never got); the aedes patch then skips its registration, so the live connection keeps the
 * session, and only that connection's own close wrote its interval back. A kill -9 in between brought the session back
 * with the short interval (it expired a second after the restart, its subscriptions and cursors with it) or with 0
 * (dropped as the gateway started). Found by review.
 *
 * The CONNECT goes out with the socket's FIN right behind it: the gateway reads both at once, and sees the close while
 * it writes the session (measured on the 2-core machine: 204 rounds of 205 closed there; the other one closed after
 * its registration, which took the live connection over). Rounds go on until several in a row left the live
 * connection alone. The persistence's side of every ordering, with no timing involved: cut-short-connect.test.ts.
 */
import mqtt, { type MqttClient } from 'mqtt'
import { generate } from 'mqtt-packet'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { gatewayFiles, type GatewayFiles, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { waitFor } from '../../../helpers/mqtt-probe.ts'
import { RawConnection } from '../../../helpers/raw-mqtt.ts'

const WAIT_MS = 20_000
/** Rounds in a row that must leave the live connection alone before the kill. */
const ROUNDS_LEFT_ALONE = 5
/** A bound on all rounds: a gateway where most cut-short CONNECTs take the live connection over fails the test. */
const MAX_ROUNDS = 100
const LIVE_SECONDS = 3600
/** Offline from the restart on, as the held sessions: its expiry says the gateway's clock went past theirs. */
const CONTROL_SECONDS = 3

describe('a CONNECT cut short while another connection holds the session', () => {
  let files: GatewayFiles
  let gw: GatewayProcess
  beforeAll(async () => {
    files = await gatewayFiles()
    gw = await files.start()
  })
  afterAll(async () => { await gw?.kill(); await files?.cleanup() })

  /** An MQTT 5 connection resuming (or starting) the session of `clientId` with this Session Expiry Interval. */
  function connect (clientId: string, sessionExpiryInterval: number): Promise<MqttClient> {
    return mqtt.connectAsync(gw.mqttUrl, { clientId, clean: false, protocolVersion: 5, properties: { sessionExpiryInterval }, reconnectPeriod: 0 })
  }

  /**
   * Whether a QoS 1 PUBLISH of `client` to a routed topic was acknowledged (false: its connection closed first, taken
   * over). Its PUBACK waits for the group commit that logs it: every session write queued before is on disk then.
   */
  async function acknowledged (client: MqttClient): Promise<boolean> {
    if (client.disconnecting || !client.connected) return false
    return await Promise.race([
      client.publishAsync(`devices/${client.options.clientId ?? ''}/telemetry/probe`, 'x', { qos: 1 }).then(() => true, () => false),
      new Promise<boolean>((resolve) => client.once('close', () => resolve(false))),
    ])
  }

  /**
   * Holds the session of `clientId` on a live connection and cuts CONNECTs of the id short, asking for each of
   * `cutIntervals` in turn, until ROUNDS_LEFT_ALONE rounds in a row left the live connection alone (one taken over is
   * connected again). In turn: a CONNECT asking for the interval already stored writes nothing, so without the fix
   * every other one found no write to wait for, got registered before its close was seen and took the live
   * connection over. Each round ends with an acknowledged QoS 1 PUBLISH of the live connection, sent once the gateway
   * closed its side of the cut-short one (it handled that close before it reads the PUBLISH): its group commit comes
   * after whatever the close wrote, so a kill -9 after it finds that.
   */
  async function cutShortWhileLive (clientId: string, cutIntervals: readonly [number, number]): Promise<MqttClient> {
    let live = await connect(clientId, LIVE_SECONDS)
    await live.subscribeAsync(`cmd/${clientId}`, { qos: 1 })
    const cuts = cutIntervals.map((sessionExpiryInterval) => generate({
      cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId, clean: false, keepalive: 30, properties: { sessionExpiryInterval },
    }, { protocolVersion: 5 }))
    let leftAlone = 0
    for (let round = 0; leftAlone < ROUNDS_LEFT_ALONE; round++) {
      expect(round, `rounds until ${ROUNDS_LEFT_ALONE} in a row left the live connection alone`).toBeLessThan(MAX_ROUNDS)
      const conn = await RawConnection.open(gw.mqttUrl)
      conn.send(cuts[round % 2] as Buffer)
      conn.socket.end()
      expect(await conn.waitClosed(WAIT_MS), 'the gateway closes its side of the cut-short connection').toBe(true)
      if (await acknowledged(live)) {
        leftAlone++
        continue
      }
      leftAlone = 0
      live.end(true)
      live = await connect(clientId, LIVE_SECONDS)
    }
    return live
  }

  it('keeps the live connection\'s interval across a kill -9: neither a shorter one nor 0 ends the session after the restart', async () => {
    const control = await connect('control', CONTROL_SECONDS)
    await control.subscribeAsync('cmd/control', { qos: 1 })
    const shorter = await cutShortWhileLive('held-short', [1, 2])
    const zero = await cutShortWhileLive('held-zero', [0, 1])

    await gw.kill()
    for (const client of [control, shorter, zero]) client.end(true)
    gw = await files.start()
    const expired = (id: string): boolean => gw.stderr().split('\n').some((l) => l.includes('persistent session expired') && l.includes(`"${id}"`))
    // Every session was connected at the kill, so each counts as offline from the restart: the control session's end
    // comes after the end the cut-short CONNECTs' intervals would have given (0 drops a session as the gateway starts).
    expect(await waitFor(() => expired('control'), WAIT_MS), 'the control session expired').toBe(true)
    const res = await fetch(`${gw.httpUrl}/v1/sessions`)
    const { sessions } = await res.json() as { sessions: Array<{ clientId: string }> }
    expect({
      listed: sessions.map((s) => s.clientId).filter((id) => id.startsWith('held-')).sort(),
      expired: ['held-short', 'held-zero'].filter(expired),
    }).toEqual({ listed: ['held-short', 'held-zero'], expired: [] })
  })
})
