/**
 * Damage found while opening or reading the log: LevelDB's own corruption
 * reports, and offsets that the log's invariants say must exist but do not
 * (format.ts: `B` entries cover [logStart, logEnd) without gaps, and `P`
 * records logEnd). A gap that retention explains is not damage; callers check
 * the log start first. Nothing here repairs: reads stop with STORE_DAMAGED
 * instead of skipping, and `edgemq check` walks the whole log.
 */
import { StoreError } from './errors.ts'

/** True when `err`, or an error in its `cause` chain, is LevelDB reporting corruption (a bad block, a bad manifest). */
export function isLevelCorruption (err: unknown): boolean {
  for (let e = err as { code?: unknown, cause?: unknown } | undefined, depth = 0; e !== null && typeof e === 'object' && depth < 8; e = e.cause as typeof e, depth++) {
    if (e.code === 'LEVEL_CORRUPTION') return true
  }
  return false
}

/** `err` as STORE_DAMAGED when LevelDB reported corruption while doing `what`; any other error unchanged. */
export function asDamage (err: unknown, what: string, where: { stream?: string, partition?: number } = {}): unknown {
  if (!isLevelCorruption(err)) return err
  const innermost = innermostMessage(err)
  return new StoreError('STORE_DAMAGED', `LevelDB reports corruption while ${what}: ${innermost}; stop the gateway and run \`edgemq check\``,
    { cause: err, details: where })
}

export function missingOffsets (stream: string, partition: number, from: number, to: number, why: string): StoreError {
  return new StoreError('STORE_DAMAGED',
    `offsets ${from} to ${to - 1} of ${stream}[${partition}] are missing from the log (${why}); stop the gateway and run \`edgemq check\``,
    { details: { stream, partition, missingFrom: from, missingTo: to } })
}

function innermostMessage (err: unknown): string {
  let e = err as { message?: string, cause?: unknown } | undefined
  while (e?.cause !== undefined && e.cause !== null && typeof e.cause === 'object') e = e.cause as typeof e
  return e?.message ?? String(err)
}
