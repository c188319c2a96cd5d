/**
 * MQTT 5 message properties as record headers (bridge/mqtt-properties.ts):
 * every property survives the round trip, repeated user properties too; a
 * message without properties adds no header; a header of the same name that
 * is not ours is ignored, not an error.
 */
import { describe, expect, it } from 'vitest'
import { expiredAt, headersToProperties, propertiesToHeaders, type MessageProperties } from '../../bridge/mqtt-properties.ts'

describe('MQTT 5 message properties as record headers', () => {
  const all: MessageProperties = {
    contentType: 'text/plain; charset=utf-8', payloadFormatIndicator: true, responseTopic: 'devices/d/commands/reply',
    correlationData: Buffer.from([0, 255, 10]), messageExpiryInterval: 60, userProperties: { a: '1', 'b c': ['x', 'y'], 'é': 'ü' },
  }

  it('round-trips every property', () => {
    const headers = propertiesToHeaders(all)
    expect(headers).toEqual({
      'mqtt-content-type': 'text/plain; charset=utf-8', 'mqtt-payload-format': 'utf-8', 'mqtt-response-topic': 'devices/d/commands/reply',
      'mqtt-correlation-data': 'AP8K', 'mqtt-message-expiry': '60', 'mqtt-user-properties': '{"a":"1","b c":["x","y"],"é":"ü"}',
    })
    expect(headersToProperties(headers)).toEqual(all)
  })

  it('adds nothing for a message without message properties (3.1.1, or MQTT 5 with none)', () => {
    expect(propertiesToHeaders(undefined)).toBeNull()
    expect(propertiesToHeaders({})).toBeNull()
    expect(propertiesToHeaders({ payloadFormatIndicator: false, userProperties: {} })).toBeNull()
    expect(headersToProperties(null)).toBeUndefined()
    expect(headersToProperties({ 'edgemq-user': 'alice' })).toBeUndefined()
  })

  it('gives the time left of a message expiry interval, and says when it has expired [MQTT-3.3.2-5, -6]', () => {
    const headers = propertiesToHeaders({ messageExpiryInterval: 60 })
    expect(headersToProperties(headers, { timestamp: 1_000_000, now: 1_000_000 + 20_500 })?.messageExpiryInterval).toBe(40)
    expect(expiredAt(headers, 1_000_000, 1_000_000 + 59_999)).toBe(false)
    expect(expiredAt(headers, 1_000_000, 1_000_000 + 60_000)).toBe(true)
    expect(expiredAt(null, 0, Number.MAX_SAFE_INTEGER)).toBe(false)
  })

  it('ignores a header of the same name that is not a JSON object of strings (a record from elsewhere)', () => {
    for (const bad of ['not json', '[1,2]', '{"a":1}', 'null', '{"a":["x",2]}']) {
      expect(headersToProperties({ 'mqtt-user-properties': bad, 'mqtt-content-type': 'x' })).toEqual({ contentType: 'x' })
    }
    expect(headersToProperties({ 'mqtt-message-expiry': 'soon' })).toBeUndefined()
  })
})
