/**
 * MQTT 5 message properties kept in the log as record headers (issue 14), so
 * every read path that gives a record's headers (HTTP JSON/NDJSON/CBOR, the
 * CLI, the bridge) gives them too, and batches written before them read as
 * before. The gateway writes them on append; `$replay` and the bridge's
 * MQTT 5 uplinks turn them back into properties.
 *
 * | property                 | header                    | value                                   |
 * | ------------------------ | ------------------------- | --------------------------------------- |
 * | content type             | `mqtt-content-type`       | as sent                                 |
 * | payload format indicator | `mqtt-payload-format`     | `utf-8` (indicator 1; 0 is not stored)  |
 * | response topic           | `mqtt-response-topic`     | as sent                                 |
 * | correlation data         | `mqtt-correlation-data`   | base64                                  |
 * | message expiry interval  | `mqtt-message-expiry`     | seconds, as sent (counted from the record's timestamp) |
 * | user properties          | `mqtt-user-properties`    | JSON object: name → value, or → [values] when repeated |
 *
 * Connection-scoped properties (topic alias, subscription identifier) are
 * not the message's and are not stored.
 */

/** The message properties of an MQTT 5 PUBLISH, as mqtt-packet decodes them. */
export interface MessageProperties {
  contentType?: string
  payloadFormatIndicator?: boolean
  responseTopic?: string
  correlationData?: Buffer
  messageExpiryInterval?: number
  userProperties?: Record<string, string | string[]>
}

export const PROPERTY_HEADERS = {
  contentType: 'mqtt-content-type',
  payloadFormat: 'mqtt-payload-format',
  responseTopic: 'mqtt-response-topic',
  correlationData: 'mqtt-correlation-data',
  messageExpiry: 'mqtt-message-expiry',
  userProperties: 'mqtt-user-properties',
} as const

/** The headers that keep `properties` (none for a message without message properties). */
export function propertiesToHeaders (properties: MessageProperties | undefined): Record<string, string> | null {
  if (properties === undefined) return null
  const h: Record<string, string> = {}
  if (typeof properties.contentType === 'string') h[PROPERTY_HEADERS.contentType] = properties.contentType
  if (properties.payloadFormatIndicator === true) h[PROPERTY_HEADERS.payloadFormat] = 'utf-8'
  if (typeof properties.responseTopic === 'string') h[PROPERTY_HEADERS.responseTopic] = properties.responseTopic
  if (properties.correlationData !== undefined) h[PROPERTY_HEADERS.correlationData] = Buffer.from(properties.correlationData).toString('base64')
  if (typeof properties.messageExpiryInterval === 'number') h[PROPERTY_HEADERS.messageExpiry] = String(properties.messageExpiryInterval)
  if (properties.userProperties !== undefined && Object.keys(properties.userProperties).length > 0) {
    h[PROPERTY_HEADERS.userProperties] = JSON.stringify(properties.userProperties)
  }
  return Object.keys(h).length === 0 ? null : h
}

/**
 * The message properties kept in a record's headers; undefined when it has none. `now` and `timestamp` (ms) make the
 * message expiry interval the time left [MQTT-3.3.2-6]; a negative result means the message has expired.
 */
export function headersToProperties (headers: Readonly<Record<string, string>> | null, timing?: { now: number, timestamp: number }):
  MessageProperties | undefined {
  if (headers === null) return undefined
  const p: MessageProperties = {}
  const contentType = headers[PROPERTY_HEADERS.contentType]
  if (contentType !== undefined) p.contentType = contentType
  if (headers[PROPERTY_HEADERS.payloadFormat] === 'utf-8') p.payloadFormatIndicator = true
  const responseTopic = headers[PROPERTY_HEADERS.responseTopic]
  if (responseTopic !== undefined) p.responseTopic = responseTopic
  const correlation = headers[PROPERTY_HEADERS.correlationData]
  if (correlation !== undefined) p.correlationData = Buffer.from(correlation, 'base64')
  const expiry = Number(headers[PROPERTY_HEADERS.messageExpiry])
  if (Number.isInteger(expiry) && expiry >= 0) {
    p.messageExpiryInterval = timing === undefined ? expiry : Math.ceil((timing.timestamp + expiry * 1000 - timing.now) / 1000)
  }
  const user = headers[PROPERTY_HEADERS.userProperties]
  if (user !== undefined) {
    try {
      const parsed = JSON.parse(user) as unknown
      if (isUserProperties(parsed)) p.userProperties = parsed
    } catch { /* not ours to fail on: a record from elsewhere with a header of this name */ }
  }
  return Object.keys(p).length === 0 ? undefined : p
}

/** Whether a record whose headers say it expires has expired at `now` (ms) [MQTT-3.3.2-5]. */
export function expiredAt (headers: Readonly<Record<string, string>> | null, timestamp: number, now: number): boolean {
  const expiry = Number(headers?.[PROPERTY_HEADERS.messageExpiry])
  return Number.isInteger(expiry) && expiry >= 0 && timestamp + expiry * 1000 <= now
}

function isUserProperties (v: unknown): v is Record<string, string | string[]> {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) return false
  return Object.values(v).every((x) => typeof x === 'string' || (Array.isArray(x) && x.every((y) => typeof y === 'string')))
}
