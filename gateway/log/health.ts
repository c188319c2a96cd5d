/**
 * Whether the gateway is healthy: log writes succeed. A failed write turns it
 * unhealthy (it stops acknowledging until the disk recovers, see
 * mqtt/hooks/durable-append.ts); the next successful commit turns it healthy
 * again. /health, the edgemq_up metric and the log read it.
 */
import type { Logger } from 'pino'

export class StoreHealth {
  readonly #logger: Pick<Logger, 'info' | 'error'>
  #healthy = true
  #lastError: string | undefined

  constructor (logger: Pick<Logger, 'info' | 'error'>) {
    this.#logger = logger
  }

  get healthy (): boolean {
    return this.#healthy
  }

  /** Why the gateway is unhealthy, for /health; empty when it is healthy. */
  reasons (): string[] {
    return this.#healthy ? [] : [`log writes failing: ${this.#lastError ?? 'unknown error'}`]
  }

  /** Records the outcome of a write; logs a change. */
  set (ok: boolean, err?: Error): void {
    if (ok === this.#healthy) return
    this.#healthy = ok
    this.#lastError = err?.message
    if (ok) this.#logger.info('log writes succeed again: gateway healthy')
    else this.#logger.error({ err: err?.message }, 'log writes fail: gateway stops acknowledging until the disk recovers')
  }
}
