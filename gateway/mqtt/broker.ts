/**
 * The aedes broker, assembled. Each hook lives in its own module under
 * hooks/ (as aedes keeps one handler per packet type) and is a thin adapter
 * over the pure functions in access/ and routing.ts:
 *
 * | hook / event                          | module                     |
 * | ------------------------------------- | -------------------------- |
 * | preConnect, authenticate              | hooks/authenticate.ts      |
 * | authorizePublish (append before ack)  | hooks/authorize-publish.ts, hooks/durable-append.ts |
 * | authorizeSubscribe                    | hooks/authorize-subscribe.ts |
 * | authorizeForward                      | hooks/authorize-forward.ts |
 * | stored subscriptions, session present | hooks/sessions.ts          |
 * | $replay start/stop/PUBACK             | hooks/replays.ts           |
 * | $share join/leave/PUBACK              | shared/aedes-hooks.ts      |
 * | wills stored by a dead process        | wills.ts, hooks/startup-wills.ts |
 * | inbound QoS 2                         | inbound-qos2.ts            |
 * | client and connection events          | hooks/client-events.ts     |
 *
 * Every reach into aedes beyond its public API is in aedes-internals.ts.
 * Tenants are mount points: inside the broker every topic is
 * `<tenant>/<topic>`; the authorize hooks add the prefix and authorizeForward
 * removes it.
 */
import { Aedes, type Client } from 'aedes'
import type { Logger } from 'pino'
import type { LogStore } from '../../store/index.ts'
import { ClientIdOwners, UserDirectory, type Identity } from '../access/auth.ts'
import type { GatewayConfig } from '../config/config.ts'
import type { GatewayMetrics } from '../metrics/metrics.ts'
import { interceptPublish } from './aedes-internals.ts'
import type { GuardGroup } from './connection-guard.ts'
import { authenticate, preConnect } from './hooks/authenticate.ts'
import { authorizeForward } from './hooks/authorize-forward.ts'
import { authorizePublish } from './hooks/authorize-publish.ts'
import { authorizeSubscribe } from './hooks/authorize-subscribe.ts'
import { installClientEvents } from './hooks/client-events.ts'
import { DurableAppender } from './hooks/durable-append.ts'
import { anonymousAllowed, isPublished, LIVE_DELIVERIES, refusals, type BrokerPersistence, type ConnectInfo, type HookContext } from './hooks/context.ts'
import { installReplayHooks } from './hooks/replays.ts'
import { installCursorDelivery, installSessionHooks } from './hooks/sessions.ts'
import { fireStartupWill } from './hooks/startup-wills.ts'
import { InboundQos2 } from './inbound-qos2.ts'
import { MqttReplays } from './replay.ts'
import { ShareHooks } from './shared/aedes-hooks.ts'
import { SharedSubscriptions } from './shared/share-groups.ts'
import { identityNow, installWills, type Wills } from './wills.ts'

export { ORIGIN_HEADER } from './hooks/authorize-publish.ts'
export { USER_HEADER, releaseBackpressure } from './hooks/durable-append.ts'
export { isLoopback, type BrokerPersistence, type ListenerTagged } from './hooks/context.ts'

/**
 * aedes' bound on QoS 2 exchanges awaiting PUBREL per client (its own default), given to aedes and to
 * inbound-qos2.ts, which enforces it on the path where aedes' own check is skipped.
 */
const MAX_INFLIGHT_INBOUND = 1000

/**
 * Topic aliases an MQTT 5 client may set up towards the gateway (advertised in the CONNACK), as Mosquitto's default
 * max_topic_alias. The guard lets an empty PUBLISH topic through for v5; aedes resolves it, or answers DISCONNECT 0x94.
 */
const TOPIC_ALIAS_MAXIMUM = 10

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

/** The broker and what the gateway's shutdown needs of it. */
export interface Broker {
  readonly aedes: Aedes
  /** Resolves once every append a client's publish started has settled, and the shares' commits (the shutdown's "drain appends"). */
  appendsSettled (): Promise<void>
  /** Deletes a shared subscription's consumer group (shared/share-groups.ts deleteGroup): refused while it has members. */
  deleteShareGroup (id: string): Promise<void>
  /** The wills of a previous process still waiting for their delay (sessions/expiry.ts fires one when its session ends). */
  readonly wills: Wills
}

export function createBroker (deps: BrokerDeps): Broker {
  const { config, store, metrics, logger, persistence } = deps
  const users = new UserDirectory(config.users)
  const owners = new ClientIdOwners(config.users)
  const broker = new Aedes({
    id: config.gatewayId,
    persistence: persistence as never,
    concurrency: LIVE_DELIVERIES,
    heartbeatInterval: 60_000,
    maxInflightInbound: MAX_INFLIGHT_INBOUND,
    // MQTT 5 CONNACK properties. The listeners' guards enforce maxPacketBytes first (with DISCONNECT 0x95), and hand
    // aedes at most maxInflightPerClient packets of a connection at a time (the socket is paused beyond it, and while
    // the log is backed up): the receive maximum a client is asked to keep to. An MQTT 5 client with more QoS 1/2
    // publishes unacknowledged gets DISCONNECT 0x93; towards it, the guard keeps to the client's receive maximum
    // (receive-maximum.ts).
    maximumPacketSize: config.mqtt.maxPacketBytes,
    receiveMaximum: config.mqtt.maxInflightPerClient,
    topicAliasMaximum: TOPIC_ALIAS_MAXIMUM,
    // The gateway implements `$share/` (mqtt/shared/) for MQTT 5 clients as for 3.1.1 ones; the patch of aedes lets
    // their SUBSCRIBE through to authorizeSubscribe and makes the CONNACK say Shared Subscription Available = 1.
    sharedSubscriptions: true,
    // mqtt.sessionExpirySeconds bounds every session's time offline: an MQTT 5 client asking for longer is told the bound in
    // the CONNACK (MQTT 5 3.2.2.3.2), and aedes caps its will delay by it too (3.1.3.2.2; sessions/expiry.ts, wills.ts).
    sessionExpiryIntervalLimit: config.mqtt.sessionExpirySeconds,
  })
  const identities = new WeakMap<Client, Identity>()
  const connects = new WeakMap<Client, ConnectInfo>()
  const refusing = refusals(deps, connects)
  const appender = new DurableAppender({ ...deps, ...refusing })
  const shares = new SharedSubscriptions({
    store, broker, routes: config.routes, acl: config.acl, metrics, logger,
    inflight: config.mqtt.share.inflight, holdRetention: config.mqtt.share.holdRetention, maxPerTenant: config.mqtt.share.maxPerTenant,
  })
  const shareHooks = new ShareHooks(shares)
  const ctx: HookContext = {
    ...deps,
    broker,
    // The publish aedes makes after the PUBACK/PUBREC is a no-op for packets authorizePublish published itself (before the ack,
    // or started with it: hooks/authorize-publish.ts).
    publish: interceptPublish(broker, isPublished),
    replays: new MqttReplays({ store, routes: config.routes, acl: config.acl, limits: config.mqtt.replay, metrics, logger }),
    inbound: new InboundQos2(persistence, MAX_INFLIGHT_INBOUND),
    appender,
    wills: installWills({
      persistence,
      logger,
      identityOf: (client) => identities.get(client as Client),
      recheck: (who) => identityNow(who, { users, owners, anonymous: config.mqtt.listeners.some((l) => anonymousAllowed(config, l)) }),
      fire: (will, who) => fireStartupWill(ctx, will, who),
    }),
    identities,
    connects,
    connacked: new WeakSet(),
    toStore: new WeakMap(),
    oversized: new WeakSet(),
    sessionMarkers: new WeakSet(),
    startupWills: new WeakSet(),
    tickets: new WeakMap(),
    replayConnections: new WeakMap(),
    shares: shareHooks,
    ...refusing,
  }
  // Handlers are public, settable properties of the broker (aedes docs/Aedes.md); set once the context exists.
  broker.preConnect = preConnect(ctx)
  broker.authenticate = authenticate(ctx, users, owners)
  broker.authorizePublish = withoutWillOnlyProperties(authorizePublish(ctx))
  broker.authorizeSubscribe = authorizeSubscribe(ctx)
  broker.authorizeForward = authorizeForward(ctx)
  installSessionHooks(ctx)
  installCursorDelivery(ctx)
  installReplayHooks(ctx)
  shareHooks.install(ctx)
  installClientEvents(ctx)
  // Once the clients are gone: the shares' last commits, so a graceful restart sends less again.
  return {
    aedes: broker,
    wills: ctx.wills,
    appendsSettled: async () => { await appender.settled(); await shares.close() },
    deleteShareGroup: async (id) => { await shares.deleteGroup(id) },
  }
}

/**
 * A will is published with its will properties, and aedes passes them on as they are; the Will Delay Interval is a
 * CONNECT-only property a PUBLISH may not carry [MQTT-3.3.2.3] (Paho's MQTT 5 client refuses such a packet, so a
 * subscriber never got the will). Every will passes authorizePublish (aedes' publishWill and its sweep, the delayed
 * wills, the startup wills of wills.ts): it is dropped there, before the message is logged or forwarded.
 */
function withoutWillOnlyProperties (authorize: NonNullable<Aedes['authorizePublish']>): NonNullable<Aedes['authorizePublish']> {
  return (client, packet, callback) => {
    const properties = (packet as { properties?: Record<string, unknown> }).properties
    if (properties !== undefined && properties.willDelayInterval !== undefined) {
      const { willDelayInterval: _delay, ...rest } = properties
      ;(packet as { properties?: Record<string, unknown> }).properties = rest
    }
    authorize(client, packet, callback)
  }
}
