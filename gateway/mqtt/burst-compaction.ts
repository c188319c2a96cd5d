/**
 * Gives memory back after a burst of connections (issue 13: what an idle
 * connection costs as a user reads RSS, not after a GC forced by a bench).
 *
 * Every CONNECT allocates far more than the connection keeps (authentication,
 * aedes' connect chain, session lookups, promises), and with a hundred
 * CONNECTs in flight much of it lives through two scavenges and is promoted
 * to the old generation: about 15 KB per connection where the connection
 * itself keeps about 5 KB (BENCHMARKS.md, idle connections). V8 frees that
 * garbage only at its next mark-compact, and gives the pages back only when
 * that collection compacts. Its memory reducer, which would, waits for a low
 * allocation rate, and 10,000 devices pinging every 30 s never look idle to
 * it: the garbage stayed in RSS until V8's watchdog collected, about 100 s
 * after the previous mark-compact, and that collection compacted little
 * (measured with --trace-gc, 2026-12-02).
 *
 * So once at least `minConnections` were accepted since the last compaction
 * and no new one arrived for `quietMs`, the gateway runs one full, compacting
 * collection itself. It stops the main thread for as long as the collection
 * takes (logged with each one), which is why it waits for the burst to be
 * over and is not repeated for a trickle of reconnects.
 */
import v8 from 'node:v8'
import vm from 'node:vm'
import type { Logger } from 'pino'

/** Connections accepted since the last compaction that make one worth its pause. */
export const COMPACT_AFTER_CONNECTIONS = 1000
/** Time without a new connection after which a burst is over. */
export const BURST_QUIET_MS = 5000

export interface CompactionResult {
  readonly ms: number
  readonly rssBefore: number
  readonly rssAfter: number
}

export interface BurstCompactionOptions {
  readonly minConnections: number
  readonly quietMs: number
  /** Runs one full compacting collection ({@link compactHeap} in the gateway; a stand-in in tests). */
  readonly compact: () => CompactionResult
  readonly logger: Pick<Logger, 'info' | 'warn'>
}

export class BurstCompaction {
  readonly #options: BurstCompactionOptions
  #accepted = 0
  #timer: NodeJS.Timeout | undefined
  #closed = false

  constructor (options: BurstCompactionOptions) {
    this.#options = options
  }

  /** Connections accepted since the last compaction. */
  get accepted (): number { return this.#accepted }

  /** A connection was accepted: (re)starts the quiet period once there were enough. */
  connected (): void {
    if (this.#closed) return
    this.#accepted++
    if (this.#accepted < this.#options.minConnections) return
    // One timer per burst, pushed back by every connection (refresh allocates nothing).
    if (this.#timer === undefined) this.#timer = setTimeout(() => this.#burstOver(), this.#options.quietMs).unref()
    else this.#timer.refresh()
  }

  close (): void {
    this.#closed = true
    clearTimeout(this.#timer)
    this.#timer = undefined
  }

  /**
   * Compacts now: at the end of the gateway's start, whose garbage (the config, the users' hashes, the session and
   * log indexes read back) would otherwise stay in RSS until V8's watchdog, as a burst's does.
   */
  compactNow (why: string): void {
    this.#compact(why, {})
  }

  #burstOver (): void {
    this.#timer = undefined
    const connections = this.#accepted
    this.#accepted = 0
    this.#compact(`after a burst of ${connections} connections`, { connections })
  }

  #compact (why: string, fields: object): void {
    try {
      const { ms, rssBefore, rssAfter } = this.#options.compact()
      this.#options.logger.info({ ...fields, ms: Math.round(ms), rssBeforeBytes: rssBefore, rssAfterBytes: rssAfter },
        `heap compacted ${why}: RSS ${mib(rssBefore)} -> ${mib(rssAfter)} MiB in ${Math.round(ms)} ms`)
    } catch (err) {
      this.#options.logger.warn({ err: (err as Error).message }, `heap compaction ${why} failed`)
    }
  }
}

const mib = (bytes: number): string => (bytes / 1048576).toFixed(1)

/** V8 flags this process was started with, which compactHeap must leave as they were. */
const STARTED_COMPACTING = process.execArgv.includes('--compact-on-every-full-gc')
let collectGarbage: (() => void) | undefined

/**
 * One full garbage collection that compacts every page of the old generation, so pages left half empty by a burst
 * go back to the system. Node has no API for it: V8's `gc()` is exposed with `--expose-gc`, set here at runtime
 * (Node keeps V8's flags writable after start, `--no-freeze-flags-after-init`) and read from a new context, which
 * gets the function where the main context already exists without it; compaction of every page is V8's
 * `--compact-on-every-full-gc`, switched on only around this one call (a plain full GC gave back nothing measurable).
 */
export function compactHeap (): CompactionResult {
  const rssBefore = process.memoryUsage.rss()
  const started = performance.now()
  if (collectGarbage === undefined) {
    const exposed = (globalThis as { gc?: () => void }).gc
    if (exposed === undefined) v8.setFlagsFromString('--expose-gc')
    collectGarbage = exposed ?? vm.runInNewContext('gc') as () => void
  }
  if (!STARTED_COMPACTING) v8.setFlagsFromString('--compact-on-every-full-gc')
  try {
    collectGarbage()
  } finally {
    if (!STARTED_COMPACTING) v8.setFlagsFromString('--no-compact-on-every-full-gc')
  }
  return { ms: performance.now() - started, rssBefore, rssAfter: process.memoryUsage.rss() }
}
