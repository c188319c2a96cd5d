/**
 * Errors raised by the bridge, each with a stable `code` (BRIDGE_…) and,
 * where a lower layer failed, a `cause`. test/gateway/docs.test.ts fails
 * when a code is missing from docs/errors.md.
 */
import { CodedError } from '../store/index.ts'

export const BRIDGE_ERROR_CODES = {
  BRIDGE_TLS_FILES: 'An upstream\'s TLS CA, certificate or key file could not be read.',
  BRIDGE_TOPIC_TEMPLATE: 'An upstream\'s `topicTemplate` or `receiptTopic` is not a valid template (config validation reports it as a config error).',
  BRIDGE_COMMAND_MAPPING: 'An upstream\'s command mapping pairs filters that are invalid or do not have the same wildcards.',
  BRIDGE_NO_COMMAND_SINK: 'An upstream has command mappings but the bridge was built without a command sink (a wiring error, not a config one).',
  BRIDGE_SUBJECT_TEMPLATE: 'A NATS upstream\'s `nats.subject` or `nats.receiptSubject` is not a valid subject template (config validation reports it).',
  BRIDGE_NATS_CREDENTIALS_FILE: 'A NATS upstream\'s `nats.nkeySeedFile` or `nats.credsFile` could not be read or parsed.',
  BRIDGE_NATS_UNREACHABLE: 'A NATS upstream could not be connected to (refused, timed out, TLS failed), or its replicated stream has no leader yet; ' +
    'the uplink retries with backoff.',
  BRIDGE_NATS_AUTH: 'A NATS upstream refused the credentials (authorization violation); the uplink retries with backoff.',
  BRIDGE_NATS_NO_JETSTREAM: 'A NATS upstream answers, but JetStream is not enabled for the account; the uplink retries with backoff.',
  BRIDGE_NATS_STREAM_MISSING: 'A NATS upstream\'s JetStream stream (`nats.stream.name`) does not exist and `nats.stream.create` is false (or creating it ' +
    'failed); the uplink forwards nothing and checks again with backoff.',
  BRIDGE_NATS_DUPLICATE_WINDOW: 'A NATS upstream\'s stream has a duplicate window shorter than `nats.minDuplicateWindowMs`: re-sent records could be ' +
    'stored twice, so the uplink forwards nothing and checks again with backoff.',
  BRIDGE_NATS_SUBJECT_NOT_COVERED: 'A NATS upstream\'s stream does not cover a subject the uplink publishes to (its `subjects`, against ' +
    '`nats.subject`); the uplink forwards nothing and checks again with backoff.',
  BRIDGE_NATS_PUBLISH: 'A publish to a NATS upstream got no PubAck in `nats.ackTimeoutMs`, or no stream answered it; the uplink reconnects and resends ' +
    'from its acknowledged offsets.',
} as const

export type BridgeErrorCode = keyof typeof BRIDGE_ERROR_CODES

/** Whether `err` is a BridgeError, with code `code` when given. */
export function isBridgeError (err: unknown, code?: BridgeErrorCode): err is BridgeError {
  return err instanceof BridgeError && (code === undefined || err.code === code)
}

export class BridgeError extends CodedError<BridgeErrorCode> {
  override readonly name = 'BridgeError'
}
