/**
 * Shared subscriptions: `$share/<group>/<filter>` (share-topic.ts). Each
 * message matching the filter goes to one member of the share.
 *
 * Topics routed to the log: the share is a durable consumer group of the
 * log (named as share-topic.ts says; it holds retention like the bridge's
 * groups only with mqtt.share.holdRetention, since a hold of a share nobody
 * uses keeps every record of its streams until an operator deletes the
 * group, deleteGroup). The partitions the filter can reach (replay.ts replayPartitions:
 * the streams routes send such topics to) are lanes (lane.ts) spread over
 * the connected members in join order, again whenever one joins or leaves,
 * so a partition — a device — is read by one member at a time, in offset
 * order. Each member is sent its lanes' records from the group's position,
 * filtered by the share's filter (the gateway's one matcher), at QoS
 * min(subscription, message, 1), at most
 * `mqtt.share.inflight` unacknowledged records per member (fewer when an
 * MQTT 5 member's Receive Maximum is lower [MQTT-3.3.4-9]). A record the
 * lane's owner may not read (its read ACL, checked per message as for live
 * deliveries) goes to the first member in join order that may, once the
 * lane's older records are acknowledged, and the owner goes on once it is
 * (lane.ts: one member holds a lane's records at a time, so a device's order
 * holds); a record no connected member may read is skipped, counted
 * (edgemq_mqtt_share_unreadable_total) and logged. The group commits,
 * per partition, up to the oldest record not yet acknowledged. A member that
 * leaves (DISCONNECT, a dead socket, UNSUBSCRIBE) gives its lanes to the
 * others, which get its unacknowledged records again. After every member
 * left, or after a restart (kill -9 too), the next member starts at the
 * committed offsets; a share that never committed starts at the log end, as
 * a new subscription gets only new messages. Live records wake the lanes of
 * their partition through the store's append event, never a timer.
 *
 * Records are written to the member's connection as PUBLISH frames with ids
 * from the client's own counter (as replay.ts does), not through aedes'
 * `deliverQoS`: for a persistent (clean = false) member that would store the
 * message in the member's session queue, and a reconnect would deliver it to
 * that member again while the group has already given it to another; and its
 * PUBACK would clear a queue entry. A record is delivered at most at QoS 1: a
 * member that leaves hands its records to another member, so exactly once
 * across the group cannot hold anyway (documented in docs/mqtt.md).
 *
 * Topics that no route sends to the log go live to one member in turn
 * (live-share.ts); not durable.
 *
 * MQTT 5 members (aedes' patch lets their `$share` SUBSCRIBE through) are
 * framed in MQTT 5: each record with the publisher's properties kept in its
 * headers, its place in the log and the member's Subscription Identifier
 * (publish-frames.ts recordProperties); 3.1.1 members in the same share get none.
 */
import type { Aedes, Client } from 'aedes'
import { isStoreError, type AppendEvent, type LogStore, type StoredRecord } from '../../../store/index.ts'
import { isAllowed, type Identity } from '../../access/auth.ts'
import { topicMatches } from '../../access/topics.ts'
import type { AclRule, RouteConfig } from '../../config/config.ts'
import { GatewayError } from '../../errors.ts'
import type { GatewayMetrics } from '../../metrics/metrics.ts'
import { expiredAt } from '../../../bridge/index.ts'
import { drained } from '../../drained.ts'
import { publishPacketSize, recordProperties, writePublishPacket } from '../publish-frames.ts'
import { replayPartitions, type ReplayConnection, type ReplayLogger } from '../replay.ts'
import { compileRoutes, type Router } from '../routing.ts'
import { Lane, Member } from './lane.ts'
import { LiveShare } from './live-share.ts'
import { SHARE_GROUP_LEVEL, shareGroupId, type ShareRequest } from './share-topic.ts'

/**
 * Records and payload bytes a lane reads ahead at most (one store read): a read decodes whole batches (up to 1,000
 * records), so reading only what the window had room for decoded most of each batch again and again (the share
 * drained a backlog at 0.19x the rate of $replay with 100-record windows).
 */
const CHUNK_RECORDS = 1000
const CHUNK_BYTES = 256 * 1024
const MAX_TOPIC_BYTES = 65535

export interface ShareDeps {
  readonly store: LogStore
  readonly broker: Aedes
  readonly routes: readonly RouteConfig[]
  readonly acl: readonly AclRule[]
  /** mqtt.share.inflight */
  readonly inflight: number
  /** mqtt.share.holdRetention */
  readonly holdRetention: boolean
  /** mqtt.share.maxPerTenant */
  readonly maxPerTenant: number
  readonly metrics: Pick<GatewayMetrics, 'shareMessages' | 'shareMembers' | 'shareUnreadable' | 'expiredDropped'>
  readonly logger: ReplayLogger & { error (fields: Record<string, unknown>, message: string): void }
}

/** The gateway's shared subscriptions, by store group name. */
export class SharedSubscriptions {
  readonly #deps: ShareDeps
  readonly #route: Router
  readonly #shares = new Map<string, Share>()
  /** Lanes by `<stream>\u0000<partition>`, for the append event. */
  readonly #lanes = new Map<string, Array<{ readonly lane: Lane, readonly share: Share }>>()
  /** The shares each connection is a member of. */
  readonly #byConn = new WeakMap<ReplayConnection, Set<{ readonly share: Share, readonly member: Member }>>()
  /** Deletions of share groups running, by store group name (see deleteGroup). */
  readonly #deleting = new Map<string, Promise<void>>()
  #unlisten: (() => void) | null = null

  constructor (deps: ShareDeps) {
    this.#deps = deps
    this.#route = compileRoutes(deps.routes)
  }

  /**
   * Called before the SUBACK (or, restored, the CONNACK): fixes where a new share starts, the log end as of now,
   * and writes it; the SUBACK waits for the promise, so a message acknowledged after the SUBACK reaches the share
   * even when the member joins a moment later, and after a kill -9. The promise never rejects: a failed write is
   * logged and retried by the member's join, from the same offsets. Throws GW_SHARE_LIMIT when the share would be
   * one more than mqtt.share.maxPerTenant.
   */
  prepare (tenant: string, request: ShareRequest): Promise<void> {
    const id = shareGroupId(tenant, request.group, request.filter)
    if (!this.#shares.has(id)) {
      const ids = this.#tenantShares(tenant)
      if (!ids.has(id) && ids.size >= this.#deps.maxPerTenant) {
        throw new GatewayError('GW_SHARE_LIMIT', `$share/${request.group}/${request.filter}: tenant ${tenant} has ${ids.size} shares (mqtt.share.maxPerTenant)`)
      }
    }
    // A failure is logged by the join that waits for it (and retried there).
    return this.#share(tenant, request).open().catch(() => {})
  }

  /** The store group names of the tenant's shares: those in the log (also from before a restart) and those opened since. */
  #tenantShares (tenant: string): Set<string> {
    const prefix = `${tenant}/${SHARE_GROUP_LEVEL}/`
    const ids = new Set(this.#deps.store.listGroups().map((g) => g.group).filter((g) => g.startsWith(prefix)))
    for (const id of this.#shares.keys()) if (id.startsWith(prefix)) ids.add(id)
    return ids
  }

  /** Adds the client to the share (again: only its QoS and subscription identifier change). Resolves once its lanes are assigned. */
  async join (client: Client, conn: ReplayConnection, who: Identity, request: ShareRequest, qos: number, subscriptionId?: number): Promise<void> {
    this.#unlisten ??= this.#deps.store.onAppend((e) => this.#appended(e))
    const share = this.#share(who.tenant, request)
    let members = this.#byConn.get(conn)
    if (members === undefined) {
      const set = members = new Set()
      this.#byConn.set(conn, set)
      conn.stream.once('close', () => { for (const m of set) m.share.leave(m.member); set.clear() })
    }
    for (const m of members) {
      if (m.share === share) {
        m.member.qos = qos === 0 ? 0 : 1
        m.member.subscriptionId = subscriptionId
        return
      }
    }
    const member = new Member(client, conn, who, qos === 0 ? 0 : 1, subscriptionId)
    members.add({ share, member })
    await share.join(member)
  }

  /** The client left these shares (UNSUBSCRIBE of their store group names). */
  leave (conn: ReplayConnection, ids: readonly string[]): void {
    const members = this.#byConn.get(conn)
    if (members === undefined) return
    for (const m of [...members]) {
      if (!ids.includes(m.share.id)) continue
      members.delete(m)
      m.share.leave(m.member)
    }
  }

  /** Takes a PUBACK that answers a share's record; false when the packet id is not a share's. */
  acked (conn: ReplayConnection, messageId: number): boolean {
    const members = this.#byConn.get(conn)
    if (members === undefined) return false
    for (const { share, member } of members) {
      if (share.acked(member, messageId)) return true
    }
    return false
  }

  /**
   * Deletes a share's consumer group (DELETE /v1/groups/..., `edgemq groups delete`): its offsets and its hold on
   * retention. Throws GW_SHARE_IN_USE while a client is a member; STORE_UNKNOWN_GROUP (from the store) when there is no
   * such group. A client that subscribes to the share afterwards starts it again at the log end, as a first SUBSCRIBE
   * does, also while the deletion is still being written.
   */
  async deleteGroup (id: string): Promise<void> {
    const share = this.#shares.get(id)
    if (share !== undefined) {
      if (share.members > 0) {
        throw new GatewayError('GW_SHARE_IN_USE', `the share ${share.subscription} of tenant ${share.tenant} has ${share.members} member(s): ` +
          'they unsubscribe (or disconnect) before its group can be deleted')
      }
      this.#shares.delete(id)
      for (const [key, list] of this.#lanes) {
        const kept = list.filter((l) => l.share !== share)
        if (kept.length === 0) this.#lanes.delete(key)
        else if (kept.length < list.length) this.#lanes.set(key, kept)
      }
      share.forget()
    }
    const before = this.#deleting.get(id)
    const deletion = (async () => {
      await before?.catch(() => {})
      // What the share still writes (its opening, a commit) lands before the deletion, never after it.
      await share?.settled()
      await this.#deps.store.deleteGroup(id)
    })()
    this.#deleting.set(id, deletion)
    try {
      await deletion
    } finally {
      if (this.#deleting.get(id) === deletion) this.#deleting.delete(id)
    }
  }

  /** Stops listening for appends and waits for the commits running (the gateway's shutdown). */
  async close (): Promise<void> {
    this.#unlisten?.()
    this.#unlisten = null
    for (const share of this.#shares.values()) await share.settled()
  }

  #share (tenant: string, request: ShareRequest): Share {
    const id = shareGroupId(tenant, request.group, request.filter)
    let share = this.#shares.get(id)
    if (share === undefined) {
      const created: Share = share = new Share(this.#deps, this.#route, id, tenant, request, (lane) => this.#indexLane(lane, created),
        this.#deleting.get(id))
      this.#shares.set(id, share)
    }
    return share
  }

  #indexLane (lane: Lane, share: Share): void {
    const key = `${lane.stream}\u0000${lane.partition}`
    const list = this.#lanes.get(key)
    if (list === undefined) this.#lanes.set(key, [{ lane, share }])
    else list.push({ lane, share })
  }

  #appended (e: AppendEvent): void {
    const lanes = this.#lanes.get(`${e.stream}\u0000${e.partition}`)
    if (lanes === undefined) return
    for (const { lane, share } of lanes) if (lane.owner !== null && lane.next < e.logEndOffset) share.pump(lane)
  }
}

/** One shared subscription: its members, its lanes (the log part, here) and its round robin (the live part, live-share.ts). */
class Share {
  readonly #deps: ShareDeps
  readonly #members: Member[] = []
  readonly #lanes: Lane[] = []
  #opened: Promise<void> | null = null
  #commit: Promise<void> | null = null
  #commitAgain = false
  readonly #live: LiveShare
  readonly #messages: { inc (n?: number): void }
  readonly #unreadable: { inc (n?: number): void }
  /** Topics whose unreadable records were logged (each once; the counter counts every record). */
  readonly #loggedUnreadable = new Set<string>()
  /** Lanes waiting for another member than their owner (a detour): a PUBACK, or that member leaving, may free them. */
  readonly #blocked = new Set<Lane>()
  readonly #labels: { tenant: string, group: string }

  /** The deletion of this share's group that was running when the share was made: it starts afresh, after it. */
  readonly #afterDeletion: Promise<void> | undefined

  constructor (deps: ShareDeps, route: Router, readonly id: string, readonly tenant: string, readonly request: ShareRequest,
    readonly onLane: (lane: Lane) => void, afterDeletion?: Promise<void>) {
    this.#deps = deps
    this.#afterDeletion = afterDeletion
    this.#labels = { tenant, group: id }
    this.#messages = deps.metrics.shareMessages.labels(this.#labels)
    this.#unreadable = deps.metrics.shareUnreadable.labels(this.#labels)
    // At 0 from the group's start: increase() sees the first message, and the first unreadable record.
    this.#messages.inc(0)
    this.#unreadable.inc(0)
    deps.metrics.shareMembers.set(this.#labels, 0)
    this.#live = new LiveShare({
      broker: deps.broker, acl: deps.acl, route, tenant, filter: request.filter, members: this.#members, delivered: () => this.#messages.inc(),
    })
  }

  get members (): number { return this.#members.length }

  /** `$share/<group>/<filter>`, as clients subscribe to it. */
  get subscription (): string { return `$share/${this.request.group}/${this.request.filter}` }

  /** The share's group is deleted (it has no member): its metric series go with it. */
  forget (): void {
    this.#live.stop()
    this.#deps.metrics.shareMembers.remove(this.#labels)
    this.#deps.metrics.shareMessages.remove(this.#labels)
    this.#deps.metrics.shareUnreadable.remove(this.#labels)
  }

  async join (member: Member): Promise<void> {
    this.#members.push(member)
    this.#deps.metrics.shareMembers.set(this.#labels, this.#members.length)
    this.#live.start()
    this.#deps.logger.info({ clientId: member.conn.clientId, tenant: this.tenant, share: this.id, members: this.#members.length }, 'share member joined')
    try {
      await this.open()
    } catch (err) {
      this.#deps.logger.error({ share: this.id, err: (err as Error).message }, 'opening the share\'s consumer group failed')
      return
    }
    this.#rebalance()
  }

  leave (member: Member): void {
    const i = this.#members.indexOf(member)
    if (i === -1) return
    this.#members.splice(i, 1)
    member.left = true
    this.#deps.metrics.shareMembers.set(this.#labels, this.#members.length)
    let released = 0
    const rewound: Lane[] = []
    for (const lane of this.#lanes) {
      if (lane.handoverTo === member) lane.handoverTo = null
      if (lane.owner === member) {
        released += lane.unacked
        lane.release()
      } else if (lane.unacked > 0 && lane.holder === member) {
        // It held records its owner may not read: they go again, to another member that may.
        released += lane.unacked
        lane.rewind()
        rewound.push(lane)
      }
    }
    member.inflight.clear()
    member.conn.releaseIds?.(member)
    this.#deps.logger.info({ clientId: member.conn.clientId, tenant: this.tenant, share: this.id, members: this.#members.length, released },
      'share member left')
    if (this.#members.length === 0) this.#live.stop()
    this.#rebalance()
    for (const lane of rewound) this.pump(lane)
    // A lane waiting for the member that left to have room (a detour to it) waits for nothing now (found by review).
    for (const lane of [...this.#blocked]) if (!rewound.includes(lane)) this.pump(lane)
  }

  acked (member: Member, messageId: number): boolean {
    const held = member.inflight.get(messageId)
    if (held === undefined) return false
    member.inflight.delete(messageId)
    const { lane, sent } = held
    lane.ack(sent)
    this.#scheduleCommit()
    if (lane.handoverTo !== null && lane.unacked === 0) {
      lane.assign(lane.handoverTo)
      this.pump(lane)
    }
    // The member's lanes go on once half its window is free, so a backlog is not read one record per PUBACK.
    if (member.inflight.size <= Math.floor(this.#window(member) / 2)) {
      for (const l of this.#lanes) if (l.owner === member) this.pump(l)
    }
    // Lanes waiting for another member than their owner (a record the owner may not read): this PUBACK may be theirs.
    if (this.#blocked.size > 0) for (const l of [...this.#blocked]) this.pump(l)
    return true
  }

  /** Resolves once the share's opening and commits running are written (or failed). */
  async settled (): Promise<void> {
    await this.#opened?.catch(() => {})
    await this.#commit
  }

  /** Opens the share's consumer group once (again after a failure); see #open. */
  open (): Promise<void> {
    return (this.#opened ??= this.#open())
  }

  /**
   * The lanes: every partition the filter can reach, each from the group's
   * committed offset, or from the log end as of this call when the group
   * never committed there (where a new subscription starts) — worked out
   * before the first await. The group's settings and those start offsets
   * are written together, before the SUBACK (prepare), so after a kill -9
   * the share starts where its first SUBACK said, and the group is listed
   * (edgemq groups, /v1/groups) from its first member on.
   */
  #open (): Promise<void> {
    const { store } = this.#deps
    const fresh: Lane[] = []
    if (this.#lanes.length === 0) {
      for (const { stream, partition } of replayPartitions(this.#deps.routes, this.tenant, this.request.filter, store)) {
        // After a deletion (running or not) nothing is committed, whatever the store still holds.
        const committed = this.#afterDeletion === undefined ? store.fetchOffset(this.id, stream, partition) : null
        const lane = new Lane(stream, partition, committed ?? store.partitionInfo(stream, partition).logEndOffset)
        if (committed === null) fresh.push(lane)
        this.#lanes.push(lane)
        this.onLane(lane)
      }
    } else {
      fresh.push(...this.#lanes)
    }
    return (async () => {
      await this.#afterDeletion?.catch(() => {})
      // Issued together, so LevelDB writes them in one batch of its write queue (one fsync, not one per partition).
      await Promise.all([
        store.setGroup(this.id, { holdsRetention: this.#deps.holdRetention }),
        ...fresh.map((lane) => store.commitOffset(this.id, lane.stream, lane.partition, lane.committed)),
      ])
    })().catch((err: unknown) => {
      this.#opened = null
      throw err
    })
  }

  /** Lane i goes to member i mod n (in join order); a lane moving away from a live owner waits for its acks. */
  #rebalance (): void {
    const members = this.#members
    this.#lanes.forEach((lane, i) => {
      const target = members.length === 0 ? null : members[i % members.length] as Member
      if (target === null) { lane.handoverTo = null; return }
      if (lane.owner === target) {
        // A handover asked for before is off: the owner goes on (its pump stopped while the handover waited).
        if (lane.handoverTo !== null) { lane.handoverTo = null; this.pump(lane) }
        return
      }
      if (lane.owner === null || lane.owner.gone || lane.unacked === 0) {
        if (lane.owner !== null) lane.release()
        lane.assign(target)
        this.pump(lane)
      } else {
        lane.handoverTo = target
      }
    })
  }

  /** Sends the lane's records to its owner while the owner has room and the log has more; one pump per lane at a time. */
  pump (lane: Lane): void {
    if (lane.running) { lane.again = true; return }
    lane.running = true
    void this.#pumpLane(lane).catch((err: unknown) => {
      if (isStoreError(err, 'STORE_CLOSED')) return
      this.#deps.logger.warn({ share: this.id, stream: lane.stream, partition: lane.partition, err: (err as Error).message },
        'share: reading the log failed; the lane goes on at the next append or acknowledgement')
    }).finally(() => {
      lane.running = false
      if (lane.again) { lane.again = false; this.pump(lane) }
    })
  }

  /** A member's window: mqtt.share.inflight, or the client's receive maximum if smaller (receive-maximum.ts). */
  #window (member: Member): number {
    return Math.min(this.#deps.inflight, member.conn.receiveMaximum ?? this.#deps.inflight)
  }

  async #pumpLane (lane: Lane): Promise<void> {
    const { store } = this.#deps
    for (;;) {
      lane.again = false
      this.#blocked.delete(lane)
      const owner = lane.owner
      if (owner === null || owner.gone || lane.handoverTo !== null) return
      if (lane.aheadPos === lane.ahead.length) {
        const info = store.partitionInfo(lane.stream, lane.partition)
        if (lane.next < info.logStartOffset) {
          this.#deps.logger.warn({ share: this.id, stream: lane.stream, partition: lane.partition, skipped: info.logStartOffset - lane.next },
            'share: retention deleted records before the group consumed them')
          lane.next = info.logStartOffset
        }
        if (lane.next >= info.logEndOffset) return // woken by the next append
        const epoch = lane.epoch
        const { records, nextOffset } = await store.read(lane.stream, lane.partition, lane.next, { maxRecords: CHUNK_RECORDS, maxBytes: CHUNK_BYTES })
        if (lane.epoch !== epoch) continue
        lane.ahead = records
        lane.aheadPos = 0
        lane.aheadEnd = nextOffset
        continue // the owner may have changed or filled its window meanwhile
      }
      const record = this.#front(lane, Date.now())
      if (record === null) { this.#scheduleCommit(); continue }
      const to = this.#recipient(lane, owner, record.topic)
      if (to === null) {
        this.#skipUnreadable(lane, record)
        continue
      }
      // One member holds the lane's unacknowledged records at a time: the device's order across a detour.
      if (lane.unacked > 0 && lane.holder !== to) {
        this.#blocked.add(lane)
        return // woken by the holder's PUBACKs
      }
      const inflight = this.#window(to)
      if (to.qos === 1 && to.inflight.size >= inflight) {
        if (to !== owner) this.#blocked.add(lane)
        return // woken by the PUBACKs
      }
      const stream = this.#send(lane, to, owner, to.qos === 1 ? inflight - to.inflight.size : CHUNK_RECORDS)
      this.#scheduleCommit()
      if (stream !== null) await drained(stream)
    }
  }

  /**
   * The lane's next record read ahead that is for the share, skipping (and moving `next` past) those that are not:
   * another topic, a topic too long for a PUBLISH, expired [MQTT-3.3.2-5]; null when the read-ahead is used up.
   */
  #front (lane: Lane, now: number): StoredRecord | null {
    while (lane.aheadPos < lane.ahead.length) {
      const record = lane.ahead[lane.aheadPos] as StoredRecord
      if (topicMatches(this.request.filter, record.topic) && Buffer.byteLength(record.topic) <= MAX_TOPIC_BYTES) {
        if (!expiredAt(record.headers ?? null, record.timestamp, now)) return record
        this.#deps.metrics.expiredDropped.inc({ tenant: lane.stream.slice(0, lane.stream.indexOf('/')), path: 'share' })
      }
      lane.aheadPos++
      lane.next = record.offset + 1
    }
    lane.next = lane.aheadEnd
    lane.ahead = []
    lane.aheadPos = 0
    return null
  }

  /**
   * Who gets a record of the lane: its owner when it may read the topic, else the member holding the lane's records
   * if it may, else the first member in join order that may; null when no connected member may.
   */
  #recipient (lane: Lane, owner: Member, topic: string): Member | null {
    if (this.#reads(owner, topic)) return owner
    const holder = lane.unacked > 0 ? lane.holder : null
    if (holder !== null && holder !== owner && !holder.gone && this.#reads(holder, topic)) return holder
    for (const m of this.#members) if (m !== owner && !m.gone && this.#reads(m, topic)) return m
    return null
  }

  #reads (member: Member, topic: string): boolean {
    return member.mayRead(topic, this.#mayRead(member.who))
  }

  /** A record no connected member may read: the group goes past it (counted; logged once per topic). */
  #skipUnreadable (lane: Lane, record: StoredRecord): void {
    lane.aheadPos++
    lane.next = record.offset + 1
    this.#unreadable.inc()
    if (!this.#loggedUnreadable.has(record.topic)) {
      if (this.#loggedUnreadable.size >= 1000) this.#loggedUnreadable.clear()
      this.#loggedUnreadable.add(record.topic)
      this.#deps.logger.warn({ share: this.id, stream: lane.stream, partition: lane.partition, offset: record.offset, topic: record.topic,
        members: this.#members.length }, 'share: no connected member may read the record (read ACL); skipped, the group commits past it ' +
        '(further records of this topic are only counted)')
    }
    this.#scheduleCommit()
  }

  /**
   * Sends `to` up to `room` of the lane's records read ahead, as one socket write: records the owner may read when
   * `to` is the owner, else records the owner may not read and `to` may. Stops at the first record for another
   * member; returns the stream when it must drain first.
   */
  #send (lane: Lane, to: Member, owner: Member, room: number): ReplayConnection['stream'] | null {
    const picked: Array<{ record: StoredRecord, topic: Buffer, qos: 0 | 1, properties: Buffer | undefined }> = []
    const now = Date.now()
    const mqtt5 = to.conn.mqtt5 === true
    const subscriptionIds = to.subscriptionId === undefined ? [] : [to.subscriptionId]
    let size = 0
    while (picked.length < room) {
      const record = this.#front(lane, now)
      if (record === null) break
      const ownerReads = this.#reads(owner, record.topic)
      if (to === owner ? !ownerReads : ownerReads || !this.#reads(to, record.topic)) break
      lane.aheadPos++
      lane.next = record.offset + 1
      const topic = Buffer.from(record.topic)
      const qos = Math.min(to.qos, record.qos === 0 ? 0 : 1) as 0 | 1
      // An MQTT 5 member gets the publisher's properties, the expiry left, the record's place in the log and its identifier.
      const properties = mqtt5 ? recordProperties(lane.partition, record, now, { subscriptionIds }) : undefined
      picked.push({ record, topic, qos, properties })
      size += publishPacketSize(topic, record.payload, qos, properties)
    }
    if (picked.length === 0) return null
    const out = Buffer.allocUnsafe(size)
    let at = 0
    for (const { record, topic, qos, properties } of picked) {
      const sent = lane.sent(record.offset, qos === 0, to)
      let id = 0
      if (qos === 1) {
        do id = to.conn.nextMessageId(); while (to.inflight.has(id))
        to.inflight.set(id, { lane, sent })
      }
      at = writePublishPacket(out, at, topic, record.payload, qos, id, false, properties)
    }
    this.#messages.inc(picked.length)
    const stream = to.conn.stream
    return stream.write(out) ? null : stream
  }

  /** The member's read ACL, per message as authorizeForward holds it for live deliveries. */
  #mayRead (who: Identity): (topic: string) => boolean {
    return (topic) => isAllowed(this.#deps.acl, who, 'subscribe', topic)
  }

  /** Commits each lane's `done`; one commit at a time, a request while one runs makes it go round again. */
  #scheduleCommit (): void {
    if (this.#commit !== null) { this.#commitAgain = true; return }
    this.#commit = (async () => {
      do {
        this.#commitAgain = false
        for (const lane of this.#lanes) {
          const target = lane.done
          if (target <= lane.committed) continue
          try {
            await this.#deps.store.commitOffset(this.id, lane.stream, lane.partition, target)
            lane.committed = target
          } catch (err) {
            if (isStoreError(err, 'STORE_CLOSED')) return
            this.#deps.logger.error({ share: this.id, err: (err as Error).message }, 'committing the share\'s offset failed')
            return
          }
        }
      } while (this.#commitAgain)
    })().finally(() => { this.#commit = null })
  }
}
