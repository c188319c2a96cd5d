/**
 * Commands from the cloud to devices, through a real Mosquitto upstream: a
 * command is stored before it is acknowledged upstream, reaches a device that
 * was offline when it arrived — also after the gateway was SIGKILLed in
 * between — and an expired one is not delivered. Receipts go back upstream.
 * A command goes to the device it addresses only: a service subscribed to
 * every device's commands neither takes it nor makes it "delivered", and an
 * expired command is not sent from a persistent session's queue either.
 * A command sent with an MQTT 5 Response Topic gets its receipt there, with
 * its Correlation Data, also across a SIGKILL of the gateway.
 */
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../helpers/gateway-process.ts'
import { bridgeStatus, startCommandCloud, waitFor } from '../helpers/bridge-fixtures.ts'
import { mosquittoPolicy } from '../helpers/mosquitto-process.ts'

const policy = mosquittoPolicy()
const bin = policy.bin

it.runIf(policy.missingInCi)('has mosquitto under CI', () => {
  expect.fail('mosquitto is missing: .ci/run installs it; the commands tests cannot run')
})

async function startEdge (dir: string, upstreamUrl: string): Promise<GatewayProcess> {
  const config = await writeConfig(dir, {
    gatewayId: 'edge-1',
    mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    bridge: {
      commitIntervalMs: 100,
      upstreams: [{
        name: 'cloud', url: upstreamUrl, mqttVersion: '5', forward: [], reconnectMinMs: 50, reconnectMaxMs: 500,
        commands: [{ remote: 'cmd/{site}/+/#', local: 'devices/+/commands/#' }],
      }],
    },
  })
  return startGatewayProcess({ dataDir: `${dir}/data`, config })
}

/** A device that subscribes to its command topics and records what arrives. */
async function device (url: string, id: string): Promise<{ client: MqttClient, got: Array<{ topic: string, payload: string }> }> {
  const client = await mqtt.connectAsync(url, { clientId: id, reconnectPeriod: 0 })
  client.on('error', () => {})
  const got: Array<{ topic: string, payload: string }> = []
  client.on('message', (topic, payload) => { got.push({ topic, payload: payload.toString() }) })
  await client.subscribeAsync(`devices/${id}/commands/#`, { qos: 1 })
  return { client, got }
}

describe.skipIf(bin === null)('bridge: commands to devices', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it('stores commands, delivers them to devices that connect later (across a SIGKILL), and lets expired ones lapse', async () => {
    const { dir, cleanup } = await tempDir('edgemq-commands-')
    cleanups.push(cleanup)
    const { upstream: up, cloud, receipts } = await startCommandCloud(bin as string, dir, cleanups)

    let edge = await startEdge(dir, up.url)
    cleanups.push(() => edge.kill())
    await waitFor('the edge to subscribe upstream', () => up.log().includes('cmd/edge-1/+/#') ? true : undefined)

    // Online device: delivered at once.
    const online = await device(edge.mqttUrl, 'dev-on')
    cleanups.push(() => online.client.endAsync())
    await cloud.publishAsync('cmd/edge-1/dev-on/led', 'on', { qos: 1 })
    await waitFor('the online device to get its command', () => online.got.length > 0 ? true : undefined)
    expect(online.got).toEqual([{ topic: 'devices/dev-on/commands/led', payload: 'on' }])
    // Delivered is the device's PUBACK: its receipt comes once the gateway has that.
    expect(await waitFor('the online device\'s receipt', () => receipts.find((r) => r.topic === 'devices/dev-on/commands/led')?.status)).toBe('delivered')

    // Offline devices: one command without expiry, one that expires in 1 s.
    await cloud.publishAsync('cmd/edge-1/dev-1/reboot', 'reboot-now', { qos: 1 })
    await cloud.publishAsync('cmd/edge-1/dev-2/reboot', 'too-late', { qos: 1, properties: { messageExpiryInterval: 1 } })
    await waitFor('both commands stored', async () => (await bridgeStatus(edge.httpUrl))[0]?.commandsReceived === 3 ? true : undefined)
    const storedBy = Date.now() // the edge took dev-2's command before now: it expires 1 s after that at the latest
    await online.client.endAsync()
    await edge.kill() // SIGKILL while both wait for their devices
    // Sent while the edge is down: the edge's persistent session at the upstream holds it.
    await cloud.publishAsync('cmd/edge-1/dev-3/fw', 'v2', { qos: 1 })

    await waitFor('dev-2\'s command to expire', () => Date.now() > storedBy + 1000 ? true : undefined)
    edge = await startEdge(dir, up.url)
    const dev1 = await device(edge.mqttUrl, 'dev-1')
    const dev2 = await device(edge.mqttUrl, 'dev-2')
    const dev3 = await device(edge.mqttUrl, 'dev-3')
    cleanups.push(() => dev1.client.endAsync(), () => dev2.client.endAsync(), () => dev3.client.endAsync())
    await waitFor('dev-1 and dev-3 to get their commands', () => dev1.got.length > 0 && dev3.got.length > 0 ? true : undefined)
    expect(dev1.got).toEqual([{ topic: 'devices/dev-1/commands/reboot', payload: 'reboot-now' }])
    expect(dev3.got).toEqual([{ topic: 'devices/dev-3/commands/fw', payload: 'v2' }])

    await waitFor('four receipts upstream', () => receipts.length >= 4 ? true : undefined)
    const byTopic = new Map(receipts.map((r) => [r.topic, r.status]))
    expect(byTopic).toEqual(new Map([
      ['devices/dev-on/commands/led', 'delivered'],
      ['devices/dev-1/commands/reboot', 'delivered'],
      ['devices/dev-2/commands/reboot', 'expired'],
      ['devices/dev-3/commands/fw', 'delivered'],
    ]))
    expect(dev2.got).toEqual([])
    const metrics = await (await fetch(`${edge.httpUrl}/metrics`)).text()
    expect(metrics).toMatch(/edgemq_bridge_commands_expired_total\{upstream="cloud"\} 1/)
    expect(metrics).toMatch(/edgemq_bridge_commands_delivered_total\{upstream="cloud"\} 2/) // since this restart: dev-1's and dev-3's
  })

  it('publishes the receipt of a command with a response topic there, with its correlation data, across a SIGKILL', async () => {
    const { dir, cleanup } = await tempDir('edgemq-commands-response-')
    cleanups.push(cleanup)
    const { upstream: up, cloud, receipts } = await startCommandCloud(bin as string, dir, cleanups)
    const replies: Array<{ topic: string, correlation: string, status: string }> = []
    cloud.on('message', (topic, payload, packet) => {
      if (!topic.startsWith('replies/')) return
      const status = (JSON.parse(payload.toString()) as { status: string }).status
      replies.push({ topic, correlation: packet.properties?.correlationData?.toString() ?? '', status })
    })
    await cloud.subscribeAsync('replies/#', { qos: 1 })
    let edge = await startEdge(dir, up.url)
    cleanups.push(() => edge.kill())
    await waitFor('the edge to subscribe upstream', () => up.log().includes('cmd/edge-1/+/#') ? true : undefined)
    await cloud.publishAsync('cmd/edge-1/dev-r/led', 'on', { qos: 1, properties: { responseTopic: 'replies/app-1', correlationData: Buffer.from('req-1') } })
    await cloud.publishAsync('cmd/edge-1/dev-x/led', 'late', {
      qos: 1, properties: { responseTopic: 'replies/app-2', correlationData: Buffer.from('req-2'), messageExpiryInterval: 1 },
    })
    await waitFor('both commands stored', async () => (await bridgeStatus(edge.httpUrl))[0]?.commandsReceived === 2 ? true : undefined)
    await edge.kill() // the response topics and correlation data are kept with the commands in the log

    edge = await startEdge(dir, up.url)
    const client = await mqtt.connectAsync(edge.mqttUrl, { clientId: 'dev-r', protocolVersion: 5, reconnectPeriod: 0 })
    cleanups.push(() => client.endAsync())
    const got: Array<{ payload: string, responseTopic?: string }> = []
    client.on('message', (_topic, payload, packet) => { got.push({ payload: payload.toString(), ...packet.properties?.responseTopic === undefined ? {} : { responseTopic: packet.properties.responseTopic } }) })
    await client.subscribeAsync('devices/dev-r/commands/#', { qos: 1 })
    await waitFor('both replies', () => replies.length >= 2 ? true : undefined)
    expect(got).toEqual([{ payload: 'on' }]) // the response topic is the upstream's: the device does not get it
    expect(replies.sort((a, b) => a.topic.localeCompare(b.topic))).toEqual([
      { topic: 'replies/app-1', correlation: 'req-1', status: 'delivered' },
      { topic: 'replies/app-2', correlation: 'req-2', status: 'expired' },
    ])
    // The fixture collects every message the cloud client gets: the two replies, and nothing at receiptTopic besides.
    expect(receipts.map((r) => r.status).sort()).toEqual(['delivered', 'expired'])
  })

  it('counts a command delivered only when its device takes it, and sends no expired command from a session queue', async () => {
    const { dir, cleanup } = await tempDir('edgemq-commands-addressed-')
    cleanups.push(cleanup)
    const { upstream: up, cloud, receiptFor } = await startCommandCloud(bin as string, dir, cleanups)
    const command = async (device: string, name: string, expirySeconds?: number): Promise<void> => {
      await cloud.publishAsync(`cmd/edge-1/${device}/${name}`, name, { qos: 1, ...(expirySeconds === undefined ? {} : { properties: { messageExpiryInterval: expirySeconds } }) })
    }

    const edge = await startEdge(dir, up.url)
    cleanups.push(() => edge.kill())
    await waitFor('the edge to subscribe upstream', () => up.log().includes('cmd/edge-1/+/#') ? true : undefined)
    const connect = async (id: string): Promise<{ client: MqttClient, got: string[] }> => {
      // Listening before CONNECT: MQTT.js emits a PUBLISH that arrives in the CONNACK's read before connectAsync resolves.
      const client = mqtt.connect(edge.mqttUrl, { clientId: id, clean: false, reconnectPeriod: 0 })
      client.on('error', () => {})
      const got: string[] = []
      client.on('message', (_topic, payload) => { got.push(payload.toString()) })
      cleanups.push(() => client.endAsync(true))
      await new Promise<void>((resolve, reject) => { client.once('connect', () => resolve()); client.once('close', () => reject(new Error(`${id}: connection closed before CONNACK`))) })
      return { client, got }
    }

    // A service watching every device's commands, and a device with a persistent session that is offline.
    const service = await connect('svc-watch')
    await service.client.subscribeAsync('devices/+/commands/#', { qos: 1 })
    const away = await connect('dev-away')
    await away.client.subscribeAsync('devices/dev-away/commands/#', { qos: 1 })
    await away.client.endAsync()
    await command('dev-away', 'stale', 1)
    expect(await receiptFor('devices/dev-away/commands/stale')).toBe('expired')

    // Back after the time-to-live: the next command is all it gets, nothing from its session's queue.
    const back = await connect('dev-away')
    await command('dev-away', 'fresh')
    await waitFor('dev-away to get its fresh command', () => back.got.includes('fresh') ? true : undefined)
    expect(await receiptFor('devices/dev-away/commands/fresh')).toBe('delivered')
    expect(back.got).toEqual(['fresh'])
    expect(service.got).toEqual([])

    // A device that takes a command but dies before its PUBACK did not receive it as far as anyone can tell: no
    // "delivered" receipt; the command is pending again, and past its time-to-live it expires and is never resent.
    const flaky = await connect('dev-flaky')
    await flaky.client.subscribeAsync('devices/dev-flaky/commands/#', { qos: 1 })
    const unacked: string[] = []
    flaky.client.handleMessage = (packet, _callback) => { unacked.push(String(packet.payload)) } // never calls back: no PUBACK
    await command('dev-flaky', 'once', 1)
    await waitFor('dev-flaky to get the command it will not acknowledge', () => unacked.length > 0 ? true : undefined)
    flaky.client.end(true)
    expect(await receiptFor('devices/dev-flaky/commands/once')).toBe('expired')
    const again = await connect('dev-flaky')
    await command('dev-flaky', 'next')
    await waitFor('dev-flaky to get its next command', () => again.got.includes('next') ? true : undefined)
    expect(again.got).toEqual(['next'])
    expect(await receiptFor('devices/dev-flaky/commands/next')).toBe('delivered')
    expect(service.got).toEqual([])
  })
})
