/**
 * Shared helpers for the bench files. A bench prints exactly one JSON line
 * per figure on stdout (so `npm run bench` output can be collected and
 * compared mechanically); everything else goes to stderr.
 *
 * The machine is shared and noisy, so a figure is never read alone: each one
 * carries a baseline measured in the same run and the ratio between the two.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export type ParamValue = string | number | boolean | null | readonly number[]

export interface Figure {
  /** Dotted name, `<bench file>.<figure>`, e.g. `store.append`. */
  readonly bench: string
  readonly unit: string
  readonly value: number
  /** What the baseline is, in words. */
  readonly baseline: string
  readonly baselineValue: number
  /** Which direction is good: throughput is `higher`, latency and time are `lower`. */
  readonly better: 'higher' | 'lower'
  readonly params: Readonly<Record<string, ParamValue>>
}

/** A figure as printed: `ratio` is value / baselineValue, whichever direction is better. */
export interface FigureLine extends Figure {
  readonly ratio: number
}

export function round (n: number, digits = 3): number {
  const f = 10 ** digits
  return Math.round(n * f) / f
}

/** Prints one figure line on stdout and returns it. */
export function report (figure: Figure): FigureLine {
  const line: FigureLine = {
    bench: figure.bench,
    unit: figure.unit,
    value: round(figure.value),
    baseline: figure.baseline,
    baselineValue: round(figure.baselineValue),
    ratio: round(figure.value / figure.baselineValue),
    better: figure.better,
    params: figure.params,
  }
  process.stdout.write(`${JSON.stringify(line)}\n`)
  return line
}

/** Progress and diagnostics: stderr only, so stdout stays one figure per line. */
export function info (message: string): void {
  process.stderr.write(`[bench] ${message}\n`)
}

/** The p-th percentile (0..100) of an ascending array, nearest-rank. */
export function percentile (sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return NaN
  const rank = Math.ceil((p / 100) * sorted.length)
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))] as number
}

/**
 * The median; of an even count, the mean of the middle two. (It was the nearest-rank 50th percentile, which of two
 * rounds is the lower one: a 2-round "median" was the worse round for a rate, the better one for a latency.)
 */
export function median (values: readonly number[]): number {
  const sorted = Float64Array.from(values).sort()
  const n = sorted.length
  if (n === 0) return NaN
  const mid = n >> 1
  return n % 2 === 1 ? sorted[mid] as number : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2
}

/** Creates a fresh directory under the OS temp dir; `cleanup` removes every one made. */
export class TempDirs {
  readonly #dirs: string[] = []

  async make (label: string): Promise<string> {
    const dir = await mkdtemp(join(tmpdir(), `edgemq-bench-${label}-`))
    this.#dirs.push(dir)
    return dir
  }

  async remove (dir: string): Promise<void> {
    await rm(dir, { recursive: true, force: true })
    const i = this.#dirs.indexOf(dir)
    if (i >= 0) this.#dirs.splice(i, 1)
  }

  async cleanup (): Promise<void> {
    for (const dir of this.#dirs.splice(0)) await rm(dir, { recursive: true, force: true })
  }
}
