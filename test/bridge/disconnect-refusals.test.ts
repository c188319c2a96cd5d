/**
 * The rule that decides when an MQTT 3.1.1 disconnect counts as the upstream
 * refusing a message: a flapping link never strikes anything; a broker that
 * hangs up on one message, sent alone on a working connection, does.
 */
import { describe, expect, it } from 'vitest'
import { DisconnectRefusals } from '../../bridge/disconnect-refusals.ts'

describe('DisconnectRefusals', () => {
  it('a link that drops at the first PUBLISH of every connection strikes nothing', () => {
    const d = new DisconnectRefusals(10_000)
    for (let i = 0; i < 10; i++) {
      d.connected()
      d.sent('m1', i * 100)
      expect(d.disconnected(i * 100 + 5)).toBeNull()
      expect(d.strikes('m1')).toBe(0)
    }
  })

  it('counts consecutive disconnects right after the same message, sent alone after a PUBACK', () => {
    const d = new DisconnectRefusals(10_000)
    for (let i = 1; i <= 3; i++) {
      d.connected()
      d.sent('canary', 0)
      d.acked('canary')
      expect(d.healthy).toBe(true)
      d.sent('bad', 10)
      expect(d.disconnected(20)).toEqual({ id: 'bad', strikes: i })
    }
    expect(d.strikes('bad')).toBe(3)
    expect(d.suspecting).toBe(true)
    expect(d.strikes('other')).toBe(0)
  })

  it('a disconnect that points at nothing starts the count again', () => {
    const d = new DisconnectRefusals(10_000)
    const strike = (): void => { d.connected(); d.sent('c', 0); d.acked('c'); d.sent('bad', 0) }
    strike()
    expect(d.disconnected(1)?.strikes).toBe(1)
    d.connected()
    d.sent('bad', 2) // first on the connection: the link is unproven
    expect(d.disconnected(3)).toBeNull()
    strike()
    expect(d.disconnected(4)?.strikes).toBe(1)
  })

  it('does not count a disconnect with other messages in flight, nor one long after the send', () => {
    const d = new DisconnectRefusals(1000)
    d.connected()
    d.sent('a', 0)
    d.acked('a')
    d.sent('b', 0)
    d.sent('c', 0)
    expect(d.disconnected(1)).toBeNull()
    d.connected()
    d.sent('a', 0)
    d.acked('a')
    d.sent('b', 0)
    expect(d.disconnected(5000)).toBeNull()
  })

  it('a PUBACK for the suspect, or its dead-lettering, forgets it', () => {
    const d = new DisconnectRefusals(10_000)
    const strike = (): void => { d.connected(); d.sent('c', 0); d.acked('c'); d.sent('bad', 0) }
    strike()
    d.disconnected(1)
    d.connected()
    d.sent('bad', 2)
    d.acked('bad')
    expect(d.strikes('bad')).toBe(0)
    strike()
    d.disconnected(3)
    d.forget('bad')
    expect(d.strikes('bad')).toBe(0)
  })
})
