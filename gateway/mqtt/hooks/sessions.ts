/**
 * What aedes stores of a persistent session, and what CONNACK says of it.
 *
 * Only the subscriptions authorizeSubscribe accepted (mounted) are stored,
 * each once; never a refused or a $replay one. [MQTT-3.2.2-2] CONNACK
 * says a session is present when any session state is stored (subscriptions,
 * queued, unacknowledged or inbound QoS 2 messages, or a session with nothing
 * in it [MQTT-3.1.2-4]); aedes decides from the stored subscriptions alone,
 * so a marker subscription makes that list non-empty, and authorizeSubscribe
 * refuses it silently (restored subscriptions get no SUBACK). aedes asks for
 * the stored subscriptions only on a CONNECT with clean = false, before the
 * CONNACK: the session is recorded there, so it exists for the next CONNECT
 * even after a kill -9 (an MQTT 5 Clean Start = 1 with a Session Expiry
 * Interval is recorded by the persistence's cleanSubscriptions, also before
 * the CONNACK). The patches themselves are in aedes-internals.ts.
 *
 * A connected persistent session's cursors deliver records from the log by
 * writing to the client's connection (sessions/cursors.ts), as `$replay` and
 * shares do: with packet ids of the client's counter, up to the Receive
 * Maximum its CONNECT gave, on the topic and with the read ACL that
 * authorizeForward applies to live deliveries.
 */
import type { Client, Subscription } from 'aedes'
import { overrideRestoredSubscriptions, rawConnection, refreshKeepalive, storeAcceptedSubscriptions } from '../aedes-internals.ts'
import { ConnectionGuard } from '../connection-guard.ts'
import { receiveMaximumOf } from '../receive-maximum.ts'
import type { CursorConnection } from '../sessions/cursors.ts'
import { forwardedTopic } from './authorize-forward.ts'
import type { HookContext } from './context.ts'
import { replayConnection } from './replays.ts'

const SESSION_MARKER = '$edgemq/session-present'

export function installSessionHooks (ctx: Pick<HookContext, 'persistence' | 'toStore' | 'sessionMarkers'>): void {
  const { persistence } = ctx
  storeAcceptedSubscriptions<Subscription>(persistence, (client) => {
    const accepted = ctx.toStore.get(client)
    ctx.toStore.delete(client)
    return accepted
  })
  overrideRestoredSubscriptions(persistence, async (subs, client) => {
    const present = subs.length > 0 || persistence.hasSessionState(client)
    await persistence.markSession(client)
    if (subs.length > 0 || !present) return subs
    const marker = { topic: SESSION_MARKER, qos: 0 }
    ctx.sessionMarkers.add(marker)
    return [marker]
  })
}

/** Lets persistent sessions' cursors write to their client's connection. */
export function installCursorDelivery (ctx: HookContext): void {
  ctx.persistence.deliverCursorsThrough((session): CursorConnection | undefined => {
    const client = session as Client // the persistence is called by aedes, with aedes' clients
    const who = ctx.identities.get(client)
    if (who === undefined || client.closed) return undefined
    return {
      conn: replayConnection(ctx, client, who),
      receiveMaximum: receiveMaximumOf(client),
      ...(typeof client.maximumPacketSize === 'number' ? { maximumPacketSize: client.maximumPacketSize } : {}),
      deliveredTopic: (mountedTopic) => forwardedTopic(ctx, client, who, mountedTopic),
      takePubacks: (taker) => {
        const guard = rawConnection(client)
        if (!(guard instanceof ConnectionGuard)) return
        guard.pubacks = { take: taker.take, taken: () => { refreshKeepalive(client); taker.taken() } }
      },
      flush: () => {
        const guard = rawConnection(client)
        if (guard instanceof ConnectionGuard) guard.flushWrites()
      },
    }
  })
}
