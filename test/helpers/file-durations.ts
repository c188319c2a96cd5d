/**
 * Writes test/helpers/file-durations.json (the longest-first order of longest-first.ts) from a vitest JSON report:
 * `node --import tsx test/helpers/file-durations.ts .ci/out/vitest.json`. A report names files by absolute path; the
 * key is the part from the last `/test/` on (no folder under test/ is called test), so a report from CI's clone in
 * another directory gives the same keys.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import path from 'node:path'
import { DURATIONS_FILE } from './longest-first.ts'

interface Report { readonly testResults: ReadonlyArray<{ readonly name: string, readonly startTime: number, readonly endTime: number }> }

/** Seconds per file (one decimal), keyed by the path from the repository root, longest first. */
export function durationsOf (report: Report): Record<string, number> {
  const rows = report.testResults.map((r) => {
    const at = r.name.lastIndexOf('/test/')
    if (at < 0) throw new Error(`not a test file of this repository: ${r.name}`)
    return [r.name.slice(at + 1), Math.round((r.endTime - r.startTime) / 100) / 10] as const
  })
  return Object.fromEntries(rows.sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)))
}

if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === path.resolve(import.meta.filename)) {
  const from = process.argv[2]
  if (from === undefined) {
    process.stderr.write('usage: node --import tsx test/helpers/file-durations.ts <vitest JSON report>\n')
    process.exit(2)
  }
  const table = durationsOf(JSON.parse(readFileSync(from, 'utf8')) as Report)
  const to = path.resolve(import.meta.dirname, '../..', DURATIONS_FILE)
  writeFileSync(to, `${JSON.stringify(table, null, 1)}\n`)
  process.stdout.write(`${Object.keys(table).length} files written to ${DURATIONS_FILE}\n`)
}
