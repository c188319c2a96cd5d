/**
 * What an operator reads in the log about an upstream's connection: the
 * first failure at once, then at most one line a minute with the attempts in
 * between, and each reconnect with how long the upstream was down.
 */
import { describe, expect, it } from 'vitest'
import { ConnectionLog } from '../../bridge/connection-log.ts'

interface Line { level: string, fields: Record<string, unknown>, message: string }

function logger (): { lines: Line[], info: (f: Record<string, unknown>, m: string) => void, warn: (f: Record<string, unknown>, m: string) => void, error: (f: Record<string, unknown>, m: string) => void } {
  const lines: Line[] = []
  return {
    lines,
    info: (fields, message) => { lines.push({ level: 'info', fields, message }) },
    warn: (fields, message) => { lines.push({ level: 'warn', fields, message }) },
    error: (fields, message) => { lines.push({ level: 'error', fields, message }) },
  }
}

const CONNECTION = { url: 'mqtt://cloud:1883', mqttVersion: '5', dedupeId: 'user-property' } as const

describe('ConnectionLog', () => {
  it('logs the first failure at once, then one line per minute counting the attempts it left out', () => {
    const l = logger()
    const log = new ConnectionLog(l, 'cloud', 60_000)
    for (let t = 0; t <= 130_000; t += 1000) log.failed('connect ECONNREFUSED 127.0.0.1:1', t)
    expect(l.lines.map((x) => [x.level, x.message, x.fields.suppressed])).toEqual([
      ['warn', 'upstream connection failed; retrying', 0],
      ['warn', 'upstream still unreachable; retrying', 59],
      ['warn', 'upstream still unreachable; retrying', 59],
    ])
    expect(l.lines[2]?.fields).toMatchObject({ upstream: 'cloud', err: 'connect ECONNREFUSED 127.0.0.1:1', failedAttempts: 121, downSeconds: 120 })
    log.connected(CONNECTION, 131_000)
    expect(l.lines.at(-1)).toMatchObject({ level: 'info', message: 'upstream connected', fields: { failedAttempts: 131, mqttVersion: '5', dedupeId: 'user-property' } })
  })

  it('logs a reconnect with the downtime, and the next outage\'s first failure at once again', () => {
    const l = logger()
    const log = new ConnectionLog(l, 'cloud', 60_000)
    log.connected(CONNECTION, 0)
    log.disconnected('connection closed', 1000)
    log.failed('connect ECONNREFUSED', 1500)
    log.failed('connect ECONNREFUSED', 2000)
    log.connected(CONNECTION, 4000)
    log.disconnected('connection closed', 5000)
    log.failed('connect ECONNREFUSED', 5500)
    expect(l.lines.map((x) => x.message)).toEqual([
      'upstream connected', 'upstream disconnected', 'upstream connection failed; retrying', 'upstream reconnected',
      'upstream disconnected', 'upstream connection failed; retrying',
    ])
    expect(l.lines[3]?.fields).toMatchObject({ downSeconds: 3, failedAttempts: 2 })
  })
})
