/**
 * The primary's commit gate against a standby speaking the protocol by hand
 * over a real socket: under `onStandbyLost: block` a held commit is
 * released by the standby's ack, or by its hello when it comes back
 * already holding the commit (it fsync'd the write and died before its ack
 * arrived). Before the fix, that second case held the commit, and with it
 * the writer and every PUBACK, for good. A write outside the group commit
 * (an HTTP offset commit) is held the same way. A standby that answers no
 * ping for maxLagMs is dropped; one that answers is kept.
 *
 * Catching up: at most the send window goes out unacknowledged, also after
 * an ack beyond what was sent; a pin is released with the standby that
 * held it (gone, or replaced); a snapshot of a real LevelDB goes out in
 * frames of about 1 MiB (classic-level's nextv stops at its iterator's
 * highWaterMarkBytes, 16 KiB unless told), and its end to end time is
 * logged at the standby's first ack of its point.
 */
import { EventEmitter } from 'node:events'
import { mkdtemp, rm } from 'node:fs/promises'
import net from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import { pino } from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import type { ReplicationConfig } from '../../../gateway/replication/config-schema.ts'
import { WriteJournal, type WriteEmitter } from '../../../gateway/replication/journal.ts'
import { ReplicationPrimary, type SnapshotSource } from '../../../gateway/replication/primary.ts'
import { FrameSocket, PROTOCOL_VERSION, type PrimaryFrame, type StandbyFrame } from '../../../gateway/replication/protocol.ts'

const META = Buffer.from('!replication!')
const CONFIG: ReplicationConfig = {
  role: 'primary', listen: '127.0.0.1:0', peer: '', acks: 'replicated', maxLagMs: 60_000, silenceMs: 5000, onStandbyLost: 'block', backlogBytes: 1024 * 1024, catchUpBytes: 4 * 1024 * 1024, coordination: {},
}
const noSnapshot: SnapshotSource = { iterator: () => { throw new Error('no snapshot expected') } }

const closers: Array<() => Promise<void> | void> = []
afterEach(async () => { for (const c of closers.splice(0).reverse()) await c() })

async function primaryWithOneWrite (config: Partial<ReplicationConfig> = {}): Promise<{ primary: ReplicationPrimary, journal: WriteJournal, port: number }> {
  const db = new EventEmitter()
  const journal = new WriteJournal(db as unknown as WriteEmitter, { ignorePrefix: META, maxBytes: CONFIG.backlogBytes, now: Date.now })
  closers.push(() => journal.close())
  const primary = await ReplicationPrimary.start({
    config: { ...CONFIG, ...config }, journal, root: noSnapshot, ignorePrefix: META, gatewayId: 'g', epoch: 1, logger: pino({ level: 'silent' }), now: Date.now,
    onInSync: () => {},
  })
  closers.push(() => primary.close())
  db.emit('write', [{ type: 'put', encodedKey: Buffer.from('k'), encodedValue: Buffer.from('v') }])
  expect(journal.lastSeq).toBe(1)
  return { primary, journal, port: Number(primary.address.split(':').at(-1)) }
}

/** A hand-made standby: sends `hello` at `seq`, hands every frame from the primary to `onFrame`. */
async function standbyAt (port: number, history: string, seq: number, onFrame: (frame: PrimaryFrame, frames: FrameSocket<PrimaryFrame, StandbyFrame>) => void):
Promise<void> {
  const socket = net.connect(port, '127.0.0.1')
  closers.push(() => { socket.destroy() })
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject))
  const frames: FrameSocket<PrimaryFrame, StandbyFrame> = new FrameSocket(socket, (frame) => onFrame(frame, frames), () => {})
  frames.send({ type: 'hello', version: PROTOCOL_VERSION, gatewayId: 'g', history, seq, epoch: 1 })
}

/**
 * A standby from offset 0 that acknowledges batch 1 when it comes, after checking that what waits for it was not
 * released before (the standby did not have the batch yet): resolves once the ack is sent.
 */
async function ackFirstBatch (port: number, history: string, released: () => boolean): Promise<void> {
  await new Promise<void>((resolve) => {
    void standbyAt(port, history, 0, (frame, frames) => {
      if (frame.type === 'batch' && frame.seq === 1) {
        expect(released()).toBe(false)
        frames.send({ type: 'ack', seq: 1 })
        resolve()
      }
    })
  })
}

describe('the primary\'s commit gate under onStandbyLost: block', () => {
  it('holds a commit until the standby acknowledges it', async () => {
    const { primary, journal, port } = await primaryWithOneWrite()
    let released = false
    const gate = primary.gate({ records: 1 }).then(() => { released = true })
    await ackFirstBatch(port, journal.history, () => released)
    await gate
    expect(primary.ackedSeq).toBe(1)
  })

  it('holds a write outside the group commit (replicated()) like a commit with records; a commit of session writes alone passes', async () => {
    const { primary, journal, port } = await primaryWithOneWrite()
    // No standby yet: out of sync. Session writes pass (the gateway's start must not wait for a standby); an HTTP write is held.
    await primary.gate({ records: 0 })
    let released = false
    const write = primary.replicated().then(() => { released = true })
    await ackFirstBatch(port, journal.history, () => released)
    await write
  })

  it('releases a held commit when the standby comes back already holding it (its ack was lost with its process)', async () => {
    const { primary, journal, port } = await primaryWithOneWrite()
    const gate = primary.gate({ records: 1 })
    const welcomed = new Promise<PrimaryFrame>((resolve) => {
      void standbyAt(port, journal.history, 1, (frame) => { if (frame.type === 'welcome') resolve(frame) })
    })
    expect(await welcomed).toMatchObject({ snapshot: false, seq: 1 })
    await gate
    expect(primary.ackedSeq).toBe(1)
  })
})

describe('a silent standby', () => {
  it('is dropped when it answers no ping for maxLagMs; one that answers stays', async () => {
    const { primary, journal, port } = await primaryWithOneWrite({ maxLagMs: 100 })
    // One standby answers every ping, until it has answered 20 (about 500 ms of pings at 25 ms); the other never answers.
    const answered = new Promise<void>((resolve) => {
      let pings = 0
      void standbyAt(port, journal.history, 1, (frame, frames) => {
        if (frame.type !== 'ping') return
        frames.send({ type: 'pong' })
        if (++pings === 20) resolve()
      })
    })
    await answered
    expect(primary.connected).toBe(true)
    const socket = net.connect(port, '127.0.0.1')
    closers.push(() => { socket.destroy() })
    const silent = new FrameSocket<PrimaryFrame, StandbyFrame>(socket, () => {}, () => {})
    silent.send({ type: 'hello', version: PROTOCOL_VERSION, gatewayId: 'g', history: journal.history, seq: 1, epoch: 1 })
    await new Promise<void>((resolve) => socket.once('close', () => resolve()))
    expect(primary.connected).toBe(false)
  })

  it('is kept while it applies its snapshot (it stops reading while its disk is behind), and dropped once it acknowledged it', async () => {
    const { primary, port, finish } = await primaryWithHeldSnapshot(16 * 1024 * 1024, { maxLagMs: 100 })
    let pings = 0
    let ended: FrameSocket<PrimaryFrame, StandbyFrame> | undefined
    await standbyAt(port, '', -1, (frame, frames) => {
      if (frame.type === 'welcome') finish()
      if (frame.type === 'ping') pings++
      if (frame.type === 'snapshot-end') ended = frames
    })
    await waitUntil(() => primary.connected)
    // Copied, not acknowledged, no ping answered: 20 pings (about 500 ms at 25 ms, five times maxLagMs) and still there.
    await waitUntil(() => ended !== undefined && pings >= 20, () => primary.connected)
    // Acknowledged: silent from here on, it is dropped like any other.
    ended?.send({ type: 'ack', seq: 1 })
    await waitUntil(() => !primary.connected)
  })
})

/** A snapshot source of one entry whose copy goes on until `finish()`: the test writes while it is being copied. */
function heldSnapshot (): { source: SnapshotSource, finish: () => void } {
  let finish = (): void => {}
  const finished = new Promise<void>((resolve) => { finish = resolve })
  let calls = 0
  return {
    finish: () => finish(),
    source: {
      iterator: () => ({
        nextv: async () => {
          if (calls++ === 0) return [[Buffer.from('snapshot-key'), Buffer.from('snapshot-value')]]
          await finished
          return []
        },
        close: async () => {},
      }),
    },
  }
}

/**
 * A primary under `degrade` (backlog 1 MiB, catchUpBytes as given) with one write, whose snapshot (when a standby needs one)
 * is copied until `finish()`; `write` puts an entry of `bytes` into its database; its log lines, parsed.
 */
async function primaryWithHeldSnapshot (catchUpBytes: number, config: Partial<ReplicationConfig> = {}): Promise<{
  primary: ReplicationPrimary, journal: WriteJournal, port: number, write: (bytes: number) => void, finish: () => void, overflows: () => number,
  logged: () => Array<{ code?: string, msg: string }>
}> {
  const db = new EventEmitter()
  const journal = new WriteJournal(db as unknown as WriteEmitter, { ignorePrefix: META, maxBytes: CONFIG.backlogBytes, maxPinnedBytes: catchUpBytes, now: Date.now })
  closers.push(() => journal.close())
  const { source, finish } = heldSnapshot()
  const lines: string[] = []
  let overflows = 0
  const primary = await ReplicationPrimary.start({
    config: { ...CONFIG, onStandbyLost: 'degrade', catchUpBytes, ...config }, journal, root: source, ignorePrefix: META, gatewayId: 'g', epoch: 1,
    logger: pino({ level: 'info' }, { write: (line: string) => { lines.push(line) } }), now: Date.now,
    onInSync: () => {}, onCatchUpOverflow: () => { overflows++ },
  })
  closers.push(() => primary.close())
  let n = 0
  const write = (bytes: number): void => {
    db.emit('write', [{ type: 'put', encodedKey: Buffer.from(`k${n++}`), encodedValue: Buffer.alloc(bytes) }])
  }
  write(100)
  return {
    primary, journal, port: Number(primary.address.split(':').at(-1)), write, finish, overflows: () => overflows,
    logged: () => lines.map((l) => JSON.parse(l) as { code?: string, msg: string }),
  }
}

describe('a snapshot copied while the writes go on', () => {
  it('ends with every write made during the copy, though they are three backlogs: one snapshot is enough', async () => {
    const { primary, journal, port, write, finish, overflows, logged } = await primaryWithHeldSnapshot(16 * 1024 * 1024)
    const got: PrimaryFrame[] = []
    await standbyAt(port, '', -1, (frame, frames) => {
      got.push(frame)
      if (frame.type === 'welcome') {
        // The copy has begun (its point is the welcome's seq): three backlogs of writes while it goes on, then it ends.
        for (let i = 0; i < 48; i++) write(64 * 1024)
        finish()
      }
      if (frame.type === 'batch') frames.send({ type: 'ack', seq: frame.seq })
    })
    await waitUntil(() => got.some((f) => f.type === 'batch' && f.seq === 49), () => primary.connected || got.length === 0)
    const kinds = got.filter((f) => f.type !== 'ping').map((f) => f.type === 'batch' ? `batch ${f.seq}` : f.type === 'snapshot-end' ? `end ${f.seq}` : f.type)
    expect(kinds).toEqual(['welcome', 'snapshot', 'end 1', ...Array.from({ length: 48 }, (_, i) => `batch ${i + 2}`)])
    expect(primary.snapshotting).toBe(false)
    expect(overflows()).toBe(0)
    expect(logged().filter((l) => l.msg.includes('sending a snapshot'))).toHaveLength(1)
    // Acknowledged: the pin follows the acks, so the journal is back to its backlog.
    await waitUntil(() => primary.ackedSeq === 49)
    write(100)
    expect(journal.keptBytes).toBeLessThanOrEqual(CONFIG.backlogBytes)
  })

  it('drops the standby once the writes kept for it pass catchUpBytes, logged and counted, and keeps no more than that', async () => {
    const { primary, journal, port, write, overflows, logged } = await primaryWithHeldSnapshot(2 * 1024 * 1024)
    const got: PrimaryFrame[] = []
    await standbyAt(port, '', -1, (frame) => {
      got.push(frame)
      // Three backlogs while the copy goes on (it never ends here): over catchUpBytes (2 MiB).
      if (frame.type === 'welcome') for (let i = 0; i < 48; i++) write(64 * 1024)
    })
    await waitUntil(() => got.length > 0 && !primary.connected)
    expect(got.some((f) => f.type === 'snapshot-end')).toBe(false)
    expect(overflows()).toBe(1)
    expect(logged().filter((l) => l.code === 'GW_WARN_STANDBY_CATCH_UP_OVERFLOW')).toHaveLength(1)
    expect(journal.keptBytes).toBeLessThanOrEqual(2 * 1024 * 1024)
  })
})

describe('a standby catching up from the backlog', () => {
  it('is sent at most the send window unacknowledged; the rest waits in the journal and follows its acks', async () => {
    const { journal, port, write } = await primaryWithHeldSnapshot(64 * 1024 * 1024)
    let acks: FrameSocket<PrimaryFrame, StandbyFrame> | undefined
    const batches: Array<{ seq: number, bytes: number }> = []
    let pings = 0
    const welcomed = new Promise<void>((resolve) => {
      void standbyAt(port, journal.history, 1, (frame, frames) => {
        acks = frames
        if (frame.type === 'welcome') resolve()
        if (frame.type === 'ping') { pings++; frames.send({ type: 'pong' }) }
        if (frame.type === 'batch') batches.push({ seq: frame.seq, bytes: frame.ops.reduce((sum, op) => sum + op[1].length + (op[0] === 0 ? op[2].length : 0), 0) })
      })
    })
    await welcomed
    // 16 MiB written, twice the window, none acknowledged: the journal keeps them (pinned), the socket gets 8 MiB.
    for (let i = 0; i < 64; i++) write(256 * 1024)
    expect(journal.keptBytes).toBeGreaterThan(16 * 1024 * 1024)
    // A ping sent after the writes: every batch the primary sent before it has arrived by then.
    const pingsBefore = pings
    await waitUntil(() => pings > pingsBefore)
    const sent = batches.reduce((sum, b) => sum + b.bytes, 0)
    expect(sent).toBeGreaterThanOrEqual(8 * 1024 * 1024)
    expect(sent).toBeLessThan(8 * 1024 * 1024 + 256 * 1024 + 64)
    // Each ack lets more go, until the standby has them all, in order.
    for (let round = 0; round < 100 && batches.at(-1)?.seq !== 65; round++) {
      const last = batches.at(-1)?.seq ?? 1
      acks?.send({ type: 'ack', seq: last })
      await waitUntil(() => (batches.at(-1)?.seq ?? 1) > last)
    }
    expect(batches.map((b) => b.seq)).toEqual(Array.from({ length: 64 }, (_, i) => i + 2))
  })
})

/** Polls (bounded: 10 s) until `check` holds; throws at once if `still` stops holding (the primary dropped the standby). */
async function waitUntil (check: () => boolean, still: () => boolean = () => true): Promise<void> {
  const deadline = Date.now() + 10_000
  while (!check()) {
    if (!still()) throw new Error('the primary dropped the standby')
    if (Date.now() > deadline) throw new Error('timed out')
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

describe('a standby catching up from the backlog (continued)', () => {
  it('acknowledging past what it was sent: the primary goes on from the ack, resending nothing it has', async () => {
    const { journal, port, write } = await primaryWithHeldSnapshot(64 * 1024 * 1024)
    const batches: number[] = []
    await standbyAt(port, journal.history, 1, (frame, frames) => {
      // Welcomed (pinned from 1): 16 MiB written, 64 writes of 256 KiB.
      if (frame.type === 'welcome') for (let i = 0; i < 64; i++) write(256 * 1024)
      if (frame.type !== 'batch') return
      batches.push(frame.seq)
      // At the first batch: it says it has up to 60 already (it applied them after its hello went out).
      if (batches.length === 1) frames.send({ type: 'ack', seq: 60 })
    })
    await waitUntil(() => batches.includes(65))
    const window = 8 * 1024 * 1024 / (256 * 1024)
    // The first window (2 … 33) went before the ack; after it, 61 … 65 only: nothing it has, nothing past the window.
    const afterWindow = batches.filter((seq) => seq > window + 1)
    expect(afterWindow).toEqual([61, 62, 63, 64, 65])
  })

  it('releases the pin of a standby that disconnects, and of one replaced by another', async () => {
    for (const how of ['disconnects', 'is replaced'] as const) {
      const { primary, journal, port, write } = await primaryWithHeldSnapshot(64 * 1024 * 1024)
      const socket = net.connect(port, '127.0.0.1')
      closers.push(() => { socket.destroy() })
      await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject))
      const frames = new FrameSocket<PrimaryFrame, StandbyFrame>(socket, () => {}, () => {})
      frames.send({ type: 'hello', version: PROTOCOL_VERSION, gatewayId: 'g', history: journal.history, seq: 1, epoch: 1 })
      await waitUntil(() => primary.connected)
      // Four backlogs written, none acknowledged: kept for it.
      for (let i = 0; i < 16; i++) write(256 * 1024)
      expect(journal.keptBytes).toBeGreaterThan(4 * CONFIG.backlogBytes)
      if (how === 'disconnects') {
        socket.destroy()
        await waitUntil(() => !primary.connected)
      } else {
        const replacedAt = journal.lastSeq
        await new Promise<void>((resolve) => {
          void standbyAt(port, journal.history, replacedAt, (frame) => { if (frame.type === 'welcome') resolve() })
        })
      }
      write(100)
      expect(journal.keptBytes, how).toBeLessThanOrEqual(CONFIG.backlogBytes)
    }
  })
})

describe('a snapshot of a LevelDB database', () => {
  it('goes out in frames of about 1 MiB, and its time is logged once the standby acknowledges its point', { timeout: 30_000 }, async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'edgemq-snapshot-frames-'))
    const root = new ClassicLevel<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    closers.push(async () => { await root.close(); await rm(dir, { recursive: true, force: true }) })
    // 4 MiB in 4,096 entries of 1 KiB.
    for (let b = 0; b < 4; b++) {
      await root.batch(Array.from({ length: 1024 }, (_, i) => ({ type: 'put' as const, key: Buffer.from(`k${b}-${String(i).padStart(4, '0')}`), value: Buffer.alloc(1024, i) })))
    }
    const db = new EventEmitter()
    const journal = new WriteJournal(db as unknown as WriteEmitter, { ignorePrefix: META, maxBytes: CONFIG.backlogBytes, now: Date.now })
    closers.push(() => journal.close())
    const lines: string[] = []
    const primary = await ReplicationPrimary.start({
      config: CONFIG, journal, root: root as unknown as SnapshotSource, ignorePrefix: META, gatewayId: 'g', epoch: 1,
      logger: pino({ level: 'info' }, { write: (line: string) => { lines.push(line) } }), now: Date.now, onInSync: () => {},
    })
    closers.push(() => primary.close())
    db.emit('write', [{ type: 'put', encodedKey: Buffer.from('k'), encodedValue: Buffer.from('v') }])
    const frames: number[] = []
    let entries = 0
    let end: number | undefined
    await standbyAt(Number(primary.address.split(':').at(-1)), '', -1, (frame, socket) => {
      if (frame.type === 'snapshot') {
        frames.push(frame.entries.reduce((sum, [k, v]) => sum + k.length + v.length, 0))
        entries += frame.entries.length
      }
      if (frame.type === 'snapshot-end') {
        end = frame.seq
        socket.send({ type: 'ack', seq: frame.seq })
      }
    })
    await waitUntil(() => lines.some((l) => l.includes('the standby applied its snapshot')))
    expect(end).toBe(1)
    expect(entries).toBe(4096)
    // 4 MiB and some keys: four full frames and a small one; 16 KiB reads made about 260.
    expect(frames.length).toBeLessThanOrEqual(8)
    expect(Math.max(...frames)).toBeGreaterThan(1000 * 1024)
    const applied = lines.map((l) => JSON.parse(l) as { msg: string, seq?: number, seconds?: number }).find((l) => l.msg === 'the standby applied its snapshot')
    expect(applied).toMatchObject({ seq: 1, seconds: expect.any(Number) as unknown })
  })
})
