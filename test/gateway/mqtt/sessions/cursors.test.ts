/**
 * Persistent sessions' cursors into the log (gateway/mqtt/sessions/cursors.ts),
 * through LevelSessionPersistence as the gateway builds it: a real log store
 * and the `sessions` sublevel on one classic-level database in a temp dir,
 * reopened for restarts. aedes' calls are made by hand, in its order
 * (outgoingEnqueueCombi on publish; outgoingStream after the CONNACK, which
 * hands the connection to the cursors; outgoingClearMessageId on PUBACK).
 * The cursors write their PUBLISH frames to a connection whose bytes are
 * parsed with mqtt-packet, as a client would.
 */
import { EventEmitter } from 'node:events'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ClassicLevel } from 'classic-level'
import mqttPacket, { type IPublishPacket } from 'mqtt-packet'
import { afterEach, describe, expect, it } from 'vitest'
import { openLogStore, type LevelDatabase, type LogStore } from '../../../../store/index.ts'
import { attachLogPosition, logPositionOf, type LogPosition } from '../../../../gateway/mqtt/log-position.ts'
import { LevelSessionPersistence, SessionPersistenceError, type SessionBroker, type SessionDamage, type SessionPacket, type SessionPersistenceOptions } from '../../../../gateway/mqtt/sessions/persistence.ts'
import { cbor, keys, TAG_CURSOR, TAG_OUTGOING } from '../../../../gateway/mqtt/sessions/format.ts'
import type { CursorConnection } from '../../../../gateway/mqtt/sessions/cursors.ts'
import { PROPERTY_HEADERS } from '../../../../bridge/mqtt-properties.ts'
import { RETAIN_HEADER } from '../../../../gateway/mqtt/hooks/durable-append.ts'
import { buildConfig } from '../../../../gateway/config/config.ts'

const dirs: string[] = []
const opened: Array<{ db: ClassicLevel, store: LogStore }> = []

afterEach(async () => {
  for (const { db, store } of opened.splice(0)) {
    await store.close().catch(() => {})
    await db.close().catch(() => {})
  }
  for (const dir of dirs.splice(0)) await rm(dir, { recursive: true, force: true })
})

interface Gateway {
  readonly db: ClassicLevel
  readonly store: LogStore
  readonly sessions: LevelDatabase
  readonly persistence: LevelSessionPersistence
  readonly broker: SessionBroker
  /** The connection of each connected client (see {@link connect}). */
  readonly connections: WeakMap<object, CursorConnection>
}

/** The database, log store and session persistence as gateway.ts builds them (no client connected). */
type Observers = Pick<SessionPersistenceOptions, 'onExpired' | 'onCursorReadError' | 'onCursorWriteError' | 'onCursorDropped' | 'onDamaged' | 'windowBytes'>

async function open (dir: string, window = 100, options: Observers = {}, diskBudgetBytes = 0): Promise<Gateway> {
  const db = new ClassicLevel(dir)
  await db.open()
  const store = await openLogStore({ db: db as unknown as LevelDatabase, diskBudgetBytes })
  opened.push({ db, store })
  const sessions = (db as unknown as LevelDatabase).sublevel('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
  const persistence = new LevelSessionPersistence(sessions, { writer: store, log: store, window, ...options })
  const broker: SessionBroker = { id: 'gw', counter: 0 }
  await persistence.setup(broker)
  const connections = new WeakMap<object, CursorConnection>()
  persistence.deliverCursorsThrough((client) => connections.get(client))
  return { db, store, sessions, persistence, broker, connections }
}

async function fresh (window?: number, options?: Observers, diskBudgetBytes?: number): Promise<{ dir: string, gw: Gateway }> {
  const dir = await mkdtemp(join(tmpdir(), 'edgemq-cursors-'))
  dirs.push(dir)
  const gw = await open(dir, window, options, diskBudgetBytes)
  for (const stream of ['t1/telemetry', 't2/telemetry']) await gw.store.createStream(stream, { partitions: 2 })
  return { dir, gw }
}

/** A kill -9: nothing is destroyed or flushed beyond what was awaited; the database is reopened. */
async function restart (dir: string, gw: Gateway, window?: number, options?: Observers, diskBudgetBytes?: number): Promise<Gateway> {
  await gw.store.close()
  await gw.db.close()
  return await open(dir, window, options, diskBudgetBytes)
}

let counter = 0
/** What authorizePublish does for a routed QoS 1 publish: append, then hand aedes the packet carrying its position. */
async function publish (gw: Gateway, tenant: string, device: string, body: string, qos: 0 | 1 | 2 = 1,
  headers?: Record<string, string>): Promise<SessionPacket> {
  const topic = `devices/${device}/telemetry/t`
  const stream = `${tenant}/telemetry`
  const { partition, offset } = await gw.store.append(stream, device, { payload: Buffer.from(body), topic, qos, ...(headers === undefined ? {} : { headers }) })
  const packet: SessionPacket = { cmd: 'publish', topic: `${tenant}/${topic}`, payload: Buffer.from(body), qos, retain: false, dup: false, brokerId: 'gw', brokerCounter: ++counter }
  attachLogPosition(packet, { stream, partition, offset })
  if (qos > 0) await gw.persistence.outgoingEnqueueCombi(await gw.persistence.subscriptionsByTopic(String(packet.topic)), packet)
  return packet
}

async function keysWith (gw: Gateway, tag: number): Promise<number> {
  let n = 0
  for await (const key of gw.sessions.keys({ keyEncoding: 'buffer' }) as AsyncIterable<Buffer>) if (key[0] === tag) n++
  return n
}

interface Connection {
  /** The aedes client the persistence is called with. */
  readonly client: { readonly id: string, readonly clean: boolean }
  /** PUBLISH packets received from the cursors, in order. */
  readonly got: IPublishPacket[]
  /** Copies aedes resends from the session's queue (outgoingStream). */
  copies: SessionPacket[]
  /** Packet ids received and not acknowledged, and the most there ever were. */
  readonly unacked: Set<number>
  maxUnacked: number
  ack (messageId: number): Promise<unknown>
  close (): void
}

/**
 * Connects a persistent session as aedes does after the CONNACK: reads its queue of copies (outgoingStream), which
 * hands the connection to its cursors. Received PUBLISH packets are acknowledged when `ack` says so.
 */
async function connect (gw: Gateway, clientId: string, options: {
  readonly ack?: (packet: IPublishPacket, i: number) => boolean
  readonly mqtt5?: boolean
  readonly receiveMaximum?: number
  /** Where the connection's packet id counter starts (aedes starts each client's at random). */
  readonly firstId?: number
  /** Told what the client's counter must skip (FrameConnection.holdIds). */
  readonly holdIds?: (holder: object, held: (messageId: number) => boolean) => void
  /** The connection's answer for a mounted topic (CursorConnection.deliveredTopic: its user's read ACL); default: every topic. */
  readonly deliveredTopic?: (mounted: string) => string | null
} = {}): Promise<Connection> {
  const client = { id: clientId, clean: false }
  const parser = mqttPacket.parser({ protocolVersion: options.mqtt5 === true ? 5 : 4 })
  const onClose: Array<() => void> = []
  let closed = false
  let nextId = options.firstId ?? 1
  const conn: Connection = {
    client,
    got: [],
    copies: [],
    unacked: new Set(),
    maxUnacked: 0,
    ack: async (messageId) => {
      conn.unacked.delete(messageId)
      return await gw.persistence.outgoingClearMessageId(client, { cmd: 'puback', messageId })
    },
    close: () => { closed = true; for (const f of onClose.splice(0)) f() },
  }
  parser.on('packet', (packet) => {
    if (packet.cmd !== 'publish') return
    const i = conn.got.push(packet) - 1
    conn.unacked.add(packet.messageId as number)
    conn.maxUnacked = Math.max(conn.maxUnacked, conn.unacked.size)
    if (options.ack?.(packet, i) ?? true) queueMicrotask(() => { void conn.ack(packet.messageId as number) })
  })
  gw.connections.set(client, {
    conn: {
      stream: {
        write: (chunk: Buffer) => { parser.parse(chunk); return true },
        once: (event: string, listener: () => void) => { if (event === 'close') onClose.push(listener) },
        off: () => {},
        destroyed: false,
        writableNeedDrain: false,
      } as unknown as CursorConnection['conn']['stream'],
      get closed () { return closed },
      clientId,
      mqtt5: options.mqtt5,
      nextMessageId: () => { const id = nextId; nextId = id >= 65535 ? 1 : id + 1; return id },
      holdIds: options.holdIds,
    },
    receiveMaximum: options.receiveMaximum ?? 65535,
    deliveredTopic: options.deliveredTopic ?? ((mounted) => mounted),
  })
  conn.copies = await gw.persistence.outgoingStream(client).toArray() as SessionPacket[]
  return conn
}

/** Waits until the session has nothing more to write: its window is full or it has caught up with the log. */
async function settled (gw: Gateway, conn: Connection): Promise<void> {
  await expect.poll(() => gw.persistence.cursorsSettled(conn.client)).toBe(true)
}

/** Connects, receives what the cursors send (acknowledging those `ack` says), and disconnects. */
async function drain (gw: Gateway, clientId: string, ack: (i: number) => boolean = () => true): Promise<IPublishPacket[]> {
  const conn = await connect(gw, clientId, { ack: (_p, i) => ack(i) })
  await settled(gw, conn)
  conn.close()
  return conn.got
}

/** Makes the session's first cursor write of `value` fail (ENOSPC, the disk full for a moment); `failed` once it has. */
function failCursorWriteOnce (gw: Gateway, value: number): { failed: boolean } {
  const failure = { failed: false }
  const write = gw.store.write.bind(gw.store)
  gw.store.write = async (ops, options) => {
    const cursor = ops.find((op) => op.type === 'put' && op.key[0] === TAG_CURSOR)
    if (!failure.failed && cursor?.type === 'put' && (cursor.value as Buffer).readBigUInt64BE(0) === BigInt(value)) {
      failure.failed = true
      throw new Error('ENOSPC (injected)')
    }
    return await write(ops, options)
  }
  return failure
}

/** Every batch the cursors read from now on, held weakly: what is still reachable after a full collection is kept by something. */
function batchesRead (gw: Gateway): Array<WeakRef<object>> {
  const read: Array<WeakRef<object>> = []
  const readColumns = gw.store.readColumns.bind(gw.store)
  gw.store.readColumns = async (...args) => {
    const result = await readColumns(...args)
    for (const batch of result.batches) read.push(new WeakRef(batch))
    return result
  }
  return read
}

/** How many of `read` a full collection leaves. */
async function stillHeld (read: ReadonlyArray<WeakRef<object>>): Promise<number> {
  expect(read.length).toBeGreaterThan(0)
  await new Promise((resolve) => setImmediate(resolve)) // WeakRefs made in an earlier turn may be cleared
  setFlagsFromString('--expose-gc')
  ;(runInNewContext('gc') as () => void)()
  return read.filter((batch) => batch.deref() !== undefined).length
}

const bodies = (packets: ReadonlyArray<SessionPacket | IPublishPacket>): string[] => packets.map((p) => String(p.payload))

describe('session cursors into the log', () => {
  it('keeps one cursor per partition for an offline session instead of a copy per message, and reads the records back', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 20; i++) await publish(gw, 't1', `d${i % 4}`, `m${i}`)
    expect(await keysWith(gw, TAG_OUTGOING)).toBe(0)
    expect(await keysWith(gw, TAG_CURSOR)).toBeLessThanOrEqual(2)
    expect(gw.persistence.hasSessionState({ id: 'svc' })).toBe(true)

    const got = await drain(gw, 'svc')
    expect(got).toHaveLength(20)
    expect(got.every((p) => p.qos === 1 && p.dup === false && String(p.topic).startsWith('t1/devices/'))).toBe(true)
    // per device (one partition each), in publish order
    for (let d = 0; d < 4; d++) {
      const mine = got.filter((p) => String(p.topic) === `t1/devices/d${d}/telemetry/t`).map((p) => String(p.payload))
      expect(mine).toEqual([0, 1, 2, 3, 4].map((k) => `m${k * 4 + d}`))
    }
    expect(await drain(gw, 'svc')).toEqual([]) // all acknowledged
  })

  it('delivers every payload byte for byte, whatever its length (small ones are copied four bytes at a time)', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    const lengths = [0, 1, 2, 3, 4, 5, 7, 8, 9, 99, 100, 255, 256, 257, 1000, 70_000]
    const sent = lengths.map((n) => Array.from({ length: n }, (_v, k) => String.fromCharCode(33 + ((n * 7 + k) % 90))).join(''))
    for (const body of sent) await publish(gw, 't1', 'd0', body)
    expect(bodies(await drain(gw, 'svc'))).toEqual(sent)
  })

  it('never gives a session another tenant\'s records, nor records its subscriptions do not match', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'a' }, [{ topic: 't1/devices/d1/telemetry/#', qos: 1 }])
    await gw.persistence.addSubscriptions({ id: 'b' }, [{ topic: 't2/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 12; i++) {
      await publish(gw, 't1', `d${i % 3}`, `t1-${i}`)
      await publish(gw, 't2', `d${i % 3}`, `t2-${i}`)
    }
    const a = await drain(gw, 'a')
    const b = await drain(gw, 'b')
    expect(bodies(a)).toEqual([1, 4, 7, 10].map((i) => `t1-${i}`))
    expect(a.every((p) => p.topic === 't1/devices/d1/telemetry/t')).toBe(true)
    expect(b).toHaveLength(12)
    expect(b.every((p) => String(p.topic).startsWith('t2/') && String(p.payload).startsWith('t2-'))).toBe(true)
  })

  it('redelivers from the cursor after a restart: only the unacknowledged, with DUP set', async () => {
    const { dir, gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 10; i++) await publish(gw, 't1', 'd0', `m${i}`)
    const first = await drain(gw, 'svc', (i) => i < 4)
    expect(bodies(first)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9].map((i) => `m${i}`))
    // the cursor's advance goes out in a later group commit
    const key = keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0'))
    await expect.poll(async () => (await gw.sessions.get<Buffer, Buffer>(key, { keyEncoding: 'buffer', valueEncoding: 'buffer' }))?.readBigUInt64BE(0)).toBe(4n)
    const again = await restart(dir, gw)
    const second = await drain(again, 'svc')
    expect(bodies(second)).toEqual([4, 5, 6, 7, 8, 9].map((i) => `m${i}`))
    expect(second.every((p) => p.dup === true)).toBe(true)
    // a message logged after the restart was never sent before
    await publish(again, 't1', 'd0', 'after')
    const third = await drain(again, 'svc')
    expect(third.map((p) => [String(p.payload), p.dup])).toEqual([['after', false]])
  })

  it('keeps at most `window` deliveries unacknowledged, and at most the client\'s Receive Maximum when it is lower', async () => {
    const { gw } = await fresh(3)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    await gw.persistence.addSubscriptions({ id: 'small' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 6; i++) await publish(gw, 't1', 'd0', `m${i}`)
    const conn = await connect(gw, 'svc', { ack: () => false })
    await settled(gw, conn)
    expect(bodies(conn.got)).toEqual(['m0', 'm1', 'm2'])
    await conn.ack(conn.got[0]?.messageId as number)
    await expect.poll(() => conn.got.length).toBe(4)
    expect(String(conn.got[3]?.payload)).toBe('m3')
    await settled(gw, conn)
    expect(conn.got).toHaveLength(4)
    conn.close()
    // Receive Maximum 2 (MQTT 5 CONNECT) under the window of 3: acknowledged one by one, never more than 2 outstanding
    const small = await connect(gw, 'small', { ack: () => false, receiveMaximum: 2, mqtt5: true })
    for (let n = 2; n <= 6; n++) {
      await settled(gw, small)
      expect(small.got).toHaveLength(n)
      await small.ack(small.got[n - 2]?.messageId as number)
    }
    await small.ack(small.got[5]?.messageId as number)
    await settled(gw, small)
    expect(bodies(small.got)).toEqual(['m0', 'm1', 'm2', 'm3', 'm4', 'm5'])
    expect(small.maxUnacked).toBe(2)
  })

  it('keeps at most windowBytes of PUBLISH frames unacknowledged, before the window in messages; one larger than that goes out alone', async () => {
    const { gw } = await fresh(100, { windowBytes: 3000 })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    const sent = [...Array.from({ length: 6 }, (_v, i) => `m${i}`.padEnd(1000, '.')), 'big'.padEnd(5000, '.'), 'after']
    for (const body of sent) await publish(gw, 't1', 'd0', body)
    let acking = false
    const conn = await connect(gw, 'svc', { ack: () => acking })
    await settled(gw, conn)
    // frames of about 1,030 bytes: the third crosses 3,000, and the window stops there
    expect(bodies(conn.got)).toEqual(sent.slice(0, 3))
    await conn.ack(conn.got[0]?.messageId as number)
    await expect.poll(() => conn.got.length).toBe(4)
    await settled(gw, conn)
    expect(conn.got).toHaveLength(4)
    acking = true
    for (const id of [...conn.unacked]) await conn.ack(id)
    await expect.poll(() => conn.got.length).toBe(sent.length)
    expect(bodies(conn.got)).toEqual(sent)
    expect(conn.maxUnacked).toBe(3)
    conn.close()
  })

  it('counts the stored batches its unacknowledged deliveries keep against windowBytes: a session matching one record per batch stops as they add up', async () => {
    const { gw } = await fresh(100, { windowBytes: 250_000 })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/d0/telemetry/t', qos: 1 }])
    // Six batches of about 100 KB, each with one record for the session among 99 it does not match (same partition).
    const noise = (n: number): Promise<unknown> => gw.store.append('t1/telemetry', 'd0', { payload: Buffer.alloc(1000, n), topic: 'devices/d0/telemetry/other', qos: 1 })
    let partition = 0
    for (let b = 0; b < 6; b++) {
      const [, packet] = await Promise.all([Promise.all(Array.from({ length: 50 }, (_v, n) => noise(n))), publish(gw, 't1', 'd0', `m${b}`),
        Promise.all(Array.from({ length: 49 }, (_v, n) => noise(n)))])
      partition = (logPositionOf(packet) as LogPosition).partition
    }
    const { batches } = await gw.store.readColumns('t1/telemetry', partition, 0, { maxRecords: 10_000, maxBytes: 10_000_000 })
    expect(batches.length).toBeLessThanOrEqual(12) // the appends of each round went into one or two batches
    let acking = false
    const conn = await connect(gw, 'svc', { ack: () => acking })
    await settled(gw, conn)
    // frames of about 40 bytes, batches of about 100 KB: the third crosses 250,000
    expect(bodies(conn.got)).toEqual(['m0', 'm1', 'm2'])
    acking = true
    for (const id of [...conn.unacked]) await conn.ack(id)
    await expect.poll(() => conn.got.length).toBe(6)
    expect(bodies(conn.got)).toEqual(['m0', 'm1', 'm2', 'm3', 'm4', 'm5'])
    conn.close()
  })

  it('keeps an offline session\'s unacknowledged deliveries as records of their own, not the batches they came from; the next connection gets them again', async () => {
    const { gw } = await fresh()
    const read = batchesRead(gw)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 20; i++) await publish(gw, 't1', `d${i % 4}`, `m${i}`)
    const first = await drain(gw, 'svc', () => false) // nothing acknowledged, then gone
    expect(first).toHaveLength(20)
    expect(await stillHeld(read)).toBe(0)
    const again = await connect(gw, 'svc')
    await expect.poll(() => again.got.length).toBe(20)
    expect(again.got.every((p) => p.dup)).toBe(true)
    expect(new Set(bodies(again.got))).toEqual(new Set(bodies(first)))
    again.close()
  })

  it('a client that disconnects mid-drain gets the rest on its next connection: the unacknowledged again with DUP, not the acknowledged', async () => {
    const { gw } = await fresh(4)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 10; i++) await publish(gw, 't1', 'd0', `m${i}`)
    // m0 and m2 acknowledged, m1 and m3 not: the window of 4 is full with two outstanding
    const first = await connect(gw, 'svc', { ack: (p) => ['m0', 'm2'].includes(String(p.payload)) })
    await settled(gw, first)
    expect(bodies(first.got)).toEqual(['m0', 'm1', 'm2', 'm3', 'm4', 'm5'])
    first.close()
    const second = await connect(gw, 'svc')
    await settled(gw, second)
    expect(second.got.map((p) => [String(p.payload), p.dup])).toEqual([
      ['m1', true], ['m3', true], ['m4', true], ['m5', true], ['m6', false], ['m7', false], ['m8', false], ['m9', false],
    ])
    const key = keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0'))
    await expect.poll(async () => (await gw.sessions.get<Buffer, Buffer>(key, { keyEncoding: 'buffer', valueEncoding: 'buffer' }))?.readBigUInt64BE(0)).toBe(10n)
    second.close()
    // two partitions, the second connection reading them again from where each was: nothing is skipped
    const other = ['d1', 'd2', 'd3', 'd4', 'd5'].find((d) => gw.store.partitionFor('t1/telemetry', d) !== gw.store.partitionFor('t1/telemetry', 'd0')) as string
    for (let i = 0; i < 10; i++) {
      await publish(gw, 't1', 'd0', `a${i}`)
      await publish(gw, 't1', other, `b${i}`)
    }
    const third = await connect(gw, 'svc', { ack: (_p, i) => i < 5 })
    await settled(gw, third)
    third.close()
    const fourth = await connect(gw, 'svc')
    await settled(gw, fourth)
    expect(new Set([...bodies(third.got), ...bodies(fourth.got)]).size).toBe(20)
    expect(bodies(fourth.got).filter((b) => bodies(third.got).includes(b))).toHaveLength(third.got.length - 5)
  })

  it('takes PUBACKs in any order: the cursor moves past the lowest unacknowledged only, and a new connection resends only what was not acknowledged', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 8; i++) await publish(gw, 't1', 'd0', `m${i}`)
    const first = await connect(gw, 'svc', { ack: () => false })
    await settled(gw, first)
    expect(bodies(first.got)).toEqual(['m0', 'm1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7'])
    const idOf = (body: string): number => first.got.find((p) => String(p.payload) === body)?.messageId as number
    // Backwards and in runs, all but m0 and m6.
    for (const body of ['m5', 'm7', 'm3', 'm4', 'm1', 'm2']) await first.ack(idOf(body))
    first.close()
    const second = await connect(gw, 'svc', { ack: () => false })
    await settled(gw, second)
    expect(second.got.map((p) => [String(p.payload), p.dup, p.messageId])).toEqual([['m0', true, idOf('m0')], ['m6', true, idOf('m6')]])
    await second.ack(idOf('m6'))
    await second.ack(idOf('m0'))
    const key = keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0'))
    await expect.poll(async () => (await gw.sessions.get<Buffer, Buffer>(key, { keyEncoding: 'buffer', valueEncoding: 'buffer' }))?.readBigUInt64BE(0)).toBe(8n)
    second.close()
    expect(await drain(gw, 'svc')).toEqual([])
  })

  it('sends the unacknowledged deliveries again with their packet ids and DUP on the next connection [MQTT-4.4.0-1], within its window', async () => {
    const { gw } = await fresh(6)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    const other = ['d1', 'd2', 'd3', 'd4', 'd5'].find((d) => gw.store.partitionFor('t1/telemetry', d) !== gw.store.partitionFor('t1/telemetry', 'd0')) as string
    for (let i = 0; i < 5; i++) {
      await publish(gw, 't1', 'd0', `a${i}`)
      await publish(gw, 't1', other, `b${i}`)
    }
    // six sent over two partitions, two of them acknowledged: four held, by the ids they went out with
    const first = await connect(gw, 'svc', { ack: (p) => ['a0', 'b1'].includes(String(p.payload)), firstId: 65534 })
    await settled(gw, first)
    expect(first.got).toHaveLength(8) // the window of 6 refilled after the two PUBACKs
    first.close()
    const idOf = new Map(first.got.map((p) => [String(p.payload), p.messageId as number]))
    const unacked = first.got.filter((p) => !['a0', 'b1'].includes(String(p.payload))).map((p) => String(p.payload))

    // a client with a Receive Maximum of 2 and a counter elsewhere: the six come again two at a time, with their ids
    const second = await connect(gw, 'svc', { receiveMaximum: 2, ack: () => false, firstId: 100 })
    for (let n = 2; n <= unacked.length; n += 2) {
      await settled(gw, second)
      expect(second.got).toHaveLength(n)
      for (const p of second.got.slice(n - 2)) await second.ack(p.messageId as number)
    }
    await settled(gw, second)
    const again = second.got.slice(0, unacked.length)
    expect(again.map((p) => String(p.payload)).sort()).toEqual([...unacked].sort())
    expect(again.every((p) => p.dup && p.messageId === idOf.get(String(p.payload)))).toBe(true)
    // per partition in order; what follows takes new ids, none of the held ones
    expect(bodies(second.got).filter((b) => b.startsWith('a'))).toEqual(['a1', 'a2', 'a3', 'a4'])
    expect(bodies(second.got).filter((b) => b.startsWith('b'))).toEqual(['b0', 'b2', 'b3', 'b4'])
    expect(second.got).toHaveLength(8)
    expect(second.got.slice(unacked.length).every((p) => !p.dup && p.messageId as number >= 100)).toBe(true)
  })

  it('makes a new connection\'s packet id counter skip the held ids before it reads the cursors (aedes may deliver first)', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 3; i++) await publish(gw, 't1', 'd0', `m${i}`)
    const first = await connect(gw, 'svc', { ack: () => false, firstId: 7 })
    await settled(gw, first)
    first.close()
    // a retained QoS 1 message of a SUBSCRIBE that came with the CONNECT: aedes asks authorizeForward before the
    // session's queue is read (outgoingStream), then takes an id from the new connection's counter
    const client = { id: 'svc', clean: false }
    let skips: ((id: number) => boolean) | undefined
    const before = gw.connections.get(first.client) as CursorConnection
    gw.connections.set(client, { ...before, conn: { ...before.conn, holdIds: (_holder, held) => { skips = held } } })
    expect(gw.persistence.forwardLive(client, { topic: 't1/retained', qos: 1, payload: Buffer.from('r') })).toBe(true)
    expect([6, 7, 8, 9, 10].map((id) => skips?.(id))).toEqual([false, true, true, true, false])
  })

  it('ignores a PUBACK for an unknown packet id, a repeated one, and one from a connection that has gone: nothing advances', async () => {
    const { gw } = await fresh()
    await gw.persistence.markSession({ id: 'svc' })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 3; i++) await publish(gw, 't1', 'd0', `m${i}`)
    const old = await connect(gw, 'svc', { ack: () => false })
    await settled(gw, old)
    old.close()
    const conn = await connect(gw, 'svc', { ack: () => false })
    await settled(gw, conn)
    expect(conn.got).toHaveLength(3)
    const ids = conn.got.map((p) => p.messageId as number)
    const cursor = (): number | undefined => gw.persistence.sessionStates().find((s) => s.clientId === 'svc')?.cursors[0]?.next
    // unknown id, an id of the old connection sent from it, a PUBLISH aedes clears with one of the ids: not the cursors'
    expect(await gw.persistence.outgoingClearMessageId(conn.client, { cmd: 'puback', messageId: 999 })).toBeUndefined()
    await gw.persistence.outgoingClearMessageId(old.client, { cmd: 'puback', messageId: ids[0] })
    await gw.persistence.outgoingClearMessageId(conn.client, { cmd: 'publish', messageId: ids[0], topic: 't1/x', qos: 1 })
    await settled(gw, conn)
    expect(cursor()).toBe(0)
    expect(conn.got).toHaveLength(3)
    // the real PUBACK of m0 advances, its repeat does not move anything further
    await conn.ack(ids[0] as number)
    await conn.ack(ids[0] as number)
    await expect.poll(cursor).toBe(1)
    await settled(gw, conn)
    expect(cursor()).toBe(1)
    expect(conn.got).toHaveLength(3)
    expect(gw.persistence.cursorLag()).toEqual([{ stream: 't1/telemetry', sessions: 1, lagMessages: 2 }])
  })

  it('reads a connected session\'s new records from the log as they are appended, and holds back aedes\' live copies', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 5; i++) await publish(gw, 't1', 'd0', `m${i}`)
    const conn = await connect(gw, 'svc')
    await settled(gw, conn)
    for (let i = 5; i < 10; i++) {
      const live = await publish(gw, 't1', 'd0', `m${i}`)
      expect(gw.persistence.forwardLive(conn.client, { ...live, topic: String(live.topic), qos: 1 })).toBe(false)
    }
    // a QoS 0 copy, and one of a topic no route logs, go out live through aedes
    expect(gw.persistence.forwardLive(conn.client, { topic: 't1/devices/d0/telemetry/t', qos: 0, payload: Buffer.from('x') })).toBe(true)
    await expect.poll(() => conn.got.length).toBe(10)
    expect(bodies(conn.got)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9].map((i) => `m${i}`))
    // a session with no cursor yet when it connected reads the partition its first logged message creates
    await gw.persistence.addSubscriptions({ id: 'late' }, [{ topic: 't2/devices/+/telemetry/#', qos: 1 }])
    const late = await connect(gw, 'late')
    await publish(gw, 't2', 'd1', 'first')
    await expect.poll(() => bodies(late.got)).toEqual(['first'])
  })

  it('gives an MQTT 5 client the message\'s properties, the time left of its expiry and its subscription identifiers; skips the expired', async () => {
    const expired: string[] = []
    const { gw } = await fresh(undefined, { onExpired: (tenant) => { expired.push(tenant) } })
    const { store, persistence } = gw
    await persistence.addSubscriptions({ id: 'v5' }, [
      { topic: 't1/devices/+/telemetry/#', qos: 1, subscriptionIdentifier: 7 }, { topic: 't1/devices/d0/#', qos: 1, subscriptionIdentifier: 300 },
    ])
    const now = Date.now()
    await publish(gw, 't1', 'd0', 'props', 1, {
      [PROPERTY_HEADERS.contentType]: 'text/plain', [PROPERTY_HEADERS.userProperties]: JSON.stringify({ site: 'a' }),
      [PROPERTY_HEADERS.messageExpiry]: '3600',
    })
    // published with a 1 s expiry, logged 10 s ago: expired on delivery
    const { partition, offset } = await store.append('t1/telemetry', 'd0', {
      payload: Buffer.from('old'), topic: 'devices/d0/telemetry/t', qos: 1, timestamp: now - 10_000, headers: { [PROPERTY_HEADERS.messageExpiry]: '1' },
    })
    const oldPacket: SessionPacket = { cmd: 'publish', topic: 't1/devices/d0/telemetry/t', payload: Buffer.from('old'), qos: 1, brokerId: 'gw', brokerCounter: 1000 }
    attachLogPosition(oldPacket, { stream: 't1/telemetry', partition, offset })
    await persistence.outgoingEnqueueCombi(await persistence.subscriptionsByTopic('t1/devices/d0/telemetry/t'), oldPacket)
    await publish(gw, 't1', 'd0', 'plain')
    const conn = await connect(gw, 'v5', { mqtt5: true })
    await settled(gw, conn)
    expect(bodies(conn.got)).toEqual(['props', 'plain'])
    const [props, plain] = conn.got as [IPublishPacket, IPublishPacket]
    expect(props.properties).toMatchObject({ contentType: 'text/plain', userProperties: { site: 'a' }, subscriptionIdentifier: [7, 300] })
    expect(props.properties?.messageExpiryInterval).toBeGreaterThan(3500)
    expect(props.properties?.messageExpiryInterval).toBeLessThanOrEqual(3600)
    expect(plain.properties).toMatchObject({ subscriptionIdentifier: [7, 300] })
    expect(plain.properties?.userProperties).toBeUndefined() // no location user properties: these are not replays
    expect(expired).toEqual(['t1'])
  })

  it('sets RETAIN on a delivery only for an MQTT 5 subscription with Retain As Published, as the message was published', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'rap' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1, rh: 0, rap: true, nl: false }])
    await gw.persistence.addSubscriptions({ id: 'plain' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1, rh: 0, rap: false, nl: false }])
    await gw.persistence.addSubscriptions({ id: 'v311' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    await publish(gw, 't1', 'd0', 'kept', 1, { [RETAIN_HEADER]: '1' })
    await publish(gw, 't1', 'd0', 'live', 1)
    const flags = async (clientId: string, mqtt5: boolean): Promise<Array<[string, boolean]>> => {
      const conn = await connect(gw, clientId, { mqtt5 })
      await settled(gw, conn)
      conn.close()
      return conn.got.map((p) => [String(p.payload), p.retain])
    }
    expect(await flags('rap', true)).toEqual([['kept', true], ['live', false]])
    expect(await flags('plain', true)).toEqual([['kept', false], ['live', false]]) // [MQTT-3.3.1-12]
    expect(await flags('v311', false)).toEqual([['kept', false], ['live', false]]) // [MQTT-3.3.1-9]
  })

  it('does not send a client its own messages on a subscription with No Local (MQTT 5), as aedes\' live path does not', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'dev' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1, nl: true }])
    await gw.persistence.addSubscriptions({ id: 'both' }, [
      { topic: 't1/devices/+/telemetry/#', qos: 1, nl: true }, { topic: 't1/devices/d0/#', qos: 1 },
    ])
    for (const [from, body] of [['dev', 'mine'], ['other', 'theirs'], ['both', 'own']] as const) {
      const { partition, offset } = await gw.store.append('t1/telemetry', 'd0', { payload: Buffer.from(body), topic: 'devices/d0/telemetry/t', qos: 1, clientId: from })
      const packet: SessionPacket = { cmd: 'publish', topic: 't1/devices/d0/telemetry/t', payload: Buffer.from(body), qos: 1, brokerId: 'gw', brokerCounter: ++counter }
      attachLogPosition(packet, { stream: 't1/telemetry', partition, offset })
      await gw.persistence.outgoingEnqueueCombi(await gw.persistence.subscriptionsByTopic(String(packet.topic)), packet)
    }
    expect(bodies(await drain(gw, 'dev'))).toEqual(['theirs', 'own'])
    // a second subscription without No Local matches too: its own message comes through that one
    expect(bodies(await drain(gw, 'both'))).toEqual(['mine', 'theirs', 'own'])
  })

  it('moves aedes off a packet id a cursor delivery holds (aedes takes its ids from the same counter)', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 2 }])
    await publish(gw, 't1', 'd0', 'one')
    const copy = await publish(gw, 't1', 'd0', 'two', 2) // a QoS 2 copy aedes delivers itself
    const conn = await connect(gw, 'svc', { ack: () => false })
    await settled(gw, conn)
    const held = conn.got[0]?.messageId as number
    const packet: SessionPacket = { ...copy, messageId: held }
    await gw.persistence.outgoingUpdate(conn.client, packet)
    expect(packet.messageId).not.toBe(held)
    // and the copy is known by the id it goes out with
    expect(await gw.persistence.outgoingClearMessageId(conn.client, { cmd: 'pubcomp', messageId: packet.messageId })).toMatchObject({ payload: Buffer.from('two') })
  })

  it('queues QoS 2 deliveries and unrouted messages as copies', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'q2' }, [{ topic: 't1/devices/+/telemetry/#', qos: 2 }])
    await publish(gw, 't1', 'd0', 'two', 2)
    await publish(gw, 't1', 'd0', 'one', 1)
    // a QoS 2 publish to a QoS 2 subscription is a copy; QoS 1 to it is a cursor
    expect(await keysWith(gw, TAG_OUTGOING)).toBe(1)
    const conn = await connect(gw, 'q2')
    await settled(gw, conn)
    // the copy goes out through aedes (outgoingStream), the logged QoS 1 record from the cursor
    expect(conn.copies.map((p) => [String(p.payload), p.qos])).toEqual([['two', 2]])
    expect(conn.got.map((p) => [String(p.payload), p.qos])).toEqual([['one', 1]])
  })

  it('drops a clean session\'s cursors', async () => {
    const { dir, gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    await publish(gw, 't1', 'd0', 'm0')
    await gw.persistence.cleanSubscriptions({ id: 'svc' })
    expect(await keysWith(gw, TAG_CURSOR)).toBe(0)
    const again = await restart(dir, gw)
    expect(again.persistence.hasSessionState({ id: 'svc' })).toBe(false)
  })

  it('refuses a window, in messages or bytes, that is not a positive integer', () => {
    const db = new ClassicLevel(join(tmpdir(), 'never-opened'))
    for (const window of [0, -1, 1.5, Number.NaN]) {
      for (const options of [{ window }, { windowBytes: window }]) {
        const err = (() => { try { new LevelSessionPersistence(db as unknown as LevelDatabase, options); return null } catch (e) { return e } })()
        expect(err).toBeInstanceOf(SessionPersistenceError)
        expect((err as SessionPersistenceError).code).toBe('GW_SESSION_INVALID_ARGUMENT')
        expect((err as SessionPersistenceError).message).toContain(Object.keys(options)[0])
      }
    }
  })

  it('bounds a session\'s queue of copies: the newest is dropped, counted, reported once per episode, and still delivered live', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'edgemq-cursors-'))
    dirs.push(dir)
    const db = new ClassicLevel(dir)
    await db.open()
    const store = await openLogStore({ db: db as unknown as LevelDatabase })
    opened.push({ db, store })
    const sessions = (db as unknown as LevelDatabase).sublevel('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
    const overflows: Array<[string, string, boolean]> = []
    const persistence = new LevelSessionPersistence(sessions, {
      writer: store, log: store, maxQueuedPerSession: 3, onQueueOverflow: (...args) => { overflows.push(args) },
    })
    await persistence.setup({ id: 'gw', counter: 0 })
    const unrouted = (n: number): SessionPacket => ({ cmd: 'publish', topic: 't1/site/status', payload: Buffer.from(`u${n}`), qos: 1, brokerId: 'gw', brokerCounter: n })
    for (let n = 1; n <= 5; n++) await persistence.outgoingEnqueueCombi([{ clientId: 'svc', qos: 1 }], unrouted(n))
    expect(overflows).toEqual([['svc', 't1/site/status', true], ['svc', 't1/site/status', false]])
    // aedes delivering a dropped copy to a connected client: no GW_SESSION_NOT_FOUND, nothing stored
    await persistence.outgoingUpdate({ id: 'svc' }, { ...unrouted(5), messageId: 9 })
    const client = { id: 'svc' }
    const it = persistence.outgoingStream(client)[Symbol.asyncIterator]()
    const first = (await it.next()).value as SessionPacket
    await it.return?.()
    expect(String(first.payload)).toBe('u1')
    await persistence.outgoingUpdate(client, { ...first, messageId: 1 })
    await persistence.outgoingClearMessageId(client, { cmd: 'puback', messageId: 1 })
    await persistence.outgoingEnqueueCombi([{ clientId: 'svc', qos: 1 }], unrouted(6)) // room again: the episode is over
    await persistence.outgoingEnqueueCombi([{ clientId: 'svc', qos: 1 }], unrouted(7))
    expect(overflows.map(([, , f]) => f)).toEqual([true, false, true])
    expect(bodies(await persistence.outgoingStream({ id: 'svc' }).toArray() as SessionPacket[])).toEqual(['u2', 'u3', 'u6'])
  })

  it('writes a drain\'s cursor advances one write after another, not per PUBACK: a kill -9 sends those acknowledged since the last write again, with DUP; a clean shutdown none', async () => {
    const { dir, gw } = await fresh(100)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let from = 0; from < 2500; from += 500) {
      await Promise.all(Array.from({ length: 500 }, async (_v, i) => await publish(gw, 't1', 'd0', `m${from + i}`)))
    }
    const key = keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0'))
    const stored = async (g: Gateway): Promise<number> => Number((await g.sessions.get<Buffer, Buffer>(key, { keyEncoding: 'buffer', valueEncoding: 'buffer' }))?.readBigUInt64BE(0))
    // Cursor writes: the first is written, every later one hangs, as a write in flight when the process is killed.
    const writes: number[] = []
    const write = gw.store.write.bind(gw.store)
    gw.store.write = async (ops, options) => {
      const cursor = ops.find((op) => op.type === 'put' && op.key[0] === TAG_CURSOR)
      if (cursor === undefined || cursor.type !== 'put') return await write(ops, options)
      // An advance has no fsync of its own: losing it only sends deliveries again.
      expect(options?.durable).toBe(false)
      writes.push(Number((cursor.value as Buffer).readBigUInt64BE(0)))
      if (writes.length > 1) return await new Promise<never>(() => {})
      return await write(ops, options)
    }
    const first = await drain(gw, 'svc')
    expect(bodies(first)).toEqual(Array.from({ length: 2500 }, (_v, i) => `m${i}`))
    // one write in flight per session: 2,500 PUBACKs, two writes (the second, in flight, holds back every later one)
    expect(writes).toHaveLength(2)
    const committed = writes[0] as number
    expect(committed).toBeLessThan(writes[1] as number)
    expect(writes[1]).toBeLessThanOrEqual(2500)
    expect(await stored(gw)).toBe(committed)
    expect(gw.persistence.cursorLag()).toEqual([{ stream: 't1/telemetry', sessions: 1, lagMessages: 2500 - (writes[1] as number) }]) // as last written or being written

    const afterKill = await restart(dir, gw, 100)
    const again = await drain(afterKill, 'svc')
    expect(bodies(again)).toEqual(Array.from({ length: 2500 - committed }, (_v, i) => `m${committed + i}`))
    expect(again.every((p) => p.dup)).toBe(true)
    // a clean shutdown writes what the PUBACKs moved, and writes the cursors once more with an fsync
    const durable: Array<boolean | undefined> = []
    const writeAfterKill = afterKill.store.write.bind(afterKill.store)
    afterKill.store.write = async (ops, options) => {
      if (ops.some((op) => op.type === 'put' && op.key[0] === TAG_CURSOR)) durable.push(options?.durable)
      return await writeAfterKill(ops, options)
    }
    await afterKill.persistence.destroy()
    expect(await stored(afterKill)).toBe(2500)
    expect(durable.length).toBeGreaterThan(0)
    expect(durable.at(-1)).toBeUndefined() // the default: fsync'd
    const afterStop = await restart(dir, afterKill, 100)
    expect(await drain(afterStop, 'svc')).toEqual([])
  })

  it('writes a drain\'s last cursor advance again when its write failed, with no PUBACK left to carry it: a kill -9 then sends nothing acknowledged again', async () => {
    const errors: unknown[] = []
    const { dir, gw } = await fresh(100, { onCursorWriteError: (err) => { errors.push(err) } })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 50; i++) await publish(gw, 't1', 'd0', `m${i}`)
    const key = keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0'))
    const stored = async (): Promise<number | undefined> => {
      const value = await gw.sessions.get<Buffer, Buffer>(key, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
      return value === undefined ? undefined : Number(value.readBigUInt64BE(0))
    }
    // The write of the last advance (to 50) fails once: the disk was full for a moment.
    const failure = failCursorWriteOnce(gw, 50)
    expect(bodies(await drain(gw, 'svc'))).toHaveLength(50)
    await expect.poll(() => failure.failed).toBe(true)
    expect(errors[0]).toMatchObject({ code: 'GW_SESSION_WRITE_FAILED', cause: expect.objectContaining({ message: 'ENOSPC (injected)' }) })
    // Until it is written the lag shows the cursor as on disk; then it is written again (WRITE_RETRY_MS, 1 s).
    await expect.poll(stored, { timeout: 10_000 }).toBe(50)
    expect(gw.persistence.cursorLag()).toEqual([{ stream: 't1/telemetry', sessions: 1, lagMessages: 0 }])
    const after = await restart(dir, gw) // a kill -9
    expect(await drain(after, 'svc')).toEqual([])
  })

  it('writes a cursor advance whose write failed at a clean shutdown that comes before its retry: nothing acknowledged comes again', async () => {
    const { dir, gw } = await fresh(100, { onCursorWriteError: () => {} })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 50; i++) await publish(gw, 't1', 'd0', `m${i}`)
    const failure = failCursorWriteOnce(gw, 50)
    expect(bodies(await drain(gw, 'svc'))).toHaveLength(50)
    await expect.poll(() => failure.failed).toBe(true)
    await gw.persistence.destroy() // within the retry's second
    const after = await restart(dir, gw)
    expect(await drain(after, 'svc')).toEqual([])
  })

  it('counts and tells what the disk budget deleted before a session\'s cursor reached it, once, and lags by what is left', async () => {
    const dropped: Array<{ clientId: string, stream: string, partition: number, count: number }> = []
    const { dir, gw } = await fresh(100, { onCursorDropped: (d) => { dropped.push(d) } }, 4000)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    await gw.persistence.addSubscriptions({ id: 'other' }, [{ topic: 't2/devices/+/telemetry/#', qos: 1 }])
    const partition = gw.store.partitionFor('t1/telemetry', 'd0')
    for (let b = 0; b < 8; b++) await Promise.all(Array.from({ length: 10 }, async (_v, i) => await publish(gw, 't1', 'd0', `m${b * 10 + i}`.padEnd(200, '.'))))
    await publish(gw, 't2', 'd0', 'x')
    await gw.store.enforceRetention() // the budget: the cursor holds no retention against it
    const start = gw.store.partitionInfo('t1/telemetry', partition).logStartOffset
    expect(start).toBeGreaterThan(0)
    expect(dropped.reduce((n, d) => n + d.count, 0)).toBe(start)
    expect(dropped.every((d) => d.clientId === 'svc' && d.stream === 't1/telemetry' && d.partition === partition)).toBe(true)
    expect(gw.persistence.cursorLag()).toContainEqual({ stream: 't1/telemetry', sessions: 1, lagMessages: 80 - start })

    const after = await restart(dir, gw, 100, { onCursorDropped: (d) => { dropped.push(d) } }, 4000) // a kill -9
    expect(after.persistence.cursorLag()).toContainEqual({ stream: 't1/telemetry', sessions: 1, lagMessages: 80 - start })
    await after.store.enforceRetention()
    expect(dropped.reduce((n, d) => n + d.count, 0)).toBe(start) // told before the restart, not again
    const got = await drain(after, 'svc')
    expect(bodies(got).map((b) => b.replace(/\.+$/, ''))).toEqual(Array.from({ length: 80 - start }, (_v, i) => `m${start + i}`))
  })

  it('reads the next chunk of the log before the last one has gone out, and gets past a read of it that failed: every record once, in order', async () => {
    const errors: unknown[] = []
    const { gw } = await fresh(100, { onCursorReadError: (err) => { errors.push(err) } })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let from = 0; from < 2500; from += 500) {
      await Promise.all(Array.from({ length: 500 }, async (_v, i) => await publish(gw, 't1', 'd0', `m${from + i}`)))
    }
    const connected: { conn?: Connection } = {}
    // At each read: where it starts, and how many records the connection had got by then.
    const reads: Array<{ from: number, got: number }> = []
    const readColumns = gw.store.readColumns.bind(gw.store)
    gw.store.readColumns = async (...args) => {
      reads.push({ from: args[2], got: connected.conn?.got.length ?? 0 })
      if (reads.length === 2) throw new Error('EIO (injected)') // the second read, made while the first chunk goes out
      return await readColumns(...args)
    }
    const conn = connected.conn = await connect(gw, 'svc')
    // The partition is read again READ_RETRY_MS (1 s) after its failed read.
    await expect.poll(() => gw.persistence.cursorsSettled(conn.client), { timeout: 10_000 }).toBe(true)
    expect(bodies(conn.got)).toEqual(Array.from({ length: 2500 }, (_v, i) => `m${i}`))
    expect(conn.got.every((p) => !p.dup)).toBe(true)
    expect(errors).toHaveLength(1)
    expect(String(errors[0])).toContain('EIO (injected)')
    // The first chunk (1,000 records) had not all gone out when the next was read: the window did not wait for it.
    expect(reads[1]).toMatchObject({ from: 1000 })
    expect(reads[1]?.got).toBeLessThan(1000)
    conn.close()
  })

  it('drains a session\'s other partitions while one partition\'s reads keep failing, and that one after its reads work again', async () => {
    const errors: unknown[] = []
    const { gw } = await fresh(100, { onCursorReadError: (err) => { errors.push(err) } })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    const damaged = gw.store.partitionFor('t1/telemetry', 'da')
    let other = 'db'
    for (let i = 0; gw.store.partitionFor('t1/telemetry', other) === damaged; i++) other = `db${i}`
    for (let from = 0; from < 4000; from += 500) {
      await Promise.all(Array.from({ length: 500 }, async (_v, k) => { const i = from + k; await publish(gw, 't1', i % 2 === 0 ? 'da' : other, `m${i}`) }))
    }
    // Every read of the damaged partition past its first chunk fails, until healed.
    let healed = false
    const readColumns = gw.store.readColumns.bind(gw.store)
    gw.store.readColumns = async (...args) => {
      if (!healed && args[1] === damaged && args[2] > 0) throw new Error('EIO (injected)')
      return await readColumns(...args)
    }
    const conn = await connect(gw, 'svc')
    const of = (device: string): string[] => conn.got.filter((p) => String(p.topic) === `t1/devices/${device}/telemetry/t`).map((p) => String(p.payload))
    const expected = (device: string): string[] => Array.from({ length: 2000 }, (_v, k) => `m${device === 'da' ? 2 * k : 2 * k + 1}`)
    await expect.poll(() => of(other).length, { timeout: 10_000 }).toBe(2000)
    expect(of(other)).toEqual(expected(other))
    expect(of('da').length).toBeLessThan(2000)
    expect(errors.length).toBeGreaterThan(0)
    expect(String(errors[0])).toContain('EIO (injected)')
    // Healed (a repair, or the disk budget deleting the damage): the partition is read again, in order.
    healed = true
    await expect.poll(() => of('da').length, { timeout: 10_000 }).toBe(2000)
    expect(of('da')).toEqual(expected('da'))
    expect(conn.got.every((p) => !p.dup)).toBe(true)
    conn.close()
  })

  it('holds retention at the lowest cursor, and lets it go as PUBACKs advance it', async () => {
    const { gw } = await fresh()
    await gw.store.createStream('t3/telemetry', { partitions: 1, retentionBytes: 1 })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't3/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 6; i++) await publish(gw, 't3', 'd0', `m${i}`)
    await drain(gw, 'svc', (i) => i < 2)
    await gw.store.enforceRetention()
    expect(gw.store.partitionInfo('t3/telemetry', 0).logStartOffset).toBe(2) // the record the session has not acknowledged stays
    const all = await drain(gw, 'svc')
    expect(bodies(all)).toEqual(['m2', 'm3', 'm4', 'm5'])
    await expect.poll(async () => {
      await gw.store.enforceRetention()
      return gw.store.partitionInfo('t3/telemetry', 0).logStartOffset
    }).toBeGreaterThan(2)
  })

  it('writes a connected session\'s cursor again at the next message when the write creating it failed after it delivered', async () => {
    const { dir, gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    const conn = await connect(gw, 'svc', { ack: () => false }) // its deliveries stay in flight
    // The write creating the cursor fails, once the connection has got the message (it reads it from the log at once).
    const write = gw.store.write.bind(gw.store)
    let fail: (() => void) | undefined
    gw.store.write = async (ops) => {
      if (fail === undefined && ops.some((op) => op.key[0] === TAG_CURSOR)) {
        await new Promise<void>((resolve) => { fail = resolve })
        throw new Error('ENOSPC (injected)')
      }
      return await write(ops)
    }
    const append = async (body: string): Promise<{ stream: string, partition: number, offset: number }> => {
      const { partition, offset } = await gw.store.append('t1/telemetry', 'd0', { payload: Buffer.from(body), topic: 'devices/d0/telemetry/t', qos: 1 })
      return { stream: 't1/telemetry', partition, offset }
    }
    const m1 = await append('m1')
    const first = gw.persistence.beforeAck('t1/devices/d0/telemetry/t', 1, m1)
    expect(first).toBeInstanceOf(Promise)
    await expect.poll(() => bodies(conn.got)).toEqual(['m1'])
    fail?.()
    await expect(first).rejects.toMatchObject({ code: 'GW_SESSION_WRITE_FAILED' }) // m1's publisher gets no ack
    const second = gw.persistence.beforeAck('t1/devices/d0/telemetry/t', 1, await append('m2'))
    expect(second).toBeInstanceOf(Promise) // not 'ready': the cursor's key is written again
    await second

    const after = await restart(dir, gw) // a kill -9
    expect(await keysWith(after, TAG_CURSOR)).toBe(1)
    expect(bodies(await drain(after, 'svc'))).toEqual(['m1', 'm2']) // from m1: it may have been acked to no one, never lost
  })

  it('keeps none of the batches it read once a drain is acknowledged: an offline session\'s cursors hold no memory of the log', async () => {
    const { gw } = await fresh()
    const read = batchesRead(gw)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 20; i++) await publish(gw, 't1', `d${i % 4}`, `m${i}`)
    expect(await drain(gw, 'svc')).toHaveLength(20)
    await expect.poll(() => gw.persistence.cursorLag()).toEqual([{ stream: 't1/telemetry', sessions: 1, lagMessages: 0 }]) // all acknowledged
    expect(await stillHeld(read)).toBe(0)
  })

  it('drops the cursors of a session that unsubscribed from everything, keeping sent unacknowledged deliveries as copies', async () => {
    const { gw } = await fresh()
    await gw.store.createStream('t3/telemetry', { partitions: 1, retentionBytes: 1 })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't3/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 4; i++) await publish(gw, 't3', 'd0', `m${i}`)
    const conn = await connect(gw, 'svc', { ack: () => false })
    await settled(gw, conn) // four sent, none acknowledged
    await gw.persistence.removeSubscriptions(conn.client, ['t3/devices/+/telemetry/#'])
    expect(await keysWith(gw, TAG_CURSOR)).toBe(0)
    await gw.store.enforceRetention()
    expect(gw.store.partitionInfo('t3/telemetry', 0).logStartOffset).toBeGreaterThan(0)
    const again = await gw.persistence.outgoingStream({ id: 'svc' }).toArray() as SessionPacket[]
    expect(again.map((p) => [String(p.payload), p.messageId, p.dup])).toEqual(conn.got.map((p) => [String(p.payload), p.messageId, true]))
    expect(bodies(again)).toEqual(['m0', 'm1', 'm2', 'm3'])
    // a PUBACK of one of them clears the copy
    await conn.ack(conn.got[0]?.messageId as number)
    expect(bodies(await gw.persistence.outgoingStream({ id: 'svc' }).toArray() as SessionPacket[])).toEqual(['m1', 'm2', 'm3'])
  })

  it('expires a session offline too long, with its cursors and their hold, counting from its disconnect or the restart', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'edgemq-cursors-'))
    dirs.push(dir)
    let now = 1_000_000
    const openAt = async (): Promise<{ gw: Gateway, events: EventEmitter }> => {
      const db = new ClassicLevel(dir)
      await db.open()
      const store = await openLogStore({ db: db as unknown as LevelDatabase })
      opened.push({ db, store })
      const sessions = (db as unknown as LevelDatabase).sublevel('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
      const persistence = new LevelSessionPersistence(sessions, { writer: store, log: store, now: () => now, maxOfflineSeconds: 60 })
      const events = new EventEmitter()
      const broker = { id: 'gw', counter: 0, on: (event: string, listener: (c: { id: string }) => void) => events.on(event, listener) }
      await persistence.setup(broker)
      return { gw: { db, store, sessions, persistence, broker, connections: new WeakMap() }, events }
    }
    const expired = async (): Promise<string[]> => (await gw.persistence.expireSessions()).map((e) => `${e.clientId} ${e.source} ${e.seconds}`)
    let { gw, events } = await openAt()
    await gw.store.createStream('t3/telemetry', { partitions: 1, retentionBytes: 1 })
    const connected = new Map<string, { id: string }>() // aedes' events carry one Client object per connection
    for (const id of ['gone', 'stays']) {
      connected.set(id, { id })
      events.emit('client', connected.get(id))
      await gw.persistence.markSession({ id })
      await gw.persistence.addSubscriptions({ id }, [{ topic: 't3/devices/+/telemetry/#', qos: 1 }])
    }
    events.emit('clientDisconnect', connected.get('gone'))
    for (let i = 0; i < 3; i++) await publish(gw, 't3', 'd0', `m${i}`)
    now += 59_999
    expect(await expired()).toEqual([]) // not as long as the bound yet; 'stays' is connected
    now += 1
    expect(await expired()).toEqual(['gone cap 60'])
    expect(gw.persistence.hasSessionState({ id: 'gone' })).toBe(false)
    expect(await gw.persistence.subscriptionsByTopic('t3/devices/d0/telemetry/t')).toEqual([expect.objectContaining({ clientId: 'stays' })])
    // the connected session was killed with the gateway: offline from the restart on, and that survives another restart
    await gw.store.close()
    await gw.db.close()
    now += 10_000
    ;({ gw, events } = await openAt())
    expect(gw.persistence.hasSessionState({ id: 'gone' })).toBe(false)
    now += 30_000
    await gw.store.close()
    await gw.db.close()
    ;({ gw, events } = await openAt())
    now += 30_000
    expect(await expired()).toEqual(['stays cap 60'])
    expect(await keysWith(gw, TAG_CURSOR)).toBe(0)
    await gw.store.enforceRetention()
    expect(gw.store.partitionInfo('t3/telemetry', 0).logStartOffset).toBeGreaterThan(0) // its cursor at 0 held it until now
  })

  it('ends an MQTT 5 session by its own interval or the cap, the shorter, with the interval stored across a restart', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'edgemq-cursors-'))
    dirs.push(dir)
    let now = 1_000_000
    const openAt = async (maxOfflineSeconds: number): Promise<{ gw: Gateway, events: EventEmitter }> => {
      const db = new ClassicLevel(dir)
      await db.open()
      const store = await openLogStore({ db: db as unknown as LevelDatabase })
      opened.push({ db, store })
      const sessions = (db as unknown as LevelDatabase).sublevel('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
      const persistence = new LevelSessionPersistence(sessions, { writer: store, log: store, now: () => now, maxOfflineSeconds })
      const events = new EventEmitter()
      const broker = { id: 'gw', counter: 0, on: (event: string, listener: (c: { id: string }) => void) => events.on(event, listener) }
      await persistence.setup(broker)
      return { gw: { db, store, sessions, persistence, broker, connections: new WeakMap() }, events }
    }
    let { gw, events } = await openAt(0)
    const clients = [
      { id: 'short', version: 5, sessionExpiryInterval: 30 },
      { id: 'long', version: 5, sessionExpiryInterval: 600 },
      { id: 'never', version: 5, sessionExpiryInterval: 0xffffffff },
      { id: 'v311', version: 4 },
      { id: 'changed', version: 5, sessionExpiryInterval: 600 },
    ]
    for (const c of clients) {
      events.emit('client', c)
      await gw.persistence.markSession(c)
    }
    // An MQTT 5 DISCONNECT may set another interval: the session ends by the one it left with.
    // (aedes sets it on the connection's Client object, which its events carry)
    for (const c of clients) events.emit('clientDisconnect', c.id === 'changed' ? Object.assign(c, { sessionExpiryInterval: 10 }) : c)
    expect(gw.persistence.sessionEnd('short')).toEqual({ at: now + 30_000, source: 'interval', seconds: 30 })
    expect(gw.persistence.sessionEnd('never')).toBe(null) // no cap: neither 0xFFFFFFFF nor 3.1.1 ends
    expect(gw.persistence.sessionEnd('v311')).toBe(null)
    await gw.persistence.expireSession('short') // not yet
    expect(gw.persistence.hasSessionState({ id: 'short' })).toBe(true)
    now += 30_000
    expect((await gw.persistence.expireSessions()).map((e) => `${e.clientId} ${e.source} ${e.seconds}`)).toEqual(['short interval 30', 'changed interval 10'])
    expect(gw.persistence.hasSessionState({ id: 'short' })).toBe(false)
    await gw.store.close()
    await gw.db.close()
    // Restarted with a cap of 120 s: it bounds 'long' (600 s), 'never' and 'v311' alike, from when they went offline.
    ;({ gw, events } = await openAt(120))
    expect(gw.persistence.sessionEnd('long')).toEqual({ at: now - 30_000 + 120_000, source: 'cap', seconds: 120 })
    now += 90_000
    expect((await gw.persistence.expireSessions()).map((e) => e.clientId).sort()).toEqual(['long', 'never', 'v311'])
    expect(gw.persistence.sessionStates()).toEqual([])
    expect(() => new LevelSessionPersistence(gw.sessions, { maxOfflineSeconds: -1 })).toThrow(expect.objectContaining({ code: 'GW_SESSION_INVALID_ARGUMENT' }))
  })

  it('refuses session bounds outside their ranges in the config, naming the key', () => {
    const bad = [['sessionInflight', 0], ['sessionInflight', 65536], ['sessionInflightBytes', 0], ['sessionInflightBytes', 1.5],
      ['sessionInflightBytes', '16 MiB'], ['maxQueuedMessagesPerSession', 0], ['maxQueuedMessagesPerSession', 1.5],
      ['sessionExpirySeconds', -1], ['sessionExpirySeconds', 'a day'], ['sessionExpirySeconds', 0xffffffff]] as const
    for (const [key, value] of bad) {
      expect(() => buildConfig({ mqtt: { [key]: value } })).toThrow(expect.objectContaining({ code: 'GW_CONFIG_INVALID', message: expect.stringContaining(key) }))
    }
    expect(buildConfig({}).mqtt).toMatchObject({ sessionInflight: 1000, sessionInflightBytes: 16 * 1024 * 1024, maxQueuedMessagesPerSession: 100_000, sessionExpirySeconds: 0 })
  })
})

/** Another device whose records go to the same partition of `t1/telemetry` as `device`'s. */
function samePartition (gw: Gateway, device: string): string {
  const partition = gw.store.partitionFor('t1/telemetry', device)
  for (let i = 0; ; i++) if (`x${i}` !== device && gw.store.partitionFor('t1/telemetry', `x${i}`) === partition) return `x${i}`
}

const filterOf = (device: string): string => `t1/devices/${device}/telemetry/#`
const BUFFERS = { keyEncoding: 'buffer', valueEncoding: 'buffer' } as const

/** The stored `K` value of svc's cursor into d0's partition. */
async function storedCursor (gw: Gateway): Promise<Buffer | undefined> {
  return await gw.sessions.get<Buffer, Buffer>(keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0')), BUFFERS)
}

/** Damages the `K` value (one fence) of svc's cursor into d0's partition as a disk might: its fence cut short, or all of it. */
async function damageCursor (gw: Gateway, damage: 'fences' | 'whole value'): Promise<void> {
  const value = await storedCursor(gw) as Buffer
  expect(value.length).toBe(8 + 16)
  const key = keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0'))
  await gw.sessions.put(key, (damage === 'fences' ? value.subarray(0, value.length - 1) : value.subarray(0, 3)) as never, BUFFERS as never)
}

describe('a SUBSCRIBE while the session\'s cursor is behind the log (issue 13: a new filter gets what is logged after it)', () => {
  it('gives a new filter only the records logged after its SUBSCRIBE; the older filter\'s records all come, in order', async () => {
    const { gw } = await fresh()
    const other = samePartition(gw, 'd0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    for (let i = 0; i < 5; i++) {
      await publish(gw, 't1', 'd0', `a${i}`)
      await publish(gw, 't1', other, `old${i}`) // matches only the filter subscribed below
    }
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(other), qos: 1 }])
    for (let i = 0; i < 3; i++) {
      await publish(gw, 't1', other, `new${i}`)
      await publish(gw, 't1', 'd0', `b${i}`)
    }
    expect(bodies(await drain(gw, 'svc'))).toEqual(['a0', 'a1', 'a2', 'a3', 'a4', 'new0', 'b0', 'new1', 'b1', 'new2', 'b2'])
  })

  it('applies to a connected session whose window holds it behind, and to MQTT 5 with its subscription identifiers', async () => {
    const { gw } = await fresh(2)
    const other = samePartition(gw, 'd0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1, subscriptionIdentifier: 7 }])
    for (let i = 0; i < 4; i++) {
      await publish(gw, 't1', 'd0', `a${i}`)
      await publish(gw, 't1', other, `old${i}`)
    }
    const conn = await connect(gw, 'svc', { ack: () => false, mqtt5: true })
    await settled(gw, conn)
    expect(bodies(conn.got)).toEqual(['a0', 'a1']) // the window of 2 is full: the cursor is behind
    await gw.persistence.addSubscriptions(conn.client, [{ topic: filterOf(other), qos: 1, subscriptionIdentifier: 8 }])
    await publish(gw, 't1', other, 'new0')
    for (let n = 0; n < 5; n++) {
      await conn.ack(conn.got[n]?.messageId as number)
      await settled(gw, conn)
    }
    expect(bodies(conn.got)).toEqual(['a0', 'a1', 'a2', 'a3', 'new0'])
    expect(conn.got.map((p) => p.properties?.subscriptionIdentifier)).toEqual([7, 7, 7, 7, 8])
    conn.close()
  })

  it('keeps that after a kill -9 right after the SUBSCRIBE: its fences are on disk with it', async () => {
    const { dir, gw } = await fresh()
    const other = samePartition(gw, 'd0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    for (let i = 0; i < 4; i++) {
      await publish(gw, 't1', 'd0', `a${i}`)
      await publish(gw, 't1', other, `old${i}`)
    }
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(other), qos: 1 }])
    let again = await restart(dir, gw)
    await publish(again, 't1', other, 'new0')
    // half drained, then killed again: the fence stays until the committed cursor has passed it
    expect(bodies(await drain(again, 'svc', (i) => i < 2))).toEqual(['a0', 'a1', 'a2', 'a3', 'new0'])
    again = await restart(dir, again)
    expect(bodies(await drain(again, 'svc'))).toEqual(['a2', 'a3', 'new0'])
    // passed: the cursor's value is a plain offset again, and a later SUBSCRIBE with nothing behind stores no eras
    const key = keys.cursor('svc', 't1/telemetry', again.store.partitionFor('t1/telemetry', 'd0'))
    await expect.poll(async () => (await again.sessions.get<Buffer, Buffer>(key, { keyEncoding: 'buffer', valueEncoding: 'buffer' }))?.length).toBe(8)
  })

  it('treats an UNSUBSCRIBE and a SUBSCRIBE again as a new filter', async () => {
    const { gw } = await fresh()
    const other = samePartition(gw, 'd0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }, { topic: filterOf(other), qos: 1 }])
    await publish(gw, 't1', 'd0', 'a0')
    await publish(gw, 't1', other, 'kept') // logged while subscribed: delivered
    await gw.persistence.removeSubscriptions({ id: 'svc' }, [filterOf(other)])
    await publish(gw, 't1', other, 'between')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(other), qos: 1 }])
    await publish(gw, 't1', other, 'after')
    // 'kept' went with the filter's UNSUBSCRIBE (the cursor reads for the filters held), and came before the new one
    expect(bodies(await drain(gw, 'svc'))).toEqual(['a0', 'after'])
  })

  it('neither loses nor repeats a record when a filter is subscribed again with the same or another QoS', async () => {
    const { dir, gw } = await fresh()
    const other = samePartition(gw, 'd0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }, { topic: filterOf(other), qos: 2 }])
    // QoS 1 to d0's filter: QoS 2 records come from the cursor at QoS 1; the other filter's QoS 2 records are copies
    await publish(gw, 't1', 'd0', 'a0', 2)
    await publish(gw, 't1', other, 'c0', 1) // min(2, 1): the cursor
    await publish(gw, 't1', other, 'c1', 2) // a copy
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }]) // the same QoS again
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 2 }, { topic: filterOf(other), qos: 1 }]) // swapped
    await publish(gw, 't1', 'd0', 'a1', 2) // a copy now
    await publish(gw, 't1', other, 'c2', 2) // the cursor now
    const again = await restart(dir, gw)
    const conn = await connect(again, 'svc')
    await settled(again, conn)
    conn.close()
    expect(conn.copies.map((p) => [String(p.payload), p.qos])).toEqual([['c1', 2], ['a1', 2]])
    expect(conn.got.map((p) => [String(p.payload), p.qos])).toEqual([['a0', 1], ['c0', 1], ['c2', 1]])
  })

  it('follows a filter through several QoS changes while behind, and SUBSCRIBEs with nothing logged between them, across a restart', async () => {
    const { dir, gw } = await fresh()
    const [b, c] = [samePartition(gw, 'd0'), samePartition(gw, samePartition(gw, 'd0'))]
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    await publish(gw, 't1', 'd0', 'a0') // QoS 1 then: delivered
    await publish(gw, 't1', b, 'b0') // before b's filter
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 0 }])
    await publish(gw, 't1', 'd0', 'a1') // QoS 0 then: not the cursor's
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(b), qos: 1 }]) // nothing logged since the last one
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(c), qos: 1 }])
    await publish(gw, 't1', 'd0', 'a2')
    await publish(gw, 't1', b, 'b1')
    await publish(gw, 't1', c, 'c0')
    const again = await restart(dir, gw)
    expect(bodies(await drain(again, 'svc'))).toEqual(['a0', 'a2', 'b1', 'c0'])
    expect(bodies(await drain(again, 'svc'))).toEqual([])
  })

  it('persists a SUBSCRIBE of many filters while behind with one write per filter plus one fence per cursor behind, stored once', async () => {
    const { dir, gw } = await fresh()
    const other = samePartition(gw, 'd0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    await publish(gw, 't1', 'd0', 'a0')
    await publish(gw, 't1', other, 'old0')
    const writes: number[] = []
    const write = gw.store.write.bind(gw.store)
    gw.store.write = async (ops, options) => { writes.push(ops.length); return await write(ops, options) }
    // aedes stores each filter of one SUBSCRIBE with a call of its own (storeAcceptedSubscriptions), all at once
    const many = [filterOf(other), ...Array.from({ length: 999 }, (_v, i) => `t1/many/${i}`)]
    await Promise.all(many.map(async (topic) => { await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic, qos: 1 }]) }))
    gw.store.write = write
    // the first call puts the fence, the others reuse its epoch: each writes its filter and the K value (one fence)
    expect(writes).toEqual(many.map(() => 2))
    const key = keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0'))
    expect((await gw.sessions.get<Buffer, Buffer>(key, { keyEncoding: 'buffer', valueEncoding: 'buffer' }))?.length).toBe(8 + 16)
    await publish(gw, 't1', other, 'new0')
    expect(bodies(await drain(await restart(dir, gw), 'svc'))).toEqual(['a0', 'new0'])
  })

  it('writes the fence again with a SUBSCRIBE that reuses its epoch, after the write that first carried it failed', async () => {
    const { dir, gw } = await fresh()
    const b = samePartition(gw, 'd0')
    const c = samePartition(gw, b)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    await publish(gw, 't1', 'd0', 'a0') // the cursor of d0's partition is behind
    await publish(gw, 't1', c, 'c-before') // logged before c's filter
    const write = gw.store.write.bind(gw.store)
    gw.store.write = async () => { throw new Error('ENOSPC (injected)') } // the disk full for a moment
    await expect(gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(b), qos: 1 }])).rejects.toThrow()
    gw.store.write = write
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(c), qos: 1 }]) // nothing logged since
    await publish(gw, 't1', c, 'c-after')
    expect(bodies(await drain(await restart(dir, gw), 'svc'))).toEqual(['a0', 'c-after'])
  })

  it('puts a new fence when a partition behind has had appends since the last one, also one whose cursor came after it', async () => {
    const { dir, gw } = await fresh()
    const partition = (device: string): number => gw.store.partitionFor('t1/telemetry', device)
    let e1 = 'e0'
    for (let i = 0; partition(e1) === partition('d0'); i++) e1 = `e${i}`
    const e2 = samePartition(gw, e1)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    await publish(gw, 't1', 'd0', 'a0') // the cursor of d0's partition is behind
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(e1), qos: 1 }]) // a fence on it
    await publish(gw, 't1', e1, 'e1-after') // makes the cursor of the other partition: after e1's filter, so it is e1's
    await publish(gw, 't1', e2, 'e2-before') // logged before e2's filter, below no fence yet
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(e2), qos: 1 }]) // d0's partition did not move
    await publish(gw, 't1', e2, 'e2-after')
    expect(bodies(await drain(await restart(dir, gw), 'svc')).sort()).toEqual(['a0', 'e1-after', 'e2-after'])
  })

  it('keeps a fence until the cursor\'s value past it is on disk: a SUBSCRIBE while that write is in flight, and one after it failed, keep it', async () => {
    const writeErrors: unknown[] = []
    const { dir, gw } = await fresh(100, { onCursorWriteError: (err) => writeErrors.push(err) })
    const [other, third] = [samePartition(gw, 'd0'), samePartition(gw, samePartition(gw, 'd0'))]
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    for (let i = 0; i < 4; i++) await publish(gw, 't1', 'd0', `a${i}`) // offsets 0-3
    await publish(gw, 't1', other, 'old0') // 4: logged before other's filter
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(other), qos: 1 }]) // a fence at 5
    await publish(gw, 't1', 'd0', 'a4') // 5
    // Every cursor advance fails (the disk full); the one past the fence (to 5) waits until `release`.
    let release = (): void => {}
    const released = new Promise<void>((resolve) => { release = resolve })
    let held = false
    const heldFailure = new Error('ENOSPC (injected, held)')
    const write = gw.store.write.bind(gw.store)
    gw.store.write = async (ops, options) => {
      const cursor = ops.find((op) => op.type === 'put' && op.key[0] === TAG_CURSOR)
      if (options?.durable !== false || cursor?.type !== 'put') return await write(ops, options)
      if (!held && (cursor.value as Buffer).readBigUInt64BE(0) === 5n) {
        held = true
        await released
        throw heldFailure
      }
      throw new Error('ENOSPC (injected)')
    }
    const conn = await connect(gw, 'svc', { ack: (p) => String(p.payload) !== 'a4' })
    await expect.poll(() => held).toBe(true)
    await gw.persistence.addSubscriptions(conn.client, [{ topic: filterOf(third), qos: 1 }])
    release()
    // Told once the cursor is back where it is on disk (below the fence).
    await expect.poll(() => writeErrors.some((err) => err === heldFailure || (err as { cause?: unknown }).cause === heldFailure)).toBe(true)
    await publish(gw, 't1', 'd0', 'a5')
    await gw.persistence.addSubscriptions(conn.client, [{ topic: 't1/elsewhere/#', qos: 1 }]) // writes the cursor's fences again
    conn.close()
    expect(bodies(await drain(await restart(dir, gw), 'svc'))).toEqual(['a0', 'a1', 'a2', 'a3', 'a4', 'a5'])
  })

  it('puts no fence for a $share subscription (its consumer group reads the log, not the session\'s cursors)', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    await publish(gw, 't1', 'd0', 'a0')
    const writes: number[] = []
    const write = gw.store.write.bind(gw.store)
    gw.store.write = async (ops, options) => { writes.push(ops.length); return await write(ops, options) }
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/$share/g/devices/+/telemetry/#', qos: 1 }])
    gw.store.write = write
    expect(writes).toEqual([1])
    const key = keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0'))
    expect((await gw.sessions.get<Buffer, Buffer>(key, { keyEncoding: 'buffer', valueEncoding: 'buffer' }))?.length).toBe(8)
  })

  it('reports a subscription whose stored eras are damaged, and grants later SUBSCRIBEs of other sessions as before', async () => {
    const damaged: SessionDamage[] = []
    const { dir, gw } = await fresh(100, { onDamaged: (d) => damaged.push(d) })
    const other = samePartition(gw, 'd0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    await gw.persistence.addSubscriptions({ id: 'peer' }, [{ topic: filterOf('d0'), qos: 1 }])
    for (let i = 0; i < 3; i++) await publish(gw, 't1', 'd0', `a${i}`)
    await publish(gw, 't1', other, 'old0')
    // cbor reads it, but its eras are not epochs: the epoch counter of every session was NaN from there on
    const peerKey = keys.sub('peer', filterOf('d0'))
    await gw.sessions.put(peerKey, Buffer.from(cbor.encode({ qos: 1, eras: ['x', 1] })) as never, { keyEncoding: 'buffer', valueEncoding: 'buffer' } as never)
    let again = await restart(dir, gw, 100, { onDamaged: (d) => damaged.push(d) })
    expect(damaged.map(({ entry, clientId, key }) => ({ entry, clientId, key }))).toEqual([{ entry: 'subscription', clientId: 'peer', key: peerKey.toString('hex') }])
    await again.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(other), qos: 1 }]) // behind: a fence
    await publish(again, 't1', other, 'new0')
    damaged.length = 0
    again = await restart(dir, again, 100, { onDamaged: (d) => damaged.push(d) })
    expect(damaged.map(({ entry, clientId }) => ({ entry, clientId }))).toEqual([{ entry: 'subscription', clientId: 'peer' }]) // svc's fence reads
    expect(bodies(await drain(again, 'svc'))).toEqual(['a0', 'a1', 'a2', 'new0'])
    expect(bodies(await drain(again, 'peer'))).toEqual(['a0', 'a1', 'a2'])
  })

  it('delivers every record below a fence to a subscription whose eras are damaged, also one changed from QoS 1 to 2 (not fewer)', async () => {
    const damaged: SessionDamage[] = []
    const { dir, gw } = await fresh(100, { onDamaged: (d) => damaged.push(d) })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    await publish(gw, 't1', 'd0', 'q1-0', 2) // QoS 2 at a QoS 1 subscription: the cursor's, at QoS 1, no copy
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 2 }]) // behind: eras and a fence
    await publish(gw, 't1', 'd0', 'q2-0', 2) // a copy
    const key = keys.sub('svc', filterOf('d0'))
    await gw.sessions.put(key, Buffer.from(cbor.encode({ qos: 2, eras: [1, 'y'] })) as never, { keyEncoding: 'buffer', valueEncoding: 'buffer' } as never)
    const again = await restart(dir, gw, 100, { onDamaged: (d) => damaged.push(d) })
    expect(damaged.map(({ entry }) => entry)).toEqual(['subscription'])
    const conn = await connect(again, 'svc')
    await settled(again, conn)
    conn.close()
    expect(conn.got.map((p) => [String(p.payload), p.qos])).toEqual([['q1-0', 1]])
    expect(conn.copies.map((p) => [String(p.payload), p.qos])).toEqual([['q2-0', 2]])
  })

  it('keeps a cursor\'s offset when only the fences after it are damaged, reporting it', async () => {
    const damaged: SessionDamage[] = []
    const { dir, gw } = await fresh(100, { onDamaged: (d) => damaged.push(d) })
    const other = samePartition(gw, 'd0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    for (let i = 0; i < 4; i++) await publish(gw, 't1', 'd0', `a${i}`)
    expect(bodies(await drain(gw, 'svc', (i) => i < 2))).toEqual(['a0', 'a1', 'a2', 'a3'])
    const key = keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0'))
    const stored = async (): Promise<Buffer | undefined> => await gw.sessions.get<Buffer, Buffer>(key, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    await expect.poll(async () => (await stored())?.readBigUInt64BE(0)).toBe(2n)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(other), qos: 1 }]) // a fence
    const value = await stored() as Buffer
    expect(value.length).toBe(8 + 16)
    await gw.sessions.put(key, value.subarray(0, value.length - 1) as never, { keyEncoding: 'buffer', valueEncoding: 'buffer' } as never)
    const again = await restart(dir, gw, 100, { onDamaged: (d) => damaged.push(d) })
    expect(damaged.map(({ entry, key: hex, length }) => ({ entry, key: hex, length }))).toEqual([{ entry: 'cursor', key: key.toString('hex'), length: 23 }])
    expect(bodies(await drain(again, 'svc'))).toEqual(['a2', 'a3'])
  })

  // Review: the records of a filter changed from QoS 1 to 2 while the cursor was behind were matched at QoS 2 once the
  // K value's fence was lost, and those logged under QoS 1 (no copy holds them) were skipped as copies.
  for (const damage of ['fences', 'whole value'] as const) {
    it(`a K value whose ${damage === 'fences' ? 'fences are' : 'whole value is'} damaged: a filter changed from QoS 1 to 2 while behind still gets its record logged under QoS 1 (more, never fewer)`, async () => {
      const damaged: SessionDamage[] = []
      const { dir, gw } = await fresh(100, { onDamaged: (d) => damaged.push(d) })
      await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
      await publish(gw, 't1', 'd0', 'q1-0', 2) // QoS 2 at a QoS 1 subscription: the cursor's, at QoS 1, no copy
      await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 2 }]) // behind: eras and a fence
      await publish(gw, 't1', 'd0', 'q2-0', 2) // a copy
      await damageCursor(gw, damage)
      const again = await restart(dir, gw, 100, { onDamaged: (d) => damaged.push(d) })
      expect(damaged.map(({ entry }) => entry)).toEqual(['cursor'])
      await publish(again, 't1', 'd0', 'q2-1', 2) // logged after the restart, under QoS 2: a copy only
      const conn = await connect(again, 'svc')
      await settled(again, conn)
      conn.close()
      expect(conn.copies.map((p) => [String(p.payload), p.qos])).toEqual([['q2-0', 2], ['q2-1', 2]])
      // Which side of the lost fence q2-0 was logged on is not known any more: it comes from the log too, at QoS 1.
      expect(conn.got.map((p) => [String(p.payload), p.qos])).toEqual([['q1-0', 1], ['q2-0', 1]])
    })
  }

  it('writes the fence a damaged K value is loaded with: after one more kill -9 a record logged under QoS 1 still comes', async () => {
    const damaged: SessionDamage[] = []
    const { dir, gw } = await fresh(100, { onDamaged: (d) => damaged.push(d) })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    await publish(gw, 't1', 'd0', 'a0', 2) // the cursor's, at QoS 1
    await publish(gw, 't1', 'd0', 'a1', 2)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 2 }])
    await damageCursor(gw, 'fences')
    let again = await restart(dir, gw, 100, { onDamaged: (d) => damaged.push(d) })
    expect(bodies(await drain(again, 'svc', (i) => i === 0))).toEqual(['a0', 'a1'])
    const written = again
    await expect.poll(async () => (await storedCursor(written))?.readBigUInt64BE(0)).toBe(1n) // past a0, below a1
    damaged.length = 0
    again = await restart(dir, again, 100, { onDamaged: (d) => damaged.push(d) })
    expect(damaged).toEqual([]) // written whole, with its fence
    expect(bodies(await drain(again, 'svc'))).toEqual(['a1'])
  })

  it('gives a filter subscribed after a damaged K value was loaded none of the records logged before its SUBSCRIBE', async () => {
    const { dir, gw } = await fresh()
    const other = samePartition(gw, 'd0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
    await publish(gw, 't1', 'd0', 'a0')
    await publish(gw, 't1', other, 'old0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 2 }]) // a fence, to damage
    await damageCursor(gw, 'fences')
    let again = await restart(dir, gw)
    // Nothing logged since the restart: this SUBSCRIBE's fence is at the damaged value's, with an epoch of its own.
    await again.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf(other), qos: 1 }])
    await publish(again, 't1', other, 'new0')
    again = await restart(dir, again)
    expect(bodies(await drain(again, 'svc'))).toEqual(['a0', 'new0'])
  })

  for (const fenced of [false, true]) {
    it(`asks a new connection's read ACL again, also for records below a fence (${fenced ? 'a fence' : 'no fence'}): another user resuming the session gets nothing it may not read`, async () => {
      const { gw } = await fresh(2)
      const other = samePartition(gw, 'd0')
      await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }])
      for (let i = 0; i < 6; i++) await publish(gw, 't1', 'd0', `a${i}`)
      const first = await connect(gw, 'svc', { ack: () => false })
      await settled(gw, first)
      // With the fence, every record of d0 logged so far is matched by the fenced route, remembered per cursor.
      if (fenced) await gw.persistence.addSubscriptions(first.client, [{ topic: filterOf(other), qos: 1 }])
      await first.ack(first.got[0]?.messageId as number)
      await settled(gw, first)
      expect(bodies(first.got)).toEqual(['a0', 'a1', 'a2'])
      first.close()
      const denied = await connect(gw, 'svc', { deliveredTopic: () => null })
      await settled(gw, denied)
      denied.close()
      expect(bodies(denied.got)).toEqual([])
    })
  }
})

describe('records of one partition delivered out of order', () => {
  it('a record whose delivery comes after a later record of its partition created the session cursor reaches the session as a copy', async () => {
    const { dir, gw } = await fresh()
    const other = samePartition(gw, 'd0')
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: filterOf('d0'), qos: 1 }, { topic: filterOf(other), qos: 1 }])
    const stream = 't1/telemetry'
    const logged = async (device: string, body: string, qos: 1 | 2): Promise<SessionPacket> => {
      const topic = `devices/${device}/telemetry/t`
      const { partition, offset } = await gw.store.append(stream, device, { payload: Buffer.from(body), topic, qos })
      const packet: SessionPacket = { cmd: 'publish', topic: `t1/${topic}`, payload: Buffer.from(body), qos, retain: false, dup: false, brokerId: 'gw', brokerCounter: ++counter }
      attachLogPosition(packet, { stream, partition, offset })
      return packet
    }
    // One commit: m1 (QoS 2, delivered after its append and more awaits: inbound-qos2.ts) and m2 (QoS 1, whose ack
    // path reaches the session first and creates its cursor at m2).
    const [m1, m2] = await Promise.all([logged('d0', 'm1', 2), logged(other, 'm2', 1)])
    await gw.persistence.outgoingEnqueueCombi(await gw.persistence.subscriptionsByTopic(String(m2.topic)), m2)
    // m1's ack path asks too (a QoS 1 publish's would): it waits for the copy.
    expect(gw.persistence.beforeAck(String(m1.topic), 1, logPositionOf(m1) as LogPosition)).toBe('copies')
    await gw.persistence.outgoingEnqueueCombi(await gw.persistence.subscriptionsByTopic(String(m1.topic)), m1)
    // Its cursor never reads m1 (it started above it): without the copy, m1 was lost to the session. After a kill -9
    // too: m1 is a copy on disk, m2 the cursor's.
    const again = await restart(dir, gw)
    const conn = await connect(again, 'svc')
    await settled(again, conn)
    conn.close()
    expect({ cursor: bodies(conn.got), copies: bodies(conn.copies) }).toEqual({ cursor: ['m2'], copies: ['m1'] })
  })
})
