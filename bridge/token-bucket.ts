/**
 * An upstream's rate limit (`maxMessagesPerSecond`, `maxBytesPerSecond`): a
 * token bucket of one second's worth, so bursts up to one second's worth go at
 * once, as Mosquitto's and EMQX's rate limits allow. The first take finds the
 * bucket full. A message larger than a second's worth of bytes still goes,
 * once the bucket holds its size.
 *
 * Pure: time comes in with each call; the caller sets the timer.
 */

export class TokenBucket {
  readonly #messagesPerSecond: number
  readonly #bytesPerSecond: number
  #messages = 0
  #bytes = 0
  #at: number | null = null

  /** 0 for a limit means none. */
  constructor (messagesPerSecond: number, bytesPerSecond: number) {
    this.#messagesPerSecond = messagesPerSecond
    this.#bytesPerSecond = bytesPerSecond
  }

  /** Whether there is any limit at all (callers skip the bucket, and the clock, when there is none). */
  get limited (): boolean {
    return this.#messagesPerSecond > 0 || this.#bytesPerSecond > 0
  }

  /** Takes one message of `bytes` at time `now` (ms): 0 when taken, else the ms until it can be (nothing taken). */
  take (bytes: number, now: number): number {
    const mps = this.#messagesPerSecond
    const bps = this.#bytesPerSecond
    const elapsed = this.#at === null ? 1 : (now - this.#at) / 1000
    this.#at = now
    if (mps > 0) this.#messages = Math.min(mps, this.#messages + elapsed * mps)
    if (bps > 0) this.#bytes = Math.min(Math.max(bps, bytes), this.#bytes + elapsed * bps)
    const short = Math.max(mps > 0 ? (1 - this.#messages) / mps : 0, bps > 0 ? (bytes - this.#bytes) / bps : 0)
    if (short <= 0) {
      if (mps > 0) this.#messages -= 1
      if (bps > 0) this.#bytes -= bytes
      return 0
    }
    return Math.ceil(short * 1000)
  }
}
