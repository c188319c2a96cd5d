/**
 * `edgemq replication status` (GET /v1/replication) and `edgemq promote`
 * (POST /v1/replication/promote, then GET /v1/replication until the gateway
 * answers as primary: it restarts itself in between).
 */
import type { ReplicationStatus } from '../replication/replication.ts'
import { table } from './admin.ts'
import { CliError } from './errors.ts'
import type { ApiClient } from './http-client.ts'

export async function replicationStatus (api: ApiClient): Promise<ReplicationStatus> {
  return await api.json<ReplicationStatus>(api.url(['replication']))
}

export function replicationTable (s: ReplicationStatus): string {
  if (s.role === 'none') return 'no replication configured (replication.role: none)\n'
  return table(
    ['ROLE', 'EPOCH', 'LISTEN', 'PEER', 'CONNECTED', 'IN-SYNC', 'ACKS', 'ON-STANDBY-LOST', 'PRIMARY-SEQ', 'APPLIED-SEQ', 'LAG-WRITES', 'LAG-BYTES',
      'LAG-SECONDS', 'REFUSAL', 'LEASE'],
    [[s.role, s.epoch, s.listen ?? '-', s.peer ?? '-', s.connected ? 'yes' : 'no', s.inSync ? 'yes' : (s.snapshotting ? 'no (snapshot)' : 'no'),
      s.acks, s.onStandbyLost, s.primarySequence, s.appliedSequence, s.lag.writes, s.lag.bytes ?? '-', s.lag.seconds.toFixed(1), s.refusal ?? '-',
      leaseCell(s.lease)]])
}

/** The lease column: held, or the leader's epoch as this node sees it, or why it does not know. */
function leaseCell (lease: ReplicationStatus['lease']): string {
  if (lease === null || lease === undefined) return '-'
  if (!lease.reachable) return 'etcd unreachable'
  if (lease.held) return 'held'
  return lease.leader === null ? 'free' : `epoch ${lease.leader.epoch}${lease.leader.inSync ? ', standby in sync' : ', standby out of sync'}`
}

/** Promotes the standby and waits (bounded) until it answers as primary in the new epoch. */
export async function promote (api: ApiClient, timeoutMs = 30_000): Promise<ReplicationStatus> {
  const { epoch } = await api.json<{ epoch: number }>(api.url(['replication', 'promote']), { method: 'POST' })
  const deadline = Date.now() + timeoutMs
  for (;;) {
    try {
      const s = await replicationStatus(api)
      if (s.role === 'primary' && s.epoch >= epoch) return s
    } catch (err) {
      // The gateway is restarting: its HTTP server is down for a moment.
      if ((err as CliError).code !== 'CLI_UNREACHABLE') throw err
    }
    if (Date.now() > deadline) throw new CliError('CLI_SERVER', `promoted to epoch ${epoch}, but the gateway did not answer as primary within ${timeoutMs} ms`)
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}
