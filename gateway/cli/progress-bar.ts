/**
 * The progress bar of long client runs (`edgemq replay`): records, bytes,
 * rate and ETA on stderr, drawn only when stderr is a terminal, so a piped
 * or redirected run prints nothing but its output.
 *
 * Progress is measured in offsets covered (what is left to read is known from
 * the partitions' log ends), while records and bytes count what was written
 * after filtering.
 */
import { SingleBar } from 'cli-progress'

export interface ProgressStream extends NodeJS.WritableStream {
  readonly isTTY?: boolean
  readonly columns?: number
}

export interface Progress {
  /** More offsets to cover (or fewer, when negative). */
  addTotal (offsets: number): void
  /** Offsets covered, and records and bytes written. */
  advance (offsets: number, records: number, bytes: number): void
  stop (): void
}

const quiet: Progress = { addTotal () {}, advance () {}, stop () {} }

function humanBytes (n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let v = n
  let u = 0
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++ }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u] as string}`
}

/** A progress bar on `stream` when it is a terminal and `enabled`; otherwise one that draws nothing. */
export function createProgress (stream: ProgressStream, enabled: boolean, now: () => number = () => performance.now()): Progress {
  if (!enabled || stream.isTTY !== true) return quiet
  const bar = new SingleBar({
    stream,
    format: '{bar} {percentage}% | {records} records | {bytes} | {rate} rec/s | ETA {eta_formatted}',
    hideCursor: true,
    clearOnComplete: true,
    etaBuffer: 50,
    fps: 5,
  })
  const started = now()
  let total = 0
  let value = 0
  let records = 0
  let bytes = 0
  const payload = (): Record<string, string> => {
    const seconds = Math.max((now() - started) / 1000, 0.001)
    return { records: String(records), bytes: humanBytes(bytes), rate: String(Math.round(records / seconds)) }
  }
  let barStarted = false
  return {
    addTotal (offsets) {
      total = Math.max(total + offsets, value)
      if (!barStarted) { bar.start(total, value, payload()); barStarted = true } else bar.setTotal(total)
    },
    advance (offsets, r, b) {
      if (!barStarted) return
      value += offsets
      records += r
      bytes += b
      if (value > total) { total = value; bar.setTotal(total) }
      bar.update(value, payload())
    },
    stop () {
      if (barStarted) bar.stop()
    },
  }
}
