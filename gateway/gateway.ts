/**
 * The composition root: config → LevelDB → store → session persistence →
 * aedes → command dispatcher → bridge → HTTP server → MQTT listeners. It only
 * wires parts together; what each part does lives in its module. Nothing
 * else wires components together, and nothing else reads the environment.
 *
 * Each part registers its shutdown step as it starts (shutdown.ts), so a
 * normal close and a start that failed half-way take the same path: the
 * steps run in reverse start order. Listeners start last, so the first step
 * stops accepting and closes the clients; then the appends their publishes
 * started are drained, then HTTP, the bridge and the dispatcher stop (the
 * uplinks commit what their upstreams acknowledged, the dispatcher its
 * command watermarks), the session store flushes its queued writes, and the
 * store and the database close last.
 */
import { readFileSync } from 'node:fs'
import type { Aedes } from 'aedes'
import { MemoryLevel } from 'memory-level'
import type { Logger } from 'pino'
import { Registry } from 'prom-client'
import { isStoreError, openLogStore, systemClock, type LevelDatabase, type LogStore } from '../store/index.ts'
import { Bridge, createBridgeMetrics } from '../bridge/index.ts'
import type { GatewayConfig } from './config/config.ts'
import { damagedDataDir, openDataDirDatabase } from './config/data-dir.ts'
import { checkStartup } from './config/startup-checks.ts'
import { startHttpServer, type RunningHttpServer } from './http/server.ts'
import { StoreHealth } from './log/health.ts'
import { startRetention } from './log/retention.ts'
import { GatewayStoreObserver } from './log/store-observer.ts'
import { createConfiguredStreams, tenantsOf } from './log/streams.ts'
import { watchDiskUsage } from './metrics/disk.ts'
import { createMetrics, splitStream } from './metrics/metrics.ts'
import { followRewinds, reportRewinds } from './query/log-rewinds.ts'
import { zeroBridgeSeries, zeroGatewaySeries } from './metrics/zero.ts'
import { createBroker, releaseBackpressure } from './mqtt/broker.ts'
import { CommandDispatcher, commandStreamsOf, createReceiptStreams } from './mqtt/commands.ts'
import { GuardGroup } from './mqtt/connection-guard.ts'
import { BURST_QUIET_MS, BurstCompaction, compactHeap } from './mqtt/burst-compaction.ts'
import { startListener, type RunningListener } from './mqtt/listeners.ts'
import { compileRoutes } from './mqtt/routing.ts'
import { LevelSessionPersistence } from './mqtt/sessions/persistence.ts'
import { SessionExpiry } from './mqtt/sessions/expiry.ts'
import { refuseStandbyPublishes } from './replication/read-only.ts'
import { startReplication, type Replication } from './replication/replication.ts'
import { Shutdown } from './shutdown.ts'
import { SessionDropLog } from './log/session-drops.ts'

export { checkListenerSecurity } from './config/startup-checks.ts'

const VERSION = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version

export interface Gateway {
  readonly config: GatewayConfig
  readonly store: LogStore
  readonly broker: Aedes
  readonly registry: Registry
  readonly listeners: readonly RunningListener[]
  readonly http: RunningHttpServer
  /** The uplinks to the configured upstreams (none when bridge.upstreams is empty, and on a standby). */
  readonly bridge: Bridge
  /** The replication role and its state (role none without replication). */
  readonly replication: Replication
  /** Resolves once this standby was promoted (`edgemq promote`): the caller closes it and starts it again, as primary. */
  readonly promoted: Promise<void>
  readonly healthy: boolean
  /** Stops accepting, closes clients, drains pending appends, stops the bridge, closes the store and the database. */
  close (): Promise<void>
}

export interface GatewayDeps {
  readonly logger: Logger
  readonly registry?: Registry
  /** A database to use instead of opening `<dataDir>/db` (tests inject faults through it); closed with the gateway. */
  readonly database?: LevelDatabase
}

export async function startGateway (config: GatewayConfig, deps: GatewayDeps): Promise<Gateway> {
  checkStartup(config, deps.logger)
  // No one step may take the whole budget `edgemq start` gives the shutdown (cli/start.ts exits after it).
  const shutdown = new Shutdown({ logger: deps.logger, stepTimeoutMs: config.shutdownTimeoutMs })
  try {
    return await start(config, deps, shutdown)
  } catch (err) {
    await shutdown.run()
    throw err
  }
}

async function start (config: GatewayConfig, deps: GatewayDeps, shutdown: Shutdown): Promise<Gateway> {
  const { logger } = deps
  const registry = deps.registry ?? new Registry()
  const root = deps.database ?? await openDataDirDatabase(config.dataDir) as unknown as LevelDatabase
  shutdown.add('database', () => root.close())
  if (root.status !== 'open') await root.open()
  const sessionsDb = root.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
  // Where gateways before the one session-expiry mechanism kept MQTT 5 deadlines: read once, emptied (mqtt/sessions/expiry.ts).
  const legacyExpiryDb = root.sublevel<Buffer, Buffer>('session-expiry', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase

  let promote: () => void = () => {}
  const promoted = new Promise<void>((resolve) => { promote = resolve })
  // Before the store opens: a primary journals every write of the database, from the first.
  const replication = await startReplication({
    config: config.replication, gatewayId: config.gatewayId, root, registry, logger,
    durabilitySync: config.store.durability === 'sync', dataDir: config.dataDir, now: () => systemClock.now(),
    onPromoted: () => { setImmediate(promote) },
  })
  shutdown.add('replication', () => replication.close())
  // A standby's database is the primary's copy: it writes nothing of its own into it (no streams, groups, sessions, retention, bridge).
  const standby = replication.role === 'standby'

  const health = new StoreHealth(logger)
  const observer = new GatewayStoreObserver(health, config.bridge.upstreams.map((u) => u.name))
  const store = await openLogStore({
    db: root,
    durability: config.store.durability,
    maxRecordBytes: config.store.maxRecordBytes,
    diskBudgetBytes: config.store.diskBudgetBytes,
    // The session persistence shares this database; reopening it gives both a fresh write-ahead log.
    reopen: async () => {
      await root.close()
      await root.open()
      if (sessionsDb.status !== 'open') await sessionsDb.open() // sublevels stay closed until opened again
      if (legacyExpiryDb.status !== 'open') await legacyExpiryDb.open()
    },
    logger: { warn: (fields, msg) => logger.warn(fields, msg), error: (fields, msg) => logger.error(fields, msg) },
    observer,
    follower: standby,
    ...(replication.commitGate === undefined ? {} : { commitGate: replication.commitGate }),
  }).catch(async (err: unknown) => {
    throw isStoreError(err, 'STORE_DAMAGED') || isStoreError(err, 'STORE_CORRUPT_BATCH') ? await damagedDataDir(err, config.dataDir) : err
  })
  shutdown.add('store', () => store.close())
  // A standby's snapshot can rewind a partition's log: its live readers past the new end move back to it (query/log-rewinds.ts).
  const rewinds = followRewinds(store, reportRewinds(logger, (stream) => metrics.readerRewinds.inc(splitStream(stream))))
  replication.follow(() => rewinds.refresh())
  // A primary's term begins where the log ends now (replication/terms.ts): a former primary computes the tail it alone holds from it.
  await replication.startTerm(store)
  const disk = watchDiskUsage(config.dataDir)
  shutdown.add('disk usage', async () => disk.stop())
  const sessions: { persistence?: LevelSessionPersistence } = {} // created below, after the metrics its hooks count into
  const metrics = createMetrics(registry, {
    store,
    sessionLag: () => sessions.persistence?.cursorLag() ?? [],
    diskFreeBytes: () => disk.freeBytes,
    diskSizeBytes: () => disk.sizeBytes,
    healthy: () => health.healthy,
    version: VERSION,
    gatewayId: config.gatewayId,
  })
  const guards = new GuardGroup()
  observer.attach(metrics, () => releaseBackpressure(guards, store, config.mqtt.maxPendingAppends, metrics))

  if (!standby) await createConfiguredStreams(store, config)
  zeroGatewaySeries(metrics, {
    tenants: tenantsOf(config), streams: Object.keys(config.streams), listeners: config.mqtt.listeners.map((l) => l.name),
    retentionGroups: config.bridge.upstreams.flatMap((u) => u.forward.map((f) => ({
      group: `bridge.${u.name}`, tenant: f.tenant, stream: f.stream, partitions: config.streams[f.stream]?.partitions ?? 0,
    }))),
  })
  const commandStreams = commandStreamsOf(config)
  if (!standby) await createReceiptStreams(store, commandStreams)

  // What the disk budget took from persistent sessions, logged once a second per session and partition.
  const sessionDrops = new SessionDropLog(logger)
  shutdown.add('session drop warnings', async () => { sessionDrops.flush() })
  // One group-commit writer for the log and the sessions: session writes share the log's fsyncs. A standby's clients (readers) keep
  // their sessions in memory: the replicated sessions in its database are the primary's, for after a takeover.
  // A primary's persistent sessions keep cursors into the log for routed messages instead of copies (mqtt/sessions/cursors.ts).
  const persistence = standby
    ? new LevelSessionPersistence(new MemoryLevel({ keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase)
    : new LevelSessionPersistence(sessionsDb, {
      writer: store, log: store, window: config.mqtt.sessionInflight, windowBytes: config.mqtt.sessionInflightBytes,
      maxQueuedPerSession: config.mqtt.maxQueuedMessagesPerSession,
      maxOfflineSeconds: config.mqtt.sessionExpirySeconds, now: () => systemClock.now(),
      onQueueOverflow: (clientId, topic, first) => {
        const tenant = topic.slice(0, Math.max(0, topic.indexOf('/')))
        metrics.sessionQueueDropped.inc({ tenant })
        const max = config.mqtt.maxQueuedMessagesPerSession
        if (first) logger.warn({ clientId, tenant, max }, 'a persistent session\'s queue is full: newer messages are dropped')
      },
      onExpired: (tenant) => { metrics.expiredDropped.inc({ tenant, path: 'session' }) },
      onOversized: (tenant) => { metrics.oversizedDeliveries.inc({ tenant }) },
      onCursorWriteError: (err) => logger.error({ err: (err as Error).message }, 'a session cursor could not be written; it is written again in a second'),
      onCursorDropped: (drop) => {
        metrics.sessionDropped.inc(splitStream(drop.stream), drop.count)
        sessionDrops.add(drop)
      },
      onCursorReadError: (err) => {
        logger.warn({ err: (err as Error).message }, 'reading the log for a persistent session failed; it goes on at its next ack or append')
      },
      onDamaged: (damage) => {
        metrics.sessionDamaged.inc({ entry: damage.entry })
        logger.warn({ code: 'GW_SESSION_CORRUPT', ...damage }, 'a stored session entry is damaged; the session goes on with a fallback (docs/mqtt.md)')
      },
    })
  sessions.persistence = persistence
  const { aedes: broker, appendsSettled, wills, deleteShareGroup } = createBroker({
    config, store, persistence, metrics, logger, guards, onStoreHealth: (ok, err) => health.set(ok, err),
  })
  ;(broker as unknown as NodeJS.EventEmitter).on('error', (err: Error) => logger.error({ err: err.message }, 'broker error'))
  if (standby) refuseStandbyPublishes(broker, logger)
  await broker.listen()
  shutdown.add('sessions', () => persistence.destroy())
  // Sessions whose time offline (MQTT 5 Session Expiry Interval, mqtt.sessionExpirySeconds) ran out while the gateway was down
  // end before any client connects. Not on a standby: its readers' sessions live in memory, and the replicated marks are the
  // primary's, for after a promotion.
  if (!standby) {
    const sessionExpiry = new SessionExpiry({
      persistence, broker, now: () => systemClock.now(), logger, legacy: { db: legacyExpiryDb, writer: store },
      firePendingWill: (clientId) => wills.firePending(clientId),
      onExpired: () => { metrics.sessionsExpired.inc() },
    })
    await sessionExpiry.start()
    // Registered before the listeners' step, so it runs after it: the clients it closes are marked offline (stored).
    shutdown.add('session expiry', async () => sessionExpiry.stop())
  }
  let brokerClosed: Promise<void> | undefined
  const closeBroker = (): Promise<void> => (brokerClosed ??= new Promise<void>((resolve) => broker.close(() => resolve())))
  shutdown.add('broker', closeBroker)

  const dispatcher = commandStreams.length === 0 || standby
    ? undefined
    : new CommandDispatcher({
      store, broker, route: compileRoutes(config.routes), streams: commandStreams, clock: systemClock, logger: logger.child({ component: 'commands' }),
      onReceipt: (upstream, status) => { (status === 'delivered' ? bridgeMetrics.commandsDelivered : bridgeMetrics.commandsExpired).inc({ upstream }) },
      onExpiredDropped: (tenant) => { metrics.expiredDropped.inc({ tenant, path: 'copy' }) },
    })
  // The metrics read the bridge's status, and the bridge reports to the metrics' counters.
  const bridgeHolder: { bridge?: Bridge } = {}
  const upstreams = config.bridge.upstreams.map((u) => u.name)
  const bridgeMetrics = createBridgeMetrics(registry, upstreams, async () => await bridgeHolder.bridge?.status() ?? [], systemClock)
  observer.attachBridge(bridgeMetrics)
  zeroBridgeSeries(registry, config.bridge)
  // The bridge runs on the primary only; a promoted standby's resumes from the replicated group offsets.
  const bridge = bridgeHolder.bridge = new Bridge(standby ? { ...config.bridge, upstreams: [] } : config.bridge, {
    store, gatewayId: config.gatewayId, clock: systemClock, logger: logger.child({ component: 'bridge' }),
    observer: bridgeMetrics.observer, ...(dispatcher === undefined ? {} : { commands: dispatcher }),
  })
  if (dispatcher !== undefined) {
    await dispatcher.start()
    shutdown.add('commands', () => dispatcher.stop())
  }
  await bridge.start()
  shutdown.add('bridge', () => bridge.stop())

  const http = await startHttpServer(config.http, {
    registry,
    health: () => {
      const reasons = [...health.reasons(), ...replication.healthReasons()]
      return { healthy: health.healthy && reasons.length === 0, reasons }
    },
    api: {
      store, users: config.users, tokens: config.apiTokens, logger, bridge, waitingReads: metrics.httpWaitingReads,
      sessions: { states: () => sessions.persistence?.sessionStates() ?? [] },
      shares: { deleteGroup: deleteShareGroup },
      replication: {
        status: () => replication.status(),
        replicated: () => replication.replicated(),
        promote: async () => {
          const result = await replication.promote()
          // After the answer is on its way: the restart closes the HTTP server.
          setImmediate(promote)
          return result
        },
      },
    },
    version: VERSION,
  })
  shutdown.add('http', () => http.close())

  // Once the clients are gone, the appends their publishes started (and their wills) finish before anything closes.
  shutdown.add('appends', appendsSettled)
  // Once the clients are gone, closing replication releases the commits still waiting for the standby (acks: replicated): their appends settle.
  // (The 'replication' step added before the store closes it if the start fails earlier; closing twice is a no-op.)
  shutdown.add('standby acks', () => replication.close())
  const listeners: RunningListener[] = []
  // Gives the heap back once a burst of connections is over (burst-compaction.ts); mqtt.compactAfterConnections 0 turns it off.
  const bursts = config.mqtt.compactAfterConnections === 0
    ? undefined
    : new BurstCompaction({ minConnections: config.mqtt.compactAfterConnections, quietMs: BURST_QUIET_MS, compact: compactHeap, logger })
  // Stop accepting (server.close resolves once the last connection is gone) and close the clients through aedes.
  shutdown.add('mqtt listeners', async () => {
    bursts?.close()
    const stopped = listeners.map((l) => l.close())
    await closeBroker()
    await Promise.all(stopped)
  })
  for (const l of config.mqtt.listeners) {
    listeners.push(await startListener(l, {
      broker, metrics, logger, guards, bursts,
      maxPacketBytes: config.mqtt.maxPacketBytes, maxInflight: config.mqtt.maxInflightPerClient, publishRate: config.mqtt.publishRatePerClient,
      slowSubscriberMs: config.mqtt.slowSubscriberTimeoutMs,
    }))
  }
  bursts?.compactNow('at start')

  // Retention acts on the primary's data; a standby's is the primary's, replicated.
  if (!standby) {
    const retention = startRetention(store, config.store.retentionIntervalMs, logger)
    shutdown.add('retention', async () => retention.stop())
  }

  return {
    config, store, broker, registry, listeners, http, bridge, replication, promoted,
    get healthy () { return health.healthy },
    close: () => shutdown.run(),
  }
}
