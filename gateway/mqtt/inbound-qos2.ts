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
 * Delivery to subscribers (online, and persistent sessions' cursors and
 * copies) is written after the append batch, so a gateway killed between
 * the two left a logged message undelivered; killed after the delivery but
 * before the PUBREC reached the client, it left one delivered that the
 * client sends again. The entry tells the two apart (sessions/format.ts):
 * - it holds its record's position (stream, partition, offset), made by the
 *   append's commit (the store's PositionedPut), so the record and the
 *   position are on disk together;
 * - once the delivery queued a copy for some persistent session (an `O`
 *   entry, queued-copies.ts), the entry is written again as delivered, and
 *   the PUBREC waits for that write (without an fsync of its own: a kill
 *   loses none, a power loss may lose the mark and give one duplicate; a
 *   window-1 QoS 2 device ran as fast with it as without, within the noise
 *   of a loaded machine). Only then: a delivery that queued no copy left
 *   nothing a second delivery would duplicate for a persistent session, and
 *   the write is saved.
 * The first retransmission of an entry that is not marked delivered and that
 * this process did not deliver (one stored by a process that died) is
 * delivered again, with its record's position attached as a live publish
 * carries it (log-position.ts) and marked `late`; each persistent session
 * decides with it (sessions/persistence.ts #enqueue). Per subscriber:
 * - a persistent session that reads the partition through a cursor (QoS 1
 *   deliveries of logged messages, sessions/cursors.ts): one whose cursor
 *   started at or below the record in this process (loaded from below it, or
 *   created at it) takes it from the log, once; one whose cursor started
 *   above it, or that has none there, never reads it and gets a copy. A
 *   cursor above the record was created above it after the restart, or was
 *   loaded there: then the session may have had the record before the crash
 *   (a duplicate), or its cursor was created above the record while the
 *   record's delivery was cut short by the kill (the copy is what it needs);
 *   a cursor keeps no record of where it was created, so it gets a copy. So
 *   does one whose cursor has a fence above the record (it subscribed since:
 *   below the fence its cursor matches only the filters the record was logged
 *   under), a duplicate if one of those matched too;
 * - a persistent session that keeps copies (QoS 2 deliveries, sessions
 *   without cursors) gets one copy: none was queued before the crash, or the
 *   entry says delivered and nothing is delivered again. A kill between the
 *   copy's write and the mark's leaves the one duplicate this allows;
 * - a live subscriber without a persistent session may get the message once
 *   more when the crash came after its delivery: at least once after a crash,
 *   as documented, never lost.
 */
import type { Client, PublishPacket } from 'aedes'
import type { AppendExtraOperation } from '../../store/index.ts'
import type { SessionPacket } from './sessions/persistence.ts'
import { incomingPositionOf, type IncomingFields } from './sessions/format.ts'
import { wrapInboundQos2 } from './aedes-internals.ts'
import { attachLogPosition } from './log-position.ts'
import { queuedCopy } from './queued-copies.ts'

/** What authorizePublish decided for a QoS 2 PUBLISH that goes to subscribers (and, when routed, into the log). */
export interface Qos2Plan {
  /** Appends the record with these operations in its batch; absent for a topic no route logs. */
  readonly append?: (extraOps: AppendExtraOperation[]) => Promise<void>
  /** Delivers to subscribers and marks the packet so aedes' own publish after this is a no-op. */
  readonly deliver: () => Promise<void>
}

/** The part of the session persistence (sessions/persistence.ts) this module wraps. */
export interface Qos2Persistence {
  incomingStorePacket (client: Client, packet: SessionPacket): Promise<void>
  incomingStorePacketWith<T> (client: Client, packet: SessionPacket, write: (ops: AppendExtraOperation[]) => Promise<T>): Promise<T>
  incomingGetPacket (client: Client, packet: SessionPacket): Promise<unknown>
  /** Writes the stored entry again, marked delivered (sessions/format.ts). */
  incomingMarkDelivered (client: Client, messageId: number): Promise<void>
  incomingDelPacket (client: Client, packet: SessionPacket): Promise<void>
  cleanIncoming (client: Client): Promise<void>
  hasIncomingPacket (client: Client, messageId: number): boolean
  incomingCount (client: Client): number
  /** Whether a clean CONNECT of the client id discarded the session while this connection was open (it is being taken over). */
  sessionDiscarded (client: Client): boolean
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
          // Stored by a gateway process that died; see the header.
          const entry = stored as IncomingFields
          if (entry.edgemqDelivered !== true) {
            const position = incomingPositionOf(entry)
            // Each persistent session decides with the position (persistence.ts #enqueue): its cursor if that will read
            // the record, else a copy.
            if (position !== undefined) attachLogPosition(packet, { ...position, late: true })
            await plan.deliver()
            await this.#markDelivered(client, packet)
          }
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
        // The close of a connection a clean CONNECT took over (3.1.1 clean session): the entries, appends and deliveries
        // of its client id are the new connection's now (the persistence cleans nothing for it either).
        if (this.#persistence.sessionDiscarded(client)) return
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
   * delivery have started, and aedes' PUBREC waits for them (or, for a
   * connection being taken over, nothing started and aedes' store step is
   * refused). `duplicate`: a
   * retransmission, nothing is appended. `full`: the client has
   * `maxInflight` exchanges awaiting PUBREL; refuse the packet.
   */
  begin (client: Client, packet: PublishPacket, plan: Qos2Plan): Qos2Begin {
    const messageId = packet.messageId as number
    // A connection a clean CONNECT is taking over starts nothing: aedes' own store step is refused
    // (GW_SESSION_TAKEN_OVER) and closes it, unacknowledged. Started, its append would sit under the packet id the new
    // connection may use meanwhile (appends in flight are kept by client id): the new one's PUBLISH was taken for a
    // retransmission of it, and failed with it.
    if (this.#persistence.sessionDiscarded(client)) return 'new'
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
      await this.#markDelivered(client, packet)
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

  /**
   * Marks the entry delivered when the delivery queued a copy for a persistent session (see the header). A failed
   * write is not the delivery's failure: the copy is queued, and a PUBREC withheld would make the client send the
   * message again now, a duplicate for sure; the mark missing costs one only if the gateway dies before the PUBREL.
   * The store's failure is reported where it happens (the writer).
   */
  async #markDelivered (client: Client, packet: { readonly payload?: unknown, readonly messageId?: number }): Promise<void> {
    if (!queuedCopy(packet) || packet.messageId === undefined) return
    await this.#persistence.incomingMarkDelivered(client, packet.messageId).catch(() => {})
  }

  #setOf (clientId: string): Set<number> {
    let set = this.#delivered.get(clientId)
    if (set === undefined) this.#delivered.set(clientId, set = new Set())
    return set
  }
}
