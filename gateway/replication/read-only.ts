/**
 * A standby refuses MQTT publishes: its log is the primary's copy, and a
 * record it appended would fork it. aedes closes an MQTT 3.1.1 connection
 * whose publish `authorizePublish` refuses (3.1.1 has no negative PUBACK), so
 * the client reconnects — to the primary, if its broker list or a floating
 * address (docs/operations.md, "Standby replica") sends it there. Subscribing
 * (`$replay` included) is untouched: a standby serves reads.
 */
import type { Aedes, AedesOptions } from 'aedes'
import type { Logger } from 'pino'
import { GatewayError } from '../errors.ts'

export function refuseStandbyPublishes (broker: Aedes, logger: Logger): void {
  const refused = new WeakSet<object>()
  const refuse: NonNullable<AedesOptions['authorizePublish']> = (client, packet, callback) => {
    const err = new GatewayError('GW_STANDBY_READ_ONLY', `this gateway is a standby: it takes no publishes (${packet.topic}); publish to the primary`)
    // Once per connection: a client retrying in a loop would flood the log.
    if (client !== null && !refused.has(client)) {
      refused.add(client)
      logger.warn({ code: err.code, clientId: client.id, topic: packet.topic }, err.message)
    }
    callback(err)
  }
  broker.authorizePublish = refuse
}
