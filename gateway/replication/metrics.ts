/**
 * Replication metrics (docs/metrics.md, "Replication"). The lag and the
 * in-sync state are read from the running replication at scrape time; the
 * out-of-sync counter counts transitions, so an alert sees a standby that
 * flapped between two scrapes.
 */
import { Counter, Gauge, type Registry } from 'prom-client'

export interface ReplicationGauges {
  /** 1 for the node's role (none, primary, standby), 0 for the others. */
  readonly role: () => string
  readonly epoch: () => number
  readonly inSync: () => boolean
  readonly lag: () => { readonly writes: number, readonly bytes: number | null, readonly seconds: number }
  /** On a primary: bytes of writes its journal keeps in memory (0 elsewhere). */
  readonly backlogBytes: () => number
}

export interface ReplicationMetrics {
  readonly outOfSync: Counter
  /** Standby connections caught up, by how: `backlog` (from where it was) or `snapshot` (the whole database). */
  readonly catchUps: Counter<'from'>
  /** Standby connections dropped because what was kept for them passed catchUpBytes. */
  readonly catchUpOverflows: Counter
}

export function createReplicationMetrics (registry: Registry, gauges: ReplicationGauges): ReplicationMetrics {
  new Gauge({
    name: 'edgemq_replication_role', help: 'This gateway\'s replication role: 1 for the current one (none, primary, standby).',
    labelNames: ['role'], registers: [registry],
    collect () { for (const r of ['none', 'primary', 'standby']) this.set({ role: r }, r === gauges.role() ? 1 : 0) },
  })
  new Gauge({
    name: 'edgemq_replication_epoch', help: 'Leadership epoch this gateway is in.', registers: [registry],
    collect () { this.set(gauges.epoch()) },
  })
  new Gauge({
    name: 'edgemq_replication_in_sync',
    help: 'On a primary: 1 while its standby is in sync (connected, past its snapshot, lagging less than replication.maxLagMs). ' +
      'On a standby: 1 while it is connected to its primary and past its snapshot.',
    registers: [registry],
    collect () { this.set(gauges.inSync() ? 1 : 0) },
  })
  new Gauge({
    name: 'edgemq_replication_lag_writes', help: 'LevelDB batches the primary wrote that the standby has not acknowledged (applied).',
    registers: [registry], collect () { this.set(gauges.lag().writes) },
  })
  new Gauge({
    name: 'edgemq_replication_lag_bytes', help: 'Bytes (keys and values) of the writes the standby has not acknowledged; measured on the primary.',
    registers: [registry], collect () { this.set(gauges.lag().bytes ?? 0) },
  })
  new Gauge({
    name: 'edgemq_replication_lag_seconds', help: 'Age of the oldest write the standby has not acknowledged (0 when it has them all).',
    registers: [registry], collect () { this.set(gauges.lag().seconds) },
  })
  const catchUps = new Counter({
    name: 'edgemq_replication_catch_ups_total',
    help: 'On a primary: standby connections caught up, by how: from="backlog" (from where the standby was, out of the in-memory backlog) or ' +
      'from="snapshot" (a copy of the whole database: a new standby, one too far behind, or any after a primary restart).',
    labelNames: ['from'], registers: [registry],
  })
  for (const from of ['backlog', 'snapshot']) catchUps.inc({ from }, 0)
  new Gauge({
    name: 'edgemq_replication_backlog_bytes',
    help: 'On a primary: bytes (keys and values) of recent writes kept in memory for its standby: the backlog (replication.backlogBytes), and ' +
      'beyond it what a standby catching up still needs (up to replication.catchUpBytes in all). 0 on other nodes.',
    registers: [registry], collect () { this.set(gauges.backlogBytes()) },
  })
  const catchUpOverflows = new Counter({
    name: 'edgemq_replication_catch_up_overflows_total',
    help: 'On a primary: standby connections dropped because the writes kept for them (since their snapshot began, or their last ' +
      'acknowledgement) passed replication.catchUpBytes; each starts over with a snapshot (GW_WARN_STANDBY_CATCH_UP_OVERFLOW).',
    registers: [registry],
  })
  return {
    catchUpOverflows,
    outOfSync: new Counter({
      name: 'edgemq_replication_out_of_sync_total', help: 'Times the standby left the in-sync state (logged with the reason).', registers: [registry],
    }),
    catchUps,
  }
}

export interface LeaseMetrics {
  /** Automatic promotions and the refusals of one (replication.coordination), by result. */
  readonly autoPromotions: Counter<'result'>
}

/** The coordination metrics (replication.coordination): registered on every node, zero where nothing is configured. */
export function createLeaseMetrics (registry: Registry, held: () => boolean): LeaseMetrics {
  new Gauge({
    name: 'edgemq_replication_lease_held',
    help: 'On a primary with replication.coordination: 1 while it holds the leader key in etcd under a live lease, 0 while etcd is away ' +
      '(it keeps serving, and no standby can take over automatically).',
    registers: [registry], collect () { this.set(held() ? 1 : 0) },
  })
  const autoPromotions = new Counter({
    name: 'edgemq_replication_auto_promotions_total',
    help: 'On a standby with replication.coordination: promoted (it took over after the primary\'s lease expired), out_of_sync (the lease ' +
      'expired but it was not in sync: no promotion), lost (another node took the leader key), unavailable (primary and etcd both unreachable).',
    labelNames: ['result'], registers: [registry],
  })
  for (const result of ['promoted', 'out_of_sync', 'lost', 'unavailable']) autoPromotions.inc({ result }, 0)
  return { autoPromotions }
}
