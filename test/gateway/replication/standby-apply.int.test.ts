/**
 * The standby's apply chain across a reconnect, against a primary speaking
 * the protocol by hand over a real socket and a database whose first write
 * the test holds (a slow disk): batches from the lost connection are still
 * queued when the next connection is welcomed. Whatever it applies, the
 * standby acknowledges on the connection it has now (an ack sent on the
 * dead one would leave a commit held under `block` for good), and batches
 * that follow a snapshot are applied (they were left waiting behind the
 * lost connection's batches, never scheduled).
 *
 * And a snapshot faster than the disk: the standby stops reading once
 * its bound of received-but-unwritten bytes is reached (the primary's
 * socket fills), does not take the paused link for a silent one, reads on
 * as the writes catch up, and writes every snapshot batch with sync.
 */
import net from 'node:net'
import { pino } from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import { FrameSocket, type PrimaryFrame, type StandbyFrame } from '../../../gateway/replication/protocol.ts'
import { ReplicationStandby, type FollowerDatabase } from '../../../gateway/replication/standby.ts'

const closers: Array<() => Promise<void> | void> = []
afterEach(async () => { for (const c of closers.splice(0).reverse()) await c() })

type Script = (frames: FrameSocket<StandbyFrame, PrimaryFrame>, acks: number[]) => void

/** A primary that runs `scripts[i]` on its i-th connection once the standby's hello came; records each connection's acks and pongs. */
async function handMadePrimary (scripts: Script[]): Promise<{ port: number, acks: number[][], pongs: number[] }> {
  const acks: number[][] = []
  const pongs: number[] = []
  const sockets: net.Socket[] = []
  const server = net.createServer((socket) => {
    sockets.push(socket)
    const n = acks.length
    acks.push([])
    pongs.push(0)
    const frames: FrameSocket<StandbyFrame, PrimaryFrame> = new FrameSocket(socket, (frame) => {
      if (frame.type === 'hello') scripts[n]?.(frames, acks[n] as number[])
      if (frame.type === 'ack') acks[n]?.push(frame.seq)
      if (frame.type === 'pong') pongs[n] = (pongs[n] ?? 0) + 1
    }, () => {})
    socket.on('error', () => {})
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  closers.push(() => new Promise<void>((resolve) => { for (const s of sockets) s.destroy(); server.close(() => resolve()) }))
  return { port: (server.address() as net.AddressInfo).port, acks, pongs }
}

/** A database whose first batch waits for `release()`; the rest are written at once. */
function slowFirstWrite (): { db: FollowerDatabase, release: () => void, firstWrite: Promise<void> } {
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  let started = (): void => {}
  const firstWrite = new Promise<void>((resolve) => { started = resolve })
  let writes = 0
  const db: FollowerDatabase = {
    batch: async () => {
      if (writes++ === 0) { started(); await held }
    },
    startCopy: async () => {},
    finishCopyOps: [],
  }
  return { db, release, firstWrite }
}

function standbyOf (port: number, db: FollowerDatabase, options: { silenceMs?: number, maxUnappliedBytes?: number } = {}): ReplicationStandby {
  const standby = new ReplicationStandby({
    peer: { host: '127.0.0.1', port }, gatewayId: 'g', db, positionKey: Buffer.from('!replication!position'), sync: false,
    initial: { history: 'h1', seq: 0, epoch: 1 }, logger: pino({ level: 'silent' }), now: Date.now, refresh: async () => {}, silenceMs: 5000, ...options,
  })
  closers.push(() => standby.close())
  return standby
}

const batch = (seq: number): PrimaryFrame => ({ type: 'batch', seq, at: Date.now(), ops: [[0, Buffer.from(`k${seq}`), Buffer.from(`v${seq}`)]] })
const ping: PrimaryFrame = { type: 'ping', seq: 0, at: 0 }

async function waitUntil (what: string, check: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 10))
  if (!check()) throw new Error(`timed out waiting for ${what}`)
}

type Frames = FrameSocket<StandbyFrame, PrimaryFrame>

/**
 * The standby's first connection welcomes it at h1 and sends batch 1, whose write is held; batch 2 then waits in the
 * queue behind it when the connection is closed and `second` (the next connection) runs. The write is released once
 * the second connection's frames (ending with a ping) were heard; resolves once `seq` is acknowledged on it.
 */
async function reconnectWhileQueued (second: (frames: Frames) => void, seq: number): Promise<{ standby: ReplicationStandby, acks: number[][] }> {
  const { db, release, firstWrite } = slowFirstWrite()
  let first: Frames | undefined
  const { port, acks, pongs } = await handMadePrimary([
    (frames) => {
      first = frames
      frames.send({ type: 'welcome', history: 'h1', epoch: 1, snapshot: false, seq: 0 })
      frames.send(batch(1))
    },
    second,
  ])
  const standby = standbyOf(port, db)
  standby.start()
  await firstWrite
  first?.send(batch(2))
  // A ping answered: every frame sent before it was heard (the standby handles frames in order).
  first?.send(ping)
  await waitUntil('the first connection\'s frames heard', () => pongs[0] === 1)
  first?.close()
  await waitUntil('the second connection\'s frames heard', () => pongs[1] === 1)
  release()
  await waitUntil(`the ack of ${seq} on the second connection`, () => acks[1]?.includes(seq) === true)
  return { standby, acks }
}

describe('the standby across a reconnect, its first connection\'s batches still queued', () => {
  it('acknowledges on the connection it has now, from the backlog', async () => {
    const { standby } = await reconnectWhileQueued((frames) => {
      // The standby's hello said 0 (batch 1 is still being written): the backlog from 1 again, and one more.
      frames.send({ type: 'welcome', history: 'h1', epoch: 1, snapshot: false, seq: 0 })
      for (const seq of [1, 2, 3]) frames.send(batch(seq))
      frames.send(ping)
    }, 3)
    expect(standby.position).toEqual({ history: 'h1', seq: 3, epoch: 1 })
  })

  it('applies the batches that follow a snapshot', async () => {
    const { standby, acks } = await reconnectWhileQueued((frames) => {
      // Another history (the primary restarted): a snapshot at 10, then batch 11.
      frames.send({ type: 'welcome', history: 'h2', epoch: 1, snapshot: true, seq: 10 })
      frames.send({ type: 'snapshot', entries: [[Buffer.from('k'), Buffer.from('v')]] })
      frames.send({ type: 'snapshot-end', seq: 10 })
      frames.send(batch(11))
      frames.send(ping)
    }, 11)
    expect(acks[1]).toEqual([10, 11])
    expect(standby.position).toEqual({ history: 'h2', seq: 11, epoch: 1 })
  })
})

describe('a snapshot that arrives faster than the standby\'s disk writes it', () => {
  it('stops reading past its bound of unwritten bytes, without taking the pause for silence, and writes every batch with sync', { timeout: 30_000 }, async () => {
    const MIB = 1024 * 1024
    const FRAMES = 64
    let release = (): void => {}
    const held = new Promise<void>((resolve) => { release = resolve })
    const writes: Array<{ ops: number, sync: boolean }> = []
    const db: FollowerDatabase = {
      batch: async (ops, options) => {
        writes.push({ ops: ops.length, sync: options.sync })
        await held
      },
      startCopy: async () => {},
      finishCopyOps: [],
    }
    let primarySocket: net.Socket | undefined
    const { port, acks } = await handMadePrimary([(frames) => {
      primarySocket = frames.socket
      frames.send({ type: 'welcome', history: 'h2', epoch: 1, snapshot: true, seq: 10 })
      // 64 MiB in frames of 1 MiB (16 entries of 64 KiB), far more than the bound (4 MiB) and the sockets' buffers.
      for (let f = 0; f < FRAMES; f++) {
        frames.send({ type: 'snapshot', entries: Array.from({ length: 16 }, (_, i) => [Buffer.from(`k${f}-${i}`), Buffer.alloc(64 * 1024, f)] as const) })
      }
      frames.send({ type: 'snapshot-end', seq: 10 })
    }])
    // The shortest silence limit (one check a second): a pause taken for silence would reconnect within the disk's hold.
    const standby = standbyOf(port, db, { silenceMs: 1000, maxUnappliedBytes: 4 * MIB })
    standby.start()
    await waitUntil('the standby to stop reading', () => standby.paused)
    expect(standby.unappliedBytes).toBeLessThanOrEqual(4 * MIB + MIB + 64)
    // What it does not read waits in the primary's socket (TCP's window is shut), not in the standby's memory.
    expect(primarySocket?.writableLength).toBeGreaterThan(0)
    // The disk holds its first write for three of the standby's silence checks (waited for as checks, not as time).
    const checks = standby.silenceChecks
    await waitUntil('three silence checks while paused', () => standby.silenceChecks >= checks + 3)
    expect(standby.paused).toBe(true)
    release()
    await waitUntil('the snapshot acknowledged', () => acks[0]?.includes(10) === true)
    expect(acks).toHaveLength(1)
    expect(standby.position).toEqual({ history: 'h2', seq: 10, epoch: 1 })
    expect(standby.unappliedBytes).toBe(0)
    expect(writes.reduce((sum, w) => sum + w.ops, 0)).toBe(FRAMES * 16 + 1)
    expect(writes.every((w) => w.sync)).toBe(true)
  })
})
