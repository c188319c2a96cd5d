/**
 * Errors of the client commands (`replay`, `tail`, `streams`, `groups`).
 * Every error is a {@link CliError} with a stable `code`; `edgemq` prints
 * `edgemq: <code>: <message>` on stderr and exits with status 1. The same
 * problem has the same code whether the command reads over HTTP (`--url`) or
 * from a data directory (`--data-dir`): the API's HTTP_… codes are mapped
 * onto these. Tests match on the code, never the message.
 */
// store/errors.ts, not the store's index: every `edgemq` command loads this file, and the index loads LevelDB.
import { CodedError } from '../../store/errors.ts'
import type { QueryError } from '../query/errors.ts'

export const CLI_ERROR_CODES = {
  CLI_BAD_ARGUMENT: 'A flag is missing, malformed, or does not go with another flag; the message names it.',
  CLI_BAD_TIME: 'A --from/--to time is not an ISO 8601 time with a zone, a date, "now", a relative time (-15m) or @<epoch ms>.',
  CLI_BAD_RANGE: 'The end of the range (--to) lies before its start (--from).',
  CLI_BAD_FILTER: 'The --where expression does not parse; the message shows the expression and marks the position.',
  CLI_BAD_TOPIC_FILTER: 'A --topic value is not a valid MQTT topic filter.',
  CLI_UNKNOWN_STREAM: 'The tenant has no stream of that name.',
  CLI_UNKNOWN_PARTITION: 'The stream has no partition of that number.',
  CLI_UNKNOWN_GROUP: 'The tenant has no consumer group of that name.',
  CLI_UNKNOWN_UPSTREAM: 'No bridge upstream of that name is configured (`edgemq bridge status --upstream`).',
  CLI_OFFSET_OUT_OF_RANGE: 'The offset is below the log start (retention deleted it) or above the log end; the message gives both.',
  CLI_AUTH: 'The gateway refused the credentials (wrong user, password or token, none given, or a role that may not use the API).',
  CLI_UNREACHABLE: 'Nothing answers at --url (the gateway is not running there, or the address is wrong).',
  CLI_GATEWAY_RUNNING: 'The data directory is locked by a running gateway; read it over HTTP with --url instead.',
  CLI_NO_DATA: 'The --data-dir holds no gateway data (no db directory).',
  CLI_CUT_SHORT: 'The gateway ended a response before its last line (it stopped or failed mid-stream).',
  CLI_SERVER: 'The gateway answered with another error; the message carries its code.',
  CLI_OUTPUT: 'The --out file cannot be written.',
} as const

export type CliErrorCode = keyof typeof CLI_ERROR_CODES

export class CliError extends CodedError<CliErrorCode> {
  override readonly name = 'CliError'
}

/** The CLI code for an API error code, so that both modes say the same thing. */
export function cliCodeForApi (code: string): CliErrorCode {
  switch (code) {
    case 'HTTP_BAD_TIME': return 'CLI_BAD_TIME'
    case 'HTTP_BAD_RANGE': return 'CLI_BAD_RANGE'
    case 'HTTP_BAD_FILTER': return 'CLI_BAD_FILTER'
    case 'HTTP_BAD_TOPIC_FILTER': return 'CLI_BAD_TOPIC_FILTER'
    case 'HTTP_BAD_NAME': case 'HTTP_BAD_REQUEST': case 'HTTP_BAD_BODY': return 'CLI_BAD_ARGUMENT'
    case 'HTTP_UNKNOWN_STREAM': return 'CLI_UNKNOWN_STREAM'
    case 'HTTP_UNKNOWN_PARTITION': return 'CLI_UNKNOWN_PARTITION'
    case 'HTTP_UNKNOWN_GROUP': return 'CLI_UNKNOWN_GROUP'
    case 'HTTP_UNKNOWN_UPSTREAM': return 'CLI_UNKNOWN_UPSTREAM'
    case 'HTTP_OFFSET_OUT_OF_RANGE': return 'CLI_OFFSET_OUT_OF_RANGE'
    case 'HTTP_AUTH_REQUIRED': case 'HTTP_BAD_CREDENTIALS': case 'HTTP_BAD_TOKEN': case 'HTTP_FORBIDDEN': return 'CLI_AUTH'
    default: return 'CLI_SERVER'
  }
}

/**
 * The CLI code for an error of the read path (query/errors.ts), so that a
 * problem found before the read has the code the API's answer would map to.
 * `hint` is added to a bad time's message: what the flag takes.
 */
export function cliErrorForQuery (err: QueryError, hint = ''): CliError {
  switch (err.code) {
    case 'QUERY_BAD_TIME': return new CliError('CLI_BAD_TIME', `${err.message}${hint}`, { cause: err })
    case 'QUERY_BAD_RANGE': return new CliError('CLI_BAD_RANGE', err.message, { cause: err })
    case 'QUERY_BAD_TOPIC_FILTER': return new CliError('CLI_BAD_TOPIC_FILTER', err.message, { cause: err })
    case 'QUERY_UNKNOWN_PARTITION': return new CliError('CLI_UNKNOWN_PARTITION', err.message, { cause: err })
    case 'QUERY_OFFSET_OUT_OF_RANGE': {
      // Store names are `<tenant>/<stream>`; the command names the tenant's stream.
      const { stream = '', partition, offset, logStartOffset, logEndOffset } = err.details
      return new CliError('CLI_OFFSET_OUT_OF_RANGE', `offset ${offset} is out of range for ${stream.slice(stream.indexOf('/') + 1)}[${partition}]: ` +
        `the log holds offsets from ${logStartOffset} up to ${logEndOffset} (exclusive)`, { cause: err })
    }
    case 'QUERY_BAD_POSITION': return new CliError('CLI_BAD_ARGUMENT', err.message, { cause: err })
  }
}
