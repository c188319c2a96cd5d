/**
 * authorizeSubscribe: what a client may subscribe to.
 *
 * A filter is checked as the client sent it and stored mounted
 * (`<tenant>/<filter>`); a denied one answers SUBACK 0x80 and is not stored.
 * So does a filter over mqtt.maxFiltersPerSubscribe (every filter of a bigger
 * SUBSCRIBE) or a new one over mqtt.maxSubscriptionsPerSession, counted by
 * reason and logged once per connection. An MQTT 5 client's SUBACK says 0x87
 * for those, and for a `$share` subscription 0x8F (malformed) or 0x97
 * (mqtt.share.maxPerTenant). Subscriptions aedes restores from a persistent
 * session before the CONNACK are already mounted. `$replay/<range>/<filter>`
 * subscriptions replay the log (replay.ts, hooks/replays.ts): checked here,
 * started once the SUBACK is out, never stored in a session.
 * `$share/<group>/<filter>` subscriptions (shared/) are checked here and
 * stored like plain ones; the client joins the share once the SUBACK (or,
 * restored, the CONNACK) is out.
 */
import type { AedesOptions, Client, Subscription } from 'aedes'
import { isAllowed } from '../../access/auth.ts'
import { mountTopic, topicFilterProblem, unmountTopic } from '../../access/topics.ts'
import { clientFields } from '../../logger.ts'
import { GatewayError, type GatewayErrorCode } from '../../errors.ts'
import type { SubscribeRefusal } from '../../metrics/metrics.ts'
import { subscriptionsOf } from '../aedes-internals.ts'
import { REASON } from '../reason-codes.ts'
import { isReplayTopic, type ReplayTicket } from '../replay.ts'
import { isShareTopic, parseShareSubscription, type ShareRequest } from '../shared/share-topic.ts'
import type { HookContext } from './context.ts'
import { replayConnection } from './replays.ts'

type AuthorizeSubscribe = NonNullable<AedesOptions['authorizeSubscribe']>
/** The SUBACK codes a refusal names for an MQTT 5 client, beside aedes' 0x87 (MQTT 5 3.9.3). */
type SubackRefusal = typeof REASON.TOPIC_FILTER_INVALID | typeof REASON.QUOTA_EXCEEDED

/** Why a $replay subscription was refused, by the code prepare() threw. */
const REPLAY_REFUSALS: Partial<Record<GatewayErrorCode, SubscribeRefusal>> = {
  GW_REPLAY_BAD_RANGE: 'replay-bad-range',
  GW_REPLAY_BAD_FILTER: 'replay-bad-filter',
  GW_REPLAY_DENIED: 'acl-denied',
  GW_REPLAY_LIMIT: 'replay-limit',
}

export function authorizeSubscribe (ctx: HookContext): AuthorizeSubscribe {
  const { config, metrics, logger } = ctx
  /** Subscriptions each client holds or was granted, counted from aedes' table after each UNSUBSCRIBE (see overLimit). */
  const held = new WeakMap<Client, number>()
  ctx.broker.on('unsubscribe', (_topics, client) => { held.delete(client) })
  /** Limit refusals already logged per connection: each filter is counted, each reason logged once. */
  const loggedLimits = new WeakMap<Client, Set<SubscribeRefusal>>()

  /**
   * Whether a new filter goes over mqtt.maxFiltersPerSubscribe or mqtt.maxSubscriptionsPerSession. A filter the
   * client holds already only replaces its subscription. The count starts from aedes' table (restored subscriptions
   * included) and grows with each filter granted ({@link grant}; a filter refused later, by the ACL, a `$replay` range
   * or a `$share` limit, is not held and does not count), so a SUBSCRIBE costs O(its filters), not O(held × filters).
   */
  const overLimit = (client: Client, sub: Subscription, mounted: string): { reason: SubscribeRefusal, why: string } | null => {
    if (ctx.oversized.has(sub)) {
      return { reason: 'too-many-filters', why: `a SUBSCRIBE with more than ${config.mqtt.maxFiltersPerSubscribe} filters (mqtt.maxFiltersPerSubscribe)` }
    }
    const table = subscriptionsOf(client)
    if (table[mounted] !== undefined) return null
    const count = held.get(client) ?? Object.keys(table).length
    if (count >= config.mqtt.maxSubscriptionsPerSession) {
      return { reason: 'too-many-subscriptions', why: `the client holds ${count} subscriptions (mqtt.maxSubscriptionsPerSession)` }
    }
    return null
  }

  /** Counts a new filter granted to a connected client towards mqtt.maxSubscriptionsPerSession (see overLimit). */
  const grant = (client: Client, mounted: string): void => {
    const table = subscriptionsOf(client)
    if (table[mounted] === undefined) held.set(client, (held.get(client) ?? Object.keys(table).length) + 1)
  }

  return (client, sub, callback) => {
    if (ctx.sessionMarkers.has(sub)) return callback(null, null) // see hooks/sessions.ts
    const who = ctx.identities.get(client)
    // aedes persists the SUBSCRIBE packet's own subscription objects, so the mount is applied to `sub` in place.
    // Subscriptions restored from a persistent session (before the CONNACK) are already mounted.
    const restoring = !ctx.connacked.has(client)
    const filter = who === undefined ? null : restoring ? unmountTopic(who.tenant, sub.topic) : sub.topic
    const problem = filter === null ? 'not in the client\'s tenant' : topicFilterProblem(filter)
    const deny = (why: string, reason: SubscribeRefusal, code?: string, reasonCode?: SubackRefusal): void => {
      metrics.subscriptionsRefused.inc({ tenant: who?.tenant ?? 'unknown', reason })
      logger.warn({ ...clientFields(client.id), tenant: who?.tenant, filter: filter ?? sub.topic, reason, code }, `subscription refused: ${why}`)
      // SUBACK 0x80 (MQTT 5: 0x87, or `reasonCode` when there is one; the aedes patch takes it from the error).
      if (reasonCode === undefined) callback(null, null)
      else callback(Object.assign(new GatewayError(code as GatewayErrorCode, why), { reasonCode }), null)
    }
    if (who === undefined || filter === null || problem !== null) return deny(problem ?? 'unknown client', 'invalid-filter')
    if (!restoring) {
      const limit = overLimit(client, sub, mountTopic(who.tenant, filter))
      if (limit !== null) {
        metrics.subscriptionsRefused.inc({ tenant: who.tenant, reason: limit.reason })
        let reasons = loggedLimits.get(client)
        if (reasons === undefined) loggedLimits.set(client, reasons = new Set())
        if (!reasons.has(limit.reason)) {
          reasons.add(limit.reason)
          logger.warn({ ...clientFields(client.id), tenant: who.tenant, filter, reason: limit.reason },
            `subscription refused: ${limit.why} (further refusals of this connection for the same reason are only counted)`)
        }
        return callback(null, null) // SUBACK 0x80
      }
    }
    if (isReplayTopic(filter)) {
      if (restoring) return deny('a $replay subscription is not resumed with the session', 'replay-not-resumed')
      let ticket: ReplayTicket
      try {
        ticket = ctx.replays.prepare(replayConnection(ctx, client, who), who, filter)
      } catch (err) {
        if (!(err instanceof GatewayError)) throw err
        return deny(err.message, REPLAY_REFUSALS[err.code] ?? 'invalid-filter', err.code)
      }
      sub.topic = mountTopic(who.tenant, filter)
      ctx.tickets.set(sub, ticket)
      grant(client, sub.topic)
      return callback(null, sub)
    }
    /** A `$share` subscription's start offsets being written: its SUBACK (restored: the CONNACK) waits for them. */
    let shareOpened: Promise<void> | undefined
    if (isShareTopic(filter)) {
      // `$share/<group>/<filter>` (shared/): the inner filter needs the access a plain subscription to it would.
      let share: ShareRequest
      try {
        share = parseShareSubscription(filter)
      } catch (err) {
        if (!(err instanceof GatewayError)) throw err
        return deny(err.message, 'share-invalid', err.code, REASON.TOPIC_FILTER_INVALID)
      }
      if (!isAllowed(config.acl, who, 'subscribe', share.filter)) return deny('ACL', 'acl-denied')
      try {
        shareOpened = ctx.shares.accepted(client, sub, who, share, restoring)
      } catch (err) {
        if (!(err instanceof GatewayError)) throw err
        return deny(err.message, 'share-limit', err.code, REASON.QUOTA_EXCEEDED)
      }
    } else if (!isAllowed(config.acl, who, 'subscribe', filter)) return deny('ACL', 'acl-denied')
    sub.topic = mountTopic(who.tenant, filter)
    if (!restoring) grant(client, sub.topic)
    // Stored by aedes' next addSubscriptions call for this client (hooks/sessions.ts), once.
    if (client.clean === false && !restoring) {
      let pending = ctx.toStore.get(client)
      if (pending === undefined) ctx.toStore.set(client, pending = [])
      pending.push(sub)
    }
    // A share's start is durable before its SUBACK: a message acknowledged after it reaches the share after a kill -9.
    if (shareOpened === undefined) callback(null, sub)
    else void shareOpened.then(() => callback(null, sub))
  }
}
