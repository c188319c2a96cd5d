/**
 * One NATS JetStream upstream: replicates the configured streams into a
 * JetStream stream. Everything but the transport is the MQTT uplink's: the
 * consumer group `bridge.<name>` that holds retention, one lane per (stream,
 * partition) read in offset order (lanes.ts), priorities, the rate limit
 * (token-bucket.ts), commits of contiguous acknowledged offsets (commits.ts),
 * dead letters (dead-letters.ts), the status and the metrics
 * (uplink-status.ts). This file is the transport: asynchronous JetStream
 * publishes with at most `maxInflight` PubAcks outstanding across all lanes.
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
import { isStoreError, type StoredRecord } from '../../store/index.ts'
import { OffsetCommits } from '../commits.ts'
import { BRIDGE_GROUP_PREFIX, type UpstreamConfig } from '../config-schema.ts'
import { DeadLetters } from '../dead-letters.ts'
import { Downlink, RECEIPT_UPSTREAM_HEADER, RECEIPTS_STREAM } from '../downlink.ts'
import { advance, createLane, LaneScheduler, rewind, skip, track, type Lane, type Pending } from '../lanes.ts'
import { TokenBucket } from '../token-bucket.ts'
import { captureTopic, RECORD_VARIABLES, type Template } from '../topic-template.ts'
import type { UplinkDeps } from '../uplink.ts'
import { backlogOf, ThroughputMeter, type UpstreamStatus } from '../uplink-status.ts'
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

const REFILL_BATCH = 32
const READ_RECORDS = 500
const READ_BYTES = 1024 * 1024
const REFUSAL_RETRY_MS = 1000
const READ_RETRY_MS = 1000
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
  readonly #link: NatsLink
  readonly #commands: NatsCommands | null
  readonly #scheduler = new LaneScheduler()
  readonly #lanes: readonly Lane[] = this.#scheduler.lanes
  readonly #commits: OffsetCommits
  readonly #deadLetters: DeadLetters
  readonly #bucket: TokenBucket | null
  readonly #throughput = new ThroughputMeter()
  readonly #subject: SubjectTemplate
  readonly #receiptSubject: SubjectTemplate
  #stopped = true
  #unlisten: (() => void) | null = null
  #commitTimer: NodeJS.Timeout | null = null
  #rateTimer: NodeJS.Timeout | null = null
  #js: JetStreamClient | null = null
  #maxPayload = Infinity
  #inflight = 0
  #pumpScheduled = false
  #forwarded = 0
  #forwardedBytes = 0
  #duplicates = 0

  /** Throws BRIDGE_NO_COMMAND_SINK, BRIDGE_TLS_FILES or BRIDGE_NATS_CREDENTIALS_FILE. */
  constructor (config: UpstreamConfig, deps: UplinkDeps) {
    this.config = config
    this.group = `${BRIDGE_GROUP_PREFIX}${config.name}`
    this.#deps = deps
    this.#subject = parseSubjectTemplate(config.nats.subject)
    this.#receiptSubject = parseSubjectTemplate(config.nats.receiptSubject)
    const downlink = new Downlink(config, deps)
    this.#commands = downlink.active ? new NatsCommands(config, deps, downlink) : null
    this.#link = new NatsLink(config, deps, {
      ready: (js, nc, stream) => this.#onReady(js, nc, stream),
      dropped: () => this.#onDropped(),
    }, () => this.#requiredSubjects())
    this.#commits = new OffsetCommits(deps.store, this.group, config.name, deps.logger, this.#lanes)
    this.#deadLetters = new DeadLetters(config.name, { ...deps, maxDeliveryAttempts: config.maxDeliveryAttempts })
    const bucket = new TokenBucket(config.maxMessagesPerSecond, config.maxBytesPerSecond)
    this.#bucket = bucket.limited ? bucket : null
  }

  /** Creates the group, the lanes and the dead-letter streams, then connects. */
  async start (): Promise<void> {
    const { store } = this.#deps
    await store.setGroup(this.group, { holdsRetention: true })
    const template = laneTemplate(this.#subject)
    const receiptTemplate = laneTemplate(this.#receiptSubject)
    const tenants = new Set<string>()
    for (const f of this.config.forward) {
      tenants.add(f.tenant)
      this.#addLanes(f.tenant, f.stream, f.priority, f.filter, template, false)
    }
    for (const tenant of new Set(this.config.commands.map((c) => c.tenant))) {
      tenants.add(tenant)
      this.#addLanes(tenant, RECEIPTS_STREAM, 9, '#', receiptTemplate, true)
    }
    await this.#deadLetters.create(tenants)
    const byPartition = new Map(this.#lanes.map((l) => [`${l.stream}\u0000${l.partition}`, l]))
    this.#unlisten = store.onAppend((event) => {
      const lane = byPartition.get(`${event.stream}\u0000${event.partition}`)
      if (lane === undefined) return
      lane.end = event.logEndOffset
      if (this.#link.ready) this.#fill(lane)
    })
    this.#stopped = false
    this.#commitTimer = setInterval(() => {
      this.#throughput.sample(this.#forwarded, this.#deps.clock.now())
      void this.#commits.commit()
    }, this.#deps.commitIntervalMs)
    this.#commitTimer.unref()
    this.#link.start()
  }

  #addLanes (tenant: string, name: string, priority: number, filter: string, template: Template<RecordVariable>, receipts: boolean): void {
    const { store } = this.#deps
    const stream = `${tenant}/${name}`
    const info = store.streamInfo(stream)
    for (let partition = 0; partition < info.partitions; partition++) {
      const p = store.partitionInfo(stream, partition)
      const committed = store.fetchOffset(this.group, stream, partition)
      const start = Math.max(committed ?? p.logStartOffset, p.logStartOffset)
      this.#scheduler.add(createLane({ tenant, name, partition, priority, filter, template, receipts }, start, committed ?? -1, p.logEndOffset))
    }
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
    if (this.#stopped) return
    this.#stopped = true
    this.#unlisten?.()
    if (this.#rateTimer !== null) clearTimeout(this.#rateTimer)
    if (this.#commitTimer !== null) clearInterval(this.#commitTimer)
    await this.#commands?.stop()
    await this.#link.stop()
    while (this.#deadLetters.appending || this.#commits.running) {
      await this.#commits.settled()
      if (this.#deadLetters.appending) await new Promise((resolve) => setTimeout(resolve, 10))
    }
    await this.#commits.commit()
    this.#report()
  }

  #onReady (js: JetStreamClient, nc: NatsConnection, _stream: StreamInfo): void {
    this.#js = js
    this.#maxPayload = nc.info?.max_payload ?? Infinity
    for (const lane of this.#lanes) lane.end = Math.max(lane.end, this.#deps.store.partitionInfo(lane.stream, lane.partition).logEndOffset)
    this.#commands?.start(nc, this.#link)
    this.#pump()
  }

  /** The link is gone: what was in flight is resent from each lane's acknowledged offset. */
  #onDropped (): void {
    this.#js = null
    this.#inflight = 0
    this.#commands?.dropped()
    for (const lane of this.#lanes) rewind(lane)
  }

  #pump (): void {
    while (this.#link.ready && this.#inflight < this.config.maxInflight) {
      const lane = this.#scheduler.next()
      if (lane === null) break
      const record = lane.buffer[lane.bufferAt] as StoredRecord
      if (!this.#wanted(lane, record)) {
        lane.bufferAt++
        skip(lane, record)
        continue
      }
      if (this.#deadLetters.refusing && this.#deadLetters.attempts(this.#dedupeId(lane, record.offset)) >= this.config.maxDeliveryAttempts) {
        lane.bufferAt++
        this.#deadLetter(lane, track(lane, record), 'refused by the upstream')
        continue
      }
      if (this.#bucket !== null && !this.#takeTokens(this.#bucket, record.payload.byteLength)) break
      lane.bufferAt++
      this.#send(lane, track(lane, record))
    }
    for (const lane of this.#lanes) {
      if (lane.bufferAt >= lane.buffer.length && !lane.reading && lane.nextRead < lane.end) this.#fill(lane)
    }
  }

  #takeTokens (bucket: TokenBucket, bytes: number): boolean {
    const waitMs = bucket.take(bytes, this.#deps.clock.now())
    if (waitMs === 0) return true
    if (this.#rateTimer === null) {
      this.#rateTimer = setTimeout(() => { this.#rateTimer = null; this.#pump() }, waitMs)
      this.#rateTimer.unref()
    }
    return false
  }

  #wanted (lane: Lane, record: StoredRecord): boolean {
    if (lane.receipts) return record.headers?.[RECEIPT_UPSTREAM_HEADER] === this.config.name
    return lane.filter === '#' || captureTopic(lane.filter, record.topic) !== null
  }

  #dedupeId (lane: Lane, offset: number): string {
    return `${this.#deps.gatewayId}/${lane.tenant}/${lane.name}/${lane.partition}/${offset}`
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
      this.#deadLetter(lane, entry, `larger than the server's max_payload (${record.payload.byteLength} > ${this.#maxPayload} bytes)`)
      return
    }
    const subject = lane.template.render({
      site: this.#deps.gatewayId, region: this.config.region, upstream: this.config.name,
      tenant: lane.tenant, stream: lane.name, partition: String(lane.partition), key: record.key, topic: record.topic,
    })
    const generation = this.#link.generation
    const epoch = lane.epoch
    this.#inflight++
    js.publish(subject, record.payload, { msgID: this.#dedupeId(lane, record.offset), headers: this.#headers(lane, record) }).then((ack) => {
      if (generation !== this.#link.generation || epoch !== lane.epoch) return
      this.#inflight--
      this.#acked(lane, entry, ack)
    }, (err: unknown) => {
      if (generation !== this.#link.generation || epoch !== lane.epoch) return
      this.#inflight--
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
    const id = this.#dedupeId(lane, record.offset)
    this.#link.recordError(`publish to ${subject} refused: ${message}`, 'BRIDGE_NATS_PUBLISH')
    if (this.#deadLetters.refused(id, record.offset, message)) {
      this.#deadLetter(lane, entry, message)
      return
    }
    const generation = this.#link.generation
    const epoch = lane.epoch
    this.#inflight++ // the retry keeps its window slot, so its lane cannot pass it
    setTimeout(() => {
      if (generation !== this.#link.generation || epoch !== lane.epoch) return
      this.#inflight--
      this.#send(lane, entry)
    }, REFUSAL_RETRY_MS).unref()
  }

  #acked (lane: Lane, entry: Pending, ack: PubAck): void {
    entry.acked = true
    const record = entry.record as StoredRecord
    if (ack.duplicate) this.#duplicates++
    this.#forwarded++
    this.#forwardedBytes += record.payload.byteLength
    lane.unreportedMessages++
    lane.unreportedBytes += record.payload.byteLength
    if (this.#deadLetters.refusing) this.#deadLetters.forget(this.#dedupeId(lane, record.offset))
    advance(lane)
    const batch = Math.min(REFILL_BATCH, Math.floor(this.config.maxInflight / 4))
    if (this.#inflight === 0 || this.config.maxInflight - this.#inflight >= batch) this.#schedulePump()
  }

  /** One pump per turn of the event loop refills the window for all the PubAcks of one socket read. */
  #schedulePump (): void {
    if (this.#pumpScheduled) return
    this.#pumpScheduled = true
    setImmediate(() => {
      this.#pumpScheduled = false
      this.#report()
      this.#pump()
    })
  }

  #report (): void {
    for (const lane of this.#lanes) {
      if (lane.unreportedMessages === 0) continue
      this.#deps.observer?.onForwarded?.(this.config.name, lane.tenant, lane.name, lane.unreportedMessages, lane.unreportedBytes)
      lane.unreportedMessages = 0
      lane.unreportedBytes = 0
    }
  }

  /** Dead-letters the record of `entry`; it holds a window slot until the append is durable, so its lane cannot pass it. */
  #deadLetter (lane: Lane, entry: Pending, reason: string): void {
    const record = entry.record as StoredRecord
    const epoch = lane.epoch
    this.#inflight++
    this.#deadLetters.append(lane, record, this.#dedupeId(lane, record.offset), reason, () => {
      if (epoch !== lane.epoch) return
      this.#inflight--
      entry.refused = true
      entry.acked = true
      advance(lane)
      this.#pump()
    }, () => {
      if (epoch !== lane.epoch) return
      this.#inflight--
      setTimeout(() => { if (epoch === lane.epoch && !this.#stopped) this.#deadLetter(lane, entry, reason) }, REFUSAL_RETRY_MS).unref()
    })
  }

  #fill (lane: Lane): void {
    if (lane.reading || lane.bufferAt < lane.buffer.length || this.#stopped) return
    const { store, logger } = this.#deps
    if (lane.nextRead >= lane.end) return
    lane.reading = true
    const epoch = lane.epoch
    store.read(lane.stream, lane.partition, lane.nextRead, { maxRecords: READ_RECORDS, maxBytes: READ_BYTES }).then((r) => {
      if (epoch !== lane.epoch) return
      lane.reading = false
      lane.buffer = r.records
      lane.bufferAt = 0
      lane.nextRead = r.nextOffset
      this.#pump()
    }, (err: unknown) => {
      if (epoch !== lane.epoch) return
      lane.reading = false
      const where = { upstream: this.config.name, stream: lane.stream, partition: lane.partition }
      if (isStoreError(err, 'STORE_OFFSET_OUT_OF_RANGE')) {
        const start = store.partitionInfo(lane.stream, lane.partition).logStartOffset
        logger.warn({ ...where, from: lane.nextRead, to: start }, 'records dropped by retention before they were forwarded')
        if (lane.pendingAt === lane.pending.length && lane.done < start) lane.done = start
        lane.nextRead = Math.max(lane.nextRead, start)
        this.#fill(lane)
        return
      }
      logger.error({ ...where, err: (err as Error).message }, 'reading the log failed; retrying')
      setTimeout(() => this.#fill(lane), READ_RETRY_MS).unref()
    })
  }

  async status (): Promise<UpstreamStatus> {
    const now = this.#deps.clock.now()
    const { backlog, partitions } = await backlogOf(this.#deps.store, this.#lanes, now)
    const stream = this.#link.stream
    return {
      name: this.config.name,
      region: this.config.region,
      url: redactServers(this.config.url),
      kind: 'nats',
      ...this.#link.status(),
      inflight: this.#inflight,
      forwardedMessages: this.#forwarded,
      forwardedBytes: this.#forwardedBytes,
      throughput: this.#throughput.perSecond(),
      deadLettered: this.#deadLetters.count,
      commandsReceived: this.#commands?.received ?? 0,
      backlog,
      partitions,
      jetstream: stream === null
        ? null
        : {
            stream: stream.config.name, duplicateWindowMs: stream.config.duplicate_window / 1_000_000, replicas: stream.config.num_replicas,
            duplicateAcks: this.#duplicates,
          },
    }
  }
}
