/**
 * Waiting for a writable to take what was buffered: the MQTT deliveries that frame their own PUBLISHes
 * (mqtt/publish-frames.ts users) and the replication link (replication/protocol.ts) write until `write()` returns
 * false, then wait here.
 */
import type { Writable } from 'node:stream'

/** Resolves once the stream drained or closed (at once when it needs no drain, or is destroyed: no 'drain' would come). */
export function drained (stream: Pick<Writable, 'once' | 'off' | 'writableNeedDrain' | 'destroyed'>): Promise<void> {
  if (stream.destroyed || !stream.writableNeedDrain) return Promise.resolve()
  return new Promise((resolve) => {
    const done = (): void => {
      stream.off('drain', done)
      stream.off('close', done)
      resolve()
    }
    stream.once('drain', done)
    stream.once('close', done)
  })
}
