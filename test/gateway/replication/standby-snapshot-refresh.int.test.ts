/**
 * A standby past a snapshot has its store re-read first: its reads serve the
 * new copy (whose log may end before the old one did: a former primary's
 * tail) by the time it acknowledges the snapshot and counts as in sync.
 * Against a primary speaking the protocol by hand over a real socket, with a
 * store refresh the test holds.
 */
import net from 'node:net'
import { pino } from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import { FrameSocket, type PrimaryFrame, type StandbyFrame } from '../../../gateway/replication/protocol.ts'
import { ReplicationStandby, type FollowerDatabase } from '../../../gateway/replication/standby.ts'

const closers: Array<() => Promise<void> | void> = []
afterEach(async () => { for (const c of closers.splice(0).reverse()) await c() })

type Frames = FrameSocket<StandbyFrame, PrimaryFrame>

/** A primary that runs `script` once the standby's hello came; records the acks and pongs. */
async function handMadePrimary (script: (frames: Frames) => void): Promise<{ port: number, acks: number[], pongs: () => number }> {
  const acks: number[] = []
  let pongs = 0
  const sockets: net.Socket[] = []
  const server = net.createServer((socket) => {
    sockets.push(socket)
    const frames: Frames = new FrameSocket(socket, (frame) => {
      if (frame.type === 'hello') script(frames)
      if (frame.type === 'ack') acks.push(frame.seq)
      if (frame.type === 'pong') pongs++
    }, () => {})
    socket.on('error', () => {})
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  closers.push(() => new Promise<void>((resolve) => { for (const s of sockets) s.destroy(); server.close(() => resolve()) }))
  return { port: (server.address() as net.AddressInfo).port, acks, pongs: () => pongs }
}

async function waitUntil (what: string, check: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 10))
  if (!check()) throw new Error(`timed out waiting for ${what}`)
}

describe('a standby at the end of a snapshot', () => {
  it('re-reads its store before it acknowledges the snapshot and counts as past it', async () => {
    let frames: Frames | undefined
    const { port, acks, pongs } = await handMadePrimary((f) => {
      frames = f
      f.send({ type: 'welcome', history: 'h2', epoch: 2, snapshot: true, seq: 10 })
      f.send({ type: 'snapshot', entries: [[Buffer.from('k'), Buffer.from('v')]] })
      f.send({ type: 'snapshot-end', seq: 10 })
    })
    let refreshStarted = (): void => {}
    const started = new Promise<void>((resolve) => { refreshStarted = resolve })
    let releaseRefresh = (): void => {}
    const held = new Promise<void>((resolve) => { releaseRefresh = resolve })
    const db: FollowerDatabase = { batch: async () => {}, startCopy: async () => {}, finishCopyOps: [] }
    const standby = new ReplicationStandby({
      peer: { host: '127.0.0.1', port }, gatewayId: 'g', db, positionKey: Buffer.from('!replication!position'), sync: false,
      initial: null, logger: pino({ level: 'silent' }), now: Date.now, silenceMs: 5000,
      refresh: async () => { refreshStarted(); await held },
    })
    closers.push(() => { releaseRefresh(); return standby.close() })
    standby.start()
    await started
    // A ping answered: an ack sent before the refresh began would have reached the primary before the pong.
    frames?.send({ type: 'ping', seq: 10, at: Date.now() })
    await waitUntil('the pong', () => pongs() === 1)
    expect(acks).toEqual([])
    expect(standby.snapshotting).toBe(true)
    releaseRefresh()
    await waitUntil('the ack of the snapshot', () => acks.includes(10))
    expect(standby.snapshotting).toBe(false)
    expect(standby.position).toEqual({ history: 'h2', seq: 10, epoch: 2 })
  })
})
