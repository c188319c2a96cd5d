/**
 * edgemq → NATS JetStream (a real nats-server, started by the test): records
 * land in the stream on the subjects of the template, with Nats-Msg-Id = the
 * dedupe id and the record's fields as headers; a backlog drained with the
 * edge SIGKILLed several times mid-drain lands exactly once, in
 * per-partition order.
 */
import { execFileSync } from 'node:child_process'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { bridgeStatus, drained, publishAcked, waitFor } from '../helpers/bridge-fixtures.ts'
import { runCliWithin } from '../helpers/cli-run.ts'
import { tempDir } from '../helpers/gateway-process.ts'
import { readWholeLog } from '../helpers/log-reader.ts'
import { expectExactlyOnceInOrder, startNatsEdge } from '../helpers/nats-fixtures.ts'
import { natsClient, natsPolicy, readStream, startNatsServer, type NatsServerProcess } from '../helpers/nats-process.ts'
import { jetstreamManager } from '@nats-io/jetstream'
import { subjectToTopic } from '../../bridge/nats/subjects.ts'

const policy = natsPolicy()
const bin = policy.bin

it.runIf(policy.missingInCi)('has nats-server under CI', () => {
  expect.fail('nats-server is missing: .ci/run installs it; the NATS-upstream tests cannot run')
})

const DEVICES = ['dev-a', 'dev-b', 'dev-c', 'dev-d']

describe.skipIf(bin === null)('bridge: edgemq → NATS JetStream (one node)', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })
  const setup = async (): Promise<{ dir: string, nats: NatsServerProcess }> => {
    const t = await tempDir('edgemq-nats-')
    cleanups.push(t.cleanup)
    const nats = await startNatsServer(bin as string, t.dir)
    cleanups.push(() => nats.kill())
    return { dir: t.dir, nats }
  }

  it('publishes each record on its subject with Nats-Msg-Id and its fields as headers; status and log say so', async () => {
    const { dir, nats } = await setup()
    const edge = await startNatsEdge(dir, { url: nats.url })
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['dev-a', 'dev.b'], 200)
    const status = await drained(edge.httpUrl, 'js')
    expect(status).toMatchObject({ kind: 'nats', mqttVersion: null, dedupeId: 'nats-msg-id', forwardedMessages: acked.length })
    expect(status.jetstream).toEqual({ stream: 'EDGEMQ', duplicateWindowMs: 600_000, replicas: 1, duplicateAcks: 0 })
    const version = execFileSync(bin as string, ['--version'], { encoding: 'utf8' }).match(/v(\d+\.\d+\.\d+)/)?.[1]
    expect(status.natsServer).toEqual({ name: nats.name, version, jetstream: true })
    // The command line's PROTOCOL column names the server and its JetStream.
    const table = await runCliWithin(['bridge', 'status', '--url', edge.httpUrl], 20_000)
    expect(table.code, table.stderr).toBe(0)
    expect(table.stdout).toMatch(new RegExp(`\\njs +- +yes +nats/${String(version).replaceAll('.', '\\.')}\\+js +nats-msg-id `))

    const nc = await natsClient(nats.url)
    cleanups.push(() => nc.close())
    const stored = await readStream(nc, 'EDGEMQ')
    expect(stored).toHaveLength(acked.length)
    for (const m of stored) {
      expect(m.subject).toMatch(/^edgemq\.edge-1\.default\.telemetry\.devices\.(dev-a|dev%2Eb)\.telemetry\.t$/)
      const topic = subjectToTopic(m.subject.split('.').slice(4).join('.'))
      expect(m.headers['Edgemq-Topic']).toBe(topic) // the mapping is reversible: the device's own topic
      expect(m.msgId).toMatch(/^edge-1\/default\/telemetry\/\d+\/\d+$/)
      expect(m.msgId).toBe(`edge-1/default/telemetry/${m.headers['Edgemq-Partition']}/${m.headers['Edgemq-Offset']}`)
      expect(m.headers['Edgemq-Key']).toBe(topic.split('/')[1])
      expect(m.headers['Edgemq-Stream']).toBe('default/telemetry')
      expect(Number(m.headers['Edgemq-Timestamp'])).toBeGreaterThan(0)
    }
    for (const device of ['dev-a', 'dev.b']) {
      const seqs = stored.filter((m) => m.payload.startsWith(`${device}:`)).map((m) => Number(m.payload.split(':')[1]))
      expect(seqs, device).toEqual([...Array(200).keys()])
    }
    const lines = edge.stderr().split('\n').filter((l) => l.includes('"upstream connected"')).map((l) => JSON.parse(l) as Record<string, unknown>)
    expect(lines[0]).toMatchObject({ upstream: 'js', dedupeId: 'nats-msg-id', url: nats.url })
  })

  it('carries an MQTT 5 message\'s properties as NATS headers (the record\'s mqtt-* headers)', async () => {
    const { dir, nats } = await setup()
    const edge = await startNatsEdge(dir, { url: nats.url })
    cleanups.push(() => edge.kill())
    const device = await mqtt.connectAsync(edge.mqttUrl, { clientId: 'dev-v5', protocolVersion: 5, reconnectPeriod: 0 })
    await device.publishAsync('devices/dev-v5/telemetry/t', '{"t":21.5}', {
      qos: 1,
      properties: {
        contentType: 'application/json', payloadFormatIndicator: true, responseTopic: 'devices/dev-v5/replies',
        correlationData: Buffer.from('c-1'), userProperties: { site: 'plant-7', unit: ['C', 'celsius'] },
      },
    })
    await device.endAsync()
    await drained(edge.httpUrl, 'js')
    const nc = await natsClient(nats.url)
    cleanups.push(() => nc.close())
    const [m] = await readStream(nc, 'EDGEMQ')
    expect(m?.payload).toBe('{"t":21.5}')
    expect(m?.headers).toMatchObject({
      'mqtt-content-type': 'application/json',
      'mqtt-payload-format': 'utf-8',
      'mqtt-response-topic': 'devices/dev-v5/replies',
      'mqtt-correlation-data': Buffer.from('c-1').toString('base64'),
    })
    expect(JSON.parse(m?.headers['mqtt-user-properties'] ?? 'null')).toEqual({ site: 'plant-7', unit: ['C', 'celsius'] })
  })

  it('a backlog drained with the edge SIGKILLed three times mid-drain lands exactly once, in per-partition order', async () => {
    const { dir, nats } = await setup()
    // The stream is missing at first (create: false): the edge takes data, forwards nothing, and a backlog builds.
    let edge = await startNatsEdge(dir, { url: nats.url, nats: { stream: { create: false } } })
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, DEVICES, 3000, 0, 100)
    expect(acked).toHaveLength(12_000)
    const s0 = (await bridgeStatus(edge.httpUrl))[0]
    expect(s0?.connected).toBe(false)
    expect(s0?.backlog.messages).toBe(12_000)

    const nc = await natsClient(nats.url)
    cleanups.push(() => nc.close())
    const jsm = await jetstreamManager(nc)
    await jsm.streams.add({ name: 'EDGEMQ', subjects: ['edgemq.>'], duplicate_window: 600_000 * 1_000_000 })
    const stored = async (): Promise<number> => (await jsm.streams.info('EDGEMQ')).state.messages
    for (const fraction of [0.15, 0.4, 0.65]) {
      await waitFor(`the drain to pass ${fraction * 100} %`, async () => await stored() >= fraction * acked.length ? true : undefined, 120_000, 5)
      await edge.kill() // mid-drain: PubAcks outstanding, acknowledged offsets not yet committed
      expect(await stored()).toBeLessThan(acked.length)
      edge = await startNatsEdge(dir, { url: nats.url, nats: { stream: { create: false } } })
    }
    const after = await drained(edge.httpUrl, 'js', 120_000)
    expect(after.backlog.messages).toBe(0)
    expect(await edge.stop()).toBe(0)
    expectExactlyOnceInOrder(await readWholeLog(`${dir}/data`), await readStream(nc, 'EDGEMQ'))
  })
})
