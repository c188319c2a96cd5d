import { readFileSync } from 'node:fs'
import path from 'node:path'
import { describe, expect, it } from 'vitest'
import { durationsOf } from './file-durations.ts'
import { DURATIONS_FILE, longestFirst } from './longest-first.ts'

const ROOT = '/repo'
const file = (name: string, groupOrder = 0): { moduleId: string, groupOrder: number } => ({ moduleId: path.join(ROOT, name), groupOrder })

describe('longest-first test order', () => {
  it('starts unknown files, then the longest, then the rest by time; ties by path; group by group', () => {
    const table = { 'test/a.int.test.ts': 5, 'test/b.int.test.ts': 60, 'test/c.test.ts': 0.2, 'test/d.test.ts': 0.2, 'test/dash.int.test.ts': 30 }
    const order = longestFirst([
      file('test/c.test.ts'), file('test/dash.int.test.ts', 1), file('test/a.int.test.ts'), file('test/new.int.test.ts'),
      file('test/d.test.ts'), file('test/b.int.test.ts'),
    ], table, ROOT)
    expect(order.map((f) => path.relative(ROOT, f.moduleId))).toEqual([
      'test/new.int.test.ts', 'test/b.int.test.ts', 'test/a.int.test.ts', 'test/c.test.ts', 'test/d.test.ts', 'test/dash.int.test.ts',
    ])
  })

  it('builds the table from a vitest JSON report, keyed from test/ whatever directory the run was in', () => {
    const table = durationsOf({
      testResults: [
        { name: '/tmp/ci/test/store/log.test.ts', startTime: 1000, endTime: 1440 },
        { name: '/tmp/ci/test/bridge/edgemq-upstream.int.test.ts', startTime: 0, endTime: 77_049 },
      ],
    })
    expect(Object.entries(table)).toEqual([['test/bridge/edgemq-upstream.int.test.ts', 77], ['test/store/log.test.ts', 0.4]])
    expect(() => durationsOf({ testResults: [{ name: '/elsewhere/x.test.ts', startTime: 0, endTime: 1 }] })).toThrow(/not a test file/)
  })

  it('has a table of seconds by path', () => {
    const table = JSON.parse(readFileSync(path.resolve(import.meta.dirname, '../..', DURATIONS_FILE), 'utf8')) as Record<string, unknown>
    expect(Object.keys(table).length).toBeGreaterThan(100)
    for (const [name, seconds] of Object.entries(table)) {
      expect(name).toMatch(/^test\/.+\.test\.ts$/)
      expect(typeof seconds === 'number' && seconds >= 0).toBe(true)
    }
  })
})
