/**
 * One NATS JetStream upstream: replicates the configured streams into a
 * JetStream stream. Everything but the transport is shared with the MQTT
 * uplink (uplink/core.ts): the consumer group `bridge.<name>` that holds
 * retention, one lane per (stream, partition) read in offset order
 * (lanes.ts), priorities, the rate limit (token-bucket.ts), commits of
 * contiguous acknowledged offsets (commits.ts), dead letters
 * (dead-letters.ts), the status and the metrics (uplink/status.ts). This file
 * is the transport: asynchronous JetStream publishes with at most
 * `maxInflight` PubAcks outstanding across all lanes.
 *
 * Each record is published to the subject its lane's template renders
 * (subjects.ts) with `Nats-Msg-Id` = its dedupe id
 * `<gatewayId>/<tenant>/<stream>/<partition>/<offset>` and its fields and
 * headers as NATS headers (see RECORD_HEADERS). The stream drops a publish
 * whose id it saw within its duplicate window and answers `duplicate: true`:
 * that counts as delivered, so a resent tail (after a reconnect, a gateway
 * kill -9, a cluster fail-over) lands once.
 *
 * Failures: a PubAck error the stream means for the message (too large, a
 * stream limit, a publish permission) counts one attempt, is retried a
 * second later in its place and dead-lettered after maxDeliveryAttempts, as
 * an MQTT 5 refusal; a publish too large for the server's max_payload is
 * dead-lettered unsent. Anything else (no PubAck within ackTimeoutMs, no
 * stream answering, the connection closing) drops the link (link.ts): every
 * lane rewinds to its acknowledged offset and resends after the reconnect
 * and the stream check.
 */
import type { PubAck, JetStreamClient, StreamInfo } from '@nats-io/jetstream'
import { JetStreamApiError } from '@nats-io/jetstream'
import { headers as natsHeaders, PermissionViolationError, RequestError, type MsgHdrs, type NatsConnection } from '@nats-io/transport-node'
import type { StoredRecord } from '../../store/index.ts'
import type { UpstreamConfig } from '../config-schema.ts'
import { Downlink } from '../downlink.ts'
import { advance, rewind, type Lane, type Pending } from '../lanes.ts'
import { RECORD_VARIABLES, type Template } from '../topic-template.ts'
import { REFUSAL_RETRY_MS, UplinkCore, type UplinkDeps } from '../uplink/core.ts'
import type { UpstreamStatus } from '../uplink/status.ts'
import { NatsCommands } from './commands.ts'
import { NatsLink, redactServers } from './link.ts'
import { parseSubjectTemplate, type RecordVariable, type SubjectTemplate } from './subjects.ts'

/** Headers every published record carries, beside Nats-Msg-Id and the record's own headers. */
export const RECORD_HEADERS = {
  stream: 'Edgemq-Stream',
  partition: 'Edgemq-Partition',
  offset: 'Edgemq-Offset',
  timestamp: 'Edgemq-Timestamp',
  key: 'Edgemq-Key',
  topic: 'Edgemq-Topic',
} as const

/** A header name NATS can carry (an HTTP token); a record header with another name is left out. */
const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/
/**
 * Record headers never passed on: `Nats-*` ones steer JetStream (Nats-Msg-Id, Nats-Expected-Stream, …), and a
 * device's MQTT 5 user property must not override the dedupe id or make the stream refuse the record; nor may it
 * pose as one of the record's own fields.
 */
const RESERVED_HEADER = /^(nats-|edgemq-(stream|partition|offset|timestamp|key|topic)$)/i

/** PubAck errors that are the stream's verdict on the message, not on the link (nats-server's JSErrCodes). */
const MESSAGE_REFUSALS = new Set([
  10054, // message size exceeds maximum allowed
  10077, // store failed: maximum messages / bytes exceeded (discard new)
])

/** The subject template as a lane's template (lanes render through it). */
function laneTemplate (t: SubjectTemplate): Template<RecordVariable> {
  return { source: t.source, variables: new Set(RECORD_VARIABLES), render: (values) => t.render(values) }
}

export class NatsUplink {
  readonly config: UpstreamConfig
  readonly group: string
  readonly #deps: UplinkDeps
  readonly #core: UplinkCore
  readonly #link: NatsLink
  readonly #commands: NatsCommands | null
  readonly #lanes: readonly Lane[]
  readonly #subject: SubjectTemplate
  readonly #receiptSubject: SubjectTemplate
  #js: JetStreamClient | null = null
  #maxPayload = Infinity
  #duplicates = 0
  readonly #room = (): boolean => this.#link.ready && this.#core.inflight < this.config.maxInflight
  readonly #refusal = (lane: Lane, record: StoredRecord): string | null => this.#refused(lane, record)
  readonly #sendEntry = (lane: Lane, entry: Pending): void => this.#send(lane, entry)

  /** Throws BRIDGE_NO_COMMAND_SINK, BRIDGE_TLS_FILES or BRIDGE_NATS_CREDENTIALS_FILE. */
  constructor (config: UpstreamConfig, deps: UplinkDeps) {
    this.config = config
    this.#deps = deps
    this.#subject = parseSubjectTemplate(config.nats.subject)
    this.#receiptSubject = parseSubjectTemplate(config.nats.receiptSubject)
    const downlink = new Downlink(config, deps)
    this.#commands = downlink.active ? new NatsCommands(config, deps, downlink) : null
    this.#link = new NatsLink(config, deps, {
      ready: (js, nc, stream) => this.#onReady(js, nc, stream),
      dropped: () => this.#onDropped(),
    }, () => this.#requiredSubjects())
    this.#core = new UplinkCore(config, deps, {
      ready: () => this.#link.ready,
      pump: () => this.#pump(),
      deadLettered: () => {},
    })
    this.group = this.#core.group
    this.#lanes = this.#core.lanes
  }

  /** Creates the group, the lanes and the dead-letter streams, then connects. */
  async start (): Promise<void> {
    await this.#core.start(() => ({ record: laneTemplate(this.#subject), receipt: laneTemplate(this.#receiptSubject) }))
    this.#link.start()
  }

  /** The subject filters the stream must cover: one per lane, its fixed variables filled in. */
  #requiredSubjects (): string[] {
    const out = new Set<string>()
    for (const lane of this.#lanes) {
      const t = lane.receipts ? this.#receiptSubject : this.#subject
      out.add(t.pattern({
        site: this.#deps.gatewayId, region: this.config.region, upstream: this.config.name,
        tenant: lane.tenant, stream: lane.name, partition: String(lane.partition),
      }))
    }
    return [...out]
  }

  /** Disconnects, waits for dead-letter appends and command appends, and commits what the stream acknowledged. */
  async stop (): Promise<void> {
    await this.#core.stop(async () => {
      await this.#commands?.stop()
      await this.#link.stop()
    })
  }

  #onReady (js: JetStreamClient, nc: NatsConnection, _stream: StreamInfo): void {
    this.#js = js
    this.#maxPayload = nc.info?.max_payload ?? Infinity
    this.#core.catchUp()
    this.#commands?.start(nc, this.#link)
    this.#pump()
  }

  /** The link is gone: what was in flight is resent from each lane's acknowledged offset. */
  #onDropped (): void {
    this.#js = null
    this.#core.inflight = 0
    this.#commands?.dropped()
    for (const lane of this.#lanes) rewind(lane)
  }

  #pump (): void {
    this.#core.drain(this.#room, this.#refusal, this.#sendEntry)
    this.#core.fillEmpty()
  }

  /** 'refused by the upstream' when the stream refused the record maxDeliveryAttempts times, else null. */
  #refused (lane: Lane, record: StoredRecord): string | null {
    const refused = this.#core.deadLetters.refusing &&
      this.#core.deadLetters.attempts(this.#core.dedupeId(lane, record.offset)) >= this.config.maxDeliveryAttempts
    return refused ? 'refused by the upstream' : null
  }

  #headers (lane: Lane, record: StoredRecord): MsgHdrs {
    const h = natsHeaders()
    if (record.headers !== null) {
      for (const [k, v] of Object.entries(record.headers)) {
        if (HEADER_NAME.test(k) && !RESERVED_HEADER.test(k)) h.set(k, v.replace(/[\r\n]/g, ' '))
      }
    }
    h.set(RECORD_HEADERS.stream, lane.stream)
    h.set(RECORD_HEADERS.partition, String(lane.partition))
    h.set(RECORD_HEADERS.offset, String(record.offset))
    h.set(RECORD_HEADERS.timestamp, String(record.timestamp))
    h.set(RECORD_HEADERS.key, record.key.replace(/[\r\n]/g, ' '))
    h.set(RECORD_HEADERS.topic, record.topic.replace(/[\r\n]/g, ' '))
    return h
  }

  /** Publishes the record of `entry`; its PubAck (or error) settles it. */
  #send (lane: Lane, entry: Pending): void {
    const record = entry.record as StoredRecord
    const js = this.#js as JetStreamClient
    if (record.payload.byteLength > this.#maxPayload) {
      this.#core.deadLetter(lane, entry, `larger than the server's max_payload (${record.payload.byteLength} > ${this.#maxPayload} bytes)`)
      return
    }
    const subject = lane.template.render({
      site: this.#deps.gatewayId, region: this.config.region, upstream: this.config.name,
      tenant: lane.tenant, stream: lane.name, partition: String(lane.partition), key: record.key, topic: record.topic,
    })
    const generation = this.#link.generation
    const epoch = lane.epoch
    this.#core.inflight++
    js.publish(subject, record.payload, { msgID: this.#core.dedupeId(lane, record.offset), headers: this.#headers(lane, record) }).then((ack) => {
      if (generation !== this.#link.generation || epoch !== lane.epoch) return
      this.#core.inflight--
      this.#acked(lane, entry, ack)
    }, (err: unknown) => {
      if (generation !== this.#link.generation || epoch !== lane.epoch) return
      this.#core.inflight--
      this.#failed(lane, entry, subject, err)
    })
  }

  #failed (lane: Lane, entry: Pending, subject: string, err: unknown): void {
    const message = (err as Error).message
    const refusal = (err instanceof JetStreamApiError && MESSAGE_REFUSALS.has(err.code)) || err instanceof PermissionViolationError
    if (!refusal) {
      // The client reports "no responders" as "jetstream is not enabled"; it means no stream took the subject right now.
      const cause = (err as Error).cause
      const why = cause instanceof RequestError && cause.isNoResponders()
        ? 'no stream answered (missing, not covering the subject, or electing a leader)'
        : message
      this.#link.restart('BRIDGE_NATS_PUBLISH', `publish to ${subject} failed: ${why}`)
      return
    }
    const record = entry.record as StoredRecord
    const id = this.#core.dedupeId(lane, record.offset)
    this.#link.recordError(`publish to ${subject} refused: ${message}`, 'BRIDGE_NATS_PUBLISH')
    if (this.#core.deadLetters.refused(id, record.offset, message)) {
      this.#core.deadLetter(lane, entry, message)
      return
    }
    const generation = this.#link.generation
    const epoch = lane.epoch
    this.#core.inflight++ // the retry keeps its window slot, so its lane cannot pass it
    setTimeout(() => {
      if (generation !== this.#link.generation || epoch !== lane.epoch) return
      this.#core.inflight--
      this.#send(lane, entry)
    }, REFUSAL_RETRY_MS).unref()
  }

  #acked (lane: Lane, entry: Pending, ack: PubAck): void {
    if (ack.duplicate) this.#duplicates++
    this.#core.acked(lane, entry)
    advance(lane)
    this.#core.refill(this.config.maxInflight, false)
  }

  async status (): Promise<UpstreamStatus> {
    const status = await this.#core.status(
      () => ({ url: redactServers(this.config.url), kind: 'nats', ...this.#link.status() }),
      () => this.#commands?.received ?? 0,
    )
    const stream = this.#link.stream
    return {
      ...status,
      jetstream: stream === null
        ? null
        : {
            stream: stream.config.name, duplicateWindowMs: stream.config.duplicate_window / 1_000_000, replicas: stream.config.num_replicas,
            duplicateAcks: this.#duplicates,
          },
      natsServer: this.#link.server,
    }
  }
}
