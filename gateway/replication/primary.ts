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
 * harmless. The writes after the snapshot's point are pinned in the journal
 * (journal.ts) from before the copy starts, and the pin then follows the
 * standby's acks: a copy that takes longer than the backlog lasts under load
 * still ends with its follow-on writes at hand, so one snapshot is enough.
 * The pin is bounded by `catchUpBytes`; past it the standby's connection is
 * dropped (GW_WARN_STANDBY_CATCH_UP_OVERFLOW, counted) and it starts over.
 *
 * Batches go out from the journal as the standby acknowledges them: at most
 * SEND_WINDOW_BYTES sent and unacknowledged, the rest waits in the journal
 * (pinned), not in the socket's buffer.
 */
import net, { type AddressInfo } from 'node:net'
import type { Logger } from 'pino'
import type { ReplicationConfig } from './config-schema.ts'
import { parseHostPort } from './config-schema.ts'
import type { JournalPin, WriteJournal } from './journal.ts'
import { FrameSocket, PROTOCOL_VERSION, type PrimaryFrame, type StandbyFrame } from './protocol.ts'
import { GatewayError } from '../errors.ts'

/** LevelDB entries read at a time for a snapshot, at most. */
const SNAPSHOT_CHUNK = 1024
/** Bytes (keys and values) per snapshot frame, at most, but for a single larger entry: a log batch can be 1,000 records. */
const SNAPSHOT_FRAME_BYTES = 1024 * 1024
/**
 * Bytes a snapshot read (nextv) gathers, about: classic-level stops a nextv once its entries pass the iterator's
 * highWaterMarkBytes, 16 KiB by default, which made every frame a 16 KiB one whatever SNAPSHOT_FRAME_BYTES said.
 */
const SNAPSHOT_READ_BYTES = 4 * SNAPSHOT_FRAME_BYTES
/**
 * Batch bytes sent to the standby and not acknowledged yet, at most (one batch always goes, however large); also how much
 * of a snapshot may wait in the socket before the copy reads on. Enough to keep a LAN busy between acks.
 */
const SEND_WINDOW_BYTES = 8 * 1024 * 1024
const PING_MS = 1000

/** The root database as the snapshot reads it. */
export interface SnapshotSource {
  iterator (options: { keys: true, values: true, highWaterMarkBytes: number }): { nextv (n: number): Promise<Array<[Buffer, Buffer]>>, close (): Promise<void> }
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
  /** Called as a standby is dropped because the writes kept for it passed catchUpBytes. */
  readonly onCatchUpOverflow?: () => void
}

interface Standby {
  readonly frames: FrameSocket<StandbyFrame, PrimaryFrame>
  readonly address: string
  /** Highest sequence number written to it; -1 until welcomed (and while its snapshot is copied). */
  sent: number
  acked: number
  /** The position it was caught up from (its hello's, or its snapshot's): what unacknowledged bytes count from before its first ack. */
  from: number
  snapshotting: boolean
  /** When its snapshot began (now() time), for the log lines of its end and of an overflow; null once it acknowledged the snapshot's point, or without one. */
  snapshotAt: number | null
  /** Keeps the journal's entries after `from`, then after its acks, until it has them; null once released. */
  pin: JournalPin | null
  /** When a frame last came from it (now() time), and pings sent since: silent only when both say so (a stalled event loop is no silence). */
  heardAt: number
  unanswered: number
}

/** Pings without an answer, besides maxLagMs without a frame, before a standby counts as silent: about maxLagMs of pings (see the timer). */
const SILENT_PINGS = 4
/**
 * Bytes waiting to be written to the standby above which its silence proves nothing: the pings wait behind them (a
 * snapshot, a catch-up over a slow link). A standby that falls that far behind is out of sync by its lag, and dropped
 * once what is kept for it passes catchUpBytes.
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
    this.#unsubscribe = deps.journal.onEntry(() => { this.#forward() })
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
    if (this.#standby !== undefined) this.#forget(this.#standby)
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
      if (standby !== undefined) this.#forget(standby)
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
    if (this.#standby !== undefined) this.#forget(this.#standby)
    this.#standby?.frames.close()
    const standby: Standby = {
      frames, address, sent: -1, acked: -1, from: -1, snapshotting: true, snapshotAt: null, pin: null, heardAt: this.#deps.now(), unanswered: 0,
    }
    // Pinned at once: from here on the backlog keeps what it lacks (up to catchUpBytes), however fast the writes come.
    standby.pin = hello.history === journal.history ? journal.pin(hello.seq, (kept) => { this.#overflow(standby, kept) }) : null
    this.#standby = standby
    if (standby.pin !== null) {
      standby.acked = standby.from = hello.seq
      standby.snapshotting = false
      this.#lastAcked = Math.max(this.#lastAcked, hello.seq)
      // A standby killed after its fsync and before its ack reached us comes back holding writes we still wait for: they are acknowledged now.
      // Under block nothing else would release them: the held commit holds the writer, so no later write comes for the standby to ack.
      this.#releaseWaiters(hello.seq)
      logger.info({ standby: address, from: hello.seq, writes: journal.lastSeq - hello.seq }, 'standby connected; catching up from the backlog')
      this.#deps.onCatchUp?.('backlog')
      frames.send({ type: 'welcome', history: journal.history, epoch, snapshot: false, seq: hello.seq })
      standby.sent = hello.seq
      this.#pump(standby)
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
    // The iterator reads the database as it is now: at journal.lastSeq or later. Every write after that is pinned
    // before the iterator opens, so the copy can take as long as it takes (up to catchUpBytes written meanwhile).
    const seq = journal.lastSeq
    const pin = journal.pin(seq, (kept) => { this.#overflow(standby, kept) })
    if (pin === null) {
      // Unreachable: the newest write can always be pinned (there is nothing after it yet).
      logger.error({ seq }, 'the journal could not pin the snapshot\'s point: dropping the standby\'s connection')
      this.#drop(standby, 'the snapshot\'s point could not be pinned')
      return
    }
    standby.pin = pin
    standby.from = seq
    standby.snapshotAt = this.#deps.now()
    const iterator = root.iterator({ keys: true, values: true, highWaterMarkBytes: SNAPSHOT_READ_BYTES })
    standby.frames.send({ type: 'welcome', history: journal.history, epoch, snapshot: true, seq })
    let entries = 0
    let bytes = 0
    try {
      for (;;) {
        if (this.#standby !== standby) return
        const chunk = await iterator.nextv(SNAPSHOT_CHUNK)
        if (chunk.length === 0) break
        const kept = chunk.filter(([key]) => !(key.length >= ignorePrefix.length && key.subarray(0, ignorePrefix.length).equals(ignorePrefix)))
        entries += kept.length
        let frame: Array<[Buffer, Buffer]> = []
        let frameBytes = 0
        for (const entry of kept) {
          const size = entry[0].length + entry[1].length
          if (frame.length > 0 && frameBytes + size > SNAPSHOT_FRAME_BYTES) {
            standby.frames.send({ type: 'snapshot', entries: frame })
            frame = []
            frameBytes = 0
          }
          frame.push(entry)
          frameBytes += size
          bytes += size
        }
        if (frame.length > 0) standby.frames.send({ type: 'snapshot', entries: frame })
        // Let the socket drain: a snapshot can be the whole disk.
        while (standby.frames.buffered > SEND_WINDOW_BYTES && this.#standby === standby) await standby.frames.drained()
      }
    } catch (err) {
      logger.error({ err: (err as Error).message }, 'snapshot for the standby failed; it will reconnect')
      standby.frames.close()
      return
    } finally {
      await iterator.close()
    }
    // Dropped meanwhile (silent, replaced, or past catchUpBytes: logged there); its pin is released.
    if (this.#standby !== standby) return
    standby.frames.send({ type: 'snapshot-end', seq })
    standby.sent = seq
    standby.snapshotting = false
    const behind = journal.lastSeq - seq
    // How far the writes went on while it was copied: what the journal kept for it (catchUpBytes bounds it).
    logger.info({ entries, bytes, seq, writesSince: behind, bytesSince: journal.totalBytes - (journal.totalBytesAt(seq) ?? 0) }, 'snapshot sent to the standby')
    this.#pump(standby)
  }

  #forward (): void {
    const standby = this.#standby
    if (standby !== undefined) this.#pump(standby)
  }

  /** Sends the standby the journal's next entries, in order, while under SEND_WINDOW_BYTES of what it was sent waits for its ack. */
  #pump (standby: Standby): void {
    if (standby.sent < 0 || standby.snapshotting || this.#standby !== standby) return
    const { journal } = this.#deps
    const base = journal.totalBytesAt(Math.max(standby.acked, standby.from))
    while (standby.sent < journal.lastSeq) {
      const entry = journal.entry(standby.sent + 1)
      if (entry === undefined || base === undefined) {
        // The pin keeps these: only a pin lost (handled there) or a bug gets here.
        const reason = 'the standby\'s next write is no longer in the journal'
        this.#deps.logger.error({ standby: standby.address, sent: standby.sent }, `${reason}: dropping its connection`)
        this.#drop(standby, reason)
        return
      }
      if (entry.totalBytes - entry.bytes - base >= SEND_WINDOW_BYTES) return
      standby.frames.send({ type: 'batch', seq: entry.seq, at: entry.at, ops: entry.ops })
      standby.sent = entry.seq
    }
  }

  /** The journal dropped the standby's pin: it would have kept over catchUpBytes. The standby starts over (with a snapshot). */
  #overflow (standby: Standby, keptBytes: number): void {
    if (this.#standby !== standby) return
    const { config, logger, now } = this.#deps
    // Until the standby acknowledges the snapshot's point, the snapshot is not applied there, whether or not it was all sent.
    const since = standby.snapshotAt !== null && standby.acked < standby.from
      ? `its snapshot began ${((now() - standby.snapshotAt) / 1000).toFixed(1)} s ago (not yet applied)`
      : 'its last acknowledgement'
    const limit = Math.max(config.catchUpBytes, config.backlogBytes)
    logger.warn({ code: 'GW_WARN_STANDBY_CATCH_UP_OVERFLOW', standby: standby.address, keptBytes, catchUpBytes: limit,
      snapshotting: standby.snapshotting, acked: standby.acked, from: standby.from },
      `the writes kept for the standby since ${since} passed replication.catchUpBytes (${keptBytes} > ${limit} bytes): ` +
      'dropping its connection; it starts over with a snapshot')
    this.#deps.onCatchUpOverflow?.()
    this.#drop(standby, 'the standby fell behind by more than replication.catchUpBytes')
  }

  /** Ends the standby's connection now; forgotten at once: its socket's close, when it comes, finds another standby (or none) and says nothing more. */
  #drop (standby: Standby, reason: string): void {
    this.#forget(standby)
    standby.frames.close()
    if (this.#standby !== standby) return
    this.#standby = undefined
    this.#setInSync(false, reason)
  }

  /** What was kept for a standby that is gone is kept no longer. */
  #forget (standby: Standby): void {
    standby.pin?.release()
    standby.pin = null
  }

  #acked (standby: Standby, seq: number): void {
    // While it copies a snapshot, an ack can only be an earlier copy's, which the snapshot is about to replace.
    if (typeof seq !== 'number' || seq <= standby.acked || standby.snapshotting) return
    standby.acked = seq
    // An ack past what was sent (a standby that had more than its hello said): the pump goes on after it, inside the window.
    standby.sent = Math.max(standby.sent, seq)
    if (standby.snapshotAt !== null && seq >= standby.from) {
      // End to end: copied, followed by the writes since its point, and on the standby's disk.
      this.#deps.logger.info({ standby: standby.address, seq, seconds: Number(((this.#deps.now() - standby.snapshotAt) / 1000).toFixed(1)) },
        'the standby applied its snapshot')
      standby.snapshotAt = null
    }
    standby.pin?.moveTo(seq)
    this.#lastAcked = Math.max(this.#lastAcked, seq)
    this.#releaseWaiters(seq)
    this.#pump(standby)
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
    // A standby applying its snapshot stops reading while its disk is behind (standby.ts), pings included: its silence
    // then says nothing of the link. It is out of sync meanwhile, its own silence limit finds a dead link (its next
    // hello replaces this connection), and catchUpBytes bounds what is kept for it.
    const applyingSnapshot = standby.snapshotAt !== null
    if (!applyingSnapshot && silentMs > this.#deps.config.maxLagMs && standby.unanswered >= SILENT_PINGS && standby.frames.buffered < SILENT_MAX_BUFFERED) {
      this.#deps.logger.warn({ standby: standby.address, silentMs }, 'no word from the standby for longer than maxLagMs: dropping its connection')
      this.#drop(standby, `the standby has been silent for ${(silentMs / 1000).toFixed(1)} s, over maxLagMs ${this.#deps.config.maxLagMs}`)
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
