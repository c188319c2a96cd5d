/**
 * A persistent session gets every acknowledged message published around its disconnect: while its connection is
 * closing, just after, once the gateway lists it offline, and while a new connection takes the session over from one
 * the gateway has not seen close yet (gateway/mqtt/sessions/cursors.ts attach and release). Cycles over MQTT 3.1.1
 * and 5 (with Retain As Published), RETAIN or not, and three ways to leave, each cycle with a session and a device of
 * its own. Every cycle ends with a marker the device publishes after the reconnect: one device is one partition, in
 * order, so once the marker arrives everything acknowledged before it has.
 *
 * The subscriber's message listener goes on before its CONNECT: MQTT.js handles a PUBLISH that arrives in the
 * CONNACK's socket read before the caller of connectAsync resumes, and acknowledges it with nobody listening. A test
 * that listens after connectAsync loses what the gateway sends right after the CONNACK (what a reconnecting
 * persistent session gets first); that, not the gateway, lost the Retain As Published test's offline message
 * (delivery.int.test.ts; the gateway's cursor had sent it and taken its PUBACK).
 */
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir } from '../../../helpers/gateway-process.ts'

/** Every variant three times. */
const CYCLES = 48
/** The loop stops early past this (a loaded machine); every cycle run is checked in full, and each variant runs once. */
const LOOP_MS = 90_000
const WAIT_MS = 30_000

/**
 * How the subscriber leaves: `offline` DISCONNECT, and a publish once GET /v1/sessions lists it offline;
 * `disconnect` DISCONNECT; `drop` its socket closed without one and the reconnect at once; `takeover` it does not:
 * the new connection takes the session from the one still open. With `drop` and `takeover` the old connection stops
 * sending PUBACKs first, so what it got last is in flight when it goes and must come again, with DUP [MQTT-4.4.0-1].
 */
const LEAVES = ['offline', 'disconnect', 'drop', 'takeover'] as const

interface Message { readonly body: string, readonly retain: boolean, readonly dup: boolean }

/**
 * A client whose listener records into `received` from before its CONNECT (see the header); `until` resolves once
 * `check` holds, looked at on each message, or rejects after `ms`. The CONNECT is bounded by `ms` too.
 */
async function connectListening (url: string, options: mqtt.IClientOptions, received: Message[], ms: number): Promise<{
  client: mqtt.MqttClient
  until (check: () => boolean, ms: number): Promise<void>
}> {
  const client = mqtt.connect(url, options)
  client.on('message', (_topic, payload, packet) => received.push({ body: payload.toString(), retain: packet.retain, dup: packet.dup }))
  client.on('error', () => {}) // a refused or dropped connection shows as a missing message
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => { client.end(true); reject(new Error(`${String(options.clientId)}: no CONNACK within ${ms} ms`)) }, ms)
    client.once('connect', () => { clearTimeout(timer); resolve() })
    client.once('close', () => { clearTimeout(timer); reject(new Error(`${String(options.clientId)}: connection closed before the CONNACK`)) })
  })
  const until = (check: () => boolean, ms: number): Promise<void> => check()
    ? Promise.resolve()
    : new Promise((resolve, reject) => {
      const timer = setTimeout(() => { client.off('message', on); reject(new Error('timed out')) }, ms)
      const on = (): void => { if (check()) { clearTimeout(timer); client.off('message', on); resolve() } }
      client.on('message', on)
    })
  return { client, until }
}

describe('messages published around a persistent subscriber\'s disconnect', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it('reach the session on its next connection, every acknowledged one, with RETAIN as published (3.1.1 and 5)', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())

    const offline = async (clientId: string): Promise<void> => {
      const deadline = Date.now() + WAIT_MS
      for (;;) {
        const res = await fetch(`${gw.httpUrl}/v1/sessions`)
        const { sessions } = await res.json() as { sessions: Array<{ clientId: string, connected: boolean }> }
        if (sessions.some((s) => s.clientId === clientId && !s.connected)) return
        if (Date.now() > deadline) throw new Error(`session ${clientId} not offline after ${WAIT_MS} ms`)
        await new Promise((resolve) => setTimeout(resolve, 10))
      }
    }

    const started = Date.now()
    const failures: string[] = []
    let cycles = 0
    // Stops at the first failing cycle, so that a systematic failure is reported, not lost in the test's timeout.
    for (let i = 0; i < CYCLES && failures.length === 0 && (i < 2 * LEAVES.length * 2 || Date.now() - started < LOOP_MS); i++, cycles++) {
      const version: 4 | 5 = i % 2 === 0 ? 5 : 4
      const retain = (i >> 1) % 2 === 0
      const leave = LEAVES[(i >> 2) % LEAVES.length] as typeof LEAVES[number]
      const variant = `cycle ${i} (MQTT ${version}, retain ${retain}, ${leave})`
      const clientId = `sub-${i}`
      const topic = `devices/dev-${i}/telemetry/t`
      // What the first connection got, and what the next one got.
      const received: Message[] = []
      const again: Message[] = []
      const options = {
        clientId, clean: false, protocolVersion: version, reconnectPeriod: 0, ...(version === 5 ? { properties: { sessionExpiryInterval: 3600 } } : {}),
      }
      const sub = await connectListening(gw.mqttUrl, options, received, WAIT_MS)
      cleanups.push(async () => { sub.client.end(true) })
      // A filter of its own: a SUBSCRIBE to a wider one would get an earlier cycle's retained message.
      await sub.client.subscribeAsync(`devices/dev-${i}/telemetry/#`, { qos: 1, ...(version === 5 ? { rap: true } : {}) })
      const device = await mqtt.connectAsync(gw.mqttUrl, { clientId: `dev-${i}`, reconnectPeriod: 0 })
      cleanups.push(async () => { device.end(true) })
      await device.publishAsync(topic, 'before', { qos: 1, retain })
      await sub.until(() => received.some((m) => m.body === 'before'), WAIT_MS)
      const inFlight = leave === 'drop' || leave === 'takeover'
      // MQTT.js emits a QoS 1 message, then sends its PUBACK once handleMessage calls back; this one never does.
      if (inFlight) sub.client.handleMessage = () => {}

      // One publish goes out with the leaving, one once the client has left; with `offline`, one once the gateway
      // lists the session offline. With `drop` and `takeover`, `around` is first in flight on the old connection, then
      // the new connection comes at once, while `closing` is appended and while the gateway may still hold the old one.
      // Each is acknowledged before the marker.
      const acked = [device.publishAsync(topic, 'around', { qos: 1, retain })]
      let back: Awaited<ReturnType<typeof connectListening>> | undefined
      if (inFlight) {
        await sub.until(() => received.some((m) => m.body === 'around'), WAIT_MS)
        if (leave === 'drop') sub.client.end(true)
        acked.push(device.publishAsync(topic, 'closing', { qos: 1, retain }))
        back = await connectListening(gw.mqttUrl, options, again, WAIT_MS)
      } else {
        await sub.client.endAsync()
        acked.push(device.publishAsync(topic, 'closing', { qos: 1, retain }))
      }
      if (leave === 'offline') {
        await offline(clientId)
        acked.push(device.publishAsync(topic, 'offline', { qos: 1, retain }))
      }
      await Promise.all(acked)
      back ??= await connectListening(gw.mqttUrl, options, again, WAIT_MS)
      const { client } = back
      cleanups.push(async () => { client.end(true) })
      await device.publishAsync(topic, 'marker', { qos: 1 })
      try {
        await back.until(() => again.some((m) => m.body === 'marker'), WAIT_MS)
      } catch {
        failures.push(`${variant}: no marker within ${WAIT_MS} ms`)
      }
      // Every message once at least, in order; a delivery whose PUBACK the old connection never sent comes again on
      // the new one, with DUP [MQTT-4.4.0-1].
      const all = [...received, ...again]
      const bodies = [...new Set(all.map((m) => m.body))]
      const want = ['before', 'around', 'closing', ...(leave === 'offline' ? ['offline'] : []), 'marker']
      if (JSON.stringify(bodies) !== JSON.stringify(want)) failures.push(`${variant}: got ${JSON.stringify(received)} then ${JSON.stringify(again)}`)
      if (inFlight && !again.some((m) => m.body === 'around' && m.dup)) failures.push(`${variant}: the unacknowledged 'around' not resent with DUP: ${JSON.stringify(again)}`)
      // RETAIN 1 only under Retain As Published (MQTT 5 here) for a message published with it [MQTT-3.3.1-12] [MQTT-3.3.1-13].
      for (const [i, m] of all.entries()) {
        if (m.retain !== (version === 5 && retain && m.body !== 'marker')) failures.push(`${variant}: ${m.body} with RETAIN ${m.retain}`)
        if (!m.dup && all.slice(0, i).some((earlier) => earlier.body === m.body)) failures.push(`${variant}: ${m.body} again without DUP`)
      }
      await back.client.endAsync()
      await device.endAsync()
    }
    expect(failures).toEqual([])
    expect(cycles).toBeGreaterThanOrEqual(2 * LEAVES.length * 2) // every variant ran, the loop did not end early
    expect(await gw.stop()).toBe(0)
  }, 300_000)
})
