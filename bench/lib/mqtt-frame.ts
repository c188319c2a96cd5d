/**
 * Where the next MQTT packet in a buffer starts its body and how long the
 * body is, from its fixed header; the load generator and the do-nothing
 * broker both walk their input with it.
 */

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
