/**
 * Session expiry: the one mechanism that ends a persistent session for being
 * offline too long, whichever bound ends it — an MQTT 5 client's Session
 * Expiry Interval or the gateway-wide `mqtt.sessionExpirySeconds` (both are
 * read by the session persistence's `sessionEnd`: the shorter, counted from
 * when the session went offline).
 *
 * What is stored is the persistence's (format.ts): the `E` mark of
 * when a session went offline and the interval in its `C` entry, written
 * with the log's group commit. So this survives kill -9: at start (before any
 * listener accepts a connection) every session whose end passed while the
 * gateway was down is dropped; a session that was connected when the gateway
 * died counts as offline from the start (the persistence marks it so when it
 * loads). Then one timer per offline session ends it on time, unless its
 * client comes back. Every end is the persistence's `dropSession` (also the
 * release of its cursors' hold on retention), counted and logged.
 *
 * aedes 2 times MQTT 5 session expiry itself, in memory; it is kept from doing
 * so for the sessions this module ends (aedes-internals.ts,
 * ownSessionExpiry). Sessions that end with their connection (interval 0)
 * stay aedes'. A will still pending when its session ends is published first
 * (MQTT 5 3.1.3.2.2: at the will delay or the session's end, whichever comes
 * first; wills.ts keeps the delayed wills of a previous process).
 *
 * Not run on a standby: its readers' sessions live in memory, and the
 * replicated marks are the primary's, for after a promotion.
 *
 * Gateways before this kept MQTT 5 deadlines in a `session-expiry` sublevel of
 * their own (key: the scoped client id, utf8; value: a kind byte, 0 = the
 * deadline in ms of a session gone offline, 1 = the interval in s of a client
 * connected, then a u64). At start each entry becomes its session's interval
 * (a deadline counted back from the session's offline mark) and is deleted,
 * in one batch after the intervals are written: a kill in between reads them
 * again.
 */
import type { Aedes, Client } from 'aedes'
import type { ExtraOperation, ExtraSublevel, LevelDatabase } from '../../../store/index.ts'
import { connectedClient, ownSessionExpiry } from '../aedes-internals.ts'
import { isMqtt5 } from '../reason-codes.ts'
import type { SessionEnd } from './persistence.ts'

/** setTimeout's longest delay; longer deadlines are re-armed in steps. */
const MAX_TIMER_MS = 2 ** 31 - 1

/** The session persistence methods (persistence.ts) this module uses. */
export interface ExpiringSessions {
  offlineSessions (): string[]
  sessionEnd (clientId: string): SessionEnd | null
  expireSession (clientId: string): Promise<SessionEnd | null>
  expireSessions (): Promise<Array<SessionEnd & { clientId: string }>>
  offlineSince (clientId: string): number | undefined
  adoptInterval (clientId: string, seconds: number): Promise<boolean>
  /** Tells of each session that went offline, also when aedes emitted no `clientDisconnect` for its last connection. */
  onOffline? (listener: (clientId: string) => void): void
}

/** The `session-expiry` sublevel of gateways before this one, and the writer that deletes its entries (see the header). */
export interface LegacyDeadlines {
  readonly db: LevelDatabase
  readonly writer: { write (ops: readonly ExtraOperation[]): Promise<void> }
}

export interface SessionExpiryDeps {
  readonly persistence: ExpiringSessions
  readonly broker: Aedes
  /** Publishes the client's will if one of a previous process is still waiting for its delay (wills.ts). */
  readonly firePendingWill?: (clientId: string) => Promise<void>
  /** ms since the epoch. */
  readonly now: () => number
  /** Told of every session ended (edgemq_mqtt_sessions_expired_total). */
  readonly onExpired: (end: SessionEnd & { clientId: string }) => void
  readonly logger: { info (fields: Record<string, unknown>, message: string): void, warn (fields: Record<string, unknown>, message: string): void }
  readonly legacy?: LegacyDeadlines
}

export class SessionExpiry {
  readonly #deps: SessionExpiryDeps
  readonly #timers = new Map<string, NodeJS.Timeout>()
  #stopped = false
  #restore: (() => void) | undefined

  constructor (deps: SessionExpiryDeps) {
    this.#deps = deps
  }

  /**
   * Ends the sessions whose end passed while the gateway was down, arms timers for the others and follows clients
   * going and coming. Call after `broker.listen()` and before the listeners accept connections.
   */
  async start (): Promise<void> {
    const { persistence, broker, logger } = this.#deps
    // aedes' own timer for the sessions ended here (an MQTT 5 interval above 0; with 0 aedes ends the session at once).
    this.#restore = ownSessionExpiry(broker, (client) => isMqtt5(client) && (client as Client & { sessionExpiryInterval?: number }).sessionExpiryInterval !== 0)
    if (this.#deps.legacy !== undefined) await this.#adoptLegacy(this.#deps.legacy)
    const ended = await persistence.expireSessions()
    for (const end of ended) this.#report(end)
    for (const id of persistence.offlineSessions()) this.#arm(id)
    if (ended.length > 0 || this.#timers.size > 0) logger.info({ ended: ended.length, pending: this.#timers.size }, 'session expiry restored')
    const events = broker as unknown as NodeJS.EventEmitter
    // Registered after the persistence's own listeners (setup, in listen()): it has marked the session offline by then.
    events.on('clientDisconnect', (client: Client) => { if (!this.#stopped) this.#arm(client.id) })
    persistence.onOffline?.((id) => { if (!this.#stopped) this.#arm(id) })
    // Unpatched aedes emitted `client` also for a connection that closed during its CONNECT, with no `clientDisconnect`
    // after it (the aedes patch stops that; persistence.ts #connected): then the session is offline, its end armed.
    events.on('client', (client: Client) => {
      if (!client.closed) this.#cancel(client.id)
      else if (!this.#stopped) this.#arm(client.id)
    })
  }

  /** Moves the deadlines of the former `session-expiry` sublevel into the sessions (see the header). */
  async #adoptLegacy ({ db, writer }: LegacyDeadlines): Promise<void> {
    const { persistence, now, logger } = this.#deps
    const done: ExtraOperation[] = []
    let adopted = 0
    for await (const [key, value] of db.iterator() as AsyncIterable<[Buffer, Buffer]>) {
      done.push({ type: 'del', sublevel: db as unknown as ExtraSublevel, key })
      if (value.length !== 9) continue
      const id = key.toString('utf8')
      const n = Number(value.readBigUInt64BE(1))
      const seconds = value[0] === 1 ? n : Math.max(0, Math.ceil((n - (persistence.offlineSince(id) ?? now())) / 1000))
      if (await persistence.adoptInterval(id, seconds)) adopted++
    }
    if (done.length === 0) return
    await writer.write(done)
    logger.info({ adopted, entries: done.length }, 'session expiry deadlines of the former session-expiry key space moved into the sessions')
  }

  /** Clears the timers (the gateway is stopping; what they time is stored). */
  stop (): void {
    this.#stopped = true
    for (const timer of this.#timers.values()) clearTimeout(timer)
    this.#timers.clear()
    this.#restore?.()
  }

  #cancel (id: string): void {
    const timer = this.#timers.get(id)
    if (timer !== undefined) { clearTimeout(timer); this.#timers.delete(id) }
  }

  /** (Re)arms the timer of the session's end, or clears it when the session does not end (connected, gone, no bound). */
  #arm (id: string): void {
    this.#cancel(id)
    const end = this.#deps.persistence.sessionEnd(id)
    if (end === null) return
    const delay = Math.max(0, end.at - this.#deps.now())
    const timer = setTimeout(() => {
      this.#timers.delete(id)
      if (delay > MAX_TIMER_MS) return this.#arm(id)
      void this.#expire(id)
    }, Math.min(delay, MAX_TIMER_MS))
    timer.unref()
    this.#timers.set(id, timer)
  }

  async #expire (id: string): Promise<void> {
    const { broker, persistence, logger } = this.#deps
    // A closed connection may stay registered in aedes (a `client` event after its close): it holds nothing.
    if (this.#stopped || connectedClient(broker, id)?.closed === false) return
    try {
      await this.#deps.firePendingWill?.(id)
      const end = await persistence.expireSession(id)
      // A timer may fire a millisecond before the clock reaches its end: then it is armed again for the rest.
      if (end !== null) this.#report({ clientId: id, ...end })
      else if (!this.#stopped) this.#arm(id)
    } catch (err) {
      logger.warn({ ...who(id), err: (err as Error).message }, 'ending an expired session failed; retried at the next start')
    }
  }

  #report (end: SessionEnd & { clientId: string }): void {
    this.#deps.onExpired(end)
    const bound = end.source === 'interval' ? 'Session Expiry Interval' : 'mqtt.sessionExpirySeconds'
    this.#deps.logger.info({ ...who(end.clientId), offlineSeconds: end.seconds, bound }, 'persistent session expired')
  }
}

/** The tenant and client id of aedes' (scoped) client id, `<tenant>U+0000<id>` outside tenant "default". */
function who (id: string): { tenant: string, clientId: string } {
  const nul = id.indexOf('\u0000')
  return nul === -1 ? { tenant: 'default', clientId: id } : { tenant: id.slice(0, nul), clientId: id.slice(nul + 1) }
}
