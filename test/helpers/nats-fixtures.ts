/**
 * Shared by the NATS bridge tests: an edge gateway with one NATS upstream
 * `js` (fast reconnects, a short commit interval), and the exactly-once and
 * order checks of a JetStream stream against the edge's own log.
 */
import { expect } from 'vitest'
import { startGatewayProcess, writeConfig, type GatewayProcess } from './gateway-process.ts'
import type { LoggedRecord } from './log-reader.ts'
import type { StoredNatsMessage } from './nats-process.ts'

export async function startNatsEdge (dir: string, upstream: Record<string, unknown>, extra: Record<string, unknown> = {}): Promise<GatewayProcess> {
  const { nats, ...rest } = upstream as { nats?: Record<string, unknown> }
  const config = await writeConfig(dir, {
    gatewayId: 'edge-1',
    mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    ...extra,
    bridge: {
      commitIntervalMs: 100,
      upstreams: [{
        name: 'js', forward: [{ stream: 'telemetry' }], reconnectMinMs: 50, reconnectMaxMs: 500, maxInflight: 256,
        ...rest,
        nats: { minDuplicateWindowMs: 60_000, ...nats, stream: { create: true, duplicateWindowMs: 600_000, ...nats?.stream as object } },
      }],
    },
  })
  return await startGatewayProcess({ dataDir: `${dir}/data`, config })
}

/** Every telemetry record of the edge is in the stream exactly once by message id, with its payload. */
export function expectExactlyOnce (edge: readonly LoggedRecord[], stored: readonly StoredNatsMessage[], site = 'edge-1'): void {
  const records = edge.filter((r) => r.stream === 'default/telemetry')
  const ids = stored.map((m) => m.msgId)
  expect(new Set(ids).size).toBe(ids.length) // nothing twice
  expect(stored).toHaveLength(records.length) // nothing missing
  const byId = new Map(stored.map((m) => [m.msgId, m]))
  for (const r of records) {
    const m = byId.get(`${site}/default/telemetry/${r.partition}/${r.offset}`)
    expect(m?.payload, `record ${r.partition}/${r.offset}`).toBe(r.payload)
  }
}

/** expectExactlyOnce, and each partition's offsets rise in stream order. */
export function expectExactlyOnceInOrder (edge: readonly LoggedRecord[], stored: readonly StoredNatsMessage[], site = 'edge-1'): void {
  expectExactlyOnce(edge, stored, site)
  const last = new Map<string, number>()
  for (const m of stored) {
    const partition = m.headers['Edgemq-Partition'] as string
    const offset = Number(m.headers['Edgemq-Offset'])
    expect(offset, `partition ${partition} in stream order`).toBeGreaterThan(last.get(partition) ?? -1)
    last.set(partition, offset)
  }
}
