/**
 * The MQTT 5 reason codes the gateway answers with (MQTT 5 section 2.4), and
 * which one a refused or failed PUBLISH gets. An MQTT 3.1.1 client has no
 * reason codes: the same refusals close its connection (or, for an ACL
 * denial, acknowledge and drop), as before.
 *
 * On a PUBACK/PUBREC, aedes takes the code from the `reasonCode` of the error
 * authorizePublish calls back with (patches/aedes+2.0.0-beta.1.patch; stock
 * aedes 2.0.0-beta.1 always answers 0x87), adds the error's message as the
 * reason string when the client did not set Request Problem Information to 0,
 * keeps the connection and drops the message.
 */
import type { Client } from 'aedes'
import { isStoreError } from '../../store/index.ts'

export const REASON = {
  /** The log could not take the record (a store error other than a full disk or a limit). */
  UNSPECIFIED_ERROR: 0x80,
  /** DISCONNECT: a packet the guard could not parse (connection-guard.ts). */
  MALFORMED_PACKET: 0x81,
  /** DISCONNECT: a packet that breaks the protocol (connection-guard.ts). */
  PROTOCOL_ERROR: 0x82,
  /** A PUBLISH this gateway does not take although it is well formed: an `edgemq-dedupe-id` user property that is not a dedupe id. */
  IMPLEMENTATION_SPECIFIC_ERROR: 0x83,
  /** The ACL refuses the topic, or the topic is one nobody may publish to ($replay/, $dedupe/ without a grant). */
  NOT_AUTHORIZED: 0x87,
  /** DISCONNECT: the client sent nothing for 1.5 times its keep-alive (hooks/client-events.ts). */
  KEEP_ALIVE_TIMEOUT: 0x8d,
  /** Not a valid topic name for the gateway, or no route logs it under `unrouted: reject`. */
  TOPIC_NAME_INVALID: 0x90,
  /** DISCONNECT: the client has more QoS 1/2 PUBLISHes unacknowledged than the receive maximum it was given (receive-maximum.ts). */
  RECEIVE_MAXIMUM_EXCEEDED: 0x93,
  /** DISCONNECT: a packet over the listener's maxPacketBytes (connection-guard.ts). */
  PACKET_TOO_LARGE: 0x95,
  /** The disk is full, or the record is over the store's size limit: a limit, not a fault of the message's form. */
  QUOTA_EXCEEDED: 0x97,
} as const

export type ReasonCode = typeof REASON[keyof typeof REASON]

/** Whether the client speaks MQTT 5 (aedes sets `version` from the CONNECT's protocol level). */
export function isMqtt5 (client: Client): boolean {
  return client.version === 5
}

/** The reason code of a failed durable append: 0x97 when the disk is full or the record over the limit, else 0x80. */
export function appendFailureCode (err: unknown): ReasonCode {
  if (isStoreError(err, 'STORE_RECORD_TOO_LARGE')) return REASON.QUOTA_EXCEEDED
  if (isStoreError(err, 'STORE_WRITE_FAILED') && /ENOSPC|no space left/i.test(rootMessage(err))) return REASON.QUOTA_EXCEEDED
  return REASON.UNSPECIFIED_ERROR
}

function rootMessage (err: unknown): string {
  let messages = ''
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) messages += ` ${e.message}`
  return messages
}
