/**
 * MQTT 5 message expiry on every MQTT delivery path (issue 14), with a real
 * gateway process and MQTT.js clients: a persistent session reading its log
 * cursor, a shared subscription's member (MQTT 5) and a `$replay` do not get a message
 * whose Message Expiry Interval ran out before it was delivered, do get the
 * message logged after it (with the time it has left), and each skipped
 * record is counted in edgemq_mqtt_expired_dropped_total{path}. The HTTP API
 * still returns the expired record with its expiry header: a log read is not
 * an MQTT delivery.
 *
 * Each test waits for the expiry by the record's own timestamp (read over
 * HTTP), not by a fixed sleep.
 */
import path from 'node:path'
import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { connectOk, endAll, metricValue, roundTrip, subscribeGranted, waitFor } from '../../helpers/mqtt-probe.ts'

const TIMEOUT = 30_000
const V5: IClientOptions = { protocolVersion: 5, reconnectPeriod: 0 }
const EXPIRED = 'edgemq_mqtt_expired_dropped_total'

interface HttpRecord { readonly offset: number, readonly timestamp: number, readonly payload: string, readonly headers?: Record<string, string> }
interface GroupsDoc {
  readonly groups: Array<{
    subscription?: string
    streams: Array<{ stream: string, partitions: Array<{ partition: number, committedOffset: number | null }> }>
  }>
}

function received (client: MqttClient): IPublishPacket[] {
  const got: IPublishPacket[] = []
  client.on('message', (_topic, _payload, packet) => { got.push(packet) })
  return got
}

describe('MQTT 5 message expiry on delivery', () => {
  const clients = new Set<MqttClient>()
  const cleanups: Array<() => Promise<void>> = []
  let gw: GatewayProcess
  const connect = async (options: IClientOptions): Promise<MqttClient> => {
    const client = await connectOk(gw.mqttUrl, options)
    clients.add(client)
    return client
  }

  /** The device's records as the HTTP API returns them. */
  const read = async (device: string): Promise<{ partition: number, records: HttpRecord[] }> => {
    const res = await fetch(`${gw.httpUrl}/v1/streams/telemetry/records?key=${device}`)
    expect(res.status).toBe(200)
    return await res.json() as { partition: number, records: HttpRecord[] }
  }
  const records = async (device: string): Promise<HttpRecord[]> => (await read(device)).records.filter((r) => r.payload !== 'warm-up')

  /**
   * Publishes "short-lived" (expiry 1 s) then "lasting" (1 h) from `device`, and waits until the first one's
   * second, counted from its record's timestamp, is over.
   */
  const publishAndExpire = async (device: string): Promise<void> => {
    const pub = await connect({ ...V5, clientId: device })
    const topic = `devices/${device}/telemetry/t`
    await pub.publishAsync(topic, 'short-lived', { qos: 1, properties: { messageExpiryInterval: 1 } })
    await pub.publishAsync(topic, 'lasting', { qos: 1, properties: { messageExpiryInterval: 3600 } })
    const logged = await records(device)
    const short = logged.find((r) => r.payload === 'short-lived') as HttpRecord
    expect(await waitFor(() => Date.now() >= short.timestamp + 1000, 5000)).toBe(true)
    // A log read is not an MQTT delivery: the expired record is still returned, with its expiry header.
    expect((await records(device)).map((r) => [r.payload, r.headers?.['mqtt-message-expiry']])).toEqual([['short-lived', '1'], ['lasting', '3600']])
    await pub.endAsync()
  }

  const expired = (path: string): Promise<number> => metricValue(gw.httpUrl, EXPIRED, { tenant: 'default', path })

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-expiry-')
    cleanups.push(cleanup)
    const config = await writeConfig(dir, { mqtt: { listeners: [{ type: 'tcp', port: 0 }] } })
    gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    cleanups.push(async () => { await gw.stop() })
  }, 60_000)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('a persistent session back after the expiry gets only the next message, with its time left; the skip is counted', async () => {
    const options: IClientOptions = { ...V5, clientId: 'expiry-session', clean: false, properties: { sessionExpiryInterval: 600 } }
    const first = await connect(options)
    expect(await subscribeGranted(first, 'devices/d-session/telemetry/#', 1)).toEqual([1])
    await first.endAsync()
    const before = await expired('session')
    await publishAndExpire('d-session')
    const again = mqtt.connect(gw.mqttUrl, options)
    clients.add(again)
    const got = received(again)
    // "lasting" was logged after "short-lived": once it is here, "short-lived" would have come before it.
    expect(await waitFor(() => got.length > 0, 5000)).toBe(true)
    expect(got.map((p) => String(p.payload))).toEqual(['lasting'])
    const left = got[0]?.properties?.messageExpiryInterval as number
    expect(left > 0 && left <= 3600).toBe(true) // the time left [MQTT-3.3.2-6]
    expect(await expired('session')).toBe(before + 1)
  }, TIMEOUT)

  it('an MQTT 5 share member joining after the expiry gets only the next message, with its time left; counted', async () => {
    const filter = '$share/expiry/devices/d-share/telemetry/#'
    // A first member makes the group commit a position in the device's partition, then leaves.
    const warm = await connect({ clientId: 'share-warm', reconnectPeriod: 0 })
    const warmGot = received(warm)
    expect(await subscribeGranted(warm, filter, 1)).toEqual([1])
    const pub = await connect({ ...V5, clientId: 'd-share' })
    await pub.publishAsync('devices/d-share/telemetry/t', 'warm-up', { qos: 1 })
    expect(await waitFor(() => warmGot.length > 0, 5000)).toBe(true)
    const { partition, records: [warmUp] } = await read('d-share')
    expect(await waitFor(async () => {
      const doc = await (await fetch(`${gw.httpUrl}/v1/groups`)).json() as GroupsDoc
      const lanes = doc.groups.find((g) => g.subscription === filter)?.streams.find((x) => x.stream === 'telemetry')?.partitions
      return (lanes?.find((x) => x.partition === partition)?.committedOffset ?? -1) > (warmUp?.offset as number)
    }, 5000)).toBe(true)
    await warm.endAsync()
    await pub.endAsync()
    const before = await expired('share')
    await publishAndExpire('d-share')
    const member = await connect({ ...V5, clientId: 'share-member' })
    const got = received(member)
    expect(await subscribeGranted(member, filter, 1)).toEqual([1])
    expect(await waitFor(() => got.length > 0, 5000)).toBe(true)
    await roundTrip(member)
    expect(got.map((p) => String(p.payload))).toEqual(['lasting'])
    const left = got[0]?.properties?.messageExpiryInterval as number
    expect(left > 0 && left <= 3600).toBe(true) // the time left [MQTT-3.3.2-6]
    expect(await expired('share')).toBe(before + 1)
  }, TIMEOUT)

  it('a $replay from MQTT 5 and from MQTT 3.1.1 skips the expired record and delivers the next one; both skips are counted', async () => {
    await publishAndExpire('d-replay')
    const before = await expired('replay')
    const five = await connect({ ...V5, clientId: 'replayer-5' })
    const four = await connect({ clientId: 'replayer-4', reconnectPeriod: 0 })
    const got5 = received(five)
    const got4 = received(four)
    for (const c of [five, four]) expect(await subscribeGranted(c, '$replay/earliest/devices/d-replay/telemetry/#', 1)).toEqual([1])
    expect(await waitFor(() => [got5, got4].every((g) => g.some((p) => p.topic.endsWith('/$done'))), 5000)).toBe(true)
    for (const got of [got5, got4]) expect(got.filter((p) => !p.topic.endsWith('/$done')).map((p) => String(p.payload))).toEqual(['lasting'])
    const left = got5[0]?.properties?.messageExpiryInterval as number
    expect(left > 0 && left <= 3600).toBe(true)
    expect(got4[0]?.properties).toBeUndefined()
    expect(await expired('replay')).toBe(before + 2)
  }, TIMEOUT)
})
