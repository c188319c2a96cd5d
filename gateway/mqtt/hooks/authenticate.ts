/**
 * preConnect and authenticate: who a connection is (CONNECT, MQTT 3.1.1
 * §3.1). Refusals answer CONNACK 2–5 and close; each is counted and logged
 * once. An accepted client gets its tenant's identity, its id scoped per
 * tenant, and its UNSUBSCRIBE filters mounted.
 */
import type { AedesOptions, Client } from 'aedes'
import { ClientIdOwners, clientIdMatches, clientIdPattern, UserDirectory, type Identity } from '../../access/auth.ts'
import { MAX_CLIENT_TOPIC_LEVELS, mountTopic, scopedClientId, topicNameProblem } from '../../access/topics.ts'
import type { ListenerConfig, UserConfig } from '../../config/config.ts'
import { forgetConnectPacket, packetWatcher, setClientId } from '../aedes-internals.ts'
import { ConnectionGuard } from '../connection-guard.ts'
import { isReplayTopic } from '../replay.ts'
import { isShareTopic } from '../shared/share-topic.ts'
import { anonymousAllowed, authError, listenerOf, type HookContext, type ListenerTagged } from './context.ts'

type PreConnect = NonNullable<AedesOptions['preConnect']>
type Authenticate = NonNullable<AedesOptions['authenticate']>

/** Client ids that would collide with Object.prototype members in aedes' client table. */
const RESERVED_IDS = new Set(Object.getOwnPropertyNames(Object.prototype))

/** Records the CONNECT fields as the device sent them (authenticate and refusals read them). */
export function preConnect (ctx: Pick<HookContext, 'connects' | 'refuse'>): PreConnect {
  return (client, packet, callback) => {
    const info = { clientId: packet.clientId ?? '', clean: packet.clean !== false, willTopic: packet.will?.topic }
    ctx.connects.set(client, info)
    forgetConnectPacket(client, packet)
    // Outbound topic aliases, when the client allows them (topic-aliases.ts); the guard is the connection aedes was given.
    const aliases = packet.protocolVersion === 5 ? packet.properties?.topicAliasMaximum : undefined
    if (aliases !== undefined && aliases > 0 && client.conn instanceof ConnectionGuard) client.conn.aliasTopics(aliases)
    // [MQTT-3.1.3-8] an empty client id needs a clean session in 3.1.1 (MQTT 5 assigns one, 3.1.3.1). aedes 2 answers
    // CONNACK 2 itself before authenticate runs (lib/handlers/connect.js init): counted and logged here.
    if (info.clientId === '' && !info.clean && packet.protocolVersion !== 5) {
      ctx.refuse(client, 'invalid-client-id', 'empty client id with clean session = false')
    }
    callback(null, true)
  }
}

export function authenticate (ctx: HookContext, users: UserDirectory, owners: ClientIdOwners): Authenticate {
  const { config, metrics, broker, refuse } = ctx
  const watchPackets = packetWatcher({
    // A SUBSCRIBE over the limit is refused whole (authorize-subscribe.ts): tagged here, where its size is known.
    subscribe (_client, subs) {
      if (subs.length > config.mqtt.maxFiltersPerSubscribe) for (const sub of subs) ctx.oversized.add(sub)
      // A share delivers at most QoS 1 (shared/share-groups.ts); aedes takes the granted QoS from the packet before authorizeSubscribe.
      for (const sub of subs as Array<{ topic?: unknown, qos?: unknown }>) {
        if (sub.qos === 2 && typeof sub.topic === 'string' && isShareTopic(sub.topic)) sub.qos = 1
      }
    },
    unsubscribe (client, filters) {
      const tenant = ctx.identities.get(client)?.tenant
      if (tenant === undefined) return filters
      // A filter over MAX_CLIENT_TOPIC_LEVELS was never subscribed (SUBACK 0x80): left out, since mounted it is over
      // aedes' limit, which closed the connection instead of sending the UNSUBACK.
      return filters.filter((filter) => filter.split('/').length <= MAX_CLIENT_TOPIC_LEVELS).map((filter) => mountTopic(tenant, filter))
    },
  })
  return (client, username, password, done) => {
    const info = ctx.connects.get(client) ?? { clientId: client.id, clean: true }
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
    // A will is published as the client's own PUBLISH when it fires, so its topic is held to the same rules now,
    // not found wanting only when the client is gone.
    const reserved = (topic: string): string | null => isReplayTopic(topic) || isShareTopic(topic) ? '$replay and $share are subscriptions, not topics' : null
    const willProblem = info.willTopic === undefined ? null : topicNameProblem(info.willTopic) ?? reserved(info.willTopic)
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
      ctx.identities.set(client, who)
      ctx.connects.delete(client) // read until here only (refusals); an idle connection keeps no copy of its CONNECT
      // Client ids are per tenant. aedes keys session takeover, stored subscriptions and offline queues by
      // client.id and reads it only after this hook, so a tenant's ids are scoped here; U+0000 is refused in
      // client ids above, so a scoped id never equals another tenant's (or tenant "default"'s unscoped) id.
      if (who.tenant !== 'default') setClientId(client, scopedClientId(who.tenant, who.clientId))
      watchPackets(client)
      done(null, true)
    }
    // A bound user's client id is its own (auth.ts, ClientIdOwners): nobody unbound takes over its session.
    const refuseOwnedId = (who: string): void => {
      const id = JSON.stringify(info.clientId)
      refuse(client, 'client-id-not-bound', `${who} may not connect as client id ${id}: it is bound to another user (users[].clientIdPattern)`)
      done(authError(2, 'identifier rejected'), false)
    }
    // A device login is bound to its client id (the id names its topics, session and records): checked before
    // aedes looks the id up, so a wrong one takes over no session. [MQTT-3.1.3-9] CONNACK 2, identifier rejected.
    const acceptUser = (user: UserConfig): void => {
      const pattern = clientIdPattern(user)
      if (pattern !== null && !clientIdMatches(pattern, user.username, info.clientId)) {
        const who = `user ${JSON.stringify(user.username)}`
        refuse(client, 'client-id-not-bound', `${who} may not connect as client id ${JSON.stringify(info.clientId)} (users[].clientIdPattern: ${pattern})`)
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
      if (!anonymousAllowed(config, listener)) {
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
  }
}

/**
 * UNSUBSCRIBE names filters as the client sent them, but authorizeSubscribe stored every subscription mounted
 * (`<tenant>/<filter>`): the filters are mounted before aedes looks them up (aedes-internals.ts).
 */
function certificateUser (client: Client, listener: ListenerConfig | undefined): string | undefined {
  if (listener?.tls?.certIdentity !== true) return undefined
  const cn: unknown = (client.conn as unknown as ListenerTagged).tlsSocket?.getPeerCertificate()?.subject?.CN
  return typeof cn === 'string' && cn !== '' ? cn : undefined
}
