/**
 * Inbound QoS 2: exactly once into the log [MQTT-4.3.3-2], across kill -9.
 *
 * The exchange's state is the session's inbound packet entry (`I`, in
 * session-persistence.ts), and nothing else: while it exists, a PUBLISH with
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
 * incomingGetPacket (found: PUBREC without publishing), else reserves an
 * inbound slot, calls incomingStorePacket and broker.publish, then PUBREC.
 * authorizePublish only plans the append (`plan`); the append happens in
 * incomingStorePacket, after aedes' duplicate check and slot reservation.
 *
 * Delivery to subscribers (online, and persistent sessions' offline queues)
 * is written after the append batch, so a gateway killed between the two
 * left a logged message undelivered. The first retransmission of an entry
 * this process did not deliver (one stored by a process that died) is
 * delivered again: at least once to subscribers after a crash, never lost.
 */
import type { Client, PublishPacket } from 'aedes'
import type { ExtraOperation } from '../store/index.ts'
import type { SessionPacket } from './session-persistence.ts'

/** What authorizePublish decided for a QoS 2 PUBLISH that goes to subscribers (and, when routed, into the log). */
export interface Qos2Plan {
  /** Appends the record with these operations in its batch; absent for a topic no route logs. */
  readonly append?: (extraOps: ExtraOperation[]) => Promise<void>
  /** Delivers to subscribers and marks the packet so aedes' own publish after this is a no-op. */
  readonly deliver: () => Promise<void>
}

/** The part of the session persistence (session-persistence.ts) this module wraps. */
export interface Qos2Persistence {
  incomingStorePacket (client: Client, packet: SessionPacket): Promise<void>
  incomingStorePacketWith<T> (client: Client, packet: SessionPacket, write: (ops: ExtraOperation[]) => Promise<T>): Promise<T>
  incomingGetPacket (client: Client, packet: SessionPacket): Promise<unknown>
  incomingDelPacket (client: Client, packet: SessionPacket): Promise<void>
  cleanIncoming (client: Client): Promise<void>
}

export class InboundQos2 {
  readonly #plans = new WeakMap<object, Qos2Plan>()
  /** Stores in flight, by client id and packet id: a duplicate in the same read chunk waits for the first. */
  readonly #pending = new Map<string, Map<number, Promise<void>>>()
  /** Packet ids whose message this process has delivered, by client id, until PUBREL or a clean session. */
  readonly #delivered = new Map<string, Set<number>>()
  readonly #markDone: (packet: PublishPacket) => void

  /** Wraps the persistence's inbound methods; `markDone` makes aedes' publish of a packet a no-op. */
  constructor (persistence: Qos2Persistence, markDone: (packet: PublishPacket) => void) {
    this.#markDone = markDone
    const store = persistence.incomingStorePacket.bind(persistence)
    const storeWith = persistence.incomingStorePacketWith.bind(persistence)
    const get = persistence.incomingGetPacket.bind(persistence)
    const del = persistence.incomingDelPacket.bind(persistence)
    const clean = persistence.cleanIncoming.bind(persistence)

    persistence.incomingStorePacket = async (client, packet) => {
      const plan = this.#plans.get(packet)
      const messageId = packet.messageId as number
      const running = this.#pending.get(client.id)?.get(messageId)
      if (running !== undefined) {
        await running
        this.#markDone(packet as unknown as PublishPacket) // the first copy was delivered
        return
      }
      if (plan === undefined) return await store(client, packet) // refused or already logged under another id: stored as aedes does
      const work = (async () => {
        if (plan.append === undefined) await store(client, packet)
        else await storeWith(client, packet, plan.append)
        await plan.deliver()
        this.#setOf(this.#delivered, client.id).add(messageId)
      })()
      const pending = this.#mapOf(client.id)
      pending.set(messageId, work)
      try {
        await work
      } finally {
        if (pending.get(messageId) === work) pending.delete(messageId)
        if (pending.size === 0 && this.#pending.get(client.id) === pending) this.#pending.delete(client.id)
      }
    }

    persistence.incomingGetPacket = async (client, packet) => {
      const running = packet.cmd === 'publish' && packet.messageId !== undefined ? this.#pending.get(client.id)?.get(packet.messageId) : undefined
      const stored = await get(client, packet)
      if (packet.cmd !== 'publish' || packet.messageId === undefined) return stored
      if (running !== undefined) {
        // Its first copy is still being stored; if that fails, this copy is a new message after all.
        try { await running } catch (err) { throw Object.assign(new Error('the first copy was not stored'), { cause: err }) }
        return stored
      }
      const plan = this.#plans.get(packet)
      if (plan !== undefined && this.#delivered.get(client.id)?.has(packet.messageId) !== true) {
        await plan.deliver() // stored by a gateway process that died; see the header
        this.#setOf(this.#delivered, client.id).add(packet.messageId)
      }
      return stored
    }

    persistence.incomingDelPacket = async (client, packet) => {
      await del(client, packet)
      if (packet.messageId !== undefined) this.#delivered.get(client.id)?.delete(packet.messageId)
    }

    persistence.cleanIncoming = async (client) => {
      // A store still in flight (of a connection this one took over) must not land after the wipe.
      await Promise.allSettled(this.#pending.get(client.id)?.values() ?? [])
      await clean(client)
      this.#delivered.delete(client.id)
    }
  }

  /** Called by authorizePublish for a QoS 2 PUBLISH it accepted for delivery (not for wills, which have no packet id). */
  plan (packet: PublishPacket, plan: Qos2Plan): void {
    this.#plans.set(packet, plan)
  }

  #mapOf (clientId: string): Map<number, Promise<void>> {
    let map = this.#pending.get(clientId)
    if (map === undefined) this.#pending.set(clientId, map = new Map())
    return map
  }

  #setOf (map: Map<string, Set<number>>, clientId: string): Set<number> {
    let set = map.get(clientId)
    if (set === undefined) map.set(clientId, set = new Set())
    return set
  }
}
