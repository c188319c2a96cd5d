/**
 * The retention pass, every store.retentionIntervalMs: deletes what the
 * streams' retention and the disk budget allow (store.enforceRetention). A
 * pass slower than the interval is not started twice.
 */
import type { Logger } from 'pino'
import type { LogStore } from '../../store/index.ts'

export interface RetentionTimer {
  stop (): void
}

export function startRetention (store: LogStore, intervalMs: number, logger: Pick<Logger, 'error'>): RetentionTimer {
  let running = false
  const timer = setInterval(() => {
    if (running) return
    running = true
    store.enforceRetention()
      .catch((err: unknown) => logger.error({ err: (err as Error).message }, 'retention pass failed'))
      .finally(() => { running = false })
  }, intervalMs).unref()
  return { stop: () => clearInterval(timer) }
}
