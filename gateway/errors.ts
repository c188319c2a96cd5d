/**
 * Errors raised by the gateway, each with a stable `code` (GW_…) and, where a
 * lower layer failed, a `cause`. test/gateway/errors.test.ts fails when a
 * code is missing from README.md.
 */

export const GATEWAY_ERROR_CODES = {
  GW_CONFIG_INVALID: 'The config file is unreadable, not YAML/JSON, or breaks the schema; the message names the key.',
  GW_LISTEN_FAILED: 'A listener or the HTTP server could not bind its address.',
  GW_INSECURE_LISTENER: 'A non-loopback listener would accept anonymous clients without allowAnonymous: true.',
  GW_TLS_FILES: 'A TLS certificate, key or CA file could not be read.',
  GW_BAD_PASSWORD_HASH: 'A password or token hash is not of the form printed by `edgemq passwd` / `edgemq token`.',
} as const

export type GatewayErrorCode = keyof typeof GATEWAY_ERROR_CODES

export class GatewayError extends Error {
  override readonly name = 'GatewayError'
  readonly code: GatewayErrorCode

  constructor (code: GatewayErrorCode, message: string, options: { cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.code = code
  }
}
