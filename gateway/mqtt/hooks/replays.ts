/**
 * The aedes side of `$replay` subscriptions (replay.ts does the replaying):
 * a replay writes to the client's connection with packet ids from the
 * client's own counter, starts once aedes has written the SUBACK (the
 * `subscribe` event follows it), stops on UNSUBSCRIBE, and is paced by
 * PUBACKs that never reach the session store.
 */
import type { Client } from 'aedes'
import type { Identity } from '../../access/auth.ts'
import { claimPubacksOf, nextPacketId, rawConnection, releaseHeldPacketIds, skipHeldPacketIds } from '../aedes-internals.ts'
import { isMqtt5 } from '../reason-codes.ts'
import { receiveMaximumOf } from '../receive-maximum.ts'
import type { ReplayConnection } from '../replay.ts'
import type { HookContext } from './context.ts'

/** The client as a replay sees it, made once per client. */
export function replayConnection (ctx: Pick<HookContext, 'replayConnections'>, client: Client, who: Identity): ReplayConnection {
  let conn = ctx.replayConnections.get(client)
  if (conn === undefined) {
    conn = {
      stream: rawConnection(client),
      get closed () { return client.closed },
      clientId: who.clientId,
      mqtt5: isMqtt5(client),
      receiveMaximum: receiveMaximumOf(client),
      // aedes' own counter, so replay and live deliveries do not pick the same ids.
      nextMessageId: () => nextPacketId(client),
      holdIds: (holder, held) => { skipHeldPacketIds(client, holder, held) },
      releaseIds: (holder) => { releaseHeldPacketIds(client, holder) },
    }
    ctx.replayConnections.set(client, conn)
  }
  return conn
}

export function installReplayHooks (ctx: HookContext): void {
  const { broker, replays, replayConnections, tickets } = ctx
  // A PUBACK that answers a replay message paces that replay; the session store never saw the message.
  claimPubacksOf(ctx.persistence, (client, messageId) => {
    const conn = replayConnections.get(client)
    return conn !== undefined && replays.acked(conn, messageId)
  })
  // The SUBACK is written before this event: a replay's first PUBLISH follows it.
  broker.on('subscribe', (subs, client) => {
    for (const sub of subs) {
      const ticket = tickets.get(sub)
      const conn = replayConnections.get(client)
      if (ticket === undefined || conn === undefined) continue
      tickets.delete(sub)
      replays.start(conn, ticket, sub.topic, sub.qos)
    }
  })
  broker.on('unsubscribe', (topics, client) => {
    const conn = replayConnections.get(client)
    if (conn !== undefined) replays.stop(conn, topics)
  })
}
