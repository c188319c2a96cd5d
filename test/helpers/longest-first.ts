/**
 * The order vitest starts test files in: the longest first (LPT scheduling), by the file times in
 * file-durations.json, so the suite does not end with one long file running alone while the other workers idle.
 * Vitest's own order needs its cache of earlier runs, which CI's clean clone does not have; without it vitest starts
 * the largest files first, and size says little about time here (ack-durability.int, 59 s, started last but one in
 * CI and ran 60 s alone at the end). A file missing from the table (a new one) starts first: a short one costs little
 * there, a long one would cost its whole time at the end. Files still go group by group (`sequence.groupOrder`).
 *
 * Refresh the table from a run's JSON report (CI writes .ci/out/vitest.json):
 * `node --import tsx test/helpers/file-durations.ts .ci/out/vitest.json`.
 */
import { readFileSync } from 'node:fs'
import path from 'node:path'
import { BaseSequencer, type TestSpecification } from 'vitest/node'

/** The table: seconds per test file, by path from the repository root. */
export const DURATIONS_FILE = 'test/helpers/file-durations.json'

/** Expected seconds of each file; Infinity for one the table does not know. */
export function expectedSeconds (table: Readonly<Record<string, number>>, root: string, moduleId: string): number {
  return table[path.relative(root, moduleId).split(path.sep).join('/')] ?? Infinity
}

/** Orders `files` by group, then longest expected time first, then path (so equal times keep one order). */
export function longestFirst<T extends { readonly moduleId: string, readonly groupOrder: number }> (
  files: readonly T[], table: Readonly<Record<string, number>>, root: string): T[] {
  const seconds = new Map(files.map((f) => [f, expectedSeconds(table, root, f.moduleId)]))
  return [...files].sort((a, b) => {
    if (a.groupOrder !== b.groupOrder) return a.groupOrder - b.groupOrder
    const sa = seconds.get(a) as number
    const sb = seconds.get(b) as number
    if (sa !== sb) return sa > sb ? -1 : 1
    return a.moduleId < b.moduleId ? -1 : a.moduleId > b.moduleId ? 1 : 0
  })
}

export class LongestFirstSequencer extends BaseSequencer {
  override sort (files: TestSpecification[]): Promise<TestSpecification[]> {
    const root = this.ctx.config.root
    const table = JSON.parse(readFileSync(path.join(root, DURATIONS_FILE), 'utf8')) as Record<string, number>
    const keyed = files.map((spec) => ({ spec, moduleId: spec.moduleId, groupOrder: spec.project.config.sequence.groupOrder }))
    return Promise.resolve(longestFirst(keyed, table, root).map((k) => k.spec))
  }
}
