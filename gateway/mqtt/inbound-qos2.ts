/**
 * Inbound QoS 2: exactly once into the log [MQTT-4.3.3-2], across kill -9.
 *
 * The exchange's state is the session's inbound packet entry (`I`, in
 * sessions/persistence.ts), and nothing else: while it exists, a PUBLISH with
 * its packet id is a retransmission; PUBREL deletes it and the client may
 * reuse the id. Every step is one LevelDB write batch:
 * - PUBLISH → PUBREC: the record and the `I` entry (the log store's
 *   `extraOps`), so after a crash the record exists exactly when the entry
 *   does; a retransmission is found and not appended again, and a packet id
 *   is never remembered without its record;
 * - PUBREL → PUBCOMP: the entry's delete, one write;
 * - a clean session: the delete of all the client's entries, one write.
 * (Earlier the store's dedupe id was a second copy of this state, forgotten
 * in a separate write after the entry: a kill between the two kept the id,
 * and the client's next message with that packet id was acknowledged and
 * dropped.)
 *
 * aedes 1.2.0 (lib/handlers/publish.js) calls authorizePublish, then
 * incomingGetPacket: found means a retransmission, answered PUBREC without
 * publishing; else it reserves an inbound slot, calls incomingStorePacket
 * and broker.publish, then PUBREC. The append starts in authorizePublish
 * (`begin`), in arrival order with the client's other publishes, and puts
 * the entry in memory at once; aedes' incomingGetPacket then waits for the
 * append and the delivery and finds the entry, so the PUBREC follows them.
 * As aedes' slot is not reserved on that path, `begin` holds the client to
 * aedes' `maxInflightInbound` itself, counting the stored entries.
 *
 * A failed append is answered by client version. MQTT 5: PUBREC with 0x97
 * (disk full, record too large) or 0x80, which ends the exchange (MQTT 5
 * 4.3.3): nothing was logged and no entry stored (one batch), so the client
 * may send the message again under any packet id; authorizePublish waits for
 * the append to give aedes that reason code. MQTT 3.1.1 has no reason code
 * on PUBREC: the append is retried while the client stays connected
 * (hooks/durable-append.ts), and no PUBREC is sent until it succeeds; if the
 * connection ends first, aedes' store step fails and the client sends the
 * PUBLISH again after it reconnects [MQTT-4.4.0-1].
 *
 * Delivery to subscribers (online, and persistent sessions' offline queues)
 * is written after the append batch, so a gateway killed between the two
 * left a logged message undelivered. The first retransmission of an entry
 * this process did not deliver (one stored by a process that died) is
 * delivered again: at least once to subscribers after a crash, never lost.
 */
import type { Client, PublishPacket } from 'aedes'
import type { ExtraOperation } from '../../store/index.ts'
import type { SessionPacket } from './sessions/persistence.ts'
import { wrapInboundQos2 } from './aedes-internals.ts'

/** What authorizePublish decided for a QoS 2 PUBLISH that goes to subscribers (and, when routed, into the log). */
export interface Qos2Plan {
  /** Appends the record with these operations in its batch; absent for a topic no route logs. */
  readonly append?: (extraOps: ExtraOperation[]) => Promise<void>
  /** Delivers to subscribers and marks the packet so aedes' own publish after this is a no-op. */
  readonly deliver: () => Promise<void>
}

/** The part of the session persistence (sessions/persistence.ts) this module wraps. */
export interface Qos2Persistence {
  incomingStorePacket (client: Client, packet: SessionPacket): Promise<void>
  incomingStorePacketWith<T> (client: Client, packet: SessionPacket, write: (ops: ExtraOperation[]) => Promise<T>): Promise<T>
  incomingGetPacket (client: Client, packet: SessionPacket): Promise<unknown>
  incomingDelPacket (client: Client, packet: SessionPacket): Promise<void>
  cleanIncoming (client: Client): Promise<void>
  hasIncomingPacket (client: Client, messageId: number): boolean
  incomingCount (client: Client): number
}

export type Qos2Begin = 'new' | 'duplicate' | 'full'

export class InboundQos2 {
  readonly #persistence: Qos2Persistence
  readonly #maxInflight: number
  /** Plans of retransmissions, for a delivery again after a crash. */
  readonly #plans = new WeakMap<object, Qos2Plan>()
  /** Packets whose append or delivery failed, with the error: aedes' store step fails with it, so no PUBREC is sent. */
  readonly #failed = new WeakMap<object, unknown>()
  /** Appends in flight, by client id and packet id. */
  readonly #pending = new Map<string, Map<number, Promise<void>>>()
  /** Packet ids whose message this process has delivered, by client id, until PUBREL or a clean session. */
  readonly #delivered = new Map<string, Set<number>>()

  /**
   * Wraps the persistence's inbound methods (aedes-internals.ts). `maxInflight`
   * is the `maxInflightInbound` aedes was given (0 = no limit).
   */
  constructor (persistence: Qos2Persistence, maxInflight: number) {
    this.#persistence = persistence
    this.#maxInflight = maxInflight
    wrapInboundQos2(persistence, {
      incomingGetPacket: (get) => async (client, packet) => {
        if (this.#failed.has(packet)) throw this.#failed.get(packet) // a delivery that failed after the append: see begin
        const messageId = packet.messageId
        const running = packet.cmd === 'publish' && messageId !== undefined ? this.#pending.get(client.id)?.get(messageId) : undefined
        if (running !== undefined) {
          // A failed append or delivery reads as "not found"; aedes' store step then fails with the error: no PUBREC.
          try { await running } catch (err) { this.#failed.set(packet, err); throw err }
        }
        const stored = await get(client, packet)
        if (packet.cmd !== 'publish' || messageId === undefined || running !== undefined) return stored
        const plan = this.#plans.get(packet)
        if (plan !== undefined && this.#delivered.get(client.id)?.has(messageId) !== true) {
          await plan.deliver() // stored by a gateway process that died; see the header
          this.#setOf(client.id).add(messageId)
        }
        return stored
      },
      incomingStorePacket: (store) => async (client, packet) => {
        if (this.#failed.has(packet)) throw this.#failed.get(packet)
        await store(client, packet) // refused, or logged under another dedupe id: stored as aedes does
      },
      incomingDelPacket: (del) => async (client, packet) => {
        await del(client, packet)
        if (packet.messageId !== undefined) this.#delivered.get(client.id)?.delete(packet.messageId)
      },
      cleanIncoming: (clean) => async (client) => {
        // An append still in flight (of a connection this one took over) must not land after the wipe.
        await Promise.allSettled(this.#pending.get(client.id)?.values() ?? [])
        await clean(client)
        this.#delivered.delete(client.id)
      },
    })
  }

  /** aedes' `maxInflightInbound` this instance holds clients to (0 = no limit). */
  get maxInflight (): number {
    return this.#maxInflight
  }

  /**
   * Called by authorizePublish for a QoS 2 PUBLISH (with a packet id) that it
   * accepted for delivery. `new`: the append (with the inbound entry) and the
   * delivery have started, and aedes' PUBREC waits for them. `duplicate`: a
   * retransmission, nothing is appended. `full`: the client has
   * `maxInflight` exchanges awaiting PUBREL; refuse the packet.
   */
  begin (client: Client, packet: PublishPacket, plan: Qos2Plan): Qos2Begin {
    const messageId = packet.messageId as number
    const pending = this.#pending.get(client.id)
    if (pending?.has(messageId) === true || this.#persistence.hasIncomingPacket(client, messageId)) {
      this.#plans.set(packet, plan)
      return 'duplicate'
    }
    if (this.#maxInflight > 0 && this.#persistence.incomingCount(client) >= this.#maxInflight) return 'full'
    const work = (async () => {
      const stored = packet as unknown as SessionPacket
      if (plan.append === undefined) await this.#persistence.incomingStorePacket(client, stored)
      else await this.#persistence.incomingStorePacketWith(client, stored, plan.append)
      // Remembered per packet: under MQTT 5 aedes asks incomingGetPacket only after this settled (authorizePublish waits).
      try { await plan.deliver() } catch (err) { this.#failed.set(packet, err); throw err }
      this.#setOf(client.id).add(messageId)
    })()
    const map = pending ?? new Map<number, Promise<void>>()
    if (pending === undefined) this.#pending.set(client.id, map)
    map.set(messageId, work)
    work.catch(() => {}).finally(() => { // its error reaches the client through incomingGetPacket
      if (map.get(messageId) === work) map.delete(messageId)
      if (map.size === 0 && this.#pending.get(client.id) === map) this.#pending.delete(client.id)
    })
    return 'new'
  }

  /** The append and delivery that `begin` started ('new') for this packet id, until they settle. */
  running (client: Client, messageId: number): Promise<void> | undefined {
    return this.#pending.get(client.id)?.get(messageId)
  }

  #setOf (clientId: string): Set<number> {
    let set = this.#delivered.get(clientId)
    if (set === undefined) this.#delivered.set(clientId, set = new Set())
    return set
  }
}
