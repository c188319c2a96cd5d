/**
 * The bridge: one independent {@link Uplink} (MQTT) or {@link NatsUplink} (JetStream) per configured upstream. An
 * upstream that is down only stalls its own lanes; the log holds its backlog
 * (its consumer group holds retention) until it is back.
 */
import type { Clock, LogStore } from '../store/index.ts'
import { upstreamKind, type BridgeConfig } from './config-schema.ts'
import type { CommandSink } from './downlink.ts'
import { NatsUplink } from './nats/uplink.ts'
import { Uplink } from './uplink/index.ts'
import type { BridgeLogger, UplinkObserver, UpstreamStatus } from './uplink/status.ts'

export interface BridgeDeps {
  readonly store: LogStore
  readonly gatewayId: string
  readonly clock: Clock
  readonly logger: BridgeLogger
  readonly observer?: UplinkObserver
  readonly commands?: CommandSink
  readonly random?: () => number
}

export class Bridge {
  readonly #uplinks: Array<Uplink | NatsUplink>

  constructor (config: BridgeConfig, deps: BridgeDeps) {
    this.#uplinks = config.upstreams.map((u) => {
      const uplinkDeps = { ...deps, commitIntervalMs: config.commitIntervalMs }
      return upstreamKind(u) === 'nats' ? new NatsUplink(u, uplinkDeps) : new Uplink(u, uplinkDeps)
    })
  }

  async start (): Promise<void> {
    for (const u of this.#uplinks) await u.start()
  }

  async stop (): Promise<void> {
    await Promise.all(this.#uplinks.map((u) => u.stop()))
  }

  /** Every upstream's status, in config order. */
  async status (): Promise<UpstreamStatus[]> {
    return await Promise.all(this.#uplinks.map((u) => u.status()))
  }
}
