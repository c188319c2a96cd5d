/**
 * A device's messages reach a live subscriber in the order it sent them,
 * though most are acknowledged before they are delivered and its retained
 * ones are delivered before their ack (hooks/delivery-order.ts): every 5th
 * of a stream of routed QoS 1 publishes is retained, with a window of them
 * in flight. Before delivery-order.ts the retained ones were overtaken (their
 * delivery waits for the retained store's write) and then dropped by aedes,
 * which drops a live copy whose counter is below one the subscriber already
 * got. Against a gateway process, with MQTT.js clients.
 */
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir } from '../../../helpers/gateway-process.ts'

const MESSAGES = 1500
const WINDOW = 50
const WAIT_MS = 60_000

/** Message `n`: every 5th retained. */
const retained = (n: number): boolean => n % 5 === 0

/** Device `id` publishes messages 0 … MESSAGES-1 to its telemetry topic at QoS 1, WINDOW of them unacknowledged. */
async function publishAll (url: string, id: string, retain: (n: number) => boolean): Promise<void> {
  const device = await mqtt.connectAsync(url, { clientId: id, reconnectPeriod: 0 })
  const inflight = new Set<Promise<unknown>>()
  for (let n = 0; n < MESSAGES; n++) {
    const sent = device.publishAsync(`devices/${id}/telemetry/t`, String(n), { qos: 1, retain: retain(n) }).finally(() => inflight.delete(sent))
    inflight.add(sent)
    if (inflight.size >= WINDOW) await Promise.race(inflight)
  }
  await Promise.all(inflight)
  await device.endAsync()
}

describe('live delivery order of a device\'s messages', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it('keeps it when acknowledged-then-delivered and delivered-then-acknowledged publishes mix', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    const subscriber = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'watcher', reconnectPeriod: 0 })
    const seen: number[] = []
    subscriber.on('message', (_topic, payload) => { seen.push(Number(payload.toString())) })
    await subscriber.subscribeAsync('devices/#', { qos: 1 })

    await publishAll(gw.mqttUrl, 'dev-1', retained)
    // the last message comes last, or a message is missing: wait for it, then compare
    const until = Date.now() + WAIT_MS
    while (!seen.includes(MESSAGES - 1) && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 20))
    await subscriber.endAsync()

    expect(seen).toEqual(Array.from({ length: MESSAGES }, (_, n) => n))
    expect(await gw.stop()).toBe(0)
  })

  it('loses no message of one device overtaken by another device\'s on the way to a subscriber', async () => {
    // dev-r's messages are all retained (delivered after the retained store's write), dev-f's are not (acknowledged
    // once logged, delivered right after): dev-f's overtake dev-r's. aedes dropped a live copy whose counter was below
    // one the subscriber already got, so an overtaken message was lost, not only late (the aedes patch's dedupe).
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    const subscriber = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'watcher-2', reconnectPeriod: 0 })
    const seen = new Map<string, number[]>([['dev-r', []], ['dev-f', []]])
    subscriber.on('message', (topic, payload) => { seen.get(topic.split('/')[1]!)?.push(Number(payload.toString())) })
    await subscriber.subscribeAsync('devices/#', { qos: 1 })

    await Promise.all([publishAll(gw.mqttUrl, 'dev-r', () => true), publishAll(gw.mqttUrl, 'dev-f', () => false)])
    const done = (): boolean => [...seen.values()].every((s) => s.includes(MESSAGES - 1))
    const until = Date.now() + WAIT_MS
    while (!done() && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 20))
    await subscriber.endAsync()

    const all = Array.from({ length: MESSAGES }, (_, n) => n)
    expect(seen.get('dev-f')).toEqual(all)
    expect(seen.get('dev-r')).toEqual(all)
    expect(await gw.stop()).toBe(0)
  })
})
