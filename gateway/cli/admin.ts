/**
 * `edgemq streams` and `edgemq groups`, after Kafka's kafka-topics
 * --describe and kafka-consumer-groups: a table per partition by default,
 * or the API's JSON document with `--json`. Listing works over HTTP and on a
 * stopped gateway's data directory; changing groups (reset, delete) only
 * over HTTP, through the running gateway that owns the offsets.
 */
import { CliError } from './errors.ts'
import type { ApiClient } from './http-client.ts'
// offline.ts (LevelDB) is loaded by the --data-dir branches only: the listing over HTTP does not need it.
import type { GroupDoc, GroupStreamDoc, OfflineLog, StreamDoc } from './offline.ts'
import { parsePosition } from './replay.ts'

export type AdminSource = { readonly kind: 'http', readonly api: ApiClient } | { readonly kind: 'offline', readonly log: OfflineLog }

function time (t: number | null): string {
  return t === null ? '-' : new Date(t).toISOString()
}

/** Columns padded to their widest cell; the last column is not padded. */
export function table (header: readonly string[], rows: ReadonlyArray<readonly (string | number)[]>): string {
  const cells = [header, ...rows.map((r) => r.map(String))]
  const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)))
  return cells.map((r) => r.map((c, i) => i === r.length - 1 ? c : c.padEnd(widths[i] as number)).join('  ')).join('\n') + '\n'
}

export async function listStreams (source: AdminSource, name: string | undefined): Promise<{ tenant?: string, streams: StreamDoc[] }> {
  if (source.kind === 'offline') {
    const { streamDoc, streamDocs } = await import('./offline.ts')
    const streams = name === undefined ? streamDocs(source.log) : [streamDoc(source.log, source.log.streamInfo(name))]
    return { tenant: source.log.tenant, streams }
  }
  if (name === undefined) return await source.api.json<{ tenant: string, streams: StreamDoc[] }>(source.api.url(['streams']))
  const { tenant, ...stream } = await source.api.json<StreamDoc & { tenant: string }>(source.api.url(['streams', name]))
  return { tenant, streams: [stream] }
}

export function streamsTable (streams: readonly StreamDoc[]): string {
  const rows = streams.flatMap((s) => s.partitions.map((p) =>
    [s.name, p.partition, p.logStartOffset, p.logEndOffset, p.records, p.bytes, time(p.oldestTimestamp), time(p.newestTimestamp)]))
  return table(['STREAM', 'PARTITION', 'LOG-START', 'LOG-END', 'RECORDS', 'BYTES', 'OLDEST', 'NEWEST'], rows)
}

export async function listGroups (source: AdminSource, group: string | undefined): Promise<{ tenant?: string, groups: GroupDoc[] }> {
  if (source.kind === 'offline') {
    const { groupDocs } = await import('./offline.ts')
    const groups = await groupDocs(source.log)
    if (group === undefined) return { tenant: source.log.tenant, groups }
    const one = groups.find((g) => g.group === group)
    if (one === undefined) throw new CliError('CLI_UNKNOWN_GROUP', `unknown consumer group ${JSON.stringify(group)} in tenant ${source.log.tenant}`)
    return { tenant: source.log.tenant, groups: [one] }
  }
  if (group === undefined) return await source.api.json<{ tenant: string, groups: GroupDoc[] }>(source.api.url(['groups']))
  return { groups: [await source.api.json<GroupDoc>(source.api.url(['groups', group]))] }
}

export function groupsTable (
  groups: ReadonlyArray<{ readonly group: string, readonly streams: readonly GroupStreamDoc[], readonly owner?: 'bridge' | 'share' }>): string {
  const rows = groups.flatMap((g) => g.streams.flatMap((s) => s.partitions.map((p) => [
    g.group, s.stream, p.partition, p.committedOffset ?? '-', p.logStartOffset, p.logEndOffset, p.lagMessages, p.lagSeconds,
    g.owner === 'bridge' ? 'bridge (read-only)' : g.owner === 'share' ? 'mqtt $share (read-only)' : '-',
  ])))
  return table(['GROUP', 'STREAM', 'PARTITION', 'COMMITTED', 'LOG-START', 'LOG-END', 'LAG', 'LAG-SECONDS', 'OWNER'], rows)
}

/** The body of POST /v1/groups/{g}/streams/{s}/reset for `--to earliest|latest|OFFSET|TIME`. */
export function resetBody (to: string, partition: number | undefined, now: number): Record<string, unknown> {
  const pos = parsePosition(to, '--to', now, true)
  const body: Record<string, unknown> = pos.kind === 'offset'
    ? { to: 'offset', offset: pos.offset }
    : pos.kind === 'time' ? { to: 'timestamp', timestamp: pos.timestamp } : { to: pos.kind }
  if (partition !== undefined) body.partition = partition
  return body
}

export async function resetGroup (api: ApiClient, group: string, stream: string, to: string, partition: number | undefined,
  now: number): Promise<GroupStreamDoc & { group: string }> {
  const url = api.url(['groups', group, 'streams', stream, 'reset'])
  return await api.json<GroupStreamDoc & { group: string }>(url, { method: 'POST', body: resetBody(to, partition, now) })
}

export async function deleteGroup (api: ApiClient, group: string): Promise<void> {
  await api.json(api.url(['groups', group]), { method: 'DELETE' })
}
