/**
 * What an uplink logs about its connection, so that an upstream that is down
 * shows in the log without flooding it: the first failed attempt of an outage
 * at once, then at most one line per `everyMs` with the number of attempts
 * since the last line; each (re)connect with how long the upstream was down
 * and how many attempts failed. Time comes in with each event.
 */
import type { BridgeLogger } from './uplink/status.ts'

export interface ConnectionFields {
  readonly url: string
  /** MQTT upstreams only. */
  readonly mqttVersion?: '5' | '3.1.1'
  readonly dedupeId: string
}

export class ConnectionLog {
  readonly #logger: BridgeLogger
  readonly #upstream: string
  readonly #everyMs: number
  /** Start of the current outage (first failure or disconnect); null while connected or before the first attempt. */
  #downSince: number | null = null
  #failures = 0
  #lastLine = -Infinity
  #suppressed = 0
  #everConnected = false

  constructor (logger: BridgeLogger, upstream: string, everyMs: number) {
    this.#logger = logger
    this.#upstream = upstream
    this.#everyMs = everyMs
  }

  /** A connection attempt failed (no CONNACK, or a refusing one). */
  failed (err: string, now: number): void {
    this.#downSince ??= now
    this.#failures++
    if (now - this.#lastLine < this.#everyMs) {
      this.#suppressed++
      return
    }
    const fields = { upstream: this.#upstream, err, failedAttempts: this.#failures, downSeconds: (now - this.#downSince) / 1000, suppressed: this.#suppressed }
    this.#lastLine = now
    this.#suppressed = 0
    this.#logger.warn(fields, this.#failures === 1 ? 'upstream connection failed; retrying' : 'upstream still unreachable; retrying')
  }

  /** An established connection closed. */
  disconnected (err: string, now: number): void {
    this.#downSince = now
    this.#failures = 0
    this.#lastLine = -Infinity
    this.#suppressed = 0
    this.#logger.warn({ upstream: this.#upstream, err }, 'upstream disconnected')
  }

  connected (fields: ConnectionFields, now: number): void {
    const downSeconds = this.#downSince === null ? 0 : (now - this.#downSince) / 1000
    const base = { upstream: this.#upstream, ...fields, failedAttempts: this.#failures, downSeconds }
    this.#logger.info(base, this.#everConnected ? 'upstream reconnected' : 'upstream connected')
    this.#everConnected = true
    this.#downSince = null
    this.#failures = 0
    this.#lastLine = -Infinity
    this.#suppressed = 0
  }
}
