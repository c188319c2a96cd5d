import { defineConfig } from 'vitest/config'
import { LongestFirstSequencer } from './test/helpers/longest-first.ts'

// Three projects: fast unit tests (pure functions, store on temp dirs and memory-level); integration tests that
// spawn processes or open sockets, two files at a time (most of their time is spent waiting on child processes);
// and the dashboard tests against a real Prometheus, run after those and one at a time: they scrape a gateway under
// load once a second, and a second test file beside them on this 2-core machine made scrapes miss their 1 s timeout.
export default defineConfig({
  test: {
    // The longest files first (test/helpers/longest-first.ts): vitest's own order put a 59 s file last in CI.
    sequence: { sequencer: LongestFirstSequencer },
    projects: [
      {
        test: {
          name: 'unit',
          include: ['test/**/*.test.ts'],
          exclude: ['test/**/*.int.test.ts'],
          testTimeout: 30_000,
          maxWorkers: 2,
        },
      },
      {
        test: {
          name: 'integration',
          include: ['test/**/*.int.test.ts'],
          exclude: ['test/dashboards/**'],
          testTimeout: 300_000,
          hookTimeout: 60_000,
          maxWorkers: 2,
        },
      },
      {
        test: {
          name: 'dashboards',
          include: ['test/dashboards/**/*.int.test.ts'],
          testTimeout: 300_000,
          hookTimeout: 60_000,
          maxWorkers: 1,
          sequence: { groupOrder: 1 },
        },
      },
    ],
  },
})
