/**
 * The primary's side: a TCP listener for its standby, which it brings up to
 * date (from the journal's backlog, or a snapshot of the whole database: an
 * iterator, which reads one implicit LevelDB snapshot) and then streams every
 * journaled write to, in order. It tracks what the standby acknowledged, so
 * it knows the lag, whether the standby is in sync, and when a commit may be
 * acknowledged under `acks: replicated` ({@link ReplicationPrimary.gate}).
 *
 * In sync: connected, past its snapshot, and its oldest unacknowledged write
 * is younger than maxLagMs. Out of sync with `onStandbyLost: degrade`, the
 * gate opens (commits are acknowledged on the primary's disk alone); with
 * `block` it stays shut until the standby has the commit.
 *
 * A standby not heard from (no pong, no ack) for maxLagMs is dropped: the
 * link went silent (a black hole sends no reset), and with nothing written
 * the lag alone would never show it. It reconnects when the link is back
 * and catches up from the backlog.
 *
 * A snapshot sent while writes go on can hold writes whose batches follow it
 * too; applying a write twice, in order, ends in the same state, so that is
 * harmless.
 */
import net, { type AddressInfo } from 'node:net'
import type { Logger } from 'pino'
import type { ReplicationConfig } from './config-schema.ts'
import { parseHostPort } from './config-schema.ts'
import type { JournalEntry, WriteJournal } from './journal.ts'
import { FrameSocket, PROTOCOL_VERSION, type PrimaryFrame, type StandbyFrame } from './protocol.ts'
import { GatewayError } from '../errors.ts'

/** Keys and values per snapshot frame: about 1 MiB of 1 KiB entries. */
const SNAPSHOT_CHUNK = 1024
const PING_MS = 1000

/** The root database as the snapshot reads it. */
export interface SnapshotSource {
  iterator (options: { keys: true, values: true }): { nextv (n: number): Promise<Array<[Buffer, Buffer]>>, close (): Promise<void> }
}

export interface PrimaryLag { readonly writes: number, readonly bytes: number, readonly seconds: number }

export interface PrimaryDeps {
  readonly config: ReplicationConfig
  readonly journal: WriteJournal
  readonly root: SnapshotSource
  readonly ignorePrefix: Buffer
  readonly gatewayId: string
  readonly epoch: number
  readonly logger: Logger
  readonly now: () => number
  /** Called on every change of the in-sync state. */
  readonly onInSync: (inSync: boolean, reason: string) => void
  /** Called as a standby connection is caught up: from the backlog, or with a snapshot. */
  readonly onCatchUp?: (from: 'backlog' | 'snapshot') => void
}

interface Standby {
  readonly frames: FrameSocket<StandbyFrame, PrimaryFrame>
  readonly address: string
  /** Highest sequence number written to it; -1 until welcomed. */
  sent: number
  acked: number
  snapshotting: boolean
  /** When a frame last came from it (now() time), and pings sent since: silent only when both say so (a stalled event loop is no silence). */
  heardAt: number
  unanswered: number
}

/** Pings without an answer, besides maxLagMs without a frame, before a standby counts as silent: about maxLagMs of pings (see the timer). */
const SILENT_PINGS = 4
/**
 * Bytes waiting to be written to the standby above which its silence proves nothing: the pings wait behind them (a
 * snapshot, a catch-up over a slow link). A standby that falls that far behind is out of sync by its lag, and dropped
 * past backlogBytes.
 */
const SILENT_MAX_BUFFERED = 1024 * 1024

export class ReplicationPrimary {
  readonly #deps: PrimaryDeps
  readonly #server: net.Server
  #standby: Standby | undefined
  #inSync = false
  /** The highest sequence number a standby acknowledged in this history, kept while none is connected (the lag counts from it). */
  #lastAcked = 0
  #waiters: Array<{ seq: number, resolve: () => void }> = []
  #closed = false
  readonly #timer: NodeJS.Timeout
  readonly #unsubscribe: () => void

  private constructor (deps: PrimaryDeps, server: net.Server) {
    this.#deps = deps
    this.#server = server
    this.#unsubscribe = deps.journal.onEntry((entry) => { this.#forward(entry) })
    this.#timer = setInterval(() => { this.#tick() }, Math.max(10, Math.min(PING_MS, deps.config.maxLagMs / 4)))
    this.#timer.unref()
  }

  static async start (deps: PrimaryDeps): Promise<ReplicationPrimary> {
    const { host, port } = parseHostPort(deps.config.listen) as { host: string, port: number }
    const server = net.createServer()
    const primary = new ReplicationPrimary(deps, server)
    server.on('connection', (socket) => { primary.#accept(socket) })
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject)
        server.listen(port, host, () => { server.off('error', reject); resolve() })
      })
    } catch (cause) {
      primary.#stopTimers()
      throw new GatewayError('GW_LISTEN_FAILED', `replication cannot listen on ${deps.config.listen}: ${(cause as Error).message}`, { cause })
    }
    return primary
  }

  get address (): string {
    const a = this.#server.address() as AddressInfo
    return `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`
  }

  get inSync (): boolean { return this.#inSync }
  get connected (): boolean { return this.#standby !== undefined }
  get standbyAddress (): string | null { return this.#standby?.address ?? null }
  get snapshotting (): boolean { return this.#standby?.snapshotting ?? false }
  get ackedSeq (): number { return this.#lastAcked }

  /** What the standby has not acknowledged yet; everything since it was lost when none is connected. */
  lag (): PrimaryLag {
    const { journal } = this.#deps
    const acked = this.#lastAcked
    const writes = journal.lastSeq - acked
    if (writes <= 0) return { writes: 0, bytes: 0, seconds: 0 }
    const ackedEntry = journal.entry(acked)
    const oldest = journal.entry(acked + 1)
    const bytes = ackedEntry === undefined ? journal.totalBytes : journal.totalBytes - ackedEntry.totalBytes
    const seconds = oldest === undefined ? 0 : Math.max(0, (this.#deps.now() - oldest.at) / 1000)
    return { writes, bytes, seconds }
  }

  /**
   * The store's commit gate under `acks: replicated`: resolves once the
   * standby has acknowledged every write journaled so far (the commit that
   * calls it included); at once while the standby is out of sync under
   * `degrade`, or for a commit without records (session state) under
   * `block` — holding those would hold the gateway's start until a standby
   * came, and every record acknowledged later still waits for them — or
   * when replication stops.
   */
  gate (commit: { readonly records: number }): Promise<void> {
    return this.#waitFor(this.#deps.journal.lastSeq, commit.records === 0)
  }

  /**
   * Under `acks: replicated`, for a write outside the group commit (an HTTP offset commit, reset or group
   * deletion: a LevelDB write of its own): resolves once the standby has acknowledged every write journaled so
   * far, that one included; held under `block` like a commit with records, at once while out of sync under
   * `degrade`, or when replication stops.
   */
  replicated (): Promise<void> {
    return this.#waitFor(this.#deps.journal.lastSeq, false)
  }

  #waitFor (seq: number, passWhenOutOfSync: boolean): Promise<void> {
    if (this.#closed || (this.#standby?.acked ?? -1) >= seq) return Promise.resolve()
    if (!this.#inSync && (this.#deps.config.onStandbyLost === 'degrade' || passWhenOutOfSync)) return Promise.resolve()
    return new Promise((resolve) => this.#waiters.push({ seq, resolve }))
  }

  async close (): Promise<void> {
    this.#closed = true
    this.#stopTimers()
    this.#releaseWaiters(Infinity)
    this.#standby?.frames.close()
    this.#standby = undefined
    await new Promise<void>((resolve) => this.#server.close(() => resolve()))
  }

  #stopTimers (): void {
    clearInterval(this.#timer)
    this.#unsubscribe()
  }

  #accept (socket: net.Socket): void {
    socket.setNoDelay(true)
    socket.setKeepAlive(true, 1000)
    const address = `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? '?'}`
    let standby: Standby | undefined
    const frames: FrameSocket<StandbyFrame, PrimaryFrame> = new FrameSocket(socket, (frame) => {
      if (frame.type === 'who') {
        frames.send({ type: 'is', role: 'primary', epoch: this.#deps.epoch, gatewayId: this.#deps.gatewayId })
        frames.end()
      } else if (frame.type === 'hello') {
        if (standby !== undefined) return
        standby = this.#welcome(frames, address, frame)
      } else if (standby !== undefined && standby === this.#standby) {
        standby.heardAt = this.#deps.now()
        standby.unanswered = 0
        if (frame.type === 'ack') this.#acked(standby, frame.seq)
      }
    }, (err) => { this.#deps.logger.warn({ err: err.message, standby: address }, 'replication stream from the standby is unreadable') })
    socket.on('error', () => {})
    socket.on('close', () => {
      if (standby !== undefined && this.#standby === standby) {
        this.#standby = undefined
        this.#deps.logger.warn({ standby: address }, 'standby disconnected')
        this.#setInSync(false, 'the standby disconnected')
      }
    })
  }

  #welcome (frames: FrameSocket<StandbyFrame, PrimaryFrame>, address: string, hello: StandbyFrame & { type: 'hello' }): Standby | undefined {
    const { journal, gatewayId, epoch, logger } = this.#deps
    const refuse = (message: string): undefined => {
      logger.error({ code: 'GW_REPLICATION_REFUSED', standby: address }, message)
      frames.send({ type: 'refused', message })
      frames.end()
      return undefined
    }
    if (hello.version !== PROTOCOL_VERSION) return refuse(`replication protocol ${String(hello.version)} is not this primary's ${PROTOCOL_VERSION}`)
    if (hello.gatewayId !== gatewayId) {
      return refuse(`the standby's gatewayId ${JSON.stringify(hello.gatewayId)} is not the primary's ${JSON.stringify(gatewayId)}: ` +
        'a pair shares one gatewayId, so the bridge\'s dedupe ids survive a takeover')
    }
    if (hello.epoch > epoch) return refuse(`the standby has seen epoch ${hello.epoch}, newer than this primary's ${epoch}`)
    this.#standby?.frames.close()
    const backlog = hello.history === journal.history ? journal.since(hello.seq) : null
    const standby: Standby = {
      frames, address, sent: -1, acked: backlog === null ? -1 : hello.seq, snapshotting: backlog === null, heardAt: this.#deps.now(), unanswered: 0,
    }
    this.#standby = standby
    if (backlog !== null) {
      this.#lastAcked = Math.max(this.#lastAcked, hello.seq)
      // A standby killed after its fsync and before its ack reached us comes back holding writes we still wait for: they are acknowledged now.
      // Under block nothing else would release them: the held commit holds the writer, so no later write comes for the standby to ack.
      this.#releaseWaiters(hello.seq)
      logger.info({ standby: address, from: hello.seq, writes: backlog.length }, 'standby connected; catching up from the backlog')
      this.#deps.onCatchUp?.('backlog')
      frames.send({ type: 'welcome', history: journal.history, epoch, snapshot: false, seq: hello.seq })
      standby.sent = hello.seq
      for (const entry of backlog) this.#send(standby, entry)
    } else {
      logger.info({ standby: address, history: hello.history, seq: hello.seq }, 'standby connected; sending a snapshot of the database')
      this.#deps.onCatchUp?.('snapshot')
      void this.#snapshot(standby)
    }
    this.#tick()
    return standby
  }

  async #snapshot (standby: Standby): Promise<void> {
    const { journal, epoch, root, ignorePrefix, logger } = this.#deps
    // The iterator reads the database as it is now: at journal.lastSeq or later.
    const seq = journal.lastSeq
    const iterator = root.iterator({ keys: true, values: true })
    standby.frames.send({ type: 'welcome', history: journal.history, epoch, snapshot: true, seq })
    let entries = 0
    try {
      for (;;) {
        if (this.#standby !== standby) return
        const chunk = await iterator.nextv(SNAPSHOT_CHUNK)
        if (chunk.length === 0) break
        const kept = chunk.filter(([key]) => !(key.length >= ignorePrefix.length && key.subarray(0, ignorePrefix.length).equals(ignorePrefix)))
        entries += kept.length
        standby.frames.send({ type: 'snapshot', entries: kept })
        // Let the socket drain: a snapshot can be the whole disk.
        while (standby.frames.buffered > 8 * 1024 * 1024 && this.#standby === standby) await new Promise((resolve) => setTimeout(resolve, 5))
      }
    } catch (err) {
      logger.error({ err: (err as Error).message }, 'snapshot for the standby failed; it will reconnect')
      standby.frames.close()
      return
    } finally {
      await iterator.close()
    }
    const backlog = journal.since(seq)
    if (backlog === null) {
      logger.warn({ seq }, 'the backlog moved past the snapshot while it was sent; the standby starts again')
      standby.frames.close()
      return
    }
    standby.frames.send({ type: 'snapshot-end', seq })
    standby.sent = seq
    logger.info({ entries, seq }, 'snapshot sent to the standby')
    for (const entry of backlog) this.#send(standby, entry)
    standby.snapshotting = false
  }

  #forward (entry: JournalEntry): void {
    const standby = this.#standby
    if (standby === undefined || standby.sent < 0 || standby.snapshotting) return
    this.#send(standby, entry)
  }

  #send (standby: Standby, entry: JournalEntry): void {
    if (entry.seq !== standby.sent + 1) return
    standby.frames.send({ type: 'batch', seq: entry.seq, at: entry.at, ops: entry.ops })
    standby.sent = entry.seq
    // A standby that cannot keep up: drop it before its socket buffers the backlog twice; it reconnects and catches up.
    if (standby.frames.buffered > this.#deps.config.backlogBytes) {
      this.#deps.logger.warn({ buffered: standby.frames.buffered }, 'standby too slow: dropping its connection')
      standby.frames.close()
    }
  }

  #acked (standby: Standby, seq: number): void {
    // While it copies a snapshot, an ack can only be an earlier copy's, which the snapshot is about to replace.
    if (typeof seq !== 'number' || seq <= standby.acked || standby.snapshotting) return
    standby.acked = seq
    this.#lastAcked = Math.max(this.#lastAcked, seq)
    this.#releaseWaiters(seq)
    if (!this.#inSync) this.#tick()
  }

  #releaseWaiters (seq: number): void {
    if (this.#waiters.length === 0) return
    const keep: Array<{ seq: number, resolve: () => void }> = []
    for (const w of this.#waiters) {
      if (w.seq <= seq) w.resolve()
      else keep.push(w)
    }
    this.#waiters = keep
  }

  #tick (): void {
    const standby = this.#standby
    if (standby === undefined) { this.#setInSync(false, 'no standby is connected'); return }
    const silentMs = this.#deps.now() - standby.heardAt
    if (silentMs > this.#deps.config.maxLagMs && standby.unanswered >= SILENT_PINGS && standby.frames.buffered < SILENT_MAX_BUFFERED) {
      this.#deps.logger.warn({ standby: standby.address, silentMs }, 'no word from the standby for longer than maxLagMs: dropping its connection')
      // Forgotten at once: its socket's close, when it comes, finds another standby (or none) and says nothing more.
      this.#setInSync(false, `the standby has been silent for ${(silentMs / 1000).toFixed(1)} s, over maxLagMs ${this.#deps.config.maxLagMs}`)
      standby.frames.close()
      this.#standby = undefined
      return
    }
    standby.frames.send({ type: 'ping', seq: this.#deps.journal.lastSeq, at: this.#deps.now() })
    standby.unanswered++
    if (standby.snapshotting) { this.#setInSync(false, 'the standby is copying a snapshot'); return }
    const lag = this.lag()
    if (lag.seconds * 1000 > this.#deps.config.maxLagMs) {
      this.#setInSync(false, `the standby lags ${lag.seconds.toFixed(1)} s (${lag.writes} writes), over maxLagMs ${this.#deps.config.maxLagMs}`)
    } else {
      this.#setInSync(true, 'the standby has caught up')
    }
  }

  #setInSync (inSync: boolean, reason: string): void {
    if (inSync === this.#inSync) return
    this.#inSync = inSync
    this.#deps.onInSync(inSync, reason)
    if (!inSync && this.#deps.config.onStandbyLost === 'degrade') this.#releaseWaiters(Infinity)
  }
}
