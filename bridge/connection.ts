/**
 * The lifecycle of an uplink's connection to its upstream: connect, CONNACK,
 * close, and reconnect after an exponential backoff with full jitter.
 *
 * Each connection is a fresh MQTT.js client with its own reconnection turned
 * off, numbered by `generation`: callbacks of an older client are ignored, so
 * a late event of a dropped connection never touches the current one.
 * MQTT.js does CONNECT, keep-alive, SUBSCRIBE and the commands; the forwarded
 * PUBLISHes are the uplink's (it writes them with write() and gets their
 * PUBACKs through the `puback` event).
 *
 * Protocol: MQTT 5 unless the config says otherwise; `mqttVersion: auto`
 * falls back to 3.1.1 (for the rest of the process) when the upstream refuses
 * 5 at CONNACK. The dedupe id travels as the form dedupeCarrier() gives for
 * the level spoken (config-schema.ts).
 *
 * This file also keeps the connection's part of the status (since when up or
 * down, the last error, failures, reconnects) and what connection-log.ts logs.
 */
import { readFileSync } from 'node:fs'
import mqtt, { type IClientOptions, type IConnackPacket, type IPublishPacket, type MqttClient } from 'mqtt'
import type { Clock } from '../store/index.ts'
import { dedupeCarrier, protocolVersions, type DedupeCarrier, type ProtocolVersion, type UpstreamConfig } from './config-schema.ts'
import { ConnectionLog } from './connection-log.ts'
import type { DownlinkConnection } from './downlink.ts'
import { BridgeError } from './errors.ts'
import { isoOrNull, redact, type BridgeLogger, type ConnectionError, type ConnectionStatus, type UplinkObserver } from './uplink/status.ts'

/** Message ids below this are the uplink's PUBLISHes; MQTT.js numbers its own packets (SUBSCRIBE) from here up. */
export const ID_SPLIT = 0xF000
/** At most one line per this long about an upstream that stays unreachable. */
const CONNECT_FAILURE_LOG_MS = 60_000
/** CONNACK return codes of a broker that does not speak the protocol level asked for: 3.1.1's 1, MQTT 5's 0x84. */
const UNSUPPORTED_PROTOCOL = new Set([1, 0x84])

/** What the connection tells the uplink. Called only for the current connection. */
export interface ConnectionEvents {
  /** A CONNACK accepted the connection. */
  connected (client: MqttClient, connack: IConnackPacket): void
  /** The connection is gone (closed, failed, or dropped by stop()); `wasConnected`: it had been accepted. */
  dropped (wasConnected: boolean, now: number): void
  /** A PUBACK arrived. */
  puback (messageId: number, reasonCode: number | undefined): void
  /** A PUBLISH from the upstream (only when the uplink has command mappings); `done` acknowledges it. */
  command? (packet: IPublishPacket, client: MqttClient, done: (err?: Error) => void): void
}

export interface ConnectionDeps {
  readonly gatewayId: string
  readonly clock: Clock
  readonly logger: BridgeLogger
  readonly observer?: UplinkObserver
  /** Source of jitter for reconnect delays (tests make it deterministic). */
  readonly random?: () => number
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

export class UpstreamConnection implements DownlinkConnection {
  readonly #config: UpstreamConfig
  readonly #deps: ConnectionDeps
  readonly #events: ConnectionEvents
  readonly #random: () => number
  readonly #versions: readonly ProtocolVersion[]
  #version: ProtocolVersion
  #carrier: DedupeCarrier
  #options: IClientOptions
  #attempted = false
  readonly #log: ConnectionLog
  #client: MqttClient | null = null
  #generation = 0
  #connected = false
  #stopped = true
  #since: number | null = null
  #lastError: ConnectionError | null = null
  /** Failed attempts since the last CONNACK: the backoff's exponent. */
  #failures = 0
  #connectFailures = 0
  #reconnects = 0
  #reconnectTimer: NodeJS.Timeout | null = null

  /** Throws BRIDGE_TLS_FILES when a TLS file cannot be read. */
  constructor (config: UpstreamConfig, deps: ConnectionDeps, events: ConnectionEvents) {
    this.#config = config
    this.#deps = deps
    this.#events = events
    this.#random = deps.random ?? Math.random
    this.#versions = protocolVersions(config)
    this.#version = this.#versions[0] as ProtocolVersion
    this.#options = clientOptions(config, deps.gatewayId, this.#version)
    this.#carrier = dedupeCarrier(config, this.#version)
    this.#log = new ConnectionLog(deps.logger, config.name, CONNECT_FAILURE_LOG_MS)
  }

  /** The protocol level of the current (or next) connection. */
  get version (): ProtocolVersion { return this.#version }
  /** How messages carry their dedupe id at that level. */
  get carrier (): DedupeCarrier { return this.#carrier }
  get connected (): boolean { return this.#connected }
  get generation (): number { return this.#generation }

  recordError (message: string): void {
    this.#lastError = { message, at: this.#deps.clock.now(), resolvedAt: null }
  }

  /** Writes to the current connection's socket (nothing when there is none). */
  write (data: Buffer): void {
    this.#client?.stream.write(data)
  }

  start (): void {
    this.#stopped = false
    this.#connect()
  }

  /** Stops reconnecting and closes the connection (dropped() is called before this returns a promise). */
  async stop (): Promise<void> {
    this.#stopped = true
    if (this.#reconnectTimer !== null) clearTimeout(this.#reconnectTimer)
    const client = this.#client
    this.#drop()
    if (client !== null) await client.endAsync(true).catch(() => {})
  }

  status (): ConnectionStatus {
    const e = this.#lastError
    return {
      mqttVersion: this.#attempted ? (this.#version === 5 ? '5' : '3.1.1') : null,
      dedupeId: this.#carrier,
      connected: this.#connected,
      since: isoOrNull(this.#since),
      lastError: e === null ? null : { message: e.message, at: new Date(e.at).toISOString(), resolvedAt: isoOrNull(e.resolvedAt) },
      connectFailures: this.#connectFailures,
      reconnects: this.#reconnects,
    }
  }

  #connect (): void {
    if (this.#stopped) return
    const generation = ++this.#generation
    this.#attempted = true
    const client = mqtt.connect(this.#config.url, { ...this.#options, messageIdProvider: new UpperIdProvider() })
    this.#client = client
    client.on('connect', (connack) => {
      if (generation !== this.#generation) return
      const now = this.#deps.clock.now()
      this.#connected = true
      this.#failures = 0
      this.#since = now
      if (this.#lastError !== null) this.#lastError.resolvedAt ??= now
      this.#log.connected({ url: redact(this.#config.url), mqttVersion: this.#version === 5 ? '5' : '3.1.1', dedupeId: this.#carrier }, now)
      this.#events.connected(client, connack)
    })
    client.on('packetreceive', (packet) => {
      if (packet.cmd === 'puback' && generation === this.#generation) this.#events.puback(packet.messageId as number, packet.reasonCode)
    })
    client.on('error', (err) => {
      if (generation !== this.#generation) return
      this.recordError(err.message)
      const code = (err as Error & { code?: unknown }).code
      if (!this.#connected && this.#version === 5 && this.#versions.includes(4) && typeof code === 'number' && UNSUPPORTED_PROTOCOL.has(code)) {
        // `auto`: the upstream does not speak MQTT 5 (aedes 1.x, older brokers). 3.1.1 has no user properties, and a
        // plain broker must not get a topic prefix, so from here on the messages go without a dedupe id.
        this.#version = 4
        this.#options = clientOptions(this.#config, this.#deps.gatewayId, 4)
        this.#carrier = dedupeCarrier(this.#config, 4)
        const message = 'upstream refuses MQTT 5: speaking MQTT 3.1.1 to it, without dedupe ids (at least once, resends unmarked)'
        this.#deps.logger.warn({ upstream: this.#config.name, dedupeId: this.#carrier }, message)
        this.#failures = 0
      }
    })
    client.on('close', () => {
      if (generation !== this.#generation) return
      this.#onClose()
    })
    const command = this.#events.command
    if (command !== undefined) {
      client.handleMessage = (packet, done) => {
        if (generation !== this.#generation) return
        command(packet, client, done)
      }
    }
  }

  #onClose (): void {
    const wasConnected = this.#connected
    this.#drop()
    if (this.#stopped) return
    const now = this.#deps.clock.now()
    const unresolved = this.#lastError !== null && this.#lastError.resolvedAt === null
    if (wasConnected) {
      if (!unresolved) this.recordError('connection closed')
      this.#log.disconnected((this.#lastError as ConnectionError).message, now)
    } else {
      if (!unresolved) this.recordError('connection closed before CONNACK')
      this.#connectFailures++
      this.#deps.observer?.onConnectFailure?.(this.#config.name)
      this.#log.failed((this.#lastError as ConnectionError).message, now)
    }
    // Full jitter (AWS architecture blog): a fleet of gateways whose region comes back does not reconnect in step.
    const ceiling = Math.min(this.#config.reconnectMaxMs, this.#config.reconnectMinMs * 2 ** Math.min(this.#failures, 30))
    const delay = Math.max(this.#config.reconnectMinMs / 2, this.#random() * ceiling)
    this.#failures++
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null
      this.#reconnects++
      this.#deps.observer?.onReconnect?.(this.#config.name)
      this.#connect()
    }, delay)
    this.#reconnectTimer.unref()
  }

  /** Forgets the connection; the uplink resends what was in flight from each lane's acknowledged offset. */
  #drop (): void {
    const client = this.#client
    if (client !== null) {
      this.#generation++ // callbacks of the old client are ignored from here on
      client.removeAllListeners('connect')
      client.on('error', () => {}) // late socket errors of a client we gave up on
      client.end(true)
      this.#client = null
    }
    const now = this.#deps.clock.now()
    const wasConnected = this.#connected
    if (wasConnected) this.#since = now
    this.#connected = false
    this.#events.dropped(wasConnected, now)
  }
}
