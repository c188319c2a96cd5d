/**
 * Errors raised by the bridge, each with a stable `code` (BRIDGE_…) and,
 * where a lower layer failed, a `cause`. test/bridge/errors.test.ts fails
 * when a code is missing from docs/errors.md.
 */

export const BRIDGE_ERROR_CODES = {
  BRIDGE_TLS_FILES: 'An upstream\'s TLS CA, certificate or key file could not be read.',
} as const

export type BridgeErrorCode = keyof typeof BRIDGE_ERROR_CODES

export class BridgeError extends Error {
  override readonly name = 'BridgeError'
  readonly code: BridgeErrorCode

  constructor (code: BridgeErrorCode, message: string, options: { cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.code = code
  }
}
