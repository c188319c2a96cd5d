/**
 * Where a published message sits in the log, carried from the durable append (hooks/authorize-publish.ts) to the
 * session persistence, which keeps a cursor instead of a copy for a message the log already holds
 * (sessions/cursors.ts).
 *
 * aedes does not hand the session store the packet authorizePublish saw: `broker.publish` wraps it in a new
 * aedes-packet (https://github.com/moscajs/aedes-packet/blob/v4.0.0/packet.js), which copies a fixed list of fields
 * and drops any other, symbols included. It copies `payload` by reference, so the position is kept on the payload
 * object under a symbol of this module: never a field of the packet, so never written into a stored packet or sent
 * (a symbol-keyed property is not part of a Buffer's bytes, and no encoder of ours reads it), and gone with the
 * payload. Every PUBLISH parsed off a socket has a payload object of its own. A WeakMap keyed by the payload did the
 * same at 0.6 µs a message against 0.05 (its ephemeron table is work for every GC): 3–8 % of the main thread in the
 * persistent fan-in profile (BENCHMARKS.md).
 *
 * Only messages a persistent session's subscription matches carry one (persistence.beforeAck says): nobody else looks
 * it up.
 */

/** A record of the log: stream (`<tenant>/<stream>`), partition and offset. */
export interface LogPosition {
  readonly stream: string
  readonly partition: number
  readonly offset: number
  /**
   * A message delivered again after a restart (inbound-qos2.ts): its record may lie far below the log's end, so a
   * session without a cursor in its partition gets a copy rather than a cursor there (which would read the whole log
   * from that record on, messages from before its SUBSCRIBE included).
   */
  readonly late?: true
}

const POSITION = Symbol('edgemq.logPosition')

type Carrier = object & { [POSITION]?: LogPosition }

/** Records that the packet's message is at `position` in the log (call once its append is durable). */
export function attachLogPosition (packet: { readonly payload?: unknown }, position: LogPosition): void {
  if (typeof packet.payload === 'object' && packet.payload !== null) (packet.payload as Carrier)[POSITION] = position
}

/** The log position of the message of this packet (or of any aedes copy of it), if it went into the log. */
export function logPositionOf (packet: { readonly payload?: unknown }): LogPosition | undefined {
  return typeof packet.payload === 'object' && packet.payload !== null ? (packet.payload as Carrier)[POSITION] : undefined
}
