/**
 * Persistent sessions' cursors into the log (gateway/mqtt/session-cursors.ts),
 * through LevelSessionPersistence as the gateway builds it: a real log store
 * and the `sessions` sublevel on one classic-level database in a temp dir,
 * reopened for restarts. aedes' calls are made by hand, in its order
 * (outgoingEnqueueCombi, outgoingStream, outgoingUpdate with the message id,
 * outgoingClearMessageId on PUBACK).
 */
import { EventEmitter } from 'node:events'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ClassicLevel } from 'classic-level'
import { afterEach, describe, expect, it } from 'vitest'
import { openLogStore, type LevelDatabase, type LogStore } from '../../../store/index.ts'
import { attachLogPosition } from '../../../gateway/mqtt/log-position.ts'
import { LevelSessionPersistence, SessionPersistenceError, type SessionBroker, type SessionPacket } from '../../../gateway/mqtt/session-persistence.ts'
import { keys, TAG_CURSOR, TAG_OUTGOING } from '../../../gateway/mqtt/session-format.ts'
import { buildConfig } from '../../../gateway/config/config.ts'

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
}

/** The database, log store and session persistence as gateway.ts builds them (no client connected). */
async function open (dir: string, window = 100): Promise<Gateway> {
  const db = new ClassicLevel(dir)
  await db.open()
  const store = await openLogStore({ db: db as unknown as LevelDatabase })
  opened.push({ db, store })
  const sessions = (db as unknown as LevelDatabase).sublevel('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
  const persistence = new LevelSessionPersistence(sessions, { writer: store, log: store, window })
  const broker: SessionBroker = { id: 'gw', counter: 0 }
  await persistence.setup(broker)
  return { db, store, sessions, persistence, broker }
}

async function fresh (window?: number): Promise<{ dir: string, gw: Gateway }> {
  const dir = await mkdtemp(join(tmpdir(), 'edgemq-cursors-'))
  dirs.push(dir)
  const gw = await open(dir, window)
  for (const stream of ['t1/telemetry', 't2/telemetry']) await gw.store.createStream(stream, { partitions: 2 })
  return { dir, gw }
}

/** A kill -9: nothing is destroyed or flushed beyond what was awaited; the database is reopened. */
async function restart (dir: string, gw: Gateway, window?: number): Promise<Gateway> {
  await gw.store.close()
  await gw.db.close()
  return await open(dir, window)
}

let counter = 0
/** What authorizePublish does for a routed QoS 1 publish: append, then hand aedes the packet carrying its position. */
async function publish (gw: Gateway, tenant: string, device: string, body: string, qos: 0 | 1 | 2 = 1): Promise<SessionPacket> {
  const topic = `devices/${device}/telemetry/t`
  const stream = `${tenant}/telemetry`
  const { partition, offset } = await gw.store.append(stream, device, { payload: Buffer.from(body), topic, qos })
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

/** Reads the session's queue as aedes does, giving each packet a message id; PUBACKs those in `ack`. */
async function drain (gw: Gateway, clientId: string, count: number, ack: (i: number) => boolean = () => true): Promise<SessionPacket[]> {
  const client = { id: clientId }
  const got: SessionPacket[] = []
  const it = gw.persistence.outgoingStream(client)[Symbol.asyncIterator]()
  for (let i = 0; i < count; i++) {
    const { value, done } = await it.next() as IteratorResult<SessionPacket>
    if (done === true) break
    const messageId = i + 1
    await gw.persistence.outgoingUpdate(client, { ...value, messageId })
    got.push({ ...value, messageId })
    if (ack(i)) await gw.persistence.outgoingClearMessageId(client, { cmd: 'puback', messageId })
  }
  await it.return?.()
  return got
}

const bodies = (packets: readonly SessionPacket[]): string[] => packets.map((p) => String(p.payload))

describe('session cursors into the log', () => {
  it('keeps one cursor per partition for an offline session instead of a copy per message, and reads the records back', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 20; i++) await publish(gw, 't1', `d${i % 4}`, `m${i}`)
    expect(await keysWith(gw, TAG_OUTGOING)).toBe(0)
    expect(await keysWith(gw, TAG_CURSOR)).toBeLessThanOrEqual(2)
    expect(gw.persistence.hasSessionState({ id: 'svc' })).toBe(true)

    const got = await drain(gw, 'svc', 100)
    expect(got).toHaveLength(20)
    expect(got.every((p) => p.qos === 1 && p.dup === false && String(p.topic).startsWith('t1/devices/'))).toBe(true)
    // per device (one partition each), in publish order
    for (let d = 0; d < 4; d++) {
      const mine = got.filter((p) => String(p.topic) === `t1/devices/d${d}/telemetry/t`).map((p) => String(p.payload))
      expect(mine).toEqual([0, 1, 2, 3, 4].map((k) => `m${k * 4 + d}`))
    }
    expect(await drain(gw, 'svc', 100)).toEqual([]) // all acknowledged
  })

  it('never gives a session another tenant\'s records, nor records its subscriptions do not match', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'a' }, [{ topic: 't1/devices/d1/telemetry/#', qos: 1 }])
    await gw.persistence.addSubscriptions({ id: 'b' }, [{ topic: 't2/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 12; i++) {
      await publish(gw, 't1', `d${i % 3}`, `t1-${i}`)
      await publish(gw, 't2', `d${i % 3}`, `t2-${i}`)
    }
    const a = await drain(gw, 'a', 100)
    const b = await drain(gw, 'b', 100)
    expect(bodies(a)).toEqual([1, 4, 7, 10].map((i) => `t1-${i}`))
    expect(a.every((p) => p.topic === 't1/devices/d1/telemetry/t')).toBe(true)
    expect(b).toHaveLength(12)
    expect(b.every((p) => String(p.topic).startsWith('t2/') && String(p.payload).startsWith('t2-'))).toBe(true)
  })

  it('redelivers from the cursor after a restart: only the unacknowledged, with DUP set', async () => {
    const { dir, gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 10; i++) await publish(gw, 't1', 'd0', `m${i}`)
    const first = await drain(gw, 'svc', 10, (i) => i < 4)
    expect(bodies(first)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9].map((i) => `m${i}`))
    // the cursor's advance goes out in a later group commit
    const key = keys.cursor('svc', 't1/telemetry', gw.store.partitionFor('t1/telemetry', 'd0'))
    await expect.poll(async () => (await gw.sessions.get<Buffer, Buffer>(key, { keyEncoding: 'buffer', valueEncoding: 'buffer' }))?.readBigUInt64BE(0)).toBe(4n)
    const again = await restart(dir, gw)
    const second = await drain(again, 'svc', 100)
    expect(bodies(second)).toEqual([4, 5, 6, 7, 8, 9].map((i) => `m${i}`))
    expect(second.every((p) => p.dup === true)).toBe(true)
    // a message logged after the restart was never sent before
    await publish(again, 't1', 'd0', 'after')
    const third = await drain(again, 'svc', 100)
    expect(third.map((p) => [String(p.payload), p.dup])).toEqual([['after', false]])
  })

  it('keeps at most `window` deliveries unacknowledged while it reads the log', async () => {
    const { gw } = await fresh(3)
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 6; i++) await publish(gw, 't1', 'd0', `m${i}`)
    const client = { id: 'svc' }
    const it = gw.persistence.outgoingStream(client)[Symbol.asyncIterator]()
    for (let i = 1; i <= 3; i++) {
      const { value } = await it.next() as IteratorResult<SessionPacket>
      await gw.persistence.outgoingUpdate(client, { ...value, messageId: i })
    }
    let acked = false
    const fourth = it.next().then((r) => ({ r, ackedBefore: acked }))
    // a log read takes a LevelDB round trip; the stream has had one to move on when it was not waiting
    await gw.store.read('t1/telemetry', 0, 0, { maxRecords: 6 })
    await gw.store.read('t1/telemetry', 1, 0, { maxRecords: 6 })
    acked = true
    await gw.persistence.outgoingClearMessageId(client, { cmd: 'puback', messageId: 1 })
    const { r, ackedBefore } = await fourth
    expect(ackedBefore).toBe(true)
    expect(String((r.value as SessionPacket).payload)).toBe('m3')
    await it.return?.()
  })

  it('queues QoS 2 deliveries and unrouted messages as copies', async () => {
    const { gw } = await fresh()
    await gw.persistence.addSubscriptions({ id: 'q2' }, [{ topic: 't1/devices/+/telemetry/#', qos: 2 }])
    await publish(gw, 't1', 'd0', 'two', 2)
    await publish(gw, 't1', 'd0', 'one', 1)
    // a QoS 2 publish to a QoS 2 subscription is a copy; QoS 1 to it is a cursor
    expect(await keysWith(gw, TAG_OUTGOING)).toBe(1)
    const got = await drain(gw, 'q2', 100)
    expect(got.map((p) => [String(p.payload), p.qos])).toEqual([['two', 2], ['one', 1]])
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

  it('refuses a window that is not a positive integer', () => {
    const db = new ClassicLevel(join(tmpdir(), 'never-opened'))
    for (const window of [0, -1, 1.5, Number.NaN]) {
      const err = (() => { try { new LevelSessionPersistence(db as unknown as LevelDatabase, { window }); return null } catch (e) { return e } })()
      expect(err).toBeInstanceOf(SessionPersistenceError)
      expect((err as SessionPersistenceError).code).toBe('GW_SESSION_INVALID_ARGUMENT')
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

  it('holds retention at the lowest cursor, and lets it go as PUBACKs advance it', async () => {
    const { gw } = await fresh()
    await gw.store.createStream('t3/telemetry', { partitions: 1, retentionBytes: 1 })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't3/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 6; i++) await publish(gw, 't3', 'd0', `m${i}`)
    await drain(gw, 'svc', 6, (i) => i < 2)
    await gw.store.enforceRetention()
    expect(gw.store.partitionInfo('t3/telemetry', 0).logStartOffset).toBe(2) // the record the session has not acknowledged stays
    const all = await drain(gw, 'svc', 100)
    expect(bodies(all)).toEqual(['m2', 'm3', 'm4', 'm5'])
    await expect.poll(async () => {
      await gw.store.enforceRetention()
      return gw.store.partitionInfo('t3/telemetry', 0).logStartOffset
    }).toBeGreaterThan(2)
  })

  it('drops the cursors of a session that unsubscribed from everything, keeping sent unacknowledged deliveries as copies', async () => {
    const { gw } = await fresh()
    await gw.store.createStream('t3/telemetry', { partitions: 1, retentionBytes: 1 })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't3/devices/+/telemetry/#', qos: 1 }])
    for (let i = 0; i < 4; i++) await publish(gw, 't3', 'd0', `m${i}`)
    await drain(gw, 'svc', 2, () => false) // two sent, none acknowledged
    await gw.persistence.removeSubscriptions({ id: 'svc' }, ['t3/devices/+/telemetry/#'])
    expect(await keysWith(gw, TAG_CURSOR)).toBe(0)
    await gw.store.enforceRetention()
    expect(gw.store.partitionInfo('t3/telemetry', 0).logStartOffset).toBeGreaterThan(0)
    const again = await gw.persistence.outgoingStream({ id: 'svc' }).toArray() as SessionPacket[]
    expect(again.map((p) => [String(p.payload), p.messageId])).toEqual([['m0', 1], ['m1', 2]])
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
      return { gw: { db, store, sessions, persistence, broker }, events }
    }
    const expired = async (): Promise<string[]> => (await gw.persistence.expireSessions()).map((e) => `${e.clientId} ${e.source} ${e.seconds}`)
    let { gw, events } = await openAt()
    await gw.store.createStream('t3/telemetry', { partitions: 1, retentionBytes: 1 })
    for (const id of ['gone', 'stays']) {
      events.emit('client', { id })
      await gw.persistence.markSession({ id })
      await gw.persistence.addSubscriptions({ id }, [{ topic: 't3/devices/+/telemetry/#', qos: 1 }])
    }
    events.emit('clientDisconnect', { id: 'gone' })
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
      return { gw: { db, store, sessions, persistence, broker }, events }
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
    for (const c of clients) events.emit('clientDisconnect', c.id === 'changed' ? { ...c, sessionExpiryInterval: 10 } : c)
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
    const bad = [['sessionInflight', 0], ['sessionInflight', 65536], ['maxQueuedMessagesPerSession', 0], ['maxQueuedMessagesPerSession', 1.5],
      ['sessionExpirySeconds', -1], ['sessionExpirySeconds', 'a day'], ['sessionExpirySeconds', 0xffffffff]] as const
    for (const [key, value] of bad) {
      expect(() => buildConfig({ mqtt: { [key]: value } })).toThrow(expect.objectContaining({ code: 'GW_CONFIG_INVALID', message: expect.stringContaining(key) }))
    }
    expect(buildConfig({}).mqtt).toMatchObject({ sessionInflight: 100, maxQueuedMessagesPerSession: 100_000, sessionExpirySeconds: 0 })
  })
})
