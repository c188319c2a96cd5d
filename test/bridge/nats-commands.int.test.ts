/**
 * Commands from NATS JetStream to devices: a durable pull consumer per
 * mapping; a command is acknowledged to JetStream only once it is in the
 * local log, reaches a device that was offline — also after the gateway was
 * SIGKILLed in between, and one sent while the gateway was down — and one
 * whose time-to-live ran out in JetStream is not delivered. Receipts go back
 * up to the stream on nats.receiptSubject.
 */
import { jetstream, jetstreamManager } from '@nats-io/jetstream'
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { bridgeStatus, waitFor } from '../helpers/bridge-fixtures.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../helpers/gateway-process.ts'
import { natsClient, natsPolicy, readStream, startNatsServer } from '../helpers/nats-process.ts'

const policy = natsPolicy()
const bin = policy.bin

it.runIf(policy.missingInCi)('has nats-server under CI', () => {
  expect.fail('nats-server is missing: .ci/run installs it; the NATS commands tests cannot run')
})

const TTL_MS = 1500

async function startEdge (dir: string, url: string): Promise<GatewayProcess> {
  const config = await writeConfig(dir, {
    gatewayId: 'edge-1',
    mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    bridge: {
      commitIntervalMs: 100,
      upstreams: [{
        name: 'js', url, forward: [], reconnectMinMs: 50, reconnectMaxMs: 500,
        nats: { commandStream: 'CMDS', stream: { create: true } },
        commands: [
          { remote: 'cmd/{site}/+/#', local: 'devices/+/commands/#' },
          { remote: 'ttl/{site}/+/#', local: 'devices/+/commands/#', ttlMs: TTL_MS },
        ],
      }],
    },
  })
  return await startGatewayProcess({ dataDir: `${dir}/data`, config })
}

async function device (url: string, id: string): Promise<{ client: MqttClient, got: Array<{ topic: string, payload: string }> }> {
  const client = await mqtt.connectAsync(url, { clientId: id, reconnectPeriod: 0 })
  client.on('error', () => {})
  const got: Array<{ topic: string, payload: string }> = []
  client.on('message', (topic, payload) => { got.push({ topic, payload: payload.toString() }) })
  await client.subscribeAsync(`devices/${id}/commands/#`, { qos: 1 })
  return { client, got }
}

describe.skipIf(bin === null)('bridge: commands from NATS JetStream', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it('acks after the local append, delivers across a SIGKILL and an outage, lets expired ones lapse, and sends receipts up', async () => {
    const { dir, cleanup } = await tempDir('edgemq-nats-commands-')
    cleanups.push(cleanup)
    const nats = await startNatsServer(bin as string, dir)
    cleanups.push(() => nats.kill())
    const nc = await natsClient(nats.url)
    cleanups.push(() => nc.close())
    const jsm = await jetstreamManager(nc)
    await jsm.streams.add({ name: 'CMDS', subjects: ['cmd.>', 'ttl.>'] })
    const js = jetstream(nc)
    const receipts = async (): Promise<Map<string, string>> => {
      const stored = await readStream(nc, 'EDGEMQ').catch(() => [])
      const out = new Map<string, string>()
      for (const m of stored) {
        expect(m.subject.startsWith('edgemq.edge-1.receipts.devices.')).toBe(true)
        const r = JSON.parse(m.payload) as { topic: string, status: string }
        out.set(r.topic, r.status)
      }
      return out
    }
    /** Commands of mapping k not acknowledged yet: not delivered, or delivered (to a pull of the killed edge) and not acked. */
    const pending = async (k: number): Promise<number> => {
      const info = await jsm.consumers.info('CMDS', `edgemq-edge-1-js-${k}`)
      return info.num_pending + info.num_ack_pending
    }

    let edge = await startEdge(dir, nats.url)
    cleanups.push(() => edge.kill())
    await waitFor('the edge\'s consumers', async () => (await jsm.consumers.list('CMDS').next()).length === 2 ? true : undefined)

    // Online device: delivered at once, and the receipt goes up.
    const online = await device(edge.mqttUrl, 'dev-on')
    cleanups.push(() => online.client.endAsync())
    await js.publish('cmd.edge-1.dev-on.led', 'on')
    await waitFor('the online device to get its command', () => online.got.length > 0 ? true : undefined)
    expect(online.got).toEqual([{ topic: 'devices/dev-on/commands/led', payload: 'on' }])
    expect(await waitFor('its receipt upstream', async () => (await receipts()).get('devices/dev-on/commands/led'))).toBe('delivered')

    // Offline devices: one command without TTL, one with.
    await js.publish('cmd.edge-1.dev-1.reboot', 'reboot-now')
    await waitFor('both commands stored and acknowledged', async () => {
      return (await bridgeStatus(edge.httpUrl))[0]?.commandsReceived === 2 && await pending(0) === 0 ? true : undefined
    })
    await online.client.endAsync()
    await edge.kill() // SIGKILL while dev-1's command waits for its device
    // Sent while the edge is down: JetStream keeps them for the durable consumers, unacknowledged.
    await js.publish('cmd.edge-1.dev-3.fw', 'v2')
    await js.publish('ttl.edge-1.dev-2.reboot', 'too-late')
    const storedBy = Date.now() // JetStream stored it before its PubAck: its TTL counts from then
    expect(await pending(0)).toBe(1)
    expect(await pending(1)).toBe(1)
    await waitFor('dev-2\'s command to outlive its TTL in JetStream', () => Date.now() > storedBy + TTL_MS ? true : undefined, 10_000, 50)

    edge = await startEdge(dir, nats.url)
    const dev1 = await device(edge.mqttUrl, 'dev-1')
    const dev2 = await device(edge.mqttUrl, 'dev-2')
    const dev3 = await device(edge.mqttUrl, 'dev-3')
    cleanups.push(() => dev1.client.endAsync(), () => dev2.client.endAsync(), () => dev3.client.endAsync())
    await waitFor('dev-1 and dev-3 to get their commands', () => dev1.got.length > 0 && dev3.got.length > 0 ? true : undefined)
    expect(dev1.got).toEqual([{ topic: 'devices/dev-1/commands/reboot', payload: 'reboot-now' }])
    expect(dev3.got).toEqual([{ topic: 'devices/dev-3/commands/fw', payload: 'v2' }])

    const all = await waitFor('four receipts upstream', async () => { const r = await receipts(); return r.size >= 4 ? r : undefined })
    expect(all).toEqual(new Map([
      ['devices/dev-on/commands/led', 'delivered'],
      ['devices/dev-1/commands/reboot', 'delivered'],
      ['devices/dev-2/commands/reboot', 'expired'],
      ['devices/dev-3/commands/fw', 'delivered'],
    ]))
    expect(dev2.got).toEqual([])
    expect(await pending(0)).toBe(0)
    expect(await pending(1)).toBe(0)
    const metrics = await (await fetch(`${edge.httpUrl}/metrics`)).text()
    expect(metrics).toMatch(/edgemq_bridge_commands_expired_total\{upstream="js"\} 1/)
    expect(metrics).toMatch(/edgemq_bridge_commands_received_total\{upstream="js"\} 2/) // since this restart: dev-3's and dev-2's
  })
})
