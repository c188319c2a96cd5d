/**
 * Errors raised by the gateway, each with a stable `code` (GW_…) and, where a
 * lower layer failed, a `cause`. test/gateway/errors.test.ts fails when a
 * code is missing from docs/errors.md.
 */
import { CodedError } from '../store/index.ts'

export const GATEWAY_ERROR_CODES = {
  GW_CONFIG_INVALID: 'The config file is unreadable, not YAML/JSON, or breaks the schema; the message names the key.',
  GW_DATA_DIR_LOCKED: 'Another process (a gateway, or an edgemq --data-dir command) holds the data directory\'s LevelDB lock; the message names the lock file.',
  GW_DATA_DIR_READ_ONLY: 'The data directory is on a read-only file system; the message names the path.',
  GW_DATA_DIR_NOT_DIRECTORY: 'The data directory, or a part of its path, is a file; the message names it.',
  GW_DATA_DIR_PERMISSION: 'The gateway\'s user may not create or write the data directory; the message names the path and the uid.',
  GW_DATA_DIR_UNUSABLE: 'The data directory cannot be opened for another reason; the message names the path and the system\'s error.',
  GW_DATA_DAMAGED: 'The data directory is damaged (STORE_DAMAGED, STORE_CORRUPT_BATCH or LevelDB corruption at open); the gateway does not start. ' +
    'The message names the damage and the table files whose checksums fail; run `edgemq check`.',
  GW_LISTEN_FAILED: 'A listener or the HTTP server could not bind its address.',
  GW_INSECURE_LISTENER: 'A non-loopback listener would accept anonymous clients without allowAnonymous: true.',
  GW_TLS_FILES: 'A TLS certificate, key or CA file could not be read.',
  GW_BAD_PASSWORD_HASH: 'A password or token hash is not of the form printed by `edgemq passwd` / `edgemq token`.',
  GW_REPLAY_BAD_RANGE: 'The range level of a $replay/<range>/<filter> subscription is not a start (earliest, latest, an offset, a time), ' +
    'optionally followed by ..<end> (an offset, a time, live); or it is a wildcard, or ends before it starts.',
  GW_REPLAY_BAD_FILTER: 'A $replay subscription has no topic filter after its range, or the filter is not a valid MQTT topic filter.',
  GW_REPLAY_DENIED: 'The ACL does not let the client subscribe to the topic filter of a $replay subscription.',
  GW_REPLAY_LIMIT: 'A $replay subscription would exceed mqtt.replay.maxPerClient or mqtt.replay.maxActive.',
  GW_SHARE_BAD_SUBSCRIPTION: 'A $share/<group>/<filter> subscription has an empty group name, a wildcard in it, no topic filter or an invalid one, ' +
    'or a group and filter too long for a consumer group name (SUBACK 0x80; MQTT 5: 0x8F; counted as share-invalid).',
  GW_SHARE_LIMIT: 'A $share subscription would make one share (group and filter) more than mqtt.share.maxPerTenant in the client\'s tenant ' +
    '(SUBACK 0x80; MQTT 5: 0x97; counted as share-limit).',
  GW_SHARE_IN_USE: 'A shared subscription\'s consumer group cannot be deleted while a client is a member of the share: the members ' +
    'unsubscribe (or disconnect, and a persistent session\'s subscription is removed) first (HTTP 409 HTTP_GROUP_IN_USE).',
  GW_CONNECT_REFUSED: 'A CONNECT was refused with a CONNACK return code (2 identifier rejected, 3 server unavailable, 4 bad credentials, ' +
    '5 not authorized); counted in edgemq_connections_refused_total and logged with the reason.',
  GW_PUBLISH_REFUSED: 'A PUBLISH was refused (a topic that is not a valid topic name, $dedupe/ without a replicate grant, unrouted: reject; ' +
    'for MQTT 5 also an ACL denial, a $replay topic, a failed append): MQTT 3.1.1 by closing the connection, MQTT 5 by the PUBACK/PUBREC ' +
    'reason code (0x87, 0x90, 0x80, 0x97; docs/mqtt5.md); counted in edgemq_publishes_refused_total and logged once per connection and reason.',
  GW_STANDBY_READ_ONLY: 'This gateway is a standby (replication.role: standby): it serves reads and refuses publishes by closing the connection; ' +
    'publish to the primary.',
  GW_REPLICATION_REFUSED: 'The primary refused a standby\'s replication handshake (another gatewayId, protocol version or epoch); the message says which.',
  GW_PROMOTE_REFUSED: '`edgemq promote` (POST /v1/replication/promote) was refused: the gateway is not a standby, or its copy is incomplete.',
  GW_QOS2_INFLIGHT_FULL: 'A client has 1000 QoS 2 messages awaiting PUBREL (aedes\' maxInflightInbound); the connection is closed.',
} as const

export type GatewayErrorCode = keyof typeof GATEWAY_ERROR_CODES

/** Codes of the warnings `edgemq start` logs (one line each, field `code`) for settings that work but are weak. */
export const GATEWAY_WARNING_CODES = {
  GW_WARN_ASYNC_DURABILITY: 'store.durability is async: acknowledged messages may be lost on power loss.',
  GW_WARN_WEAK_HASH: 'A users[].password or apiTokens[].tokenHash uses scrypt cost parameters below what `edgemq passwd` uses (N=16384, r=8, p=1).',
  GW_WARN_OPEN_HTTP: 'http.host is not a loopback address and no users or API tokens are configured: ' +
    'the API and /metrics (with tenant, stream and upstream names) are open to the network.',
  GW_WARN_ANONYMOUS_LISTENER: 'A listener that is not on a loopback address accepts anonymous clients (allowAnonymous: true).',
  GW_WARN_STANDBY_OUT_OF_SYNC: 'The standby left the in-sync state (disconnected, copying a snapshot, or lagging over replication.maxLagMs); ' +
    'with acks: replicated, acknowledgements are held (onStandbyLost: block) or local only (degrade) until it is back. The line says why.',
  GW_WARN_STANDBY_CATCH_UP_OVERFLOW: 'The writes the primary kept for its standby (since its snapshot began, or since its last acknowledgement) ' +
    'passed replication.catchUpBytes: its connection is dropped and it starts over with a snapshot. The line says how long the snapshot had run; ' +
    'raise catchUpBytes above the write rate times that time.',
  GW_WARN_PROMOTED: 'This node was promoted (`edgemq promote`) and runs as primary in a new epoch, although its config says replication.role: standby.',
  GW_WARN_DEMOTED: 'This node was configured as primary, but its peer (or the leader key in etcd) is primary in a newer epoch (it was promoted): ' +
    'this node follows it as a standby.',
  GW_WARN_AUTO_PROMOTED: 'The primary\'s lease in etcd expired and this standby was in sync: it won the leader key and promoted itself to the next epoch.',
  GW_WARN_NO_AUTO_PROMOTION: 'The primary\'s lease expired (or the primary and etcd are both unreachable) but this standby does not promote itself; ' +
    'the line says why (out of sync at the primary\'s last contact, no complete copy, the primary still talking, etcd unreachable).',
  GW_WARN_LEASE_UNAVAILABLE: 'A primary cannot hold its leader lease in etcd (unreachable): it keeps serving; no automatic takeover can happen meanwhile.',
  GW_WARN_LEADER_ELSEWHERE: 'A primary found the leader key in etcd held by another node: it keeps serving and claims the key once it is free. ' +
    'Check which node should be primary.',
  GW_WARN_SET_ASIDE: 'A node that becomes a standby copied its former data (any tail the new primary lacks) into the file the line names, ' +
    'before the primary\'s snapshot replaced it.',
  GW_WARN_SET_ASIDE_TAIL: 'After the new primary\'s snapshot: which of the set-aside records the new primary lacks (offset ranges per partition, from ' +
    'the start of its term), written to <set-aside file>.tail.json, the records to <set-aside file>.tail.ndjson. ' +
    'With acks: replicated none of them was acknowledged.',
  GW_WARN_LOG_REWOUND: 'A standby\'s snapshot from its primary left a partition\'s log ending before its copy did (a former primary\'s tail the ' +
    'new primary never received): the line names the stream, the partition, the former end and the new end. The new primary\'s records take ' +
    'those offsets.',
  GW_WARN_READER_REWOUND: 'A live reader (HTTP long poll or follow, MQTT $replay) was past a partition\'s rewound log end (GW_WARN_LOG_REWOUND) and ' +
    'moved back to it, so it reads every record of the new history; the records from there up to its former position that it already ' +
    'delivered were the old history\'s. The line names the stream, the partition, the former position and the new end.',
  GW_WARN_GATEWAY_ID_CHANGED: 'The configured gatewayId differs from the one kept in <dataDir>/gateway-id: ' +
    'upstreams see a new gateway (new dedupe ids and client ids).',
} as const

export type GatewayWarningCode = keyof typeof GATEWAY_WARNING_CODES

export class GatewayError extends CodedError<GatewayErrorCode> {
  override readonly name = 'GatewayError'
}
