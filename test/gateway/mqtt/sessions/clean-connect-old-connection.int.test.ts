/**
 * A clean CONNECT (MQTT 5 Clean Start 1, Session Expiry 3600) takes over a connection of its client id that has
 * stopped reading: the DISCONNECT (0x8E) the takeover sends it waits for its socket to drain (mqtt.slowSubscriberTimeoutMs
 * 0: for ever), and the new connection has its CONNACK meanwhile. The old connection still sends: a SUBSCRIBE and a
 * QoS 2 PUBLISH with packet id 7. Then the new connection publishes with packet id 7, and the gateway is killed (-9).
 * Before, both of the old connection's packets landed in the new session: its PUBLISH with id 7 was taken for a
 * retransmission and never logged (PUBREC all the same: a loss the device cannot see), and after the restart the
 * session held the old connection's subscription. Now the old connection's SUBSCRIBE is refused (the gateway closes
 * it, acknowledging nothing), and the new connection's message is in the log. The orderings, held step by step:
 * clean-connect-old-connection.test.ts.
 */
import net from 'node:net'
import mqttPacket, { type Packet } from 'mqtt-packet'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { gatewayFiles, type GatewayFiles, type GatewayProcess } from '../../../helpers/gateway-process.ts'
import { waitFor } from '../../../helpers/mqtt-probe.ts'
import { rawConnect } from '../../../helpers/raw-client.ts'
import { logLines, readWholeLog, scrape, total } from '../../../helpers/raw-mqtt.ts'
import mqtt from 'mqtt'

const WAIT_MS = 20_000
const CLIENT_ID = 'dev-1'
const TOPIC = `devices/${CLIENT_ID}/telemetry/t`
/** Enough live QoS 0 bytes to the old connection to fill the loopback socket's buffers, so its DISCONNECT waits. */
const FLOOD = 400
const FLOOD_PAYLOAD = Buffer.alloc(64 * 1024, 1)

/** An MQTT 5 connection on a bare socket, whose reading can be stopped. */
async function openV5 (url: string): Promise<{ socket: net.Socket, send (p: Packet): void, next (cmd: Packet['cmd']): Promise<Packet> }> {
  const { hostname, port } = new URL(url)
  const socket = net.connect(Number(port), hostname)
  await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject) })
  socket.on('error', () => {})
  const parser = mqttPacket.parser({ protocolVersion: 5 })
  const got: Packet[] = []
  parser.on('packet', (p: Packet) => { got.push(p) })
  socket.on('data', (d) => parser.parse(d))
  return {
    socket,
    send: (p) => { socket.write(mqttPacket.generate(p, { protocolVersion: 5 })) },
    async next (cmd) {
      expect(await waitFor(() => got.some((p) => p.cmd === cmd), WAIT_MS), `a ${cmd}`).toBe(true)
      return got.splice(got.findIndex((p) => p.cmd === cmd), 1)[0] as Packet
    },
  }
}

describe('the connection a clean CONNECT takes over, stuck in its DISCONNECT', () => {
  let files: GatewayFiles
  let gw: GatewayProcess
  beforeAll(async () => {
    files = await gatewayFiles({ slowSubscriberTimeoutMs: 0 })
    gw = await files.start()
  })
  afterAll(async () => { await gw?.kill(); await files?.cleanup() })

  it('writes nothing into the new session: its message with the same packet id is logged, and no subscription of the old one survives a kill -9', async () => {
    const old = await openV5(gw.mqttUrl)
    old.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: CLIENT_ID, clean: false, keepalive: 0, properties: { sessionExpiryInterval: 3600 } })
    await old.next('connack')
    old.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: `cmd/${CLIENT_ID}`, qos: 0 }] })
    await old.next('suback')
    old.socket.pause() // reads nothing from now on

    // The flood reaches the old connection: its publisher gets every message back, after the old connection's copy.
    const flood = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'flood', reconnectPeriod: 0 })
    let echoed = 0
    flood.on('message', () => { echoed++ })
    await flood.subscribeAsync(`cmd/${CLIENT_ID}`, { qos: 0 })
    for (let n = 0; n < FLOOD; n++) flood.publish(`cmd/${CLIENT_ID}`, FLOOD_PAYLOAD, { qos: 0 })
    expect(await waitFor(() => echoed === FLOOD, WAIT_MS * 3)).toBe(true)
    await flood.endAsync()

    const fresh = await rawConnect(gw.mqttUrl, 5)
    fresh.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clientId: CLIENT_ID, clean: true, keepalive: 0, properties: { sessionExpiryInterval: 3600 } })
    expect(await fresh.next('connack', WAIT_MS)).toMatchObject({ reasonCode: 0, sessionPresent: false })

    old.send({ cmd: 'subscribe', messageId: 2, subscriptions: [{ topic: `cmd/${CLIENT_ID}/old`, qos: 1 }] })
    old.send({ cmd: 'publish', topic: TOPIC, payload: Buffer.from('old'), qos: 2, messageId: 7, retain: false, dup: false })
    // Handled: refused (the gateway logs the error and closes it), or, as before, logged.
    const refused = (): boolean => logLines(gw.stderr()).some((l) => l.msg === 'client error' && String(l.err).includes('refused'))
    const logged = async (): Promise<boolean> => total(await scrape(gw.httpUrl), 'edgemq_partition_log_end_offset') >= 1
    expect(await waitFor(async () => refused() || await logged(), WAIT_MS)).toBe(true)

    fresh.send({ cmd: 'publish', topic: TOPIC, payload: Buffer.from('new'), qos: 2, messageId: 7, retain: false, dup: false })
    expect(await fresh.next('pubrec', WAIT_MS)).toMatchObject({ messageId: 7 })
    await gw.kill()
    old.socket.destroy()
    fresh.end()

    const payloads = (await readWholeLog(files.dataDir)).map((r) => Buffer.from(r.payload).toString())
    gw = await files.start()
    const body = await (await fetch(`${gw.httpUrl}/v1/sessions`)).json() as { sessions: Array<{ clientId: string, subscriptions: unknown[] }> }
    const session = body.sessions.find((s) => s.clientId === CLIENT_ID)
    expect({ newLogged: payloads.includes('new'), subscriptions: session?.subscriptions }).toEqual({ newLogged: true, subscriptions: [] })
  }, 180_000)
})
