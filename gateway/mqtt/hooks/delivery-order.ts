/**
 * Per client, the order in which its publishes go to aedes' delivery once
 * they are in the log. The appends complete in the order the client sent
 * them (the log's group commit); what follows an append can overtake:
 * - a publish acknowledged first and delivered without the publisher waiting
 *   (hooks/authorize-publish.ts) goes at once, unless it waits for a cursor
 *   write (the first message of a partition for a persistent session);
 * - a publish delivered before its ack (a copy queued for a session, a
 *   retained message, a will, or too many deliveries under way) takes longer
 *   to reach its subscribers than one that was acknowledged first.
 * So a publish starts only after every earlier one of its client started,
 * and one acknowledged first also only after every earlier one delivered
 * before its ack has finished: a device's messages reach a subscriber in the
 * order it sent them (MQTT 3.1.1 4.6, ordered topics). Publishes delivered
 * before their ack do not wait for one another (they did not before).
 * (Stock aedes also dropped a live copy numbered below one the subscriber
 * already got, so an overtaken message was lost, not only late; the aedes
 * patch drops only a repeat of the packet just offered, which also keeps
 * another client's publish overtaking a retained one from losing it.)
 * Not covered here: a publish on a topic the log does not hold (no append to
 * wait for) overtaking its client's earlier logged ones.
 *
 * A client with nothing waiting or delivering costs nothing: authorizePublish
 * asks {@link DeliveryOrder.clear} and acknowledges and delivers at once, with
 * no entry and no closure (the common case).
 */
import type { Client } from 'aedes'

/** Starts one publish's ack and delivery; `finished` is for one delivered before its ack, when both are done. */
export type Turn = (finished: () => void, waitError?: unknown) => void

interface Pending {
  /** Delivered before its ack: later publishes acknowledged first wait until it finished. */
  readonly deliverFirst: boolean
  /** What it waited for settled (at once when it waits for nothing). */
  settled: boolean
  error: unknown
  readonly turn: Turn
}

class ClientTurns {
  /** Publishes delivered before their ack, started and not finished. */
  deliveringFirst = 0
  /** Publishes not started yet, in the order the client sent them. */
  readonly pending: Pending[] = []
}

function noop (): void {}

export class DeliveryOrder {
  readonly #clients = new WeakMap<Client, ClientTurns>()

  /** Whether a publish of the client that waits for nothing may be acknowledged and delivered now. */
  clear (client: Client): boolean {
    return !this.#clients.has(client)
  }

  /** `turn` delivers, then acks: started once every earlier publish of the client started. */
  deliverBeforeAck (client: Client, turn: Turn): void {
    this.#add(client, { deliverFirst: true, settled: true, error: undefined, turn })
  }

  /**
   * `turn` acks, then delivers: started once `wait` settled (it gets the rejection), every earlier publish of the
   * client started, and every earlier one delivered before its ack finished.
   */
  ackBeforeDelivery (client: Client, wait: Promise<unknown> | null, turn: Turn): void {
    const pending: Pending = { deliverFirst: false, settled: wait === null, error: undefined, turn }
    const turns = this.#add(client, pending)
    if (wait === null) return
    wait.then(() => {
      pending.settled = true
      this.#next(client, turns)
    }, (err: unknown) => {
      pending.settled = true
      pending.error = err
      this.#next(client, turns)
    })
  }

  #add (client: Client, pending: Pending): ClientTurns {
    let turns = this.#clients.get(client)
    if (turns === undefined) this.#clients.set(client, turns = new ClientTurns())
    turns.pending.push(pending)
    this.#next(client, turns)
    return turns
  }

  /** Starts the publishes whose turn has come; forgets the client once nothing of it waits or delivers. */
  #next (client: Client, turns: ClientTurns): void {
    while (turns.pending.length > 0) {
      const head = turns.pending[0] as Pending
      if (!head.settled || (!head.deliverFirst && turns.deliveringFirst > 0)) return
      turns.pending.shift()
      if (!head.deliverFirst) {
        head.turn(noop, head.error)
        continue
      }
      turns.deliveringFirst++
      let finished = false
      let running = true
      head.turn(() => {
        if (finished) return
        finished = true
        turns.deliveringFirst--
        // Finished within its turn: this loop goes on with the next, rather than a call one frame deeper.
        if (!running) this.#next(client, turns)
      })
      running = false
    }
    if (turns.deliveringFirst === 0 && this.#clients.get(client) === turns) this.#clients.delete(client)
  }
}
