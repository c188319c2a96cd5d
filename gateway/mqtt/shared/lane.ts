/**
 * One partition of a shared subscription's log part, and the members it is
 * given to. A lane is owned by at most one member at a time, so a device's
 * records (one partition) reach the group in offset order.
 *
 * Invariants of a lane:
 * - `next` is the next offset to send; every offset below it was sent to a
 *   member, or skipped (its topic does not match the filter, it expired, or
 *   no connected member may read it); records from `next` on may be read
 *   ahead (`ahead`);
 * - a record the owner may not read (its read ACL) goes to another member
 *   that may; the lane's unacknowledged records are all held by one member
 *   (`holder`) at a time, so a record goes to a member other than the
 *   holder only once the holder acknowledged the older ones (the device's
 *   order holds across the detour, as across a handover);
 * - `window` holds the records sent and not yet acknowledged, in offset
 *   order (acknowledged ones are dropped from its front), so `done` — the
 *   oldest unacknowledged offset, else `next` — has everything below it
 *   acknowledged or skipped: that is what the group commits;
 * - when the owner (or a member holding a detour) leaves, the lane's
 *   unacknowledged records are forgotten and `next` goes back to `done`: the
 *   next owner (the owner) gets them again; a late PUBACK of a forgotten
 *   record changes nothing;
 * - a lane moved to another member by a rebalance first waits until the old
 *   owner acknowledged what it holds (`handoverTo`), so the new owner never
 *   gets a record before an older one of the same partition is acknowledged.
 */
import type { Client } from 'aedes'
import type { StoredRecord } from '../../../store/index.ts'
import type { Identity } from '../../access/auth.ts'
import type { ReplayConnection } from '../replay.ts'

/** A record sent and awaiting its PUBACK. */
export interface Sent {
  readonly offset: number
  acked: boolean
}

/** One client in one share. */
export class Member {
  /** Packet id → the lane and record it carries, for QoS 1 records sent and not acknowledged. */
  readonly inflight = new Map<number, { readonly lane: Lane, readonly sent: Sent }>()
  left = false
  /** Record topic → whether this member may read it (its ACL), worked out once per topic. */
  readonly #readable = new Map<string, boolean>()

  /**
   * `subscriptionId`: the Subscription Identifier of the member's SUBSCRIBE, sent back with each record to an MQTT 5
   * member [MQTT-3.3.4-3]; a SUBSCRIBE again changes it, as it does the QoS.
   */
  constructor (readonly client: Client, readonly conn: ReplayConnection, readonly who: Identity, public qos: 0 | 1,
    public subscriptionId: number | undefined) {
    // Its ids in flight are skipped by every other taker of the client's counter (aedes, cursors, replays, other shares).
    conn.holdIds?.(this, (id) => this.inflight.has(id))
  }

  get gone (): boolean {
    return this.left || this.conn.closed || this.conn.stream.destroyed === true
  }

  /** Whether the member may read `topic`, by `check` the first time (a member walking many topics recomputes). */
  mayRead (topic: string, check: (topic: string) => boolean): boolean {
    let ok = this.#readable.get(topic)
    if (ok === undefined) {
      if (this.#readable.size >= 4096) this.#readable.clear()
      this.#readable.set(topic, ok = check(topic))
    }
    return ok
  }
}

export class Lane {
  owner: Member | null = null
  /** The member a rebalance gives this lane once the owner has acknowledged what it holds. */
  handoverTo: Member | null = null
  /** The member holding the lane's unacknowledged records (the owner, or the member a record the owner may not read went to); while `unacked` > 0. */
  holder: Member | null = null
  next: number
  committed: number
  /** Bumped whenever `next` moves back or the owner changes: a read that started before is discarded. */
  epoch = 0
  /** A pump is running / was asked for while one ran. */
  running = false
  again = false
  /**
   * Records read from `next` on and not yet sent or skipped (from `aheadPos`), and the offset after them: a
   * store read decodes whole batches, so a lane reads a chunk and sends it as the owner's window allows.
   */
  ahead: StoredRecord[] = []
  aheadPos = 0
  aheadEnd = 0
  #window: Sent[] = []
  #head = 0
  #unacked = 0

  constructor (readonly stream: string, readonly partition: number, committed: number) {
    this.next = committed
    this.committed = committed
  }

  get unacked (): number { return this.#unacked }

  /** Every offset below it is acknowledged or skipped. */
  get done (): number {
    const first = this.#window[this.#head]
    return first === undefined ? this.next : first.offset
  }

  sent (offset: number, acked: boolean, to: Member): Sent {
    const s: Sent = { offset, acked }
    if (!acked) {
      this.#window.push(s)
      this.#unacked++
      this.holder = to
    }
    return s
  }

  ack (s: Sent): void {
    if (s.acked) return
    s.acked = true
    this.#unacked--
    while (this.#window[this.#head]?.acked === true) this.#head++
    if (this.#head === this.#window.length) {
      this.#window = []
      this.#head = 0
    } else if (this.#head > 1024 && this.#head * 2 > this.#window.length) {
      this.#window = this.#window.slice(this.#head)
      this.#head = 0
    }
  }

  /** The owner left: forget what was held unacknowledged, and read it again from `done` for the next owner. */
  release (): void {
    this.rewind()
    this.owner = null
  }

  /** The holder left: forget what it held unacknowledged (its late PUBACKs change nothing), and read it again from `done`. */
  rewind (): void {
    this.next = this.done
    for (let i = this.#head; i < this.#window.length; i++) (this.#window[i] as Sent).acked = true
    this.ahead = []
    this.aheadPos = 0
    this.#window = []
    this.#head = 0
    this.#unacked = 0
    this.holder = null
    this.epoch++
  }

  assign (member: Member): void {
    this.owner = member
    this.handoverTo = null
    this.epoch++
  }
}
