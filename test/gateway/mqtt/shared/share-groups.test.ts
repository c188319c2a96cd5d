/**
 * The log part of shared subscriptions without a broker: a store on
 * memory-level, members as fake connections whose written frames are parsed
 * back, PUBACKs handed in as aedes' hook would. Pins the rules that keep a
 * device's messages in order across members:
 * - partitions are spread over the members in join order;
 * - a partition moved by a rebalance reaches its new member only after the
 *   old one acknowledged what it holds of it;
 * - a member that leaves hands its unacknowledged records to another, which
 *   gets them again in offset order;
 * - the group commits up to the oldest unacknowledged record only;
 * - a record its partition's member may not read goes to a member that may, once the older ones are acknowledged,
 *   and again to another if that one leaves; with none left that may, it is skipped;
 * - a share's group is deleted only without members, and a share subscribed
 *   again afterwards (even while the deletion is written) starts at the log end.
 */
import type { Aedes, Client } from 'aedes'
import { MemoryLevel } from 'memory-level'
import mqttPacket, { type IPublishPacket } from 'mqtt-packet'
import { EventEmitter } from 'node:events'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import type { Identity } from '../../../../gateway/access/auth.ts'
import type { AclRule } from '../../../../gateway/config/config.ts'
import type { ReplayConnection } from '../../../../gateway/mqtt/replay.ts'
import { SharedSubscriptions } from '../../../../gateway/mqtt/shared/share-groups.ts'
import { shareGroupId } from '../../../../gateway/mqtt/shared/share-topic.ts'
import { openLogStore, type LevelDatabase, type LogStore } from '../../../../store/index.ts'

const STREAM = 'default/telemetry'
const REQUEST = { group: 'w', filter: 'devices/+/telemetry/#' } as const
const GROUP = shareGroupId('default', REQUEST.group, REQUEST.filter)

/** A member's connection: every frame written is parsed; `publishes` in arrival order. */
class FakeConnection extends EventEmitter implements ReplayConnection {
  readonly publishes: IPublishPacket[] = []
  readonly #parser: ReturnType<typeof mqttPacket.parser>
  #id = 1
  closed = false
  destroyed = false
  /** The client's Receive Maximum (MQTT 5 CONNECT), as hooks/replays.ts gives it. */
  receiveMaximum?: number
  writableNeedDrain = false
  readonly stream = this as unknown as ReplayConnection['stream']

  /** `mqtt5`: the member speaks MQTT 5, so the share frames its records with properties. */
  constructor (readonly clientId: string, readonly mqtt5 = false) {
    super()
    this.#parser = mqttPacket.parser({ protocolVersion: mqtt5 ? 5 : 4 })
    this.#parser.on('packet', (p) => { if (p.cmd === 'publish') this.publishes.push(p) })
  }

  write (chunk: Buffer): boolean {
    this.#parser.parse(chunk)
    return true
  }

  nextMessageId (): number { return this.#id++ }

  close (): void {
    this.closed = true
    this.emit('close')
  }

  payloads (): string[] { return this.publishes.map((p) => p.payload.toString()) }
}

const noop = (): void => {}
const who = (clientId: string): Identity => ({ tenant: 'default', clientId, role: 'service', username: clientId } as unknown as Identity)
const fakeClient = {} as Client

describe('SharedSubscriptions (log part)', () => {
  let store: LogStore
  let shares: SharedSubscriptions
  /** Keys that land in partition 0 and partition 1. */
  let keys: [string, string]

  beforeEach(async () => {
    store = await openLogStore({ db: new MemoryLevel({ keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase, durability: 'async' })
    await store.createStream(STREAM, { partitions: 2 })
    const found: string[] = []
    for (let i = 0; found.length < 2; i++) if (store.partitionFor(STREAM, `d${i}`) === found.length) found.push(`d${i}`)
    keys = found as [string, string]
    shares = sharesOf(false)
  })
  const sharesOf = (holdRetention: boolean, acl: readonly AclRule[] = []): SharedSubscriptions => new SharedSubscriptions({
    store, broker: { subscribe: noop, unsubscribe: noop } as unknown as Aedes,
    routes: [{ filter: 'devices/+/telemetry/#', stream: 'telemetry', keyLevel: 1 }], acl, inflight: 10, holdRetention, maxPerTenant: 100,
    metrics: { shareMessages: { labels: () => ({ inc: noop }), remove: noop }, shareUnreadable: { labels: () => ({ inc: noop }), remove: noop },
      shareMembers: { set: noop, remove: noop } } as never,
    logger: { info: noop, warn: noop, error: noop },
  })
  afterEach(async () => {
    await shares.close()
    await store.close()
  })

  const append = async (key: string, n: number, from = 0): Promise<void> => {
    for (let i = from; i < from + n; i++) {
      await store.append(STREAM, key, { payload: Buffer.from(`${key}:${i}`), topic: `devices/${key}/telemetry/t`, qos: 1 })
    }
  }
  const join = async (conn: FakeConnection, client = fakeClient, subscriptionId?: number): Promise<void> => {
    shares.prepare('default', REQUEST)
    await shares.join(client, conn, who(conn.clientId), REQUEST, 1, subscriptionId)
  }
  const ackAll = (conn: FakeConnection, from = 0, to = conn.publishes.length): void => {
    for (const p of conn.publishes.slice(from, to)) expect(shares.acked(conn, p.messageId as number)).toBe(true)
  }
  const until = async (check: () => boolean): Promise<void> => {
    for (let i = 0; i < 200 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 5))
    expect(check()).toBe(true)
  }

  it('spreads partitions over members; a moved partition waits for the old member\'s PUBACKs; the group commits only what is acknowledged', async () => {
    const a = new FakeConnection('a')
    await join(a)
    await append(keys[0], 3)
    await append(keys[1], 3)
    await until(() => a.publishes.length === 6)
    // b joins while a holds partition 1's records unacknowledged: partition 1 stays with a until a acknowledges them.
    const b = new FakeConnection('b')
    await join(b)
    // The appends woke partition 1's lane, whose pump returns at once while the handover waits (no read to wait for).
    await append(keys[1], 2, 3)
    expect(b.publishes).toHaveLength(0)
    expect(a.publishes).toHaveLength(6)
    expect(store.fetchOffset(GROUP, STREAM, 1)).toBe(0)
    ackAll(a)
    await until(() => b.payloads().length === 2)
    expect(b.payloads()).toEqual([`${keys[1]}:3`, `${keys[1]}:4`])
    await until(() => store.fetchOffset(GROUP, STREAM, 0) === 3 && store.fetchOffset(GROUP, STREAM, 1) === 3)
    ackAll(b)
    await until(() => store.fetchOffset(GROUP, STREAM, 1) === 5)
    // Without mqtt.share.holdRetention the group does not hold retention.
    expect(store.listGroups().find((g) => g.group === GROUP)?.holdsRetention).toBe(false)
  })

  it('a member that leaves hands its unacknowledged records to another, in offset order from the oldest one', async () => {
    const a = new FakeConnection('a')
    const b = new FakeConnection('b')
    await join(a)
    await join(b)
    await append(keys[1], 5)
    await until(() => b.publishes.length === 5)
    // b acknowledges the first two and the fourth, then its connection dies.
    expect(shares.acked(b, b.publishes[0]?.messageId as number)).toBe(true)
    expect(shares.acked(b, b.publishes[1]?.messageId as number)).toBe(true)
    expect(shares.acked(b, b.publishes[3]?.messageId as number)).toBe(true)
    b.close()
    await until(() => a.publishes.length === 3)
    expect(a.payloads()).toEqual([`${keys[1]}:2`, `${keys[1]}:3`, `${keys[1]}:4`])
    // A PUBACK of the dead member's id is not the share's any more.
    expect(shares.acked(b, b.publishes[2]?.messageId as number)).toBe(false)
    ackAll(a)
    await until(() => store.fetchOffset(GROUP, STREAM, 1) === 5)
  })

  it('a record the partition\'s member may not read goes to a member that may, in the device\'s order; skipped once none may', async () => {
    await shares.close()
    const deny = (username: string): AclRule => ({ username, topic: 'devices/+/telemetry/secret', access: 'subscribe', allow: false })
    shares = sharesOf(false, [deny('a'), deny('b')])
    // a and b may not read secrets and own partitions 0 and 1; c may, and owns none.
    const [a, b, c] = [new FakeConnection('a'), new FakeConnection('b'), new FakeConnection('c')]
    for (const conn of [a, b, c]) await join(conn)
    for (const kind of ['t', 'secret', 't']) {
      await store.append(STREAM, keys[1], { payload: Buffer.from(kind), topic: `devices/${keys[1]}/telemetry/${kind}`, qos: 1 })
    }
    await until(() => b.publishes.length === 1)
    // The secret waits for b's PUBACK of the older record, then goes to c; b's next record waits for c's PUBACK.
    expect(c.publishes).toHaveLength(0)
    ackAll(b)
    await until(() => c.publishes.length === 1)
    expect(c.payloads()).toEqual(['secret'])
    expect(b.publishes).toHaveLength(1)
    // c leaves without acknowledging it: no member left may read it, so it is skipped and b goes on.
    c.close()
    await until(() => b.publishes.length === 2)
    expect(b.payloads()).toEqual(['t', 't'])
    expect(a.publishes).toHaveLength(0)
    ackAll(b, 1)
    await until(() => store.fetchOffset(GROUP, STREAM, 1) === 3)
  })

  it('holds retention with mqtt.share.holdRetention', async () => {
    const holding = sharesOf(true)
    holding.prepare('default', { group: 'keep', filter: REQUEST.filter })
    const id = shareGroupId('default', 'keep', REQUEST.filter)
    await until(() => store.listGroups().find((g) => g.group === id)?.holdsRetention === true)
    await holding.close()
  })

  it('deletes a share\'s group only without members; subscribed again, even during the deletion, it starts at the log end', async () => {
    const a = new FakeConnection('a')
    await join(a)
    await append(keys[0], 3)
    await until(() => a.publishes.length === 3)
    ackAll(a)
    await until(() => store.fetchOffset(GROUP, STREAM, 0) === 3)
    await expect(shares.deleteGroup(GROUP)).rejects.toMatchObject({ code: 'GW_SHARE_IN_USE' })
    expect(store.fetchOffset(GROUP, STREAM, 0)).toBe(3)
    a.close()
    await append(keys[0], 2, 3) // records 3 and 4: not for the share once its group is gone
    // A SUBSCRIBE arrives while the deletion is being written: the new share does not resume at the old offsets.
    const deleting = shares.deleteGroup(GROUP)
    const b = new FakeConnection('b')
    const joined = join(b)
    await deleting
    await joined
    await until(() => store.fetchOffset(GROUP, STREAM, 0) === 5)
    await append(keys[0], 1, 5)
    await until(() => b.publishes.length === 1)
    expect(b.payloads()).toEqual([`${keys[0]}:5`])
    await expect(shares.deleteGroup(shareGroupId('default', 'never', REQUEST.filter))).rejects.toMatchObject({ code: 'STORE_UNKNOWN_GROUP' })
  })

  it('keeps an MQTT 5 member\'s Receive Maximum below mqtt.share.inflight, and frames its records with properties', async () => {
    const a = new FakeConnection('a', true)
    a.receiveMaximum = 3
    await join(a, fakeClient, 42)
    await append(keys[0], 8)
    // One socket write takes what the window has room for: with the share's window (10) all 8 would arrive at once.
    await until(() => a.publishes.length === 3)
    ackAll(a, 0, 1)
    expect(a.publishes).toHaveLength(3) // 2 in flight, more than half of 3: the PUBACK woke no lane
    ackAll(a, 1, 2)
    await until(() => a.publishes.length === 5)
    expect(a.payloads()).toEqual(Array.from({ length: 5 }, (_, i) => `${keys[0]}:${i}`))
    expect(a.publishes.map((p) => [p.properties?.subscriptionIdentifier, p.properties?.userProperties?.['edgemq-offset']]))
      .toEqual(Array.from({ length: 5 }, (_, i) => [42, String(i)]))
  })

  it('stops at the window: a member holds at most mqtt.share.inflight unacknowledged records, and goes on as PUBACKs free half of it', async () => {
    const a = new FakeConnection('a')
    await join(a)
    await append(keys[0], 25)
    await until(() => a.publishes.length === 10)
    ackAll(a, 0, 4)
    expect(a.publishes).toHaveLength(10) // 6 in flight, more than half the window: the PUBACKs woke no lane
    ackAll(a, 4, 5)
    await until(() => a.publishes.length === 15)
    expect(a.payloads()).toEqual(Array.from({ length: 15 }, (_, i) => `${keys[0]}:${i}`))
  })
})
