/**
 * Reads a V8 .heapsnapshot (as written by `node --heapsnapshot-signal` or
 * `v8.writeHeapSnapshot()`) and sums the self size and count of its nodes by
 * kind and name: `object:Client` is every object built by the constructor
 * Client, `closure:nextBatch` every instance of that function,
 * `array:(object elements)` the backing stores of arrays, and so on. Two such
 * summaries, taken with 0 and with N connections, say what each connection
 * adds. Self sizes only: what a node retains is counted at the nodes that
 * hold it.
 */
import { readFile } from 'node:fs/promises'

export type HeapSummary = ReadonlyMap<string, { readonly count: number, readonly bytes: number }>

interface SnapshotFile {
  readonly snapshot: { readonly meta: { readonly node_fields: readonly string[], readonly node_types: readonly [readonly string[], ...unknown[]] } }
  readonly nodes: readonly number[]
  readonly strings: readonly string[]
}

/** Kinds whose names are the content (strings, numbers), not a type: summed under the kind alone. */
const CONTENT_NAMED = new Set(['string', 'concatenated string', 'sliced string', 'number', 'heap number', 'bigint'])

export async function summarizeHeapSnapshot (file: string): Promise<HeapSummary> {
  const data = JSON.parse(await readFile(file, 'utf8')) as SnapshotFile
  const fields = data.snapshot.meta.node_fields
  const kinds = data.snapshot.meta.node_types[0]
  const width = fields.length
  const typeAt = fields.indexOf('type')
  const nameAt = fields.indexOf('name')
  const sizeAt = fields.indexOf('self_size')
  const out = new Map<string, { count: number, bytes: number }>()
  for (let i = 0; i < data.nodes.length; i += width) {
    const kind = kinds[data.nodes[i + typeAt] as number] ?? '?'
    const key = CONTENT_NAMED.has(kind) ? kind : `${kind}:${(data.strings[data.nodes[i + nameAt] as number] ?? '?').slice(0, 60)}`
    const entry = out.get(key) ?? { count: 0, bytes: 0 }
    entry.count++
    entry.bytes += data.nodes[i + sizeAt] as number
    out.set(key, entry)
  }
  return out
}

export interface HeapDiffRow { readonly key: string, readonly count: number, readonly bytes: number }

/** What `after` has more of than `before`, largest first. */
export function diffHeapSummaries (before: HeapSummary, after: HeapSummary): HeapDiffRow[] {
  const rows: HeapDiffRow[] = []
  for (const [key, a] of after) {
    const b = before.get(key) ?? { count: 0, bytes: 0 }
    rows.push({ key, count: a.count - b.count, bytes: a.bytes - b.bytes })
  }
  return rows.sort((x, y) => y.bytes - x.bytes)
}

/** The top rows per connection, as a table for stderr. */
export function formatHeapDiff (rows: readonly HeapDiffRow[], connections: number, top = 40): string {
  const total = rows.reduce((s, r) => s + r.bytes, 0)
  const lines = [`heap added by ${connections} connections: ${(total / connections).toFixed(0)} bytes each (self sizes, all nodes)`,
    '  bytes/conn  count/conn  kind:name']
  for (const r of rows.slice(0, top)) {
    lines.push(`  ${(r.bytes / connections).toFixed(1).padStart(10)}  ${(r.count / connections).toFixed(2).padStart(10)}  ${r.key}`)
  }
  return lines.join('\n')
}
