/**
 * "Bad input gets a clear error and loses nothing", against a real gateway
 * process: every kind of input Mosquitto refuses (and a few aedes-specific
 * ones) is sent next to a well-behaved client. For each, what a user can
 * observe: the CONNACK return code or the closed connection; the good client
 * still publishes and receives; nothing of the bad client reaches the log;
 * the refusal is counted in /metrics and logged exactly once, with the
 * client id when the gateway knows it.
 */
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../helpers/gateway-process.ts'
import {
  connectPacket, logLines, publishPacket, RawConnection, readWholeLog, scrape, sleep, str, subscribePacket, total, u16,
  unsubscribePacket, varint, waitUntil, type ConnectFields, type LogLine, type Sample,
} from '../helpers/raw-mqtt.ts'

const REFUSED_CONN = 'edgemq_mqtt_connections_refused_total'
const REFUSED_PUB = 'edgemq_mqtt_publishes_refused_total'
const INGEST = 'edgemq_ingest_messages_total'
const GOOD_ID = 'good-1'

/** Where a refusal may be counted: the connection metric's reasons, or the publish metric's. */
interface Counted { readonly connection?: readonly string[], readonly publish?: readonly string[] }

describe('bad input is refused with a reason; other clients and the log are untouched', () => {
  let gw: GatewayProcess
  let dataDir: string
  let cleanup: () => Promise<void>
  let good: MqttClient
  const goodGot: string[] = []
  const goodSent: string[] = []
  let goodCloses = 0
  /** Client ids whose messages may legitimately be in the log. */
  const allowedInLog = new Set([GOOD_ID])
  let extraLogged = 0
  /** Barrier refusals made so far (refusalBarrier). */
  let barriers = 0

  beforeAll(async () => {
    ({ dir: dataDir, cleanup } = await tempDir('edgemq-bad-input-'))
    gw = await startGatewayProcess({ dataDir })
    good = await mqtt.connectAsync(gw.mqttUrl, { clientId: GOOD_ID, protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })
    good.on('close', () => { goodCloses++ })
    good.on('message', (_topic, payload) => { goodGot.push(payload.toString()) })
    await good.subscribeAsync(`devices/${GOOD_ID}/telemetry/#`, { qos: 1 })
  })

  afterAll(async () => {
    good?.end(true)
    await gw?.kill()
    await cleanup?.()
  })

  /** The good client publishes one QoS 1 message and receives it back through its subscription. */
  async function goodStillWorks (): Promise<void> {
    const body = `good-${goodSent.length}`
    await good.publishAsync(`devices/${GOOD_ID}/telemetry/t`, body, { qos: 1 })
    goodSent.push(body)
    expect(await waitUntil(() => goodGot.includes(body), 5000), 'the good client gets its own message back').toBe(true)
    expect(good.connected).toBe(true)
    expect(goodCloses).toBe(0)
  }

  function refusals (samples: readonly Sample[], counted: Counted): number {
    return (counted.connection ?? []).reduce((n, reason) => n + total(samples, REFUSED_CONN, { reason }), 0) +
      (counted.publish ?? []).reduce((n, reason) => n + total(samples, REFUSED_PUB, { reason }), 0)
  }

  /**
   * Runs `act` (the bad client's whole life), then checks the good client, the metrics and the log lines.
   * `logged` is a string the one warning about the refusal must contain (normally the client id).
   */
  async function expectRefusal (counted: Counted, logged: string | null, act: () => Promise<void>): Promise<void> {
    const before = await scrape(gw.httpUrl)
    const mark = gw.stderr().length
    await act()
    await goodStillWorks()
    let after = before
    await waitUntil(async () => { after = await scrape(gw.httpUrl); return refusals(after, counted) > refusals(before, counted) }, 3000)
    const barrierLine = await refusalBarrier(counted)
    after = await scrape(gw.httpUrl)
    expect(refusals(after, counted) - refusals(before, counted), `refusal counted once in ${JSON.stringify(counted)}`).toBe(1)
    expect(total(after, INGEST) - total(before, INGEST), 'only the good client\'s message reached the log').toBe(1)
    expect(await waitUntil(async () => total(await scrape(gw.httpUrl), 'edgemq_mqtt_connected_clients') === 1, 5000), 'only the good client is connected')
      .toBe(true)
    // Only the bad client did anything worth logging in this window: exactly one line, a warning.
    const lines = logLines(gw.stderr().slice(mark)).map((l) => JSON.stringify(l)).filter((l) => !l.includes(barrierLine))
    expect(lines, 'the refusal is logged once').toHaveLength(1)
    expect(['warn', 'error', 'fatal'], 'as a warning').toContain((JSON.parse(lines[0] as string) as LogLine).level)
    if (logged !== null) expect(lines[0], 'the log line names the client').toContain(logged)
  }

  /**
   * A refusal of our own after the bad client's, for a reason `counted` does not include: the gateway counts a
   * refusal and writes its log line together, and its log is one ordered pipe, so once the barrier's line is in
   * and its count is on /metrics, every count and line the gateway made for the bad client before it is in too.
   * Returns the text that marks the barrier's log line.
   */
  async function refusalBarrier (counted: Counted): Promise<string> {
    const id = `barrier-${++barriers}`
    const byId = !(counted.connection ?? []).includes('invalid-client-id')
    const reason = byId ? 'invalid-client-id' : 'malformed-header'
    const before = total(await scrape(gw.httpUrl), REFUSED_CONN, { reason })
    if (byId) {
      await connectRefused({ clientId: `${id}\u0000` }, 2) // logged escaped, as `barrier-N\\u0000`
    } else {
      const conn = await RawConnection.open(gw.mqttUrl)
      try {
        conn.send(connectPacket({ clientId: id }))
        expect((await conn.next('connack', 5000) as { returnCode?: number } | undefined)?.returnCode).toBe(0)
        conn.send(Buffer.from([0x30, 0x80, 0x80, 0x80, 0x80, 0x01])) // a remaining length over four bytes
        expect(await conn.waitClosed(5000)).toBe(true)
      } finally {
        conn.destroy()
      }
    }
    const marker = byId ? `"clientId":"${id}\\u0000"` : `"clientId":"${id}"`
    expect(await waitUntil(async () => gw.stderr().includes(marker) && total(await scrape(gw.httpUrl), REFUSED_CONN, { reason }) > before, 5000),
      'the barrier refusal is logged and counted').toBe(true)
    return marker
  }

  /** A raw client that sends a CONNECT and expects a CONNACK with `rc`, after which the gateway closes the connection. */
  async function connectRefused (fields: ConnectFields, rc: number): Promise<void> {
    const conn = await RawConnection.open(gw.mqttUrl)
    try {
      conn.send(connectPacket(fields))
      const connack = await conn.next('connack', 5000)
      expect(connack, 'a CONNACK arrives').toBeDefined()
      expect((connack as { returnCode?: number }).returnCode).toBe(rc)
      expect(await conn.waitClosed(5000), 'the gateway closes the connection after the refusing CONNACK').toBe(true)
    } finally {
      conn.destroy()
    }
  }

  /** A raw client that connects properly, then sends `bytes`; the gateway must close the connection without answering `noAnswer`. */
  async function packetRefused (clientId: string, bytes: Buffer, noAnswer: ReadonlyArray<'puback' | 'pubrec' | 'suback' | 'unsuback'>): Promise<void> {
    const conn = await RawConnection.open(gw.mqttUrl)
    try {
      conn.send(connectPacket({ clientId }))
      const connack = await conn.next('connack', 5000)
      expect((connack as { returnCode?: number } | undefined)?.returnCode, 'the bad client itself was accepted').toBe(0)
      conn.send(bytes)
      expect(await conn.waitClosed(5000), 'the gateway closes the connection').toBe(true)
      for (const cmd of noAnswer) expect(conn.packets.map((p) => p.cmd), `no ${cmd} for the bad packet`).not.toContain(cmd)
    } finally {
      conn.destroy()
    }
  }

  // ---- CONNECT ----------------------------------------------------------------------------------------------------

  it('refuses a password without a username: CONNACK 4 [MQTT-3.1.2-22]', async () => {
    await expectRefusal({ connection: ['protocol', 'bad-credentials'] }, 'pw-no-user',
      () => connectRefused({ clientId: 'pw-no-user', password: 'secret' }, 4))
  })

  it('refuses a client id containing U+0000: CONNACK 2 (MQTT.js client)', async () => {
    await expectRefusal({ connection: ['invalid-client-id'] }, 'nul\\u0000id', async () => {
      const err = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'nul\u0000id', protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })
        .then((c) => { c.end(true); return null }, (e: unknown) => e as { code?: number })
      expect(err?.code, 'connect fails with return code 2').toBe(2)
    })
  })

  it('refuses a client id that is not valid UTF-8: CONNACK 2 [MQTT-1.5.3-1]', async () => {
    await expectRefusal({ connection: ['invalid-client-id', 'protocol'] }, null,
      () => connectRefused({ clientId: Buffer.from([0x64, 0x65, 0x76, 0xc3, 0x28]) }, 2))
  })

  it('refuses an empty client id with clean session = false: CONNACK 2 [MQTT-3.1.3-8]', async () => {
    await expectRefusal({ connection: ['invalid-client-id'] }, 'empty client id', () => connectRefused({ clientId: '', clean: false }, 2))
  })

  for (const id of ['__proto__', 'constructor', 'hasOwnProperty', 'toString']) {
    it(`refuses the client id ${id}, which would shadow an Object.prototype member: CONNACK 2`, async () => {
      await expectRefusal({ connection: ['invalid-client-id'] }, id, async () => {
        const err = await mqtt.connectAsync(gw.mqttUrl, { clientId: id, protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })
          .then((c) => { c.end(true); return null }, (e: unknown) => e as { code?: number })
        expect(err?.code, 'connect fails with return code 2').toBe(2)
      })
    })
  }

  // ---- packets after a good CONNECT -----------------------------------------------------------------------------

  it('closes the connection on a QoS 1 PUBLISH with packet id 0 and does not log it [MQTT-2.3.1-1]', async () => {
    await expectRefusal({ connection: ['protocol'] }, 'pid0-q1',
      () => packetRefused('pid0-q1', publishPacket('devices/pid0-q1/telemetry/t', 'x', 1, 0), ['puback']))
  })

  it('closes the connection on a QoS 2 PUBLISH with packet id 0 and does not log it [MQTT-2.3.1-1]', async () => {
    await expectRefusal({ connection: ['protocol'] }, 'pid0-q2',
      () => packetRefused('pid0-q2', publishPacket('devices/pid0-q2/telemetry/t', 'x', 2, 0), ['pubrec']))
  })

  it('closes the connection on an UNSUBSCRIBE without topic filters [MQTT-3.10.3-2]', async () => {
    await expectRefusal({ connection: ['protocol'] }, 'unsub-empty',
      () => packetRefused('unsub-empty', unsubscribePacket(7, []), ['unsuback']))
  })

  it('closes the connection on a SUBSCRIBE without topic filters [MQTT-3.8.3-3]', async () => {
    await expectRefusal({ connection: ['protocol'] }, 'sub-empty',
      () => packetRefused('sub-empty', subscribePacket(7, []), ['suback']))
  })

  it('closes the connection on a PUBLISH whose topic contains U+0000 (MQTT.js client) [MQTT-1.5.3-2]', async () => {
    await expectRefusal({ connection: ['protocol'], publish: ['invalid-topic'] }, 'nul-topic', async () => {
      const c = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'nul-topic', protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })
      c.on('error', () => {})
      const closed = new Promise<void>((resolve) => c.once('close', () => resolve()))
      // Packets are handled as they are read, so any PUBACK would be seen before the connection's 'close'.
      let acked = false
      c.on('packetreceive', (packet) => { if (packet.cmd === 'puback') acked = true })
      void c.publishAsync('devices/nul-topic/telemetry/a\u0000b', 'x', { qos: 1 }).catch(() => {})
      expect(await Promise.race([closed.then(() => 'closed'), sleep(5000).then(() => 'open')])).toBe('closed')
      expect(acked, 'no PUBACK').toBe(false)
      c.end(true)
    })
  })

  it('closes the connection on a PUBLISH whose topic is not valid UTF-8 [MQTT-1.5.3-1]', async () => {
    const topic = Buffer.concat([Buffer.from('devices/bad-utf8/telemetry/'), Buffer.from([0xff, 0xfe])])
    await expectRefusal({ connection: ['protocol'], publish: ['invalid-topic'] }, 'bad-utf8',
      () => packetRefused('bad-utf8', publishPacket(topic, 'x', 1, 5), ['puback']))
  })

  it('closes the connection on a PUBLISH with an empty topic [MQTT-4.7.3-1]', async () => {
    await expectRefusal({ connection: ['protocol'], publish: ['invalid-topic'] }, 'empty-topic',
      () => packetRefused('empty-topic', publishPacket('', 'x', 1, 5), ['puback']))
  })

  for (const topic of ['devices/wild-plus/telemetry/+', 'devices/wild-hash/telemetry/#', 'devices/wild-mid/+/x']) {
    it(`closes the connection on a PUBLISH to the wildcard topic ${topic} (MQTT.js client) [MQTT-3.3.2-2]`, async () => {
      const id = `wild-${topic.length}-${topic.at(-1) === '#' ? 'h' : 'p'}`
      await expectRefusal({ connection: ['protocol'], publish: ['invalid-topic'] }, id, async () => {
        const c = await mqtt.connectAsync(gw.mqttUrl, { clientId: id, protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })
        c.on('error', () => {})
        const closed = new Promise<void>((resolve) => c.once('close', () => resolve()))
        void c.publishAsync(topic, 'x', { qos: 1 }).catch(() => {})
        expect(await Promise.race([closed.then(() => 'closed'), sleep(5000).then(() => 'open')])).toBe('closed')
        c.end(true)
      })
    })
  }

  // Inside the broker a topic gains its tenant as a first level; aedes closes a connection whose mounted topic has
  // more than 100 levels after the record was appended, and qlobber throws on a 101-level filter.
  it('refuses a PUBLISH whose topic has 100 levels (one more than a client may use) without logging it', async () => {
    const id = 'deep-topic'
    await expectRefusal({ publish: ['invalid-topic'] }, id, async () => {
      const c = await mqtt.connectAsync(gw.mqttUrl, { clientId: id, protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })
      c.on('error', () => {})
      const closed = new Promise<void>((resolve) => c.once('close', () => resolve()))
      void c.publishAsync(`devices/${id}/telemetry/${Array(97).fill('x').join('/')}`, 'x', { qos: 1 }).catch(() => {})
      expect(await Promise.race([closed.then(() => 'closed'), sleep(5000).then(() => 'open')])).toBe('closed')
      c.end(true)
    })
  })

  it('answers a SUBSCRIBE to a 100-level filter with SUBACK 0x80 and keeps the connection', async () => {
    const c = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'deep-filter', protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })
    try {
      // MQTT.js rejects a SUBACK with a failure code; its packet carries the granted codes.
      const refused = await c.subscribeAsync(`devices/+/${Array(98).fill('x').join('/')}`, { qos: 1 }).then(
        () => null, (err: { packet?: { granted?: number[] } }) => err.packet?.granted ?? null)
      expect(refused).toEqual([128])
      const ok = await c.subscribeAsync('devices/+/telemetry/#', { qos: 1 })
      expect(ok.map((g) => g.qos), 'the connection still serves the next SUBSCRIBE').toEqual([1])
    } finally {
      await c.endAsync()
    }
  })

  it('closes the connection on a SUBSCRIBE whose filter contains U+0000 [MQTT-1.5.3-2]', async () => {
    await expectRefusal({ connection: ['protocol'] }, 'nul-filter',
      () => packetRefused('nul-filter', subscribePacket(3, ['devices/+/telemetry/\u0000']), ['suback']))
  })

  it('closes the connection on an UNSUBSCRIBE whose filter is not valid UTF-8 [MQTT-1.5.3-1]', async () => {
    await expectRefusal({ connection: ['protocol'] }, 'bad-utf8-unsub',
      () => packetRefused('bad-utf8-unsub', unsubscribePacket(3, [Buffer.from([0x61, 0xed, 0xa0, 0x80])]), ['unsuback']))
  })

  // ---- size ---------------------------------------------------------------------------------------------------------

  it('closes a connection whose PUBLISH announces 10 MB as soon as the header arrives, without buffering the body', async () => {
    const rssBefore = total(await scrape(gw.httpUrl), 'process_resident_memory_bytes')
    await expectRefusal({ connection: ['packet-too-large'] }, 'huge-header', async () => {
      const conn = await RawConnection.open(gw.mqttUrl)
      try {
        conn.send(connectPacket({ clientId: 'huge-header' }))
        expect((await conn.next('connack', 5000) as { returnCode?: number } | undefined)?.returnCode).toBe(0)
        // Fixed header: PUBLISH QoS 1, remaining length 10 MB; then the start of the body only.
        const announced = 10 * 1024 * 1024
        const started = performance.now()
        conn.send(Buffer.concat([Buffer.from([0x32]), varint(announced), str('devices/huge-header/telemetry/t'), u16(9), Buffer.from('abcd')]))
        expect(await conn.waitClosed(2000), 'closed before the body was sent').toBe(true)
        expect((conn.closedAt ?? Infinity) - started).toBeLessThan(2000)
        expect(conn.packets.map((p) => p.cmd)).not.toContain('puback')
      } finally {
        conn.destroy()
      }
    })
    // Then the gateway is still fine with many such attempts, and its memory did not grow by their announced sizes.
    for (let i = 0; i < 20; i++) {
      const conn = await RawConnection.open(gw.mqttUrl)
      conn.send(Buffer.concat([Buffer.from([0x30]), varint(200 * 1024 * 1024), str('t/x'), Buffer.alloc(1024)]))
      await conn.waitClosed(2000)
      conn.destroy()
    }
    const rssAfter = total(await scrape(gw.httpUrl), 'process_resident_memory_bytes')
    expect(rssAfter - rssBefore, 'RSS growth after 21 announced huge packets').toBeLessThan(64 * 1024 * 1024)
    await goodStillWorks()
  })

  it('closes a connection that sends a real PUBLISH over maxPacketBytes (256 KiB default) and keeps one just under it (MQTT.js)', async () => {
    allowedInLog.add('big-ok')
    const okClient = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'big-ok', protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })
    const before = await scrape(gw.httpUrl)
    await okClient.publishAsync('devices/big-ok/telemetry/blob', Buffer.alloc(250 * 1024, 1), { qos: 1 })
    extraLogged++
    await okClient.endAsync()
    const mid = await scrape(gw.httpUrl)
    expect(total(mid, INGEST) - total(before, INGEST), 'a 250 KiB payload is accepted and logged').toBe(1)
    await waitUntil(async () => total(await scrape(gw.httpUrl), 'edgemq_mqtt_connected_clients') === 1, 3000)

    await expectRefusal({ connection: ['packet-too-large'] }, 'big-bad', async () => {
      const c = await mqtt.connectAsync(gw.mqttUrl, { clientId: 'big-bad', protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000 })
      c.on('error', () => {})
      const closed = new Promise<void>((resolve) => c.once('close', () => resolve()))
      void c.publishAsync('devices/big-bad/telemetry/blob', Buffer.alloc(300 * 1024, 2), { qos: 1 }).catch(() => {})
      expect(await Promise.race([closed.then(() => 'closed'), sleep(5000).then(() => 'open')])).toBe('closed')
      c.end(true)
    })
  })

  it('closes a connection whose remaining length runs over four bytes [MQTT-2.2.3]', async () => {
    await expectRefusal({ connection: ['malformed-header'] }, 'bad-varint', async () => {
      const conn = await RawConnection.open(gw.mqttUrl)
      try {
        conn.send(connectPacket({ clientId: 'bad-varint' }))
        expect((await conn.next('connack', 5000) as { returnCode?: number } | undefined)?.returnCode).toBe(0)
        conn.send(Buffer.from([0x30, 0x80, 0x80, 0x80, 0x80, 0x01]))
        expect(await conn.waitClosed(2000)).toBe(true)
      } finally {
        conn.destroy()
      }
    })
  })

  // ---- afterwards ---------------------------------------------------------------------------------------------------

  it('stops cleanly, and the log holds exactly the good clients\' messages, in order', async () => {
    expect(goodSent.length).toBeGreaterThan(0)
    expect(await gw.stop()).toBe(0)
    const records = await readWholeLog(dataDir)
    const strangers = records.filter((r) => !allowedInLog.has(r.clientId)).map((r) => `${r.clientId} ${r.topic}`)
    expect(strangers, 'records from refused clients').toEqual([])
    const mine = records.filter((r) => r.clientId === GOOD_ID).sort((a, b) => a.offset - b.offset)
    expect(mine.map((r) => Buffer.from(r.payload).toString())).toEqual(goodSent)
    expect(records.length).toBe(goodSent.length + extraLogged)
  })
})

