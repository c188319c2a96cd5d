import { defineConfig } from 'vitest/config'
import { LongestFirstSequencer } from './test/helpers/longest-first.ts'

// Three projects: fast unit tests (pure functions, store on temp dirs and memory-level); integration tests that
// spawn processes or open sockets; and the dashboard tests against a real Prometheus, run after those and one at a
// time: they scrape a gateway under load once a second, and a second test file beside them on this 2-core machine
// made scrapes miss their 1 s timeout.
//
// Unit and integration files share one pool (vitest requires one maxWorkers per sequence.groupOrder): three files at
// a time on 2 cores. Most integration time is waiting on child processes (lease TTLs, backoffs, restarts), so a third
// file fills those waits. Measured 2026-12-02 on the 2-core dev machine, integration project alone, longest-first
// order, back to back while other agents loaded it (load 8-17): 2 workers 1,640 s, 3 workers 1,402 s (0.85x); the
// bridge files and standby-restart at load 2-7: 146 s and 136 s (0.93x), the files' own times summing to 270 and
// 386 s: the work is mostly CPU (each gateway or CLI start is about 1.2 s of it), so the third file wins the waits only.
// Failures under that load: with 2, one aedes-suite case cancelled and standby-restart's catch-up count (relaxed
// since); with 3, the outage tests' connect race (fixed since) and damaged-data's check report (not concurrency).
const WORKERS = 3

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
          maxWorkers: WORKERS,
          // A worker runs its unit files one after the other in one process, importing the sources once, instead of a
          // fresh process per file: measured 2026-12-02 (load 10), unit project alone, same files all passing: 29.8 s of
          // CPU and 33 s wall isolated, 14.3 s and 18 s not (the import phase 32.7 s -> 10.9 s summed over files). Unit
          // files share no state to leak: the clock and the metrics registry are injected, the one fake-timer file
          // restores real timers after each test, and no unit file mocks a module or writes process.env.
          isolate: false,
        },
      },
      {
        test: {
          name: 'integration',
          include: ['test/**/*.int.test.ts'],
          exclude: ['test/dashboards/**'],
          testTimeout: 300_000,
          hookTimeout: 60_000,
          maxWorkers: WORKERS,
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
