/**
 * The JSON documents that describe a tenant's streams and consumer groups:
 * what GET /v1/streams and /v1/groups answer, and what `edgemq streams` /
 * `edgemq groups --data-dir` print from a stopped gateway's data. One
 * builder for both, so the two can never disagree.
 *
 * Stream and group names are the tenant's own (`telemetry`), the store's are
 * tenant-qualified (`acme/telemetry`). The bridge's groups (`bridge.<upstream>`)
 * belong to no tenant; each tenant sees those that committed on its streams,
 * marked `owner: "bridge"` and `readOnly: true`. The consumer groups of MQTT
 * shared subscriptions (`share/<group>/<filter>`, escaped as
 * mqtt/shared/share-topic.ts says) are the tenant's, marked `owner: "share"`,
 * `readOnly: true` (their offsets move only as members acknowledge; the group
 * can be deleted once the share has no member) and with the `subscription`
 * they serve.
 */
import { BRIDGE_GROUP_PREFIX } from '../../bridge/index.ts'
import type { LogStore, PartitionLag, StreamInfo } from '../../store/index.ts'
import { shareSubscriptionOf } from '../mqtt/shared/share-topic.ts'

export interface PartitionDoc {
  readonly partition: number
  readonly logStartOffset: number
  readonly logEndOffset: number
  readonly records: number
  readonly bytes: number
  readonly oldestTimestamp: number | null
  readonly newestTimestamp: number | null
}

export interface StreamDoc {
  readonly name: string
  readonly partitionCount: number
  readonly retentionMs: number
  readonly retentionBytes: number
  readonly records: number
  readonly bytes: number
  readonly oldestTimestamp: number | null
  readonly newestTimestamp: number | null
  readonly partitions: readonly PartitionDoc[]
}

export type PartitionLagDoc = PartitionLag

export interface GroupStreamDoc {
  readonly stream: string
  readonly lagMessages: number
  readonly lagSeconds: number
  readonly partitions: readonly PartitionLagDoc[]
}

export interface GroupDoc {
  readonly group: string
  readonly lagMessages: number
  readonly lagSeconds: number
  readonly streams: readonly GroupStreamDoc[]
  /**
   * Only on the bridge's groups and those of MQTT shared subscriptions: their offsets move as the upstream (the share's
   * members) acknowledges, never through the API.
   */
  readonly owner?: 'bridge' | 'share'
  readonly readOnly?: true
  /** Only on a shared subscription's group: `$share/<group>/<filter>`. */
  readonly subscription?: string
}

/** One partition; `stream` is the store's (tenant-qualified) name. */
export function partitionDoc (store: LogStore, stream: string, partition: number): PartitionDoc {
  const p = store.partitionInfo(stream, partition)
  return {
    partition,
    logStartOffset: p.logStartOffset,
    logEndOffset: p.logEndOffset,
    records: p.logEndOffset - p.logStartOffset,
    bytes: p.bytes,
    oldestTimestamp: p.oldestTimestamp,
    newestTimestamp: p.newestTimestamp,
  }
}

/** One stream of `tenant`, with totals over its partitions. */
export function streamDoc (store: LogStore, tenant: string, info: StreamInfo): StreamDoc {
  const partitions = Array.from({ length: info.partitions }, (_, p) => partitionDoc(store, info.name, p))
  let oldest: number | null = null
  let newest: number | null = null
  for (const p of partitions) {
    if (p.oldestTimestamp !== null && (oldest === null || p.oldestTimestamp < oldest)) oldest = p.oldestTimestamp
    if (p.newestTimestamp !== null && (newest === null || p.newestTimestamp > newest)) newest = p.newestTimestamp
  }
  return {
    name: info.name.slice(tenant.length + 1),
    partitionCount: info.partitions,
    retentionMs: info.retentionMs,
    retentionBytes: info.retentionBytes,
    records: partitions.reduce((n, p) => n + p.records, 0),
    bytes: partitions.reduce((n, p) => n + p.bytes, 0),
    oldestTimestamp: oldest,
    newestTimestamp: newest,
    partitions,
  }
}

/** Every stream of `tenant`. */
export function streamDocs (store: LogStore, tenant: string): StreamDoc[] {
  return store.listStreams().filter((s) => s.name.startsWith(`${tenant}/`)).map((s) => streamDoc(store, tenant, s))
}

/** A group's lag on one stream; `group` and `stream` are the store's names. */
export async function groupStreamDoc (store: LogStore, tenant: string, group: string, stream: string): Promise<GroupStreamDoc> {
  const partitions = await store.groupLag(group, stream)
  return {
    stream: stream.slice(tenant.length + 1),
    lagMessages: partitions.reduce((sum, p) => sum + p.lagMessages, 0),
    lagSeconds: partitions.reduce((max, p) => Math.max(max, p.lagSeconds), 0),
    partitions,
  }
}

/** Store group names (`<tenant>/<group>`) of `tenant`'s groups, by the tenant's own name. */
export function tenantGroups (store: LogStore, tenant: string): Map<string, { id: string, streams: string[] }> {
  const prefix = `${tenant}/`
  const out = new Map<string, { id: string, streams: string[] }>()
  for (const g of store.listGroups()) {
    if (!g.group.startsWith(prefix)) continue
    out.set(g.group.slice(prefix.length), { id: g.group, streams: Object.keys(g.offsets).filter((s) => s.startsWith(prefix)).sort() })
  }
  return out
}

/** The bridge's groups that committed on `tenant`'s streams, by name, except where a group of the tenant has that name. */
export function bridgeGroups (store: LogStore, tenant: string): Map<string, { id: string, streams: string[] }> {
  const prefix = `${tenant}/`
  const own = tenantGroups(store, tenant)
  const out = new Map<string, { id: string, streams: string[] }>()
  for (const g of store.listGroups()) {
    if (!g.group.startsWith(BRIDGE_GROUP_PREFIX) || g.group.includes('/') || own.has(g.group)) continue
    const streams = Object.keys(g.offsets).filter((s) => s.startsWith(prefix)).sort()
    if (streams.length > 0) out.set(g.group, { id: g.group, streams })
  }
  return out
}

/** One of the bridge's groups as `tenant` sees it. */
export async function bridgeGroupDoc (store: LogStore, tenant: string, name: string, g: { id: string, streams: readonly string[] }): Promise<GroupDoc> {
  return { ...await groupDoc(store, tenant, name, g), owner: 'bridge', readOnly: true }
}

/** One group of `tenant`, with its lag on every stream it committed on. */
export async function groupDoc (store: LogStore, tenant: string, name: string, g: { id: string, streams: readonly string[] }): Promise<GroupDoc> {
  const streams: GroupStreamDoc[] = []
  for (const stream of g.streams) {
    try {
      store.streamInfo(stream)
    } catch {
      continue // the stream is gone; its offsets mean nothing any more
    }
    streams.push(await groupStreamDoc(store, tenant, g.id, stream))
  }
  return {
    group: name,
    lagMessages: streams.reduce((sum, s) => sum + s.lagMessages, 0),
    lagSeconds: streams.reduce((max, s) => Math.max(max, s.lagSeconds), 0),
    streams,
  }
}

/** One group of `tenant` (tenantGroups), a shared subscription's marked as such. */
export async function tenantGroupDoc (store: LogStore, tenant: string, name: string, g: { id: string, streams: readonly string[] }): Promise<GroupDoc> {
  const doc = await groupDoc(store, tenant, name, g)
  const subscription = shareSubscriptionOf(name)
  return subscription === null ? doc : { ...doc, owner: 'share', readOnly: true, subscription }
}

/** Every group of `tenant`. */
export async function groupDocs (store: LogStore, tenant: string): Promise<GroupDoc[]> {
  const out: GroupDoc[] = []
  for (const [name, g] of tenantGroups(store, tenant)) out.push(await tenantGroupDoc(store, tenant, name, g))
  for (const [name, g] of bridgeGroups(store, tenant)) out.push(await bridgeGroupDoc(store, tenant, name, g))
  return out
}
