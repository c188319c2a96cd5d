/**
 * Which message an MQTT 3.1.1 upstream refuses, read from the only signal it
 * gives: it closes the connection (3.1.1 has no negative PUBACK). A link that
 * flaps gives the same signal, so a disconnect counts against a message only
 * when nothing but that message explains it:
 *
 * 1. the connection had carried a PUBLISH round trip (a PUBACK arrived on it)
 *    before the message was sent: the link itself works;
 * 2. the message was sent alone (nothing else in flight), no PUBACK arrived
 *    after it, and the connection closed within `withinMs` of the send: the
 *    upstream hung up on that message;
 * 3. strikes add up only over consecutive disconnects: a disconnect that does
 *    not point at the message (one before any PUBACK, one with several
 *    messages in flight, one on an idle link) starts the count again, and a
 *    PUBACK for the message forgets it.
 *
 * So a link that drops at the first PUBLISH of every connection never strikes
 * anything. MQTT 5 upstreams refuse with PUBACK reason codes; the uplink does
 * not feed this detector for them. Pure: time comes in with each event.
 */

export interface Strike {
  /** The message's dedupe id. */
  readonly id: string
  /** Consecutive disconnects that pointed at it. */
  readonly strikes: number
}

export class DisconnectRefusals {
  readonly #withinMs: number
  readonly #inflight = new Set<string>()
  /** A PUBACK arrived on the current connection. */
  #healthy = false
  /** The message sent alone on a healthy connection, with no PUBACK since. */
  #alone: { readonly id: string, readonly at: number } | null = null
  #suspect: Strike | null = null

  constructor (withinMs: number) {
    this.#withinMs = withinMs
  }

  /** Whether the current connection has carried a PUBLISH round trip yet. */
  get healthy (): boolean { return this.#healthy }

  /** A new connection is up. */
  connected (): void {
    this.#inflight.clear()
    this.#healthy = false
    this.#alone = null
  }

  sent (id: string, now: number): void {
    this.#alone = this.#healthy && this.#inflight.size === 0 ? { id, at: now } : null
    this.#inflight.add(id)
  }

  acked (id: string): void {
    this.#inflight.delete(id)
    this.#healthy = true
    this.#alone = null
    if (this.#suspect?.id === id) this.#suspect = null
  }

  /** The connection closed: returns the message it points at with its strikes so far, or null. */
  disconnected (now: number): Strike | null {
    const alone = this.#alone
    const pointed = alone !== null && this.#inflight.size === 1 && this.#inflight.has(alone.id) && now - alone.at <= this.#withinMs
    this.connected()
    if (!pointed) {
      this.#suspect = null
      return null
    }
    this.#suspect = { id: alone.id, strikes: this.#suspect?.id === alone.id ? this.#suspect.strikes + 1 : 1 }
    return this.#suspect
  }

  /** Whether some message has strikes (lets the caller skip building ids on the hot path). */
  get suspecting (): boolean { return this.#suspect !== null }

  /** Consecutive disconnects that pointed at message `id` (0 for any other). */
  strikes (id: string): number {
    return this.#suspect?.id === id ? this.#suspect.strikes : 0
  }

  /** The message was dead-lettered: start afresh. */
  forget (id: string): void {
    if (this.#suspect?.id === id) this.#suspect = null
  }
}
