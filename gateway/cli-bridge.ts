/**
 * `edgemq bridge status`: the running gateway's upstreams (GET /v1/bridge),
 * one line per upstream and, with --partitions, one per forwarded partition.
 */
import type { UpstreamStatus } from '../bridge/uplink.ts'
import { table } from './cli-admin.ts'
import type { ApiClient } from './cli-http.ts'

export async function bridgeStatus (api: ApiClient, upstream: string | undefined): Promise<UpstreamStatus[]> {
  if (upstream !== undefined) return [await api.json<UpstreamStatus>(api.url(['bridge', upstream]))]
  return (await api.json<{ upstreams: UpstreamStatus[] }>(api.url(['bridge']))).upstreams
}

export function bridgeTable (upstreams: readonly UpstreamStatus[], partitions: boolean): string {
  if (upstreams.length === 0) return 'no upstreams configured (bridge.upstreams)\n'
  const main = table(
    ['UPSTREAM', 'REGION', 'CONNECTED', 'SINCE', 'BACKLOG', 'BACKLOG-BYTES', 'BACKLOG-SECONDS', 'IN-FLIGHT', 'FORWARDED', 'RATE/S', 'RECONNECTS', 'DEAD-LETTERED', 'LAST-ERROR'],
    upstreams.map((u) => [
      u.name, u.region || '-', u.connected ? 'yes' : 'no', u.since ?? '-', u.backlog.messages, u.backlog.bytes, u.backlog.seconds.toFixed(1),
      u.inflight, u.forwardedMessages, u.throughput, u.reconnects, u.deadLettered, u.lastError === null ? '-' : `${u.lastError.at} ${u.lastError.message}`,
    ]))
  if (!partitions) return main
  const rows = upstreams.flatMap((u) => u.partitions.map((p) => [u.name, `${p.tenant}/${p.stream}`, p.partition, p.committedOffset, p.forwardedOffset, p.logEndOffset, p.backlogMessages]))
  return `${main}\n${table(['UPSTREAM', 'STREAM', 'PARTITION', 'COMMITTED', 'FORWARDED', 'LOG-END', 'BACKLOG'], rows)}`
}
