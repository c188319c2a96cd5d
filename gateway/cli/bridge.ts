/**
 * `edgemq bridge status`: the running gateway's upstreams (GET /v1/bridge),
 * one line per upstream and, with --partitions, one per forwarded partition.
 */
import type { UpstreamStatus } from '../../bridge/index.ts'
import { table } from './admin.ts'
import type { ApiClient } from './http-client.ts'

export async function bridgeStatus (api: ApiClient, upstream: string | undefined): Promise<UpstreamStatus[]> {
  if (upstream !== undefined) return [await api.json<UpstreamStatus>(api.url(['bridge', upstream]))]
  return (await api.json<{ upstreams: UpstreamStatus[] }>(api.url(['bridge']))).upstreams
}

/** The last error with its time; once a connection came up after it, marked resolved with that time. */
function lastError (u: UpstreamStatus): string {
  if (u.lastError === null) return '-'
  const { at, message, resolvedAt } = u.lastError
  return resolvedAt === null ? `${at} ${message}` : `${at} ${message} (resolved ${resolvedAt})`
}

/** PROTOCOL: an MQTT upstream's version; for NATS, `nats/<server version>` (`+js` when it runs JetStream), `nats` before a connection. */
function protocol (u: UpstreamStatus): string {
  if (u.kind !== 'nats') return u.mqttVersion ?? '-'
  const s = u.natsServer
  return s === null || s === undefined ? 'nats' : `nats/${s.version}${s.jetstream ? '+js' : ''}`
}

export function bridgeTable (upstreams: readonly UpstreamStatus[], partitions: boolean): string {
  if (upstreams.length === 0) return 'no upstreams configured (bridge.upstreams)\n'
  const main = table(
    [
      'UPSTREAM', 'REGION', 'CONNECTED', 'PROTOCOL', 'DEDUPE-ID', 'SINCE', 'BACKLOG', 'BACKLOG-BYTES', 'BACKLOG-SECONDS', 'IN-FLIGHT', 'FORWARDED',
      'RATE/S', 'RECONNECTS', 'DEAD-LETTERED', 'LAST-ERROR',
    ],
    upstreams.map((u) => [
      u.name, u.region || '-', u.connected ? 'yes' : 'no', protocol(u), u.dedupeId, u.since ?? '-',
      u.backlog.messages, u.backlog.bytes, u.backlog.seconds.toFixed(1),
      u.inflight, u.forwardedMessages, u.throughput, u.reconnects, u.deadLettered, lastError(u),
    ]))
  if (!partitions) return main
  const rows = upstreams.flatMap((u) => u.partitions.map((p) =>
    [u.name, `${p.tenant}/${p.stream}`, p.partition, p.committedOffset, p.forwardedOffset, p.logEndOffset, p.backlogMessages]))
  return `${main}\n${table(['UPSTREAM', 'STREAM', 'PARTITION', 'COMMITTED', 'FORWARDED', 'LOG-END', 'BACKLOG'], rows)}`
}
