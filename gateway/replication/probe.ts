/**
 * Asks the peer, before this node starts as primary, whether the peer is a
 * primary of a newer epoch: then it was promoted while this node was away,
 * and this node must follow it instead of taking writes (two primaries in
 * one site would fork the log). An unreachable peer answers nothing; the node
 * then starts as configured (without a lease service, it cannot know more).
 */
import net from 'node:net'
import type { HostPort } from './config-schema.ts'
import { FrameSocket, type Is, type PrimaryFrame, type StandbyFrame } from './protocol.ts'

export async function probePeer (peer: HostPort, timeoutMs: number): Promise<Is | null> {
  return await new Promise((resolve) => {
    const socket = net.connect(peer.port, peer.host)
    let answer: Is | null = null
    const done = (): void => { clearTimeout(timer); socket.destroy(); resolve(answer) }
    const timer = setTimeout(done, timeoutMs)
    const frames = new FrameSocket<PrimaryFrame, StandbyFrame>(socket, (frame) => {
      if (frame.type === 'is') { answer = frame; done() }
    }, () => {})
    socket.on('connect', () => { frames.send({ type: 'who' }) })
    // The answer is decoded after the socket has closed: the end of the decoded frames tells, or an error.
    frames.onEnd(done)
    socket.on('error', done)
  })
}
