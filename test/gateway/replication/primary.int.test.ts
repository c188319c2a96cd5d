/**
 * The primary's commit gate against a standby speaking the protocol by hand
 * over a real socket: under `onStandbyLost: block` a held commit is
 * released by the standby's ack, or by its hello when it comes back
 * already holding the commit (it fsync'd the write and died before its ack
 * arrived). Before the fix, that second case held the commit, and with it
 * the writer and every PUBACK, for good. A write outside the group commit
 * (an HTTP offset commit) is held the same way. A standby that answers no
 * ping for maxLagMs is dropped; one that answers is kept.
 */
import { EventEmitter } from 'node:events'
import net from 'node:net'
import { pino } from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import type { ReplicationConfig } from '../../../gateway/replication/config-schema.ts'
import { WriteJournal, type WriteEmitter } from '../../../gateway/replication/journal.ts'
import { ReplicationPrimary, type SnapshotSource } from '../../../gateway/replication/primary.ts'
import { FrameSocket, PROTOCOL_VERSION, type PrimaryFrame, type StandbyFrame } from '../../../gateway/replication/protocol.ts'

const META = Buffer.from('!replication!')
const CONFIG: ReplicationConfig = {
  role: 'primary', listen: '127.0.0.1:0', peer: '', acks: 'replicated', maxLagMs: 60_000, onStandbyLost: 'block', backlogBytes: 1024 * 1024, coordination: {},
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
})
