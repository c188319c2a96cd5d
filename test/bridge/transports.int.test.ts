/**
 * Upstreams over TLS (mqtts://, with a client certificate, against a real
 * Mosquitto) and over WebSocket (ws://, against a second edgemq), and an
 * upstream whose certificate does not verify: not connected, the reason in
 * the status, nothing lost.
 */
import { chmod, mkdir } from 'node:fs/promises'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../helpers/gateway-process.ts'
import { bridgeStatus, drained, freePort, publishAcked, waitFor } from '../helpers/bridge-fixtures.ts'
import { mosquittoPolicy, startMosquitto } from '../helpers/mosquitto-process.ts'
import { createPki, loadKeyPair, opensslPolicy } from '../helpers/tls-fixtures.ts'

const policy = mosquittoPolicy()
const bin = policy.bin

it.runIf(policy.missingInCi)('has mosquitto under CI', () => {
  expect.fail('mosquitto is missing: .ci/run installs it; the TLS upstream tests cannot run')
})
const openssl = opensslPolicy()

async function startEdge (dir: string, upstream: Record<string, unknown>): Promise<GatewayProcess> {
  await mkdir(dir, { recursive: true })
  const config = await writeConfig(dir, {
    gatewayId: 'edge-1',
    mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    bridge: { commitIntervalMs: 100, upstreams: [{ name: 'cloud', forward: [{ stream: 'telemetry' }], reconnectMinMs: 50, reconnectMaxMs: 500, dedupeId: 'none', ...upstream }] },
  })
  return startGatewayProcess({ dataDir: `${dir}/data`, config })
}

describe('bridge transports', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it.runIf(openssl.missingInCi)('has openssl under CI', () => {
    expect.fail('openssl is missing: .ci/run installs it; the TLS upstream tests cannot run')
  })

  it.skipIf(bin === null || !openssl.available)('mqtts:// with a client certificate to Mosquitto; a wrong CA is refused and reported', async () => {
    const { dir, cleanup } = await tempDir('edgemq-bridge-tls-')
    cleanups.push(cleanup)
    const pki = await createPki(`${dir}/pki`)
    await chmod(dir, 0o755)
    await chmod(`${dir}/pki`, 0o755) // mosquitto reads its certificates as its own user
    await chmod(pki.server.key, 0o644)
    const client = await pki.client('edge-1')
    const port = await freePort()
    const up = await startMosquitto(bin as string, dir, port, [
      `cafile ${pki.caFile}`, `certfile ${pki.server.cert}`, `keyfile ${pki.server.key}`, 'require_certificate true',
    ])
    cleanups.push(() => up.kill())
    const cloud = await mqtt.connectAsync(`mqtts://127.0.0.1:${port}`, { ca: pki.ca, ...await loadKeyPair(client), reconnectPeriod: 0 })
    cleanups.push(() => cloud.endAsync())
    const got: string[] = []
    cloud.on('message', (_t, p) => got.push(p.toString()))
    await cloud.subscribeAsync('devices/#', { qos: 1 })

    const edge = await startEdge(`${dir}/ok`, { url: `mqtts://localhost:${port}`, tls: { ca: pki.caFile, cert: client.cert, key: client.key } })
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['d1', 'd2'], 100)
    await drained(edge.httpUrl, 'cloud')
    await waitFor('everything upstream', () => got.length >= acked.length ? true : undefined)
    expect(got.sort()).toEqual([...acked].sort())

    // Trusting another CA: the handshake fails, the reason is in the status, the backlog waits.
    const foreign = await pki.foreignClient('edge-2')
    const wrong = await startEdge(`${dir}/wrong`, { url: `mqtts://localhost:${port}`, tls: { ca: foreign.cert, cert: client.cert, key: client.key } })
    cleanups.push(() => wrong.kill())
    const pending = await publishAcked(wrong.mqttUrl, ['d3'], 10)
    const status = await waitFor('the TLS failure to be reported', async () => {
      const s = (await bridgeStatus(wrong.httpUrl))[0]
      return s?.lastError !== null && s?.lastError !== undefined ? s : undefined
    })
    expect(status.connected).toBe(false)
    expect(status.lastError?.message).toMatch(/certificate|self.signed|unable to verify/i)
    expect(status.backlog.messages).toBe(pending.length)
  })

  it('ws:// to a second edgemq', async () => {
    const { dir, cleanup } = await tempDir('edgemq-bridge-ws-')
    cleanups.push(cleanup)
    const regionConfig = await writeConfig(`${dir}`, { gatewayId: 'region', mqtt: { listeners: [{ type: 'ws', port: 0 }, { type: 'tcp', port: 0 }] } })
    const region = await startGatewayProcess({ dataDir: `${dir}/region`, config: regionConfig })
    cleanups.push(() => region.kill())
    const wsUrl = region.urls.ws as string
    expect(wsUrl).toMatch(/^ws:\/\//)
    const edge = await startEdge(`${dir}/edge`, { url: wsUrl, kind: 'edgemq', dedupeId: 'topic-prefix' })
    cleanups.push(() => edge.kill())
    const sub = await mqtt.connectAsync(region.urls.tcp as string, { reconnectPeriod: 0 })
    cleanups.push(() => sub.endAsync())
    const got: string[] = []
    sub.on('message', (_t, p) => got.push(p.toString()))
    await sub.subscribeAsync('devices/#', { qos: 1 })
    const acked = await publishAcked(edge.mqttUrl, ['d1'], 100)
    await drained(edge.httpUrl, 'cloud')
    await waitFor('everything at the region', () => got.length >= acked.length ? true : undefined)
    expect(got).toEqual(acked) // one device: one partition, in order, $dedupe/ stripped by the region
  })
})

