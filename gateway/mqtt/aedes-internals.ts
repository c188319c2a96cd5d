/**
 * Every reach into aedes beyond its public API, in one place. aedes is
 * 2.0.0-beta.1 with patches/aedes+2.0.0-beta.1.patch (the security fixes of
 * 1.2.0, the reason code of an authorizePublish or authorizeSubscribe error,
 * the sharedSubscriptions option, and for idle memory: one shared 'close'
 * listener per connection instead of stream.finished(), the packets queued
 * before the CONNACK handled without a once('connected') listener, the drain
 * callbacks' array and the delivery functions made on first use; and aedes'
 * own deliveries that no persistence keeps hold their packet ids until
 * acknowledged, see skipHeldPacketIds); each entry below was
 * re-read against it (2026-12-02) and still holds. Source links cite v1.2.0
 * where the code they point at is unchanged in 2.0.0-beta.1.
 *
 * aedes' public surface is its option hooks (preConnect, authenticate,
 * authorize*, published), its events, `broker.publish`, `broker.handle` and
 * the `Client` of types/client.d.ts. The gateway needs more: an ack that waits
 * for the log, tenant mount points that UNSUBSCRIBE honours, packet ids shared
 * with replays and commands, CONNACK session-present from any session state,
 * wills that survive a crash, idle connections that keep little. Each function
 * below is one such reach: it says why it is needed, where aedes does the thing
 * it works around (source line of the installed version) and the upstream
 * issue or PR, or that there is none and which public API would remove it.
 * When aedes is upgraded, this file is the checklist: every entry must be
 * re-read against the new source.
 *
 * Nothing else in gateway/ reads an underscore field of aedes, casts an aedes
 * object to reach a field its typings do not declare, or replaces a method of
 * aedes or of the session persistence aedes calls.
 */
import type { Aedes, Client, PublishPacket } from 'aedes'
import { BufferList } from 'bl'
import type { Duplex } from 'node:stream'

// --- clients ---------------------------------------------------------------------------------------------------------

/**
 * The part of an aedes client that hands out packet ids: the counter, and (our aedes patch, lib/client.js
 * deliverQoS) the ids of aedes' own deliveries that no persistence keeps, awaiting their PUBACK/PUBCOMP; null or
 * absent until the client's first such delivery.
 */
interface PacketIdCounter { _nextId: number, _outboundInflight?: ReadonlySet<number> | null }

/**
 * Takes the next packet id of the client's own counter, as aedes' QoS 1/2 deliveries do
 * (`client._nextId`, https://github.com/moscajs/aedes/blob/v1.2.0/lib/qos-packet.js), so a replay or a command written by the gateway never picks an
 * id a live delivery holds. Like aedes' take in our patch (lib/qos-packet.js), it passes over the ids aedes holds
 * itself (`_outboundInflight`, see {@link skipHeldPacketIds}); the counter passes over every other holder's.
 * aedes has no allocator to call; upstream treats `_nextId` as settable by users
 * (https://github.com/moscajs/aedes/pull/414 guards `>= 65535` for that reason). Public API that would remove it:
 * `client.nextMessageId()`.
 */
export function nextPacketId (client: Client): number {
  const counter = client as unknown as PacketIdCounter
  const held = counter._outboundInflight
  let id = counter._nextId
  for (let k = 0; held != null && k < 65535 && held.has(id); k++) {
    counter._nextId = id >= 65535 ? 1 : id + 1
    id = counter._nextId
  }
  counter._nextId = id >= 65535 ? 1 : id + 1
  return id
}

/** What holds packet ids of one client's counter: by holder, and the same predicates as a list for the hot path. */
interface IdHolders {
  readonly byHolder: Map<object, (messageId: number) => boolean>
  list: Array<(messageId: number) => boolean>
}

/** Per client, what holds packet ids its counter skips (one accessor per client; {@link skipHeldPacketIds}). */
const holders = new WeakMap<Client, IdHolders>()

/**
 * Makes the client's packet id counter (`client._nextId`, as {@link nextPacketId} reads it) skip the ids `held`
 * says `holder` has taken, for every taker: aedes writes retained messages on SUBSCRIBE, and every delivery to a
 * clean session, with the id it takes from the counter, without asking the persistence
 * (https://github.com/moscajs/aedes/blob/v1.2.0/lib/client.js deliverQoS: `if (that.clean || packet.retain)
 * doWriteQoS()`; lib/qos-packet.js reads `client._nextId`, then increments it). Persistent sessions' deliveries from
 * the log and their queued copies hold ids for as long as they are unacknowledged, across reconnects
 * (sessions/cursors.ts), and so do replays, shared subscriptions' members and commands: after 65,535 others the
 * counter comes back to them, and a writer that skipped only its own ids would hand out one another holds (two
 * PUBLISHes in flight with one id). Stock aedes keeps no in-flight state for those deliveries of its own; our aedes
 * patch does: each QoS 1/2 delivery aedes writes (lib/client.js writeQoS) holds its id in `client._outboundInflight`
 * from the write until its PUBACK (QoS 1) or PUBCOMP (QoS 2; an MQTT 5 PUBREC with an error code ends it too)
 * reaches aedes' handler, or the connection ends (the Set is the connection's); at most 1,024 at once (MAX_HELD_IDS:
 * a client that acknowledges nothing would otherwise make every take try all 65,535 ids, and keep a Set of them).
 * Both takes pass over those ids, aedes' (lib/qos-packet.js) and {@link nextPacketId}, so they need no holder here:
 * one here would put this accessor and its closures on every client that ever gets a QoS 1 message. A PUBACK the
 * cursors take from the bytes (ConnectionGuard.pubacks) never answers one of them: the cursors take only the ids
 * they hold, which the counter never gives aedes. One predicate per holder (a
 * later one replaces it), all asked by one accessor on the client; aedes treats `_nextId` as a plain settable number
 * (https://github.com/moscajs/aedes/pull/414). No upstream issue; public API that would remove it:
 * `client.nextMessageId()` with an in-flight set aedes skips.
 */
export function skipHeldPacketIds (client: Client, holder: object, held: (messageId: number) => boolean): void {
  let ids = holders.get(client)
  if (ids === undefined) {
    const all: IdHolders = { byHolder: new Map(), list: [] }
    ids = all
    holders.set(client, all)
    const isHeld = (id: number): boolean => {
      const list = all.list
      for (let i = 0; i < list.length; i++) if ((list[i] as (messageId: number) => boolean)(id)) return true
      return false
    }
    const counter = client as unknown as { _nextId: number }
    let next = counter._nextId
    Object.defineProperty(client, '_nextId', {
      configurable: true,
      enumerable: true,
      get () {
        for (let k = 0; k < 65535 && isHeld(next); k++) next = next >= 65535 ? 1 : next + 1
        return next
      },
      set (value: number) { next = value },
    })
  }
  if (ids.byHolder.get(holder) === held) return
  ids.byHolder.set(holder, held)
  ids.list = [...ids.byHolder.values()]
}

/** The holder holds no more of the client's packet ids ({@link skipHeldPacketIds}). */
export function releaseHeldPacketIds (client: Client, holder: object): void {
  const ids = holders.get(client)
  if (ids === undefined || !ids.byHolder.delete(holder)) return
  ids.list = [...ids.byHolder.values()]
}

/**
 * Restarts the client's keepalive timer, as aedes does for every packet it handles
 * (https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/index.js: `client._keepaliveTimer.refresh()`): PUBACKs the
 * gateway takes from the bytes before aedes parses them (ConnectionGuard.pubacks) are packets from the client too,
 * and a subscriber draining a backlog may send nothing else for longer than its keepalive. No upstream issue; public
 * API that would remove it: `client.refreshKeepalive()`, or a hook that consumes a packet.
 */
export function refreshKeepalive (client: Client): void {
  const internals = client as unknown as { _keepaliveInterval: number, _keepaliveTimer: NodeJS.Timeout | null }
  if (internals._keepaliveInterval > 0) internals._keepaliveTimer?.refresh()
}

/**
 * The connection aedes reads and writes for this client, for frames the gateway writes itself (replay batches,
 * commands: mqtt-packet frames with ids from {@link nextPacketId}). Going through `client.publish` would queue the
 * packet in a persistent session and give each subscriber its own copy, which replays and commands must not do
 * (see replay.ts and commands.ts). `client.conn` is typed, but writing to it bypasses aedes' write path
 * (https://github.com/moscajs/aedes/blob/v1.2.0/lib/write.js). No upstream issue; public API that would remove it: `client.write(packet)`.
 */
export function rawConnection (client: Client): Duplex {
  return client.conn as Duplex
}

/**
 * The aedes client handling a connection: aedes stores it on the stream it was given (`conn.client = this`,
 * https://github.com/moscajs/aedes/blob/v1.2.0/lib/client.js#L36), which is how a ConnectionGuard learns the client id of the device it guards.
 * No upstream issue; the public alternative is the `client` event, which fires only after authentication.
 */
export function clientOfConnection (conn: object): ConnectionClient | undefined {
  return (conn as { client?: ConnectionClient }).client
}

/**
 * What a guard reads of the aedes client of its connection: `id` (null until the CONNECT), and the client's Receive
 * Maximum, which aedes sets from the CONNECT (65535 when absent, https://github.com/moscajs/aedes/blob/v2.0.0-beta.1/lib/handlers/connect.js)
 * and does not enforce.
 */
export interface ConnectionClient { readonly id?: unknown, readonly receiveMaximum?: unknown }

/**
 * Scopes the client id per tenant (`<tenant>U+0000<id>`). aedes keys session takeover, stored subscriptions and
 * offline queues by `client.id`, sets it before authenticate and reads it only after
 * (https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/connect.js#L85); the typings declare it readonly. No upstream issue; public API that
 * would remove it: an id returned by the authenticate callback.
 */
export function setClientId (client: Client, id: string): void {
  (client as { id: string }).id = id
}

/**
 * The client's live subscriptions by filter (`client.subscriptions`, https://github.com/moscajs/aedes/blob/v1.2.0/lib/client.js#L31), not in the
 * typings. aedes answers questions about them only on the wire. Used upstream as the way to list them
 * (https://github.com/moscajs/aedes/issues/64). Public API that would remove it: `client.subscriptions` in
 * types/client.d.ts.
 */
export function subscriptionsOf (client: Client): Readonly<Record<string, { readonly qos?: number } | undefined>> {
  return (client as Client & { subscriptions?: Record<string, { qos?: number } | undefined> }).subscriptions ?? {}
}

/**
 * The connected client with this (scoped) id on this broker (`broker.clients`, https://github.com/moscajs/aedes/blob/v1.2.0/aedes.js registerClient),
 * not in the typings; upstream points users at it (https://github.com/moscajs/aedes/issues/173). Public API that
 * would remove it: `broker.getClient(id)`.
 */
export function connectedClient (broker: Aedes, id: string): Client | undefined {
  return (broker as unknown as { clients: Record<string, Client | undefined> }).clients[id]
}

/**
 * The will aedes is firing when authorizePublish is called from a closing connection: aedes passes
 * `client.will` itself (https://github.com/moscajs/aedes/blob/v1.2.0/lib/client.js#L365), so identity comparison tells a will from the client's own
 * PUBLISH. No upstream issue; public API that would remove it: a flag on the packet or a `willPublished` hook.
 */
export function isFiringWill (client: Client, packet: PublishPacket): boolean {
  return (client as unknown as { will?: unknown }).will === packet
}

/**
 * A stand-in client for a will stored by a gateway that died, fired at startup through authorizePublish (wills.ts):
 * aedes' own sweep fires such wills with a null client, past the tenant mount and ACL
 * (https://github.com/moscajs/aedes/blob/v1.2.0/aedes.js _clearWills; https://github.com/moscajs/aedes/issues/767, https://github.com/moscajs/aedes/pull/769,
 * https://github.com/moscajs/aedes/pull/756 on wills at restart). Only `id`, `closed` and `conn` are read on that path.
 */
export function standInClient (id: string): Client {
  return { id, closed: false, conn: {} } as unknown as Client
}

/** The part of aedes' client parser that UNSUBSCRIBE mounting and SUBSCRIBE sizing reach into. */
interface ParsedPacket { cmd: string, unsubscriptions?: string[], subscriptions?: object[] }
interface ClientParser {
  readonly _parser: {
    /** aedes sets it (https://github.com/moscajs/aedes/blob/v1.2.0/lib/client.js#L61). */
    readonly client: Client
    prependListener (event: 'packet', listener: (this: { client: Client }, packet: ParsedPacket) => void): void
    /** Packets parsed before the CONNACK, handled once the client is connected; null afterwards. */
    readonly _queue: ParsedPacket[] | null
  }
}

/** What the gateway does with a client's SUBSCRIBE and UNSUBSCRIBE packets before aedes handles them. */
export interface PacketWatch {
  /**
   * Sees the subscription objects of each SUBSCRIBE (the objects aedes later hands authorizeSubscribe one by one).
   * aedes has no hook that sees a whole SUBSCRIBE, so a limit on the filters of one packet cannot be checked per
   * filter; and aedes takes the QoS its SUBACK grants from these objects before authorizeSubscribe runs
   * (https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/subscribe.js doSubscribe), so a lower grant (a share's
   * QoS 1) is set here. No upstream issue; public API that would remove it: a `preSubscribe(client, packet)` hook.
   */
  subscribe (client: Client, subscriptions: readonly object[]): void
  /**
   * Returns the filters aedes is to look up for an UNSUBSCRIBE. aedes has no unsubscribe hook: it looks the filters
   * up as the client sent them (https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/unsubscribe.js), while
   * authorizeSubscribe stored them mounted (`<tenant>/<filter>`), so an UNSUBSCRIBE removed nothing. Upstream: a
   * `preUnsubscribe` hook, https://github.com/moscajs/aedes/pull/605 (open), would remove it.
   */
  unsubscribe (client: Client, filters: string[]): string[]
}

/**
 * Returns `watch(client)`, which hands every later SUBSCRIBE and UNSUBSCRIBE of that client to `handlers` before
 * aedes handles it: first the packets parsed before the client was accepted, which wait in `client._parser._queue`
 * until the CONNACK (https://github.com/moscajs/aedes/blob/v1.2.0/lib/client.js#L62), then each one as the parser
 * emits it (a listener prepended to aedes' own). The listener is one function for all clients, finding its client
 * through the parser, so an idle connection pays no closure for it.
 */
export function packetWatcher (handlers: PacketWatch): (client: Client) => void {
  const seen = (client: Client, packet: ParsedPacket): void => {
    if (packet.cmd === 'subscribe' && packet.subscriptions !== undefined) handlers.subscribe(client, packet.subscriptions)
    else if (packet.cmd === 'unsubscribe' && packet.unsubscriptions !== undefined) {
      packet.unsubscriptions = handlers.unsubscribe(client, packet.unsubscriptions)
    }
  }
  function listener (this: { client: Client }, packet: ParsedPacket): void {
    seen(this.client, packet)
  }
  return (client) => {
    const parser = (client as unknown as ClientParser)._parser
    for (const packet of parser._queue ?? []) seen(client, packet)
    parser.prependListener('packet', listener)
  }
}

/**
 * Gives a QoS 1/2 packet aedes is about to deliver another packet id. aedes takes ids from the client's counter
 * (lib/qos-packet.js), hands the new packet to `persistence.outgoingUpdate` and writes that same object once the
 * promise resolves (https://github.com/moscajs/aedes/blob/v1.2.0/lib/client.js deliverQoS,
 * https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/connect.js emptyQueue), so an id changed there is the
 * one the client sees and acknowledges. sessions/persistence.ts moves aedes off an id a persistent session's
 * delivery from the log holds (sessions/cursors.ts). No upstream issue; public API that would remove it:
 * `client.nextMessageId()` shared by aedes and the application, or an outgoing in-flight set aedes skips.
 */
export function movePacketId (packet: { messageId?: number }, messageId: number): void {
  packet.messageId = messageId
}

// --- the broker ------------------------------------------------------------------------------------------------------

/** broker.publish as aedes calls it internally (its typings only declare the two-argument form). */
export type InternalPublish = (packet: PublishPacket, client: Client | null, done: (err?: Error) => void) => void

/**
 * Makes aedes' own `broker.publish` a no-op for packets that `alreadyPublished` says authorizePublish published itself,
 * and returns the original. aedes writes the PUBACK (PUBREC) and only then calls `broker.publish`
 * (https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/publish.js#L93-L96): to have the offline copies and
 * retained messages stored before the ack (ack means durable), authorizePublish runs the publish itself, before the
 * ack or, for a logged QoS 1 message whose sessions read it from the log, right after it, and marks the packet. No upstream issue found (searched
 * moscajs/aedes for acks before publish/persistence); public API that would remove it: a hook that runs between
 * authorizePublish and the ack and may complete the publish, or an option to ack after `broker.publish`.
 */
export function interceptPublish (broker: Aedes, alreadyPublished: (packet: PublishPacket) => boolean): InternalPublish {
  const publish = (broker.publish as unknown as InternalPublish).bind(broker)
  const guarded: InternalPublish = (packet, client, done) => {
    if (alreadyPublished(packet)) return done()
    publish(packet, client, done)
  }
  broker.publish = guarded as unknown as typeof broker.publish
  return publish
}

/**
 * Replaces the broker's authorizeForward with `wrap(previous)` and returns the undo. authorizeForward is a public,
 * documented handler property (docs/Aedes.md), but replacing the one broker.ts installed is a patch: commands.ts
 * uses it to drop expired copies, which aedes asks about before every delivery, also of a queued packet read back on
 * reconnect (https://github.com/moscajs/aedes/blob/v1.2.0/lib/client.js#L98-L107). Public API that would remove it: message expiry in aedes (MQTT 5,
 * aedes' 2.x line).
 */
export function wrapAuthorizeForward (broker: Aedes, wrap: (previous: Aedes['authorizeForward']) => Aedes['authorizeForward']): () => void {
  const previous = broker.authorizeForward
  broker.authorizeForward = wrap(previous)
  return () => { broker.authorizeForward = previous }
}

// --- the session persistence aedes calls ---------------------------------------------------------------------------

/** Replaces `target[name]` with `wrap(original)` (the original bound to `target`) and returns the undo. */
function wrapMethod<T extends object, K extends keyof T> (target: T, name: K, wrap: (original: T[K]) => T[K]): () => void {
  const own = target[name]
  const original = (own as (...args: unknown[]) => unknown).bind(target) as T[K]
  target[name] = wrap(original)
  return () => { target[name] = own }
}

/**
 * Keeps aedes from timing the end of the sessions `owns` says the gateway ends itself (sessions/expiry.ts), and returns
 * the undo. aedes 2 ends an MQTT 5 session whose connection closed after its Session Expiry Interval with a timer in
 * memory (`scheduleSessionExpiry`, aedes.js of 2.0.0-beta.1, from https://github.com/moscajs/aedes/pull/1088; no
 * upstream issue on timers lost at a restart yet): a restart loses it, and
 * beside the gateway's persisted deadline it would end the session a second time, uncounted. Sessions aedes ends with
 * the connection (interval 0) stay aedes'. Public API that would remove it: a persistence hook that owns expiry.
 */
export function ownSessionExpiry (broker: Aedes, owns: (client: Client) => boolean): () => void {
  const internals = broker as unknown as { scheduleSessionExpiry (client: Client): void }
  return wrapMethod(internals, 'scheduleSessionExpiry', (original) => (client) => {
    if (!owns(client)) original(client)
  })
}

/** The session store's PUBACK hook, as aedes calls it. */
export type OutgoingClear = (client: Client, packet: { cmd?: string, messageId?: number }) => Promise<unknown>

/**
 * Lets the gateway take a PUBACK (`claim` returns true) before the session store sees it; returns the undo. aedes
 * hands every PUBACK to `persistence.outgoingClearMessageId` (https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/puback.js), for clean sessions
 * too, and emits the public `ack` event only after it; replay messages and commands were never stored, and their ids
 * must not clear a stored message. `broker.persistence` is not in the typings. No upstream issue; public API that
 * would remove it: an ack hook that runs before the persistence and may consume the PUBACK.
 */
export function claimPubacks (broker: Aedes, claim: (client: Client, messageId: number) => boolean): () => void {
  const persistence = (broker as unknown as { persistence: { outgoingClearMessageId: OutgoingClear } }).persistence
  return claimPubacksOf(persistence, claim)
}

/** {@link claimPubacks} on the persistence object itself, before aedes has bound it (`broker.listen()`). */
export function claimPubacksOf (persistence: { outgoingClearMessageId: OutgoingClear }, claim: (client: Client, messageId: number) => boolean): () => void {
  // Not an async function: every PUBACK passes one such wrapper per claimer (replays, shares), and a drain takes tens
  // of thousands a second; only a claimed one makes a promise of its own.
  return wrapMethod(persistence, 'outgoingClearMessageId', (clear) => (client, packet) => {
    try {
      if (packet.cmd === 'puback' && typeof packet.messageId === 'number' && claim(client, packet.messageId)) return Promise.resolve(undefined)
      return clear(client, packet)
    } catch (err) {
      return Promise.reject(err)
    }
  })
}

interface Subscriptions<S> {
  addSubscriptions (client: Client, subs: readonly S[]): Promise<void>
  subscriptionsByClient (client: Client): Promise<Array<{ topic: string, qos: number }>>
}

/**
 * Stores what `take(client)` hands over instead of the list aedes passes. aedes stores the whole SUBSCRIBE list once
 * per filter, as it authorizes each (https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/subscribe.js
 * storeSubscriptions): N filters cost N² subscription writes (11 s and 1 GiB for 1,000), the filters after the one
 * authorized are not mounted yet, refused ones are in it, and $replay subscriptions must never be stored. `take`
 * gives the ones authorizeSubscribe accepted since its last call, the caller's own among them: one write per filter.
 * No upstream issue; public API that would remove it: storing the subscriptions authorizeSubscribe returned, once per
 * packet.
 */
export function storeAcceptedSubscriptions<S> (persistence: Subscriptions<S>, take: (client: Client) => readonly S[] | undefined): void {
  wrapMethod(persistence, 'addSubscriptions', (add) => async (client) => {
    const accepted = take(client)
    if (accepted !== undefined && accepted.length > 0) await add(client, accepted)
  })
}

/**
 * Replaces what aedes reads as a session's stored subscriptions with `restore(subs, client)`. [MQTT-3.2.2-2]
 * CONNACK says a session is present when any session state is stored, but aedes decides from the stored
 * subscriptions alone (restoreSubs: `arg.sessionPresent = !!arg.subs`, https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/connect.js#L203-L210),
 * so a session holding only queued messages, or nothing at all [MQTT-3.1.2-4], was answered 0. aedes calls this only
 * for a CONNECT with clean = false, before the CONNACK, with the connecting Client (our aedes patch: stock aedes passes
 * a bare `{ id }`, and the session's Session Expiry Interval, recorded here, reached disk only after the CONNACK).
 * Upstream's reasoning since mosca: "we store the session only if there is an active subscription"
 * (https://github.com/moscajs/mosca/issues/376); no aedes issue. Public API that would remove it: a persistence method
 * `sessionPresent(client)`.
 */
export function overrideRestoredSubscriptions<S> (persistence: Subscriptions<S>,
  restore: (subs: Array<{ topic: string, qos: number }>, client: Client) => Promise<Array<{ topic: string, qos: number }>>): void {
  wrapMethod(persistence, 'subscriptionsByClient', (byClient) => async (client) => await restore(await byClient(client), client))
}

/** The will methods aedes calls on the session persistence (types in wills.ts). */
export interface WillMethods<C, P, R> {
  setup (broker: never): Promise<void>
  putWill (client: C, packet: P): Promise<void>
  delWill (client: C): Promise<unknown>
  streamWill (brokers?: Readonly<Record<string, unknown>>): R
}

/**
 * Wraps the persistence's will methods (wills.ts says what each wrapper does). aedes fires the wills a dead broker
 * stored from a periodic sweep with a null client, or never when the restarted gateway keeps its broker id
 * (https://github.com/moscajs/aedes/blob/v1.2.0/aedes.js `_clearWills`; https://github.com/moscajs/aedes/issues/767, https://github.com/moscajs/aedes/pull/756
 * (closed) on sending them at restart); it deletes "the" stored will of a client id after a closed connection's will fired, also when a
 * successor connection stored its own (https://github.com/moscajs/aedes/blob/v1.2.0/lib/client.js#L364-L385, lib/handlers/connect.js storeWill before
 * registerClient). `setup` must stay a native async function: aedes checks (https://github.com/moscajs/aedes/blob/v1.2.0/aedes.js listen()). Public API
 * that would remove it: wills fired at `listen()` through authorizePublish with the client's stored identity, and
 * delWill keyed by connection.
 */
export function wrapWillStorage<C, P, R> (persistence: WillMethods<C, P, R>, wrap: {
  readonly setup: (original: WillMethods<C, P, R>['setup']) => WillMethods<C, P, R>['setup']
  readonly putWill: (original: WillMethods<C, P, R>['putWill']) => WillMethods<C, P, R>['putWill']
  readonly delWill: (original: WillMethods<C, P, R>['delWill']) => WillMethods<C, P, R>['delWill']
  readonly streamWill: (original: WillMethods<C, P, R>['streamWill']) => WillMethods<C, P, R>['streamWill']
}): void {
  wrapMethod(persistence, 'putWill', wrap.putWill)
  wrapMethod(persistence, 'delWill', wrap.delWill)
  wrapMethod(persistence, 'setup', wrap.setup)
  wrapMethod(persistence, 'streamWill', wrap.streamWill)
}

/** The inbound QoS 2 methods aedes calls on the session persistence (types in inbound-qos2.ts). */
export interface IncomingMethods<C, P> {
  incomingStorePacket (client: C, packet: P): Promise<void>
  incomingGetPacket (client: C, packet: P): Promise<unknown>
  incomingDelPacket (client: C, packet: P): Promise<void>
  cleanIncoming (client: C): Promise<void>
}

/**
 * Wraps the persistence's inbound QoS 2 methods (inbound-qos2.ts says what each wrapper does). aedes calls
 * authorizePublish, then incomingGetPacket, then incomingStorePacket and broker.publish, then sends PUBREC
 * (https://github.com/moscajs/aedes/blob/v1.2.0/lib/handlers/publish.js#L40-L85): for exactly once into the log the append has to start in
 * authorizePublish, in one batch with the inbound entry, and aedes' later steps have to wait for it and see its
 * outcome. No upstream issue; public API that would remove it: a persistence method that stores the inbound entry
 * with the application's own write, or an authorizePublish that may answer "duplicate".
 */
export function wrapInboundQos2<C, P> (persistence: IncomingMethods<C, P>, wrap: {
  readonly incomingGetPacket: (original: IncomingMethods<C, P>['incomingGetPacket']) => IncomingMethods<C, P>['incomingGetPacket']
  readonly incomingStorePacket: (original: IncomingMethods<C, P>['incomingStorePacket']) => IncomingMethods<C, P>['incomingStorePacket']
  readonly incomingDelPacket: (original: IncomingMethods<C, P>['incomingDelPacket']) => IncomingMethods<C, P>['incomingDelPacket']
  readonly cleanIncoming: (original: IncomingMethods<C, P>['cleanIncoming']) => IncomingMethods<C, P>['cleanIncoming']
}): void {
  wrapMethod(persistence, 'incomingGetPacket', wrap.incomingGetPacket)
  wrapMethod(persistence, 'incomingStorePacket', wrap.incomingStorePacket)
  wrapMethod(persistence, 'incomingDelPacket', wrap.incomingDelPacket)
  wrapMethod(persistence, 'cleanIncoming', wrap.cleanIncoming)
}

// --- idle connection memory (issue 13) -----------------------------------------------------------------------------

/** The mqtt-packet 9 parser aedes creates for every client (`client._parser`, lib/client.js#L56). */
interface PacketParser {
  /** Bytes received and not yet parsed (mqtt-packet parser.js#L33: `this._list = bl()`). */
  _list: { readonly length: number }
  /** Names of the parse steps, an array of four strings built per parser (parser.js#L18). */
  _states: readonly string[]
  /** After a CONNECT, the CONNECT packet itself (parser.js#L267); read for `protocolVersion` and `bridgeMode` only. */
  settings: { readonly protocolVersion?: number, readonly bridgeMode?: boolean }
}

interface ConnectFields { readonly cmd: string, readonly protocolVersion?: number, readonly bridgeMode?: boolean }

const PARSE_STEPS: readonly string[] = Object.freeze(['_parseHeader', '_parseLength', '_parsePayload', '_newPacket'])

/**
 * Called with the CONNECT packet once aedes handles it (preConnect): the parser keeps only what it reads of the
 * CONNECT (`protocolVersion`, `bridgeMode`), not the packet with its password and the buffer under it (see
 * slimClient). Done from the hook rather than a `once('packet')` listener on the parser, which cost a wrapper and
 * a bound function per connection until the CONNECT arrived (heap snapshots: about 60 bytes per idle connection
 * less in all).
 */
export function forgetConnectPacket (client: Client, packet: object): void {
  const parser = (client as unknown as { _parser?: PacketParser })._parser
  const connect = packet as ConnectFields
  if (parser !== undefined && connect.cmd === 'connect' && parser.settings === packet) {
    parser.settings = connectSettings(connect.protocolVersion, connect.bridgeMode)
  }
}

/** The few `settings` a parser can keep, made once each: mqtt-packet only reads them (40 bytes per connection less). */
const SETTINGS = new Map<string, PacketParser['settings']>()
function connectSettings (protocolVersion: number | undefined, bridgeMode: boolean | undefined): PacketParser['settings'] {
  const key = `${protocolVersion}/${bridgeMode}`
  let settings = SETTINGS.get(key)
  if (settings === undefined) SETTINGS.set(key, settings = Object.freeze({ protocolVersion, bridgeMode }))
  return settings
}

/**
 * The packet ids of inbound QoS 2 messages awaiting PUBREL, as aedes keeps them per client (`client._inboundInflight`,
 * a `new Set()` in lib/client.js#L45, read with `has`/`size`/`add`/`delete` in lib/handlers/publish.js#L68 and
 * pubrel.js#L57), but with the hash table made on the first add: an empty Set costs about 250 bytes of heap, and
 * most devices never publish at QoS 2.
 */
class LazyPacketIds {
  #ids: Set<number> | null = null
  get size (): number { return this.#ids?.size ?? 0 }
  has (id: number): boolean { return this.#ids?.has(id) ?? false }
  add (id: number): this {
    (this.#ids ??= new Set()).add(id)
    return this
  }

  delete (id: number): boolean {
    const deleted = this.#ids?.delete(id) ?? false
    if (this.#ids?.size === 0) this.#ids = null
    return deleted
  }
}

/**
 * An MQTT 5 connection's inbound topic aliases (alias number to topic name), as aedes 2 keeps them per client
 * (`client._topicAliases`, a `new Map()` in lib/client.js#L42, read and written only with `get`/`set` in
 * lib/handlers/publish.js#L180-L183), but with the Map made on the first alias: an empty Map and its hash table cost
 * about 330 bytes of heap, and 3.1.1 clients (and MQTT 5 ones that use no alias) never register one.
 */
class LazyTopicAliases {
  #aliases: Map<number, string> | null = null
  get (alias: number): string | undefined { return this.#aliases?.get(alias) }
  set (alias: number, topic: string): this {
    (this.#aliases ??= new Map()).set(alias, topic)
    return this
  }
}

/**
 * The prototype of each client's `duplicates` (see slimClient): empty, frozen and without a prototype itself, so a
 * key such as `__proto__` or `constructor` is an own property or absent, as in the `Object.create(null)` aedes makes
 * (GHSA-52qw-whmv-87c5); but an object made from it starts in V8's fast mode (about 56 bytes) instead of with a
 * property dictionary (about 210 bytes). Its keys are broker ids, the same few for every client, so clients share
 * V8's hidden classes for them.
 */
const NO_INHERITED_KEYS: object = Object.freeze(Object.create(null) as object)

/**
 * `dictionary` (an `Object.create(null)`, or an EventEmitter's `_events`, which Node makes as `{ __proto__: null }`)
 * as an object with the same own keys that starts in V8's fast mode: a null-prototype object is a property dictionary
 * from the start, about 160 bytes more than the same keys in fast mode. The prototype is NO_INHERITED_KEYS, so no key
 * is inherited; a later `delete` turns it into a dictionary again, as V8 does with any object.
 */
function fastModeCopy (dictionary: object): object {
  const copy = Object.create(NO_INHERITED_KEYS) as Record<PropertyKey, unknown>
  for (const key of Reflect.ownKeys(dictionary)) copy[key] = (dictionary as Record<PropertyKey, unknown>)[key]
  return copy
}

/** An EventEmitter's table of listeners (Node's `_events`, read by name only: `events[type]`, `Reflect.ownKeys`). */
interface EventTable { _events?: object }

/** Gives `emitter` a fast-mode listener table (fastModeCopy) when it has a null-prototype one. */
function fastModeEvents (emitter: EventTable): void {
  if (emitter._events !== undefined && Object.getPrototypeOf(emitter._events) === null) emitter._events = fastModeCopy(emitter._events)
}

/**
 * The parser's byte buffer: bl's BufferList, but the array of chunks of an empty list is made for the chunk appended,
 * with room for it alone. bl pushes onto the array it made at construction, which V8 grows to 17 slots on the first
 * push, and `consume` shifts the chunks off without giving the slots back: an idle connection, whose list is empty
 * between packets, kept 152 bytes of empty slots (heap snapshots, 2026-12-02).
 */
class ChunkList extends BufferList {
  declare _bufs: Buffer[]
  override append (buf: Parameters<InstanceType<typeof BufferList>['append']>[0]): this {
    if (this._bufs.length === 0 && Buffer.isBuffer(buf)) {
      this._bufs = [buf]
      this.length += buf.length
      return this
    }
    super.append(buf)
    return this
  }
}

/** aedes' per-client listeners that slimClient replaces with shared functions (lib/client.js#L120-L123). */
interface ClientEmitter { emit (event: 'error', err: Error): boolean, close (): void }
interface HasClient { readonly client: ClientEmitter }
function emitClientError (this: HasClient, err: Error): void { this.client.emit('error', err) }
function closeClient (this: HasClient): void { this.client.close() }

/**
 * Replaces the listener named `boundName` (aedes' `fn.bind(client, …)`, which is the first `event` listener of
 * `emitter`) with `shared`, in the same place. A bound function costs about 72 bytes per connection; `shared` finds
 * the client through `emitter.client`, which aedes sets on the connection and the parser.
 */
function shareListener (emitter: NodeJS.EventEmitter & { readonly client?: unknown }, event: string, boundName: string,
  shared: (this: HasClient, ...args: never[]) => void): void {
  const first = emitter.listeners(event)[0] as ((...args: unknown[]) => unknown) | undefined
  if (first === undefined || first.name !== boundName || emitter.client === undefined) return
  emitter.removeListener(event, first)
  emitter.prependListener(event, shared as (...args: unknown[]) => void)
}

/**
 * Makes a new client cheaper to keep while the connection idles; called right after `broker.handle`, before a byte
 * is parsed. Its inbound QoS 2 id set and its topic alias map are made lazy (LazyPacketIds, LazyTopicAliases above),
 * its `duplicates` and `subscriptions` start as fast-mode objects (NO_INHERITED_KEYS), the listener tables of the
 * client and of its parser become fast-mode copies (fastModeEvents; the aedes patch no longer removes a once
 * listener from the client's, which made it a dictionary again), and the three listeners aedes binds to it per
 * connection (`conn` 'error' and 'end', parser 'error') become shared functions. Heap snapshots of 10,000 idle
 * connections (2026-12-02, 15:09 and 15:14): the three property dictionaries, the parser's 17-slot chunk array, the
 * per-connection copy of the CONNECT settings and the empty drain array cost 599 bytes per connection (5,041 to
 * 4,442 bytes in all). Measured with heap snapshots of
 * 10,000 idle connections (BENCHMARKS.md, idle connections), the parser of each client held:
 * - a `bl()` BufferListStream as its byte buffer: a full readable-stream Duplex (two stream states, an event
 *   table, bound callbacks) of which the parser uses only the BufferList methods (append, consume, slice,
 *   readUInt*). A `BufferList` of the same bl version has exactly those (a ChunkList, which also gives the slots
 *   of its chunk array back between packets). An error makes the parser build
 *   a new `bl()` (`_resetState`), but aedes closes the connection on a parser error.
 * - its own copy of a constant four-string array (`_states`); all parsers share one here.
 * - the CONNECT packet for the life of the connection (`settings`), with its password Buffer and, through it,
 *   the first read's buffer; only `protocolVersion` and `bridgeMode` are kept, by {@link forgetConnectPacket}.
 * No upstream issue: aedes has no option for its parser or its per-client state, and mqtt-packet none for its buffer; a parser that
 * allocated these lazily upstream would remove this.
 */
export function slimClient (client: Client): void {
  const internals = client as unknown as {
    _parser?: PacketParser & NodeJS.EventEmitter, _inboundInflight?: unknown, _topicAliases?: unknown, duplicates?: object,
    subscriptions?: object, conn?: unknown
  }
  if (internals._inboundInflight instanceof Set && internals._inboundInflight.size === 0) internals._inboundInflight = new LazyPacketIds()
  if (internals._topicAliases instanceof Map && internals._topicAliases.size === 0) internals._topicAliases = new LazyTopicAliases()
  if (internals.duplicates !== undefined && Object.getPrototypeOf(internals.duplicates) === null && Object.keys(internals.duplicates).length === 0) {
    internals.duplicates = Object.create(NO_INHERITED_KEYS) as object
  }
  if (internals.subscriptions !== undefined && Object.getPrototypeOf(internals.subscriptions) === null && Object.keys(internals.subscriptions).length === 0) {
    internals.subscriptions = Object.create(NO_INHERITED_KEYS) as object
  }
  fastModeEvents(client as unknown as EventTable)
  const conn = internals.conn as (NodeJS.EventEmitter & { client?: unknown }) | undefined
  if (conn !== undefined) {
    shareListener(conn, 'error', 'bound emit', emitClientError)
    shareListener(conn, 'end', 'bound close', closeClient)
  }
  const parser = internals._parser
  if (parser === undefined) return
  if (parser._list.length === 0 && !(parser._list instanceof ChunkList)) parser._list = new ChunkList()
  if (parser._states.length === PARSE_STEPS.length && parser._states.every((s, i) => s === PARSE_STEPS[i])) parser._states = PARSE_STEPS
  shareListener(parser, 'error', 'bound emit', emitClientError)
  fastModeEvents(parser as unknown as EventTable)
}
