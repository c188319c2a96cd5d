/**
 * Automatic promotion of a standby (replication.coordination): when the
 * primary's leader key in etcd goes (its lease expired: the primary stopped
 * keeping it alive), a standby that was in sync campaigns for the key and,
 * if it wins, promotes itself through the same path as `edgemq promote`.
 *
 * "In sync" is decided from what this standby knew while the primary was
 * alive, never from what it could learn afterwards ({@link promotionRefusal}):
 * a complete copy, at most `maxLagMs` behind at the primary's last contact,
 * and the primary's own last word in etcd saying the standby was in sync in
 * the same epoch (a standby cut off while a `degrade` primary acknowledged
 * alone is out of sync in that word). A standby still hearing from its
 * primary does not campaign: that primary lost etcd, not its life. Each
 * refusal is logged once per reason (GW_WARN_NO_AUTO_PROMOTION) and counted.
 */
import type { Logger } from 'pino'
import type { EtcdLease, LeaderValue } from './lease.ts'
import type { AppliedPosition } from './standby.ts'

/** How often the standby looks at its state while the leader key is gone or etcd is away. */
const TICK_MS = 200

export type AutoPromotionResult = 'promoted' | 'out_of_sync' | 'lost' | 'unavailable'

export interface StandbyView {
  readonly position: AppliedPosition | null
  readonly snapshotting: boolean
  readonly connected: boolean
  /** When this standby last heard from its primary, and how far behind it was then; null: never since it started. */
  readonly lastContact: { readonly at: number, readonly lagMs: number } | null
}

/** Why this standby must not promote itself now, or null when it may. Pure: the caller gives it everything. */
export function promotionRefusal (standby: StandbyView, leader: LeaderValue | null, maxLagMs: number, now: number): string | null {
  const { position, lastContact } = standby
  if (position === null || standby.snapshotting) return 'it holds no complete copy of the primary (a snapshot is in progress or never came)'
  if (lastContact === null) return 'it has not heard from the primary since it started'
  if (lastContact.lagMs > maxLagMs) return `it was ${Math.round(lastContact.lagMs)} ms behind at the primary's last contact (maxLagMs ${maxLagMs})`
  if (leader === null) return 'the primary\'s view of this standby was never seen in etcd'
  if (!leader.inSync) return 'the primary last reported this standby out of sync'
  if (leader.epoch !== position.epoch) return `the leader in etcd was in epoch ${leader.epoch}, this copy is of epoch ${position.epoch}`
  if (standby.connected && now - lastContact.at < maxLagMs) return 'the primary still sends to this standby (it lost etcd, not its life)'
  return null
}

export interface AutoPromotionDeps {
  readonly lease: EtcdLease
  /** This node's id (the leader value's `node`). */
  readonly node: string
  readonly maxLagMs: number
  readonly standby: StandbyView
  /** The promotion `edgemq promote` runs; the gateway restarts as primary afterwards. */
  readonly promote: () => Promise<{ readonly epoch: number }>
  readonly counted: (result: AutoPromotionResult) => void
  readonly logger: Logger
  readonly now: () => number
}

export class AutoPromotion {
  readonly #deps: AutoPromotionDeps
  #timer: NodeJS.Timeout | undefined
  /** The leader key was seen to go and no one took it since (as far as the watch saw). */
  #gone = false
  /** The last leader value seen before it went: the primary's last word. */
  #lastLeader: LeaderValue | null = null
  #busy = false
  #done = false
  #reported: string | null = null

  constructor (deps: AutoPromotionDeps) {
    this.#deps = deps
  }

  start (): void {
    this.#deps.lease.watch({
      onGone: (last) => {
        this.#gone = true
        this.#lastLeader = last ?? this.#lastLeader
        this.#deps.logger.warn({ key: this.#deps.lease.key, last }, 'the primary\'s leader lease in etcd expired')
        void this.#tick()
      },
      onReachable: (reachable) => {
        this.#deps.logger[reachable ? 'info' : 'warn']({ key: this.#deps.lease.key }, reachable ? 'etcd reachable' : 'etcd unreachable')
      },
    })
    this.#timer = setInterval(() => { void this.#tick() }, TICK_MS)
    this.#timer.unref()
  }

  stop (): void {
    this.#done = true
    clearInterval(this.#timer)
  }

  async #tick (): Promise<void> {
    if (this.#busy || this.#done) return
    const { lease, standby } = this.#deps
    const leader = lease.leader
    if (leader !== null) {
      this.#gone = false
      this.#lastLeader = leader
    }
    if (!standby.connected && !lease.reachable && !this.#gone) {
      this.#report('unavailable', 'the primary is unreachable and so is etcd: no automatic promotion while etcd cannot say whether the primary lives')
      return
    }
    if (!this.#gone) {
      if (standby.connected) this.#reported = null
      return
    }
    const refusal = promotionRefusal(standby, this.#lastLeader, this.#deps.maxLagMs, this.#deps.now())
    if (refusal !== null) {
      this.#report('out_of_sync', `the primary's lease expired, but this standby is not promoted automatically: ${refusal}`)
      return
    }
    this.#busy = true
    try {
      const epoch = (standby.position?.epoch ?? 0) + 1
      if (!await lease.campaign({ node: this.#deps.node, epoch, inSync: false })) {
        this.#gone = false
        this.#deps.counted('lost')
        this.#deps.logger.warn({ key: lease.key }, 'another node took the leader key first: this node stays a standby')
        return
      }
      this.#done = true
      clearInterval(this.#timer)
      const promoted = await this.#deps.promote()
      this.#deps.counted('promoted')
      this.#deps.logger.warn({ code: 'GW_WARN_AUTO_PROMOTED', epoch: promoted.epoch, lastContact: standby.lastContact },
        `the primary's lease expired and this standby was in sync: promoted automatically to epoch ${promoted.epoch}`)
    } catch (err) {
      this.#deps.logger.error({ err: (err as Error).message }, 'automatic promotion failed')
    } finally {
      this.#busy = false
    }
  }

  #report (result: AutoPromotionResult, message: string): void {
    if (this.#reported === message) return
    this.#reported = message
    this.#deps.counted(result)
    this.#deps.logger.warn({ code: 'GW_WARN_NO_AUTO_PROMOTION', reason: result }, message)
  }
}
