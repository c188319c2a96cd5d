/**
 * Parsing of the /v1 API's query parameters and times, as pure functions.
 * Every problem is an ApiError naming the parameter; unknown and repeated
 * parameters are errors too, so a typo (`maxRecord=10`) is not silently
 * ignored.
 */
import { ApiError } from './errors.ts'

export class QueryParams {
  readonly #params: URLSearchParams

  /**
   * `allowed` names every parameter the endpoint reads; `repeatable` those that may appear more than once, each
   * with the most values it takes (every value costs work per record read: a bound keeps one request's cost bounded).
   */
  constructor (params: URLSearchParams, allowed: readonly string[], repeatable: Readonly<Record<string, number>> = {}) {
    this.#params = params
    const seen = new Map<string, number>()
    for (const name of params.keys()) {
      if (!allowed.includes(name)) {
        throw new ApiError('HTTP_BAD_REQUEST', `unknown parameter ${JSON.stringify(name)}; this endpoint takes ${allowed.length === 0 ? 'none' : allowed.join(', ')}`,
          { details: { parameter: name } })
      }
      const count = (seen.get(name) ?? 0) + 1
      const most = Object.hasOwn(repeatable, name) ? repeatable[name] as number : 1
      if (count > most) {
        throw most === 1
          ? new ApiError('HTTP_BAD_REQUEST', `parameter ${name} is given more than once`, { details: { parameter: name } })
          : new ApiError('HTTP_TOO_MANY_VALUES', `parameter ${name} is given more than ${most} times`, { details: { parameter: name, max: most } })
      }
      seen.set(name, count)
    }
  }

  has (name: string): boolean { return this.#params.has(name) }

  string (name: string): string | undefined {
    return this.#params.get(name) ?? undefined
  }

  all (name: string): string[] {
    return this.#params.getAll(name)
  }

  /** An integer in [min, max], or undefined when absent. */
  int (name: string, min: number, max: number): number | undefined {
    const text = this.string(name)
    if (text === undefined) return undefined
    return parseInteger(text, name, min, max)
  }

  /** One of `choices`, or `fallback` when absent. */
  choice<T extends string> (name: string, choices: readonly T[], fallback: T): T {
    const text = this.string(name)
    if (text === undefined) return fallback
    if (!(choices as readonly string[]).includes(text)) {
      throw new ApiError('HTTP_BAD_REQUEST', `${name} must be one of ${choices.join(', ')}, got ${JSON.stringify(text)}`, { details: { parameter: name } })
    }
    return text as T
  }
}

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
  const bad = (why: string): ApiError => new ApiError('HTTP_BAD_TIME', `${parameter}: ${JSON.stringify(text)} is not a time: ${why}`, { details: { parameter } })
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
