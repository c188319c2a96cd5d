/**
 * aedes' client and connection events: the connected-clients gauge, the
 * CONNACK mark authorizeSubscribe reads, and the log of client errors that
 * no hook has reported already.
 */
import { clientFields, isOrdinaryDisconnect } from '../../logger.ts'
import { alreadyReported, listenerOf, type HookContext } from './context.ts'

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
