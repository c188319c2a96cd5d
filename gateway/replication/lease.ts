/**
 * The leadership lease in etcd (replication.coordination.etcd), through the
 * etcd3 client. One key per site, `<prefix>/<gatewayId>/leader`, held under
 * a lease of `leaseTtlMs`; its value is JSON {@link LeaderValue}: the node
 * that leads, its epoch, and whether its standby is in sync (the primary's
 * view, like Kafka's ISR kept in the controller).
 *
 * - The primary {@link EtcdLease.hold | holds} the key: it creates it when it
 *   is absent or when it names this node already (a restart of the same
 *   node takes it back at once), and keeps the lease alive. A lost lease
 *   (etcd unreachable longer than the TTL) is granted and claimed again
 *   every TTL/2; the primary keeps serving meanwhile (docs/operations.md
 *   says why).
 * - A standby {@link EtcdLease.watch | watches} the key and is told when it
 *   goes (the lease expired or was revoked); it may then
 *   {@link EtcdLease.campaign | campaign}: one transaction that creates the
 *   key only if no one holds it, under its own lease. At most one node wins.
 *
 * A closing node releases its lease passively (no revoke): the key goes
 * when the TTL runs out, so a quick restart of the primary keeps its
 * leadership, and a stop longer than the TTL hands it over.
 */
import { Etcd3, type Lease, type Watcher } from 'etcd3'
import type { Logger } from 'pino'
import type { EtcdCoordinationConfig } from './config-schema.ts'

export interface LeaderValue {
  /** The node's id (`<dataDir>/node-id`): unique per data directory, unlike the gatewayId the pair shares. */
  readonly node: string
  readonly epoch: number
  /** The primary's view of its standby: in sync (replication.maxLagMs) or not. */
  readonly inSync: boolean
}

export function leaderKey (config: EtcdCoordinationConfig, gatewayId: string): string {
  return `${config.prefix.replace(/\/+$/, '')}/${gatewayId}/leader`
}

function parseLeader (value: Buffer | string | null | undefined): LeaderValue | null {
  if (value === null || value === undefined || value.length === 0) return null
  try {
    const v = JSON.parse(value.toString()) as Partial<LeaderValue>
    return typeof v.node === 'string' && typeof v.epoch === 'number' ? { node: v.node, epoch: v.epoch, inSync: v.inSync === true } : null
  } catch {
    return null
  }
}

export interface LeaseEvents {
  /** The leader key went away (lease expired or revoked): the leader it named, as last seen. */
  readonly onGone?: (last: LeaderValue | null) => void
  /** etcd answered (true) or a call or the watch failed (false); called on changes only. */
  readonly onReachable?: (reachable: boolean) => void
}

export class EtcdLease {
  readonly #client: Etcd3
  readonly #config: EtcdCoordinationConfig
  readonly #key: string
  readonly #log: Logger
  #lease: Lease | undefined
  #held = false
  #value: LeaderValue | undefined
  #watcher: Watcher | undefined
  #leader: LeaderValue | null = null
  #reachable = false
  #events: LeaseEvents = {}
  #retry: NodeJS.Timeout | undefined
  /** GW_WARN_LEASE_UNAVAILABLE was logged and etcd has not answered a claim since. */
  #unavailable = false
  /** The other node last reported holding the key (GW_WARN_LEADER_ELSEWHERE). */
  #elsewhere: string | null = null
  #closed = false

  constructor (config: EtcdCoordinationConfig, gatewayId: string, logger: Logger) {
    this.#config = config
    this.#key = leaderKey(config, gatewayId)
    this.#log = logger
    // Unary calls give up after one TTL: a primary must not wait longer than its lease to learn that etcd is away.
    this.#client = new Etcd3({
      hosts: [...config.endpoints], dialTimeout: config.leaseTtlMs,
      defaultCallOptions: (ctx) => ctx.isStream ? {} : { deadline: Date.now() + config.leaseTtlMs },
    })
  }

  get key (): string { return this.#key }
  /** This node holds the leader key under a live lease (as far as it knows). */
  get held (): boolean { return this.#held }
  /** The leader as last read or watched (null: no one holds the key, or not known yet). */
  get leader (): LeaderValue | null { return this.#leader }
  get reachable (): boolean { return this.#reachable }

  /** Reads the leader key once (null when absent); throws when etcd does not answer. */
  async read (): Promise<LeaderValue | null> {
    const value = await this.#call(() => this.#client.get(this.#key).buffer())
    return parseLeader(value)
  }

  /** The primary: claims the key with `value` and keeps it; `update` changes the value while held. */
  hold (value: LeaderValue): void {
    this.#value = value
    void this.#claim()
  }

  /** Writes a new value under the lease (the standby's in-sync state changed); kept for the next claim if etcd is away. */
  async update (value: LeaderValue): Promise<void> {
    this.#value = value
    const lease = this.#lease
    if (!this.#held || lease === undefined) return
    await this.#call(() => lease.put(this.#key).value(JSON.stringify(value)).exec()).catch((err: unknown) => {
      this.#log.warn({ err: (err as Error).message, key: this.#key }, 'could not update the leader key in etcd')
    })
  }

  /** A standby: one transaction that creates the key under a new lease of this node's, only when no one holds it. True when it won. */
  async campaign (value: LeaderValue): Promise<boolean> {
    const lease = this.#newLease()
    const won = await this.#call(async () => {
      const txn = await this.#client.if(this.#key, 'Create', '==', 0).then(lease.put(this.#key).value(JSON.stringify(value))).commit()
      return txn.succeeded
    }).catch((err: unknown) => {
      this.#log.warn({ err: (err as Error).message }, 'campaign for the leader key failed: etcd did not answer')
      return false
    })
    if (won) {
      this.#held = true
      this.#value = value
    } else {
      this.#dropLease()
    }
    return won
  }

  /** A standby: follows the key; `onGone` when it is deleted. The current value is read first. */
  watch (events: LeaseEvents): void {
    this.#events = events
    void this.#startWatch()
  }

  async close (): Promise<void> {
    this.#closed = true
    clearTimeout(this.#retry)
    await this.#watcher?.cancel().catch(() => {})
    // Released, not revoked: the key outlives this process by the TTL (see the header).
    this.#lease?.release()
    this.#client.close()
  }

  async #startWatch (): Promise<void> {
    if (this.#closed) return
    try {
      const watcher = await this.#client.watch().key(this.#key).create()
      if (this.#closed) { await watcher.cancel(); return }
      this.#watcher = watcher
      watcher.on('connected', () => {
        this.#setReachable(true)
        // After a reconnect the key may have gone while the watch was away: read it again.
        this.read().then((v) => {
          const before = this.#leader
          this.#leader = v
          if (v === null && before !== null) this.#events.onGone?.(before)
        }, () => {})
      })
      watcher.on('disconnected', () => { this.#setReachable(false) })
      watcher.on('put', (kv) => { this.#leader = parseLeader(kv.value) })
      watcher.on('delete', () => {
        const last = this.#leader
        this.#leader = null
        this.#events.onGone?.(last)
      })
      // A failed read here leaves the watch in place: its 'connected' reads again.
      this.#leader = await this.read().catch(() => this.#leader)
    } catch (err) {
      this.#log.warn({ err: (err as Error).message, endpoints: this.#config.endpoints }, 'cannot watch the leader key: etcd unreachable; retrying')
      this.#retry = setTimeout(() => { void this.#startWatch() }, this.#config.leaseTtlMs / 2)
    }
  }

  async #claim (): Promise<void> {
    if (this.#closed || this.#value === undefined) return
    const value = this.#value
    const lease = this.#newLease()
    try {
      // Ours when absent, or when it names this node (a restart, or the lease this node won as a standby before it restarted as primary).
      const claimed = await this.#call(async () => {
        const created = await this.#client.if(this.#key, 'Create', '==', 0).then(lease.put(this.#key).value(JSON.stringify(value))).commit()
        if (created.succeeded) return true
        const raw = await this.#client.get(this.#key).buffer()
        this.#leader = parseLeader(raw)
        if (raw === null || this.#leader?.node !== value.node) return false
        const txn = await this.#client.if(this.#key, 'Value', '==', raw).then(lease.put(this.#key).value(JSON.stringify(this.#value))).commit()
        return txn.succeeded
      })
      this.#unavailable = false
      if (claimed) {
        this.#held = true
        this.#log.info({ key: this.#key, epoch: value.epoch, ttlMs: this.#config.leaseTtlMs }, 'holding the leader lease in etcd')
        // The standby's state changed while the claim was on its way.
        if (this.#value !== value) await this.update(this.#value)
        return
      }
      // Once per leader: the retry below runs every TTL/2 while the other node holds the key.
      if (this.#leader?.node !== this.#elsewhere) {
        this.#elsewhere = this.#leader?.node ?? null
        this.#log.error({ code: 'GW_WARN_LEADER_ELSEWHERE', key: this.#key, leader: this.#leader },
          'another node holds the leader key in etcd; this primary keeps serving and tries again once the key is free')
      }
    } catch (err) {
      // Once per outage: the retry below runs every TTL/2 until etcd answers.
      if (!this.#unavailable) {
        this.#unavailable = true
        this.#log.warn({ code: 'GW_WARN_LEASE_UNAVAILABLE', err: (err as Error).message, endpoints: this.#config.endpoints },
          'cannot hold the leader lease: etcd unreachable; this primary keeps serving, no standby can take over automatically meanwhile')
      }
    }
    this.#dropLease()
    this.#retry = setTimeout(() => { void this.#claim() }, this.#config.leaseTtlMs / 2)
  }

  #newLease (): Lease {
    this.#dropLease()
    const lease = this.#client.lease(this.#config.leaseTtlMs / 1000)
    this.#lease = lease
    lease.on('lost', (err) => {
      if (this.#lease !== lease || this.#closed) return
      const was = this.#held
      this.#held = false
      this.#setReachable(false)
      if (!was) return
      this.#unavailable = true
      this.#log.warn({ code: 'GW_WARN_LEASE_UNAVAILABLE', err: err.message },
        'lost the leader lease in etcd; this node keeps its role and claims the lease again when etcd answers')
      this.#lease = undefined
      this.#retry = setTimeout(() => { void this.#claim() }, this.#config.leaseTtlMs / 2)
    })
    lease.on('keepaliveSucceeded', () => { this.#setReachable(true) })
    return lease
  }

  #dropLease (): void {
    this.#held = false
    this.#lease?.release()
    this.#lease = undefined
  }

  async #call<T> (fn: () => Promise<T>): Promise<T> {
    try {
      const result = await fn()
      this.#setReachable(true)
      return result
    } catch (err) {
      this.#setReachable(false)
      throw err
    }
  }

  #setReachable (reachable: boolean): void {
    if (reachable === this.#reachable) return
    this.#reachable = reachable
    this.#events.onReachable?.(reachable)
  }
}
