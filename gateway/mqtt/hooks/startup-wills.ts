/**
 * Wills stored by a gateway process that died, fired once while the broker
 * starts (wills.ts says why and when) as a publish of the client that set
 * each: through authorizePublish, so the tenant mount, the ACL and the log
 * append (with the delete of the stored will in its batch) apply.
 */
import type { PublishPacket } from 'aedes'
import type { Identity } from '../../access/auth.ts'
import { standInClient } from '../aedes-internals.ts'
import type { SessionPacket } from '../sessions/persistence.ts'
import { isPublished, type HookContext } from './context.ts'

export function fireStartupWill (ctx: HookContext, will: SessionPacket, who: Identity): Promise<void> {
  return new Promise((resolve, reject) => {
    // A stand-in for the client that set the will: authorizePublish reads its identity, and the durable append
    // retries a failed write while it is open, as for a connected client.
    const client = standInClient(String(will.clientId))
    ctx.identities.set(client, who)
    const packet = will as unknown as PublishPacket
    ctx.startupWills.add(packet)
    ctx.broker.authorizePublish(client, packet, (err) => {
      if (err) return resolve() // refused, counted and logged like the client's own publish
      if (isPublished(packet)) return resolve()
      ctx.publish(packet, client, (e) => { if (e) reject(e); else resolve() })
    })
  })
}
