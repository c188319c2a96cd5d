/**
 * authorizeForward: aedes asks it before every delivery to a client, also of
 * a packet read back from a persistent session's queue on reconnect. It
 * unmounts the topic (`<tenant>/<topic>` → `<topic>`), refuses to forward
 * across tenants, and holds the read ACL per message, as Mosquitto does.
 */
import type { AedesOptions, Client } from 'aedes'
import mqttPacket from 'mqtt-packet'
import { isAllowed, type Identity } from '../../access/auth.ts'
import { dollarTopicSubscribed, unmountTopic } from '../../access/topics.ts'
import { subscriptionsOf } from '../aedes-internals.ts'
import type { HookContext } from './context.ts'

type AuthorizeForward = NonNullable<AedesOptions['authorizeForward']>

/**
 * What a topic is delivered as, kept per connection for the topics it receives (a subscriber to many devices gets the
 * same few hundred over and over): the tenant and the ACL verdict are fixed for the life of a connection (identity set
 * at CONNECT, config frozen). Not for `$` topics, whose verdict follows the client's subscriptions. Profiled under the
 * fan-in bench, the ACL check per delivered message took about 3.5 % of the main thread.
 */
const FORWARDS_PER_CLIENT = 256
const DOLLAR = 0x24

export function authorizeForward (ctx: HookContext): AuthorizeForward {
  const forwards = new WeakMap<Client, Map<string, string | null>>()
  return (client, packet) => {
    // Every caller hands over a packet of its own (a per-subscription copy, or a queued packet read back from
    // disk), and the reconnect path writes that very object rather than the returned one: unmount in place.
    const who = ctx.identities.get(client)
    if (who === undefined) return null
    // A live copy of a logged message that the session reads from the log instead (sessions/cursors.ts).
    if (!ctx.persistence.forwardLive(client, packet)) return null
    const mounted = packet.topic
    let cache = forwards.get(client)
    let topic = cache?.get(mounted)
    if (topic === undefined) {
      topic = forwardedTopic(ctx, client, who, mounted)
      if (mounted.charCodeAt(who.tenant.length + 1) !== DOLLAR) {
        if (cache === undefined) forwards.set(client, cache = new Map())
        else if (cache.size >= FORWARDS_PER_CLIENT) cache.clear() // a client receiving many topics just recomputes
        cache.set(mounted, topic)
      }
    }
    if (topic === null) return null
    if (client.maximumPacketSize !== undefined && exceedsMaximum(client.maximumPacketSize, packet, topic)) {
      ctx.metrics.oversizedDeliveries.inc({ tenant: who.tenant })
      return null
    }
    packet.topic = topic
    return packet
  }
}

/**
 * Whether the PUBLISH would be larger than the client's MQTT 5 Maximum Packet Size: the server does not send it,
 * and behaves as if it had [MQTT-3.1.2-25] (aedes takes the value from the CONNECT and leaves it to the application).
 * Measured as aedes would write it, with the QoS the message has (a subscription granting less makes it 2 bytes
 * smaller at most); only for clients that set one.
 */
function exceedsMaximum (maximum: number, packet: Parameters<AuthorizeForward>[1], topic: string): boolean {
  const qos = packet.qos
  try {
    return mqttPacket.generate({ ...packet, topic, ...(qos > 0 ? { messageId: 1 } : {}) } as mqttPacket.Packet, { protocolVersion: 5 }).length > maximum
  } catch {
    return false // a packet mqtt-packet cannot write fails on aedes' own write, as before
  }
}

/**
 * The topic a client receives a message of the (mounted) topic on, or null when it may not receive it: another
 * tenant's, a `$` topic it did not subscribe to by name, or one its read ACL denies. Live deliveries
 * (authorizeForward) and persistent sessions' deliveries from the log (sessions/cursors.ts) both ask it.
 */
export function forwardedTopic (ctx: Pick<HookContext, 'config'>, client: Client, who: Identity, mountedTopic: string): string | null {
  const topic = unmountTopic(who.tenant, mountedTopic)
  if (topic === null) return null
  if (topic.startsWith('$') && !dollarTopicSubscribed(who.tenant, Object.keys(subscriptionsOf(client)), topic)) return null
  // Read access is checked per message too, as Mosquitto does: a subscribe deny rule (admin/#) also holds
  // against a wider filter the client was granted (#).
  if (!isAllowed(ctx.config.acl, who, 'subscribe', topic)) return null
  return topic
}
