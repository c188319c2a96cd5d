/**
 * authorizePublish: the append-before-ack path.
 *
 * Ack means durable. aedes 1.2.0 writes the PUBACK before it calls
 * `broker.publish` (which delivers to subscribers and stores the offline
 * queues) and before the `published` hook, so neither can give the guarantee.
 * `authorizePublish` runs before the ack, so it appends to the log and waits
 * for the group commit. What persistent sessions need of the message is on
 * disk before the ack too, so a session that was offline finds every
 * acknowledged message even after a SIGKILL right after the PUBACK:
 * - a logged QoS 1 message needs, per matching session, a cursor into its
 *   partition (sessions/cursors.ts): it is on disk already, or written now
 *   (the session's first message of that partition) and the ack waits for
 *   that write (persistence.beforeAck). Then the publish is acknowledged and
 *   aedes' `broker.publish` delivers it to live subscribers without the
 *   publisher waiting: delivery is off the PUBACK path (issue 13's fan-in);
 * - a message a session keeps a copy of (QoS 2, a topic the log does not
 *   hold), a retained message and a will: `broker.publish` stores the copies
 *   and the retained message and delivers before the ack, as aedes' own
 *   order (ack, then publish) cannot;
 * either way authorizePublish runs `broker.publish` itself and marks the
 * packet, so the one aedes makes after the ack is a no-op (aedes-internals.ts,
 * interceptPublish). delivery-order.ts keeps a client's publishes in the
 * order it sent them across the two; past LIVE_DELIVERIES deliveries under
 * way, acks wait for delivery again, so a slow subscriber slows publishers
 * down instead of filling memory.
 *
 * Tenants are mount points: the topic is checked as the client sent it, then
 * mounted (`<tenant>/<topic>`). A refusal that MQTT 3.1.1 can express only by
 * closing the connection does so; an ACL denial is acknowledged and dropped,
 * as Mosquitto does, so the device does not retry forever. An MQTT 5 client
 * is told instead, on its PUBACK/PUBREC, and keeps its connection
 * (reason-codes.ts): 0x87 for an ACL denial or a reserved topic, 0x90 for a
 * topic that is not valid here or not routed under `unrouted: reject`, 0x80
 * or 0x97 for a QoS 1 or 2 append that failed (no retry: the client decides).
 */
import type { AedesOptions, Client, PublishPacket } from 'aedes'
import type { ExtraOperation } from '../../../store/index.ts'
import { DEDUPE_PROPERTY, dedupePropertyOf, splitDedupeTopic, type MessageProperties } from '../../../bridge/index.ts'
import { isAllowed, mayReplicate, type Identity } from '../../access/auth.ts'
import { mountTopic, topicNameProblem } from '../../access/topics.ts'
import { GatewayError } from '../../errors.ts'
import { isFiringWill } from '../aedes-internals.ts'
import type { Qos2Plan } from '../inbound-qos2.ts'
import { attachLogPosition, type LogPosition } from '../log-position.ts'
import { appendFailureCode, isMqtt5, REASON } from '../reason-codes.ts'
import { isReplayTopic } from '../replay.ts'
import { compileRoutes, type Route } from '../routing.ts'
import { isShareTopic } from '../shared/share-topic.ts'
import { isLoopback, listenerOf, LIVE_DELIVERIES, markPublished, refusedError, type HookContext } from './context.ts'
import { DeliveryOrder } from './delivery-order.ts'

type AuthorizePublish = NonNullable<AedesOptions['authorizePublish']>
type Callback = (err?: Error | null) => void

/** Header of a replicated record: the dedupe id it arrived with (`<gatewayId>/<tenant>/<stream>/<partition>/<offset>`). */
export const ORIGIN_HEADER = 'edgemq-origin'

/**
 * A device publishes to a handful of topics over and over; the ACL verdict and the route of each are fixed for
 * the life of its connection (config is frozen, identity set at CONNECT), so they are worked out once per topic.
 * Profiled under the gateway bench, matching them per message took about 12 % of the main thread.
 * `mounted` is the mounted topic (`<tenant>/<topic>`), one string object for every message on the topic: V8 keeps a
 * string concatenated per message as a rope, which the first Map lookup of each message (the persistence's match
 * cache, authorizeForward's) flattened and hashed again; this one keeps its hash from the first message on.
 */
interface PublishDecision { readonly allowed: boolean, readonly target: Route | null, readonly stream: string | null, readonly mounted: string }
const DECISIONS_PER_CLIENT = 256
/** At most one log line per this many ms about deliveries after the ack that failed (each line counts them). */
const FAILURE_LOG_MS = 10_000

export function authorizePublish (ctx: HookContext): AuthorizePublish {
  const { config, logger, persistence, refusePublish } = ctx
  const route = compileRoutes(config.routes)
  const { appender } = ctx
  const decisions = new WeakMap<Client, Map<string, PublishDecision>>()
  /** Errors of QoS 2 appends (not of the delivery after one): an MQTT 5 client gets them as the PUBREC's reason code. */
  const appendErrors = new WeakSet<Error>()

  const publishDecision = (client: Client, who: Identity, topic: string): PublishDecision => {
    let cache = decisions.get(client)
    if (cache === undefined) decisions.set(client, cache = new Map())
    let d = cache.get(topic)
    if (d === undefined) {
      const allowed = isAllowed(config.acl, who, 'publish', topic)
      const target = allowed ? route(topic) : null
      d = { allowed, target, stream: target === null ? null : `${who.tenant}/${target.stream}`, mounted: mountTopic(who.tenant, topic) }
      if (cache.size >= DECISIONS_PER_CLIENT) cache.clear() // a client walking many topics just recomputes
      cache.set(topic, d)
    }
    return d
  }

  /** What aedes is told of a failed append: the store's error for 3.1.1 (it closes), its reason code for MQTT 5. */
  const appendFailed = (client: Client, err: Error): Error =>
    isMqtt5(client) ? refusedError(`the log could not take the message: ${err.message}`, appendFailureCode(err), err) : err

  /** aedes' publish (delivery, offline queues), then the mark that makes its own publish after the ack a no-op. */
  const publishBeforeAck = (packet: PublishPacket, client: Client, callback: Callback): void => {
    ctx.publish(packet, client, (err?: Error) => {
      if (err) return callback(err)
      markPublished(packet)
      callback(null)
    })
  }
  const deliverBeforeAck = (packet: PublishPacket, client: Client): Promise<void> =>
    new Promise((resolve, reject) => publishBeforeAck(packet, client, (err) => { if (err) reject(err); else resolve() }))

  const order = new DeliveryOrder()
  /** Deliveries started after their ack and not finished (see the header). */
  let delivering = 0
  /** Failed deliveries not logged yet, and when one was last logged: a broker closing under load fails hundreds at once. */
  let unlogged = 0
  let loggedAt = 0
  const deliveredAfterAck = (err?: Error): void => {
    delivering--
    if (!err) return
    unlogged++
    const now = Date.now()
    if (now - loggedAt < FAILURE_LOG_MS) return
    logger.warn({ err: err.message, failed: unlogged }, 'delivering acknowledged messages to live subscribers failed (they are in the log)')
    unlogged = 0
    loggedAt = now
  }
  /** publishBeforeAck in the client's order (delivery-order.ts). */
  const deliverThenAck = (client: Client, packet: PublishPacket, callback: Callback): void => {
    order.deliverBeforeAck(client, (finished) => publishBeforeAck(packet, client, (err) => { callback(err); finished() }))
  }
  /** The ack, then aedes' publish: delivery to live subscribers, and the cursors' wake-up, without the publisher waiting. */
  const ackThenDeliver = (packet: PublishPacket, client: Client, callback: Callback): void => {
    delivering++
    markPublished(packet)
    ctx.publish(packet, client, deliveredAfterAck)
    callback(null)
  }

  /**
   * Acks a logged QoS 1 message once what persistent sessions need of it is on disk (persistence.beforeAck), and
   * delivers it after the ack; or delivers it before the ack (see the header), in the client's order either way.
   */
  const ackLogged = (client: Client, who: Identity, packet: PublishPacket, position: LogPosition, deliverFirst: boolean, callback: Callback): void => {
    if (deliverFirst || packet.retain || delivering >= LIVE_DELIVERIES) {
      attachLogPosition(packet, position)
      return deliverThenAck(client, packet, callback)
    }
    const wait = persistence.beforeAck(packet.topic, packet.qos, position)
    // Only a session's cursors (aedes' enqueue, authorizeForward) look the position up: none matched, none will.
    if (wait !== 'unmatched') attachLogPosition(packet, position)
    if (wait === 'copies') return deliverThenAck(client, packet, callback)
    if (typeof wait === 'string' && order.clear(client)) return ackThenDeliver(packet, client, callback)
    order.ackBeforeDelivery(client, typeof wait === 'string' ? null : wait, (_finished, err) => {
      if (err === undefined) return ackThenDeliver(packet, client, callback)
      // Not acknowledged, as a failed append: 3.1.1 closes (and retries on its next connection), MQTT 5 is told.
      const detail = `a persistent session's cursor could not be written: ${err instanceof Error ? err.message : String(err)}`
      refusePublish(client, who, 'store-failed', detail)
      callback(refusedError(detail, REASON.UNSPECIFIED_ERROR, err))
    })
  }

  const beginQos2 = (client: Client, packet: PublishPacket, plan: Qos2Plan, callback: Callback): void => {
    const begun = ctx.inbound.begin(client, packet, plan)
    // Not marked as reported: aedes closes the connection and logs this one (clientError).
    if (begun === 'full') return callback(new GatewayError('GW_QOS2_INFLIGHT_FULL', `more than ${ctx.inbound.maxInflight} QoS 2 messages awaiting PUBREL`))
    if (begun === 'duplicate') markPublished(packet)
    const running = begun === 'new' && plan.append !== undefined && isMqtt5(client) ? ctx.inbound.running(client, packet.messageId as number) : undefined
    if (running === undefined) return callback(null)
    // MQTT 5: a failed append is the PUBREC's reason code (inbound-qos2.ts), so aedes is told once the append settled. A
    // failed delivery after a good append goes aedes' way (no PUBREC, the connection closes): the entry exists, and a
    // PUBREC error would let the client reuse the packet id for a message the entry would then drop as a duplicate.
    running.then(() => callback(null), (err: unknown) => callback(err instanceof Error && appendErrors.has(err) ? appendFailed(client, err) : null))
  }

  /**
   * The delete of the stored will when `packet` is a will firing: one fired at startup (wills.ts, hooks/startup-wills.ts),
   * or the will of a connection aedes closed (it hands authorizePublish `client.will`).
   */
  const firingWill = (client: Client, packet: PublishPacket): ExtraOperation[] | undefined => {
    if (ctx.startupWills.has(packet)) return persistence.willDeleteOps(client)
    if (isFiringWill(client, packet) && ctx.wills.firesStoredWill(client)) return persistence.willDeleteOps(client)
    return undefined
  }

  return (client, packet, callback) => {
    // A will arrives here with its client when it fires (wills.ts): it is checked, mounted and (when routed)
    // logged like any publish of that client. Nothing may publish without a client: it would skip all of that.
    if (client === null) {
      logger.warn({ topic: packet.topic }, 'publish without a client refused')
      return callback(refusedError('a publish needs a client', REASON.NOT_AUTHORIZED))
    }
    const who = ctx.identities.get(client)
    // A record replicated by another edgemq's bridge carries its dedupe id in a topic prefix (MQTT 3.1.1) or a user
    // property (MQTT 5): it is appended under that id, so a resend after the sender's reconnect or crash is
    // acknowledged, not logged twice.
    const properties = (packet as PublishPacket & { properties?: MessageProperties }).properties
    const property = isMqtt5(client) ? dedupePropertyOf(properties?.userProperties) : null
    if (property === 'invalid') {
      const detail = `${packet.topic}: its ${DEDUPE_PROPERTY} user property is not one dedupe id (<gatewayId>/<tenant>/<stream>/<partition>/<offset>)`
      refusePublish(client, who, 'invalid-topic', detail)
      return callback(refusedError(detail, REASON.IMPLEMENTATION_SPECIFIC_ERROR))
    }
    const carried = splitDedupeTopic(packet.topic) ?? (property === null ? null : { dedupeId: property, topic: packet.topic })
    if (carried !== null) {
      // The open local mode (no users, loopback) tells nobody apart, so its anonymous clients may; else an ACL
      // replicate grant. Per stream dedupe ids (store) keep one tenant's ids from touching another's records.
      const openLocal = who?.role === 'anonymous' && config.users.length === 0 && isLoopback(listenerOf(client)?.host ?? '')
      if (who === undefined || !(openLocal || mayReplicate(config.acl, who, carried.topic))) {
        const detail = `${carried.topic}: publishing replicated ($dedupe/, ${DEDUPE_PROPERTY}) records needs an ACL "replicate" grant`
        refusePublish(client, who, 'invalid-topic', detail)
        return callback(refusedError(`${property === null ? '$dedupe/ topics' : `the ${DEDUPE_PROPERTY} property`} is for bridges`, REASON.NOT_AUTHORIZED))
      }
      packet.topic = carried.topic
      // Kept as the record's origin header (below), as the topic prefix is: not a user property of the message.
      if (property !== null && properties?.userProperties !== undefined) {
        const { [DEDUPE_PROPERTY]: _id, ...rest } = properties.userProperties
        properties.userProperties = rest
        if (Object.keys(rest).length === 0) delete properties.userProperties
      }
    }
    const topic = packet.topic
    if (who === undefined) {
      const problem = topicNameProblem(topic)
      refusePublish(client, who, 'invalid-topic', problem ?? 'unknown client')
      return callback(refusedError(problem ?? 'unknown client', problem === null ? REASON.NOT_AUTHORIZED : REASON.TOPIC_NAME_INVALID))
    }
    // A topic the client has a decision for passed the checks below when it was made: only a new one is checked.
    let decision = decisions.get(client)?.get(topic)
    if (decision === undefined) {
      const problem = topicNameProblem(topic)
      if (problem !== null) {
        refusePublish(client, who, 'invalid-topic', problem)
        return callback(refusedError(problem, REASON.TOPIC_NAME_INVALID))
      }
      if (isReplayTopic(topic) || isShareTopic(topic)) {
        // Nobody may pose as a replay, or publish to a share's subscription itself. Acknowledged and dropped, like an ACL denial.
        const detail = `${topic}: $replay and $share are subscriptions, not topics`
        refusePublish(client, who, 'reserved-topic', detail)
        if (isMqtt5(client)) return callback(refusedError(detail, REASON.NOT_AUTHORIZED))
        markPublished(packet)
        return callback(null)
      }
      decision = publishDecision(client, who, topic)
    }
    if (!decision.allowed) {
      // As Mosquitto does: acknowledged, neither logged nor delivered, so the device does not retry forever.
      refusePublish(client, who, 'acl-denied', `${topic} not allowed`)
      if (isMqtt5(client)) return callback(refusedError(`publishing to ${topic} is not allowed`, REASON.NOT_AUTHORIZED))
      markPublished(packet)
      return callback(null)
    }
    packet.topic = decision.mounted
    const route = decision.target
    if (route === null) {
      if (config.unrouted === 'reject') {
        refusePublish(client, who, 'unrouted', `no route for ${topic}`)
        return callback(refusedError(`no route for topic ${topic}`, REASON.TOPIC_NAME_INVALID))
      }
      if (packet.qos === 2 && packet.messageId !== undefined) return beginQos2(client, packet, { deliver: () => deliverBeforeAck(packet, client) }, callback)
      return packet.qos === 0 ? callback(null) : deliverThenAck(client, packet, callback)
    }
    const target = { stream: decision.stream as string, key: route.key, topic }
    const qos = packet.qos
    // A firing will is logged together with the delete of its stored copy (wills.ts): once, across any kill.
    const will = firingWill(client, packet)
    if (carried !== null) {
      appender.append(client, who, target, packet, (err, duplicate, position) => {
        if (err) return callback(appendFailed(client, err))
        if (duplicate === true) { markPublished(packet); return callback(null) } // already logged and delivered once
        if (qos === 0) return callback(null)
        // As for any logged message: a session's QoS 1 subscription reads it from its cursor, and gets no copy besides.
        if (position !== undefined) attachLogPosition(packet, position)
        deliverThenAck(client, packet, callback)
      }, { dedupeId: `bridge/${carried.dedupeId}` }, { [ORIGIN_HEADER]: carried.dedupeId })
      return
    }
    if (qos === 2 && packet.messageId !== undefined) {
      // [MQTT-4.3.3-2] exactly once into the log: appended with the session's inbound packet entry in one batch,
      // unless that entry exists (inbound-qos2.ts). A will (no packet id) is appended like QoS 1.
      return beginQos2(client, packet, {
        append: (extraOps) => new Promise((resolve, reject) => {
          appender.append(client, who, target, packet, (err, _duplicate, position) => {
            // A session's QoS 1 subscription reads a QoS 2 message from its cursor, as a QoS 1 one (sessions/persistence.ts
            // cursorsDeliver); without the position it got a copy too, and so the message twice.
            if (err === null && position !== undefined) attachLogPosition(packet, position)
            if (err === null) return resolve()
            appendErrors.add(err)
            reject(err)
          }, { extraOps })
        }),
        deliver: () => deliverBeforeAck(packet, client),
      }, callback)
    }
    // QoS 0 waits for its append too: there is no ack to hold back, but the wait keeps the client's socket
    // paused while the log is busy, and delivery order equal to log order.
    const isWill = will !== undefined || isFiringWill(client, packet)
    appender.append(client, who, target, packet, (err, _duplicate, position) => {
      if (err) return callback(appendFailed(client, err))
      if (qos === 0) return callback(null)
      // Persistent sessions keep a cursor to the record instead of a copy of the message (sessions/cursors.ts).
      if (position === undefined) return deliverThenAck(client, packet, callback)
      ackLogged(client, who, packet, position, isWill, callback)
    }, will === undefined ? undefined : { extraOps: will })
  }
}
