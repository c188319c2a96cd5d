/**
 * Commands from an upstream down to devices: subscribes to the configured
 * remote command filters on each connection, maps each command's remote
 * topic to its local one (topic-template.ts) and hands it to the gateway's
 * CommandSink. A command is acknowledged upstream only once the sink has made
 * it durable; when that fails the connection is dropped, and the upstream's
 * persistent session redelivers the command after the reconnect.
 *
 * The receipts a device's acknowledgement produces go back up through the
 * uplink's receipt lanes (RECEIPTS_STREAM, addressed by RECEIPT_UPSTREAM_HEADER).
 * A command that came over MQTT 5 with a Response Topic (MQTT 5 4.10,
 * request/response) gets its receipt there, with the command's Correlation
 * Data, instead of at the upstream's receiptTopic (RECEIPT_RESPONSE_TOPIC_HEADER).
 * A response topic that is not a topic name (empty, a wildcard, a NUL) is
 * ignored, with a warning: the receipt goes to receiptTopic.
 */
import type { IPublishPacket, MqttClient } from 'mqtt'
import type { Clock } from '../store/index.ts'
import type { UpstreamConfig } from './config-schema.ts'
import { BridgeError } from './errors.ts'
import { parseCommandMapping, type CommandMapping } from './topic-template.ts'
import type { BridgeLogger, UplinkObserver } from './uplink/status.ts'

/** Header of a command receipt naming the upstream it goes back to. */
export const RECEIPT_UPSTREAM_HEADER = 'edgemq-upstream'
/** Stream (per tenant) that holds command receipts until the uplink has sent them. */
export const RECEIPTS_STREAM = 'command-receipts'
/** Header of a command receipt naming the remote topic it is published to instead of receiptTopic: the command's Response Topic. */
export const RECEIPT_RESPONSE_TOPIC_HEADER = 'edgemq-response-topic'

/** Why `topic` cannot be an MQTT 5 Response Topic [MQTT-3.3.2-14] (a topic name: no wildcard), or null when it can. */
export function responseTopicProblem (topic: string): string | null {
  if (topic.length === 0) return 'it is empty'
  if (topic.includes('+') || topic.includes('#')) return 'it has a wildcard'
  if (topic.includes('\u0000')) return 'it has a NUL character'
  if (Buffer.byteLength(topic) > 65535) return 'it is longer than 65535 bytes'
  return null
}

/** A command that arrived from an upstream, mapped to its local topic. */
export interface IncomingCommand {
  readonly upstream: string
  readonly tenant: string
  readonly localTopic: string
  readonly remoteTopic: string
  readonly payload: Uint8Array
  /** Epoch ms after which it must not be delivered; null: never expires. */
  readonly expiresAt: number | null
  /** MQTT 5 request/response: the remote topic its receipt goes to, with the correlation data it came with. */
  readonly response?: { readonly topic: string, readonly correlationData?: Uint8Array }
}

/** Where commands go: the gateway appends them to the log and delivers them to devices. */
export interface CommandSink {
  /** Resolves once the command is durable in the log; the uplink acknowledges it upstream only then. */
  accept (command: IncomingCommand): Promise<void>
}

/** What the downlink needs of the connection it rides on. */
export interface DownlinkConnection {
  /** Numbers the connection; a callback of an older one is ignored. */
  readonly generation: number
  /** Records an error for the upstream's status. */
  recordError (message: string): void
}

export interface DownlinkDeps {
  readonly gatewayId: string
  readonly clock: Clock
  readonly logger: BridgeLogger
  readonly observer?: UplinkObserver
  /** Required when the upstream has command mappings. */
  readonly commands?: CommandSink
}

export class Downlink {
  readonly #upstream: string
  readonly #deps: DownlinkDeps
  readonly #mappings: ReadonlyArray<{ readonly mapping: CommandMapping, readonly tenant: string, readonly ttlMs: number }>
  #received = 0

  /** Throws BRIDGE_NO_COMMAND_SINK when the upstream maps commands and `deps` has nowhere to put them. */
  constructor (config: UpstreamConfig, deps: DownlinkDeps) {
    this.#upstream = config.name
    this.#deps = deps
    const values = { site: deps.gatewayId, region: config.region, upstream: config.name }
    this.#mappings = config.commands.map((c) => ({ mapping: parseCommandMapping(c.remote, c.local, values), tenant: c.tenant, ttlMs: c.ttlMs }))
    if (this.#mappings.length > 0 && deps.commands === undefined) {
      throw new BridgeError('BRIDGE_NO_COMMAND_SINK', `upstream ${config.name} has command mappings but no command sink`)
    }
  }

  /** Whether the upstream has command mappings (a persistent session, subscriptions, a message handler). */
  get active (): boolean {
    return this.#mappings.length > 0
  }

  /** Commands received and stored. */
  get received (): number {
    return this.#received
  }

  /** Subscribes `client` to the remote command filters; a refusal is logged and recorded on `connection`. */
  subscribe (client: MqttClient, connection: DownlinkConnection): void {
    const generation = connection.generation
    const filters = this.#mappings.map((c) => c.mapping.remoteFilter)
    client.subscribe(filters, { qos: 1 }, (err, granted) => {
      if (generation !== connection.generation) return
      const refused = (granted ?? []).filter((g) => g.qos >= 0x80) // a SUBACK failure (MQTT 5 reason codes land in qos too)
      if (err != null || refused.length > 0) {
        const message = err?.message ?? `the upstream refused the subscription to ${refused.map((g) => g.topic).join(', ')}`
        connection.recordError(message)
        this.#deps.logger.error({ upstream: this.#upstream, err: message }, 'subscribing to command topics failed')
      }
    })
  }

  /**
   * The command a message on `remoteTopic` stands for, or null when no mapping covers it (the caller acknowledges
   * and drops it). Its time-to-live counts from `since` (epoch ms: when it arrived, or when the upstream stored it);
   * an MQTT 5 message expiry interval (`expirySeconds`), when shorter, wins.
   */
  command (remoteTopic: string, payload: Uint8Array, since: number, expirySeconds?: number): IncomingCommand | null {
    const match = this.#mappings.find((c) => c.mapping.toLocal(remoteTopic) !== null)
    const local = match?.mapping.toLocal(remoteTopic) ?? null
    if (match === undefined || local === null) {
      this.#deps.logger.warn({ upstream: this.#upstream, topic: remoteTopic }, 'command on a topic no mapping covers: acknowledged and dropped')
      return null
    }
    const limits = [match.ttlMs > 0 ? since + match.ttlMs : Infinity, expirySeconds !== undefined ? since + expirySeconds * 1000 : Infinity]
    const expiresAt = Math.min(...limits)
    return {
      upstream: this.#upstream, tenant: match.tenant, localTopic: local, remoteTopic, payload,
      expiresAt: Number.isFinite(expiresAt) ? expiresAt : null,
    }
  }

  /** Counts `command` and hands it to the sink; resolves once it is durable in the log. */
  async store (command: IncomingCommand): Promise<void> {
    this.#received++
    this.#deps.observer?.onCommand?.(this.#upstream)
    await (this.#deps.commands as CommandSink).accept(command)
  }

  /** Maps and stores one command; `done` acknowledges it upstream once it is durable. */
  handle (packet: IPublishPacket, client: MqttClient, done: (err?: Error) => void, connection: DownlinkConnection): void {
    const topic = packet.topic
    const payload = typeof packet.payload === 'string' ? Buffer.from(packet.payload) : packet.payload
    const mapped = this.command(topic, payload, this.#deps.clock.now(), packet.properties?.messageExpiryInterval)
    if (mapped === null) return done()
    const command = this.#withResponse(mapped, packet.properties?.responseTopic, packet.properties?.correlationData)
    const generation = connection.generation
    this.store(command).then(() => { if (generation === connection.generation) done() }, (err: unknown) => {
      // Not acknowledged: drop the connection, and the upstream's session redelivers the command after the reconnect.
      const fields = { upstream: this.#upstream, topic, err: (err as Error).message }
      this.#deps.logger.error(fields, 'command could not be stored; reconnecting so the upstream redelivers it')
      if (generation === connection.generation) client.stream.destroy()
    })
  }

  /** The command with the response topic it asked its receipt to go to, when that is a topic name. */
  #withResponse (command: IncomingCommand, topic: string | undefined, correlationData: Buffer | undefined): IncomingCommand {
    if (topic === undefined) return command
    const problem = responseTopicProblem(topic)
    if (problem !== null) {
      this.#deps.logger.warn({ upstream: this.#upstream, topic: command.remoteTopic, responseTopic: topic, reason: problem },
        'command\'s response topic ignored, its receipt goes to receiptTopic')
      return command
    }
    return { ...command, response: { topic, ...(correlationData === undefined ? {} : { correlationData }) } }
  }

  /** The remote filters of the mappings ({site}, {region}, {upstream} filled in), in config order. */
  get remoteFilters (): string[] {
    return this.#mappings.map((c) => c.mapping.remoteFilter)
  }
}
