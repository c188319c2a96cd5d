/**
 * authorizeForward: aedes asks it before every delivery to a client, also of
 * a packet read back from a persistent session's queue on reconnect. It
 * unmounts the topic (`<tenant>/<topic>` → `<topic>`), refuses to forward
 * across tenants, and holds the read ACL per message, as Mosquitto does.
 */
import type { AedesOptions } from 'aedes'
import { isAllowed } from '../../access/auth.ts'
import { dollarTopicSubscribed, unmountTopic } from '../../access/topics.ts'
import { subscriptionsOf } from '../aedes-internals.ts'
import type { HookContext } from './context.ts'

type AuthorizeForward = NonNullable<AedesOptions['authorizeForward']>

export function authorizeForward (ctx: HookContext): AuthorizeForward {
  const { config } = ctx
  return (client, packet) => {
    // Every caller hands over a packet of its own (a per-subscription copy, or a queued packet read back from
    // disk), and the reconnect path writes that very object rather than the returned one: unmount in place.
    const who = ctx.identities.get(client)
    if (who === undefined) return null
    // A live copy of a logged message that the session reads from the log instead (session-cursors.ts).
    if (!ctx.persistence.forwardLive(client, packet)) return null
    const topic = unmountTopic(who.tenant, packet.topic)
    if (topic === null) return null
    if (topic.startsWith('$') && !dollarTopicSubscribed(who.tenant, Object.keys(subscriptionsOf(client)), topic)) return null
    // Read access is checked per message too, as Mosquitto does: a subscribe deny rule (admin/#) also holds
    // against a wider filter the client was granted (#).
    if (!isAllowed(config.acl, who, 'subscribe', topic)) return null
    packet.topic = topic
    return packet
  }
}
