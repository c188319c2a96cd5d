/**
 * The compaction after a burst of connections as an operator sees it (burst-compaction.ts, docs/operations.md "Memory
 * after a burst of connections"): logged at start and after a burst, and `mqtt.compactAfterConnections: 0` turns it off.
 */
import { once } from 'node:events'
import mqtt from 'mqtt'
import { afterEach, describe, expect, it } from 'vitest'
import { runCli, startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => { for (const c of cleanups.splice(0).reverse()) await c() })

async function gatewayWith (mqttConfig: Record<string, unknown>): Promise<GatewayProcess> {
  const { dir, cleanup } = await tempDir()
  cleanups.push(cleanup)
  const config = await writeConfig(dir, { mqtt: { listeners: [{ type: 'tcp', host: '127.0.0.1', port: 0 }], ...mqttConfig } })
  const gw = await startGatewayProcess({ dataDir: dir, config })
  cleanups.push(async () => { await gw.kill() })
  return gw
}

/** Resolves when the gateway's stderr has a line matching `pattern` (the gateway's own log, waited for as an event). */
async function logLine (gw: GatewayProcess, pattern: RegExp): Promise<string> {
  for (;;) {
    const line = gw.stderr().split('\n').find((l) => pattern.test(l))
    if (line !== undefined) return line
    await once(gw.child.stderr!, 'data')
  }
}

describe('compaction after a burst of connections', () => {
  it('compacts once at start and once a burst of mqtt.compactAfterConnections connections is over, each logged with RSS', async () => {
    const gw = await gatewayWith({ compactAfterConnections: 3 })
    expect(gw.stderr()).toMatch(/heap compacted at start: RSS [\d.]+ -> [\d.]+ MiB/)
    const clients = await Promise.all([1, 2, 3].map(async (i) => mqtt.connectAsync(gw.mqttUrl, { clientId: `burst-${i}`, reconnectPeriod: 0 })))
    cleanups.push(async () => { await Promise.all(clients.map(async (c) => c.endAsync())) })
    const line = await logLine(gw, /heap compacted after a burst of 3 connections/)
    expect(JSON.parse(line)).toMatchObject({ connections: 3, rssBeforeBytes: expect.any(Number), rssAfterBytes: expect.any(Number) })
  })

  it('does nothing with mqtt.compactAfterConnections 0', async () => {
    const gw = await gatewayWith({ compactAfterConnections: 0 })
    // The compaction at start runs before the ready line; its absence here is final.
    expect(gw.stderr()).not.toMatch(/heap compacted/)
  })

  it('refuses a negative or fractional compactAfterConnections, naming the key', async () => {
    for (const value of [-1, 2.5, 'many']) {
      const { dir, cleanup } = await tempDir()
      cleanups.push(cleanup)
      const config = await writeConfig(dir, { mqtt: { compactAfterConnections: value } })
      const result = await runCli(['start', '--config', config, '--data-dir', dir, '--mqtt-port', '0', '--http-port', '0'])
      expect(result.code, result.stderr).not.toBe(0)
      expect(result.stderr).toMatch(/mqtt\.compactAfterConnections/)
    }
  })
})
