/**
 * One upstream: replicates the configured streams to a remote MQTT broker and
 * brings its command topics down.
 *
 * Uplink. The upstream is a consumer group of the log, `bridge.<name>`, that
 * holds retention. Each (stream, partition) is a lane read in offset order;
 * records are published QoS 1 with at most `maxInflight` unacknowledged
 * across all lanes, and a lane's offset advances only to its highest
 * contiguous PUBACKed (or skipped) offset, committed every commitIntervalMs.
 * After a disconnect or a restart every lane resumes there, so nothing is
 * skipped and the only resends are messages that were in flight or acked out
 * of order — each carries the dedupe id `<gatewayId>/<tenant>/<stream>/
 * <partition>/<offset>` that marks it.
 *
 * Scheduling: a free window slot goes to the highest-priority lane with a
 * record ready, round robin among lanes of equal priority, so a backlog of
 * one stream cannot starve live records of a higher-priority one.
 *
 * Protocol: MQTT 5 unless the config says otherwise; `mqttVersion: auto`
 * falls back to 3.1.1 (for the rest of the process) when the upstream refuses
 * 5 at CONNACK. The dedupe id travels as the form dedupeCarrier() gives for
 * the level spoken (config-schema.ts).
 *
 * Refusals: an MQTT 5 PUBACK with a reason code >= 0x80 counts one attempt
 * for that message, and a message larger than an MQTT 5 upstream's maximum
 * packet size is not sent at all; a disconnect never counts over MQTT 5. A
 * 3.1.1 broker refuses by disconnecting, which does not say which message was
 * at fault; so after a disconnect with messages in flight the next connection
 * first resends an already acknowledged record (a canary: its PUBACK proves
 * the link carries PUBLISHes), then the unacknowledged ones one at a time
 * (probe mode), and disconnect-refusals.ts decides which disconnects count. A
 * message refused maxDeliveryAttempts times is appended to the dead-letter
 * stream `<tenant>/dlq.<name>` with the reason, and the lane moves on.
 *
 * Each connection is a fresh MQTT.js client with its own reconnection turned
 * off: reconnects follow our own exponential backoff with full jitter. MQTT.js
 * does CONNECT, keep-alive, SUBSCRIBE and the commands; the forwarded
 * PUBLISHes are encoded, numbered and matched to their PUBACKs here (see
 * #send), so nothing is resent behind the lanes' back and a drain costs a
 * fraction of MQTT.js' per-message path.
 */
import { readFileSync } from 'node:fs'
import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient } from 'mqtt'
import mqttPacket from 'mqtt-packet'
import { isStoreError, type Clock, type LogStore, type StoredRecord } from '../store/index.ts'
import { BRIDGE_GROUP_PREFIX, dedupeCarrier, protocolVersions, type DedupeCarrier, type ProtocolVersion, type UpstreamConfig } from './config-schema.ts'
import { ConnectionLog } from './connection-log.ts'
import { DisconnectRefusals } from './disconnect-refusals.ts'
import { BridgeError } from './errors.ts'
import { captureTopic, DEDUPE_TOPIC_PREFIX, parseCommandMapping, parseTemplate, RECORD_VARIABLES, type CommandMapping, type Template } from './topic-template.ts'

/** Header of a command receipt naming the upstream it goes back to. */
export const RECEIPT_UPSTREAM_HEADER = 'edgemq-upstream'
/** Stream (per tenant) that holds command receipts until the uplink has sent them. */
export const RECEIPTS_STREAM = 'command-receipts'
export const DEDUPE_PROPERTY = 'edgemq-dedupe-id'


/** Message ids below this are the uplink's PUBLISHes; MQTT.js numbers its own packets (SUBSCRIBE) from here up. */
const ID_SPLIT = 0xF000
/** Free window slots a draining uplink waits for before it refills (capped at a quarter of the window). */
const REFILL_BATCH = 32
const READ_RECORDS = 500
const READ_BYTES = 1024 * 1024
const REFUSAL_RETRY_MS = 1000
const THROUGHPUT_WINDOW = 10
const DLQ_RETENTION_MS = 30 * 24 * 3600 * 1000
/** A 3.1.1 disconnect later than this after a message was sent does not point at it. */
const REFUSAL_DISCONNECT_MS = 10_000
/** At most one line per this long about an upstream that stays unreachable. */
const CONNECT_FAILURE_LOG_MS = 60_000
/** CONNACK return codes of a broker that does not speak the protocol level asked for: 3.1.1's 1, MQTT 5's 0x84. */
const UNSUPPORTED_PROTOCOL = new Set([1, 0x84])

export interface BridgeLogger {
  info (fields: Record<string, unknown>, message: string): void
  warn (fields: Record<string, unknown>, message: string): void
  error (fields: Record<string, unknown>, message: string): void
}

/** A command that arrived from an upstream, mapped to its local topic. */
export interface IncomingCommand {
  readonly upstream: string
  readonly tenant: string
  readonly localTopic: string
  readonly remoteTopic: string
  readonly payload: Uint8Array
  /** Epoch ms after which it must not be delivered; null: never expires. */
  readonly expiresAt: number | null
}

/** Where commands go: the gateway appends them to the log and delivers them to devices. */
export interface CommandSink {
  /** Resolves once the command is durable in the log; the uplink acknowledges it upstream only then. */
  accept (command: IncomingCommand): Promise<void>
}

/** Counters the uplink reports as it works (the metrics read the rest from status()). */
export interface UplinkObserver {
  onForwarded? (upstream: string, tenant: string, stream: string, messages: number, bytes: number): void
  onDeadLettered? (upstream: string, tenant: string, stream: string): void
  onReconnect? (upstream: string): void
  onConnectFailure? (upstream: string): void
  onCommand? (upstream: string): void
}

export interface UplinkDeps {
  readonly store: LogStore
  readonly gatewayId: string
  readonly clock: Clock
  readonly logger: BridgeLogger
  readonly commitIntervalMs: number
  readonly observer?: UplinkObserver
  /** Required when the upstream has command mappings. */
  readonly commands?: CommandSink
  /** Source of jitter for reconnect delays (tests make it deterministic). */
  readonly random?: () => number
}

export interface LaneStatus {
  readonly tenant: string
  readonly stream: string
  readonly partition: number
  /** Next offset to forward, as committed in the log (what a restart resumes from). */
  readonly committedOffset: number
  /** Every offset below this is acknowledged by the upstream (committed within commitIntervalMs). */
  readonly forwardedOffset: number
  readonly logEndOffset: number
  readonly backlogMessages: number
}

export interface UpstreamStatus {
  readonly name: string
  readonly region: string
  /** The URL without credentials. */
  readonly url: string
  readonly kind: 'mqtt' | 'edgemq'
  /** Protocol of the current (or last attempted) connection; null before the first attempt. */
  readonly mqttVersion: '5' | '3.1.1' | null
  /** How the messages carry their dedupe id on that connection. */
  readonly dedupeId: DedupeCarrier
  readonly connected: boolean
  /** When the current connection (or the current outage) began, ISO 8601; null before the first attempt. */
  readonly since: string | null
  /** The last error, when it happened, and when a connection came up after it (null while unresolved). */
  readonly lastError: { readonly message: string, readonly at: string, readonly resolvedAt: string | null } | null
  /** Connection attempts that failed (no CONNACK, or a refusing one). */
  readonly connectFailures: number
  readonly reconnects: number
  readonly inflight: number
  readonly forwardedMessages: number
  readonly forwardedBytes: number
  /** Messages per second over the last ten seconds. */
  readonly throughput: number
  readonly deadLettered: number
  readonly commandsReceived: number
  readonly backlog: { readonly messages: number, readonly bytes: number, readonly seconds: number }
  readonly partitions: readonly LaneStatus[]
}

interface Pending {
  readonly offset: number
  readonly timestamp: number
  readonly record: StoredRecord | null // null: skipped by the filter, done at once
  acked: boolean
  /** Dead-lettered rather than acknowledged: never a canary. */
  refused?: boolean
}

interface Lane {
  readonly tenant: string
  readonly name: string
  /** The store's stream name, `<tenant>/<name>`. */
  readonly stream: string
  readonly partition: number
  readonly priority: number
  readonly filter: string
  readonly template: Template<typeof RECORD_VARIABLES[number]>
  /** Receipt lanes forward only the records addressed to this upstream. */
  readonly receipts: boolean
  /** Bumped whenever the lane is rewound, so reads started before are dropped. */
  epoch: number
  nextRead: number
  buffer: StoredRecord[]
  bufferAt: number
  /** Sent or skipped records above `done`, in offset order. */
  pending: Pending[]
  pendingAt: number
  /** Every offset below is acknowledged or skipped. */
  done: number
  committed: number
  reading: boolean
  /** The partition's log end as last reported (onAppend); reads stop there. */
  end: number
  /** Acknowledged since the metrics were last told (they are told once per turn, not per record). */
  unreportedMessages: number
  unreportedBytes: number
  /** The record just below `done`, once one was acknowledged: a 3.1.1 canary (see the header). */
  lastAcked: StoredRecord | null
}

/** Hands MQTT.js the ids from ID_SPLIT up, so they never collide with the uplink's PUBLISHes. */
class UpperIdProvider implements NonNullable<IClientOptions['messageIdProvider']> {
  #last: number | null = null
  allocate (): number {
    this.#last = this.#last === null || this.#last >= 0xFFFF ? ID_SPLIT : this.#last + 1
    return this.#last
  }

  getLastAllocated (): number | null { return this.#last }
  register (id: number): boolean { return id >= ID_SPLIT }
  deallocate (): void {}
  clear (): void { this.#last = null }
}

/** Builds the MQTT.js options of one connection attempt. */
function clientOptions (u: UpstreamConfig, gatewayId: string, version: ProtocolVersion): IClientOptions {
  const readPem = (file: string | undefined, what: string): Buffer | undefined => {
    if (file === undefined) return undefined
    try {
      return readFileSync(file)
    } catch (cause) {
      throw new BridgeError('BRIDGE_TLS_FILES', `upstream ${u.name}: cannot read tls.${what} ${file}: ${(cause as Error).message}`, { cause })
    }
  }
  const persistent = u.commands.length > 0
  return {
    clientId: u.clientId ?? `edgemq-${gatewayId}-${u.name}`,
    username: u.username,
    password: u.password,
    protocolVersion: version,
    // Commands sent while the link was down wait in the upstream's session.
    clean: !persistent,
    ...(version === 5 && persistent ? { properties: { sessionExpiryInterval: 7 * 24 * 3600 } } : {}),
    keepalive: u.keepaliveSeconds,
    connectTimeout: u.connectTimeoutMs,
    reconnectPeriod: 0,
    log: () => {}, // MQTT.js' per-packet debug() calls cost 5 % of a drain; the uplink logs what matters itself
    // A PINGREQ every keepalive whatever the traffic, instead of re-arming a timer on every packet sent (5 % of a drain).
    reschedulePings: false,
    resubscribe: false,
    ca: readPem(u.tls.ca, 'ca'),
    cert: readPem(u.tls.cert, 'cert'),
    key: readPem(u.tls.key, 'key'),
    rejectUnauthorized: u.tls.rejectUnauthorized,
  }
}

function redact (url: string): string {
  const u = new URL(url)
  u.username = ''
  u.password = ''
  return u.toString().replace(/\/$/, '')
}

export class Uplink {
  readonly config: UpstreamConfig
  readonly group: string
  readonly #deps: UplinkDeps
  readonly #versions: readonly ProtocolVersion[]
  #version: ProtocolVersion
  #options: IClientOptions
  #attempted = false
  /** An MQTT 5 upstream's maximum packet size (CONNACK); larger messages are dead-lettered unsent. */
  #maxPacket = Infinity
  readonly #refusals = new DisconnectRefusals(REFUSAL_DISCONNECT_MS)
  #canarySent = false
  readonly #connectionLog: ConnectionLog
  #connectFailures = 0
  readonly #lanes: Lane[] = []
  readonly #commandMappings: Array<{ readonly mapping: CommandMapping, readonly tenant: string, readonly ttlMs: number }>
  #carrier: DedupeCarrier
  readonly #random: () => number
  #client: MqttClient | null = null
  #generation = 0
  #connected = false
  #stopped = true
  #since: number | null = null
  #lastError: { message: string, at: number, resolvedAt: number | null } | null = null
  #failures = 0
  #reconnects = 0
  #reconnectTimer: NodeJS.Timeout | null = null
  #commitTimer: NodeJS.Timeout | null = null
  #rateTimer: NodeJS.Timeout | null = null
  #committing: Promise<void> | null = null
  #window: number
  #inflight = 0
  /** Messages still to resend one at a time after a disconnect with messages in flight. */
  #probe = 0
  readonly #attempts = new Map<string, number>()
  #rr = 0
  /** PUBLISHes sent on the current connection and not yet acknowledged, by message id. */
  readonly #awaiting = new Map<number, { readonly lane: Lane, readonly entry: Pending, readonly epoch: number, readonly remote: string, readonly canary: boolean }>()
  #nextId = 1
  #frames: Buffer[] = []
  #pumpScheduled = false
  #forwarded = 0
  #forwardedBytes = 0
  #deadLettered = 0
  #commandsReceived = 0
  readonly #samples: Array<{ at: number, forwarded: number }> = []
  #tokens = { messages: 0, bytes: 0, at: 0 }
  #unlisten: (() => void) | null = null
  #deadLettering = 0

  constructor (config: UpstreamConfig, deps: UplinkDeps) {
    this.config = config
    this.group = `${BRIDGE_GROUP_PREFIX}${config.name}`
    this.#deps = deps
    this.#random = deps.random ?? Math.random
    this.#versions = protocolVersions(config)
    this.#version = this.#versions[0] as ProtocolVersion
    this.#options = clientOptions(config, deps.gatewayId, this.#version)
    this.#window = config.maxInflight
    this.#carrier = dedupeCarrier(config, this.#version)
    this.#connectionLog = new ConnectionLog(deps.logger, config.name, CONNECT_FAILURE_LOG_MS)
    const values = { site: deps.gatewayId, region: config.region, upstream: config.name }
    this.#commandMappings = config.commands.map((c) => ({ mapping: parseCommandMapping(c.remote, c.local, values), tenant: c.tenant, ttlMs: c.ttlMs }))
    if (this.#commandMappings.length > 0 && deps.commands === undefined) throw new Error(`upstream ${config.name} has command mappings but no command sink`)
  }

  /** Creates the group, the lanes and the dead-letter streams, then connects. */
  async start (): Promise<void> {
    const { store } = this.#deps
    await store.setGroup(this.group, { holdsRetention: true })
    const template = parseTemplate(this.config.topicTemplate, RECORD_VARIABLES)
    const receiptTemplate = parseTemplate(this.config.receiptTopic, RECORD_VARIABLES)
    const tenants = new Set<string>()
    for (const f of this.config.forward) {
      tenants.add(f.tenant)
      this.#addLanes(f.tenant, f.stream, f.priority, f.filter, template, false)
    }
    for (const tenant of new Set(this.config.commands.map((c) => c.tenant))) {
      tenants.add(tenant) // a receipt the upstream refuses is dead-lettered too
      this.#addLanes(tenant, RECEIPTS_STREAM, 9, '#', receiptTemplate, true)
    }
    for (const tenant of tenants) {
      await store.createStream(`${tenant}/dlq.${this.config.name}`, { partitions: 1, retentionMs: DLQ_RETENTION_MS })
    }
    const byPartition = new Map(this.#lanes.map((l) => [`${l.stream}\u0000${l.partition}`, l]))
    this.#unlisten = store.onAppend((event) => {
      const lane = byPartition.get(`${event.stream}\u0000${event.partition}`)
      if (lane === undefined) return
      lane.end = event.logEndOffset
      if (this.#connected) this.#fill(lane)
    })
    this.#stopped = false
    this.#commitTimer = setInterval(() => {
      this.#sample()
      void this.#commit()
    }, this.#deps.commitIntervalMs)
    this.#commitTimer.unref()
    this.#connect()
  }

  #addLanes (tenant: string, name: string, priority: number, filter: string, template: Template<typeof RECORD_VARIABLES[number]>, receipts: boolean): void {
    const { store } = this.#deps
    const stream = `${tenant}/${name}`
    const info = store.streamInfo(stream)
    for (let partition = 0; partition < info.partitions; partition++) {
      const p = store.partitionInfo(stream, partition)
      const committed = store.fetchOffset(this.group, stream, partition)
      const start = Math.max(committed ?? p.logStartOffset, p.logStartOffset)
      this.#lanes.push({
        tenant, name, stream, partition, priority, filter, template, receipts,
        epoch: 0, nextRead: start, buffer: [], bufferAt: 0, pending: [], pendingAt: 0, done: start,
        committed: committed ?? -1, reading: false, end: p.logEndOffset, unreportedMessages: 0, unreportedBytes: 0, lastAcked: null,
      })
    }
  }

  /** Disconnects, waits for dead-letter appends, and commits what the upstream acknowledged. */
  async stop (): Promise<void> {
    if (this.#stopped) return
    this.#stopped = true
    this.#unlisten?.()
    for (const t of [this.#reconnectTimer, this.#rateTimer]) if (t !== null) clearTimeout(t)
    if (this.#commitTimer !== null) clearInterval(this.#commitTimer)
    const client = this.#client
    this.#dropConnection()
    if (client !== null) await client.endAsync(true).catch(() => {})
    while (this.#deadLettering > 0 || this.#committing !== null) {
      await this.#committing
      if (this.#deadLettering > 0) await new Promise((resolve) => setTimeout(resolve, 10))
    }
    await this.#commit()
    this.#report()
  }

  #connect (): void {
    if (this.#stopped) return
    const generation = ++this.#generation
    this.#attempted = true
    const client = mqtt.connect(this.config.url, { ...this.#options, messageIdProvider: new UpperIdProvider() })
    this.#client = client
    client.on('connect', (connack) => {
      if (generation !== this.#generation) return
      const now = this.#deps.clock.now()
      this.#connected = true
      this.#failures = 0
      this.#since = now
      if (this.#lastError !== null) this.#lastError.resolvedAt ??= now
      this.#refusals.connected()
      this.#canarySent = false
      const receiveMaximum = connack.properties?.receiveMaximum
      this.#window = Math.max(1, Math.min(this.config.maxInflight, receiveMaximum ?? Infinity, ID_SPLIT - 1))
      this.#maxPacket = connack.properties?.maximumPacketSize ?? Infinity
      this.#connectionLog.connected({ url: redact(this.config.url), mqttVersion: this.#version === 5 ? '5' : '3.1.1', dedupeId: this.#carrier }, now)
      if (this.#commandMappings.length > 0) this.#subscribeCommands(client, generation)
      for (const lane of this.#lanes) lane.end = Math.max(lane.end, this.#deps.store.partitionInfo(lane.stream, lane.partition).logEndOffset)
      this.#pump()
    })
    client.on('packetreceive', (packet) => {
      if (packet.cmd === 'puback' && generation === this.#generation) this.#onPuback(packet.messageId as number, packet.reasonCode)
    })
    client.on('error', (err) => {
      if (generation !== this.#generation) return
      this.#lastError = { message: err.message, at: this.#deps.clock.now(), resolvedAt: null }
      const code = (err as Error & { code?: unknown }).code
      if (!this.#connected && this.#version === 5 && this.#versions.includes(4) && typeof code === 'number' && UNSUPPORTED_PROTOCOL.has(code)) {
        // `auto`: the upstream does not speak MQTT 5 (aedes 1.x, older brokers). 3.1.1 has no user properties, and a
        // plain broker must not get a topic prefix, so from here on the messages go without a dedupe id.
        this.#version = 4
        this.#options = clientOptions(this.config, this.#deps.gatewayId, 4)
        this.#carrier = dedupeCarrier(this.config, 4)
        this.#deps.logger.warn({ upstream: this.config.name, dedupeId: this.#carrier }, 'upstream refuses MQTT 5: speaking MQTT 3.1.1 to it, without dedupe ids (at least once, resends unmarked)')
        this.#failures = 0
      }
    })
    client.on('close', () => {
      if (generation !== this.#generation) return
      this.#onClose()
    })
    if (this.#commandMappings.length > 0) {
      client.handleMessage = (packet, done) => {
        if (generation !== this.#generation) return
        this.#onCommand(packet, client, done)
      }
    }
  }

  #onClose (): void {
    const wasConnected = this.#connected
    this.#dropConnection()
    if (this.#stopped) return
    const now = this.#deps.clock.now()
    if (wasConnected) {
      if (this.#lastError === null || this.#lastError.resolvedAt !== null) this.#lastError = { message: 'connection closed', at: now, resolvedAt: null }
      this.#connectionLog.disconnected(this.#lastError.message, now)
    } else {
      if (this.#lastError === null || this.#lastError.resolvedAt !== null) this.#lastError = { message: 'connection closed before CONNACK', at: now, resolvedAt: null }
      this.#connectFailures++
      this.#deps.observer?.onConnectFailure?.(this.config.name)
      this.#connectionLog.failed(this.#lastError.message, now)
    }
    // Full jitter (AWS architecture blog): a fleet of gateways whose region comes back does not reconnect in step.
    const ceiling = Math.min(this.config.reconnectMaxMs, this.config.reconnectMinMs * 2 ** Math.min(this.#failures, 30))
    const delay = Math.max(this.config.reconnectMinMs / 2, this.#random() * ceiling)
    this.#failures++
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null
      this.#reconnects++
      this.#deps.observer?.onReconnect?.(this.config.name)
      this.#connect()
    }, delay)
    this.#reconnectTimer.unref()
  }

  /** Forgets the connection: in-flight messages will be resent from each lane's acknowledged offset. */
  #dropConnection (): void {
    const client = this.#client
    if (client !== null) {
      this.#generation++ // callbacks of the old client are ignored from here on
      client.removeAllListeners('connect')
      client.on('error', () => {}) // late socket errors of a client we gave up on
      client.end(true)
      this.#client = null
    }
    const now = this.#deps.clock.now()
    if (this.#connected) {
      this.#since = now
      if (this.#version === 4 && !this.#stopped) { // our own DISCONNECT at stop() says nothing about the upstream
        const strike = this.#refusals.disconnected(now)
        if (strike !== null) {
          this.#deps.logger.warn({ upstream: this.config.name, message: strike.id, attempt: strike.strikes, of: this.config.maxDeliveryAttempts },
            'upstream disconnected right after a message was sent alone on a working connection: counted as a refusal')
        }
      }
    }
    this.#connected = false
    // Over MQTT 5 a refusal is a PUBACK reason code, so a disconnect says nothing about the messages in flight.
    if (this.#inflight > 0 && this.#version === 4) this.#probe = Math.max(this.#probe, this.#inflight)
    this.#inflight = 0
    this.#awaiting.clear()
    this.#frames = []
    for (const lane of this.#lanes) this.#rewind(lane)
  }

  #rewind (lane: Lane): void {
    lane.epoch++
    lane.nextRead = lane.done
    lane.buffer = []
    lane.bufferAt = 0
    lane.pending = []
    lane.pendingAt = 0
    lane.reading = false
  }

  /** Counts a refusal; returns true when the message has used up its attempts (the caller dead-letters it). */
  #blame (lane: Lane, record: StoredRecord, reason: string): boolean {
    const key = this.#dedupeId(lane, record.offset)
    const n = (this.#attempts.get(key) ?? 0) + 1
    if (this.#attempts.size < 10_000) this.#attempts.set(key, n) // bounded, whatever an upstream does
    this.#deps.logger.warn({ upstream: this.config.name, offset: record.offset, attempt: n, of: this.config.maxDeliveryAttempts, reason }, 'upstream refused a message')
    return n >= this.config.maxDeliveryAttempts
  }

  #attemptsOf (lane: Lane, record: StoredRecord): number {
    if (this.#attempts.size === 0) return 0
    return this.#attempts.get(this.#dedupeId(lane, record.offset)) ?? 0
  }

  #pump (): void {
    if (this.#connected && this.#probe > 0 && this.#inflight === 0 && !this.#canarySent && !this.#refusals.healthy) this.#sendCanary()
    while (this.#connected && this.#inflight < (this.#probe > 0 ? 1 : this.#window)) {
      const lane = this.#nextLane()
      if (lane === null) break
      const record = lane.buffer[lane.bufferAt] as StoredRecord
      if (!this.#wanted(lane, record)) {
        lane.bufferAt++
        this.#skip(lane, record)
        continue
      }
      const strikes = this.#refusals.suspecting ? this.#refusals.strikes(this.#dedupeId(lane, record.offset)) : 0
      if (Math.max(this.#attemptsOf(lane, record), strikes) >= this.config.maxDeliveryAttempts) {
        lane.bufferAt++
        this.#refusals.forget(this.#dedupeId(lane, record.offset))
        const reason = strikes >= this.config.maxDeliveryAttempts ? `the upstream disconnected right after it was sent, ${strikes} times in a row` : 'refused by the upstream'
        this.#deadLetter(lane, this.#track(lane, record), reason)
        continue
      }
      if (!this.#takeTokens(record.payload.byteLength)) break
      lane.bufferAt++
      this.#send(lane, this.#track(lane, record))
    }
    this.#flush()
    for (const lane of this.#lanes) {
      if (lane.bufferAt >= lane.buffer.length && !lane.reading && lane.nextRead < lane.end) this.#fill(lane)
    }
  }

  /**
   * Over 3.1.1 after a disconnect with messages in flight: resends the most recently acknowledged record (a
   * duplicate under its own dedupe id, never a reorder: its lane resends from the offset after it) before anything
   * else, so the connection has carried a PUBLISH round trip before a suspect is sent alone. Without one (nothing
   * acknowledged since the start) the suspect goes first, and its disconnect cannot count.
   */
  #sendCanary (): void {
    this.#canarySent = true
    const lane = this.#lanes.find((l) => l.lastAcked !== null)
    if (lane === undefined) return
    const record = lane.lastAcked as StoredRecord
    this.#send(lane, { offset: record.offset, timestamp: record.timestamp, record, acked: true }, true)
  }

  #nextLane (): Lane | null {
    let best: Lane | null = null
    const n = this.#lanes.length
    for (let k = 0; k < n; k++) {
      const lane = this.#lanes[(this.#rr + k) % n] as Lane
      if (lane.bufferAt < lane.buffer.length && (best === null || lane.priority > best.priority)) best = lane
    }
    if (best !== null) this.#rr = (this.#lanes.indexOf(best) + 1) % n
    return best
  }

  #wanted (lane: Lane, record: StoredRecord): boolean {
    if (lane.receipts) return record.headers?.[RECEIPT_UPSTREAM_HEADER] === this.config.name
    return lane.filter === '#' || captureTopic(lane.filter, record.topic) !== null
  }

  #track (lane: Lane, record: StoredRecord): Pending {
    const entry: Pending = { offset: record.offset, timestamp: record.timestamp, record, acked: false }
    lane.pending.push(entry)
    return entry
  }

  #skip (lane: Lane, record: StoredRecord): void {
    if (lane.pendingAt === lane.pending.length) {
      lane.done = record.offset + 1
    } else {
      lane.pending.push({ offset: record.offset, timestamp: record.timestamp, record: null, acked: true })
    }
  }

  #takeTokens (bytes: number): boolean {
    const { maxMessagesPerSecond: mps, maxBytesPerSecond: bps } = this.config
    if (mps === 0 && bps === 0) return true
    const now = Date.now()
    const t = this.#tokens
    const elapsed = t.at === 0 ? 1 : (now - t.at) / 1000
    t.at = now
    // A one-second bucket: bursts up to one second's worth, as Mosquitto's and EMQX's rate limits allow.
    if (mps > 0) t.messages = Math.min(mps, t.messages + elapsed * mps)
    if (bps > 0) t.bytes = Math.min(Math.max(bps, bytes), t.bytes + elapsed * bps)
    const short = Math.max(mps > 0 ? (1 - t.messages) / mps : 0, bps > 0 ? (bytes - t.bytes) / bps : 0)
    if (short <= 0) {
      if (mps > 0) t.messages -= 1
      if (bps > 0) t.bytes -= bytes
      return true
    }
    if (this.#rateTimer === null) {
      this.#rateTimer = setTimeout(() => { this.#rateTimer = null; this.#pump() }, Math.ceil(short * 1000))
      this.#rateTimer.unref()
    }
    return false
  }

  #dedupeId (lane: Lane, offset: number): string {
    return `${this.#deps.gatewayId}/${lane.tenant}/${lane.name}/${lane.partition}/${offset}`
  }

  /**
   * Encodes the record's PUBLISH into the current batch of frames (written by #flush). The uplink numbers its own
   * PUBLISHes (1 to ID_SPLIT - 1) and matches their PUBACKs itself: going through MQTT.js' publish() cost a deep copy,
   * an outgoing-store entry and a callback per message, a third of a drain's main thread.
   */
  #send (lane: Lane, entry: Pending, canary = false): void {
    const record = entry.record as StoredRecord
    const remote = lane.template.render({
      site: this.#deps.gatewayId, region: this.config.region, upstream: this.config.name,
      tenant: lane.tenant, stream: lane.name, partition: String(lane.partition), key: record.key, topic: record.topic,
    })
    const dedupeId = this.#dedupeId(lane, record.offset)
    const topic = this.#carrier === 'topic-prefix' ? `${DEDUPE_TOPIC_PREFIX}${dedupeId}/${remote}` : remote
    const payload = Buffer.from(record.payload.buffer, record.payload.byteOffset, record.payload.byteLength)
    const messageId = this.#allocateId()
    const packet: IPublishPacket = { cmd: 'publish', topic, payload, qos: 1, dup: false, retain: false, messageId }
    if (this.#carrier === 'user-property') packet.properties = { userProperties: { [DEDUPE_PROPERTY]: dedupeId } }
    const frame = mqttPacket.generate(packet, { protocolVersion: this.#version })
    if (frame.length > this.#maxPacket) {
      // [MQTT-3.1.2-24]: a client must not send a packet larger than the server's Maximum Packet Size.
      if (!canary) this.#deadLetter(lane, entry, `larger than the upstream's maximum packet size (${frame.length} > ${this.#maxPacket} bytes)`)
      return
    }
    this.#frames.push(frame)
    this.#awaiting.set(messageId, { lane, entry, epoch: lane.epoch, remote, canary })
    if (this.#version === 4) this.#refusals.sent(canary ? `canary:${dedupeId}` : dedupeId, this.#deps.clock.now())
    this.#inflight++
  }

  /** Writes the frames #send encoded, in one write. */
  #flush (): void {
    if (this.#frames.length === 0) return
    const frames = this.#frames
    this.#frames = []
    this.#client?.stream.write(frames.length === 1 ? frames[0] as Buffer : Buffer.concat(frames))
  }

  #allocateId (): number {
    for (;;) {
      const id = this.#nextId
      this.#nextId = id + 1 < ID_SPLIT ? id + 1 : 1
      if (!this.#awaiting.has(id)) return id
    }
  }

  #onPuback (messageId: number, reasonCode: number | undefined): void {
    const waiting = this.#awaiting.get(messageId)
    if (waiting === undefined) return // an ack of MQTT.js' own, or of a dropped connection
    this.#awaiting.delete(messageId)
    const { lane, entry, epoch, remote, canary } = waiting
    if (epoch !== lane.epoch) return
    this.#inflight--
    if (this.#version === 4) this.#refusals.acked(`${canary ? 'canary:' : ''}${this.#dedupeId(lane, entry.offset)}`)
    if (canary) return this.#schedulePump()
    if (reasonCode === undefined || reasonCode < 0x80) return this.#acked(lane, entry) // 0x10 "no matching subscribers" is a success
    const record = entry.record as StoredRecord
    const reason = `reason code 0x${reasonCode.toString(16)}`
    this.#lastError = { message: `PUBACK refused ${remote}: ${reason}`, at: this.#deps.clock.now(), resolvedAt: null }
    if (this.#blame(lane, record, reason)) {
      this.#deadLetter(lane, entry, reason)
      return
    }
    // Sent again after a pause, in its place: the lane's offset cannot pass it until it is acked or dead-lettered.
    const generation = this.#generation
    this.#inflight++
    setTimeout(() => {
      if (generation !== this.#generation || epoch !== lane.epoch) return
      this.#inflight--
      this.#send(lane, entry)
      this.#flush()
    }, REFUSAL_RETRY_MS).unref()
  }

  #acked (lane: Lane, entry: Pending): void {
    entry.acked = true
    const record = entry.record as StoredRecord
    this.#forwarded++
    this.#forwardedBytes += record.payload.byteLength
    lane.unreportedMessages++
    lane.unreportedBytes += record.payload.byteLength
    if (this.#attempts.size > 0) this.#attempts.delete(this.#dedupeId(lane, record.offset))
    if (this.#probe > 0) this.#probe--
    this.#advance(lane)
    // While a backlog drains, refill in batches of a quarter of the window (up to 32): the PUBLISHes leave in one
    // write instead of a write per PUBACK. Live traffic has next to nothing in flight, so it is never held back.
    const batch = Math.min(REFILL_BATCH, Math.floor(this.#window / 4))
    if (this.#inflight === 0 || this.#probe > 0 || this.#window - this.#inflight >= batch) this.#schedulePump()
  }

  /**
   * MQTT.js handles each PUBACK of a socket read in a tick of its own, so pumping per PUBACK sent each refill in a
   * write of its own (31 % of a drain's main thread in writev). One pump per turn of the event loop refills the
   * window for all of them, and mqtt-packet's cork coalesces the PUBLISHes into one write.
   */
  #schedulePump (): void {
    if (this.#pumpScheduled) return
    this.#pumpScheduled = true
    setImmediate(() => {
      this.#pumpScheduled = false
      this.#report()
      this.#pump()
    })
  }

  /** Tells the metrics what was acknowledged since last time, per lane. */
  #report (): void {
    for (const lane of this.#lanes) {
      if (lane.unreportedMessages === 0) continue
      this.#deps.observer?.onForwarded?.(this.config.name, lane.tenant, lane.name, lane.unreportedMessages, lane.unreportedBytes)
      lane.unreportedMessages = 0
      lane.unreportedBytes = 0
    }
  }

  #advance (lane: Lane): void {
    while (lane.pendingAt < lane.pending.length && (lane.pending[lane.pendingAt] as Pending).acked) {
      const entry = lane.pending[lane.pendingAt] as Pending
      lane.done = entry.offset + 1
      if (entry.record !== null && entry.refused !== true) lane.lastAcked = entry.record
      lane.pendingAt++
    }
    if (lane.pendingAt === lane.pending.length) {
      lane.pending = []
      lane.pendingAt = 0
    } else if (lane.pendingAt > 1024) {
      lane.pending = lane.pending.slice(lane.pendingAt)
      lane.pendingAt = 0
    }
  }

  #deadLetter (lane: Lane, entry: Pending, reason: string): void {
    const record = entry.record as StoredRecord
    const { store, logger } = this.#deps
    const epoch = lane.epoch
    this.#deadLettering++
    const dlq = `${lane.tenant}/dlq.${this.config.name}`
    const headers = {
      ...record.headers,
      'edgemq-dlq-reason': reason,
      'edgemq-dlq-source': `${lane.stream}/${lane.partition}/${record.offset}`,
      [RECEIPT_UPSTREAM_HEADER]: this.config.name,
    }
    this.#inflight++ // holds a window slot, so the lane does not race past it
    store.append(dlq, record.key, { payload: record.payload, topic: record.topic, qos: record.qos, clientId: record.clientId, headers, timestamp: record.timestamp },
      { dedupeId: `dlq/${this.config.name}/${this.#dedupeId(lane, record.offset)}` }).then(() => {
      this.#deadLettered++
      this.#deps.observer?.onDeadLettered?.(this.config.name, lane.tenant, lane.name)
      logger.error({ upstream: this.config.name, stream: lane.stream, partition: lane.partition, offset: record.offset, dlq, reason }, 'message dead-lettered: the upstream refuses it')
      this.#attempts.delete(this.#dedupeId(lane, record.offset))
      if (epoch !== lane.epoch) return
      this.#inflight--
      if (this.#probe > 0) this.#probe--
      entry.refused = true
      entry.acked = true
      this.#advance(lane)
      this.#pump()
    }, (err: unknown) => {
      // Not dead-lettered yet: the message keeps its window slot (the lane cannot pass it) and is tried again.
      logger.error({ upstream: this.config.name, err: (err as Error).message, dlq }, 'dead-letter append failed; retrying')
      if (epoch !== lane.epoch) return
      this.#inflight--
      setTimeout(() => { if (epoch === lane.epoch && !this.#stopped) this.#deadLetter(lane, entry, reason) }, REFUSAL_RETRY_MS).unref()
    }).finally(() => { this.#deadLettering-- })
  }

  #fill (lane: Lane): void {
    if (lane.reading || lane.bufferAt < lane.buffer.length || this.#stopped) return
    const { store } = this.#deps
    if (lane.nextRead >= lane.end) return
    lane.reading = true
    const epoch = lane.epoch
    store.read(lane.stream, lane.partition, lane.nextRead, { maxRecords: READ_RECORDS, maxBytes: READ_BYTES }).then((r) => {
      if (epoch !== lane.epoch) return
      lane.reading = false
      lane.buffer = r.records
      lane.bufferAt = 0
      lane.nextRead = r.nextOffset
      this.#pump()
    }, (err: unknown) => {
      if (epoch !== lane.epoch) return
      lane.reading = false
      if (isStoreError(err, 'STORE_OFFSET_OUT_OF_RANGE')) {
        // Retention (the disk budget) deleted records this upstream had not forwarded; the store counted and logged
        // them per group. Continue from the new log start.
        const start = store.partitionInfo(lane.stream, lane.partition).logStartOffset
        this.#deps.logger.warn({ upstream: this.config.name, stream: lane.stream, partition: lane.partition, from: lane.nextRead, to: start }, 'records dropped by retention before they were forwarded')
        if (lane.pendingAt === lane.pending.length && lane.done < start) lane.done = start
        lane.nextRead = Math.max(lane.nextRead, start)
        this.#fill(lane)
        return
      }
      this.#deps.logger.error({ upstream: this.config.name, stream: lane.stream, partition: lane.partition, err: (err as Error).message }, 'reading the log failed; retrying')
      setTimeout(() => this.#fill(lane), 1000).unref()
    })
  }

  /** Commits each lane's acknowledged offset; one commit at a time. */
  #commit (): Promise<void> {
    if (this.#committing !== null) return this.#committing
    const work = async (): Promise<void> => {
      for (const lane of this.#lanes) {
        const target = lane.done
        if (target <= lane.committed) continue
        try {
          await this.#deps.store.commitOffset(this.group, lane.stream, lane.partition, target)
          lane.committed = target
        } catch (err) {
          if (!isStoreError(err, 'STORE_CLOSED')) this.#deps.logger.error({ upstream: this.config.name, err: (err as Error).message }, 'committing the upstream\'s offset failed')
          return
        }
      }
    }
    this.#committing = work().finally(() => { this.#committing = null })
    return this.#committing
  }

  #sample (): void {
    const now = this.#deps.clock.now()
    const last = this.#samples.at(-1)
    if (last !== undefined && now - last.at < 1000) return
    this.#samples.push({ at: now, forwarded: this.#forwarded })
    if (this.#samples.length > THROUGHPUT_WINDOW + 1) this.#samples.shift()
  }

  #subscribeCommands (client: MqttClient, generation: number): void {
    const filters = this.#commandMappings.map((c) => c.mapping.remoteFilter)
    client.subscribe(filters, { qos: 1 }, (err, granted) => {
      if (generation !== this.#generation) return
      const refused = (granted ?? []).filter((g) => g.qos >= 0x80) // a SUBACK failure (MQTT 5 reason codes land in qos too)
      if (err != null || refused.length > 0) {
        const message = err?.message ?? `the upstream refused the subscription to ${refused.map((g) => g.topic).join(', ')}`
        this.#lastError = { message, at: this.#deps.clock.now(), resolvedAt: null }
        this.#deps.logger.error({ upstream: this.config.name, err: message }, 'subscribing to command topics failed')
      }
    })
  }

  #onCommand (packet: IPublishPacket, client: MqttClient, done: (err?: Error) => void): void {
    const topic = packet.topic
    const match = this.#commandMappings.find((c) => c.mapping.toLocal(topic) !== null)
    const local = match?.mapping.toLocal(topic) ?? null
    if (match === undefined || local === null) {
      this.#deps.logger.warn({ upstream: this.config.name, topic }, 'command on a topic no mapping covers: acknowledged and dropped')
      return done()
    }
    const now = this.#deps.clock.now()
    const expiry = packet.properties?.messageExpiryInterval
    const limits = [match.ttlMs > 0 ? now + match.ttlMs : Infinity, expiry !== undefined ? now + expiry * 1000 : Infinity]
    const expiresAt = Math.min(...limits)
    const payload = typeof packet.payload === 'string' ? Buffer.from(packet.payload) : packet.payload
    this.#commandsReceived++
    this.#deps.observer?.onCommand?.(this.config.name)
    const generation = this.#generation
    ;(this.#deps.commands as CommandSink).accept({
      upstream: this.config.name, tenant: match.tenant, localTopic: local, remoteTopic: topic, payload,
      expiresAt: Number.isFinite(expiresAt) ? expiresAt : null,
    }).then(() => { if (generation === this.#generation) done() }, (err: unknown) => {
      // Not acknowledged: drop the connection, and the upstream's session redelivers the command after the reconnect.
      this.#deps.logger.error({ upstream: this.config.name, topic, err: (err as Error).message }, 'command could not be stored; reconnecting so the upstream redelivers it')
      if (generation === this.#generation) client.stream.destroy()
    })
  }

  /** The upstream's state; reads one record per lane whose oldest unforwarded record is not in memory. */
  async status (): Promise<UpstreamStatus> {
    const { store, clock } = this.#deps
    const now = clock.now()
    let messages = 0
    let bytes = 0
    let oldest = Infinity
    const partitions: LaneStatus[] = []
    for (const lane of this.#lanes) {
      const p = store.partitionInfo(lane.stream, lane.partition)
      const from = Math.max(lane.done, p.logStartOffset)
      const backlog = Math.max(0, p.logEndOffset - from)
      messages += backlog
      const stored = p.logEndOffset - p.logStartOffset
      if (stored > 0) bytes += Math.round(p.bytes * backlog / stored) // estimate: the partition's average record size
      if (backlog > 0) {
        const ts = lane.pendingAt < lane.pending.length ? (lane.pending[lane.pendingAt] as Pending).timestamp : await this.#timestampAt(lane, from)
        if (ts !== null) oldest = Math.min(oldest, ts)
      }
      partitions.push({
        tenant: lane.tenant, stream: lane.name, partition: lane.partition,
        committedOffset: Math.max(lane.committed, 0), forwardedOffset: lane.done, logEndOffset: p.logEndOffset, backlogMessages: backlog,
      })
    }
    const first = this.#samples[0]
    const last = this.#samples.at(-1)
    const throughput = first !== undefined && last !== undefined && last.at > first.at ? (last.forwarded - first.forwarded) * 1000 / (last.at - first.at) : 0
    return {
      name: this.config.name,
      region: this.config.region,
      url: redact(this.config.url),
      kind: this.config.kind,
      mqttVersion: this.#attempted ? (this.#version === 5 ? '5' : '3.1.1') : null,
      dedupeId: this.#carrier,
      connected: this.#connected,
      since: this.#since === null ? null : new Date(this.#since).toISOString(),
      lastError: this.#lastError === null
        ? null
        : { message: this.#lastError.message, at: new Date(this.#lastError.at).toISOString(), resolvedAt: this.#lastError.resolvedAt === null ? null : new Date(this.#lastError.resolvedAt).toISOString() },
      connectFailures: this.#connectFailures,
      reconnects: this.#reconnects,
      inflight: this.#inflight,
      forwardedMessages: this.#forwarded,
      forwardedBytes: this.#forwardedBytes,
      throughput: Math.round(throughput * 10) / 10,
      deadLettered: this.#deadLettered,
      commandsReceived: this.#commandsReceived,
      backlog: { messages, bytes, seconds: oldest === Infinity ? 0 : Math.max(0, (now - oldest) / 1000) },
      partitions,
    }
  }

  async #timestampAt (lane: Lane, offset: number): Promise<number | null> {
    const b = lane.buffer[lane.bufferAt]
    if (b !== undefined && b.offset === offset) return b.timestamp
    try {
      const r = await this.#deps.store.read(lane.stream, lane.partition, offset, { maxRecords: 1 })
      return r.records[0]?.timestamp ?? null
    } catch {
      return null
    }
  }
}
