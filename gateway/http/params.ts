/**
 * Parsing of the /v1 API's parameter values that a JSON schema cannot
 * read (times; offsets beside `earliest` / `latest`), as pure functions.
 * Every problem is an ApiError naming the parameter. Which parameters an
 * endpoint takes, and their types and ranges, are its schema's
 * (http/schemas.ts).
 */
import { ApiError } from './errors.ts'

export function parseInteger (text: string, name: string, min: number, max: number): number {
  const n = /^[0-9]{1,16}$/.test(text) ? Number(text) : NaN
  if (!Number.isSafeInteger(n) || n < min || n > max) {
    throw new ApiError('HTTP_BAD_REQUEST', `${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(text)}`, { details: { parameter: name } })
  }
  return n
}

const UNIT_MS: Readonly<Record<string, number>> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }
const RELATIVE = /^-([0-9]{1,12})(ms|s|m|h|d)$/
const ISO = /^([0-9]{4})-([0-9]{2})-([0-9]{2})(?:[Tt]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,9}))?)?([Zz]|[+-][0-9]{2}:?[0-9]{2})?)?$/

/**
 * A point in time, in milliseconds since the epoch:
 * - `now`, or a relative time before now: `-30s`, `-15m`, `-2h`, `-7d`, `-500ms`;
 * - milliseconds since the epoch: `1714528800000`;
 * - ISO 8601: `2024-05-01T02:00:00Z`, `2024-05-01T04:00:00.250+02:00`, or a
 *   date alone, `2024-05-01`, meaning midnight UTC. A date-time needs its
 *   zone (`Z` or an offset): the gateway's local zone is not the caller's.
 */
export function parseTime (text: string, now: number, parameter: string): number {
  const bad = (why: string): ApiError =>
    new ApiError('HTTP_BAD_TIME', `${parameter}: ${JSON.stringify(text)} is not a time: ${why}`, { details: { parameter } })
  if (text === 'now') return now
  const rel = RELATIVE.exec(text)
  if (rel !== null) {
    const t = now - Number(rel[1]) * (UNIT_MS[rel[2] as string] as number)
    if (t < 0) throw bad('it is before 1970')
    return t
  }
  if (/^[0-9]{1,16}$/.test(text)) {
    const t = Number(text)
    if (!Number.isSafeInteger(t)) throw bad('too large')
    return t
  }
  const m = ISO.exec(text)
  if (m === null) {
    throw bad('expected milliseconds since the epoch, an ISO 8601 time such as 2024-05-01T02:00:00Z, "now", or a relative time such as -15m')
  }
  const [, y, mo, d, hh, mm, ss, frac, zone] = m
  if (hh !== undefined && zone === undefined) throw bad('an ISO 8601 date-time needs a zone: add Z (UTC) or an offset such as +02:00')
  const year = Number(y)
  const month = Number(mo)
  const day = Number(d)
  const hour = Number(hh ?? 0)
  const minute = Number(mm ?? 0)
  const second = Number(ss ?? 0)
  const ms = frac === undefined ? 0 : Math.floor(Number(`0.${frac}`) * 1000)
  if (month < 1 || month > 12 || hour > 23 || minute > 59 || second > 59) throw bad('a field is out of range')
  const utc = Date.UTC(year, month - 1, day, hour, minute, second, ms)
  if (new Date(utc).getUTCDate() !== day || day < 1) throw bad(`${y}-${mo} has no day ${d}`)
  let offsetMs = 0
  if (zone !== undefined && zone !== 'Z' && zone !== 'z') {
    const digits = zone.slice(1).replace(':', '')
    const oh = Number(digits.slice(0, 2))
    const om = Number(digits.slice(2))
    if (oh > 23 || om > 59) throw bad('the zone offset is out of range')
    offsetMs = (zone[0] === '-' ? -1 : 1) * (oh * 60 + om) * 60_000
  }
  const t = utc - offsetMs
  if (t < 0) throw bad('it is before 1970')
  return t
}
