/**
 * Parsing of the /v1 API's parameter values that a JSON schema cannot
 * read (times; offsets beside `earliest` / `latest`), as pure functions.
 * Every problem is an ApiError naming the parameter. Which parameters an
 * endpoint takes, and their types and ranges, are its schema's
 * (http/schemas.ts).
 */
import { isQueryError } from '../query/errors.ts'
import { parseTime as parseQueryTime } from '../query/read-plan.ts'
import { ApiError, toApiError } from './errors.ts'

export function parseInteger (text: string, name: string, min: number, max: number): number {
  const n = /^[0-9]{1,16}$/.test(text) ? Number(text) : NaN
  if (!Number.isSafeInteger(n) || n < min || n > max) {
    throw new ApiError('HTTP_BAD_REQUEST', `${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(text)}`, { details: { parameter: name } })
  }
  return n
}

/**
 * A point in time, in milliseconds since the epoch, as the read path reads it (query/read-plan.ts, parseTime:
 * `now`, `-15m`, milliseconds, ISO 8601 with a zone, a date); a bad one is HTTP_BAD_TIME naming the parameter.
 */
export function parseTime (text: string, now: number, parameter: string): number {
  try {
    return parseQueryTime(text, now, parameter)
  } catch (err) {
    throw isQueryError(err) ? toApiError(err) : err
  }
}
