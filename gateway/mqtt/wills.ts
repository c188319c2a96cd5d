/**
 * Wills across a gateway crash.
 *
 * aedes 1.2.0 fires a will when its client's connection closes without
 * DISCONNECT (lib/client.js, close()), through authorizePublish with that
 * client, so the tenant mount, the ACL and the log append apply. Wills
 * stored by a broker that died are left to a periodic sweep (aedes.js,
 * `_clearWills`): every 4 heartbeat intervals it fires the stored wills of
 * broker ids without a recent heartbeat, with a null client. For a gateway
 * that was killed this was wrong both ways: restarted with the same gateway
 * id (aedes' broker id) it counts the dead process as alive, by its own
 * heartbeat, and never fires them; with another id (the default host name
 * changes with every container) it fires them with no client, past the
 * tenant mount, the ACL and the log.
 *
 * This gateway is the only broker on its session key space, so every will
 * stored when it starts belongs to a client that was connected when the
 * previous process died. Each is fired once while the broker starts (inside
 * persistence.setup, before any listener accepts a connection) as a publish
 * of the client that set it; for that the will is stored with the client's
 * identity (tenant, role, user, client id) at CONNECT, and checked against
 * the config of this start (identityNow): a removed user's will is dropped.
 * The sweep is given no wills. A will that goes into the log is deleted in the
 * append's batch (the log store's `extraOps`, here and when aedes fires the
 * will of a connection that closed), so a kill at any moment logs it exactly
 * once; one that is refused or not logged is deleted after it fired, and a
 * kill in between delivers it again (at least once, as a QoS 1 message).
 *
 * A device that reconnects while its old connection is still open (half
 * open after a network change) takes its client id over: aedes stores the
 * new connection's will, then closes the old one, fires the old will and
 * deletes "the" stored will — the new one (aedes 1.2.0, lib/handlers/connect.js
 * storeWill before registerClient; lib/client.js close()). After a kill the
 * new connection's will was gone. A stored will is therefore deleted only for
 * the connection that stored it, or when that connection is closed. The aedes
 * patch stores a CONNECT's will at its turn to register, just before that
 * takeover (aedes.js _writeAtTurn): one whose connection closed before its
 * turn (cut short, the old connection still up) stores none and fires none,
 * so the stored will stays the old connection's. A CONNECT without a will that
 * continues the session of a connection whose will waits for a delay cancels
 * that will [MQTT-3.1.3-9]: the patch deletes it at the CONNECT's turn for the
 * connection that stored it (aedes.js _cancelsDelayedWillOf).
 *
 * An MQTT 5 will with a Will Delay Interval is published after that delay or
 * at its session's end, whichever comes first (3.1.3.2.2), and not at all if
 * its client reconnects in time [MQTT-3.1.3-9]. aedes times that in memory
 * (scheduleWill); a will stored by a process that died before the delay ran
 * out is timed here from when its session went offline (the persistence's
 * `E` mark; the start, for a client connected when the gateway died), so a
 * kill -9 neither loses it nor fires it early. Such a will waits in memory
 * (it stays stored) and is cancelled when its client connects again and
 * continues the session: the new connection's CONNECT replaces or deletes the
 * stored will. When its session ends first it fires then: at the session's
 * expiry (sessions/expiry.ts), or when aedes ends the session and deletes the
 * will with a bare { id }: a CONNECT with Session Expiry 0 cut short, or a
 * Clean Start 1 CONNECT at its turn (aedes.js _endsClosedSession, before that
 * CONNECT's own will write and its CONNACK); stored until it fired.
 */
import { Readable } from 'node:stream'
import type { Logger } from 'pino'
import { clientIdMatches, clientIdPattern, type ClientIdOwners, type Identity, type UserDirectory } from '../access/auth.ts'
import type { ExtraOperation } from '../../store/index.ts'
import type { SessionClient, SessionPacket } from './sessions/persistence.ts'
import { wrapWillStorage } from './aedes-internals.ts'

/** The field of a stored will that holds its client's identity. */
const IDENTITY = 'edgemqIdentity'

/** The part of the session persistence (sessions/persistence.ts) this module wraps (through aedes-internals.ts). */
export interface WillPersistence {
  setup (broker: never): Promise<void>
  putWill (client: SessionClient, packet: SessionPacket): Promise<void>
  delWill (client: SessionClient): Promise<unknown>
  willDeleteOps (client: SessionClient): ExtraOperation[]
  streamWill (brokers?: Readonly<Record<string, unknown>>): Readable
  /** When the client's persistent session went offline (ms), if it has one and it is offline. */
  offlineSince (clientId: string): number | undefined
  /** When the client's offline session ends, or null when it does not. */
  sessionEnd (clientId: string): { readonly at: number } | null
}

export interface WillOptions {
  readonly persistence: WillPersistence
  readonly logger: Logger
  /** The identity authenticate gave the client, stored with its will. */
  readonly identityOf: (client: SessionClient) => Identity | undefined
  /** The identity a stored will fires with under the config of this start, or why it is dropped ({@link identityNow}). */
  readonly recheck: (who: Identity) => Identity | string
  /** Publishes a stored will as its client would (mount, ACL, log, delivery); resolves once done or refused. */
  readonly fire: (will: SessionPacket, who: Identity) => Promise<void>
  /** ms since the epoch (default Date.now). */
  readonly now?: () => number
}

/** What {@link identityNow} reads of the config the gateway started with. */
export interface CurrentLogins {
  readonly users: UserDirectory
  readonly owners: ClientIdOwners
  /** Whether some listener accepts anonymous clients. */
  readonly anonymous: boolean
}

/**
 * A will stored by the previous process fires as a publish of its client under the config of this start: the
 * client could not connect as it did otherwise, so neither does its will. Its user must still exist, in the same
 * tenant (the will's topic was meant for that tenant), with its client id still bound to it; the role is the
 * user's role now, so a demoted user's will gets no rights it lost. Anonymous wills need a listener that still
 * accepts anonymous clients. Returns the identity to fire with, or why the will is dropped.
 */
export function identityNow (who: Identity, now: CurrentLogins): Identity | string {
  if (who.username === null) {
    if (!now.anonymous) return 'no listener accepts anonymous clients any more'
    if (now.owners.owned(who.tenant, who.clientId)) return 'its client id is bound to a user now'
    return who
  }
  const user = now.users.get(who.username)
  if (user === undefined) return `user ${JSON.stringify(who.username)} is no longer configured`
  if (user.tenant !== who.tenant) return `user ${JSON.stringify(who.username)} is in tenant ${JSON.stringify(user.tenant)} now`
  const pattern = clientIdPattern(user)
  if (pattern === null ? now.owners.owned(user.tenant, who.clientId) : !clientIdMatches(pattern, user.username, who.clientId)) {
    return `client id ${JSON.stringify(who.clientId)} is no longer bound to user ${JSON.stringify(who.username)}`
  }
  return { ...who, role: user.role }
}

function isIdentity (value: unknown): value is Identity {
  const v = value as Record<string, unknown> | null
  return typeof v === 'object' && v !== null && typeof v.tenant === 'string' && typeof v.role === 'string' &&
    (typeof v.username === 'string' || v.username === null) && typeof v.clientId === 'string'
}

/** Whether `client` is a connection (aedes' Client), not the bare { id, brokerId } aedes deletes a will with. */
function isConnection (client: SessionClient): boolean {
  return (client as { conn?: unknown }).conn !== undefined
}

/** A will's MQTT 5 Will Delay Interval (s); 0 for none (and for 3.1.1 wills, which carry no properties). */
export function willDelayOf (will: SessionPacket): number {
  const delay = (will.properties as { willDelayInterval?: unknown } | undefined)?.willDelayInterval
  return typeof delay === 'number' && Number.isFinite(delay) && delay > 0 ? delay : 0
}

/**
 * When a will stored by a previous process is due (ms): its delay after its session went offline, or the session's
 * end, whichever comes first (MQTT 5 3.1.3.2.2); now without a delay, or without a session (it ended with its
 * connection, so did the delay).
 */
export function willDueAt (will: SessionPacket, offlineSince: number | undefined, sessionEnd: number | null, now: number): number {
  const delay = willDelayOf(will)
  if (delay === 0 || offlineSince === undefined) return now
  const at = offlineSince + delay * 1000
  return sessionEnd === null ? at : Math.min(at, sessionEnd)
}

export interface Wills {
  /** Whether `client`'s will, as it fires, is the stored one (else another connection with its id stored its own since). */
  firesStoredWill (client: SessionClient): boolean
  /** Publishes the client's will now if one of a previous process is waiting for its delay (its session is ending). */
  firePending (clientId: string): Promise<void>
}

/** setTimeout's longest delay; longer waits are re-armed in steps. */
const MAX_TIMER_MS = 2 ** 31 - 1

export function installWills (options: WillOptions): Wills {
  const { persistence, logger } = options
  const now = options.now ?? Date.now
  /** The persistence's own streamWill, for the wills stored when the gateway starts. */
  let streamWill: WillPersistence['streamWill'] = () => Readable.from([])
  /** The connection whose will is stored, by client id (none for wills loaded at startup). */
  const owners = new Map<string, SessionClient>()
  const firesStoredWill = (client: SessionClient): boolean => {
    const owner = owners.get(client.id)
    return owner === undefined || owner === client || (owner as { closed?: boolean }).closed === true
  }
  /** Wills of a previous process waiting for their delay, by client id. */
  const pending = new Map<string, { timer: NodeJS.Timeout, fire: () => Promise<void> }>()
  let brokerClosed = (): boolean => false

  const cancel = (clientId: string): void => {
    const waiting = pending.get(clientId)
    if (waiting === undefined) return
    clearTimeout(waiting.timer)
    pending.delete(clientId)
    logger.info({ clientId: clientId.slice(clientId.indexOf('\u0000') + 1) },
      'delayed will of a client connected when the gateway stopped: cancelled, the client is back')
  }
  const firePending = async (clientId: string): Promise<void> => {
    const waiting = pending.get(clientId)
    if (waiting === undefined) return
    clearTimeout(waiting.timer)
    pending.delete(clientId)
    await waiting.fire()
  }
  const wait = (clientId: string, at: number, fire: () => Promise<void>): void => {
    const delay = Math.max(0, at - now())
    const timer = setTimeout(() => {
      if (brokerClosed()) return
      if (delay > MAX_TIMER_MS) { wait(clientId, at, fire); return }
      pending.delete(clientId)
      fire().catch((err: unknown) => {
        logger.error({ clientId, err: (err as Error).message }, 'a delayed will could not be published; it fires at the next start')
      })
    }, Math.min(delay, MAX_TIMER_MS))
    timer.unref()
    pending.set(clientId, { timer, fire })
  }

  /** Fires (or drops) a will stored by a previous process, then deletes it. */
  const fireStored = async (clientId: string, packet: SessionPacket, current: Identity | string | null): Promise<void> => {
    const fields = { clientId, topic: packet.topic }
    if (typeof current === 'string') {
      logger.warn({ ...fields, reason: current }, `will of a client connected when the gateway stopped: dropped, ${current}`)
    } else if (current !== null) {
      await options.fire(packet, current)
      logger.info({ clientId: current.clientId, tenant: current.tenant, topic: packet.topic }, 'will of a client connected when the gateway stopped: fired')
    } else {
      // Stored before wills carried an identity: without one it cannot pass the tenant mount and ACL.
      logger.warn(fields, 'will of a client connected when the gateway stopped: dropped, it was stored without the client\'s identity')
    }
    await persistence.delWill({ id: clientId })
  }

  wrapWillStorage(persistence, {
    // Stored with the identity; the client's own will object stays as aedes set it.
    putWill: (putWill) => async (client, packet) => {
      owners.set(client.id, client)
      await putWill(client, { ...packet, [IDENTITY]: options.identityOf(client) ?? null })
    },
    // aedes deletes with a plain { id, brokerId } after a closed connection's will fired: not the will of an open successor.
    delWill: (delWill) => async (client) => {
      if (!firesStoredWill(client)) return undefined
      // Also when a session ends (aedes.js _endSessionWill; a connection, at its CONNECT's turn, passes itself): a will of
      // a previous process waiting for its delay is due then (3.1.3.2.2). It fires now and its firing deletes it;
      // deleted here, only its timer had it, and a kill -9 before that lost it.
      if (pending.has(client.id) && !isConnection(client)) {
        await firePending(client.id).catch((err: unknown) => {
          logger.error({ clientId: client.id, err: (err as Error).message }, 'a delayed will could not be published; it fires at the next start')
        })
        return undefined
      }
      owners.delete(client.id)
      return await delWill(client)
    },
    // aedes checks that setup is a native async function (aedes.js, listen()).
    setup: (setup) => async function setupAndFireWills (broker: never): Promise<void> {
      await setup(broker)
      const events = broker as unknown as NodeJS.EventEmitter & { closed?: boolean }
      brokerClosed = () => events.closed === true
      // A registered connection continues the session; one that started a new session (Clean Start 1) had aedes end the
      // old one at its turn, before this, so its will fired then (the bare delete below).
      events.on('client', (client: SessionClient) => { cancel(client.id) })
      for await (const will of streamWill({}) as AsyncIterable<SessionPacket>) {
        const clientId = String(will.clientId)
        const { [IDENTITY]: who, ...packet } = will
        const current = isIdentity(who) ? options.recheck(who) : null
        const at = willDueAt(packet, persistence.offlineSince(clientId), persistence.sessionEnd(clientId)?.at ?? null, now())
        if (at <= now() || typeof current !== 'object' || current === null) {
          await fireStored(clientId, packet, current)
          continue
        }
        wait(clientId, at, () => fireStored(clientId, packet, current))
        logger.info({ clientId: current.clientId, tenant: current.tenant, topic: packet.topic, inMs: at - now() },
          'will of a client connected when the gateway stopped: waiting for its will delay')
      }
    },
    // Every will not of a connected client was fired (or is timed) at startup: aedes' sweep has nothing to do.
    streamWill: (original) => {
      streamWill = original
      return () => Readable.from([])
    },
  })
  return { firesStoredWill, firePending }
}
