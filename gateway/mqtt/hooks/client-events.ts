/**
 * aedes' client and connection events: the connected-clients gauge, the
 * CONNACK mark authorizeSubscribe reads, the log of client errors that
 * no hook has reported already, and the DISCONNECT an MQTT 5 client gets
 * when its keep-alive runs out.
 */
import { clientFields, isOrdinaryDisconnect } from '../../logger.ts'
import { rawConnection } from '../aedes-internals.ts'
import { isMqtt5, REASON } from '../reason-codes.ts'
import { alreadyReported, listenerOf, type HookContext } from './context.ts'

/** DISCONNECT 0x8D (keep alive timeout), no properties. */
const KEEP_ALIVE_DISCONNECT = Buffer.from([0xe0, 2, REASON.KEEP_ALIVE_TIMEOUT, 0])

export function installClientEvents (ctx: HookContext): void {
  const { broker, metrics, logger, identities } = ctx
  broker.on('connackSent', (_packet, client) => { ctx.connacked.add(client) })
  broker.on('client', (client) => {
    const who = identities.get(client)
    metrics.connectedClients.inc({ tenant: who?.tenant ?? 'unknown', listener: listenerOf(client)?.name ?? 'unknown' })
  })
  broker.on('clientDisconnect', (client) => {
    const who = identities.get(client)
    metrics.connectedClients.dec({ tenant: who?.tenant ?? 'unknown', listener: listenerOf(client)?.name ?? 'unknown' })
  })
  // aedes closes the connection right after this event, without a DISCONNECT; an MQTT 5 client is told why first
  // (the connection guard lets the socket's buffered bytes out before it closes).
  broker.on('keepaliveTimeout', (client) => {
    if (isMqtt5(client)) rawConnection(client).write(KEEP_ALIVE_DISCONNECT)
  })
  broker.on('clientError', (client, err) => {
    if (alreadyReported(err) || ctx.refused(client)) return
    // A device that vanishes (power, network) resets its connection: that is news only when debugging.
    logger[isOrdinaryDisconnect(err) ? 'debug' : 'info']({ ...clientFields(client.id), err: err.message }, 'client error')
  })
  broker.on('connectionError', (client, err) => {
    if (alreadyReported(err) || ctx.refused(client)) return
    logger[isOrdinaryDisconnect(err) ? 'debug' : 'info']({ ...clientFields(client.id), err: err.message }, 'connection error')
  })
}
