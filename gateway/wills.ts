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
 * identity (tenant, role, user, client id) at CONNECT. The sweep is given no
 * wills. A will that goes into the log is deleted in the append's batch
 * (the log store's `extraOps`, here and when aedes fires the will of a
 * connection that closed), so a kill at any moment logs it exactly once; one
 * that is refused or not logged is deleted after it fired, and a kill in
 * between delivers it again (at least once, as a QoS 1 message).
 *
 * A device that reconnects while its old connection is still open (half
 * open after a network change) takes its client id over: aedes stores the
 * new connection's will, then closes the old one, fires the old will and
 * deletes "the" stored will — the new one (aedes 1.2.0, lib/handlers/connect.js
 * storeWill before registerClient; lib/client.js close()). After a kill the
 * new connection's will was gone. A stored will is therefore deleted only for
 * the connection that stored it, or when that connection is closed.
 */
import { Readable } from 'node:stream'
import type { Logger } from 'pino'
import type { Identity } from './auth.ts'
import type { ExtraOperation } from '../store/index.ts'
import type { SessionClient, SessionPacket } from './session-persistence.ts'

/** The field of a stored will that holds its client's identity. */
const IDENTITY = 'edgemqIdentity'

/** The part of the session persistence (session-persistence.ts) this module wraps. */
export interface WillPersistence {
  setup (broker: never): Promise<void>
  putWill (client: SessionClient, packet: SessionPacket): Promise<void>
  delWill (client: SessionClient): Promise<unknown>
  willDeleteOps (client: SessionClient): ExtraOperation[]
  streamWill (brokers?: Readonly<Record<string, unknown>>): Readable
}

export interface WillOptions {
  readonly persistence: WillPersistence
  readonly logger: Logger
  /** The identity authenticate gave the client, stored with its will. */
  readonly identityOf: (client: SessionClient) => Identity | undefined
  /** Publishes a stored will as its client would (mount, ACL, log, delivery); resolves once done or refused. */
  readonly fire: (will: SessionPacket, who: Identity) => Promise<void>
}

function isIdentity (value: unknown): value is Identity {
  const v = value as Record<string, unknown> | null
  return typeof v === 'object' && v !== null && typeof v.tenant === 'string' && typeof v.role === 'string' &&
    (typeof v.username === 'string' || v.username === null) && typeof v.clientId === 'string'
}

export interface Wills {
  /** Whether `client`'s will, as it fires, is the stored one (else another connection with its id stored its own since). */
  firesStoredWill (client: SessionClient): boolean
}

export function installWills (options: WillOptions): Wills {
  const { persistence, logger } = options
  const setup = persistence.setup.bind(persistence)
  const putWill = persistence.putWill.bind(persistence)
  const delWill = persistence.delWill.bind(persistence)
  const streamWill = persistence.streamWill.bind(persistence)
  /** The connection whose will is stored, by client id (none for wills loaded at startup). */
  const owners = new Map<string, SessionClient>()
  const firesStoredWill = (client: SessionClient): boolean => {
    const owner = owners.get(client.id)
    return owner === undefined || owner === client || (owner as { closed?: boolean }).closed === true
  }

  // Stored with the identity; the client's own will object stays as aedes set it.
  persistence.putWill = async (client, packet) => {
    owners.set(client.id, client)
    await putWill(client, { ...packet, [IDENTITY]: options.identityOf(client) ?? null })
  }
  // aedes deletes with a plain { id, brokerId } after a closed connection's will fired: not the will of an open successor.
  persistence.delWill = async (client) => {
    if (!firesStoredWill(client)) return undefined
    owners.delete(client.id)
    return await delWill(client)
  }

  // aedes checks that setup is a native async function (aedes.js, listen()).
  persistence.setup = async function setupAndFireWills (broker: never): Promise<void> {
    await setup(broker)
    for await (const will of streamWill({}) as AsyncIterable<SessionPacket>) {
      const clientId = String(will.clientId)
      const { [IDENTITY]: who, ...packet } = will
      if (isIdentity(who)) {
        await options.fire(packet, who)
        logger.info({ clientId: who.clientId, tenant: who.tenant, topic: packet.topic }, 'will of a client connected when the gateway stopped: fired')
      } else {
        // Stored before wills carried an identity: without one it cannot pass the tenant mount and ACL.
        logger.warn({ clientId, topic: packet.topic }, 'will of a client connected when the gateway stopped: dropped, it was stored without the client\'s identity')
      }
      await persistence.delWill({ id: clientId })
    }
  }

  // Every will not of a connected client was fired at startup: aedes' sweep has nothing to do.
  persistence.streamWill = () => Readable.from([])
  return { firesStoredWill }
}
