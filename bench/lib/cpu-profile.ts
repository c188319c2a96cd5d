/**
 * Reads a V8 `.cpuprofile` (as written by `node --cpu-prof`) and sums its
 * samples by function and by where the code comes from: aedes, mqtt-packet,
 * our gateway/ and store/, LevelDB's bindings, Node's core, V8 (GC, native
 * builtins), idle. Self time is the samples that landed in a function;
 * total time also counts the samples of everything it called.
 */
import { readFile } from 'node:fs/promises'

interface CallFrame { readonly functionName: string, readonly url: string, readonly lineNumber: number, readonly columnNumber: number }
interface ProfileNode { readonly id: number, readonly callFrame: CallFrame, readonly children?: readonly number[] }
interface CpuProfile {
  readonly nodes: readonly ProfileNode[]
  readonly startTime: number
  readonly endTime: number
  readonly samples?: readonly number[]
  readonly timeDeltas?: readonly number[]
}

export interface FunctionTime {
  readonly name: string
  readonly where: string
  readonly category: string
  readonly selfMs: number
  readonly totalMs: number
}

export interface ProfileSummary {
  /** Sampled time in the window, idle included. */
  readonly sampledMs: number
  readonly idleMs: number
  readonly categories: ReadonlyArray<{ readonly category: string, readonly selfMs: number }>
  readonly functions: readonly FunctionTime[]
  /** False when the window matched no sample and the whole profile was summarised instead. */
  readonly windowed: boolean
}

/** A time window in µs of the monotonic clock (`process.hrtime`), which is also the clock of the profile's timestamps on Linux. */
export interface ProfileWindow { readonly fromUs: number, readonly toUs: number }

/** Where a frame's code comes from, by its URL (or V8's pseudo-function names). */
export function categoryOf (frame: CallFrame): string {
  const { url, functionName } = frame
  if (functionName === '(garbage collector)') return 'GC'
  if (functionName === '(idle)') return 'idle'
  if (functionName === '(program)') return 'V8/native (program)'
  if (functionName === '(root)') return 'root'
  const pkg = /\/node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(url)?.[1]
  if (pkg !== undefined) {
    if (pkg.startsWith('aedes')) return 'aedes'
    if (pkg === 'classic-level' || pkg === 'abstract-level' || pkg === 'level-transcoder' || pkg === 'module-error') return 'LevelDB bindings'
    return pkg
  }
  if (/\/gateway\/.+\.ts$/.test(url)) return 'gateway/**/*.ts'
  if (/\/store\/.+\.ts$/.test(url)) return 'store/**/*.ts'
  if (/\/bridge\/.+\.ts$/.test(url)) return 'bridge/**/*.ts'
  if (url.startsWith('node:')) return 'node core'
  if (url === '') return 'V8/native builtins'
  return 'other'
}

function shortUrl (url: string): string {
  const nm = url.lastIndexOf('/node_modules/')
  if (nm >= 0) return url.slice(nm + '/node_modules/'.length)
  const m = /\/((?:gateway|store|bridge|bench)\/[^/]+)$/.exec(url)
  if (m !== null) return m[1] as string
  return url.replace(/^file:\/\//, '')
}

/** Sums the samples of `file`; with `window`, only the samples taken inside it (e.g. the measured window, not start-up). */
export async function summarizeCpuProfile (file: string, window?: ProfileWindow): Promise<ProfileSummary> {
  const profile = JSON.parse(await readFile(file, 'utf8')) as CpuProfile
  const byId = new Map<number, ProfileNode>()
  const parent = new Map<number, number>()
  for (const node of profile.nodes) {
    byId.set(node.id, node)
    for (const child of node.children ?? []) parent.set(child, node.id)
  }
  const keyOf = (node: ProfileNode): string => {
    const f = node.callFrame
    return `${f.functionName === '' ? '(anonymous)' : f.functionName}\u0000${f.url === '' ? '' : `${shortUrl(f.url)}:${f.lineNumber + 1}:${f.columnNumber + 1}`}`
  }
  const self = new Map<string, number>()
  const total = new Map<string, number>()
  const categories = new Map<string, number>()
  const categoryOfKey = new Map<string, string>()
  const samples = profile.samples ?? []
  const deltas = profile.timeDeltas ?? []
  const at = new Float64Array(samples.length)
  let t = profile.startTime
  let inWindow = 0
  for (let k = 0; k < samples.length; k++) {
    t += deltas[k] ?? 0
    at[k] = t
    if (window !== undefined && t >= window.fromUs && t <= window.toUs) inWindow++
  }
  const windowed = window !== undefined && inWindow > 0
  let sampledUs = 0
  let idleUs = 0
  for (let k = 0; k < samples.length; k++) {
    if (windowed && (at[k]! < window.fromUs || at[k]! > window.toUs)) continue
    const dt = Math.max(0, deltas[k] ?? 0)
    const leaf = byId.get(samples[k] as number)
    if (leaf === undefined) continue
    sampledUs += dt
    const key = keyOf(leaf)
    const category = categoryOf(leaf.callFrame)
    if (category === 'idle') idleUs += dt
    categoryOfKey.set(key, category)
    self.set(key, (self.get(key) ?? 0) + dt)
    categories.set(category, (categories.get(category) ?? 0) + dt)
    // Total time: every distinct function on the stack once (recursion is not counted twice).
    const seen = new Set<string>()
    for (let node: ProfileNode | undefined = leaf; node !== undefined; node = byId.get(parent.get(node.id) ?? -1)) {
      const k2 = keyOf(node)
      if (seen.has(k2)) continue
      seen.add(k2)
      categoryOfKey.set(k2, categoryOf(node.callFrame))
      total.set(k2, (total.get(k2) ?? 0) + dt)
    }
  }
  const functions: FunctionTime[] = [...total.entries()].map(([key, t]) => {
    const [name, where] = key.split('\u0000') as [string, string]
    return { name, where, category: categoryOfKey.get(key) ?? 'other', selfMs: (self.get(key) ?? 0) / 1000, totalMs: t / 1000 }
  })
  return {
    sampledMs: sampledUs / 1000,
    idleMs: idleUs / 1000,
    categories: [...categories.entries()].map(([category, us]) => ({ category, selfMs: us / 1000 })).sort((a, b) => b.selfMs - a.selfMs),
    functions,
    windowed,
  }
}

/** A plain-text report: categories, then the top functions by self and by total time. */
export function formatProfileSummary (s: ProfileSummary, top = 25, ours: ReadonlySet<string> = new Set(['aedes', 'mqtt-packet', 'gateway/**/*.ts', 'store/**/*.ts'])): string {
  const busy = s.sampledMs - s.idleMs
  const pct = (ms: number): string => `${((100 * ms) / busy).toFixed(1).padStart(5)} %`
  const lines: string[] = []
  lines.push(`${s.windowed ? 'in the measured window: ' : 'whole profile (start-up included): '}sampled ${(s.sampledMs / 1000).toFixed(1)} s on the main thread, idle ${(s.idleMs / 1000).toFixed(1)} s; shares below are of the busy ${(busy / 1000).toFixed(1)} s`)
  lines.push('self time by origin:')
  for (const c of s.categories) if (c.category !== 'idle') lines.push(`  ${pct(c.selfMs)}  ${c.category}`)
  lines.push(`top ${top} functions by self time:`)
  const fn = (f: FunctionTime, ms: number): string => `  ${pct(ms)}  ${f.name}  ${f.where}  [${f.category}]`
  for (const f of [...s.functions].filter((f) => f.category !== 'idle').sort((a, b) => b.selfMs - a.selfMs).slice(0, top)) lines.push(fn(f, f.selfMs))
  lines.push(`top ${top} functions of ${[...ours].join(', ')} by total time (self + callees):`)
  for (const f of [...s.functions].filter((f) => ours.has(f.category)).sort((a, b) => b.totalMs - a.totalMs).slice(0, top)) lines.push(fn(f, f.totalMs))
  return lines.join('\n')
}
