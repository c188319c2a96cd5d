/**
 * The raw MQTT the bench's own clients and its do-nothing broker speak: where
 * the next packet in a buffer starts its body and how long the body is (from
 * its fixed header), and a clean DISCONNECT.
 */

import type { Socket } from 'node:net'

export interface Frame {
  /** Index of the first body byte (after the remaining-length bytes). */
  readonly body: number
  readonly length: number
}

/** The packet at `i`, or null when its fixed header or body is not all in `buf` yet. */
export function frameAt (buf: Buffer, i: number): Frame | null {
  // Remaining length: up to four 7-bit groups [MQTT-2.2.3].
  let length = 0
  let multiplier = 1
  let j = i + 1
  while (j < buf.length && j <= i + 4) {
    const byte = buf[j++] as number
    length += (byte & 0x7f) * multiplier
    multiplier *= 128
    if ((byte & 0x80) === 0) return j + length > buf.length ? null : { body: j, length }
  }
  return null
}

export const DISCONNECT = Buffer.from([0xe0, 0x00])

/** Sends DISCONNECT and ends the socket; destroys it if it has not closed a second later. */
export async function disconnectSocket (socket: Socket): Promise<void> {
  if (socket.destroyed) return
  await new Promise<void>((resolve) => {
    socket.once('close', () => resolve())
    socket.end(DISCONNECT)
    setTimeout(() => socket.destroy(), 1000).unref()
  })
}
