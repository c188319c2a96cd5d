/**
 * Argument checks shared by the store's public methods. Each throws a
 * StoreError with the code a caller can act on.
 */
import { StoreError } from './errors.ts'
import type { PendingRecord } from './format.ts'
import type { RecordInput } from './types.ts'

/** `<tenant>/<stream>`: a tenant and a stream name of letters, digits, `.`, `_`, `-`. */
const STREAM_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\/[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/
const GROUP_NAME = /^[A-Za-z0-9._:/-]{1,200}$/
export const MAX_PARTITIONS = 1024

export function checkStreamName (name: unknown): asserts name is string {
  if (typeof name !== 'string' || !STREAM_NAME.test(name)) {
    throw new StoreError('STORE_INVALID_NAME',
      `invalid stream name ${JSON.stringify(name)}: expected "<tenant>/<stream>" of letters, digits, ".", "_" and "-"`)
  }
}

export function checkGroupName (group: unknown): asserts group is string {
  if (typeof group !== 'string' || !GROUP_NAME.test(group)) {
    throw new StoreError('STORE_INVALID_NAME',
      `invalid consumer group name ${JSON.stringify(group)}: 1 to 200 of letters, digits, ".", "_", ":", "/" and "-"`)
  }
}

export function checkOffset (offset: unknown, what = 'offset'): asserts offset is number {
  if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0) {
    throw new StoreError('STORE_INVALID_OFFSET', `${what} must be a non-negative safe integer, got ${String(offset)}`,
      { details: typeof offset === 'number' ? { offset } : {} })
  }
}

export function checkCount (value: unknown, what: string, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new StoreError('STORE_INVALID_ARGUMENT', `${what} must be an integer in [${min}, ${max}], got ${String(value)}`)
  }
  return value
}

export function checkTimestamp (value: unknown, what = 'timestamp'): asserts value is number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) {
    throw new StoreError('STORE_INVALID_ARGUMENT', `${what} must be a non-negative number of milliseconds, got ${String(value)}`)
  }
}

function invalidRecord (why: string): StoreError {
  return new StoreError('STORE_INVALID_RECORD', `invalid record: ${why}`)
}

/**
 * Checks a producer's record and fills in defaults. The size counted against
 * `maxRecordBytes` is payload plus key, topic, client id and headers.
 */
export function toPendingRecord (key: unknown, input: RecordInput, now: number, maxRecordBytes: number): PendingRecord {
  if (typeof key !== 'string') throw invalidRecord('key must be a string')
  if (input === null || typeof input !== 'object') throw invalidRecord('record must be an object')
  const { payload, topic = '', qos = 0, clientId = '', headers, timestamp = now } = input
  if (!(payload instanceof Uint8Array)) {
    throw invalidRecord(`payload must be binary (Uint8Array or Buffer), got ${payload === null ? 'null' : typeof payload}`)
  }
  if (typeof topic !== 'string') throw invalidRecord('topic must be a string')
  if (qos !== 0 && qos !== 1 && qos !== 2) throw invalidRecord('qos must be 0, 1 or 2')
  if (typeof clientId !== 'string') throw invalidRecord('clientId must be a string')
  if (typeof timestamp !== 'number' || !Number.isFinite(timestamp) || timestamp < 0) {
    throw invalidRecord('timestamp must be a non-negative number of milliseconds')
  }
  let size = payload.byteLength + key.length + topic.length + clientId.length
  if (headers !== undefined && headers !== null) {
    if (typeof headers !== 'object' || Array.isArray(headers)) throw invalidRecord('headers must be an object of strings')
    for (const [name, value] of Object.entries(headers)) {
      if (typeof value !== 'string') throw invalidRecord(`header ${JSON.stringify(name)} must be a string`)
      size += name.length + value.length
    }
  }
  if (size > maxRecordBytes) {
    throw new StoreError('STORE_RECORD_TOO_LARGE', `record of ${size} bytes exceeds maxRecordBytes (${maxRecordBytes})`)
  }
  // Whole milliseconds: the time index keys on them, and two stamps within one ms must not look ordered apart.
  return { timestamp: Math.floor(timestamp), key, topic, payload, qos, clientId, headers: headers ?? null }
}
