/**
 * Commands down from a NATS upstream: placeholder until the durable pull consumer lands.
 */
import type { NatsConnection } from '@nats-io/transport-node'
import type { UpstreamConfig } from '../config-schema.ts'
import type { Downlink } from '../downlink.ts'
import type { UplinkDeps } from '../uplink.ts'
import type { NatsLink } from './link.ts'

export class NatsCommands {
  readonly #downlink: Downlink
  constructor (_config: UpstreamConfig, _deps: UplinkDeps, downlink: Downlink) {
    this.#downlink = downlink
  }

  get received (): number { return this.#downlink.received }
  start (_nc: NatsConnection, _link: NatsLink): void {}
  dropped (): void {}
  async stop (): Promise<void> {}
}
