/**
 * The aedes broker and its hooks. Each hook is a thin adapter over the pure
 * functions in topics.ts, routing.ts and auth.ts; the one piece of real
 * machinery is how a publish reaches the log before it is acknowledged.
 *
 * Ack means durable. aedes 1.2.0 writes the PUBACK before it calls
 * `broker.publish` (which delivers to subscribers and stores the offline
 * queues) and before the `published` hook, so neither can give the guarantee.
 * `authorizePublish` runs before the ack, so it appends to the log and waits
 * for the group commit; then it runs `broker.publish` itself — online
 * delivery and the offline QoS 1/2 queues are stored before the ack too — and
 * marks the packet, so the `broker.publish` aedes makes after the ack is a
 * no-op. A persistent session that was offline therefore finds every
 * acknowledged message in its queue, even after a SIGKILL right after the
 * PUBACK.
 *
 * Tenants are mount points: inside the broker every topic is
 * `<tenant>/<topic>`; authorizePublish/authorizeSubscribe add the prefix and
 * authorizeForward removes it, and refuses to forward across tenants.
 *
 * `$replay/<range>/<filter>` subscriptions replay the log (mqtt/replay.ts):
 * authorizeSubscribe checks them, the replay starts once the SUBACK is out,
 * PUBACKs of replay messages are taken before they reach the session store,
 * and such subscriptions are never stored in a persistent session.
 */
import { Aedes, type Client, type PublishPacket, type Subscription } from 'aedes'
import type { Duplex } from 'node:stream'
import type { TLSSocket } from 'node:tls'
import type { Logger } from 'pino'
import { isStoreError, type AppendOptions, type ExtraOperation, type LogStore } from '../../store/index.ts'
import { splitDedupeTopic } from '../../bridge/index.ts'
import { ClientIdOwners, clientIdMatches, clientIdPattern, isAllowed, mayReplicate, UserDirectory, type Identity } from '../access/auth.ts'
import type { GatewayConfig, ListenerConfig, UserConfig } from '../config/config.ts'
import type { GuardGroup } from './connection-guard.ts'
import { InboundQos2, type Qos2Plan, type Qos2Persistence } from './inbound-qos2.ts'
import { GatewayError, type GatewayErrorCode } from '../errors.ts'
import { clientFields, isOrdinaryDisconnect } from '../logger.ts'
import type { GatewayMetrics, PublishRefusal, RefusalReason, SubscribeRefusal } from '../metrics/metrics.ts'
import { isReplayTopic, MqttReplays, type ReplayConnection, type ReplayTicket } from './replay.ts'
import { compileRoutes, type Route } from './routing.ts'
import { identityNow, installWills, type WillPersistence } from './wills.ts'
import { dollarTopicSubscribed, MAX_CLIENT_TOPIC_LEVELS, mountTopic, scopedClientId, topicFilterProblem, topicNameProblem, unmountTopic } from '../access/topics.ts'

export interface BrokerDeps {
  readonly config: GatewayConfig
  readonly store: LogStore
  /** aedes persistence (our LevelDB one); the hooks need its incoming QoS 2 store. */
  readonly persistence: BrokerPersistence
  readonly metrics: GatewayMetrics
  readonly logger: Logger
  /** Called when a write to the log failed (the gateway turns unhealthy) or succeeded again. */
  readonly onStoreHealth: (healthy: boolean, err?: Error) => void
  /** The gateway's connections, paused together when the log backs up. */
  readonly guards: GuardGroup
}

/** aedes hands the hooks our ConnectionGuard as `client.conn`; this reads its listener back. */
export interface ListenerTagged {
  listener?: ListenerConfig
  /** The TLS socket under the connection (tls, and the HTTPS request of a wss one), for certIdentity. */
  tlsSocket?: TLSSocket
}

export interface BrokerPersistence extends Qos2Persistence, WillPersistence {
  addSubscriptions (client: Client, subs: readonly Subscription[]): Promise<void>
  subscriptionsByClient (client: Client): Promise<Array<{ topic: string, qos: number }>>
  hasSessionState (client: Client): boolean
  markSession (client: Client): Promise<void>
  outgoingClearMessageId (client: Client, packet: { cmd?: string, messageId?: number }): Promise<unknown>
}

/** broker.publish as aedes calls it internally (its typings only declare the two-argument form). */
type InternalPublish = (packet: PublishPacket, client: Client | null, done: (err?: Error) => void) => void

interface ConnectInfo { readonly clientId: string, readonly clean: boolean, readonly willTopic?: string }

/** Header of a replicated record: the dedupe id it arrived with (`<gatewayId>/<tenant>/<stream>/<partition>/<offset>`). */
export const ORIGIN_HEADER = 'edgemq-origin'
/** Header of every record an authenticated client sent: its username (a certificate's CN with certIdentity), for audit. */
export const USER_HEADER = 'edgemq-user'

const DONE = Symbol('edgemq.published') // packet already delivered and queued before the ack
/** Marks an error whose refusal was already counted and logged, so aedes' clientError does not log it again. */
const REFUSED = Symbol('edgemq.refused')
/** Why a $replay subscription was refused, by the code prepare() threw. */
const REPLAY_REFUSALS: Partial<Record<GatewayErrorCode, SubscribeRefusal>> = {
  GW_REPLAY_BAD_RANGE: 'replay-bad-range',
  GW_REPLAY_BAD_FILTER: 'replay-bad-filter',
  GW_REPLAY_DENIED: 'acl-denied',
  GW_REPLAY_LIMIT: 'replay-limit',
}
const RETRY_MIN_MS = 100
const RETRY_MAX_MS = 5000

/** Client ids that would collide with Object.prototype members in aedes' client table. */
const RESERVED_IDS = new Set(Object.getOwnPropertyNames(Object.prototype))

function listenerOf (client: Client): ListenerConfig | undefined {
  return (client.conn as unknown as ListenerTagged).listener
}

export function isLoopback (host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host)
}

function authError (returnCode: 2 | 3 | 4 | 5, message: string): Error & { returnCode: number } {
  return Object.assign(new Error(message), { returnCode, [REFUSED]: true })
}

function refusedError (message: string): Error {
  return Object.assign(new Error(message), { [REFUSED]: true })
}

function alreadyReported (err: Error): boolean {
  return (err as Error & { [REFUSED]?: boolean })[REFUSED] === true
}

export function createBroker (deps: BrokerDeps): Aedes {
  const { config, store, metrics, logger } = deps
  const users = new UserDirectory(config.users)
  const owners = new ClientIdOwners(config.users)
  const route = compileRoutes(config.routes)
  const identities = new WeakMap<Client, Identity>()
  const connects = new WeakMap<Client, ConnectInfo>()
  const maxPending = config.mqtt.maxPendingAppends
  const replays = new MqttReplays({ store, routes: config.routes, acl: config.acl, limits: config.mqtt.replay, metrics, logger })
  /**
   * Subscriptions of a persistent session that authorizeSubscribe accepted and aedes has not stored yet: only those
   * are stored, each once (see addSubscriptions below).
   */
  const toStore = new WeakMap<Client, Subscription[]>()
  /** The filters of every SUBSCRIBE over mqtt.maxFiltersPerSubscribe (tagged as it is parsed, see watchPackets). */
  const oversized = new WeakSet<object>()
  /** Subscriptions each client holds or was granted, counted from aedes' table after each UNSUBSCRIBE (see admit). */
  const held = new WeakMap<Client, number>()
  /** Limit refusals already logged per connection: each filter is counted, each reason logged once. */
  const loggedLimits = new WeakMap<Client, Set<SubscribeRefusal>>()
  /** Marker subscriptions that only make aedes answer sessionPresent = 1 (see subscriptionsByClient below). */
  const sessionMarkers = new WeakSet<object>()
  /** Stored wills fired at startup (wills.ts), whose append deletes them. */
  const startupWills = new WeakSet<object>()
  /** $replay subscriptions accepted, until their SUBACK is out. */
  const tickets = new WeakMap<Subscription, ReplayTicket>()
  const replayConnections = new WeakMap<Client, ReplayConnection>()
  const replayConnection = (client: Client, who: Identity): ReplayConnection => {
    let conn = replayConnections.get(client)
    if (conn === undefined) {
      const counter = client as unknown as { _nextId: number }
      conn = {
        stream: client.conn as unknown as Duplex,
        get closed () { return client.closed },
        clientId: who.clientId,
        // aedes' own counter (lib/qos-packet.js), so replay and live deliveries do not pick the same ids.
        nextMessageId () {
          const id = counter._nextId
          counter._nextId = id >= 65535 ? 1 : id + 1
          return id
        },
      }
      replayConnections.set(client, conn)
    }
    return conn
  }

  const refuse = (client: Client, reason: RefusalReason, detail: string): void => {
    const listener = listenerOf(client)?.name ?? 'unknown'
    metrics.connectionsRefused.inc({ listener, reason })
    // The id as the device sent it (a refused one may hold U+0000: the log shows it escaped); never the scoped key.
    logger.warn({ clientId: connects.get(client)?.clientId ?? clientFields(client.id).clientId, listener, reason }, `connection refused: ${detail}`)
  }

  /** Reasons already logged per connection: a device repeating a refused publish is counted every time, logged once. */
  const logged = new WeakMap<Client, Set<PublishRefusal>>()
  const refusePublish = (client: Client, who: Identity | undefined, reason: PublishRefusal, detail: string): void => {
    metrics.publishesRefused.inc({ tenant: who?.tenant ?? 'unknown', reason })
    let reasons = logged.get(client)
    if (reasons === undefined) logged.set(client, reasons = new Set())
    if (reasons.has(reason)) return
    reasons.add(reason)
    logger.warn({ ...clientFields(who?.clientId ?? client.id), tenant: who?.tenant, reason }, `publish refused: ${detail} (further refusals of this connection for the same reason are only counted)`)
  }

  /**
   * A device publishes to a handful of topics over and over; the ACL verdict and the route of each are fixed for
   * the life of its connection (config is frozen, identity set at CONNECT), so they are worked out once per topic.
   * Profiled under the gateway bench, matching them per message took about 12 % of the main thread.
   */
  interface PublishDecision { readonly allowed: boolean, readonly target: Route | null, readonly stream: string | null }
  const decisions = new WeakMap<Client, Map<string, PublishDecision>>()
  const DECISIONS_PER_CLIENT = 256
  const publishDecision = (client: Client, who: Identity, topic: string): PublishDecision => {
    let cache = decisions.get(client)
    if (cache === undefined) decisions.set(client, cache = new Map())
    let d = cache.get(topic)
    if (d === undefined) {
      const allowed = isAllowed(config.acl, who, 'publish', topic)
      const target = allowed ? route(topic) : null
      d = { allowed, target, stream: target === null ? null : `${who.tenant}/${target.stream}` }
      if (cache.size >= DECISIONS_PER_CLIENT) cache.clear() // a client walking many topics just recomputes
      cache.set(topic, d)
    }
    return d
  }

  const broker = new Aedes({
    id: config.gatewayId,
    persistence: deps.persistence as never,
    concurrency: 1000,
    heartbeatInterval: 60_000,

    preConnect (client, packet, callback) {
      connects.set(client, { clientId: packet.clientId ?? '', clean: packet.clean !== false, willTopic: packet.will?.topic })
      callback(null, true)
    },

    authenticate (client, username, password, done) {
      const info = connects.get(client) ?? { clientId: client.id, clean: true }
      const listener = listenerOf(client)
      // Checked first, before any password hashing. CONNACK 3 (server unavailable) and a close: refusing in
      // preConnect with callback(null, false) left the socket open with no answer at all.
      if (broker.connectedClients >= config.mqtt.maxConnections) {
        refuse(client, 'max-connections', `already ${broker.connectedClients} clients (mqtt.maxConnections)`)
        return done(authError(3, 'server unavailable: too many connections'), false)
      }
      // [MQTT-3.1.3-4] valid UTF-8 without U+0000 (mqtt-packet turns bad bytes into U+FFFD); ids that would shadow
      // Object.prototype members in aedes' client table are refused too.
      if (info.clientId.includes('\u0000') || info.clientId.includes('\ufffd') || RESERVED_IDS.has(info.clientId)) {
        refuse(client, 'invalid-client-id', `client id ${JSON.stringify(info.clientId)} is not allowed`)
        return done(authError(2, 'identifier rejected'), false)
      }
      // [MQTT-3.1.3-8] an empty client id needs a clean session.
      if (info.clientId === '' && !info.clean) {
        refuse(client, 'invalid-client-id', 'empty client id with clean session = false')
        return done(authError(2, 'identifier rejected'), false)
      }
      // A will is published as the client's own PUBLISH when it fires, so its topic is held to the same rules now,
      // not found wanting only when the client is gone.
      const willProblem = info.willTopic === undefined
        ? null
        : topicNameProblem(info.willTopic) ?? (isReplayTopic(info.willTopic) ? '$replay topics are the gateway\'s replays of the log' : null)
      if (willProblem !== null) {
        refuse(client, 'invalid-will', `will topic ${JSON.stringify(info.willTopic)}: ${willProblem}`)
        return done(authError(5, 'invalid will topic'), false)
      }
      // [MQTT-3.1.2-22] a password needs a username.
      if (username === undefined && password !== undefined) {
        refuse(client, 'protocol', 'password without username')
        return done(authError(4, 'password without username'), false)
      }
      const accept = (who: Identity): void => {
        identities.set(client, who)
        // Client ids are per tenant. aedes keys session takeover, stored subscriptions and offline queues by
        // client.id and reads it only after this hook, so a tenant's ids are scoped here; U+0000 is refused in
        // client ids above, so a scoped id never equals another tenant's (or tenant "default"'s unscoped) id.
        if (who.tenant !== 'default') (client as { id: string }).id = scopedClientId(who.tenant, who.clientId)
        watchPackets(client, (packet) => {
          mountUnsubscribe(packet, who.tenant)
          // A SUBSCRIBE over the limit is refused whole (every filter 0x80): tagged here, where its size is known.
          if (packet.cmd === 'subscribe' && packet.subscriptions !== undefined && packet.subscriptions.length > config.mqtt.maxFiltersPerSubscribe) {
            for (const sub of packet.subscriptions) oversized.add(sub)
          }
        })
        done(null, true)
      }
      // A bound user's client id is its own (auth.ts, ClientIdOwners): nobody unbound takes over its session.
      const refuseOwnedId = (who: string): void => {
        refuse(client, 'client-id-not-bound', `${who} may not connect as client id ${JSON.stringify(info.clientId)}: it is bound to another user (users[].clientIdPattern)`)
        done(authError(2, 'identifier rejected'), false)
      }
      // A device login is bound to its client id (the id names its topics, session and records): checked before
      // aedes looks the id up, so a wrong one takes over no session. [MQTT-3.1.3-9] CONNACK 2, identifier rejected.
      const acceptUser = (user: UserConfig): void => {
        const pattern = clientIdPattern(user)
        if (pattern !== null && !clientIdMatches(pattern, user.username, info.clientId)) {
          refuse(client, 'client-id-not-bound', `user ${JSON.stringify(user.username)} may not connect as client id ${JSON.stringify(info.clientId)} (users[].clientIdPattern: ${pattern})`)
          return done(authError(2, 'identifier rejected'), false)
        }
        if (pattern === null && owners.owned(user.tenant, info.clientId)) return refuseOwnedId(`user ${JSON.stringify(user.username)}`)
        accept({ tenant: user.tenant, role: user.role, username: user.username, clientId: client.id })
      }
      const certUser = certificateUser(client, listener)
      if (certUser !== undefined) {
        const user = users.get(certUser)
        if (user === undefined) {
          metrics.authFailures.inc({ listener: listener?.name ?? 'unknown' })
          refuse(client, 'bad-credentials', `certificate subject ${certUser} is not a configured user`)
          return done(authError(4, 'unknown certificate user'), false)
        }
        return acceptUser(user)
      }
      if (username === undefined) {
        const anonymousOk = listener?.allowAnonymous === true || (config.users.length === 0 && isLoopback(listener?.host ?? ''))
        if (!anonymousOk) {
          refuse(client, 'not-authorized', 'anonymous clients are not allowed on this listener')
          return done(authError(5, 'not authorized'), false)
        }
        if (owners.owned('default', info.clientId)) return refuseOwnedId('an anonymous client')
        return accept({ tenant: 'default', role: 'anonymous', username: null, clientId: client.id })
      }
      users.authenticate(username, password).then((user) => {
        if (user === null) {
          metrics.authFailures.inc({ listener: listener?.name ?? 'unknown' })
          refuse(client, 'bad-credentials', `bad username or password for ${JSON.stringify(username)}`)
          return done(authError(4, 'bad username or password'), false)
        }
        acceptUser(user)
      }, (err: unknown) => done(Object.assign(err as Error, { returnCode: 5 }), false))
    },

    authorizePublish (client, packet, callback) {
      // A will arrives here with its client when it fires (wills.ts): it is checked, mounted and (when routed)
      // logged like any publish of that client. Nothing may publish without a client: it would skip all of that.
      if (client === null) {
        logger.warn({ topic: packet.topic }, 'publish without a client refused')
        return callback(refusedError('a publish needs a client'))
      }
      const who = identities.get(client)
      // A record replicated by another edgemq's bridge over MQTT 3.1.1 carries its dedupe id in a topic prefix: it
      // is appended under that id, so a resend after the sender's reconnect or crash is acknowledged, not logged twice.
      const carried = splitDedupeTopic(packet.topic)
      if (carried !== null) {
        // The open local mode (no users, loopback) tells nobody apart, so its anonymous clients may; else an ACL
        // replicate grant. Per stream dedupe ids (store) keep one tenant's ids from touching another's records.
        const openLocal = who?.role === 'anonymous' && config.users.length === 0 && isLoopback(listenerOf(client)?.host ?? '')
        if (who === undefined || !(openLocal || mayReplicate(config.acl, who, carried.topic))) {
          refusePublish(client, who, 'invalid-topic', `${carried.topic}: publishing replicated ($dedupe/) records needs an ACL "replicate" grant`)
          return callback(refusedError('$dedupe/ topics are for bridges'))
        }
        packet.topic = carried.topic
      }
      const topic = packet.topic
      const problem = topicNameProblem(topic)
      if (who === undefined || problem !== null) {
        refusePublish(client, who, 'invalid-topic', problem ?? 'unknown client')
        return callback(refusedError(problem ?? 'unknown client'))
      }
      if (isReplayTopic(topic)) {
        // Nobody may pose as a replay. Acknowledged and dropped, like an ACL denial.
        refusePublish(client, who, 'reserved-topic', `${topic}: $replay topics are the gateway's replays of the log`)
        markDone(packet)
        return callback(null)
      }
      const decision = publishDecision(client, who, topic)
      if (!decision.allowed) {
        // As Mosquitto does: acknowledged, neither logged nor delivered, so the device does not retry forever.
        refusePublish(client, who, 'acl-denied', `${topic} not allowed`)
        markDone(packet)
        return callback(null)
      }
      packet.topic = mountTopic(who.tenant, topic)
      const target = decision.target
      if (target === null) {
        if (config.unrouted === 'reject') {
          refusePublish(client, who, 'unrouted', `no route for ${topic}`)
          return callback(refusedError(`no route for topic ${topic}`))
        }
        if (packet.qos === 2 && packet.messageId !== undefined) return beginQos2(client, packet, { deliver: () => deliverBeforeAck(packet, client) }, callback)
        return packet.qos === 0 ? callback(null) : publishBeforeAck(packet, client, callback)
      }
      const stream = decision.stream as string
      const qos = packet.qos
      // A firing will is logged together with the delete of its stored copy (wills.ts): once, across any kill.
      const will = firingWill(client, packet)
      if (carried !== null) {
        appendThen(client, who, stream, target.key, topic, packet, (err, duplicate) => {
          if (err) return callback(err)
          if (duplicate === true) { markDone(packet); return callback(null) } // already logged and delivered once
          if (qos === 0) return callback(null)
          publishBeforeAck(packet, client, callback)
        }, { dedupeId: `bridge/${carried.dedupeId}` }, { [ORIGIN_HEADER]: carried.dedupeId })
        return
      }
      if (qos === 2 && packet.messageId !== undefined) {
        // [MQTT-4.3.3-2] exactly once into the log: appended with the session's inbound packet entry in one batch,
        // unless that entry exists (inbound-qos2.ts). A will (no packet id) is appended like QoS 1.
        return beginQos2(client, packet, {
          append: (extraOps) => new Promise((resolve, reject) => {
            appendThen(client, who, stream, target.key, topic, packet, (err) => { if (err) reject(err); else resolve() }, { extraOps })
          }),
          deliver: () => deliverBeforeAck(packet, client),
        }, callback)
      }
      // QoS 0 waits for its append too: there is no ack to hold back, but the wait keeps the client's socket
      // paused while the log is busy, and delivery order equal to log order.
      appendThen(client, who, stream, target.key, topic, packet, (err) => {
        if (err) return callback(err)
        if (qos === 0) return callback(null)
        publishBeforeAck(packet, client, callback)
      }, will === undefined ? undefined : { extraOps: will })
    },

    authorizeSubscribe (client, sub, callback) {
      if (sessionMarkers.has(sub)) return callback(null, null) // see subscriptionsByClient below
      const who = identities.get(client)
      // aedes persists the SUBSCRIBE packet's own subscription objects, so the mount is applied to `sub` in place.
      // Subscriptions restored from a persistent session (before the CONNACK) are already mounted.
      const restoring = (client as unknown as { connackSent: boolean }).connackSent === false
      const filter = who === undefined ? null : restoring ? unmountTopic(who.tenant, sub.topic) : sub.topic
      const problem = filter === null ? 'not in the client\'s tenant' : topicFilterProblem(filter)
      const deny = (why: string, reason: SubscribeRefusal, code?: string): void => {
        metrics.subscriptionsRefused.inc({ tenant: who?.tenant ?? 'unknown', reason })
        logger.warn({ ...clientFields(client.id), tenant: who?.tenant, filter: filter ?? sub.topic, reason, code }, `subscription refused: ${why}`)
        callback(null, null) // SUBACK 0x80
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
          ticket = replays.prepare(replayConnection(client, who), who, filter)
        } catch (err) {
          if (!(err instanceof GatewayError)) throw err
          return deny(err.message, REPLAY_REFUSALS[err.code] ?? 'invalid-filter', err.code)
        }
        sub.topic = mountTopic(who.tenant, filter)
        tickets.set(sub, ticket)
        return callback(null, sub)
      }
      if (!isAllowed(config.acl, who, 'subscribe', filter)) return deny('ACL', 'acl-denied')
      sub.topic = mountTopic(who.tenant, filter)
      if (client.clean === false && !restoring) {
        let pending = toStore.get(client)
        if (pending === undefined) toStore.set(client, pending = [])
        pending.push(sub)
      }
      callback(null, sub)
    },

    authorizeForward (client, packet) {
      // Every caller hands over a packet of its own (a per-subscription copy, or a queued packet read back from
      // disk), and the reconnect path writes that very object rather than the returned one: unmount in place.
      const who = identities.get(client)
      if (who === undefined) return null
      const topic = unmountTopic(who.tenant, packet.topic)
      if (topic === null) return null
      // aedes' private subscription table (commands.ts reads it too); aedes has no public accessor.
      const subscriptions = (client as unknown as { subscriptions: Record<string, unknown> }).subscriptions
      if (topic.startsWith('$') && !dollarTopicSubscribed(who.tenant, Object.keys(subscriptions), topic)) return null
      // Read access is checked per message too, as Mosquitto does: a subscribe deny rule (admin/#) also holds
      // against a wider filter the client was granted (#).
      if (!isAllowed(config.acl, who, 'subscribe', topic)) return null
      packet.topic = topic
      return packet
    },
  })

  const { persistence } = deps
  // aedes' own bound on QoS 2 exchanges awaiting PUBREL (aedes.js constructor; its default is 1000).
  const inbound = new InboundQos2(persistence, (broker as unknown as { maxInflightInbound: number }).maxInflightInbound)
  const wills = installWills({
    persistence,
    logger,
    identityOf: (client) => identities.get(client as Client),
    recheck: (who) => identityNow(who, {
      users, owners, anonymous: config.mqtt.listeners.some((l) => l.allowAnonymous === true || (config.users.length === 0 && isLoopback(l.host))),
    }),
    fire: (will, who) => new Promise((resolve, reject) => {
      // A stand-in for the client that set the will: authorizePublish reads its identity, and appendThen retries
      // a failed append while it is open, as for a connected client.
      const client = { id: String(will.clientId), closed: false, conn: {} } as unknown as Client
      identities.set(client, who)
      const packet = will as unknown as PublishPacket
      startupWills.add(packet)
      broker.authorizePublish(client, packet, (err) => {
        if (err) return resolve() // refused, counted and logged like the client's own publish
        guarded(packet, client, (e) => { if (e) reject(e); else resolve() })
      })
    }),
  })

  // aedes 1.2.0 stores the whole SUBSCRIBE list once per filter, as it authorizes each (lib/handlers/subscribe.js,
  // storeSubscriptions): N filters cost N² writes, 11 s and 1 GiB for 1,000. The filters after it are not mounted
  // yet, refused ones are in it, and $replay subscriptions must never be stored. So the list is ignored: each call
  // stores what authorizeSubscribe accepted since the last one, its own filter among them.
  const addSubscriptions = persistence.addSubscriptions.bind(persistence)
  persistence.addSubscriptions = async (client) => {
    const pending = toStore.get(client)
    if (pending === undefined) return
    toStore.delete(client)
    await addSubscriptions(client, pending)
  }
  // [MQTT-3.2.2-2] CONNACK says a session is present when any session state is stored, but aedes 1.2.0 decides from
  // the stored subscriptions alone (lib/handlers/connect.js, restoreSubs: `arg.sessionPresent = !!arg.subs`;
  // https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/connect.js), so a session holding only queued,
  // unacknowledged or inbound QoS 2 messages, or nothing at all [MQTT-3.1.2-4], was answered 0. A marker
  // subscription makes that list non-empty; authorizeSubscribe refuses it silently, so nothing is subscribed
  // (restored subscriptions get no SUBACK). aedes calls subscriptionsByClient only for a CONNECT with clean = false,
  // before the CONNACK: the session is recorded there, so it exists for the next CONNECT even after a kill -9.
  const subscriptionsByClient = persistence.subscriptionsByClient.bind(persistence)
  persistence.subscriptionsByClient = async (client) => {
    const subs = await subscriptionsByClient(client)
    const present = subs.length > 0 || persistence.hasSessionState(client)
    await persistence.markSession(client)
    if (subs.length > 0 || !present) return subs
    const marker = { topic: '$edgemq/session-present', qos: 0 }
    sessionMarkers.add(marker)
    return [marker]
  }
  // A PUBACK that answers a replay message paces that replay; the session store never saw the message.
  const outgoingClearMessageId = persistence.outgoingClearMessageId.bind(persistence)
  persistence.outgoingClearMessageId = async (client, packet) => {
    const conn = replayConnections.get(client)
    if (conn !== undefined && packet.cmd === 'puback' && packet.messageId !== undefined && replays.acked(conn, packet.messageId)) return undefined
    return outgoingClearMessageId(client, packet)
  }
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
    held.delete(client)
    const conn = replayConnections.get(client)
    if (conn !== undefined) replays.stop(conn, topics)
  })

  // The second publish aedes makes after the PUBACK/PUBREC is a no-op for packets handled before the ack.
  const publish = (broker.publish as unknown as InternalPublish).bind(broker)
  const guarded: InternalPublish = (packet, client, done) => {
    if ((packet as PublishPacket & { [DONE]?: true })[DONE] === true) return done()
    publish(packet, client, done)
  }
  broker.publish = guarded as unknown as typeof broker.publish

  /**
   * The delete of the stored will when `packet` is a will firing: one fired at
   * startup (wills.ts, through `fire` below), or the will of a connection
   * aedes closed (lib/client.js close(): authorizePublish gets `client.will`).
   */
  function firingWill (client: Client, packet: PublishPacket): ExtraOperation[] | undefined {
    if (startupWills.has(packet)) return persistence.willDeleteOps(client)
    if ((client as unknown as { will?: unknown }).will === packet && wills.firesStoredWill(client)) return persistence.willDeleteOps(client)
    return undefined
  }

  /**
   * Whether a new filter goes over mqtt.maxFiltersPerSubscribe or mqtt.maxSubscriptionsPerSession. A filter the
   * client holds already only replaces its subscription. The count starts from aedes' table (restored subscriptions
   * included) and grows with each filter granted, so a SUBSCRIBE costs O(its filters), not O(held × filters).
   */
  function overLimit (client: Client, sub: Subscription, mounted: string): { reason: SubscribeRefusal, why: string } | null {
    if (oversized.has(sub)) {
      return { reason: 'too-many-filters', why: `a SUBSCRIBE with more than ${config.mqtt.maxFiltersPerSubscribe} filters (mqtt.maxFiltersPerSubscribe)` }
    }
    // aedes' private subscription table (authorizeForward reads it too); aedes has no public accessor.
    const table = (client as unknown as { subscriptions: Record<string, unknown> }).subscriptions
    if (table[mounted] !== undefined) return null
    const count = held.get(client) ?? Object.keys(table).length
    if (count >= config.mqtt.maxSubscriptionsPerSession) {
      return { reason: 'too-many-subscriptions', why: `the client holds ${count} subscriptions (mqtt.maxSubscriptionsPerSession)` }
    }
    held.set(client, count + 1)
    return null
  }

  function markDone (packet: PublishPacket): void {
    (packet as PublishPacket & { [DONE]?: true })[DONE] = true
  }

  function beginQos2 (client: Client, packet: PublishPacket, plan: Qos2Plan, callback: (err?: Error | null) => void): void {
    const begun = inbound.begin(client, packet, plan)
    if (begun === 'full') return callback(new Error(`more than ${String((broker as unknown as { maxInflightInbound: number }).maxInflightInbound)} QoS 2 messages awaiting PUBREL`))
    if (begun === 'duplicate') markDone(packet)
    callback(null)
  }

  function deliverBeforeAck (packet: PublishPacket, client: Client): Promise<void> {
    return new Promise((resolve, reject) => publishBeforeAck(packet, client, (err) => { if (err) reject(err); else resolve() }))
  }

  function publishBeforeAck (packet: PublishPacket, client: Client, callback: (err?: Error | null) => void): void {
    publish(packet, client, (err?: Error) => {
      if (err) return callback(err)
      markDone(packet)
      callback(null)
    })
  }

  /**
   * Appends and calls back once the record is durable. A failed write
   * (disk full, store error) is retried with backoff while the client is
   * connected: the ack is held back, the client's socket is not read, and
   * nothing is acknowledged that is not on disk.
   */
  /** The ingest counters of one stream, bound to their labels once (prom-client hashes label objects per inc). */
  const ingest = new Map<string, { messages: { inc (n?: number): void }, bytes: { inc (n?: number): void } }>()
  function ingestCounters (tenant: string, stream: string): { messages: { inc (n?: number): void }, bytes: { inc (n?: number): void } } {
    let c = ingest.get(stream)
    if (c === undefined) {
      const name = stream.slice(tenant.length + 1)
      c = { messages: metrics.ingestMessages.labels(tenant, name), bytes: metrics.ingestBytes.labels(tenant, name) }
      ingest.set(stream, c)
    }
    return c
  }

  function appendThen (client: Client, who: Identity, stream: string, key: string, topic: string, packet: PublishPacket,
    done: (err: Error | null, duplicate?: boolean) => void, options?: AppendOptions, headers?: Record<string, string>, delay = RETRY_MIN_MS): void {
    const payload = typeof packet.payload === 'string' ? Buffer.from(packet.payload) : packet.payload
    const counters = ingestCounters(who.tenant, stream)
    const stamped = who.username === null ? headers : { ...headers, [USER_HEADER]: who.username }
    const record = stamped === undefined ? { payload, topic, qos: packet.qos, clientId: who.clientId } : { payload, topic, qos: packet.qos, clientId: who.clientId, headers: stamped }
    store.append(stream, key, record, options).then((result) => {
      if (result.duplicate !== true) {
        counters.messages.inc()
        counters.bytes.inc(payload.byteLength)
      }
      if (delay !== RETRY_MIN_MS) deps.onStoreHealth(true)
      done(null, result.duplicate === true)
    }, (err: unknown) => {
      if (isStoreError(err, 'STORE_WRITE_FAILED') || isStoreError(err, 'STORE_CLOSED')) {
        deps.onStoreHealth(false, err) // the failed write itself was counted by the store observer (gateway.ts)
        if (packet.qos === 0 || client.closed || isStoreError(err, 'STORE_CLOSED')) {
          refusePublish(client, who, 'store-failed', (err as Error).message)
          return done(packet.qos === 0 ? null : err as Error)
        }
        setTimeout(() => appendThen(client, who, stream, key, topic, packet, done, options, headers, Math.min(delay * 2, RETRY_MAX_MS)), delay).unref()
        return
      }
      const reason: PublishRefusal = isStoreError(err, 'STORE_RECORD_TOO_LARGE') ? 'record-too-large' : 'store-failed'
      refusePublish(client, who, reason, (err as Error).message)
      done(err as Error)
    })
    if (store.pendingAppends > maxPending && !deps.guards.paused) {
      deps.guards.setPaused(true)
      metrics.backpressure.set(1)
      logger.warn({ pending: store.pendingAppends }, 'log backed up: pausing all MQTT sockets')
    }
  }

  broker.on('client', (client) => {
    const who = identities.get(client)
    metrics.connectedClients.inc({ tenant: who?.tenant ?? 'unknown', listener: listenerOf(client)?.name ?? 'unknown' })
  })
  broker.on('clientDisconnect', (client) => {
    const who = identities.get(client)
    metrics.connectedClients.dec({ tenant: who?.tenant ?? 'unknown', listener: listenerOf(client)?.name ?? 'unknown' })
  })
  broker.on('clientError', (client, err) => {
    if (alreadyReported(err)) return
    // A device that vanishes (power, network) resets its connection: that is news only when debugging.
    logger[isOrdinaryDisconnect(err) ? 'debug' : 'info']({ ...clientFields(client.id), err: err.message }, 'client error')
  })
  broker.on('connectionError', (client, err) => {
    if (alreadyReported(err)) return
    logger[isOrdinaryDisconnect(err) ? 'debug' : 'info']({ ...clientFields(client.id), err: err.message }, 'connection error')
  })

  return broker
}

/** A packet as aedes' parser emits it, with the fields watchPackets' callers change or read. */
interface ParsedPacket { cmd: string, unsubscriptions?: string[], subscriptions?: object[] }

/** The parts of an aedes client that watchPackets reaches into (aedes 1.2.0, lib/client.js). */
interface ClientParser {
  readonly _parser: {
    prependListener (event: 'packet', listener: (packet: ParsedPacket) => void): void
    /** Packets parsed before the CONNACK, handled once the client is connected; null afterwards. */
    readonly _queue: ParsedPacket[] | null
  }
}

/**
 * Calls `watch` with each packet of the client before aedes handles it: the
 * packets parsed before the tenant was known (waiting in aedes' queue until
 * the CONNACK) first, then each one as it is parsed. aedes has no hook for
 * UNSUBSCRIBE, nor one that sees a whole SUBSCRIBE.
 */
function watchPackets (client: Client, watch: (packet: ParsedPacket) => void): void {
  const parser = (client as unknown as ClientParser)._parser
  for (const packet of parser._queue ?? []) watch(packet)
  parser.prependListener('packet', watch)
}

/**
 * aedes looks the filters of an UNSUBSCRIBE up as the client sent them, but
 * authorizeSubscribe stored every subscription mounted (`<tenant>/<filter>`),
 * so an UNSUBSCRIBE removed nothing: its filters are mounted here.
 */
function mountUnsubscribe (packet: ParsedPacket, tenant: string): void {
  if (packet.cmd === 'unsubscribe' && packet.unsubscriptions !== undefined) {
    // A filter over MAX_CLIENT_TOPIC_LEVELS was never subscribed (SUBACK 0x80): left out, since mounted it is over
    // aedes' limit, which closed the connection instead of sending the UNSUBACK.
    packet.unsubscriptions = packet.unsubscriptions
      .filter((filter) => filter.split('/').length <= MAX_CLIENT_TOPIC_LEVELS).map((filter) => mountTopic(tenant, filter))
  }
}

/** Resumes sockets once the log has drained to half the bound. */
export function releaseBackpressure (guards: GuardGroup, store: LogStore, maxPending: number, metrics: GatewayMetrics): void {
  if (guards.paused && store.pendingAppends <= maxPending / 2) {
    guards.setPaused(false)
    metrics.backpressure.set(0)
  }
}

function certificateUser (client: Client, listener: ListenerConfig | undefined): string | undefined {
  if (listener?.tls?.certIdentity !== true) return undefined
  const cn: unknown = (client.conn as unknown as ListenerTagged).tlsSocket?.getPeerCertificate()?.subject?.CN
  return typeof cn === 'string' && cn !== '' ? cn : undefined
}
