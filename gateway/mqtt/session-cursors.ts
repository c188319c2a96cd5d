/**
 * Persistent sessions' cursors into the log (the `K` keys of
 * session-format.ts; they hold the log's retention through
 * LogStore.holdRetention): for a message the log already
 * holds (a routed topic), a session keeps, per stream and partition, the
 * next offset to deliver instead of a copy of the message. The first message
 * of a partition a session is sent creates its cursor (one small write);
 * later ones write nothing. On reconnect the session's queue is read back
 * from the log in stored batches, from each cursor, filtered by the
 * session's subscriptions with the matcher live routing uses, at QoS
 * min(subscription, record). Deliveries are held in memory only (no write
 * when aedes assigns a message id); a PUBACK advances the cursor to the
 * lowest offset still unacknowledged, written through the log store's
 * group-commit writer, one write in flight per cursor (later advances
 * coalesce into the next).
 *
 * One path for catch-up and live delivery: a session starts each connection
 * reading the log (live copies of logged messages are held back, see
 * {@link SessionCursors.forwardLive}), and goes live once every cursor has
 * reached the log's end and every record read was handed to aedes, a check
 * made in one synchronous step, so per-partition (per-device) order holds
 * across the switch. The read keeps at most `window` deliveries
 * unacknowledged (the Readable aedes drains waits).
 *
 * Not kept as a store consumer group: the store commits a group's offset as
 * a lone fsync'd put (about 4.7 k/s) outside the group commit, and a
 * retention-holding group holds every partition it never committed from 0.
 * The cursors are keys of the session key space (`K`, session-format.ts),
 * written in the log's group commits.
 *
 * QoS 2 deliveries stay copies (the `O` queue), whose PUBREL state survives a
 * restart; only QoS 1 deliveries use cursors.
 */
import type { LogStore } from '../../store/index.ts'
import { headersToProperties } from '../../bridge/index.ts'
import { mountTopic } from '../access/topics.ts'
import { logPositionOf, type LogPosition } from './log-position.ts'
import { keys } from './session-format.ts'

/** What the cursors read of the log. */
export type SessionLog = Pick<LogStore, 'read' | 'partitionInfo' | 'holdRetention'>

/** A packet the cursors hand to aedes (an aedes-packet's fields). */
export interface CursorPacket {
  cmd: 'publish'
  topic: string
  payload: Buffer
  qos: number
  retain: boolean
  dup: boolean
  brokerId: string
  brokerCounter: number
  messageId: number | undefined
  [field: string]: unknown
}

export interface CursorDeps {
  readonly log: SessionLog
  /** Puts of cursor values (resolve once durable). */
  readonly write: (ops: Array<{ type: 'put', key: Buffer, value: Buffer } | { type: 'del', key: Buffer }>) => Promise<void>
  /** The highest QoS of the client's subscriptions matching the (mounted) topic, 0 when none. */
  readonly grantedQos: (clientId: string, topic: string) => number
  /** The broker, for ids of the packets handed to aedes. */
  readonly broker: () => { readonly id: string, counter?: number } | undefined
  /** Unacknowledged deliveries per session while it reads the log. */
  readonly window: number
  /** Records read per stored read. */
  readonly readRecords?: number
  /** Told when a cursor write failed (the cursor is retried with the next advance). */
  readonly onWriteError?: (err: unknown) => void
  /** ms since the epoch, for MQTT 5 message expiry (default Date.now). */
  readonly now?: () => number
  /** Told of each record of this session skipped because its message expiry had passed [MQTT-3.3.2-5]. */
  readonly onExpired?: (tenant: string) => void
}

class PartitionCursor {
  /** The value written (or being written): next offset to deliver after a restart. */
  committed: number
  /** Next offset this connection has not yet delivered or skipped. */
  next: number
  /** Offsets delivered and not acknowledged, ascending. */
  readonly pending: number[] = []
  readonly acked = new Set<number>()
  /** Offsets below this may have been sent before (DUP). */
  dupBelow: number
  writing = false
  dirty = false

  constructor (readonly stream: string, readonly partition: number, committed: number, dupBelow: number) {
    this.committed = committed
    this.next = committed
    this.dupBelow = dupBelow
  }

  /** Where the cursor may go: the lowest unacknowledged delivery, or past everything delivered. */
  target (): number {
    while (this.pending.length > 0 && this.acked.delete(this.pending[0] as number)) this.pending.shift()
    return this.pending[0] ?? this.next
  }
}

interface Delivery {
  /** brokerId and brokerCounter of the packet aedes forwards. */
  readonly key: string
  readonly cursor: PartitionCursor
  readonly offset: number
  /** Read from the log by this connection (else registered for a live copy). */
  readonly drained: boolean
  /** The packet sent (a live copy's once forwarded), for aedes' `ack` event and for {@link SessionCursors.detach}. */
  packet: Readonly<Record<string, unknown>> | undefined
  messageId: number | undefined
  delivered: boolean
}

class ClientCursors {
  readonly cursors = new Map<string, PartitionCursor>()
  /** The connection reading the log or live; undefined before the first outgoingStream of this process. */
  connection: object | undefined
  live = false
  readonly byBroker = new Map<string, Delivery>()
  readonly byMessageId = new Map<number, Delivery>()
  unacked = 0
  /** Drained deliveries handed out and not yet given a message id by aedes. */
  unsent = 0
  #wakers: Array<() => void> = []

  wait (): Promise<void> {
    return new Promise((resolve) => this.#wakers.push(resolve))
  }

  wake (): void {
    for (const w of this.#wakers.splice(0)) w()
  }

  reset (connection: object | undefined): void {
    this.connection = connection
    this.live = false
    this.byBroker.clear()
    this.byMessageId.clear()
    this.unacked = 0
    this.unsent = 0
    for (const c of this.cursors.values()) {
      // From the lowest unacknowledged delivery (the value written, or about to be); everything sent from there is DUP.
      const from = c.target()
      c.pending.length = 0
      c.acked.clear()
      c.dupBelow = Math.max(c.dupBelow, c.next)
      c.next = from
    }
    this.wake()
  }
}

/** Whether a delivery was the cursors' and, once sent, its packet (for aedes' `ack` event). */
export interface Cleared { readonly found: boolean, readonly packet?: Readonly<Record<string, unknown>> }

/** A delivery sent and not acknowledged, handed back as a copy to keep (see {@link SessionCursors.detach}). */
export interface Detached { readonly packet: Readonly<Record<string, unknown>>, readonly messageId: number }

/** The fields of a live packet forwardLive reads. */
export interface LivePacket {
  readonly topic?: unknown
  readonly qos?: unknown
  readonly payload?: unknown
  readonly brokerId?: unknown
  readonly brokerCounter?: unknown
}

const cursorId = (stream: string, partition: number): string => `${partition}/${stream}`
const brokerKey = (brokerId: unknown, counter: unknown): string => `${String(brokerId)}|${String(counter)}`

export class SessionCursors {
  readonly #deps: CursorDeps
  readonly #clients = new Map<string, ClientCursors>()

  constructor (deps: CursorDeps) {
    this.#deps = deps
  }

  /** A cursor read from disk at startup: records from it up to the log's end now may have been sent (DUP). */
  load (clientId: string, stream: string, partition: number, next: number): void {
    let dupBelow = next
    try {
      dupBelow = this.#deps.log.partitionInfo(stream, partition).logEndOffset
    } catch {
      // a stream deleted since: the cursor reads nothing
    }
    this.#client(clientId).cursors.set(cursorId(stream, partition), new PartitionCursor(stream, partition, next, dupBelow))
  }

  has (clientId: string): boolean {
    return (this.#clients.get(clientId)?.cursors.size ?? 0) > 0
  }

  /**
   * Takes the message at `position` for the client instead of a copy: creates the cursor of its partition (the
   * returned write) when the session has none; else nothing is written. A connected client may get the live copy
   * too: authorizeForward asks {@link forwardLive}.
   */
  enqueue (clientId: string, position: LogPosition): Promise<void> | undefined {
    const client = this.#client(clientId)
    const id = cursorId(position.stream, position.partition)
    if (client.cursors.has(id)) return undefined
    client.cursors.set(id, new PartitionCursor(position.stream, position.partition, position.offset, position.offset))
    return this.#deps.write([{ type: 'put', key: keys.cursor(clientId, position.stream, position.partition), value: u64(position.offset) }])
  }

  /**
   * Whether aedes may forward this live copy to the client (authorizeForward asks). A copy of a logged message is
   * held back while the session reads the log (the read delivers it, in order) and when the read delivered it.
   */
  forwardLive (client: object & { readonly id: string }, packet: LivePacket): boolean {
    const state = this.#clients.get(client.id)
    // Packets read from the log by this module carry no position: only live copies of logged messages do.
    const position = state === undefined ? undefined : logPositionOf(packet)
    if (state === undefined || position === undefined || typeof packet.topic !== 'string') return true
    const cursor = state.cursors.get(cursorId(position.stream, position.partition))
    // A QoS 2 delivery is queued as a copy, not a cursor (outgoingEnqueueCombi, the same rule).
    if (cursor === undefined || Math.min(Number(packet.qos ?? 0), this.#deps.grantedQos(client.id, packet.topic)) !== 1) return true
    if (state.connection !== client || !state.live || position.offset < cursor.next) return false
    const key = brokerKey(packet.brokerId, packet.brokerCounter)
    // The copy before authorizeForward unmounts the topic in place.
    state.byBroker.set(key, { key, cursor, offset: position.offset, drained: false, packet: { ...packet }, messageId: undefined, delivered: true })
    cursor.next = position.offset + 1
    cursor.pending.push(position.offset)
    state.unacked++
    return true
  }

  /**
   * Takes the client's sent, unacknowledged deliveries out of the cursors (which advance past them) and returns
   * them, for the caller to keep as copies. Called when the client unsubscribes: the read from the log filters by the
   * subscriptions held, but a delivery sent under a dropped one must still be resent until acknowledged [MQTT-4.4.0-1].
   */
  detach (clientId: string): Detached[] {
    const state = this.#clients.get(clientId)
    if (state === undefined) return []
    const out: Detached[] = []
    const touched = new Set<PartitionCursor>()
    for (const [messageId, delivery] of state.byMessageId) {
      if (delivery.packet === undefined || !delivery.delivered) continue
      out.push({ packet: delivery.packet, messageId })
      state.byMessageId.delete(messageId)
      state.byBroker.delete(delivery.key)
      state.unacked--
      delivery.cursor.acked.add(delivery.offset)
      touched.add(delivery.cursor)
    }
    for (const cursor of touched) this.#advance(clientId, cursor)
    if (out.length > 0) state.wake()
    return out
  }

  /** aedes gave the delivery a message id (no write: deliveries are held in memory). False when it is not ours. */
  update (client: { readonly id: string }, packet: { messageId?: unknown, brokerId?: unknown, brokerCounter?: unknown }): boolean {
    const state = this.#clients.get(client.id)
    const delivery = state?.byBroker.get(brokerKey(packet.brokerId, packet.brokerCounter))
    if (state === undefined || delivery === undefined || typeof packet.messageId !== 'number') return false
    if (delivery.messageId !== undefined) state.byMessageId.delete(delivery.messageId)
    delivery.messageId = packet.messageId
    state.byMessageId.set(packet.messageId, delivery)
    if (delivery.drained && !delivery.delivered) {
      delivery.delivered = true
      state.unsent--
      state.wake()
    }
    return true
  }

  /**
   * A PUBACK (by message id), or a copy aedes did not forward (by broker id and counter): the delivery is done and
   * the cursor advances past it. Undefined when it is not one of the cursors' deliveries.
   */
  clear (client: { readonly id: string }, packet: { messageId?: unknown, brokerId?: unknown, brokerCounter?: unknown }): Cleared {
    const state = this.#clients.get(client.id)
    if (state === undefined) return { found: false }
    let delivery: Delivery | undefined
    if (typeof packet.messageId === 'number') {
      delivery = state.byMessageId.get(packet.messageId)
      if (delivery !== undefined) state.byMessageId.delete(packet.messageId)
    } else {
      delivery = state.byBroker.get(brokerKey(packet.brokerId, packet.brokerCounter))
    }
    if (delivery === undefined) return { found: false }
    state.byBroker.delete(delivery.key)
    if (delivery.drained || delivery.delivered) {
      if (delivery.drained && !delivery.delivered) state.unsent--
      state.unacked--
      delivery.cursor.acked.add(delivery.offset)
      this.#advance(client.id, delivery.cursor)
      state.wake()
    }
    return { found: true, packet: delivery.packet }
  }

  /**
   * Drops the cursors of a session left without subscriptions (their unacknowledged deliveries were detached
   * first), with the writes that delete them, so they hold no retention; the connection stays as it is.
   */
  dropCursors (clientId: string): Array<{ type: 'del', key: Buffer }> {
    const state = this.#clients.get(clientId)
    if (state === undefined) return []
    const ops = [...state.cursors.values()].map((c) => ({ type: 'del' as const, key: keys.cursor(clientId, c.stream, c.partition) }))
    state.cursors.clear()
    return ops
  }

  /** Drops the session's cursors (a clean session), with the writes that delete them. */
  drop (clientId: string): Array<{ type: 'del', key: Buffer }> {
    const state = this.#clients.get(clientId)
    if (state === undefined) return []
    this.#clients.delete(clientId)
    state.reset(undefined)
    return [...state.cursors.values()].map((c) => ({ type: 'del' as const, key: keys.cursor(clientId, c.stream, c.partition) }))
  }

  /**
   * The session's queue in the log, read from its cursors for this connection; goes live at the end. `connection`
   * is aedes' client object of the connection.
   */
  async * read (connection: object & { readonly id: string, readonly clean?: boolean }): AsyncGenerator<CursorPacket> {
    // aedes' client.clean (docs/Client.md): a clean session keeps no cursors, and its copies are never enqueued.
    if (connection.clean === true) return
    const state = this.#client(connection.id)
    state.reset(connection)
    const { log, window } = this.#deps
    const current = (): boolean => state.connection === connection
    for (;;) {
      for (const cursor of [...state.cursors.values()]) {
        for (;;) {
          if (!current()) return
          const end = endOf(log, cursor)
          if (cursor.next >= end) break
          const from = Math.max(cursor.next, startOf(log, cursor))
          const { records } = await log.read(cursor.stream, cursor.partition, from, { maxRecords: this.#deps.readRecords ?? 1000 })
          if (!current()) return
          if (records.length === 0) { cursor.next = Math.max(cursor.next, end); break }
          const tenant = cursor.stream.slice(0, cursor.stream.indexOf('/'))
          for (const record of records) {
            if (record.offset < cursor.next) continue
            const topic = mountTopic(tenant, record.topic)
            const qos = Math.min(record.qos, this.#deps.grantedQos(connection.id, topic))
            // An MQTT 5 message's properties are kept as headers (bridge/mqtt-properties.ts), its expiry as time left.
            const properties = headersToProperties(record.headers, { now: (this.#deps.now ?? Date.now)(), timestamp: record.timestamp })
            const expired = properties?.messageExpiryInterval !== undefined && properties.messageExpiryInterval <= 0 // [MQTT-3.3.2-5]
            if (expired && qos === 1) this.#deps.onExpired?.(tenant)
            if (qos !== 1 || expired) {
              // Not this session's (QoS 0, unmatched) or a QoS 2 delivery, which is queued as a copy.
              cursor.next = record.offset + 1
              if (cursor.pending.length === 0) this.#advance(connection.id, cursor)
              continue
            }
            while (state.unacked >= window && current()) await state.wait()
            if (!current()) return
            const broker = this.#deps.broker()
            const counter = broker === undefined ? 0 : (broker.counter = (broker.counter ?? 0) + 1)
            const packet: CursorPacket = {
              cmd: 'publish', topic, payload: Buffer.from(record.payload.buffer, record.payload.byteOffset, record.payload.byteLength),
              qos, retain: false, dup: record.offset < cursor.dupBelow, brokerId: broker?.id ?? '', brokerCounter: counter, messageId: undefined,
              ...(properties === undefined ? {} : { properties }),
            }
            const key = brokerKey(packet.brokerId, counter)
            const delivery: Delivery = { key, cursor, offset: record.offset, drained: true, packet, messageId: undefined, delivered: false }
            state.byBroker.set(key, delivery)
            cursor.pending.push(record.offset)
            cursor.next = record.offset + 1
            state.unacked++
            state.unsent++
            yield packet
          }
        }
      }
      // Every record read is handed over: wait until aedes has sent them all (it reads ahead of the writes), then
      // check every cursor against the log's end and go live in the same synchronous step, or read on.
      while (state.unsent > 0 && current()) await state.wait()
      if (!current()) return
      if ([...state.cursors.values()].every((c) => c.next >= endOf(log, c))) {
        state.live = true
        return
      }
    }
  }

  /**
   * The lowest offset any session still needs in the partition: the cursors hold retention like consumer groups
   * (the log store asks, {@link LogStore.holdRetention}).
   */
  floor (stream: string, partition: number): number | undefined {
    const id = cursorId(stream, partition)
    let floor: number | undefined
    for (const state of this.#clients.values()) {
      const cursor = state.cursors.get(id)
      if (cursor !== undefined && (floor === undefined || cursor.committed < floor)) floor = cursor.committed
    }
    return floor
  }

  /** The client's cursors: per stream and partition, the next offset it has not acknowledged (the value kept on disk). */
  cursorsOf (clientId: string): Array<{ stream: string, partition: number, next: number }> {
    const state = this.#clients.get(clientId)
    if (state === undefined) return []
    return [...state.cursors.values()].map((c) => ({ stream: c.stream, partition: c.partition, next: c.committed }))
  }

  /** Per stream: sessions with a cursor into it, and the records they have not acknowledged (log end − cursor, summed). */
  lag (): Array<{ stream: string, sessions: number, lagMessages: number }> {
    const byStream = new Map<string, { sessions: Set<ClientCursors>, lagMessages: number }>()
    for (const state of this.#clients.values()) {
      for (const cursor of state.cursors.values()) {
        let s = byStream.get(cursor.stream)
        if (s === undefined) byStream.set(cursor.stream, s = { sessions: new Set(), lagMessages: 0 })
        s.sessions.add(state)
        s.lagMessages += Math.max(0, endOf(this.#deps.log, cursor) - cursor.committed)
      }
    }
    return [...byStream].map(([stream, s]) => ({ stream, sessions: s.sessions.size, lagMessages: s.lagMessages }))
  }

  /** Ends every read in progress (the persistence is being destroyed). */
  close (): void {
    for (const state of this.#clients.values()) state.reset(undefined)
    this.#clients.clear()
  }

  #client (clientId: string): ClientCursors {
    let state = this.#clients.get(clientId)
    if (state === undefined) {
      state = new ClientCursors()
      this.#clients.set(clientId, state)
    }
    return state
  }

  #advance (clientId: string, cursor: PartitionCursor): void {
    if (cursor.writing) { cursor.dirty = true; return }
    const target = cursor.target()
    if (target <= cursor.committed) return
    cursor.committed = target
    cursor.writing = true
    this.#deps.write([{ type: 'put', key: keys.cursor(clientId, cursor.stream, cursor.partition), value: u64(target) }]).catch((err: unknown) => {
      this.#deps.onWriteError?.(err)
    }).finally(() => {
      cursor.writing = false
      if (cursor.dirty && this.#clients.get(clientId)?.cursors.get(cursorId(cursor.stream, cursor.partition)) === cursor) {
        cursor.dirty = false
        this.#advance(clientId, cursor)
      }
    })
  }
}

function endOf (log: SessionLog, cursor: PartitionCursor): number {
  try {
    return log.partitionInfo(cursor.stream, cursor.partition).logEndOffset
  } catch {
    return 0 // the stream is gone: nothing to read
  }
}

function startOf (log: SessionLog, cursor: PartitionCursor): number {
  try {
    return log.partitionInfo(cursor.stream, cursor.partition).logStartOffset
  } catch {
    return 0
  }
}

function u64 (n: number): Buffer {
  const buf = Buffer.allocUnsafe(8)
  buf.writeBigUInt64BE(BigInt(n), 0)
  return buf
}
