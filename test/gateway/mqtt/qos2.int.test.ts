/**
 * QoS 2 goes into the log exactly once: a retransmission with DUP is not
 * appended again, not even after the gateway was SIGKILLed between PUBREC and
 * PUBREL; once PUBREL completes the exchange the packet id may be reused.
 */
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir } from '../../helpers/gateway-process.ts'
import { readWholeLog } from '../../helpers/log-reader.ts'
import { rawConnect, type RawClient } from '../../helpers/raw-client.ts'

const TOPIC = 'devices/q2dev/telemetry/x'

async function connect (url: string, clean: boolean): Promise<RawClient> {
  const c = await rawConnect(url)
  c.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'q2dev', clean, keepalive: 30 })
  expect(await c.next('connack')).toMatchObject({ returnCode: 0 })
  return c
}

function publish (c: RawClient, messageId: number, payload: string, dup: boolean): void {
  c.send({ cmd: 'publish', topic: TOPIC, payload: Buffer.from(payload), qos: 2, messageId, dup, retain: false })
}

describe('QoS 2 exactly once into the log', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups) await c() })

  it('appends once across DUP retransmissions and a kill -9 between PUBREC and PUBREL', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    let gw = await startGatewayProcess({ dataDir: dir })
    let c = await connect(gw.mqttUrl, false)
    publish(c, 7, 'A', false)
    expect(await c.next('pubrec')).toMatchObject({ messageId: 7 })
    publish(c, 7, 'A', true) // the device did not see the PUBREC and retransmits
    expect(await c.next('pubrec')).toMatchObject({ messageId: 7 })
    await gw.kill()
    c.end()

    gw = await startGatewayProcess({ dataDir: dir })
    c = await connect(gw.mqttUrl, false)
    publish(c, 7, 'A', true)
    expect(await c.next('pubrec')).toMatchObject({ messageId: 7 })
    c.send({ cmd: 'pubrel', messageId: 7 })
    expect(await c.next('pubcomp')).toMatchObject({ messageId: 7 })
    // The exchange is complete: packet id 7 carries a new message now.
    publish(c, 7, 'B', false)
    expect(await c.next('pubrec')).toMatchObject({ messageId: 7 })
    c.send({ cmd: 'pubrel', messageId: 7 })
    expect(await c.next('pubcomp')).toMatchObject({ messageId: 7 })
    c.end()
    expect(await gw.stop()).toBe(0)

    const records = (await readWholeLog(dir)).filter((r) => r.clientId === 'q2dev')
    expect(records.map((r) => r.payload)).toEqual(['A', 'B'])
    expect(records.every((r) => r.stream === 'default/telemetry' && r.key === 'q2dev' && r.topic === TOPIC)).toBe(true)
  })

  it('forgets unfinished exchanges when the client starts a clean session', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const gw = await startGatewayProcess({ dataDir: dir })
    let c = await connect(gw.mqttUrl, false)
    publish(c, 9, 'first', false)
    expect(await c.next('pubrec')).toMatchObject({ messageId: 9 })
    c.end()
    await c.closed
    // A clean session discards the unfinished exchange, so packet id 9 is a new message.
    c = await connect(gw.mqttUrl, true)
    publish(c, 9, 'second', false)
    expect(await c.next('pubrec')).toMatchObject({ messageId: 9 })
    c.end()
    expect(await gw.stop()).toBe(0)
    expect((await readWholeLog(dir)).filter((r) => r.clientId === 'q2dev').map((r) => r.payload)).toEqual(['first', 'second'])
  })

  it('keeps a device\'s order in the log when QoS 2 and QoS 0/1 publishes arrive in one write', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    const gw = await startGatewayProcess({ dataDir: dir })
    const c = await connect(gw.mqttUrl, true)
    const order = ['q2-a', 'q1-b', 'q2-c', 'q0-d', 'q1-e', 'q2-f']
    c.sendAll(order.map((payload, i) => {
      const qos = Number(payload[1]) as 0 | 1 | 2
      return { cmd: 'publish' as const, topic: TOPIC, payload: Buffer.from(payload), qos, messageId: qos === 0 ? undefined : i + 1, dup: false, retain: false }
    }))
    for (let i = 0; i < 3; i++) await c.next('pubrec')
    for (let i = 0; i < 2; i++) await c.next('puback')
    c.end()
    expect(await gw.stop()).toBe(0)
    expect((await readWholeLog(dir)).filter((r) => r.clientId === 'q2dev').map((r) => r.payload)).toEqual(order)
  })
})
