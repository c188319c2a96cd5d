/**
 * One SUBSCRIBE packet with many new filters, sent through aedes while the session's cursor is behind the log
 * (gateway/mqtt/sessions/cursors.ts grant): the cursor gets one fence, not one per filter, and the new filters still
 * get only what is logged after the SUBACK. aedes stores each filter of a SUBSCRIBE with a call of its own
 * (aedes-internals.ts storeAcceptedSubscriptions); found by review: 1,000 filters made 1,000 fences at one offset, a
 * K value of 16,008 bytes, rewritten once per filter. A `$share/` filter in the same packet adds no fence and no eras.
 * The session never acknowledges before the gateway stops (its cursor stays behind), and drains after the restart.
 */
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import mqtt from 'mqtt'
import type { Packet } from 'mqtt-packet'
import { afterAll, describe, expect, it } from 'vitest'
import { TAG_CURSOR, TAG_SUB } from '../../../../gateway/mqtt/sessions/format.ts'
import { gatewayFiles, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { waitFor } from '../../../helpers/mqtt-probe.ts'
import { rawConnect } from '../../../helpers/raw-client.ts'

const WAIT_MS = 60_000
/** With the `$share/` one, mqtt.maxFiltersPerSubscribe (1,000 by default). */
const FILTERS = 999
/** The outgoing window (`mqtt.sessionInflight`) these gateways run with. */
const WINDOW = 100
/** More than the outgoing window (WINDOW): the cursor is held behind while nothing is acknowledged. */
const BACKLOG = 150
/** One device: every topic goes to one partition, read by one cursor. */
const OLD = 'devices/dev-1/telemetry/a'
const topicOf = (i: number): string => `devices/dev-1/telemetry/f${i}`

/** Publishes each [topic, body] at QoS 1 from the device, acknowledged. */
async function publish (url: string, messages: ReadonlyArray<readonly [string, string]>): Promise<void> {
  const dev = await mqtt.connectAsync(url, { clientId: 'dev-1', reconnectPeriod: 0 })
  for (const [topic, body] of messages) await dev.publishAsync(topic, body, { qos: 1 })
  await dev.endAsync()
}

/** The session's lag in messages (GET /v1/sessions): 0 once its cursors passed every record logged. */
async function lagOf (gw: GatewayProcess, clientId: string): Promise<number> {
  const res = await fetch(`${gw.httpUrl}/v1/sessions`)
  const { sessions } = await res.json() as { sessions: Array<{ clientId: string, lagMessages: number }> }
  return sessions.find((s) => s.clientId === clientId)?.lagMessages ?? NaN
}

describe('a SUBSCRIBE of many new filters while the session\'s cursor is behind', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it(`puts one fence on the cursor for ${FILTERS + 1} filters, and they get only what is logged after the SUBACK`, async () => {
    const files = await gatewayFiles({ sessionInflight: WINDOW })
    cleanups.push(files.cleanup)
    const gw = await files.start()
    cleanups.push(() => gw.kill())
    const raw = await rawConnect(gw.mqttUrl, 4)
    raw.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: false, keepalive: 60, clientId: 'svc' })
    await raw.next('connack')
    raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: OLD, qos: 1 }] })
    await raw.next('suback')
    const got: string[] = []
    raw.onPacket((p: Packet) => { if (p.cmd === 'publish') got.push(String(p.payload)) }) // never acknowledged
    await publish(gw.mqttUrl, [
      ...Array.from({ length: BACKLOG }, (_v, n) => [OLD, `a${n}`] as const),
      [topicOf(7), 'f7-before'], // logged before its filter's SUBSCRIBE: not the session's
    ])
    expect(await waitFor(() => got.length === WINDOW, WAIT_MS), 'a full window').toBe(true)

    const subscriptions = [
      ...Array.from({ length: FILTERS }, (_v, i) => ({ topic: topicOf(i), qos: 1 as const })),
      { topic: '$share/g/devices/dev-1/telemetry/#', qos: 1 as const },
    ]
    raw.send({ cmd: 'subscribe', messageId: 2, subscriptions })
    const suback = await raw.next('suback', WAIT_MS) as { granted: number[] }
    expect(suback.granted).toEqual(subscriptions.map(() => 1))
    await publish(gw.mqttUrl, [[topicOf(7), 'f7-after']])
    raw.end()
    await raw.closed
    expect(await gw.stop()).toBe(0)

    // What the SUBSCRIBE left on disk while the cursor is behind: one fence, one eras per new filter, none on the share.
    const db = new ClassicLevel<Buffer, Buffer>(path.join(files.dataDir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    await db.open()
    const withEras: string[] = []
    const fences: number[] = []
    try {
      const sessions = db.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' })
      for await (const [key, value] of sessions.iterator()) {
        if (key[0] === TAG_SUB && value.includes(Buffer.from('eras'))) withEras.push(key.subarray(3 + key.readUInt16BE(1)).toString())
        if (key[0] === TAG_CURSOR) fences.push((value.length - 8) / 16)
      }
    } finally {
      await db.close()
    }
    expect(fences).toEqual([1])
    expect(withEras).toHaveLength(FILTERS)
    expect(withEras.filter((topic) => topic.includes('$share'))).toEqual([])

    const again = await files.start()
    cleanups.push(() => again.kill())
    const client = mqtt.connect(again.mqttUrl, { clientId: 'svc', clean: false, reconnectPeriod: 0 })
    client.on('message', (_topic, payload) => { got.push(payload.toString()) })
    client.on('error', () => {})
    expect(await waitFor(async () => got.includes('f7-after') && await lagOf(again, 'svc') === 0, WAIT_MS), 'the session drained').toBe(true)
    await client.endAsync()
    const firsts = [...new Set(got)] // a delivery sent again (DUP, after the restart) counts once, where it first came
    expect(firsts.filter((b) => !b.startsWith('a'))).toEqual(['f7-after'])
    expect(firsts.filter((b) => b.startsWith('a'))).toEqual(Array.from({ length: BACKLOG }, (_v, n) => `a${n}`))
    expect(await again.stop()).toBe(0)
  }, 180_000)
})
