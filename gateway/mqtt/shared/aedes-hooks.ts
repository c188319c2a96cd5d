/**
 * The aedes side of shared subscriptions (share-groups.ts does the sharing),
 * for MQTT 3.1.1 and MQTT 5 clients alike (aedes' `sharedSubscriptions`
 * option, patches/aedes+2.0.0-beta.1.patch). authorizeSubscribe checks a
 * `$share/<group>/<filter>` subscription and hands it here (`accepted`);
 * aedes stores it mounted (`<tenant>/$share/<group>/<filter>`), as any
 * subscription, so a persistent session restores it. A client joins the share once aedes has written the
 * SUBACK (the `subscribe` event follows it), or, for a subscription restored
 * with a persistent session, once the CONNACK is out (aedes restores before
 * it and emits no `subscribe` event then). It leaves on UNSUBSCRIBE and when
 * its connection closes. PUBACKs of the share's records never reach the
 * session store (claimPubacksOf, as replays do).
 *
 * aedes' own literal subscription to `<tenant>/$share/...` matches nothing:
 * publishing to a `$share` topic is refused (authorize-publish.ts).
 */
import type { Client, Subscription } from 'aedes'
import type { Identity } from '../../access/auth.ts'
import { unmountTopic } from '../../access/topics.ts'
import { claimPubacksOf } from '../aedes-internals.ts'
import type { HookContext } from '../hooks/context.ts'
import { replayConnection } from '../hooks/replays.ts'
import type { SharedSubscriptions } from './share-groups.ts'
import { isShareTopic, parseShareSubscription, shareGroupId, type ShareRequest } from './share-topic.ts'

/** `subscriptionId`: the MQTT 5 Subscription Identifier of the member's SUBSCRIBE (kept with a persistent session's subscription). */
interface ShareTicket { readonly who: Identity, readonly request: ShareRequest, readonly subscriptionId: number | undefined }

/** What authorizeSubscribe tells the shares. */
export interface ShareAdmission {
  /**
   * A `$share` subscription passed the checks; `restoring`: aedes restores it from a persistent session, before the
   * CONNACK. Resolves (never rejects) once the share's start offsets are written: the SUBACK (CONNACK) waits for it.
   * Throws GW_SHARE_LIMIT when it would be a share too many (share-groups.ts prepare).
   */
  accepted (client: Client, sub: Subscription, who: Identity, request: ShareRequest, restoring: boolean): Promise<void>
}

/** The share hooks of one broker: made before the hook context (which hands authorizeSubscribe to it), installed after. */
export class ShareHooks implements ShareAdmission {
  readonly #shares: SharedSubscriptions
  readonly #tickets = new WeakMap<Subscription, ShareTicket>()
  readonly #restored = new WeakMap<Client, Array<{ ticket: ShareTicket, qos: number }>>()

  constructor (shares: SharedSubscriptions) {
    this.#shares = shares
  }

  accepted (client: Client, sub: Subscription, who: Identity, request: ShareRequest, restoring: boolean): Promise<void> {
    const opened = this.#shares.prepare(who.tenant, request)
    // aedes puts the SUBSCRIBE's identifier on each of its subscriptions, and restores it with them.
    const ticket = { who, request, subscriptionId: (sub as Subscription & { subscriptionIdentifier?: number }).subscriptionIdentifier }
    if (!restoring) { this.#tickets.set(sub, ticket); return opened }
    let waiting = this.#restored.get(client)
    if (waiting === undefined) this.#restored.set(client, waiting = [])
    waiting.push({ ticket, qos: sub.qos })
    return opened
  }

  install (ctx: HookContext): void {
    const { broker, logger } = ctx
    const shares = this.#shares
    const join = (client: Client, ticket: ShareTicket, qos: number): void => {
      if (client.closed) return
      shares.join(client, replayConnection(ctx, client, ticket.who), ticket.who, ticket.request, qos, ticket.subscriptionId).catch((err: unknown) => {
        logger.error({ clientId: ticket.who.clientId, err: (err as Error).message }, 'joining a shared subscription failed')
      })
    }
    claimPubacksOf(ctx.persistence, (client, messageId) => {
      const conn = ctx.replayConnections.get(client)
      return conn !== undefined && shares.acked(conn, messageId)
    })
    // The SUBACK is written before this event: the share's first PUBLISH follows it.
    broker.on('subscribe', (subs, client) => {
      for (const sub of subs) {
        const ticket = this.#tickets.get(sub)
        if (ticket === undefined) continue
        this.#tickets.delete(sub)
        join(client, ticket, sub.qos)
      }
    })
    broker.on('connackSent', (_packet, client) => {
      const waiting = this.#restored.get(client)
      if (waiting === undefined) return
      this.#restored.delete(client)
      for (const { ticket, qos } of waiting) join(client, ticket, qos)
    })
    broker.on('unsubscribe', (topics, client) => {
      const who = ctx.identities.get(client)
      const conn = ctx.replayConnections.get(client)
      if (who === undefined || conn === undefined) return
      const ids: string[] = []
      for (const topic of topics) {
        const filter = unmountTopic(who.tenant, topic)
        if (filter === null || !isShareTopic(filter)) continue
        try {
          const { group, filter: inner } = parseShareSubscription(filter)
          ids.push(shareGroupId(who.tenant, group, inner))
        } catch {
          // never subscribed (SUBACK 0x80): nothing to leave
        }
      }
      if (ids.length > 0) shares.leave(conn, ids)
    })
  }
}
