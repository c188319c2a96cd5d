/**
 * The standby's side: connects to its primary (again and again, with
 * backoff), says what it has applied, and applies what comes back to its own
 * database in the primary's order: a snapshot (first a marker in the
 * replication metadata saying that the copy is incomplete, so a standby
 * killed half-way starts a new snapshot, then the database emptied, see
 * replication.ts emptyForCopy), then batch after batch.
 * Queued batches are applied together as one LevelDB batch, with the
 * position they reach, and acknowledged once that batch is written (fsync'd
 * under store.durability: sync). After each apply the read-only store is
 * told to re-read what changed (coalesced, on the same chain as the applies);
 * after a snapshot at once, before the standby counts as past it.
 *
 * Across a reconnect: acks go on the connection welcomed last (an apply the
 * lost connection started is acknowledged there), batches the lost
 * connection left queued are dropped at the welcome (the new one sends
 * them again, or a snapshot replaces them). Every ping is answered with a
 * pong at once; a connection that brings nothing for replication.silenceMs
 * (5 s by default) is dropped and made again (protocol.ts).
 *
 * A snapshot arrives as fast as the link brings it, and a disk can be
 * slower: above MAX_UNAPPLIED_BYTES received and not yet written, the
 * standby stops reading the connection (TCP's window makes the primary
 * wait) until the writes are down to half of it; meanwhile it does not
 * count the primary silent, since it is not listening. Every snapshot batch
 * is written with sync: LevelDB fsyncs only the log file a sync write goes
 * to, and a batch larger than its write buffer rolls the log, so a snapshot
 * written without sync but for its last write could lose its data in a
 * power cut while its position (the acknowledged copy) survived.
 *
 * The replication metadata (sublevel `replication`) is never replicated: it
 * says where this copy stands, not what the primary holds.
 */
import net from 'node:net'
import type { Logger } from 'pino'
import { asBuffer, FrameSocket, PROTOCOL_VERSION, type BatchFrame, type PrimaryFrame, type StandbyFrame } from './protocol.ts'
import type { HostPort } from './config-schema.ts'

const RETRY_MIN_MS = 100
const RETRY_MAX_MS = 2000
/**
 * The primary pings at least every second: a connection that brought nothing for silenceMs (more checks in a row than
 * it has seconds) went silent (a black hole sends no reset; TCP would tell after minutes), so the standby reconnects. Counted in
 * checks, not measured in time, so a stalled event loop is no silence.
 */
const CHECK_MS = 1000
/**
 * Snapshot bytes (keys and values) received and not yet written above which the standby stops reading its connection,
 * until half of them are written. Without it a disk slower than the link held the rest of the snapshot in memory
 * (a reviewer's slow disk: 112 MiB unapplied, 216 MiB of buffers).
 */
export const MAX_UNAPPLIED_BYTES = 64 * 1024 * 1024
/**
 * A snapshot is written in LevelDB batches of this many entries or bytes (keys and values), whichever comes first: an
 * entry is a log batch of up to 1,000 records, so a count alone could make one write of gigabytes.
 */
const SNAPSHOT_BATCH_ENTRIES = 4096
const SNAPSHOT_BATCH_BYTES = 16 * 1024 * 1024
/** How far a standby's reads may trail what it applied: refreshes of its store are at most this often. */
const REFRESH_MS = 20

/** Where this copy stands, as kept in the replication metadata. */
export interface AppliedPosition { readonly history: string, readonly seq: number, readonly epoch: number }

/** The root database as the follower writes it, with the metadata sublevel's keys as raw bytes. */
export interface FollowerDatabase {
  batch (ops: Array<{ type: 'put', key: Buffer, value: Buffer } | { type: 'del', key: Buffer }>, options: { sync: boolean }): Promise<void>
  /** Before a snapshot: sets aside data that is not a copy of a primary's (replication.ts), marks the copy incomplete, empties the database. */
  startCopy (): Promise<void>
  /** The operations that mark a copy complete, written with its position. */
  readonly finishCopyOps: ReadonlyArray<{ type: 'del', key: Buffer }>
}

export interface StandbyDeps {
  readonly peer: HostPort
  readonly gatewayId: string
  readonly db: FollowerDatabase
  /** The metadata key this copy's position is kept under (in the root's key space). */
  readonly positionKey: Buffer
  readonly sync: boolean
  readonly initial: AppliedPosition | null
  readonly logger: Logger
  readonly now: () => number
  /** Re-read the store after applied writes. */
  readonly refresh: () => Promise<void>
  /** replication.silenceMs: a connection that brings nothing this long is dropped and made again. */
  readonly silenceMs: number
  /** MAX_UNAPPLIED_BYTES but in tests. */
  readonly maxUnappliedBytes?: number
}

export class ReplicationStandby {
  readonly #deps: StandbyDeps
  #position: AppliedPosition | null
  #frames: FrameSocket<PrimaryFrame, StandbyFrame> | undefined
  #connected = false
  #snapshotting = false
  #primarySeq = 0
  /** Primary time of the newest batch applied; with the ping's, the lag in seconds. */
  #appliedAt: number | null = null
  #primaryAt: number | null = null
  #queue: BatchFrame[] = []
  #snapshotOps: Array<{ type: 'put', key: Buffer, value: Buffer }> = []
  #snapshotBytes = 0
  /** Snapshot bytes received and not yet written: in #snapshotOps, or in a write queued or under way. */
  #unappliedBytes = 0
  /** The connection not read from until the snapshot's writes catch up. */
  #pausedFrames: FrameSocket<PrimaryFrame, StandbyFrame> | undefined
  readonly #maxUnapplied: number
  #applying: Promise<void> = Promise.resolve()
  #refreshTimer: NodeJS.Timeout | undefined
  #closed = false
  #started = false
  #retryMs = RETRY_MIN_MS
  #retryTimer: NodeJS.Timeout | undefined
  #lastRefusal: string | null = null
  #lastContact: { at: number, lagMs: number } | null = null
  /** Batches received and not yet applied, oldest first: the age of the first is how far behind this standby is. */
  #pending: Array<{ seq: number, at: number }> = []
  /** Silence checks in a row that found no frame from the primary. */
  #quietChecks = 0
  /** Silence checks run since start (with or without a connection). */
  #silenceChecks = 0
  #silenceTimer: NodeJS.Timeout | undefined

  constructor (deps: StandbyDeps) {
    this.#deps = deps
    this.#position = deps.initial
    this.#maxUnapplied = deps.maxUnappliedBytes ?? MAX_UNAPPLIED_BYTES
  }

  /** Starts following: once the store that reads the copy is open (it must not load a copy half-applied). */
  start (): void {
    if (this.#started || this.#closed) return
    this.#started = true
    this.#silenceTimer = setInterval(() => { this.#checkSilence() }, CHECK_MS)
    this.#silenceTimer.unref()
    this.#connect()
  }

  get connected (): boolean { return this.#connected }
  get snapshotting (): boolean { return this.#snapshotting }
  get position (): AppliedPosition | null { return this.#position }
  /** Snapshot bytes received and not yet written. */
  get unappliedBytes (): number { return this.#unappliedBytes }
  /** How many silence checks (one a second) have run: what tests wait for, instead of a time, before "no reconnect". */
  get silenceChecks (): number { return this.#silenceChecks }
  /** Not reading from the primary until the snapshot's writes catch up. */
  get paused (): boolean { return this.#pausedFrames !== undefined && this.#pausedFrames === this.#frames }
  get refusal (): string | null { return this.#lastRefusal }
  /** When this standby last heard from its primary (a batch or a ping), and how far behind it was then; for automatic promotion (election.ts). */
  get lastContact (): { readonly at: number, readonly lagMs: number } | null { return this.#lastContact }

  /** Behind the primary's newest write as last heard (ping or batch). */
  lag (): { writes: number, seconds: number } {
    const applied = this.#position?.seq ?? 0
    const writes = Math.max(0, this.#primarySeq - applied)
    const seconds = writes === 0 || this.#appliedAt === null || this.#primaryAt === null ? 0 : Math.max(0, (this.#primaryAt - this.#appliedAt) / 1000)
    return { writes, seconds }
  }

  async close (): Promise<void> {
    this.#closed = true
    clearInterval(this.#silenceTimer)
    clearTimeout(this.#retryTimer)
    clearTimeout(this.#refreshTimer)
    this.#frames?.close()
    await this.#applying
  }

  #connect (): void {
    if (this.#closed) return
    const { peer, logger } = this.#deps
    const socket = net.connect(peer.port, peer.host)
    socket.setNoDelay(true)
    socket.setKeepAlive(true, 1000)
    const frames: FrameSocket<PrimaryFrame, StandbyFrame> = new FrameSocket(socket, (frame) => { this.#onFrame(frames, frame) },
      (err) => { logger.warn({ err: err.message }, 'replication stream from the primary is unreadable') })
    this.#frames = frames
    this.#quietChecks = 0
    socket.on('connect', () => {
      this.#connected = true
      this.#retryMs = RETRY_MIN_MS
      const p = this.#position
      const hello = { version: PROTOCOL_VERSION, gatewayId: this.#deps.gatewayId, history: p?.history ?? '', seq: p?.seq ?? -1, epoch: p?.epoch ?? 0 }
      frames.send({ type: 'hello', ...hello })
    })
    socket.on('error', (err) => { if (!this.#connected) logger.debug({ err: err.message }, 'primary not reachable') })
    socket.on('close', () => {
      const was = this.#connected
      this.#connected = false
      if (this.#pausedFrames === frames) this.#pausedFrames = undefined
      this.#dropSnapshotOps()
      this.#pending = []
      if (this.#frames === frames) this.#frames = undefined
      if (was) logger.warn({ primary: `${peer.host}:${peer.port}` }, 'lost the primary; reconnecting')
      if (this.#closed) return
      this.#retryTimer = setTimeout(() => { this.#connect() }, this.#retryMs)
      this.#retryMs = Math.min(this.#retryMs * 2, RETRY_MAX_MS)
    })
  }

  #checkSilence (): void {
    this.#silenceChecks++
    // Connecting counts too: a SYN into a black hole is retried by the kernel for about two minutes.
    const frames = this.#frames
    if (frames === undefined) return
    // Not reading it: what the primary sent waits in TCP's buffers, unheard, and says nothing of the link.
    if (this.#pausedFrames === frames) { this.#quietChecks = 0; return }
    // Past `checks` checks without a frame: silent for silenceMs at least (the first check may come just after a frame).
    const checks = Math.ceil(this.#deps.silenceMs / CHECK_MS)
    if (++this.#quietChecks <= checks) return
    this.#deps.logger.warn({ seconds: checks * CHECK_MS / 1000, connected: this.#connected }, 'no word from the primary: reconnecting')
    frames.close()
  }

  #onFrame (frames: FrameSocket<PrimaryFrame, StandbyFrame>, frame: PrimaryFrame): void {
    if (this.#frames !== frames) return
    this.#quietChecks = 0
    switch (frame.type) {
      case 'refused':
        this.#lastRefusal = frame.message
        this.#deps.logger.error({ code: 'GW_REPLICATION_REFUSED' }, `the primary refused this standby: ${frame.message}`)
        break
      case 'welcome':
        this.#lastRefusal = null
        this.#primarySeq = frame.seq
        // Batches the lost connection brought and no apply took yet: this one sends all after the hello again, or a snapshot.
        this.#queue = []
        this.#welcomedOn = frames
        if (!frame.snapshot && this.#position?.history === frame.history && this.#position.seq > frame.seq) {
          // Applied after the hello went out: said now, since a resent batch that changes nothing is not acknowledged.
          frames.send({ type: 'ack', seq: this.#position.seq })
        }
        if (frame.snapshot) {
          this.#snapshotting = true
          this.#dropSnapshotOps()
          this.#run(() => this.#beginSnapshot())
        }
        this.#welcomed = { history: frame.history, epoch: frame.epoch }
        break
      case 'snapshot':
        for (const [key, value] of frame.entries) {
          this.#snapshotOps.push({ type: 'put', key: asBuffer(key), value: asBuffer(value) })
          this.#snapshotBytes += key.length + value.length
          this.#unappliedBytes += key.length + value.length
        }
        if (this.#snapshotOps.length >= SNAPSHOT_BATCH_ENTRIES || this.#snapshotBytes >= SNAPSHOT_BATCH_BYTES) this.#flushSnapshot()
        if (this.#unappliedBytes > this.#maxUnapplied && this.#pausedFrames === undefined) {
          // What is held goes to the disk now: only writes can bring the count down again.
          this.#flushSnapshot()
          this.#pausedFrames = frames
          frames.pause()
          this.#deps.logger.debug({ unappliedBytes: this.#unappliedBytes }, 'snapshot: waiting for the disk before reading on')
        }
        break
      case 'snapshot-end': {
        this.#flushSnapshot()
        const welcomed = this.#welcomed
        if (welcomed !== undefined) this.#run(() => this.#endSnapshot({ ...welcomed, seq: frame.seq }))
        break
      }
      case 'batch':
        this.#primarySeq = Math.max(this.#primarySeq, frame.seq)
        this.#primaryAt = Math.max(this.#primaryAt ?? 0, frame.at)
        this.#queue.push(frame)
        this.#pending.push({ seq: frame.seq, at: frame.at })
        if (this.#queue.length === 1) this.#run(() => this.#applyQueued())
        this.#contact(frame.at)
        break
      case 'ping':
        this.#primarySeq = Math.max(this.#primarySeq, frame.seq)
        this.#primaryAt = frame.at
        this.#contact(frame.at)
        // At once, not after the applies queued before it: it says the link is alive; acks say how far the applies are.
        frames.send({ type: 'pong' })
        break
    }
  }

  #welcomed: { history: string, epoch: number } | undefined
  /** The connection the last welcome came on: acks go there, whichever connection brought what was applied. */
  #welcomedOn: FrameSocket<PrimaryFrame, StandbyFrame> | undefined

  /**
   * Tells the primary that `position` is on disk, on the connection welcomed last if it is still the one in use and
   * speaks of the same history: an ack on a lost connection is lost (one sent on the dead connection left the primary
   * waiting for good when nothing else followed), and one of another history would mean another write.
   */
  #ack (position: AppliedPosition): void {
    const on = this.#welcomedOn
    if (on === undefined || on !== this.#frames || this.#welcomed?.history !== position.history) return
    on.send({ type: 'ack', seq: position.seq })
  }

  /** At a frame sent at `at` (the primary's clock, like the batches' times): the age of the oldest batch received but not applied. */
  #contact (at: number): void {
    const oldest = this.#pending[0]
    this.#lastContact = { at: this.#deps.now(), lagMs: oldest === undefined ? 0 : Math.max(0, at - oldest.at) }
  }

  #applied (seq: number): void {
    let i = 0
    while (i < this.#pending.length && (this.#pending[i] as { seq: number }).seq <= seq) i++
    if (i > 0) this.#pending.splice(0, i)
  }

  /** Runs `fn` after everything applied before it: applies happen one at a time, in order. */
  #run (fn: () => Promise<void>): void {
    this.#applying = this.#applying.then(fn).catch((err: unknown) => {
      this.#deps.logger.error({ err: (err as Error).message }, 'applying the primary\'s writes failed; reconnecting')
      this.#frames?.close()
    })
  }

  async #beginSnapshot (): Promise<void> {
    // From here on there is no position: a standby killed before the snapshot's end starts a new one.
    this.#position = null
    await this.#deps.db.startCopy()
  }

  #flushSnapshot (): void {
    if (this.#snapshotOps.length === 0) return
    const ops = this.#snapshotOps
    const bytes = this.#snapshotBytes
    this.#snapshotOps = []
    this.#snapshotBytes = 0
    // With sync, every one (see the header): one fsync per SNAPSHOT_BATCH_BYTES at most.
    this.#run(async () => {
      try {
        await this.#deps.db.batch(ops, { sync: true })
      } finally {
        this.#written(bytes)
      }
    })
  }

  /** Snapshot bytes that will not be written after all: the connection that brought them is gone, or a new snapshot begins. */
  #dropSnapshotOps (): void {
    this.#written(this.#snapshotBytes)
    this.#snapshotOps = []
    this.#snapshotBytes = 0
  }

  /** `bytes` of the snapshot are written (or dropped): reads on once half the bound is. */
  #written (bytes: number): void {
    this.#unappliedBytes -= bytes
    const paused = this.#pausedFrames
    if (paused === undefined || this.#unappliedBytes > this.#maxUnapplied / 2) return
    this.#pausedFrames = undefined
    this.#quietChecks = 0
    paused.resume()
  }

  async #endSnapshot (position: AppliedPosition): Promise<void> {
    await this.#deps.db.batch([this.#positionOp(position), ...this.#deps.db.finishCopyOps], { sync: true })
    this.#position = position
    this.#applied(position.seq)
    // The store re-reads the copy before this standby counts as past its snapshot (in sync, acknowledged): its reads
    // then serve the new copy, whose log may end before the old one did. A read that began before still meets the
    // shorter log, which the store ends it at (store/log-store.ts, #explainGap).
    if (!this.#closed) {
      await this.#deps.refresh().catch((err: unknown) => this.#deps.logger.warn({ err: (err as Error).message }, 'standby store refresh failed'))
    }
    this.#snapshotting = false
    this.#deps.logger.info({ seq: position.seq }, 'snapshot from the primary applied')
    this.#ack(position)
    this.#scheduleRefresh()
  }

  async #applyQueued (): Promise<void> {
    const batches = this.#queue
    this.#queue = []
    const base = this.#position ?? (this.#welcomed === undefined ? null : { ...this.#welcomed, seq: -1 })
    if (batches.length === 0 || base === null || this.#snapshotting) {
      // Batches that follow a snapshot wait for its end (they were queued after it, so run after it).
      if (this.#snapshotting && batches.length > 0) this.#queue.unshift(...batches)
      return
    }
    const ops: Parameters<FollowerDatabase['batch']>[0] = []
    let seq = base.seq
    let at = this.#appliedAt
    for (const b of batches) {
      if (b.seq <= seq) continue
      if (b.seq !== seq + 1) throw new Error(`batch ${b.seq} does not follow ${seq}`)
      for (const op of b.ops) ops.push(op[0] === 0 ? { type: 'put', key: asBuffer(op[1]), value: asBuffer(op[2]) } : { type: 'del', key: asBuffer(op[1]) })
      seq = b.seq
      at = b.at
    }
    if (seq === base.seq) return
    const position = { history: this.#welcomed?.history ?? base.history, epoch: this.#welcomed?.epoch ?? base.epoch, seq }
    ops.push(this.#positionOp(position))
    await this.#deps.db.batch(ops, { sync: this.#deps.sync })
    this.#position = position
    this.#applied(seq)
    this.#appliedAt = at
    this.#ack(position)
    this.#scheduleRefresh()
  }

  #positionOp (position: AppliedPosition): { type: 'put', key: Buffer, value: Buffer } {
    return { type: 'put', key: this.#deps.positionKey, value: Buffer.from(JSON.stringify(position)) }
  }

  /**
   * Queues one store refresh REFRESH_MS from now (coalesced: at most one waiting). It runs on the apply chain, never
   * beside an apply: the store re-reads a partition in several reads, and an apply between them would look like a
   * gap. Refreshing after every apply took half the standby's time under load (bench/replication.ts).
   */
  #scheduleRefresh (): void {
    if (this.#refreshTimer !== undefined) return
    this.#refreshTimer = setTimeout(() => {
      this.#run(async () => {
        this.#refreshTimer = undefined
        if (this.#closed) return
        await this.#deps.refresh().catch((err: unknown) => this.#deps.logger.warn({ err: (err as Error).message }, 'standby store refresh failed'))
      })
    }, REFRESH_MS)
  }

}
