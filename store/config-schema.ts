/**
 * The store's slice of the gateway's config schema (JSON Schema, draft 7 as
 * ajv reads it). Every key has a default and a description; the gateway
 * composes this slice into the one schema and validates the file against it.
 */

export const storeConfigSchema = {
  type: 'object',
  description: 'The durable log on the gateway\'s disk.',
  additionalProperties: false,
  default: {},
  properties: {
    durability: {
      enum: ['sync', 'async'],
      default: 'sync',
      description: 'sync: fsync every group commit before acknowledging. async: no fsync; a power loss may lose the last moments of acknowledged messages.',
    },
    maxRecordBytes: {
      type: 'integer', minimum: 1, maximum: 64 * 1024 * 1024, default: 1024 * 1024,
      description: 'Largest record the log accepts (payload + key + topic + client id + headers), in bytes.',
    },
    diskBudgetBytes: {
      type: 'integer', minimum: 0, default: 0,
      description: 'Total log bytes above which retention deletes the oldest batches even if an uplink still needs them (each such record is counted and logged). 0 disables the budget.',
    },
    retentionIntervalMs: {
      type: 'integer', minimum: 100, default: 60_000,
      description: 'How often retention runs, in milliseconds.',
    },
  },
} as const

export interface StoreConfig {
  readonly durability: 'sync' | 'async'
  readonly maxRecordBytes: number
  readonly diskBudgetBytes: number
  readonly retentionIntervalMs: number
}

export const streamConfigSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['partitions'],
  properties: {
    partitions: { type: 'integer', minimum: 1, maximum: 1024, description: 'Number of partitions; fixed once the stream exists.' },
    retentionMs: { type: 'integer', minimum: 0, default: 7 * 24 * 3600 * 1000, description: 'Delete records older than this (ms); 0 keeps them forever.' },
    retentionBytes: { type: 'integer', minimum: 0, default: 0, description: 'Keep each partition under this many bytes; 0 is unbounded.' },
  },
} as const

export interface StreamConfig {
  readonly partitions: number
  readonly retentionMs: number
  readonly retentionBytes: number
}
