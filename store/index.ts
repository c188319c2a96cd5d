/** The store's public surface: the log interface, its errors and the LevelDB implementation. */
export * from './types.ts'
export * from './errors.ts'
export { openLogStore, replacingCopyOp, DEFAULT_MAX_RECORD_BYTES, type LogStoreOptions, type LevelDatabase } from './log-store.ts'
export { partitionForKey } from './partitioner.ts'
export { decodeStoredBatch } from './format.ts'
export { checkTableFiles, tableBlocks, type TableBlock, type TableCheckReport, type TableDamage } from './table-files.ts'
export { verifyLog, type LogCheckReport, type LogDamage, type PartitionCheck, type VerifyOptions } from './verify.ts'
