/**
 * A record's own headers travel as NATS headers, except those that would
 * steer JetStream (`Nats-*`: the message id, expectations) or pose as the
 * record's fields (`Edgemq-Offset`, …): a device's user property cannot
 * replace a record's dedupe id or make the stream refuse it. The bridge runs
 * in-process on a store in a temp dir, against a real nats-server.
 */
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { Bridge } from '../../bridge/bridge.ts'
import { buildConfig } from '../../gateway/config/config.ts'
import { openLogStore, systemClock } from '../../store/index.ts'
import { waitFor } from '../helpers/bridge-fixtures.ts'
import { natsClient, natsPolicy, readStream, startNatsServer } from '../helpers/nats-process.ts'

const policy = natsPolicy()
const bin = policy.bin

it.runIf(policy.missingInCi)('has nats-server under CI', () => {
  expect.fail('nats-server is missing: .ci/run installs it; the NATS header tests cannot run')
})

describe.skipIf(bin === null)('bridge: record headers to NATS', () => {
  const cleanups: Array<() => Promise<void> | void> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it('passes the record\'s headers, drops Nats-* and the Edgemq-* field names', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgemq-nats-headers-'))
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }))
    const nats = await startNatsServer(bin as string, dir)
    cleanups.push(() => nats.kill())
    const config = buildConfig({
      gatewayId: 'gw1',
      bridge: { upstreams: [{ name: 'js', url: nats.url, forward: [{ stream: 'telemetry' }], nats: { stream: { create: true } } }] },
    })
    const store = await openLogStore({ location: path.join(dir, 'db') })
    cleanups.push(() => store.close())
    await store.createStream('default/telemetry', { partitions: 1 })
    await store.append('default/telemetry', 'dev-1', {
      payload: Buffer.from('hello'), topic: 'devices/dev-1/telemetry/t', qos: 1, clientId: 'dev-1',
      headers: { 'x-unit': 'celsius', 'Nats-Msg-Id': 'forged', 'nats-expected-stream': 'OTHER', 'Edgemq-Offset': '999', 'bad name': 'x' },
    })
    const logger = { info: () => {}, warn: () => {}, error: () => {} }
    const bridge = new Bridge(config.bridge, { store, gatewayId: 'gw1', clock: systemClock, logger })
    await bridge.start()
    cleanups.push(() => bridge.stop())
    await waitFor('the record forwarded', async () => (await bridge.status())[0]?.forwardedMessages === 1 ? true : undefined)

    const nc = await natsClient(nats.url)
    cleanups.push(() => nc.close())
    const [m] = await readStream(nc, 'EDGEMQ')
    expect(m?.msgId).toBe('gw1/default/telemetry/0/0')
    expect(m?.headers['x-unit']).toBe('celsius')
    expect(m?.headers['Edgemq-Offset']).toBe('0')
    expect(Object.keys(m?.headers ?? {}).filter((k) => /^nats-expected|^bad name$/i.test(k))).toEqual([])
  })
})
