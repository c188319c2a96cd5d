/**
 * Commands from upstreams to devices: stored first, delivered when a device
 * is there to take them, expired when their time-to-live runs out, and a
 * receipt for each sent back upstream.
 *
 * A command the bridge receives is appended to the stream its local topic
 * routes to (normally `commands`), with headers naming its upstream, remote
 * topic and expiry; only then does the bridge PUBACK it upstream. The
 * dispatcher keeps the undelivered ones in memory and writes each, as a QoS 1
 * PUBLISH of its own (the QoS of the device's subscription, at most 1), to the
 * one client it addresses: the client of the command's tenant whose id is the
 * command's partition key (the topic level its route names,
 * `devices/<id>/commands/...`), as soon as that client is connected and holds
 * a subscription matching it — at once, or when the device (re)subscribes or
 * reconnects. "Delivered" is the device's PUBACK of that packet (taken from
 * the PUBACKs aedes hands the session store, as hooks/replays.ts takes those of
 * $replay messages); a device that goes away before it is pending again and
 * gets the command on its next connection, unless it expired. The dispatcher
 * does not go through aedes' client.publish or broker.publish: those queue the
 * command in persistent sessions (sent whenever the session came back, TTL or
 * not), hand it to every matching subscriber (a service on
 * `devices/+/commands/#`, which then counted as the taker) and call back
 * before the device has it. Services read commands from the log.
 *
 * Copies that earlier versions left in a session's queue carry their expiry
 * (`messageExpiry`, kept by aedes-packet and the session persistence). The
 * dispatcher wraps aedes' authorizeForward, which aedes asks before every
 * delivery, also of a packet read back from a persistent session's queue on
 * reconnect: a packet past its expiry is refused (aedes then clears it from
 * the queue) and counted.
 *
 * Every delivery or expiry appends a receipt to the tenant's
 * `command-receipts` stream (header `edgemq-upstream`), which the upstream's
 * uplink forwards to its receiptTopic. The receipts are also the dispatcher's
 * memory across restarts: at start it reads them, then re-reads the command
 * streams from its consumer group `edgemq.commands` (the offset below which
 * every command is settled) and holds every command without a receipt again.
 * A crash between delivery and receipt delivers that command again (QoS 1
 * semantics: at least once).
 *
 * Request/response (MQTT 5 4.10): a command that came with a Response Topic
 * keeps it and its Correlation Data in its record's `mqtt-response-topic` and
 * `mqtt-correlation-data` headers (so a restart keeps them too); its receipt
 * carries them as `edgemq-response-topic` and `mqtt-correlation-data`, and
 * the uplink publishes it to that topic, with that correlation data, instead
 * of receiptTopic. The device gets the command without them: the response
 * topic is the upstream's, not one a device could publish to.
 */
import type { Aedes, Client, PublishPacket } from 'aedes'
import mqttPacket from 'mqtt-packet'
import { isStoreError, type Clock, type LogStore, type StoredRecord } from '../../store/index.ts'
import {
  PROPERTY_HEADERS, RECEIPT_RESPONSE_TOPIC_HEADER, RECEIPT_UPSTREAM_HEADER, RECEIPTS_STREAM, type CommandSink, type IncomingCommand,
} from '../../bridge/index.ts'
import { claimPubacks, connectedClient, nextPacketId, rawConnection, skipHeldPacketIds, subscriptionsOf, wrapAuthorizeForward } from './aedes-internals.ts'
import { isMqtt5 } from './reason-codes.ts'
import type { Router } from './routing.ts'
import { filtersOverlap, mountTopic, scopedClientId, topicMatches, topicNameProblem } from '../access/topics.ts'
import type { GatewayConfig } from '../config/config.ts'

export const COMMANDS_GROUP = 'edgemq.commands'

/** A stream that commands from upstreams may route to, in a tenant with command mappings. */
export interface CommandStream { readonly tenant: string, readonly stream: string }

/**
 * The streams commands from upstreams may route to: per tenant with command mappings (bridge.upstreams[].commands),
 * each stream of a route whose filter overlaps a mapping's local topic filter.
 */
export function commandStreamsOf (config: Pick<GatewayConfig, 'bridge' | 'routes'>): CommandStream[] {
  const streams = new Map<string, CommandStream>()
  for (const u of config.bridge.upstreams) {
    for (const c of u.commands) {
      for (const r of config.routes) {
        if (filtersOverlap(r.filter, c.local)) streams.set(`${c.tenant}/${r.stream}`, { tenant: c.tenant, stream: r.stream })
      }
    }
  }
  return [...streams.values()]
}

/** Creates the receipt stream of every tenant with command mappings (the uplinks forward them). */
export async function createReceiptStreams (store: LogStore, streams: readonly CommandStream[]): Promise<void> {
  for (const tenant of new Set(streams.map((c) => c.tenant))) await store.createStream(`${tenant}/${RECEIPTS_STREAM}`, { partitions: 1 })
}
const HEADER_REMOTE_TOPIC = 'edgemq-remote-topic'
const HEADER_EXPIRES_AT = 'edgemq-expires-at'
const HEADER_COMMAND = 'edgemq-command'
const HEADER_STATUS = 'edgemq-status'
const SWEEP_MS = 1000
const READ_RECORDS = 1000

export type ReceiptStatus = 'delivered' | 'expired'

interface Command {
  readonly id: string // `<stream>/<partition>/<offset>`
  readonly tenant: string
  readonly stream: string
  readonly partition: number
  readonly offset: number
  readonly key: string
  readonly topic: string
  readonly payload: Uint8Array
  readonly upstream: string
  readonly remoteTopic: string
  readonly expiresAt: number | null
  /** The record headers of its response topic and correlation data (MQTT 5 request/response), passed on to its receipt. */
  readonly response: Readonly<Record<string, string>>
  /** Set while the command is written and unacknowledged, or its receipt append is under way. */
  busy: boolean
  /** The connection it was written to as QoS 1 and its packet id, until the device's PUBACK. */
  inflight: { readonly client: Client, readonly messageId: number } | null
}

export interface CommandDispatcherDeps {
  readonly store: LogStore
  readonly broker: Aedes
  readonly route: Router
  /** Tenants with command mappings, and the streams their commands may route to. */
  readonly streams: readonly CommandStream[]
  readonly clock: Clock
  readonly logger: Record<'info' | 'warn' | 'error', (fields: Record<string, unknown>, msg: string) => void>
  readonly onReceipt?: (upstream: string, status: ReceiptStatus) => void
  /** A packet past its expiry was not handed to a client (a queued copy, read back on reconnect). */
  readonly onExpiredDropped?: (tenant: string) => void
}

/** aedes' packet as the dispatcher hands it over and aedes-packet copies it: `messageExpiry` is ms since the epoch. */
type ExpiringPacket = PublishPacket & { messageExpiry?: number }

export class CommandDispatcher implements CommandSink {
  readonly #deps: CommandDispatcherDeps
  /** Undelivered commands by id, in arrival order. */
  readonly #pending = new Map<string, Command>()
  #sweep: NodeJS.Timeout | null = null
  #closed = false
  readonly #listeners: Array<[string, Parameters<NodeJS.EventEmitter['on']>[1]]> = []
  /** Appends under way: the watermark waits while a command is between the log and the pending set. */
  #accepting = 0
  /** Undoes start()'s wrap of aedes' authorizeForward and its claim on PUBACKs. */
  readonly #undo: Array<() => void> = []
  /** Commands written as QoS 1 and not yet acknowledged, by `<aedes client id> <packet id>`. */
  readonly #inflight = new Map<string, Command>()

  constructor (deps: CommandDispatcherDeps) {
    this.#deps = deps
  }

  /** Rebuilds the undelivered commands from the log and starts delivering. */
  async start (): Promise<void> {
    const { store, broker } = this.#deps
    await store.setGroup(COMMANDS_GROUP, { holdsRetention: true })
    const settled = new Set<string>()
    for (const tenant of new Set(this.#deps.streams.map((s) => s.tenant))) {
      await store.createStream(`${tenant}/${RECEIPTS_STREAM}`, { partitions: 1 })
      await this.#scan(`${tenant}/${RECEIPTS_STREAM}`, 0, store.partitionInfo(`${tenant}/${RECEIPTS_STREAM}`, 0).logStartOffset, (r) => {
        const id = r.headers?.[HEADER_COMMAND]
        if (id !== undefined) settled.add(id)
      })
    }
    for (const { tenant, stream: name } of this.#deps.streams) {
      const stream = `${tenant}/${name}`
      for (let partition = 0; partition < store.streamInfo(stream).partitions; partition++) {
        const p = store.partitionInfo(stream, partition)
        const committed = store.fetchOffset(COMMANDS_GROUP, stream, partition)
        if (committed === null) {
          // First start: nothing before now is a command of ours.
          await store.commitOffset(COMMANDS_GROUP, stream, partition, p.logEndOffset)
          continue
        }
        await this.#scan(stream, partition, Math.max(committed, p.logStartOffset), (r) => {
          const command = this.#fromRecord(tenant, stream, partition, r)
          if (command !== null && !settled.has(command.id)) this.#pending.set(command.id, command)
        })
      }
    }
    if (this.#pending.size > 0) this.#deps.logger.info({ pending: this.#pending.size }, 'undelivered commands restored from the log')
    this.#undo.push(wrapAuthorizeForward(broker, (forward) => (client, packet) => {
      const expiry = (packet as ExpiringPacket).messageExpiry
      if (expiry !== undefined && expiry <= this.#deps.clock.now()) {
        this.#deps.onExpiredDropped?.(packet.topic.slice(0, packet.topic.indexOf('/')))
        this.#deps.logger.info({ clientId: client.id, topic: packet.topic }, 'expired message not delivered')
        return null
      }
      return forward.call(broker, client, packet)
    }))
    // A command is written by the dispatcher itself, so "delivered" is the device's PUBACK: the ones that answer a
    // command are taken before the session store sees them (aedes-internals.ts), as hooks/replays.ts takes those of
    // $replay messages.
    this.#undo.push(claimPubacks(broker, (client, messageId) => this.#acked(client, messageId)))
    const onReady = (client: Client): void => { this.#offerTo(client) }
    const onSubscribe = (_subs: unknown, client: Client): void => { this.#offerTo(client) }
    broker.on('clientReady', onReady)
    broker.on('subscribe', onSubscribe)
    type Listener = Parameters<NodeJS.EventEmitter['on']>[1]
    this.#listeners.push(['clientReady', onReady as Listener], ['subscribe', onSubscribe as Listener])
    this.#sweep = setInterval(() => {
      this.#expire()
      void this.#commitWatermarks()
    }, SWEEP_MS)
    this.#sweep.unref()
    this.#expire()
    for (const c of this.#pending.values()) this.#tryDeliver(c)
  }

  async stop (): Promise<void> {
    this.#closed = true
    if (this.#sweep !== null) clearInterval(this.#sweep)
    const events = this.#deps.broker as unknown as NodeJS.EventEmitter
    for (const [name, fn] of this.#listeners) events.removeListener(name, fn)
    for (const undo of this.#undo.splice(0).reverse()) undo()
    await this.#commitWatermarks().catch(() => {})
  }

  async #scan (stream: string, partition: number, from: number, each: (r: StoredRecord) => void): Promise<void> {
    const { store } = this.#deps
    let offset = from
    while (offset < store.partitionInfo(stream, partition).logEndOffset) {
      const r = await store.read(stream, partition, offset, { maxRecords: READ_RECORDS })
      for (const record of r.records) each(record)
      if (r.nextOffset === offset) break
      offset = r.nextOffset
    }
  }

  #fromRecord (tenant: string, stream: string, partition: number, r: StoredRecord): Command | null {
    const upstream = r.headers?.[RECEIPT_UPSTREAM_HEADER]
    if (upstream === undefined) return null // published locally, delivered live by the broker: not ours
    const expires = r.headers?.[HEADER_EXPIRES_AT]
    return {
      id: `${stream}/${partition}/${r.offset}`, tenant, stream, partition, offset: r.offset, key: r.key, topic: r.topic, payload: r.payload,
      upstream, remoteTopic: r.headers?.[HEADER_REMOTE_TOPIC] ?? '', expiresAt: expires === undefined ? null : Number(expires),
      response: responseHeaders(r.headers), busy: false, inflight: null,
    }
  }

  /** Appends the command to the log (resolving once durable), then delivers it when it can. */
  async accept (command: IncomingCommand): Promise<void> {
    const { store, route, logger } = this.#deps
    // A topic no client could publish (a remote topic deep enough to make the local one over 99 levels, which the
    // tenant mount takes past the broker's limit) could never be delivered, and a pending command without a
    // time-to-live holds its partition's retention for good.
    const problem = topicNameProblem(command.localTopic)
    if (problem !== null) {
      logger.error({ upstream: command.upstream, topic: command.remoteTopic, reason: problem },
        'command dropped: its local topic is not one a device could receive')
      return
    }
    const target = route(command.localTopic)
    if (target === null) {
      // Redelivery could not help: acknowledged upstream and dropped, loudly.
      logger.error({ upstream: command.upstream, topic: command.localTopic },
        'command dropped: its local topic routes to no stream (check bridge.upstreams[].commands[].local and routes)')
      return
    }
    const stream = `${command.tenant}/${target.stream}`
    const headers: Record<string, string> = { [RECEIPT_UPSTREAM_HEADER]: command.upstream, [HEADER_REMOTE_TOPIC]: command.remoteTopic }
    if (command.expiresAt !== null) headers[HEADER_EXPIRES_AT] = String(command.expiresAt)
    if (command.response !== undefined) {
      headers[PROPERTY_HEADERS.responseTopic] = command.response.topic
      if (command.response.correlationData !== undefined) {
        headers[PROPERTY_HEADERS.correlationData] = Buffer.from(command.response.correlationData).toString('base64')
      }
    }
    this.#accepting++
    let result
    try {
      const record = { payload: command.payload, topic: command.localTopic, qos: 1 as const, clientId: `bridge:${command.upstream}`, headers }
      result = await store.append(stream, target.key, record)
    } finally {
      this.#accepting--
    }
    const c: Command = {
      id: `${stream}/${result.partition}/${result.offset}`, tenant: command.tenant, stream, partition: result.partition, offset: result.offset,
      key: target.key, topic: command.localTopic, payload: command.payload, upstream: command.upstream, remoteTopic: command.remoteTopic,
      expiresAt: command.expiresAt, response: responseHeaders(headers), busy: false, inflight: null,
    }
    if (this.#closed) return
    this.#pending.set(c.id, c)
    if (this.#isExpired(c)) this.#settle(c, 'expired')
    else this.#tryDeliver(c)
  }

  #isExpired (c: Command): boolean {
    return c.expiresAt !== null && c.expiresAt <= this.#deps.clock.now()
  }

  #expire (): void {
    for (const c of this.#pending.values()) {
      this.#releaseIfGone(c)
      if (!c.busy && this.#isExpired(c)) this.#settle(c, 'expired')
    }
  }

  /** A command written to a connection that closed before its PUBACK is pending again (sent again, or expires). */
  #releaseIfGone (c: Command): void {
    if (c.inflight === null || !c.inflight.client.closed) return
    this.#inflight.delete(inflightKey(c.inflight.client, c.inflight.messageId))
    c.inflight = null
    c.busy = false
  }

  #acked (client: Client, messageId: number): boolean {
    const key = inflightKey(client, messageId)
    const c = this.#inflight.get(key)
    if (c === undefined) return false
    this.#inflight.delete(key)
    c.inflight = null
    c.busy = false
    this.#settle(c, 'delivered')
    return true
  }

  /** The connected client the command addresses, when it holds a subscription matching the command. */
  #addressee (c: Command): Client | null {
    const client = connectedClient(this.#deps.broker, scopedClientId(c.tenant, c.key))
    if (client === undefined || client.closed || !client.connected) return null
    const mounted = mountTopic(c.tenant, c.topic)
    for (const filter in subscriptionsOf(client)) if (topicMatches(filter, mounted)) return client
    return null
  }

  /** The highest QoS of the client's subscriptions matching the command (the command is QoS 1 at most). */
  #grantedQos (client: Client, c: Command): 0 | 1 {
    const mounted = mountTopic(c.tenant, c.topic)
    const subs = subscriptionsOf(client)
    for (const filter in subs) if (topicMatches(filter, mounted) && (subs[filter]?.qos ?? 0) > 0) return 1
    return 0
  }

  #offerTo (client: Client): void {
    for (const c of this.#pending.values()) {
      if (scopedClientId(c.tenant, c.key) !== client.id) continue
      this.#releaseIfGone(c)
      if (!c.busy) this.#tryDeliver(c)
    }
  }

  #tryDeliver (c: Command): void {
    if (this.#closed || c.busy || !this.#pending.has(c.id)) return
    if (this.#isExpired(c)) return this.#settle(c, 'expired')
    const client = this.#addressee(c)
    if (client === null) return
    // Written here rather than through aedes' client.publish: aedes would also queue it in a persistent session
    // (sent on a later reconnect, TTL or not), and its write callback cannot tell whether the device got it.
    // authorizeForward is asked first, as aedes asks it before each delivery (on a copy: it unmounts in place), so a
    // command the device may not read (a read ACL deny rule narrower than its subscription) stays pending until its
    // time-to-live instead of being written.
    const mounted = {
      cmd: 'publish', topic: mountTopic(c.tenant, c.topic), payload: Buffer.from(c.payload.buffer, c.payload.byteOffset, c.payload.byteLength),
      qos: 1, retain: false, dup: false, ...(c.expiresAt === null ? {} : { messageExpiry: c.expiresAt }),
    } as ExpiringPacket
    if (this.#deps.broker.authorizeForward?.(client, mounted as Parameters<Aedes['authorizeForward']>[1]) == null) return
    const qos = this.#grantedQos(client, c)
    const messageId = qos === 1 ? nextPacketId(client) : undefined
    // Framed in the client's protocol version: an MQTT 5 PUBLISH has a property section a 3.1.1 one lacks.
    const frame = mqttPacket.generate({
      cmd: 'publish', topic: c.topic, payload: Buffer.from(c.payload.buffer, c.payload.byteOffset, c.payload.byteLength),
      qos, retain: false, dup: false, ...(messageId === undefined ? {} : { messageId }),
    }, { protocolVersion: isMqtt5(client) ? 5 : 4 })
    rawConnection(client).write(frame)
    if (messageId === undefined) return this.#settle(c, 'delivered') // QoS 0: written is all a device can confirm
    c.busy = true
    c.inflight = { client, messageId }
    this.#inflight.set(inflightKey(client, messageId), c)
    // The client's other writers (aedes, cursors, replays, shares) skip this id while it waits for its PUBACK.
    skipHeldPacketIds(client, this, (id) => this.#inflight.has(inflightKey(client, id)))
  }

  #settle (c: Command, status: ReceiptStatus): void {
    if (c.busy) return
    c.busy = true
    const { store, clock } = this.#deps
    const receipt = {
      status, command: c.id, topic: c.topic, remoteTopic: c.remoteTopic, upstream: c.upstream, at: new Date(clock.now()).toISOString(),
    }
    const headers = { [RECEIPT_UPSTREAM_HEADER]: c.upstream, [HEADER_COMMAND]: c.id, [HEADER_STATUS]: status, ...c.response }
    const record = { payload: Buffer.from(JSON.stringify(receipt)), topic: c.topic, qos: 1 as const, clientId: `bridge:${c.upstream}`, headers }
    store.append(`${c.tenant}/${RECEIPTS_STREAM}`, c.key, record, { dedupeId: `receipt/${c.id}` }).then(() => {
      this.#pending.delete(c.id)
      this.#deps.onReceipt?.(c.upstream, status)
      this.#deps.logger.info({ command: c.id, topic: c.topic, upstream: c.upstream, status }, `command ${status}`)
    }, (err: unknown) => {
      c.busy = false // tried again by the next sweep or subscription
      if (!isStoreError(err, 'STORE_CLOSED')) this.#deps.logger.error({ command: c.id, err: (err as Error).message }, 'command receipt could not be stored')
    })
  }

  /** Commits, per command partition, the offset below which every command is settled. */
  async #commitWatermarks (): Promise<void> {
    const { store } = this.#deps
    if (this.#accepting > 0) return
    const lowest = new Map<string, number>()
    for (const c of this.#pending.values()) {
      const k = `${c.stream}\u0000${c.partition}`
      lowest.set(k, Math.min(lowest.get(k) ?? Infinity, c.offset))
    }
    // Targets are taken in one synchronous pass: a command appended while the commits below are written has an
    // offset at or above the log end read here, so no commit passes it.
    const targets: Array<{ stream: string, partition: number, offset: number }> = []
    for (const { tenant, stream: name } of this.#deps.streams) {
      const stream = `${tenant}/${name}`
      for (let partition = 0; partition < store.streamInfo(stream).partitions; partition++) {
        const offset = lowest.get(`${stream}\u0000${partition}`) ?? store.partitionInfo(stream, partition).logEndOffset
        if (offset > (store.fetchOffset(COMMANDS_GROUP, stream, partition) ?? -1)) targets.push({ stream, partition, offset })
      }
    }
    for (const t of targets) {
      try {
        await store.commitOffset(COMMANDS_GROUP, t.stream, t.partition, t.offset)
      } catch (err) {
        if (!isStoreError(err, 'STORE_CLOSED')) this.#deps.logger.warn({ err: (err as Error).message }, 'committing the command watermark failed')
        return
      }
    }
  }
}

/** The receipt headers that send it to the command's response topic with its correlation data (see the header). */
function responseHeaders (commandHeaders: Readonly<Record<string, string>> | null | undefined): Record<string, string> {
  const topic = commandHeaders?.[PROPERTY_HEADERS.responseTopic]
  if (topic === undefined) return {}
  const data = commandHeaders?.[PROPERTY_HEADERS.correlationData]
  return { [RECEIPT_RESPONSE_TOPIC_HEADER]: topic, ...(data === undefined ? {} : { [PROPERTY_HEADERS.correlationData]: data }) }
}

function inflightKey (client: Client, messageId: number): string {
  return `${client.id} ${messageId}`
}
