/**
 * The session persistence's error codes (documented in docs/errors.md by
 * docs/generate.ts): one class with a stable `code` and a `cause`.
 */
import { CodedError } from '../../../store/index.ts'

export const SESSION_ERROR_CODES = {
  GW_SESSION_NOT_FOUND: 'No stored packet has that message id. aedes reads this rejection as "not found" (a new inbound QoS 2 packet, '
    + 'an unknown in-flight message), so it is part of the contract, not a fault.',
  GW_SESSION_NOT_READY: 'A session persistence method was called before setup(broker) finished loading the sessions.',
  GW_SESSION_CLOSED: 'The session persistence was destroyed.',
  GW_SESSION_FORMAT_VERSION: 'The sessions key space was written by an incompatible format version.',
  GW_SESSION_CORRUPT: 'A stored session entry could not be decoded; the error names its key.',
  GW_SESSION_WRITE_FAILED: 'The database rejected a session write (for example ENOSPC); the calls in that batch were not stored.',
  GW_SESSION_TAKEN_OVER: 'A connection whose session a clean CONNECT of its client id discarded, and which that CONNECT is taking over, '
    + 'sent a QoS 2 PUBLISH or a SUBSCRIBE: refused, so aedes closes the connection and acknowledges nothing (stored, it would '
    + 'have landed in the new session).',
  GW_SESSION_INVALID_ARGUMENT: 'A client id or message id cannot be stored (longer than 65535 bytes, or a message id outside 0..65535).',
} as const

export type SessionErrorCode = keyof typeof SESSION_ERROR_CODES

export class SessionPersistenceError extends CodedError<SessionErrorCode> {
  override readonly name = 'SessionPersistenceError'
}

/**
 * GW_SESSION_NOT_FOUND, with aedes-persistence's message: aedes' own tests match that message (test/connect.js), and
 * aedes reads the rejection as "not found", never shows it, so the message names no client.
 */
export function notFound (): SessionPersistenceError {
  return new SessionPersistenceError('GW_SESSION_NOT_FOUND', 'no such packet')
}

