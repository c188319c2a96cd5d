/**
 * The warning that the disk budget deleted records a persistent session had
 * not acknowledged, summed per session and partition over a second: the store
 * tells a session's retention hold after every write of a budget pass
 * (store/log-store.ts), and a pass past a burst can be hundreds of writes, each
 * with its own hold calls. The count goes into the metric as it comes; the log
 * gets one line per session and partition per second, and what is pending is
 * written at shutdown.
 */
export interface DropWarnings {
  warn (fields: Record<string, unknown>, message: string): void
}

export interface SessionDrop {
  readonly clientId: string
  readonly stream: string
  readonly partition: number
  readonly count: number
}

export const SESSION_DROP_WARNING = 'the disk budget deleted records a persistent session had not acknowledged'

export class SessionDropLog {
  readonly #logger: DropWarnings
  readonly #intervalMs: number
  /** `clientId \0 stream \0 partition` → the drop so far, counts added up. */
  readonly #pending = new Map<string, SessionDrop>()
  #timer: NodeJS.Timeout | undefined

  constructor (logger: DropWarnings, intervalMs = 1000) {
    this.#logger = logger
    this.#intervalMs = intervalMs
  }

  add (drop: SessionDrop): void {
    const key = `${drop.clientId}\u0000${drop.stream}\u0000${drop.partition}`
    const seen = this.#pending.get(key)
    this.#pending.set(key, seen === undefined ? drop : { ...seen, count: seen.count + drop.count })
    if (this.#timer === undefined) {
      this.#timer = setTimeout(() => { this.flush() }, this.#intervalMs)
      this.#timer.unref()
    }
  }

  /** Logs what is pending, one line per session and partition. */
  flush (): void {
    if (this.#timer !== undefined) clearTimeout(this.#timer)
    this.#timer = undefined
    for (const { clientId, stream, partition, count } of this.#pending.values()) this.#logger.warn({ clientId, stream, partition, count }, SESSION_DROP_WARNING)
    this.#pending.clear()
  }
}
