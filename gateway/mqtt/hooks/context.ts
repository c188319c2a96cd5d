/**
 * What the aedes hooks share: the gateway's parts, the identity each client
 * authenticated with, and the per-connection state that one hook records and
 * another reads (a subscription authorizeSubscribe accepted, a $replay ticket
 * waiting for its SUBACK, a packet delivered before its ack). broker.ts builds
 * one per broker; each hook module takes it and returns its handler.
 */
import type { Aedes, Client, PublishPacket, Subscription } from 'aedes'
import type { TLSSocket } from 'node:tls'
import type { Logger } from 'pino'
import type { LogStore } from '../../../store/index.ts'
import type { Identity } from '../../access/auth.ts'
import type { GatewayConfig, ListenerConfig } from '../../config/config.ts'
import { GatewayError } from '../../errors.ts'
import { clientFields } from '../../logger.ts'
import type { GatewayMetrics, PublishRefusal, RefusalReason } from '../../metrics/metrics.ts'
import type { GuardGroup } from '../connection-guard.ts'
import type { InboundQos2, Qos2Persistence } from '../inbound-qos2.ts'
import type { ReasonCode } from '../reason-codes.ts'
import type { CursorConnector } from '../sessions/cursors.ts'
import type { AckWait } from '../sessions/persistence.ts'
import type { LogPosition } from '../log-position.ts'
import type { MqttReplays, ReplayConnection, ReplayTicket } from '../replay.ts'
import type { InternalPublish } from '../aedes-internals.ts'
import type { ShareAdmission } from '../shared/aedes-hooks.ts'
import type { WillPersistence, Wills } from '../wills.ts'
import type { DurableAppender } from './durable-append.ts'

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
  forwardLive (client: Client, packet: { topic: string, qos: number, payload: unknown, brokerId?: string, brokerCounter?: number }): boolean
  /** What the ack of a logged message waits for so that persistent sessions find it after a kill (hooks/authorize-publish.ts). */
  beforeAck (topic: string, qos: number, position: LogPosition): AckWait
  /** How the session's cursors reach a connected client (hooks/sessions.ts installs it). */
  deliverCursorsThrough (connector: CursorConnector): void
}

export interface ConnectInfo { readonly clientId: string, readonly clean: boolean, readonly willTopic?: string }

export interface HookDeps {
  readonly config: GatewayConfig
  readonly store: LogStore
  readonly persistence: BrokerPersistence
  readonly metrics: GatewayMetrics
  readonly logger: Logger
  /** Called when a write to the log failed (the gateway turns unhealthy) or succeeded again. */
  readonly onStoreHealth: (healthy: boolean, err?: Error) => void
  /** The gateway's connections, paused together when the log backs up. */
  readonly guards: GuardGroup
}

export interface HookContext extends HookDeps {
  readonly broker: Aedes
  /** aedes' own broker.publish (before broker.ts made it skip packets published before their ack). */
  readonly publish: InternalPublish
  readonly replays: MqttReplays
  readonly inbound: InboundQos2
  /** The append authorizePublish waits for before the ack. */
  readonly appender: DurableAppender
  readonly wills: Wills
  /** The identity authenticate gave each client. */
  readonly identities: WeakMap<Client, Identity>
  /** The CONNECT fields preConnect saw, as the device sent them. */
  readonly connects: WeakMap<Client, ConnectInfo>
  /** Clients whose CONNACK is out (aedes' public `connackSent` event): subscriptions before it are restored ones. */
  readonly connacked: WeakSet<Client>
  /** Subscriptions of persistent sessions that authorizeSubscribe accepted, until aedes stores them (hooks/sessions.ts). */
  readonly toStore: WeakMap<Client, Subscription[]>
  /** The filters of every SUBSCRIBE over mqtt.maxFiltersPerSubscribe, tagged as it is parsed (hooks/authenticate.ts). */
  readonly oversized: WeakSet<object>
  /** Marker subscriptions that only make aedes answer sessionPresent = 1 (hooks/sessions.ts). */
  readonly sessionMarkers: WeakSet<object>
  /** Stored wills fired at startup (wills.ts), whose append deletes them. */
  readonly startupWills: WeakSet<object>
  /** $replay subscriptions accepted, until their SUBACK is out. */
  readonly tickets: WeakMap<Subscription, ReplayTicket>
  /** The replay side of each client that asked for a replay (or joined a shared subscription, which writes to it likewise). */
  readonly replayConnections: WeakMap<Client, ReplayConnection>
  /** Where authorizeSubscribe hands $share subscriptions (shared/aedes-hooks.ts). */
  readonly shares: ShareAdmission
  /** Counts and logs a refused connection. */
  refuse (client: Client, reason: RefusalReason, detail: string): void
  /** Whether the connection was refused (and logged) by {@link refuse}: aedes' own error about it is not logged again. */
  refused (client: Client): boolean
  /** Counts a refused publish; logs it once per connection and reason. */
  refusePublish (client: Client, who: Identity | undefined, reason: PublishRefusal, detail: string): void
}

/**
 * Deliveries aedes runs at once (its `concurrency`, broker.ts; it queues the rest), and the most deliveries of
 * acknowledged messages authorizePublish lets be under way before acks wait for delivery again: backpressure from a
 * slow subscriber to the publishers (DESIGN.md guarantee 6) instead of a queue in memory.
 */
export const LIVE_DELIVERIES = 1000

/** Marks an error whose refusal was already counted and logged, so aedes' clientError does not log it again. */
const REFUSED = Symbol('edgemq.refused')
/** Marks a packet whose publish authorizePublish ran itself (before the ack, or started with it): aedes' own after the ack skips it. */
const DONE = Symbol('edgemq.published')

/** An error for aedes' authenticate callback: `returnCode` is the CONNACK code (2–5); already counted and logged. */
export function authError (returnCode: 2 | 3 | 4 | 5, message: string): GatewayError & { returnCode: number } {
  return Object.assign(new GatewayError('GW_CONNECT_REFUSED', message), { returnCode, [REFUSED]: true })
}

/**
 * An error for a refused PUBLISH that was already counted and logged: aedes closes an MQTT 3.1.1 connection for it;
 * an MQTT 5 client gets `reasonCode` on its PUBACK/PUBREC (reason-codes.ts) and keeps its connection.
 */
export function refusedError (message: string, reasonCode: ReasonCode, cause?: unknown): GatewayError & { reasonCode: ReasonCode } {
  return Object.assign(new GatewayError('GW_PUBLISH_REFUSED', message, { cause }), { reasonCode, [REFUSED]: true })
}

export function alreadyReported (err: Error): boolean {
  return (err as Error & { [REFUSED]?: boolean })[REFUSED] === true
}

export function markPublished (packet: PublishPacket): void {
  (packet as PublishPacket & { [DONE]?: true })[DONE] = true
}

export function isPublished (packet: PublishPacket): boolean {
  return (packet as PublishPacket & { [DONE]?: true })[DONE] === true
}

export function listenerOf (client: Client): ListenerConfig | undefined {
  return (client.conn as unknown as ListenerTagged).listener
}

export function isLoopback (host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host)
}

/** Whether a listener lets clients in without a login: on purpose, or the open local mode (no users, loopback). */
export function anonymousAllowed (config: GatewayConfig, listener: ListenerConfig | undefined): boolean {
  return listener?.allowAnonymous === true || (config.users.length === 0 && isLoopback(listener?.host ?? ''))
}

/** The refusal bookkeeping every hook uses; `connects` names the client as the device sent its id. */
export function refusals (deps: Pick<HookDeps, 'metrics' | 'logger'>, connects: WeakMap<Client, ConnectInfo>):
  Pick<HookContext, 'refuse' | 'refused' | 'refusePublish'> {
  const { metrics, logger } = deps
  const refusedClients = new WeakSet<Client>()
  /** Reasons already logged per connection: a device repeating a refused publish is counted every time, logged once. */
  const logged = new WeakMap<Client, Set<PublishRefusal>>()
  return {
    refuse (client, reason, detail) {
      refusedClients.add(client)
      const listener = listenerOf(client)?.name ?? 'unknown'
      metrics.connectionsRefused.inc({ listener, reason })
      // The id as the device sent it (a refused one may hold U+0000: the log shows it escaped); never the scoped key.
      const clientId = connects.get(client)?.clientId ?? clientFields(client.id).clientId
      logger.warn({ clientId, listener, reason }, `connection refused: ${detail}`)
    },
    refused: (client) => refusedClients.has(client),
    refusePublish (client, who, reason, detail) {
      metrics.publishesRefused.inc({ tenant: who?.tenant ?? 'unknown', reason })
      let reasons = logged.get(client)
      if (reasons === undefined) logged.set(client, reasons = new Set())
      if (reasons.has(reason)) return
      reasons.add(reason)
      logger.warn({ ...clientFields(who?.clientId ?? client.id), tenant: who?.tenant, reason },
        `publish refused: ${detail} (further refusals of this connection for the same reason are only counted)`)
    },
  }
}
