/**
 * The bridge's public surface: the only module gateway/ imports from bridge/
 * (eslint.config.js enforces it). What is not exported here is internal to
 * the bridge and may change shape without gateway/ noticing.
 */
export { Bridge, type BridgeDeps } from './bridge.ts'
export { BRIDGE_GROUP_PREFIX, bridgeConfigProblem, bridgeConfigSchema, type BridgeConfig, type UpstreamConfig } from './config-schema.ts'
export { RECEIPT_RESPONSE_TOPIC_HEADER, RECEIPT_UPSTREAM_HEADER, RECEIPTS_STREAM, type CommandSink, type IncomingCommand } from './downlink.ts'
export { BRIDGE_ERROR_CODES, BridgeError, isBridgeError, type BridgeErrorCode } from './errors.ts'
export { createBridgeMetrics, type BridgeMetrics } from './metrics.ts'
export { DEDUPE_PROPERTY, dedupePropertyOf, filterProblem, splitDedupeTopic } from './topic-template.ts'
export type { BridgeLogger, LaneStatus, UplinkObserver, UpstreamStatus } from './uplink/status.ts'
export { expiredAt, headersToProperties, propertiesToHeaders, PROPERTY_HEADERS, type MessageProperties } from './mqtt-properties.ts'
