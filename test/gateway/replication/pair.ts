/**
 * A primary and a standby `edgemq start` in child processes, for the
 * replication tests: configs with one shared gatewayId, ports picked by the
 * kernel, the primary's replication address read from its ready line.
 */
import { createHash } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import { decodeMultiple } from 'cbor-x'
import { stringify } from 'yaml'
import { openLogStore, type LevelDatabase } from '../../../store/index.ts'
import { startGatewayProcess, type GatewayProcess } from '../../helpers/gateway-process.ts'

export const GATEWAY_ID = 'site-1'

export interface NodeOptions {
  readonly role: 'primary' | 'standby'
  readonly peer?: string
  readonly acks?: 'local' | 'replicated'
  readonly onStandbyLost?: 'block' | 'degrade'
  readonly maxLagMs?: number
  readonly backlogBytes?: number
  readonly catchUpBytes?: number
  /** replication.silenceMs: how long a standby waits for a word from its primary before it reconnects. */
  readonly silenceMs?: number
  /** Ports to reuse (a node that restarts keeps its addresses). */
  readonly mqttPort?: number
  readonly httpPort?: number
  readonly listen?: string
  /** replication.coordination.etcd (automatic promotion). */
  readonly etcd?: { readonly endpoints: readonly string[], readonly leaseTtlMs: number }
}

export async function writeNodeConfig (dir: string, name: string, o: NodeOptions): Promise<string> {
  const file = path.join(dir, `${name}.yaml`)
  await writeFile(file, stringify({
    gatewayId: GATEWAY_ID,
    mqtt: { listeners: [{ type: 'tcp', port: o.mqttPort ?? 0 }] },
    http: { port: o.httpPort ?? 0 },
    streams: { telemetry: { partitions: 4 } },
    routes: [{ filter: 'devices/+/telemetry/#', stream: 'telemetry', keyLevel: 1 }],
    replication: {
      role: o.role, listen: o.listen ?? '127.0.0.1:0', peer: o.peer ?? '', acks: o.acks ?? 'local',
      onStandbyLost: o.onStandbyLost ?? 'block', maxLagMs: o.maxLagMs ?? 2000,
      ...(o.etcd === undefined ? {} : { coordination: { etcd: { endpoints: [...o.etcd.endpoints], leaseTtlMs: o.etcd.leaseTtlMs } } }),
      ...(o.backlogBytes === undefined ? {} : { backlogBytes: o.backlogBytes }),
      ...(o.catchUpBytes === undefined ? {} : { catchUpBytes: o.catchUpBytes }),
      ...(o.silenceMs === undefined ? {} : { silenceMs: o.silenceMs }),
    },
  }))
  return file
}

export async function startNode (dir: string, name: string, o: NodeOptions): Promise<GatewayProcess> {
  // startGatewayProcess adds --http-port 0; the config's port is what a restart reuses, so it comes last.
  const args = o.httpPort === undefined ? [] : ['--http-port', String(o.httpPort)]
  return await startGatewayProcess({ dataDir: path.join(dir, name), config: await writeNodeConfig(dir, name, o), args, timeoutMs: 60_000 })
}

/** The primary's replication address from its ready line (`replication primary host:port`). */
export function replicationAddress (gw: GatewayProcess): string {
  const m = / replication primary (\S+)$/.exec(gw.ready)
  if (m === null) throw new Error(`no replication address in: ${gw.ready}`)
  return m[1] as string
}

export interface ReplicationDoc {
  role: string, epoch: number, connected: boolean, inSync: boolean, snapshotting: boolean
  primarySequence: number, appliedSequence: number, lag: { writes: number, bytes: number | null, seconds: number }
}

export async function replicationOf (gw: { httpUrl: string }): Promise<ReplicationDoc> {
  const res = await fetch(`${gw.httpUrl}/v1/replication`)
  return await res.json() as ReplicationDoc
}

/** Polls (bounded) until `check` holds for the node's replication document. */
export async function waitFor (gw: { httpUrl: string }, what: string, check: (doc: ReplicationDoc) => boolean, timeoutMs = 60_000): Promise<ReplicationDoc> {
  const deadline = Date.now() + timeoutMs
  let last: ReplicationDoc | undefined
  while (Date.now() < deadline) {
    try {
      last = await replicationOf(gw)
      if (check(last)) return last
    } catch { /* restarting */ }
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  throw new Error(`timed out waiting for ${what}; last: ${JSON.stringify(last)}`)
}

/** One sample of the node's /metrics, by its name and labels as exposed (`name{label="value"}`). */
export async function metricOf (gw: { httpUrl: string }, series: string): Promise<number> {
  const text = await (await fetch(`${gw.httpUrl}/metrics`)).text()
  const line = text.split('\n').find((l) => l.startsWith(`${series} `))
  if (line === undefined) throw new Error(`no ${series} in /metrics`)
  return Number(line.split(' ')[1])
}

/** Polls (bounded) until the node's log has a line matching `pattern`. */
export async function waitForLog (gw: { stderr: () => string }, pattern: RegExp, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!pattern.test(gw.stderr())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for a log line matching ${pattern}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

export interface LoggedRecord { partition: number, offset: number, key: string, payload: string }

/** Every record of the telemetry stream, read through the HTTP API. */
export async function readAll (gw: { httpUrl: string }): Promise<LoggedRecord[]> {
  const out: LoggedRecord[] = []
  for (let p = 0; p < 4; p++) {
    let offset = 0
    for (let page = 0; page < 10_000; page++) {
      const res = await fetch(`${gw.httpUrl}/v1/streams/telemetry/partitions/${p}/records?offset=${offset}&maxRecords=5000&maxBytes=16777216`)
      if (!res.ok) throw new Error(`read ${p}@${offset}: ${res.status} ${await res.text()}`)
      const body = await res.json() as { records: Array<{ offset: number, key: string, payload: string }>, nextOffset: number }
      for (const r of body.records) out.push({ partition: p, offset: r.offset, key: r.key, payload: r.payload })
      if (body.records.length === 0) break
      offset = body.nextOffset
    }
  }
  return out
}

/**
 * Every stored batch of the telemetry stream as `partition/baseOffset sha256`, read with format=batches: the batches as
 * the node's LevelDB holds them (docs/http-api.md), so two nodes with equal lists hold byte-identical logs.
 */
export async function storedBatches (gw: { httpUrl: string }): Promise<string[]> {
  const out: string[] = []
  for (let p = 0; p < 4; p++) {
    const res = await fetch(`${gw.httpUrl}/v1/streams/telemetry/partitions/${p}/records?format=batches&offset=earliest`)
    if (!res.ok) throw new Error(`batches of ${p}: ${res.status} ${await res.text()}`)
    const items = decodeMultiple(Buffer.from(await res.arrayBuffer())) as unknown[]
    const last = items.at(-1) as { end?: unknown }
    if (last.end === undefined) throw new Error(`batches of ${p} did not end: ${JSON.stringify(last)}`)
    for (const b of items.slice(1, -1)) {
      const batch = Buffer.from(b as Uint8Array)
      out.push(`${p}/${batch.readBigUInt64BE(5)} ${createHash('sha256').update(batch).digest('hex')}`)
    }
  }
  return out
}

/**
 * Waits (bounded) until the standby holds exactly the primary's stored batches, once the primary's standby has
 * acknowledged everything: a standby's reads follow its applied writes a moment later. Returns the batches.
 */
export async function expectIdenticalBatches (primary: { httpUrl: string }, standby: { httpUrl: string }, timeoutMs = 60_000): Promise<string[]> {
  await waitFor(primary, 'the standby to acknowledge every write', (d) => d.inSync && d.lag.writes === 0 && d.appliedSequence === d.primarySequence, timeoutMs)
  const want = await storedBatches(primary)
  const deadline = Date.now() + timeoutMs
  let got = await storedBatches(standby)
  while (JSON.stringify(got) !== JSON.stringify(want) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50))
    got = await storedBatches(standby)
  }
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    const missing = want.filter((b) => !got.includes(b))
    const extra = got.filter((b) => !want.includes(b))
    throw new Error(`the standby's batches differ from the primary's: ${missing.length} missing (${missing.slice(0, 5).join(', ')}), ` +
      `${extra.length} not on the primary (${extra.slice(0, 5).join(', ')})`)
  }
  return want
}

/** Waits (bounded) until every payload is in the node's telemetry log; throws naming the missing ones. */
export async function expectPayloads (gw: { httpUrl: string }, payloads: readonly string[], what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  let missing: string[] = [...payloads]
  while (missing.length > 0) {
    const have = new Set((await readAll(gw)).map((r) => r.payload))
    missing = missing.filter((p) => !have.has(p))
    if (missing.length === 0 || Date.now() > deadline) break
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  if (missing.length > 0) throw new Error(`${missing.length} of ${payloads.length} ${what} missing: ${missing.slice(0, 5).join(' ')}`)
}

/** The telemetry records in a stopped gateway's data directory, by payload. */
export async function offlineRecords (dataDir: string): Promise<Map<string, { partition: number, offset: number }>> {
  const db = new ClassicLevel<Buffer, Buffer>(path.join(dataDir, 'db'), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await db.open()
  const store = await openLogStore({ db: db as unknown as LevelDatabase, follower: true })
  const out = new Map<string, { partition: number, offset: number }>()
  try {
    const stream = 'default/telemetry'
    for (let p = 0; p < store.streamInfo(stream).partitions; p++) {
      let offset = store.partitionInfo(stream, p).logStartOffset
      for (let page = 0; page < 10_000; page++) {
        const r = await store.read(stream, p, offset, { maxRecords: 5000, maxBytes: 16 << 20 })
        if (r.records.length === 0) break
        for (const rec of r.records) out.set(Buffer.from(rec.payload).toString(), { partition: p, offset: rec.offset })
        offset = r.nextOffset
      }
    }
  } finally {
    await store.close()
    await db.close()
  }
  return out
}
