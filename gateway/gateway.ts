/**
 * The composition root: config → LevelDB → store → session persistence →
 * aedes → listeners → HTTP server. Nothing else wires components together,
 * and nothing else reads the environment.
 */
import { statfs } from 'node:fs/promises'
import type { Aedes } from 'aedes'
import type { Logger } from 'pino'
import { Registry } from 'prom-client'
import { isStoreError, openLogStore, type LevelDatabase, type LogStore } from '../store/index.ts'
import { createBroker, isLoopback, releaseBackpressure } from './mqtt/broker.ts'
import type { GatewayConfig } from './config/config.ts'
import { GuardGroup } from './mqtt/connection-guard.ts'
import { damagedDataDir, openDataDirDatabase } from './config/data-dir.ts'
import { GatewayError } from './errors.ts'
import { startHttpServer, type RunningHttpServer } from './http/server.ts'
import { startListener, type RunningListener } from './mqtt/listeners.ts'
import { createMetrics, splitStream } from './metrics/metrics.ts'
import { zeroBridgeSeries, zeroGatewaySeries } from './metrics/zero.ts'
import { LevelSessionPersistence } from './mqtt/session-persistence.ts'
import { checkStartupSettings } from './config/startup-checks.ts'
import { readFileSync } from 'node:fs'
import { Bridge, createBridgeMetrics, RECEIPTS_STREAM, type BridgeMetrics } from '../bridge/index.ts'
import { CommandDispatcher } from './mqtt/commands.ts'
import { compileRoutes } from './mqtt/routing.ts'
import { filtersOverlap } from './access/topics.ts'
import { systemClock } from '../store/index.ts'

const VERSION = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version

export interface Gateway {
  readonly config: GatewayConfig
  readonly store: LogStore
  readonly broker: Aedes
  readonly registry: Registry
  readonly listeners: readonly RunningListener[]
  readonly http: RunningHttpServer
  /** The uplinks to the configured upstreams (none when bridge.upstreams is empty). */
  readonly bridge: Bridge
  readonly healthy: boolean
  /** Stops accepting, closes clients, finishes pending appends, closes the database. */
  close (): Promise<void>
}

export interface GatewayDeps {
  readonly logger: Logger
  readonly registry?: Registry
  /** A database to use instead of opening `<dataDir>/db` (tests inject faults through it); closed with the gateway. */
  readonly database?: LevelDatabase
}

/** Refuses configurations that would expose an open broker beyond this machine. */
export function checkListenerSecurity (config: GatewayConfig, logger: Logger): void {
  for (const l of config.mqtt.listeners) {
    if (isLoopback(l.host)) continue
    if (l.allowAnonymous) {
      logger.warn({ code: 'GW_WARN_ANONYMOUS_LISTENER', listener: l.name, host: l.host }, 'listener accepts anonymous clients from the network (allowAnonymous: true)')
    } else if (config.users.length === 0) {
      throw new GatewayError('GW_INSECURE_LISTENER',
        `listener ${l.name} binds ${l.host}, which is not loopback, and no users are configured: add users, or set mqtt.listeners[].allowAnonymous: true to accept anonymous clients on purpose`)
    }
  }
}

export async function startGateway (config: GatewayConfig, deps: GatewayDeps): Promise<Gateway> {
  const { logger } = deps
  checkListenerSecurity(config, logger)
  for (const w of checkStartupSettings(config)) logger.warn({ code: w.code, ...w.fields }, w.message)
  const registry = deps.registry ?? new Registry()
  const root = deps.database ?? await openDataDirDatabase(config.dataDir) as unknown as LevelDatabase
  if (root.status !== 'open') await root.open()
  const cleanups: Array<() => Promise<void>> = [() => root.close()]
  const undo = async (): Promise<void> => { for (const c of cleanups.reverse()) await c().catch(() => {}) }

  try {
    let healthy = true
    let lastStoreError: string | undefined
    const setHealth = (ok: boolean, err?: Error): void => {
      if (ok === healthy) return
      healthy = ok
      lastStoreError = err?.message
      if (ok) logger.info('log writes succeed again: gateway healthy')
      else logger.error({ err: err?.message }, 'log writes fail: gateway stops acknowledging until the disk recovers')
    }
    let diskFree: number | undefined
    let diskSize: number | undefined
    const sessionsDb = root.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const guards = new GuardGroup()
    // Created before the store so the observer can reach it; filled right after.
    // eslint-disable-next-line prefer-const -- assigned once the store it observes exists
    let metricsRef: ReturnType<typeof createMetrics> | undefined
    // eslint-disable-next-line prefer-const -- assigned once the bridge exists
    let bridgeMetricsRef: BridgeMetrics | undefined
    const bridgeGroups = new Map(config.bridge.upstreams.map((u) => [`bridge.${u.name}`, u.name]))
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
      },
      logger: {
        warn: (fields, msg) => logger.warn(fields, msg),
        error: (fields, msg) => logger.error(fields, msg),
      },
      observer: {
        onCommit: (stats) => {
          metricsRef?.appendLatency.observe(stats.latencyMs / 1000)
          metricsRef?.commitRecords.observe(stats.records)
          setHealth(true)
          if (metricsRef !== undefined) releaseBackpressure(guards, store, config.mqtt.maxPendingAppends, metricsRef)
        },
        // Counted when the write fails: its appends wait for the reopen, and reject only if their batch did not land.
        onWriteError: (err) => { metricsRef?.storeErrors.inc({ kind: 'write' }); setHealth(false, err) },
        onDropped: (d) => {
          metricsRef?.droppedRecords.inc({ ...splitStream(d.stream), partition: String(d.partition), group: d.group }, d.count)
          const upstream = bridgeGroups.get(d.group)
          if (upstream !== undefined) bridgeMetricsRef?.droppedBeforeForward.inc({ upstream }, d.count)
        },
      },
    }).catch(async (err: unknown) => {
      throw isStoreError(err, 'STORE_DAMAGED') || isStoreError(err, 'STORE_CORRUPT_BATCH') ? await damagedDataDir(err, config.dataDir) : err
    })
    cleanups.push(() => store.close())
    const metrics = createMetrics(registry, {
      store,
      diskFreeBytes: () => diskFree,
      diskSizeBytes: () => diskSize,
      healthy: () => healthy,
      version: VERSION,
      gatewayId: config.gatewayId,
    })
    metricsRef = metrics

    const tenants = new Set(['default', ...config.tenants])
    for (const tenant of tenants) {
      for (const [name, s] of Object.entries(config.streams)) {
        await store.createStream(`${tenant}/${name}`, s)
      }
    }
    zeroGatewaySeries(metrics, {
      tenants: [...tenants], streams: Object.keys(config.streams), listeners: config.mqtt.listeners.map((l) => l.name),
      retentionGroups: config.bridge.upstreams.flatMap((u) => u.forward.map((f) => ({
        group: `bridge.${u.name}`, tenant: f.tenant, stream: f.stream, partitions: config.streams[f.stream]?.partitions ?? 0,
      }))),
    })
    // The streams commands from upstreams may route to, per tenant with command mappings; and their receipts.
    const commandStreams = new Map<string, { tenant: string, stream: string }>()
    for (const u of config.bridge.upstreams) {
      for (const c of u.commands) {
        for (const r of config.routes) {
          if (filtersOverlap(r.filter, c.local)) commandStreams.set(`${c.tenant}/${r.stream}`, { tenant: c.tenant, stream: r.stream })
        }
      }
    }
    for (const tenant of new Set([...commandStreams.values()].map((c) => c.tenant))) {
      await store.createStream(`${tenant}/${RECEIPTS_STREAM}`, { partitions: 1 })
    }

    const persistence = new LevelSessionPersistence(sessionsDb, { durability: config.store.durability })
    const broker = createBroker({ config, store, persistence, metrics, logger, guards, onStoreHealth: setHealth })
    const brokerEvents = broker as unknown as NodeJS.EventEmitter
    brokerEvents.on('error', (err: Error) => logger.error({ err: err.message }, 'broker error'))
    await broker.listen()
    cleanups.push(() => new Promise<void>((resolve) => broker.close(() => resolve())))
    cleanups.push(() => persistence.destroy())

    const listeners: RunningListener[] = []
    for (const l of config.mqtt.listeners) {
      const running = await startListener(l, {
        broker, metrics, logger, guards,
        maxPacketBytes: config.mqtt.maxPacketBytes,
        maxInflight: config.mqtt.maxInflightPerClient,
        publishRate: config.mqtt.publishRatePerClient,
      })
      listeners.push(running)
      cleanups.push(() => running.close())
    }

    const dispatcher = commandStreams.size === 0
      ? undefined
      : new CommandDispatcher({
        store, broker, route: compileRoutes(config.routes), streams: [...commandStreams.values()], clock: systemClock,
        logger: logger.child({ component: 'commands' }),
        onReceipt: (upstream, status) => {
          (status === 'delivered' ? bridgeMetricsRef?.commandsDelivered : bridgeMetricsRef?.commandsExpired)?.inc({ upstream })
        },
        onExpiredDropped: (tenant) => { metrics.expiredDropped.inc({ tenant }) },
      })
    // The metrics read the bridge's status, and the bridge reports to the metrics' counters.
    const bridgeHolder: { bridge?: Bridge } = {}
    const bridgeMetrics = createBridgeMetrics(registry, config.bridge.upstreams.map((u) => u.name), async () => await bridgeHolder.bridge?.status() ?? [], systemClock)
    bridgeMetricsRef = bridgeMetrics
    zeroBridgeSeries(registry, config.bridge)
    const runningBridge = bridgeHolder.bridge = new Bridge(config.bridge, {
      store, gatewayId: config.gatewayId, clock: systemClock, logger: logger.child({ component: 'bridge' }),
      observer: bridgeMetrics.observer, ...(dispatcher === undefined ? {} : { commands: dispatcher }),
    })
    if (dispatcher !== undefined) {
      await dispatcher.start()
      cleanups.push(() => dispatcher.stop())
    }
    await runningBridge.start()
    cleanups.push(() => runningBridge.stop())

    const http = await startHttpServer(config.http, {
      registry,
      health: () => ({ healthy, reasons: healthy ? [] : [`log writes failing: ${lastStoreError ?? 'unknown error'}`] }),
      api: { store, users: config.users, tokens: config.apiTokens, logger, bridge: runningBridge },
      version: VERSION,
    })
    cleanups.push(() => http.close())

    const refreshDisk = (): void => {
      statfs(config.dataDir).then((s) => { diskFree = s.bavail * s.bsize; diskSize = s.blocks * s.bsize }, () => {})
    }
    refreshDisk()
    const diskTimer = setInterval(refreshDisk, 10_000).unref()
    let retaining = false // a pass slower than the interval is not started twice
    const retentionTimer = setInterval(() => {
      if (retaining) return
      retaining = true
      store.enforceRetention()
        .catch((err: unknown) => logger.error({ err: (err as Error).message }, 'retention pass failed'))
        .finally(() => { retaining = false })
    }, config.store.retentionIntervalMs).unref()

    let closing: Promise<void> | undefined
    return {
      config, store, broker, registry, listeners, http, bridge: runningBridge,
      get healthy () { return healthy },
      close () {
        closing ??= (async () => {
          clearInterval(diskTimer)
          clearInterval(retentionTimer)
          // The uplinks commit what their upstreams acknowledged; the dispatcher its command watermarks.
          await runningBridge.stop()
          await dispatcher?.stop()
          // Stop accepting (server.close resolves once the last connection is gone), close the clients through
          // aedes, let the store finish pending appends, then the HTTP server and the database.
          const stopped = listeners.map((l) => l.close())
          await new Promise<void>((resolve) => broker.close(() => resolve()))
          await Promise.all(stopped)
          // Waits for queued session writes (offline queues, retained messages) before the database closes.
          await persistence.destroy()
          await store.close()
          await http.close()
          await root.close()
        })()
        return closing
      },
    }
  } catch (err) {
    await undo()
    throw err
  }
}
