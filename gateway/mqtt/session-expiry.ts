/**
 * MQTT 5 session expiry that survives a restart and kill -9.
 *
 * aedes 2 ends a session whose connection closed once its Session Expiry
 * Interval has passed, with a timer in memory (`scheduleSessionExpiry`,
 * aedes.js): a restart loses the timer, and the session was kept forever.
 * This module stores each such session's interval while its client is
 * connected and its deadline once the connection ended; at startup it ends
 * the sessions whose deadline has passed and arms a timer for the others.
 * aedes' own timer still runs while the process lives.
 *
 * Key layout (the `session-expiry` sublevel of the data directory's
 * database): key = the session's client id as aedes keys sessions (scoped
 * `<tenant>U+0000<id>` outside tenant "default"), UTF-8; value = 9 bytes, a
 * kind and an 8-byte big-endian unsigned integer: kind 0 = the deadline (ms
 * since the epoch) of a session whose connection ended; kind 1 = the
 * interval (s) of a connected client. Writes go through the log store's
 * group commit (LogStore.write), so they share its fsyncs.
 *
 * Invariants: a session without an entry never expires here (3.1.1
 * persistent sessions, MQTT 5 with 0 or 0xFFFFFFFF). A kind 1 entry found at
 * startup is a connection the gateway's death ended: its deadline counts from
 * the start (the crash was no later), and is stored as kind 0 then. Ending a
 * session is idempotent, so an entry left by a kill between the end and the
 * delete is ended again at the next start.
 */
import type { Aedes, Client } from 'aedes'
import type { Readable } from 'node:stream'
import type { ExtraOperation, ExtraSublevel, LevelDatabase } from '../../store/index.ts'
import { connectedClient, standInClient } from './aedes-internals.ts'
import { isMqtt5 } from './reason-codes.ts'

/** MQTT 5 3.1.2.11.2: 0xFFFFFFFF means the session does not expire. */
const NEVER = 0xffffffff
const DEADLINE = 0
const CONNECTED = 1
/** setTimeout's longest delay; longer deadlines are re-armed in steps. */
const MAX_TIMER_MS = 2 ** 31 - 1

/** The session persistence methods (aedes' persistence interface) that end a session. */
export interface ExpiringPersistence {
  cleanSubscriptions (client: Client): Promise<void>
  delWill (client: { id: string, brokerId: string }): Promise<unknown>
  cleanIncoming (client: Client): Promise<void>
  outgoingStream (client: Client): Readable
  outgoingClearMessageId (client: Client, packet: { cmd?: string, messageId?: number }): Promise<unknown>
}

export interface SessionExpiryDeps {
  /** The `session-expiry` sublevel (buffer keys and values). */
  readonly db: LevelDatabase
  readonly writer: { write (ops: readonly ExtraOperation[]): Promise<void> }
  readonly persistence: ExpiringPersistence
  readonly broker: Aedes
  /** ms since the epoch. */
  readonly now: () => number
  readonly logger: { info (fields: Record<string, unknown>, message: string): void, warn (fields: Record<string, unknown>, message: string): void }
}

export class SessionExpiry {
  readonly #deps: SessionExpiryDeps
  /** Client ids with a stored deadline (so a reconnect deletes only what exists). */
  readonly #stored = new Set<string>()
  readonly #timers = new Map<string, NodeJS.Timeout>()
  #stopped = false

  constructor (deps: SessionExpiryDeps) {
    this.#deps = deps
  }

  /**
   * Ends the sessions whose deadline passed while the gateway was down, arms timers for the others and starts
   * recording deadlines. Call after `broker.listen()` and before the listeners accept connections.
   */
  async start (): Promise<void> {
    const { db, broker, now, logger } = this.#deps
    const due: string[] = []
    const crashed: ExtraOperation[] = []
    const startedAt = now()
    for await (const [key, value] of db.iterator() as AsyncIterable<[Buffer, Buffer]>) {
      const id = key.toString('utf8')
      const n = Number(value.readBigUInt64BE(1))
      const deadline = value[0] === CONNECTED ? startedAt + n * 1000 : n
      if (value[0] === CONNECTED) crashed.push(this.#put(id, DEADLINE, deadline))
      this.#stored.add(id)
      if (deadline <= startedAt) due.push(id)
      else this.#arm(id, deadline)
    }
    if (crashed.length > 0) await this.#deps.writer.write(crashed)
    for (const id of due) await this.#end(id)
    if (due.length > 0 || this.#timers.size > 0) logger.info({ ended: due.length, pending: this.#timers.size }, 'MQTT 5 session expiry restored')
    const events = broker as unknown as NodeJS.EventEmitter
    events.on('clientDisconnect', (client: Client) => { this.#disconnected(client) })
    events.on('client', (client: Client) => { this.#connected(client) })
  }

  /** Clears the timers (the gateway is stopping; the deadlines stay stored). */
  stop (): void {
    this.#stopped = true
    for (const timer of this.#timers.values()) clearTimeout(timer)
    this.#timers.clear()
  }

  #disconnected (client: Client): void {
    if (this.#stopped) return
    const successor = connectedClient(this.#deps.broker, client.id)
    if (successor !== undefined && successor !== client) return // the successor connection owns the session now
    const interval = expiringInterval(client)
    if (interval === null) {
      // 0: aedes ended the session (also a DISCONNECT that set 0); NEVER or 3.1.1: it does not end.
      if (this.#stored.delete(client.id)) this.#write([this.#del(client.id)])
      return
    }
    const deadline = this.#deps.now() + interval * 1000
    this.#stored.add(client.id)
    this.#arm(client.id, deadline)
    this.#write([this.#put(client.id, DEADLINE, deadline)])
  }

  #connected (client: Client): void {
    const timer = this.#timers.get(client.id)
    if (timer !== undefined) { clearTimeout(timer); this.#timers.delete(client.id) }
    const interval = expiringInterval(client)
    if (interval !== null) {
      this.#stored.add(client.id)
      this.#write([this.#put(client.id, CONNECTED, interval)])
    } else if (this.#stored.delete(client.id)) {
      this.#write([this.#del(client.id)])
    }
  }

  #put (id: string, kind: number, n: number): ExtraOperation {
    const value = Buffer.alloc(9)
    value[0] = kind
    value.writeBigUInt64BE(BigInt(n), 1)
    return { type: 'put', sublevel: this.#sublevel(), key: Buffer.from(id, 'utf8'), value }
  }

  #del (id: string): ExtraOperation {
    return { type: 'del', sublevel: this.#sublevel(), key: Buffer.from(id, 'utf8') }
  }

  #arm (id: string, deadline: number): void {
    const previous = this.#timers.get(id)
    if (previous !== undefined) clearTimeout(previous)
    const delay = Math.max(0, deadline - this.#deps.now())
    const timer = setTimeout(() => {
      this.#timers.delete(id)
      if (delay > MAX_TIMER_MS) return this.#arm(id, deadline)
      void this.#end(id)
    }, Math.min(delay, MAX_TIMER_MS))
    timer.unref()
    this.#timers.set(id, timer)
  }

  /** Ends the session (as aedes' own expiry does: subscriptions, will, inbound QoS 2, queue), then its entry. */
  async #end (id: string): Promise<void> {
    const { broker, persistence, logger } = this.#deps
    if (this.#stopped || connectedClient(broker, id) !== undefined || !this.#stored.has(id)) return
    const client = standInClient(id)
    try {
      await persistence.cleanSubscriptions(client)
      await persistence.delWill({ id, brokerId: broker.id })
      await persistence.cleanIncoming(client)
      for await (const packet of persistence.outgoingStream(client)) {
        await persistence.outgoingClearMessageId(client, packet as { cmd?: string, messageId?: number })
      }
      if (connectedClient(broker, id) !== undefined || !this.#stored.delete(id)) return
      await this.#deps.writer.write([this.#del(id)])
      logger.info({ clientId: id.slice(id.indexOf('\u0000') + 1) }, 'MQTT 5 session expired')
    } catch (err) {
      logger.warn({ clientId: id, err: (err as Error).message }, 'ending an expired MQTT 5 session failed; retried at the next start')
    }
  }

  #write (ops: ExtraOperation[]): void {
    this.#deps.writer.write(ops).catch((err: unknown) => {
      this.#deps.logger.warn({ err: (err as Error).message }, 'storing an MQTT 5 session expiry deadline failed')
    })
  }

  #sublevel (): ExtraSublevel {
    return this.#deps.db as unknown as ExtraSublevel
  }
}

/** The session expiry interval (s) of an MQTT 5 client whose session outlives its connection for a while; else null. */
function expiringInterval (client: Client): number | null {
  if (!isMqtt5(client)) return null
  const interval = (client as Client & { sessionExpiryInterval?: number }).sessionExpiryInterval ?? 0
  return interval > 0 && interval < NEVER ? interval : null
}
