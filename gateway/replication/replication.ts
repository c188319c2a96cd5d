/**
 * Replication, assembled for one role: on a primary a {@link WriteJournal}
 * on the root database and a {@link ReplicationPrimary} serving it; on a
 * standby a {@link ReplicationStandby} applying what its primary sends. Gives
 * the gateway its status document (GET /v1/replication, `edgemq replication
 * status`), health reasons, metrics and, under `acks: replicated`, the
 * store's commit gate.
 *
 * Replication metadata lives in the root database's sublevel `replication`
 * and is never replicated: `position` (a standby's applied history, sequence
 * number and epoch), `epoch` (the epoch this node writes in), `promoted` (set
 * by `edgemq promote`: this node runs as primary whatever its config says),
 * `copying` (a snapshot is being applied, the copy is incomplete).
 *
 * Terms: a promotion starts epoch + 1. A node that starts as primary first
 * asks its peer (probe.ts); a peer that is primary in a newer epoch was
 * promoted while this node was away, so this node follows it as a standby.
 * Its own data — which may end in a tail the new primary never received —
 * is set aside before the snapshot replaces it: copied whole into
 * `<dataDir>/set-aside/<time>.cbor` (CBOR [key, value] pairs, as LevelDB held
 * them), a file the log names; never silently deleted. Once the snapshot is
 * in, the first term after this node's (terms.ts) says exactly which of the
 * set-aside records the new primary lacks: offset ranges per partition, in
 * `<file>.tail.json` beside the copy, the records themselves in
 * `<file>.tail.ndjson` (set-aside-tail.ts), and logged (GW_WARN_SET_ASIDE_TAIL).
 * `aside` (metadata) keeps what that needs across a restart meanwhile.
 *
 * With replication.coordination.etcd the leadership is also a lease in etcd
 * (lease.ts): a primary holds the leader key, a standby in sync takes over
 * when it expires (election.ts), and a node starting as primary also asks
 * etcd whether another node leads in a newer epoch. Nodes are told apart by
 * `<dataDir>/node-id` (the pair shares its gatewayId).
 */
import { randomUUID } from 'node:crypto'
import { createWriteStream } from 'node:fs'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { once } from 'node:events'
import { encode } from 'cbor-x'
import type { Logger } from 'pino'
import type { Registry } from 'prom-client'
import { replacingCopyOp, type LevelDatabase, type LogStore } from '../../store/index.ts'
import { GatewayError } from '../errors.ts'
import { parseHostPort, type HostPort, type ReplicationConfig, type ReplicationRole } from './config-schema.ts'
import { AutoPromotion } from './election.ts'
import { WriteJournal, type WriteEmitter } from './journal.ts'
import type { EtcdLease, LeaderValue } from './lease.ts'
import { createLeaseMetrics, createReplicationMetrics, type LeaseMetrics } from './metrics.ts'
import { ReplicationPrimary, type SnapshotSource } from './primary.ts'
import { probePeer } from './probe.ts'
import { ReplicationStandby, type AppliedPosition, type FollowerDatabase } from './standby.ts'
import { formerLogEnds, nameTail, type PendingAside } from './set-aside-tail.ts'
import { recordTermStart } from './terms.ts'

/** The sublevel prefix of the replication metadata, as abstract-level writes it in the root's key space. */
const META_PREFIX = Buffer.from('!replication!')
const POSITION_KEY = Buffer.concat([META_PREFIX, Buffer.from('position')])
const EPOCH_KEY = Buffer.concat([META_PREFIX, Buffer.from('epoch')])
const PROMOTED_KEY = Buffer.concat([META_PREFIX, Buffer.from('promoted')])
const COPYING_KEY = Buffer.concat([META_PREFIX, Buffer.from('copying')])
const ASIDE_KEY = Buffer.concat([META_PREFIX, Buffer.from('aside')])
const RAW = { keyEncoding: 'buffer', valueEncoding: 'buffer' } as const
/** How long a node starting as primary waits for its peer to say whether it was promoted. */
const PROBE_MS = 1000

export interface ReplicationStatus {
  readonly role: ReplicationRole
  readonly epoch: number
  readonly gatewayId: string
  /** The primary's replication listener (a primary), or the primary it follows (a standby). */
  readonly listen: string | null
  readonly peer: string | null
  readonly acks: 'local' | 'replicated'
  readonly onStandbyLost: 'block' | 'degrade'
  readonly connected: boolean
  readonly inSync: boolean
  readonly snapshotting: boolean
  /** The primary's newest write, and what the standby has applied (as far as this node knows). */
  readonly primarySequence: number
  readonly appliedSequence: number
  readonly lag: { readonly writes: number, readonly bytes: number | null, readonly seconds: number }
  /** A standby: why its primary refused it, if it did. */
  readonly refusal: string | null
  /** With replication.coordination: the leader key, whether this node holds it, whether etcd answers, and the leader it names. */
  readonly lease: LeaseStatus | null
}

export interface LeaseStatus { readonly key: string, readonly held: boolean, readonly reachable: boolean, readonly leader: LeaderValue | null }

function leaseStatus (coordination: Coordination | null): LeaseStatus | null {
  if (coordination === null) return null
  const { lease } = coordination
  return { key: lease.key, held: lease.held, reachable: lease.reachable, leader: lease.leader }
}

export interface Replication {
  readonly role: ReplicationRole
  /** The store's commit gate under acks: replicated (a primary); undefined otherwise. */
  readonly commitGate: ((commit: { readonly records: number }) => Promise<void>) | undefined
  /**
   * Resolves once the writes made so far are acknowledged as `acks` says: on a primary under acks: replicated, once
   * the standby has them (held under block, see {@link ReplicationPrimary.replicated}); at once otherwise. For the
   * writes that are no group commit and so pass no commit gate: the HTTP API's offset commits, resets and deletions.
   */
  replicated (): Promise<void>
  /** The address the replication listener bound (a primary), for the ready line. */
  readonly listenAddress: string | null
  status (): ReplicationStatus
  /** Reasons this node is unhealthy for replication's sake (empty when fine). */
  healthReasons (): string[]
  /**
   * A standby: the store to re-read after applied writes. Following starts with it: replication starts before the store
   * opens, and the store must not load a copy that a snapshot is half-way through. Nothing for other roles.
   */
  follow (refresh: () => Promise<void>): void
  /** A primary, once its store is open: records where its term began (terms.ts), once per epoch. Nothing for other roles. */
  startTerm (store: LogStore): Promise<void>
  /**
   * A standby: stops following, and starts epoch + 1 as primary: kept in the
   * database, so the node is primary from its next start on (the gateway
   * restarts itself at once, see cli/start.ts). GW_PROMOTE_REFUSED when this
   * node is not a standby or holds no complete copy (a snapshot in progress).
   */
  promote (): Promise<{ readonly epoch: number }>
  close (): Promise<void>
}

export interface ReplicationDeps {
  readonly config: ReplicationConfig
  readonly gatewayId: string
  readonly root: LevelDatabase
  readonly registry: Registry
  readonly logger: Logger
  readonly durabilitySync: boolean
  readonly dataDir: string
  readonly now: () => number
  /** Called after an automatic promotion (replication.coordination): the gateway restarts as primary, as after `edgemq promote`. */
  readonly onPromoted?: () => void
}

/** What a node with replication.coordination brings to its role. */
interface Coordination { readonly lease: EtcdLease, readonly node: string, readonly metrics: LeaseMetrics }

async function readJson<T> (root: LevelDatabase, key: Buffer): Promise<T | null> {
  const value = await root.get(key, RAW) as Buffer | undefined
  return value === undefined ? null : JSON.parse(value.toString('utf8')) as T
}

function jsonOp (key: Buffer, value: unknown): { type: 'put', key: Buffer, value: Buffer } {
  return { type: 'put', key, value: Buffer.from(JSON.stringify(value)) }
}

function isMeta (key: Buffer): boolean {
  return key.length >= META_PREFIX.length && key.subarray(0, META_PREFIX.length).equals(META_PREFIX)
}

/** This node's id for the leader key: `<dataDir>/node-id`, made once (a standby's snapshot empties its database, not this file). */
async function nodeId (dataDir: string): Promise<string> {
  const file = path.join(dataDir, 'node-id')
  const existing = await readFile(file, 'utf8').catch(() => '')
  if (existing.trim() !== '') return existing.trim()
  await mkdir(dataDir, { recursive: true })
  const id = randomUUID()
  await writeFile(file, `${id}\n`, { flag: 'wx' })
  return id
}

const notStandby = async (): Promise<never> => {
  throw new GatewayError('GW_PROMOTE_REFUSED', 'only a standby can be promoted (replication.role: standby)')
}

/** The role this node takes: its config's, unless it was promoted, or its peer was promoted while it was away. */
async function chooseRole (deps: ReplicationDeps, log: Logger, coordination: Coordination | null): Promise<'primary' | 'standby'> {
  const { config, root } = deps
  let role: 'primary' | 'standby' = config.role === 'standby' ? 'standby' : 'primary'
  const promoted = await readJson<{ epoch: number }>(root, PROMOTED_KEY)
  if (role === 'standby' && promoted !== null) {
    log.warn({ code: 'GW_WARN_PROMOTED', epoch: promoted.epoch },
      `this standby was promoted (epoch ${promoted.epoch}): it runs as primary; set replication.role: primary`)
    role = 'primary'
  }
  const peer = config.peer === '' ? null : parseHostPort(config.peer)
  if (role === 'primary' && peer !== null) {
    const epoch = (await readJson<number>(root, EPOCH_KEY)) ?? 1
    const other = await probePeer(peer, PROBE_MS)
    if (other !== null && other.gatewayId === deps.gatewayId && other.epoch > epoch) {
      log.warn({ code: 'GW_WARN_DEMOTED', epoch, peerEpoch: other.epoch, peer: config.peer },
        `the peer ${config.peer} is primary in epoch ${other.epoch}, newer than this node's ${epoch}: this node follows it as a standby`)
      await root.batch([{ type: 'del', key: PROMOTED_KEY }] as never, { ...RAW, sync: true } as never)
      role = 'standby'
    }
  }
  if (role === 'primary' && peer !== null && coordination !== null) {
    // The peer may be unreachable from here and still lead: etcd knows who holds the key. etcd away: start as configured (documented).
    const epoch = (await readJson<number>(root, EPOCH_KEY)) ?? 1
    const leader = await coordination.lease.read().catch((err: unknown) => {
      log.warn({ code: 'GW_WARN_LEASE_UNAVAILABLE', err: (err as Error).message }, 'cannot read the leader key in etcd; starting as configured')
      return null
    })
    if (leader !== null && leader.node !== coordination.node && leader.epoch > epoch) {
      log.warn({ code: 'GW_WARN_DEMOTED', epoch, peerEpoch: leader.epoch, peer: config.peer, key: coordination.lease.key },
        `the leader key in etcd names another node in epoch ${leader.epoch}, newer than this node's ${epoch}: this node follows ${config.peer} as a standby`)
      await root.batch([{ type: 'del', key: PROMOTED_KEY }] as never, { ...RAW, sync: true } as never)
      role = 'standby'
    }
  }
  return role
}

/** Copies every entry of the database (but the replication metadata) into a new file under <dataDir>/set-aside; its path, or null when empty. */
async function setAside (root: LevelDatabase, dataDir: string, now: number): Promise<{ file: string, entries: number } | null> {
  const iterator = root.iterator(RAW) as unknown as { nextv (n: number): Promise<Array<[Buffer, Buffer]>>, close (): Promise<void> }
  let out: ReturnType<typeof createWriteStream> | undefined
  let file = ''
  let entries = 0
  try {
    for (let chunk = await iterator.nextv(1024); chunk.length > 0; chunk = await iterator.nextv(1024)) {
      for (const [key, value] of chunk) {
        if (isMeta(key)) continue
        if (out === undefined) {
          await mkdir(path.join(dataDir, 'set-aside'), { recursive: true })
          file = path.join(dataDir, 'set-aside', `${new Date(now).toISOString().replace(/[:.]/g, '-')}.cbor`)
          out = createWriteStream(file, { flags: 'wx' })
        }
        if (!out.write(encode([key, value]))) await once(out, 'drain')
        entries++
      }
    }
  } finally {
    await iterator.close()
    if (out !== undefined) {
      out.end()
      await once(out, 'close')
    }
  }
  return out === undefined ? null : { file, entries }
}

/**
 * Empties a standby's database for a snapshot. First, in one synced write, the copy is marked incomplete: the
 * `copying` marker (a standby killed from here on empties its copy again at its next start and takes a new snapshot,
 * rather than going on from a position on a copy half gone), a former primary's set-aside data whose tail is still to
 * be named (`aside`, or none), and the log's version entry deleted (store/log-store.ts, replacingCopyOp: the store's
 * readers then say "read again", STORE_LOG_REPLACED). Then everything else is deleted, the marker and `aside` kept.
 * The order matters because emptying is no atomic write: classic-level's clear() deletes in key order, about 16 KB of
 * keys per write, the log's batches before its partition, stream and version entries (the store read that as
 * damage, STORE_DAMAGED) and the replication metadata after the log (a kill in between kept the position of a copy
 * that was gone).
 */
export async function emptyForCopy (root: LevelDatabase, aside: PendingAside | null): Promise<void> {
  await root.batch([
    jsonOp(COPYING_KEY, true),
    aside === null ? { type: 'del', key: ASIDE_KEY } : jsonOp(ASIDE_KEY, aside),
    replacingCopyOp(root),
  ] as never, { ...RAW, sync: true } as never)
  const kept = [ASIDE_KEY, COPYING_KEY].sort(Buffer.compare)
  let after: Buffer | undefined
  for (const key of kept) {
    await root.clear({ ...RAW, ...(after === undefined ? {} : { gt: after }), lt: key } as never)
    after = key
  }
  await root.clear({ ...RAW, gt: after } as never)
}

/** Before the store opens: a primary's journal must see every write from the first one. close() may be called more than once. */
export async function startReplication (deps: ReplicationDeps): Promise<Replication> {
  const { config, logger } = deps
  const log = logger.child({ component: 'replication' })
  if (config.role !== 'none') {
    const etcd = config.coordination.etcd
    // Loaded only when configured: the etcd3 client (gRPC) took ~90 ms of CPU at every gateway start, lease or not.
    const lease = etcd === undefined ? null : new (await import('./lease.ts')).EtcdLease(etcd, deps.gatewayId, log)
    const metrics = createLeaseMetrics(deps.registry, () => lease?.held ?? false)
    let replication: Replication
    try {
      const coordination = lease === null ? null : { lease, node: await nodeId(deps.dataDir), metrics }
      replication = await chooseRole(deps, log, coordination) === 'primary'
        ? await startPrimary(deps, log, coordination)
        : await startStandby(deps, log, coordination)
    } catch (err) {
      await lease?.close()
      throw err
    }
    let closed: Promise<void> | undefined
    return { ...replication, close: () => (closed ??= replication.close().finally(() => lease?.close())) }
  }
  createLeaseMetrics(deps.registry, () => false)
  createReplicationMetrics(deps.registry, {
    role: () => 'none', epoch: () => 0, inSync: () => false, lag: () => ({ writes: 0, bytes: 0, seconds: 0 }), backlogBytes: () => 0,
  })
  return {
    role: 'none', commitGate: undefined, listenAddress: null,
    replicated: async () => {},
    status: () => ({
      role: 'none', epoch: 0, gatewayId: deps.gatewayId, listen: null, peer: null, acks: config.acks, onStandbyLost: config.onStandbyLost,
      connected: false, inSync: false, snapshotting: false, primarySequence: 0, appliedSequence: 0, lag: { writes: 0, bytes: 0, seconds: 0 }, refusal: null,
      lease: null,
    }),
    healthReasons: () => [],
    follow: () => {},
    startTerm: async () => {},
    promote: notStandby,
    close: async () => {},
  }
}

/** After the snapshot that replaced a former primary's data: names its lost tail (set-aside-tail.ts), then forgets it. Always false: nothing left. */
async function nameLostTail (root: LevelDatabase, log: Logger): Promise<false> {
  const pending = await readJson<PendingAside>(root, ASIDE_KEY)
  if (pending === null) return false
  await nameTail(root, pending, log)
  await root.batch([{ type: 'del', key: ASIDE_KEY }] as never, { ...RAW, sync: true } as never)
  return false
}

async function startPrimary (deps: ReplicationDeps, log: Logger, coordination: Coordination | null): Promise<Replication> {
  const { config, root } = deps
  const epoch = (await readJson<number>(root, EPOCH_KEY)) ?? 1
  // A primary's database is no copy of another's from now on: if it is ever demoted, its data is set aside before a snapshot replaces it.
  await root.batch([jsonOp(EPOCH_KEY, epoch), { type: 'del', key: POSITION_KEY }] as never, { ...RAW, sync: true } as never)
  const journal = new WriteJournal(root as unknown as WriteEmitter, {
    ignorePrefix: META_PREFIX, maxBytes: config.backlogBytes, maxPinnedBytes: config.catchUpBytes, now: deps.now,
  })
  const holder: { metrics?: ReturnType<typeof createReplicationMetrics> } = {}
  let primary: ReplicationPrimary
  try {
    primary = await ReplicationPrimary.start({
      config, journal, root: root as unknown as SnapshotSource, ignorePrefix: META_PREFIX, gatewayId: deps.gatewayId, epoch, logger: log, now: deps.now,
      onCatchUp: (from) => holder.metrics?.catchUps.inc({ from }),
      onCatchUpOverflow: () => holder.metrics?.catchUpOverflows.inc(),
      onInSync: (inSync, reason) => {
        void coordination?.lease.update({ node: coordination.node, epoch, inSync })
        if (inSync) {
          log.info({ reason }, 'standby in sync')
        } else {
          holder.metrics?.outOfSync.inc()
          const effect = config.acks === 'local' ? 'acks are local anyway'
            : config.onStandbyLost === 'block' ? 'acknowledgements wait for it (onStandbyLost: block)'
              : 'acknowledging on the local disk alone (onStandbyLost: degrade)'
          log.warn({ code: 'GW_WARN_STANDBY_OUT_OF_SYNC', reason }, `standby out of sync: ${reason}; ${effect}`)
        }
      },
    })
  } catch (err) {
    journal.close()
    throw err
  }
  const lag = (): { writes: number, bytes: number, seconds: number } => primary.lag()
  coordination?.lease.hold({ node: coordination.node, epoch, inSync: primary.inSync })
  holder.metrics = createReplicationMetrics(deps.registry, {
    role: () => 'primary', epoch: () => epoch, inSync: () => primary.inSync, lag, backlogBytes: () => journal.keptBytes,
  })
  log.info({ listen: primary.address, acks: config.acks, onStandbyLost: config.onStandbyLost, epoch }, 'replication primary listening')
  return {
    role: 'primary',
    commitGate: config.acks === 'replicated' ? (commit) => primary.gate(commit) : undefined,
    replicated: config.acks === 'replicated' ? () => primary.replicated() : async () => {},
    listenAddress: primary.address,
    status: () => ({
      role: 'primary', epoch, gatewayId: deps.gatewayId, listen: primary.address, peer: primary.standbyAddress, acks: config.acks,
      onStandbyLost: config.onStandbyLost, connected: primary.connected, inSync: primary.inSync, snapshotting: primary.snapshotting,
      primarySequence: journal.lastSeq, appliedSequence: Math.max(0, primary.ackedSeq), lag: lag(), refusal: null, lease: leaseStatus(coordination),
    }),
    healthReasons: () => primary.inSync || config.acks === 'local' ? []
      : [`replication: the standby is not in sync (${config.onStandbyLost === 'block' ? 'acknowledgements are held' : 'acks are local only'})`],
    follow: () => {},
    startTerm: async (store) => {
      const term = await recordTermStart(root, store, epoch, deps.now())
      log.info({ epoch, startedAt: new Date(term.at).toISOString() }, 'term started')
    },
    promote: notStandby,
    close: async () => {
      await primary.close()
      journal.close()
    },
  }
}

async function startStandby (deps: ReplicationDeps, log: Logger, coordination: Coordination | null): Promise<Replication> {
  const { config, root } = deps
  const peer = parseHostPort(config.peer) as HostPort
  // A snapshot a kill interrupted left a copy the store cannot open: empty it (the snapshot starts again) before the store opens.
  if (await root.get(COPYING_KEY, RAW) !== undefined) {
    log.warn({}, 'the last snapshot from the primary was interrupted: its partial copy is emptied, a new snapshot follows')
    // A former primary's set-aside data still waits for its tail to be named: that survives the emptying.
    await emptyForCopy(root, await readJson<PendingAside>(root, ASIDE_KEY))
  }
  const initial = await readJson<AppliedPosition>(root, POSITION_KEY)
  // A former primary's set-aside data whose tail is not named yet (a restart may have come between); checked after each refresh until it is.
  let asidePending = await root.get(ASIDE_KEY, RAW) !== undefined
  const refreshers: Array<() => Promise<void>> = []
  const db: FollowerDatabase = {
    batch: async (ops, options) => {
      await root.batch(ops.map((op) => ({ ...op, ...RAW })) as never, options as never)
    },
    startCopy: async () => {
      const copying = await root.get(COPYING_KEY, RAW)
      const position = await readJson<AppliedPosition>(root, POSITION_KEY)
      // Data that is no copy of a primary (this node was one, or is new to the pair): set aside before the snapshot replaces it.
      // Kept across the emptying: a tail still to be named (this copy follows one a kill interrupted), or the one set aside now.
      let pending = await readJson<PendingAside>(root, ASIDE_KEY)
      if (copying === undefined && position === null) {
        const epoch = (await readJson<number>(root, EPOCH_KEY)) ?? 0
        const ends = await formerLogEnds(root)
        const aside = await setAside(root, deps.dataDir, deps.now())
        if (aside !== null) {
          log.warn({ code: 'GW_WARN_SET_ASIDE', file: aside.file, entries: aside.entries },
            `this node's former data (${aside.entries} LevelDB entries, any tail the primary does not have among them) is set aside in ${aside.file}`)
          pending = { file: aside.file, epoch, ends }
        }
      }
      await emptyForCopy(root, pending)
      if (pending !== null) asidePending = true
    },
    finishCopyOps: [{ type: 'del', key: COPYING_KEY }],
  }
  const standby: ReplicationStandby = new ReplicationStandby({
    peer, gatewayId: deps.gatewayId, db, positionKey: POSITION_KEY, sync: deps.durabilitySync, initial, logger: log, now: deps.now,
    silenceMs: config.silenceMs,
    refresh: async () => {
      for (const r of refreshers) await r()
      if (asidePending && standby.position !== null && !standby.snapshotting) asidePending = await nameLostTail(root, log)
    },
  })
  const inSync = (): boolean => standby.connected && !standby.snapshotting && standby.position !== null
  const lag = (): { writes: number, bytes: null, seconds: number } => ({ ...standby.lag(), bytes: null })
  const epoch = (): number => standby.position?.epoch ?? 0
  createReplicationMetrics(deps.registry, { role: () => 'standby', epoch, inSync, lag, backlogBytes: () => 0 })
  log.info({ primary: config.peer, from: initial?.seq ?? null }, 'replication standby following its primary')
  const promote = async (): Promise<{ epoch: number }> => {
    const position = standby.position
    if (position === null || standby.snapshotting) {
      throw new GatewayError('GW_PROMOTE_REFUSED', 'this standby holds no complete copy of its primary (a snapshot is in progress or never came)')
    }
    auto?.stop()
    await standby.close()
    const epoch = Math.max(position.epoch, (await readJson<number>(root, EPOCH_KEY)) ?? 0) + 1
    await root.batch([jsonOp(EPOCH_KEY, epoch), jsonOp(PROMOTED_KEY, { epoch })] as never, { ...RAW, sync: true } as never)
    log.warn({ code: 'GW_WARN_PROMOTED', epoch, lag: standby.lag() }, `promoted: this node becomes primary in epoch ${epoch}`)
    return { epoch }
  }
  const auto = coordination === null ? undefined : new AutoPromotion({
    lease: coordination.lease, node: coordination.node, maxLagMs: config.maxLagMs, standby, logger: log, now: deps.now,
    counted: (result) => { coordination.metrics.autoPromotions.inc({ result }) },
    promote: async () => {
      const result = await promote()
      deps.onPromoted?.()
      return result
    },
  })
  return {
    role: 'standby',
    commitGate: undefined,
    replicated: async () => {},
    listenAddress: null,
    status: (): ReplicationStatus => ({
      role: 'standby', epoch: epoch(), gatewayId: deps.gatewayId, listen: null, peer: config.peer, acks: config.acks, onStandbyLost: config.onStandbyLost,
      connected: standby.connected, inSync: inSync(), snapshotting: standby.snapshotting,
      primarySequence: standby.position === null ? 0 : standby.position.seq + standby.lag().writes, appliedSequence: standby.position?.seq ?? 0,
      lag: lag(), refusal: standby.refusal, lease: leaseStatus(coordination),
    }),
    healthReasons: () => [],
    follow: (refresh) => {
      refreshers.push(refresh)
      standby.start()
      auto?.start()
    },
    startTerm: async () => {},
    promote,
    close: async () => {
      auto?.stop()
      await standby.close()
    },
  }
}
