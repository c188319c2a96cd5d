/**
 * authorizeSubscribe: what a client may subscribe to.
 *
 * A filter is checked as the client sent it and stored mounted
 * (`<tenant>/<filter>`); a denied one answers SUBACK 0x80 and is parked
 * where no publish can match. Subscriptions aedes restores from a persistent
 * session before the CONNACK are already mounted. `$replay/<range>/<filter>`
 * subscriptions replay the log (replay.ts, hooks/replays.ts): checked here,
 * started once the SUBACK is out, never stored in a session.
 */
import type { AedesOptions } from 'aedes'
import { isAllowed } from '../../access/auth.ts'
import { mountTopic, topicFilterProblem, unmountTopic } from '../../access/topics.ts'
import { clientFields } from '../../logger.ts'
import { GatewayError, type GatewayErrorCode } from '../../errors.ts'
import type { SubscribeRefusal } from '../../metrics/metrics.ts'
import { isReplayTopic, type ReplayTicket } from '../replay.ts'
import type { HookContext } from './context.ts'
import { replayConnection } from './replays.ts'

type AuthorizeSubscribe = NonNullable<AedesOptions['authorizeSubscribe']>

/** Why a $replay subscription was refused, by the code prepare() threw. */
const REPLAY_REFUSALS: Partial<Record<GatewayErrorCode, SubscribeRefusal>> = {
  GW_REPLAY_BAD_RANGE: 'replay-bad-range',
  GW_REPLAY_BAD_FILTER: 'replay-bad-filter',
  GW_REPLAY_DENIED: 'acl-denied',
  GW_REPLAY_LIMIT: 'replay-limit',
}

export function authorizeSubscribe (ctx: HookContext): AuthorizeSubscribe {
  const { config, metrics, logger } = ctx
  return (client, sub, callback) => {
    if (ctx.sessionMarkers.has(sub)) return callback(null, null) // see hooks/sessions.ts
    const who = ctx.identities.get(client)
    // aedes persists the SUBSCRIBE packet's own subscription objects, so the mount is applied to `sub` in place.
    // Subscriptions restored from a persistent session (before the CONNACK) are already mounted.
    const restoring = !ctx.connacked.has(client)
    const filter = who === undefined ? null : restoring ? unmountTopic(who.tenant, sub.topic) : sub.topic
    const problem = filter === null ? 'not in the client\'s tenant' : topicFilterProblem(filter)
    const deny = (why: string, reason: SubscribeRefusal, code?: string): void => {
      metrics.subscriptionsRefused.inc({ tenant: who?.tenant ?? 'unknown', reason })
      logger.warn({ ...clientFields(client.id), tenant: who?.tenant, filter: filter ?? sub.topic, reason, code }, `subscription refused: ${why}`)
      // A denied filter stays in the persisted SUBSCRIBE list; park it where no publish can ever match.
      sub.topic = `$denied/${sub.topic}`
      ctx.authorized.add(sub)
      callback(null, null) // SUBACK 0x80
    }
    if (who === undefined || filter === null || problem !== null) return deny(problem ?? 'unknown client', 'invalid-filter')
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
      return callback(null, sub)
    }
    if (!isAllowed(config.acl, who, 'subscribe', filter)) return deny('ACL', 'acl-denied')
    sub.topic = mountTopic(who.tenant, filter)
    ctx.authorized.add(sub)
    callback(null, sub)
  }
}
