/**
 * How many kill -9 cycles a crash test runs: its own count times EDGEMQ_KILL_CYCLES_FACTOR (default 1, at least one
 * cycle). The counts are set so the whole suite stays within CI's ten minutes on a 2-core machine; each cycle kills at
 * a random moment, so more cycles find rarer windows: `EDGEMQ_KILL_CYCLES_FACTOR=5 npx vitest run <file>` before
 * changing a write path.
 */
export function killCycles (count: number): number {
  const factor = Number(process.env.EDGEMQ_KILL_CYCLES_FACTOR ?? '1')
  if (!Number.isFinite(factor) || factor <= 0) throw new Error(`EDGEMQ_KILL_CYCLES_FACTOR must be a positive number, not ${process.env.EDGEMQ_KILL_CYCLES_FACTOR}`)
  return Math.max(1, Math.round(count * factor))
}
