/**
 * Errors raised by the store. Every error is a {@link StoreError} with a
 * stable string `code` (callers and tests match on the code, never on the
 * message) and, where a lower layer failed, the original error as `cause`.
 *
 * The table below is the registry of codes; `test/store/errors.test.ts`
 * fails when a code is missing from docs/errors.md (generated from this table).
 */

export const STORE_ERROR_CODES = {
  STORE_UNKNOWN_STREAM: 'The stream does not exist (create it first).',
  STORE_STREAM_CONFLICT: 'A stream with that name exists with a different partition count.',
  STORE_INVALID_NAME: 'A stream or consumer-group name is empty, too long or has characters outside the allowed set.',
  STORE_INVALID_PARTITION: 'The partition number is not an integer in [0, partitions).',
  STORE_INVALID_OFFSET: 'An offset is negative, not an integer or not a safe integer.',
  STORE_OFFSET_OUT_OF_RANGE: 'The offset is below the log start offset or above the log end offset; the error carries both.',
  STORE_RECORD_TOO_LARGE: 'The record is larger than the configured maxRecordBytes.',
  STORE_INVALID_RECORD: 'The record is malformed: payload is not binary (Uint8Array), or key, topic, qos, clientId, headers or timestamp has the wrong type.',
  STORE_INVALID_ARGUMENT: 'An option passed to a store method is out of range or of the wrong type.',
  STORE_CORRUPT_BATCH: 'A stored batch failed its checksum or could not be decoded; the error names stream, partition and base offset.',
  STORE_DAMAGED: 'The data is damaged: LevelDB reported corruption, or offsets of a partition are missing (a gap inside the log, or the log ends before the end its metadata records); the error names the stream, partition and offsets. Stop the gateway and run `edgemq check`.',
  STORE_FORMAT_VERSION: 'The data directory was written by an incompatible on-disk format version.',
  STORE_WRITE_FAILED: 'The database rejected a write (for example ENOSPC); the appends in that group commit were not stored.',
  STORE_CLOSED: 'The store is closed or closing.',
  STORE_UNKNOWN_GROUP: 'The consumer group has no committed offsets and no settings.',
  STORE_READ_ONLY: 'The store follows a database another writer owns (a standby replica): it serves reads and refuses every write.',
  STORE_LOG_REPLACED: 'A standby\'s copy of the log was replaced while a read ran (a snapshot from its primary is being written, or replaced ' +
    'records the read had got): nothing is damaged; read again. Once the copy is in, its log may end earlier than before: offsets past its end are out of range.',
} as const

export type StoreErrorCode = keyof typeof STORE_ERROR_CODES

export interface StoreErrorDetails {
  readonly stream?: string
  readonly partition?: number
  readonly offset?: number
  readonly logStartOffset?: number
  readonly logEndOffset?: number
  readonly baseOffset?: number
  readonly group?: string
  /** STORE_DAMAGED: the first offset that is missing or unreadable, and the offset where the damage ends (exclusive) when known. */
  readonly missingFrom?: number
  readonly missingTo?: number
}

/**
 * The one shape of every error edgemq raises, in every layer: a stable `code` from that layer's registry (each
 * documented in docs/errors.md) and, where a lower layer failed, a `cause`. Each registry subclasses it with its
 * codes and a `name` (StoreError here, BridgeError, GatewayError, ApiError, CliError, ...); it lives in store/
 * because store/ is the layer every other imports.
 */
export class CodedError<C extends string> extends Error {
  readonly code: C

  constructor (code: C, message: string, options: { cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.code = code
  }
}

export class StoreError extends CodedError<StoreErrorCode> {
  override readonly name = 'StoreError'
  readonly details: StoreErrorDetails

  constructor (code: StoreErrorCode, message: string, options: { cause?: unknown, details?: StoreErrorDetails } = {}) {
    super(code, message, options)
    this.details = options.details ?? {}
  }
}

export function isStoreError (err: unknown, code?: StoreErrorCode): err is StoreError {
  return err instanceof StoreError && (code === undefined || err.code === code)
}
