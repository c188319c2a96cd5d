/**
 * The replication protocol between a primary and its standby: CBOR values
 * back to back on one TCP connection (cbor-x's streams do the framing, as a
 * CBOR item is self-delimiting). Keys and values travel as the bytes LevelDB
 * holds, never re-encoded.
 *
 * standby → primary: `hello` (what it has applied: the primary's history id
 * and sequence number), then one `ack` per durable apply (the highest
 * sequence number now on its disk), and a `pong` for every `ping`.
 * primary → standby: `welcome` (catch up from the backlog, or a snapshot
 * follows), `snapshot` chunks and `snapshot-end`, then `batch` after `batch`
 * in commit order, and a `ping` at least each second carrying the primary's
 * newest sequence number; or `refused`. Pings and pongs are how each side
 * tells a link that went silent (a black hole: no reset, no data) from an
 * idle one; TCP alone tells it after minutes.
 * A node starting as primary first sends `who` to its peer; a primary
 * answers `is` with its epoch (a newer one means it was promoted).
 */
import type { Socket } from 'node:net'
import { DecoderStream, Encoder } from 'cbor-x'
import { drained } from '../drained.ts'

/** 2: the standby answers pings (a version 1 standby would not, and would be dropped as silent: refused instead). */
export const PROTOCOL_VERSION = 2

/** One operation of a LevelDB batch on the root database: [0, key, value] puts, [1, key] deletes. */
export type RawOp = readonly [0, Buffer, Buffer] | readonly [1, Buffer]

export interface Hello {
  readonly type: 'hello', readonly version: number, readonly gatewayId: string, readonly history: string, readonly seq: number, readonly epoch: number
}
export interface Welcome { readonly type: 'welcome', readonly history: string, readonly epoch: number, readonly snapshot: boolean, readonly seq: number }
export interface Refused { readonly type: 'refused', readonly message: string }
export interface SnapshotChunk { readonly type: 'snapshot', readonly entries: ReadonlyArray<readonly [Buffer, Buffer]> }
export interface SnapshotEnd { readonly type: 'snapshot-end', readonly seq: number }
export interface BatchFrame { readonly type: 'batch', readonly seq: number, readonly at: number, readonly ops: readonly RawOp[] }
export interface Ping { readonly type: 'ping', readonly seq: number, readonly at: number }
export interface Ack { readonly type: 'ack', readonly seq: number }
/** The standby's answer to a ping, sent as it arrives (not after the applies queued before it): the link is alive. */
export interface Pong { readonly type: 'pong' }
/** Asked by a node that starts as primary: is the peer a primary of a newer epoch (it was promoted meanwhile)? */
export interface Who { readonly type: 'who' }
export interface Is { readonly type: 'is', readonly role: 'primary', readonly epoch: number, readonly gatewayId: string }

export type PrimaryFrame = Welcome | Refused | SnapshotChunk | SnapshotEnd | BatchFrame | Ping | Is
export type StandbyFrame = Hello | Ack | Pong | Who

const CBOR_OPTIONS = { useRecords: false, mapsAsObjects: true } as const

/** cbor-x gives byte strings back as Uint8Array or Buffer; LevelDB wants Buffers. */
export function asBuffer (bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
}

/**
 * A socket that carries frames: `send` writes one, `onFrame` hears each. Frames are encoded as they are sent and
 * written straight to the socket, so `buffered` is every byte not yet taken by the kernel. (cbor-x's EncoderStream,
 * piped to the socket, queued frames behind the pipe's backpressure where neither its writableLength, which counts
 * frames, nor the socket saw them: a snapshot's waits for the socket to drain never waited, and tens of MiB of
 * frames sat in the primary's memory behind a stalled link.)
 */
export class FrameSocket<In, Out> {
  readonly socket: Socket
  readonly #encoder = new Encoder({ ...CBOR_OPTIONS, sequential: true })
  readonly #decoder: DecoderStream
  readonly #onError: (err: Error) => void

  constructor (socket: Socket, onFrame: (frame: In) => void, onError: (err: Error) => void) {
    this.socket = socket
    this.#onError = onError
    const decoder = this.#decoder = new DecoderStream(CBOR_OPTIONS)
    socket.pipe(decoder)
    decoder.on('data', (frame: In) => onFrame(frame))
    decoder.on('error', (err: Error) => { onError(err); socket.destroy() })
  }

  /** Called once every frame the peer sent before it ended the connection was heard. */
  onEnd (listener: () => void): void {
    this.#decoder.once('end', listener)
  }

  send (frame: Out): void {
    if (this.socket.destroyed || this.socket.writableEnded) return
    let bytes: Buffer
    try {
      bytes = this.#encoder.encode(frame)
    } catch (err) {
      this.#onError(err as Error)
      this.socket.destroy()
      return
    }
    this.socket.write(bytes)
  }

  /**
   * Stops handing frames to onFrame until resume(): the decoder's buffer fills, the pipe stops reading the socket, and
   * TCP's window tells the peer to wait. Frames decoded before the pause still wait in the decoder (its 16 objects).
   */
  pause (): void {
    this.#decoder.pause()
  }

  resume (): void {
    this.#decoder.resume()
  }

  /** Resolves once what was buffered is taken by the kernel ('drain'), or the connection closed. */
  drained (): Promise<void> {
    return drained(this.socket)
  }

  /** Bytes written and not yet taken by the kernel. */
  get buffered (): number {
    return this.socket.writableLength
  }

  /** Ends the connection once the frames sent so far are written. */
  end (): void {
    this.socket.end()
  }

  close (): void {
    this.socket.destroy()
  }
}
