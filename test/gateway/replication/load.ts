/**
 * QoS 1 load on a gateway for the replication tests: a few devices publishing
 * at full speed with every PUBACK recorded, until the test stops them (or the
 * bound on time passes), then the publishes in flight are awaited.
 */
import mqtt from 'mqtt'
import { ackedPayload, publishUntilKilled, type Acked } from '../../helpers/acked-publisher.ts'

export interface Load {
  /** Every acknowledged publish so far, in the order the PUBACKs came. */
  readonly acked: readonly Acked[]
  /** Payloads of the acknowledged publishes. */
  payloads (): string[]
  /** Resolves once `count` publishes are acknowledged (bounded: rejects after timeoutMs, naming what it waited for). */
  ackedAtLeast (count: number, what: string, timeoutMs?: number): Promise<void>
  /** Stops publishing; resolves once the publishes in flight are answered and the clients gone. */
  stop (): Promise<void>
}

export async function startLoad (url: string, options: { devices: number, window: number, maxMs: number, padding?: number }): Promise<Load> {
  const acked: Acked[] = []
  let stopped = false
  const clients = await Promise.all(Array.from({ length: options.devices }, async (_, d) => {
    const client = await mqtt.connectAsync(url, { clientId: `dev-${d}`, reconnectPeriod: 0, connectTimeout: 30_000 })
    client.on('error', () => {})
    return client
  }))
  const runs = clients.map((client, d) => publishUntilKilled(client, `dev-${d}`, 0, acked, {
    window: options.window, maxMs: options.maxMs, stop: () => stopped, ...(options.padding === undefined ? {} : { padding: options.padding }),
  }))
  return {
    acked,
    payloads: () => acked.map((a) => ackedPayload(a.device, a.seq, options.padding)),
    async ackedAtLeast (count, what, timeoutMs = 60_000) {
      const deadline = Date.now() + timeoutMs
      while (acked.length < count && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10))
      if (acked.length < count) throw new Error(`timed out waiting for ${what}: ${acked.length} of ${count} acknowledged`)
    },
    async stop () {
      stopped = true
      await Promise.all(runs)
    },
  }
}
