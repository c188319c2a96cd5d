/**
 * Errors raised by the bridge, each with a stable `code` (BRIDGE_…) and,
 * where a lower layer failed, a `cause`. test/gateway/docs.test.ts fails
 * when a code is missing from docs/errors.md.
 */

export const BRIDGE_ERROR_CODES = {
  BRIDGE_TLS_FILES: 'An upstream\'s TLS CA, certificate or key file could not be read.',
  BRIDGE_TOPIC_TEMPLATE: 'An upstream\'s `topicTemplate` or `receiptTopic` is not a valid template (config validation reports it as a config error).',
  BRIDGE_COMMAND_MAPPING: 'An upstream\'s command mapping pairs filters that are invalid or do not have the same wildcards.',
  BRIDGE_NO_COMMAND_SINK: 'An upstream has command mappings but the bridge was built without a command sink (a wiring error, not a config one).',
} as const

export type BridgeErrorCode = keyof typeof BRIDGE_ERROR_CODES

/** Whether `err` is a BridgeError, with code `code` when given. */
export function isBridgeError (err: unknown, code?: BridgeErrorCode): err is BridgeError {
  return err instanceof BridgeError && (code === undefined || err.code === code)
}

export class BridgeError extends Error {
  override readonly name = 'BridgeError'
  readonly code: BridgeErrorCode

  constructor (code: BridgeErrorCode, message: string, options: { cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.code = code
  }
}
