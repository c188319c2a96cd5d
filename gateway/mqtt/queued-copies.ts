/**
 * Whether publishing a message queued a copy of it for some persistent session (an `O` entry,
 * sessions/persistence.ts): inbound QoS 2 then records that the message was delivered before the PUBREC, so a
 * retransmission after a crash does not queue a second copy (inbound-qos2.ts).
 *
 * Kept on the payload object under a symbol of this module, as log-position.ts keeps the log position, for the same
 * reason: aedes hands the session store a new packet object (aedes-packet copies a fixed list of fields) but the
 * payload by reference.
 */
const QUEUED = Symbol('edgemq.queuedCopy')

type Carrier = object & { [QUEUED]?: true }

/** Records that a copy of the packet's message was queued for a session (call once its write is started). */
export function noteQueuedCopy (packet: { readonly payload?: unknown }): void {
  if (typeof packet.payload === 'object' && packet.payload !== null) (packet.payload as Carrier)[QUEUED] = true
}

/** Whether a copy of the message of this packet (or of any aedes copy of it) was queued for a session. */
export function queuedCopy (packet: { readonly payload?: unknown }): boolean {
  return typeof packet.payload === 'object' && packet.payload !== null && (packet.payload as Carrier)[QUEUED] === true
}
