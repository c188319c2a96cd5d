/**
 * Commands down from a NATS upstream: one durable JetStream pull consumer per
 * command mapping, on the stream `nats.commandStream` (default: the
 * forwarded records' stream), filtered on the mapping's remote filter as a
 * subject (`cmd/{site}/+/#` → `cmd.plant-7.*.>`, levels escaped as in
 * subjects.ts). The consumer is created when missing, named
 * `<nats.consumer or edgemq-<gatewayId>-<name>>-<k>` for mapping k, with
 * explicit acks.
 *
 * A command is acknowledged to JetStream only once the gateway's CommandSink
 * has appended it to the local log (downlink.ts): a gateway killed before
 * that gets it again after the consumer's ack wait. A command whose append
 * fails is nak'ed and comes back after a second. Its time-to-live counts from
 * when JetStream stored it, so a command that waited out a WAN outage longer
 * than its TTL expires on arrival (and its expiry receipt goes back up like
 * any receipt: the uplink's receipt lanes publish to `nats.receiptSubject`).
 * A message no mapping covers is acknowledged and dropped, as over MQTT.
 */
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager, type ConsumerMessages, type JsMsg } from '@nats-io/jetstream'
import type { NatsConnection } from '@nats-io/transport-node'
import type { UpstreamConfig } from '../config-schema.ts'
import type { Downlink } from '../downlink.ts'
import type { UplinkDeps } from '../uplink/index.ts'
import { filterToSubject } from './config.ts'
import type { NatsLink } from './link.ts'
import { subjectToTopic } from './subjects.ts'

/** How long JetStream waits for an ack before it redelivers (a gateway killed mid-append). */
const ACK_WAIT_NS = 10_000 * 1_000_000
const NAK_DELAY_MS = 1000
const PULL_BATCH = 64

export class NatsCommands {
  readonly #config: UpstreamConfig
  readonly #deps: UplinkDeps
  readonly #downlink: Downlink
  #consumers: ConsumerMessages[] = []
  #generation = 0
  #storing = 0

  constructor (config: UpstreamConfig, deps: UplinkDeps, downlink: Downlink) {
    this.#config = config
    this.#deps = deps
    this.#downlink = downlink
  }

  get received (): number { return this.#downlink.received }

  /** The stream the commands are read from. */
  get stream (): string {
    return this.#config.nats.commandStream ?? this.#config.nats.stream.name
  }

  /** The subject filter of each mapping, in config order. */
  get subjects (): string[] {
    return this.#downlink.remoteFilters.map(filterToSubject)
  }

  /** Starts (creating if needed) the durable consumers on `nc`; a failure is logged, recorded on `link`, and the link restarted. */
  start (nc: NatsConnection, link: NatsLink): void {
    const generation = ++this.#generation
    void this.#consume(nc, generation).catch((err: unknown) => {
      if (generation !== this.#generation) return
      const message = `command consumers on stream ${this.stream}: ${(err as Error).message}`
      this.#deps.logger.error({ upstream: this.#config.name, err: message }, 'reading commands from NATS failed; reconnecting')
      link.restart('BRIDGE_NATS_STREAM_MISSING', message)
    })
  }

  async #consume (nc: NatsConnection, generation: number): Promise<void> {
    const jsm = await jetstreamManager(nc)
    const js = jetstream(nc)
    const base = this.#config.nats.consumer ?? `edgemq-${this.#deps.gatewayId}-${this.#config.name}`
    for (const [k, subject] of this.subjects.entries()) {
      const durable = `${base}-${k}`
      try {
        await jsm.consumers.info(this.stream, durable)
      } catch {
        await jsm.consumers.add(this.stream, {
          durable_name: durable, filter_subject: subject, ack_policy: AckPolicy.Explicit, deliver_policy: DeliverPolicy.All, ack_wait: ACK_WAIT_NS,
        })
      }
      if (generation !== this.#generation) return
      const consumer = await js.consumers.get(this.stream, durable)
      const messages = await consumer.consume({ max_messages: PULL_BATCH })
      if (generation !== this.#generation) { await messages.close(); return }
      this.#consumers.push(messages)
      void (async () => {
        for await (const m of messages) this.#handle(m, generation)
      })().catch(() => {}) // ends when the connection closes; the link reconnects and start() runs again
    }
  }

  #handle (m: JsMsg, generation: number): void {
    const topic = subjectToTopicOrNull(m.subject)
    const since = Math.floor(m.info.timestampNanos / 1_000_000)
    const command = topic === null ? null : this.#downlink.command(topic, m.data, since)
    if (command === null) {
      if (topic === null) this.#deps.logger.warn({ upstream: this.#config.name, subject: m.subject }, 'command subject is not an escaped topic: dropped')
      m.ack()
      return
    }
    this.#storing++
    this.#downlink.store(command).then(() => {
      // Acknowledged only once durable; an ack lost with the connection makes JetStream redeliver (at least once).
      if (generation === this.#generation) m.ack()
    }, (err: unknown) => {
      this.#deps.logger.error({ upstream: this.#config.name, topic, err: (err as Error).message }, 'command could not be stored; JetStream redelivers it')
      if (generation === this.#generation) m.nak(NAK_DELAY_MS)
    }).finally(() => { this.#storing-- })
  }

  /** The link is gone: the consumers end with it. */
  dropped (): void {
    this.#generation++
    const consumers = this.#consumers
    this.#consumers = []
    for (const c of consumers) void c.close().catch(() => {})
  }

  /** Stops reading, and waits for the appends in progress (their acks go out if the connection is still up). */
  async stop (): Promise<void> {
    for (const c of this.#consumers) await c.close().catch(() => {})
    while (this.#storing > 0) await new Promise((resolve) => setTimeout(resolve, 10))
    this.dropped()
  }
}

function subjectToTopicOrNull (subject: string): string | null {
  try {
    return subjectToTopic(subject)
  } catch {
    return null
  }
}
