/**
 * The lifecycle of a NATS uplink's link to JetStream: connect, check (or
 * create) the stream, hand the uplink a ready JetStream client; on any
 * failure close, and try again after an exponential backoff with full jitter,
 * as connection.ts does for MQTT upstreams.
 *
 * Each attempt is a fresh NATS connection with the client's own reconnection
 * turned off, numbered by `generation`: callbacks of an older one are ignored,
 * so a PubAck of a dropped connection never touches the current one. The
 * client does the protocol (CONNECT, PING, TLS, user/password, token, NKey,
 * creds); this file only decides when to try and what the status says.
 *
 * "Connected" in the status means ready to forward: the connection is up and
 * the stream passed its check. A missing stream, a too-short duplicate window
 * or a subject the stream does not cover leave the uplink down with a coded
 * error (status, log, `edgemq_bridge_upstream_error`), and the check runs
 * again at each retry, so fixing the stream upstream is enough.
 */
import { readFileSync } from 'node:fs'
import { jetstream, JetStreamApiCodes, JetStreamApiError, jetstreamManager, type JetStreamClient, type StreamConfig, type StreamInfo } from '@nats-io/jetstream'
import {
  AuthorizationError, connect, credsAuthenticator, nkeyAuthenticator, type Authenticator, type NatsConnection, type NodeConnectionOptions,
} from '@nats-io/transport-node'
import type { Clock } from '../../store/index.ts'
import type { UpstreamConfig } from '../config-schema.ts'
import { ConnectionLog } from '../connection-log.ts'
import { BridgeError, isBridgeError, type BridgeErrorCode } from '../errors.ts'
import { isoOrNull, type BridgeLogger, type ConnectionError, type ConnectionStatus, type UplinkObserver } from '../uplink/status.ts'
import { natsServers } from './config.ts'
import { subjectCovers } from './subjects.ts'

const CONNECT_FAILURE_LOG_MS = 60_000
const NANOS_PER_MS = 1_000_000

export interface NatsLinkEvents {
  /** The connection is up and the stream checked: forward on `js`. */
  ready (js: JetStreamClient, nc: NatsConnection, stream: StreamInfo): void
  /** The link is gone (closed, failed, restarted, or stopped); `wasReady`: ready() had been called for it. */
  dropped (wasReady: boolean): void
}

export interface NatsLinkDeps {
  readonly gatewayId: string
  readonly clock: Clock
  readonly logger: BridgeLogger
  readonly observer?: UplinkObserver
  readonly random?: () => number
}

/** What the stream must cover: one subject filter per forwarded (tenant, stream, partition), from the subject template. */
export type RequiredSubjects = () => readonly string[]

/** The connection options of the upstream; throws BRIDGE_TLS_FILES or BRIDGE_NATS_CREDENTIALS_FILE when a file cannot be read. */
export function natsOptions (u: UpstreamConfig, gatewayId: string): NodeConnectionOptions {
  const read = (file: string, what: string, code: 'BRIDGE_TLS_FILES' | 'BRIDGE_NATS_CREDENTIALS_FILE'): Buffer => {
    try {
      return readFileSync(file)
    } catch (cause) {
      throw new BridgeError(code, `upstream ${u.name}: cannot read ${what} ${file}: ${(cause as Error).message}`, { cause })
    }
  }
  const n = u.nats
  let authenticator: Authenticator | undefined
  if (n.credsFile !== undefined) {
    authenticator = credsAuthenticator(new Uint8Array(read(n.credsFile, 'nats.credsFile', 'BRIDGE_NATS_CREDENTIALS_FILE')))
    // The client parses the file only when the server asks for a signature, and a failure then looks like an
    // unreachable server, retried for ever: sign once now, so a garbled file stops the start with its own code.
    try {
      authenticator('edgemq-creds-check')
    } catch (cause) {
      throw new BridgeError('BRIDGE_NATS_CREDENTIALS_FILE',
        `upstream ${u.name}: nats.credsFile ${n.credsFile} is not a creds file (a user JWT and an NKey seed, as nsc writes it): ${(cause as Error).message}`,
        { cause })
    }
  }
  if (n.nkeySeedFile !== undefined) {
    const seed = read(n.nkeySeedFile, 'nats.nkeySeedFile', 'BRIDGE_NATS_CREDENTIALS_FILE').toString('utf8').trim()
    if (!/^S[A-Z2-7]{50,}$/.test(seed)) {
      throw new BridgeError('BRIDGE_NATS_CREDENTIALS_FILE', `upstream ${u.name}: nats.nkeySeedFile ${n.nkeySeedFile} does not hold an NKey seed (S…)`)
    }
    authenticator = nkeyAuthenticator(new TextEncoder().encode(seed))
  }
  const t = u.tls
  const tlsWanted = t.ca !== undefined || t.cert !== undefined || natsServers(u.url).some((s) => s.startsWith('tls://'))
  return {
    servers: natsServers(u.url),
    name: u.clientId ?? `edgemq-${gatewayId}-${u.name}`,
    ...(u.username !== undefined ? { user: u.username, pass: u.password ?? '' } : {}),
    ...(n.token !== undefined ? { token: n.token } : {}),
    ...(authenticator !== undefined ? { authenticator } : {}),
    ...(tlsWanted
      ? {
          tls: {
            ...(t.ca !== undefined ? { ca: read(t.ca, 'tls.ca', 'BRIDGE_TLS_FILES').toString('utf8') } : {}),
            ...(t.cert !== undefined ? { cert: read(t.cert, 'tls.cert', 'BRIDGE_TLS_FILES').toString('utf8') } : {}),
            ...(t.key !== undefined ? { key: read(t.key, 'tls.key', 'BRIDGE_TLS_FILES').toString('utf8') } : {}),
            rejectUnauthorized: t.rejectUnauthorized,
          },
        }
      : {}),
    reconnect: false,
    timeout: u.connectTimeoutMs,
    pingInterval: Math.max(1, u.keepaliveSeconds) * 1000,
    ignoreAuthErrorAbort: true,
  }
}

/** The stream config created from the upstream's `nats.stream` when it does not exist and `create` is set. */
function streamConfig (u: UpstreamConfig): Partial<StreamConfig> & { name: string } {
  const s = u.nats.stream
  return {
    name: s.name,
    subjects: [...s.subjects],
    num_replicas: s.replicas,
    storage: s.storage,
    max_age: s.maxAgeMs * NANOS_PER_MS,
    duplicate_window: s.duplicateWindowMs * NANOS_PER_MS,
  } as Partial<StreamConfig> & { name: string }
}

/** The coded problem of a connection or check failure. */
function classify (err: unknown): { code: BridgeErrorCode, message: string } {
  if (isBridgeError(err)) return { code: err.code, message: err.message }
  const message = (err as Error).message
  if (err instanceof AuthorizationError || /authoriz|authentication/i.test(message)) return { code: 'BRIDGE_NATS_AUTH', message }
  if (/jetstream (is )?not enabled/i.test(message)) return { code: 'BRIDGE_NATS_NO_JETSTREAM', message }
  return { code: 'BRIDGE_NATS_UNREACHABLE', message }
}

export class NatsLink {
  readonly #config: UpstreamConfig
  readonly #deps: NatsLinkDeps
  readonly #events: NatsLinkEvents
  readonly #required: RequiredSubjects
  readonly #random: () => number
  readonly #options: NodeConnectionOptions
  readonly #log: ConnectionLog
  #nc: NatsConnection | null = null
  #generation = 0
  #ready = false
  #stopped = true
  #since: number | null = null
  #lastError: ConnectionError | null = null
  #failures = 0
  #connectFailures = 0
  #reconnects = 0
  #timer: NodeJS.Timeout | null = null
  #stream: StreamInfo | null = null
  #server: { name: string, version: string, jetstream: boolean } | null = null

  /** Throws BRIDGE_TLS_FILES or BRIDGE_NATS_CREDENTIALS_FILE when a file cannot be read. */
  constructor (config: UpstreamConfig, deps: NatsLinkDeps, events: NatsLinkEvents, required: RequiredSubjects) {
    this.#config = config
    this.#deps = deps
    this.#events = events
    this.#required = required
    this.#random = deps.random ?? Math.random
    this.#options = natsOptions(config, deps.gatewayId)
    this.#log = new ConnectionLog(deps.logger, config.name, CONNECT_FAILURE_LOG_MS)
  }

  get ready (): boolean { return this.#ready }
  get generation (): number { return this.#generation }
  /** The stream as last checked. */
  get stream (): StreamInfo | null { return this.#stream }
  /** The server of the current (or last) connection, from its INFO. */
  get server (): { readonly name: string, readonly version: string, readonly jetstream: boolean } | null { return this.#server }

  /** Records an error for the status (and the error gauge) without dropping the link. */
  recordError (message: string, code?: BridgeErrorCode): void {
    this.#lastError = { message, ...(code === undefined ? {} : { code }), at: this.#deps.clock.now(), resolvedAt: null }
  }

  start (): void {
    this.#stopped = false
    void this.#attempt()
  }

  async stop (): Promise<void> {
    this.#stopped = true
    if (this.#timer !== null) clearTimeout(this.#timer)
    const nc = this.#nc
    this.#drop()
    if (nc !== null) await nc.close().catch(() => {})
  }

  /** Gives up the current connection (a publish failed): drop, back off, connect and check again. */
  restart (code: BridgeErrorCode, message: string): void {
    if (this.#stopped || this.#nc === null) return
    this.recordError(message, code)
    this.#deps.logger.warn({ upstream: this.#config.name, code, err: message }, 'NATS upstream failed a publish; reconnecting')
    this.#fail()
  }

  status (): ConnectionStatus {
    const e = this.#lastError
    return {
      mqttVersion: null,
      dedupeId: 'nats-msg-id',
      connected: this.#ready,
      since: isoOrNull(this.#since),
      lastError: e === null
        ? null
        : { message: e.message, ...(e.code === undefined ? {} : { code: e.code }), at: new Date(e.at).toISOString(), resolvedAt: isoOrNull(e.resolvedAt) },
      connectFailures: this.#connectFailures,
      reconnects: this.#reconnects,
    }
  }

  async #attempt (): Promise<void> {
    if (this.#stopped) return
    const generation = ++this.#generation
    let nc: NatsConnection
    try {
      nc = await connect(this.#options)
    } catch (err) {
      if (generation !== this.#generation) return
      const { code, message } = classify(err)
      this.recordError(message, code)
      this.#fail()
      return
    }
    if (generation !== this.#generation || this.#stopped) {
      await nc.close().catch(() => {})
      return
    }
    this.#nc = nc
    const info = nc.info
    if (info !== undefined) this.#server = { name: info.server_name, version: info.version, jetstream: info.jetstream === true }
    void nc.closed().then((err) => {
      if (generation !== this.#generation) return
      if (err instanceof Error) this.recordError(err.message, classify(err).code)
      else if (this.#lastError === null || this.#lastError.resolvedAt !== null) this.recordError('connection closed', 'BRIDGE_NATS_UNREACHABLE')
      this.#fail()
    })
    try {
      const stream = await this.#checkStream(nc)
      if (generation !== this.#generation) return
      this.#stream = stream
    } catch (err) {
      if (generation !== this.#generation) return
      const { code, message } = classify(err)
      this.recordError(message, code)
      this.#deps.logger.error({ upstream: this.#config.name, code, err: message }, 'NATS upstream cannot take the records; forwarding nothing, checking again')
      this.#fail()
      return
    }
    const now = this.#deps.clock.now()
    this.#ready = true
    this.#failures = 0
    this.#since = now
    if (this.#lastError !== null) this.#lastError.resolvedAt ??= now
    const s = this.#stream as StreamInfo
    this.#log.connected({ url: redactServers(this.#config.url), dedupeId: 'nats-msg-id' }, now)
    this.#deps.logger.info({
      upstream: this.#config.name, stream: s.config.name, replicas: s.config.num_replicas,
      duplicateWindowMs: s.config.duplicate_window / NANOS_PER_MS, messages: s.state.messages,
    }, 'NATS upstream stream checked')
    this.#events.ready(jetstream(nc, { timeout: this.#config.nats.ackTimeoutMs }), nc, s)
  }

  /** The stream, created from config if missing and allowed; throws BRIDGE_NATS_… when it cannot take the records. */
  async #checkStream (nc: NatsConnection): Promise<StreamInfo> {
    const want = this.#config.nats
    const jsm = await jetstreamManager(nc, { timeout: this.#config.nats.ackTimeoutMs })
    let info: StreamInfo
    try {
      info = await jsm.streams.info(want.stream.name)
    } catch (err) {
      if (!(err instanceof JetStreamApiError) || err.code !== JetStreamApiCodes.StreamNotFound) throw err
      if (!want.stream.create) {
        throw new BridgeError('BRIDGE_NATS_STREAM_MISSING', `stream ${want.stream.name} does not exist (create it, or set nats.stream.create)`)
      }
      try {
        info = await jsm.streams.add(streamConfig(this.#config))
      } catch (cause) {
        throw new BridgeError('BRIDGE_NATS_STREAM_MISSING', `stream ${want.stream.name} does not exist and creating it failed: ${(cause as Error).message}`,
          { cause })
      }
      this.#deps.logger.info({ upstream: this.#config.name, stream: want.stream.name, replicas: want.stream.replicas }, 'NATS stream created')
    }
    // A replicated stream answers info() from the meta leader before its own leader is elected; publishing then gets
    // "no responders" for some messages and not for later ones, which stores a partition out of order.
    if (info.cluster !== undefined && info.config.num_replicas > 1 && (info.cluster.leader ?? '') === '') {
      throw new BridgeError('BRIDGE_NATS_UNREACHABLE', `stream ${info.config.name} has no leader yet`)
    }
    const windowMs = info.config.duplicate_window / NANOS_PER_MS
    if (windowMs < want.minDuplicateWindowMs) {
      throw new BridgeError('BRIDGE_NATS_DUPLICATE_WINDOW',
        `stream ${info.config.name} has a duplicate window of ${windowMs} ms, below nats.minDuplicateWindowMs ${want.minDuplicateWindowMs} ms`)
    }
    const subjects = info.config.subjects ?? []
    for (const needed of this.#required()) {
      if (!subjects.some((s) => subjectCovers(s, needed))) {
        throw new BridgeError('BRIDGE_NATS_SUBJECT_NOT_COVERED',
          `stream ${info.config.name} (subjects ${subjects.join(', ') || 'none'}) does not cover ${needed}`)
      }
    }
    return info
  }

  /** The attempt (or the connection) failed: forget it, and try again after the backoff. */
  #fail (): void {
    const wasReady = this.#ready
    const nc = this.#nc
    this.#drop()
    if (nc !== null) void nc.close().catch(() => {})
    if (this.#stopped) return
    const now = this.#deps.clock.now()
    const message = this.#lastError?.message ?? 'failed'
    if (wasReady) {
      this.#log.disconnected(message, now)
    } else {
      this.#connectFailures++
      this.#deps.observer?.onConnectFailure?.(this.#config.name)
      this.#log.failed(message, now)
    }
    const ceiling = Math.min(this.#config.reconnectMaxMs, this.#config.reconnectMinMs * 2 ** Math.min(this.#failures, 30))
    const delay = Math.max(this.#config.reconnectMinMs / 2, this.#random() * ceiling)
    this.#failures++
    this.#timer = setTimeout(() => {
      this.#timer = null
      this.#reconnects++
      this.#deps.observer?.onReconnect?.(this.#config.name)
      void this.#attempt()
    }, delay)
    this.#timer.unref()
  }

  #drop (): void {
    this.#generation++
    this.#nc = null
    const wasReady = this.#ready
    if (wasReady) this.#since = this.#deps.clock.now()
    this.#ready = false
    this.#events.dropped(wasReady)
  }
}

/** The comma-separated server URLs without credentials. */
export function redactServers (url: string): string {
  return natsServers(url).map((s) => {
    try {
      const u = new URL(s)
      u.username = ''
      u.password = ''
      return u.toString().replace(/\/$/, '')
    } catch {
      return s
    }
  }).join(',')
}
