/**
 * The replication protocol's frame socket over a real TCP connection: what
 * it reports as buffered is every byte the kernel has not taken (the
 * primary waits on it while it copies a snapshot: before, frames queued
 * inside the encoder stream were not counted, so a snapshot behind a
 * stalled link never waited and sat in memory), and the frames arrive
 * whole and in order once the peer reads.
 */
import net, { type AddressInfo } from 'node:net'
import { afterEach, describe, expect, it } from 'vitest'
import { FrameSocket } from '../../../gateway/replication/protocol.ts'

type Frame = { readonly type: 'blob', readonly n: number, readonly bytes: Buffer }

const closers: Array<() => void> = []
afterEach(() => { for (const c of closers.splice(0)) c() })

describe('a frame socket', () => {
  it('counts the bytes of the frames its peer has not read yet as buffered; they arrive whole and in order', async () => {
    const received: Frame[] = []
    const server = net.createServer()
    const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve))
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    closers.push(() => server.close())
    const client = net.connect((server.address() as AddressInfo).port, '127.0.0.1')
    closers.push(() => client.destroy())
    await new Promise<void>((resolve) => client.once('connect', resolve))
    const peer = await accepted
    closers.push(() => peer.destroy())
    const reader = new FrameSocket<Frame, never>(peer, (frame) => { received.push(frame) }, () => {})
    // The peer does not read yet (after the frame socket's pipe set it flowing).
    peer.pause()
    const frames = new FrameSocket<never, Frame>(client, () => {}, (err) => { throw err })

    const MIB = 1024 * 1024
    for (let n = 0; n < 64; n++) frames.send({ type: 'blob', n, bytes: Buffer.alloc(MIB, n) })
    // 64 MiB sent at once: the kernel takes a few of them, the rest is counted here.
    expect(frames.buffered).toBeGreaterThan(32 * MIB)

    peer.resume()
    const deadline = Date.now() + 30_000
    while (received.length < 64 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10))
    expect(received.map((f) => f.n)).toEqual(Array.from({ length: 64 }, (_, n) => n))
    expect(received.every((f) => f.bytes.length === MIB && f.bytes[0] === f.n && f.bytes[MIB - 1] === f.n)).toBe(true)
    expect(frames.buffered).toBe(0)
    reader.close()
  })
})
