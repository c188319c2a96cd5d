/**
 * SessionDropLog: the disk budget tells a persistent session's hold after every write of a pass, and the warning
 * goes to the log once a second per session and partition, with the counts added up, not once per write.
 */
import { afterEach, describe, expect, it, vi } from 'vitest'
import { SESSION_DROP_WARNING, SessionDropLog } from '../../../gateway/log/session-drops.ts'

afterEach(() => { vi.useRealTimers() })

describe('SessionDropLog', () => {
  it('logs one warning per session and partition a second, with the summed count, and what is pending on flush', () => {
    vi.useFakeTimers()
    const lines: Array<Record<string, unknown>> = []
    const log = new SessionDropLog({ warn (fields, message) { expect(message).toBe(SESSION_DROP_WARNING); lines.push(fields) } })
    for (let write = 0; write < 300; write++) {
      log.add({ clientId: 'a', stream: 'default/telemetry', partition: write % 2, count: 3 })
      log.add({ clientId: 'b', stream: 'default/telemetry', partition: 0, count: 1 })
    }
    expect(lines).toEqual([])
    vi.advanceTimersByTime(1000)
    expect(lines).toEqual([
      { clientId: 'a', stream: 'default/telemetry', partition: 0, count: 450 },
      { clientId: 'b', stream: 'default/telemetry', partition: 0, count: 300 },
      { clientId: 'a', stream: 'default/telemetry', partition: 1, count: 450 },
    ])
    log.add({ clientId: 'a', stream: 'default/telemetry', partition: 1, count: 2 })
    log.flush() // at shutdown
    expect(lines.at(-1)).toEqual({ clientId: 'a', stream: 'default/telemetry', partition: 1, count: 2 })
    vi.advanceTimersByTime(5000)
    expect(lines).toHaveLength(4)
  })
})
