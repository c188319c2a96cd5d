/**
 * Free and total bytes of the file system under the data directory, for the
 * disk gauges: read at start and every `intervalMs` (statfs is cheap, but
 * not free enough for every scrape). Unknown (undefined) until the first read
 * succeeds.
 */
import { statfs } from 'node:fs/promises'

export interface DiskUsage {
  readonly freeBytes: number | undefined
  readonly sizeBytes: number | undefined
  stop (): void
}

export const DISK_REFRESH_MS = 10_000

export function watchDiskUsage (dataDir: string, intervalMs = DISK_REFRESH_MS): DiskUsage {
  let freeBytes: number | undefined
  let sizeBytes: number | undefined
  const refresh = (): void => {
    statfs(dataDir).then((s) => { freeBytes = s.bavail * s.bsize; sizeBytes = s.blocks * s.bsize }, () => {})
  }
  refresh()
  const timer = setInterval(refresh, intervalMs).unref()
  return {
    get freeBytes () { return freeBytes },
    get sizeBytes () { return sizeBytes },
    stop: () => clearInterval(timer),
  }
}
