/**
 * The retention pass, every store.retentionIntervalMs: deletes what the
 * streams' retention and the disk budget allow (store.enforceRetention). A
 * pass slower than the interval is not started twice. Damage at the front of
 * a partition does not fail a pass: the store leaves that partition as it is,
 * logs it and trims the others (docs/operations.md, "Damaged data"). A pass
 * fails on what fails its writes (a full or failing disk); the next one tries
 * again.
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
