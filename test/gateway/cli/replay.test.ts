/**
 * The pure parts of the client commands: positions, filter checks, record
 * layout, partition targeting, tables and the progress bar's TTY rule.
 */
import { PassThrough } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { partitionForKey } from '../../../store/index.ts'
import { resetBody, table } from '../../../gateway/cli/admin.ts'
import { CliError } from '../../../gateway/cli/errors.ts'
import type { StreamDoc } from '../../../gateway/cli/offline.ts'
import { createProgress } from '../../../gateway/cli/progress-bar.ts'
import { checkFilters, markPosition, parsePosition, recordJson, targetPartitions, type ReadSpec } from '../../../gateway/cli/replay.ts'

const NOW = Date.UTC(2024, 4, 1, 3, 0, 0)

function codeOf (fn: () => unknown): string | undefined {
  try {
    fn()
  } catch (err) {
    if (err instanceof CliError) return err.code
    throw err
  }
  return undefined
}

function stream (partitionCount: number): StreamDoc {
  return {
    name: 's', partitionCount, retentionMs: 0, retentionBytes: 0, records: 0, bytes: 0, oldestTimestamp: null, newestTimestamp: null,
    partitions: Array.from({ length: partitionCount }, (_, partition) => ({ partition, logStartOffset: 0, logEndOffset: 0, records: 0, bytes: 0, oldestTimestamp: null, newestTimestamp: null })),
  }
}

const spec = (over: Partial<ReadSpec>): ReadSpec => ({
  stream: 's', partition: undefined, from: undefined, to: undefined, filters: { keys: [], topics: [], where: undefined }, maxRecords: undefined, ...over,
})

describe('--from / --to positions', () => {
  it('reads a bare integer as an offset, @digits as epoch ms, the rest as an API time', () => {
    expect(parsePosition('17', '--from', NOW)).toEqual({ kind: 'offset', offset: 17 })
    expect(parsePosition('earliest', '--from', NOW)).toEqual({ kind: 'earliest' })
    expect(parsePosition('latest', '--from', NOW)).toEqual({ kind: 'latest' })
    expect(parsePosition('@1714528800000', '--from', NOW)).toEqual({ kind: 'time', timestamp: 1714528800000 })
    expect(parsePosition('2024-05-01T02:00:00Z', '--to', NOW)).toEqual({ kind: 'time', timestamp: Date.UTC(2024, 4, 1, 2) })
    expect(parsePosition('-15m', '--from', NOW)).toEqual({ kind: 'time', timestamp: NOW - 15 * 60_000 })
  })

  it('refuses what is neither, with CLI_BAD_TIME', () => {
    for (const bad of ['yesterday', '2024-05-01T02:00', '2024-02-30', '@', '-3w']) expect(codeOf(() => parsePosition(bad, '--from', NOW)), bad).toBe('CLI_BAD_TIME')
    // latest is a start, not an end
    expect(codeOf(() => parsePosition('latest', '--to', NOW))).toBe('CLI_BAD_TIME')
  })

  it('turns a group reset target into the API body', () => {
    expect(resetBody('earliest', undefined, NOW)).toEqual({ to: 'earliest' })
    expect(resetBody('42', 1, NOW)).toEqual({ to: 'offset', offset: 42, partition: 1 })
    expect(resetBody('-1h', undefined, NOW)).toEqual({ to: 'timestamp', timestamp: NOW - 3_600_000 })
  })
})

describe('filters', () => {
  it('accepts good filters and marks the position of a bad expression', () => {
    checkFilters({ keys: ['dev-1'], topics: ['devices/+/telemetry/#'], where: 'temp > 30 and site = "a"' })
    let error: CliError | undefined
    try { checkFilters({ keys: [], topics: [], where: 'temp > > 30' }) } catch (err) { error = err as CliError }
    expect(error?.code).toBe('CLI_BAD_FILTER')
    expect(error?.message).toContain(markPosition('temp > > 30', 7))
    expect(markPosition('temp > > 30', 7)).toBe('  temp > > 30\n         ^')
    expect(codeOf(() => checkFilters({ keys: [], topics: ['a/#/b'], where: undefined }))).toBe('CLI_BAD_TOPIC_FILTER')
  })
})

describe('partitions', () => {
  it('reads every partition, the one asked for, or those of the devices', () => {
    expect(targetPartitions(spec({}), stream(4))).toEqual([0, 1, 2, 3])
    expect(targetPartitions(spec({ partition: 2 }), stream(4))).toEqual([2])
    const keys = ['dev-1', 'dev-2', 'dev-3']
    expect(targetPartitions(spec({ filters: { keys, topics: [], where: undefined } }), stream(8)))
      .toEqual([...new Set(keys.map((k) => partitionForKey(k, 8)))].sort((a, b) => a - b))
    expect(codeOf(() => targetPartitions(spec({ partition: 4 }), stream(4)))).toBe('CLI_UNKNOWN_PARTITION')
  })

  it('needs one partition for an offset', () => {
    expect(codeOf(() => targetPartitions(spec({ from: { kind: 'offset', offset: 3 } }), stream(4)))).toBe('CLI_BAD_ARGUMENT')
    expect(targetPartitions(spec({ from: { kind: 'offset', offset: 3 } }), stream(1))).toEqual([0])
  })
})

describe('output', () => {
  it('writes the API record layout with the partition first', () => {
    const r = { partition: 1, offset: 17, timestamp: 1714528800123, key: 'dev-42', topic: 'devices/dev-42/telemetry/temp', qos: 1, clientId: 'dev-42', headers: null, payload: Buffer.from('{"temp":21.5}') }
    expect(recordJson(r, 'utf8')).toBe('{"partition":1,"offset":17,"timestamp":1714528800123,"key":"dev-42","topic":"devices/dev-42/telemetry/temp","qos":1,"clientId":"dev-42","payload":"{\\"temp\\":21.5}"}')
    expect(JSON.parse(recordJson({ ...r, headers: { a: 'b' } }, 'base64'))).toMatchObject({ headers: { a: 'b' }, payload: Buffer.from('{"temp":21.5}').toString('base64') })
  })

  it('pads table columns', () => {
    expect(table(['A', 'BB'], [['xxx', 1], ['y', 22]])).toBe('A    BB\nxxx  1\ny    22\n')
  })
})

describe('progress bar', () => {
  function stderr (isTTY: boolean): PassThrough & { isTTY: boolean, columns: number } {
    return Object.assign(new PassThrough(), { isTTY, columns: 120 })
  }

  it('draws nothing when stderr is not a terminal, or when turned off', () => {
    for (const [tty, enabled] of [[false, true], [true, false]] as const) {
      const out = stderr(tty)
      const p = createProgress(out, enabled)
      p.addTotal(100)
      p.advance(50, 50, 5000)
      p.stop()
      expect(out.read()).toBeNull()
    }
  })

  it('shows records, bytes, rate and ETA on a terminal', () => {
    const out = stderr(true)
    const p = createProgress(out, true)
    p.addTotal(100)
    p.advance(50, 40, 4096)
    p.stop()
    const text = String(out.read())
    expect(text).toMatch(/50% \| 40 records \| 4\.0 KiB \| \d+ rec\/s \| ETA/)
  })
})
