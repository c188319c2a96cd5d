/**
 * No session, and no subscription, comes back from the dead after a kill -9. A session that ended (a clean CONNECT:
 * 3.1.1 clean session or MQTT 5 Clean Start) or a subscription removed (UNSUBACK) stays ended across a SIGKILL and
 * restart: the next CONNECT
 * with clean = false says Session Present = 0 and nothing of the old subscriptions or queue is delivered.
 *
 * Found by the attack probes: a clean CONNECT left the old session's queued copies on disk until aedes' emptyQueue
 * cleared them one by one after the CONNACK (lib/handlers/connect.js emptyQueueFilter), so a kill -9 in between
 * brought them back, and with them the session (7 of 7 runs); and an MQTT 5 Clean Start 1 session with an expiry was
 * recorded nowhere, so a reconnect found it present only while the old session's leftovers were still on disk.
 * An MQTT 5 session resumed with Session Expiry Interval 0 and killed right after its CONNACK: zero-expiry-kill.int.test.ts.
 */
import mqtt, { type IClientOptions } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { collectPayloads, connectSession, waitFor } from '../../../helpers/mqtt-probe.ts'

const WAIT_MS = 30_000

describe('ended sessions and removed subscriptions stay ended across kill -9', () => {
  let dir: string
  let cleanup: () => Promise<void>
  let gw: GatewayProcess
  beforeAll(async () => {
    const t = await tempDir()
    dir = t.dir
    cleanup = t.cleanup
    gw = await startGatewayProcess({ dataDir: dir })
  })
  afterAll(async () => { await gw?.kill(); await cleanup?.() })

  async function restart (): Promise<void> {
    await gw.kill()
    gw = await startGatewayProcess({ dataDir: dir })
  }

  /** Publishes `body` on `topic` (QoS 1, acknowledged) from a throwaway device. */
  async function publish (topic: string, body: string): Promise<void> {
    const dev = await mqtt.connectAsync(gw.mqttUrl, { clientId: `pub-${body}`, reconnectPeriod: 0 })
    await dev.publishAsync(topic, body, { qos: 1 })
    await dev.endAsync()
  }

  it('a clean-session CONNECT ends the stored session and its queued messages for good, even when the gateway is killed right after its CONNACK', async () => {
    const id = 'clean-after'
    const first = await connectSession(gw.mqttUrl, { clientId: id, clean: false, protocolVersion: 4 })
    await first.client.subscribeAsync(['devices/+/events/#', 'plain/#'], { qos: 1 })
    await first.client.endAsync()
    await publish('plain/old', 'old-plain') // queued as a copy (no route logs plain/)
    const clean = await connectSession(gw.mqttUrl, { clientId: id, clean: true, protocolVersion: 4 })
    expect(clean.sessionPresent).toBe(false)
    await restart()
    clean.client.end(true)
    const after = await connectSession(gw.mqttUrl, { clientId: id, clean: false, protocolVersion: 4 })
    const got = collectPayloads(after.client)
    await after.client.subscribeAsync('marker/clean', { qos: 1 })
    await publish('marker/clean', 'clean-marker')
    expect(await waitFor(() => got.includes('clean-marker'), WAIT_MS)).toBe(true)
    await after.client.endAsync()
    expect({ sessionPresent: after.sessionPresent, got }).toEqual({ sessionPresent: false, got: ['clean-marker'] })
  })

  it('an UNSUBACKed subscription of a persistent session is not restored after a kill -9 right after the UNSUBACK', async () => {
    const id = 'unsub-kill'
    const first = await connectSession(gw.mqttUrl, { clientId: id, clean: false, protocolVersion: 4 })
    await first.client.subscribeAsync(['devices/+/events/#', 'marker/unsub'], { qos: 1 })
    await first.client.unsubscribeAsync('devices/+/events/#')
    await restart()
    first.client.end(true)
    const after = await connectSession(gw.mqttUrl, { clientId: id, clean: false, protocolVersion: 4 })
    const got = collectPayloads(after.client)
    await publish('devices/d/events/e', 'unsub-ghost')
    await publish('marker/unsub', 'unsub-marker')
    expect(await waitFor(() => got.includes('unsub-marker'), WAIT_MS)).toBe(true)
    await after.client.endAsync()
    expect({ sessionPresent: after.sessionPresent, got }).toEqual({ sessionPresent: true, got: ['unsub-marker'] })
  })
})

describe('MQTT 5 Clean Start = 1 over an old session', () => {
  let dir: string
  let cleanup: () => Promise<void>
  let gw: GatewayProcess
  beforeAll(async () => {
    const t = await tempDir()
    dir = t.dir
    cleanup = t.cleanup
    gw = await startGatewayProcess({ dataDir: dir })
  })
  afterAll(async () => { await gw?.kill(); await cleanup?.() })

  for (const kill of [true, false]) {
    it(`the old session's subscriptions and backlog (routed and unrouted) are gone${kill ? ' after a kill -9 right after the CONNACK' : ''}; the new session is kept`, async () => {
      const v5 = (clean: boolean): IClientOptions => ({ protocolVersion: 5, clientId: `cs-over-${kill}`, clean, properties: { sessionExpiryInterval: 3600 } })
      const old = await connectSession(gw.mqttUrl, v5(false))
      await old.client.subscribeAsync(['devices/+/telemetry/#', 'plain/#'], { qos: 1 })
      await old.client.endAsync()
      const dev = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'cs-dev', reconnectPeriod: 0 })
      await dev.publishAsync('devices/cs-dev/telemetry/t', 'old-routed', { qos: 1 })
      await dev.publishAsync('plain/x', 'old-plain', { qos: 1 })
      await dev.endAsync()
      const fresh = await connectSession(gw.mqttUrl, v5(true))
      expect(fresh.sessionPresent).toBe(false)
      const early = collectPayloads(fresh.client)
      if (kill) {
        await gw.kill()
        fresh.client.end(true)
        gw = await startGatewayProcess({ dataDir: dir })
      } else {
        await fresh.client.endAsync()
      }
      const after = await connectSession(gw.mqttUrl, v5(false))
      const got = collectPayloads(after.client)
      await after.client.subscribeAsync('marker/cs', { qos: 1 })
      const dev2 = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'cs-dev', reconnectPeriod: 0 })
      await dev2.publishAsync('devices/cs-dev/telemetry/t', 'new-routed', { qos: 1 })
      await dev2.publishAsync('plain/x', 'new-plain', { qos: 1 })
      await dev2.publishAsync('marker/cs', 'marker', { qos: 1 })
      await dev2.endAsync()
      expect(await waitFor(() => got.includes('marker'), WAIT_MS)).toBe(true)
      await after.client.endAsync()
      expect({ early, present: after.sessionPresent, got }).toEqual({ early: [], present: true, got: ['marker'] })
    })
  }
})
