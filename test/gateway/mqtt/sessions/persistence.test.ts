/**
 * LevelSessionPersistence: aedes-persistence's abstract suite on memory-level,
 * classic-level and classic-level reloaded after every write (run by node:test
 * in a child process, see fixtures/persistence-abstract.ts), then what users
 * notice across a gateway restart: close the classic-level database, open it
 * again, and the sessions are still there.
 */
import { spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Duplex, PassThrough, type Readable } from 'node:stream'
import { fileURLToPath } from 'node:url'
import { Aedes } from 'aedes'
import { ClassicLevel } from 'classic-level'
import { MemoryLevel } from 'memory-level'
import { MqttClient, type IClientOptions, type IPublishPacket } from 'mqtt'
import { afterEach, describe, expect, it } from 'vitest'
import { openLogStore, type ExtraOperation, type LevelDatabase } from '../../../../store/index.ts'
import { TAG_CURSOR } from '../../../../gateway/mqtt/sessions/format.ts'
import { attachLogPosition } from '../../../../gateway/mqtt/log-position.ts'
import {
  LevelSessionPersistence, SessionPersistenceError, type SessionBroker, type SessionClient, type SessionPacket,
} from '../../../../gateway/mqtt/sessions/persistence.ts'

const ROOT = fileURLToPath(new URL('../../../..', import.meta.url))
const FIXTURE = 'test/gateway/fixtures/persistence-abstract.ts'
/** Tests in aedes-persistence 11.0.0's abstract.js; fewer passing means some did not run. */
const ABSTRACT_TESTS = 50

function runNode (args: readonly string[]): Promise<{ code: number | null, stdout: string, stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => { stdout += chunk })
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk })
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}

describe('aedes-persistence abstract suite', () => {
  it.concurrent.each(['memory', 'classic', 'reopen'])('passes on %s', async (backend) => {
    const { code, stdout, stderr } = await runNode(['--import', 'tsx', '--test-reporter=tap', FIXTURE, backend])
    const count = (name: string): number => Number(new RegExp(`^# ${name} (\\d+)$`, 'm').exec(stdout)?.[1] ?? NaN)
    const failed = stdout.split('\n').filter((line) => /^\s*not ok /.test(line))
    expect({ code, fail: count('fail'), failed, stderr: code === 0 ? '' : stderr.slice(-2000) })
      .toEqual({ code: 0, fail: 0, failed: [], stderr: '' })
    expect(count('pass')).toBeGreaterThanOrEqual(ABSTRACT_TESTS)
    expect(count('tests')).toBe(count('pass'))
  }, 120_000)
})

// ---------------------------------------------------------------------------
// close → reopen of a classic-level database

const dirs: string[] = []
const dbs: ClassicLevel[] = []

afterEach(async () => {
  for (const db of dbs.splice(0)) await db.close().catch(() => {})
  for (const dir of dirs.splice(0)) await rm(dir, { recursive: true, force: true })
})

async function openDb (dir?: string): Promise<{ dir: string, db: ClassicLevel }> {
  const location = dir ?? await mkdtemp(join(tmpdir(), 'edgemq-sessions-'))
  if (dir === undefined) dirs.push(location)
  const db = new ClassicLevel(location)
  await db.open()
  dbs.push(db)
  return { dir: location, db }
}

function sessionsOf (db: ClassicLevel | MemoryLevel): LevelDatabase {
  return (db as unknown as LevelDatabase).sublevel('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
}

/** The persistence as the gateway builds it: on the `sessions` sublevel, writing through the log store's writer. */
async function openPersistence (db: ClassicLevel | MemoryLevel, broker: SessionBroker = { id: 'gw', counter: 0 }): Promise<LevelSessionPersistence> {
  const store = await openLogStore({ db: db as unknown as LevelDatabase })
  const persistence = new LevelSessionPersistence(sessionsOf(db), { writer: store })
  await persistence.setup(broker)
  return persistence
}

/** A gateway restart: the database is closed under the persistence (no destroy, as on SIGKILL) and opened again. */
async function restart (dir: string, db: ClassicLevel, broker?: SessionBroker): Promise<{ db: ClassicLevel, persistence: LevelSessionPersistence }> {
  await db.close()
  const reopened = (await openDb(dir)).db
  return { db: reopened, persistence: await openPersistence(reopened, broker) }
}

async function toArray (stream: Readable): Promise<SessionPacket[]> {
  return await stream.toArray() as SessionPacket[]
}

function publish (topic: string, payload: string, brokerCounter: number, extra: Partial<SessionPacket> = {}): SessionPacket {
  return { cmd: 'publish', topic, payload: Buffer.from(payload), qos: 1, retain: false, dup: false, brokerId: 'gw', brokerCounter, ...extra }
}

async function errorOf (promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise
  } catch (err) {
    return err
  }
  throw new Error('expected a rejection')
}

describe('sessions survive a restart (classic-level close → reopen)', () => {
  it('keeps subscriptions, their matching index and the offline counts', async () => {
    const { dir, db } = await openDb()
    const before = await openPersistence(db)
    await before.addSubscriptions({ id: 'dev-1' }, [
      { topic: 'cmd/dev-1/#', qos: 1, rh: 0, rap: false, nl: false },
      { topic: 'broadcast', qos: 0 },
      { topic: 'sid', qos: 2, subscriptionIdentifier: 7 },
    ])
    await before.addSubscriptions({ id: 'dev-10' }, [{ topic: 'cmd/+/reboot', qos: 2 }])
    await before.removeSubscriptions({ id: 'dev-10' }, ['nothing-there'])

    const { persistence } = await restart(dir, db)
    expect(await persistence.subscriptionsByClient({ id: 'dev-1' })).toEqual([
      { topic: 'broadcast', qos: 0 },
      { topic: 'cmd/dev-1/#', qos: 1, rh: 0, rap: false, nl: false },
      { topic: 'sid', qos: 2, subscriptionIdentifier: 7 },
    ])
    const matched = await persistence.subscriptionsByTopic('cmd/dev-1/reboot')
    expect(matched.map((s) => [s.clientId, s.topic, s.qos]).sort()).toEqual([['dev-1', 'cmd/dev-1/#', 1], ['dev-10', 'cmd/+/reboot', 2]])
    expect(await persistence.subscriptionsByTopic('broadcast')).toEqual([]) // QoS 0: restored, never queued
    expect(await persistence.countOffline()).toEqual({ subsCount: 3, clientsCount: 2 })
    expect(await toArray(persistence.getClientList('cmd/+/reboot'))).toEqual(['dev-10'])
  })

  it('keeps removals and a clean session', async () => {
    const { dir, db } = await openDb()
    const before = await openPersistence(db)
    await before.addSubscriptions({ id: 'a' }, [{ topic: 't/1', qos: 1 }, { topic: 't/2', qos: 1 }])
    await before.addSubscriptions({ id: 'ab' }, [{ topic: 't/1', qos: 1 }])
    await before.removeSubscriptions({ id: 'a' }, ['t/1'])
    await before.cleanSubscriptions({ id: 'ab' })

    const { persistence } = await restart(dir, db)
    expect(await persistence.subscriptionsByClient({ id: 'a' })).toEqual([{ topic: 't/2', qos: 1 }])
    expect(await persistence.subscriptionsByClient({ id: 'ab' })).toEqual([])
    expect(await persistence.subscriptionsByTopic('t/1')).toEqual([])
  })

  it('keeps a QoS 1 offline queue in order, with the message id it was sent under, until PUBACK', async () => {
    const { dir, db } = await openDb()
    const before = await openPersistence(db)
    const sub = { clientId: 'dev-1' }
    await before.outgoingEnqueueCombi([sub, { clientId: 'dev-2' }], publish('cmd/dev-1', 'first', 1))
    await before.outgoingEnqueue(sub, publish('cmd/dev-1', 'second', 2))
    await before.outgoingUpdate({ id: 'dev-1' }, publish('cmd/dev-1', 'first', 1, { messageId: 17 }))

    const second = await restart(dir, db)
    const queued = await toArray(second.persistence.outgoingStream({ id: 'dev-1' }))
    expect(queued.map((p) => [p.payload?.toString(), p.messageId, p.qos, p.brokerCounter])).toEqual([['first', 17, 1, 1], ['second', undefined, 1, 2]])
    expect(await toArray(second.persistence.outgoingStream({ id: 'dev-2' }))).toHaveLength(1)

    // PUBACK for message 17 after the restart
    const acked = await second.persistence.outgoingClearMessageId({ id: 'dev-1' }, { cmd: 'puback', messageId: 17 })
    expect(acked?.payload?.toString()).toBe('first')
    expect(acked?.messageId).toBe(17)

    const third = await restart(dir, second.db)
    expect((await toArray(third.persistence.outgoingStream({ id: 'dev-1' }))).map((p) => p.payload?.toString())).toEqual(['second'])
    // the sequence resumes after the largest stored one, so new entries queue behind old ones
    await third.persistence.outgoingEnqueue(sub, publish('cmd/dev-1', 'third', 3))
    expect((await toArray(third.persistence.outgoingStream({ id: 'dev-1' }))).map((p) => p.payload?.toString())).toEqual(['second', 'third'])
  })

  it('keeps a QoS 2 delivery that reached PUBREL', async () => {
    const { dir, db } = await openDb()
    const before = await openPersistence(db)
    await before.outgoingEnqueue({ clientId: 'dev-1' }, publish('cmd/dev-1', 'x', 5, { qos: 2 }))
    await before.outgoingUpdate({ id: 'dev-1' }, publish('cmd/dev-1', 'x', 5, { qos: 2, messageId: 9 }))
    await before.outgoingUpdate({ id: 'dev-1' }, { cmd: 'pubrel', messageId: 9 })

    const { persistence } = await restart(dir, db)
    expect(await toArray(persistence.outgoingStream({ id: 'dev-1' }))).toEqual([{ cmd: 'pubrel', messageId: 9 }])
    expect(await persistence.outgoingClearMessageId({ id: 'dev-1' }, { cmd: 'pubcomp', messageId: 9 })).toEqual({ cmd: 'pubrel', messageId: 9 })
  })

  it('resends that PUBREL on every reconnect, though aedes hands it back with a write callback and a new counter', async () => {
    // aedes' reconnect path (lib/handlers/connect.js emptyQueue) wraps each queued packet in a QoSPacket (a fresh
    // brokerCounter, a writeCallback bound to the client) and passes it to outgoingUpdate before writing it. That
    // update used to reject (cbor cannot encode a function), so the device was disconnected at every reconnect and
    // never got the PUBREL: a client that releases on PUBREL never got the message (aedes' "resend pubrel on
    // non-clean reconnect QoS 2").
    const { dir, db } = await openDb()
    const before = await openPersistence(db)
    await before.outgoingEnqueue({ clientId: 'dev-1' }, publish('cmd/dev-1', 'x', 5, { qos: 2 }))
    await before.outgoingUpdate({ id: 'dev-1' }, publish('cmd/dev-1', 'x', 5, { qos: 2, messageId: 9 }))
    await before.outgoingUpdate({ id: 'dev-1' }, { cmd: 'pubrel', messageId: 9 })
    for (let reconnect = 0; reconnect < 3; reconnect++) {
      const [queued] = await toArray(before.outgoingStream({ id: 'dev-1' }))
      // aedes-packet keeps a stored brokerId and brokerCounter, and numbers a packet that has none
      const resent = { ...queued, brokerId: queued?.brokerId ?? 'gw', brokerCounter: queued?.brokerCounter ?? 100, writeCallback: () => {} }
      await before.outgoingUpdate({ id: 'dev-1' }, resent)
      expect(await toArray(before.outgoingStream({ id: 'dev-1' }))).toMatchObject([{ cmd: 'pubrel', messageId: 9 }])
    }
    const { persistence } = await restart(dir, db)
    const [stored] = await toArray(persistence.outgoingStream({ id: 'dev-1' }))
    expect(stored).toMatchObject({ cmd: 'pubrel', messageId: 9, brokerId: 'gw', brokerCounter: 100 })
    expect(stored).not.toHaveProperty('writeCallback')
    expect(await persistence.outgoingClearMessageId({ id: 'dev-1' }, { cmd: 'pubcomp', messageId: 9 })).toMatchObject({ cmd: 'pubrel', messageId: 9 })
  })

  it('gives stored subscriptions back in aedes-persistence\'s shape: rh, rap, nl always there', async () => {
    const { db } = await openDb()
    const persistence = await openPersistence(db)
    await persistence.addSubscriptions({ id: 'dev-1' }, [{ topic: 'a', qos: 1 }, { topic: 'b', qos: 2, rh: 1, rap: true, nl: false, subscriptionIdentifier: 3 }])
    const subs = await persistence.subscriptionsByClient({ id: 'dev-1' })
    expect(subs.map((sub) => Object.keys(sub).sort())).toEqual([
      ['nl', 'qos', 'rap', 'rh', 'topic'],
      ['nl', 'qos', 'rap', 'rh', 'subscriptionIdentifier', 'topic'],
    ])
  })

  it('keeps retained messages, and their deletion', async () => {
    const { dir, db } = await openDb()
    const before = await openPersistence(db)
    await before.storeRetained(publish('status/dev-1', 'online', 1, { retain: true }))
    await before.storeRetained(publish('status/dev-2', 'online', 2, { retain: true }))
    await before.storeRetained(publish('$SYS/x', 'internal', 3, { retain: true }))
    await before.storeRetained(publish('status/dev-2', '', 4, { retain: true, payload: Buffer.alloc(0) }))

    const { persistence } = await restart(dir, db)
    const retained = await toArray(persistence.createRetainedStreamCombi(['status/+', 'status/#', '#']))
    expect(retained).toEqual([publish('status/dev-1', 'online', 1, { retain: true })])
    // [MQTT-4.7.2-1]: '$' topics only match a filter that names them
    expect((await toArray(persistence.createRetainedStream('$SYS/#'))).map((p) => p.topic)).toEqual(['$SYS/x'])
  })

  it('keeps wills and inbound QoS 2 packets awaiting PUBREL', async () => {
    const { dir, db } = await openDb()
    const before = await openPersistence(db)
    await before.putWill({ id: 'dev-1' }, { cmd: 'publish', topic: 'status/dev-1', payload: Buffer.from('offline'), qos: 1, retain: true })
    await before.incomingStorePacket({ id: 'dev-1' }, { cmd: 'publish', topic: 'telemetry', payload: Buffer.from('42'), qos: 2, messageId: 300 })

    const { persistence } = await restart(dir, db, { id: 'gw-after', counter: 0 })
    expect(await toArray(persistence.streamWill({ 'gw-after': Date.now() }))).toEqual([
      { cmd: 'publish', topic: 'status/dev-1', payload: Buffer.from('offline'), qos: 1, retain: true, brokerId: 'gw', clientId: 'dev-1' },
    ])
    expect((await persistence.incomingGetPacket({ id: 'dev-1' }, { messageId: 300 })).payload).toEqual(Buffer.from('42'))
    await persistence.incomingDelPacket({ id: 'dev-1' }, { messageId: 300 })
    expect(await errorOf(persistence.incomingGetPacket({ id: 'dev-1' }, { messageId: 300 }))).toMatchObject({ code: 'GW_SESSION_NOT_FOUND' })
  })

  it('raises broker.counter above the counters its id left queued', async () => {
    const { dir, db } = await openDb()
    const before = await openPersistence(db)
    await before.outgoingEnqueue({ clientId: 'dev-1' }, publish('t', 'x', 500))
    await before.outgoingEnqueue({ clientId: 'dev-1' }, publish('t', 'y', 7, { brokerId: 'other' }))
    const broker = { id: 'gw', counter: 0 }
    await restart(dir, db, broker)
    expect(broker.counter).toBe(500)
  })

  it('drops the refused filters older gateways stored as $denied/…, in one batch at load', async () => {
    const { dir, db } = await openDb()
    const before = await openPersistence(db)
    await before.addSubscriptions({ id: 'dev-1' }, [{ topic: '$denied/admin/#', qos: 1 }, { topic: 'cmd/dev-1', qos: 1 }])
    await before.addSubscriptions({ id: 'dev-2' }, [{ topic: '$denied/x', qos: 0 }])
    const { db: again, persistence } = await restart(dir, db)
    expect(await persistence.subscriptionsByClient({ id: 'dev-1' })).toEqual([{ topic: 'cmd/dev-1', qos: 1 }])
    expect(await persistence.countOffline()).toEqual({ subsCount: 1, clientsCount: 1 })
    expect(persistence.hasSessionState({ id: 'dev-2' })).toBe(false)
    const { db: last, persistence: third } = await restart(dir, again)
    expect(await third.subscriptionsByClient({ id: 'dev-1' })).toEqual([{ topic: 'cmd/dev-1', qos: 1 }])
    // gone from disk, not only skipped
    const stored = await sessionsOf(last).keys<Buffer>({ keyEncoding: 'buffer' }).all()
    expect(stored.filter((k) => k.includes('$denied/'))).toEqual([])
    expect(stored.filter((k) => k.includes('cmd/dev-1'))).toHaveLength(1)
  })

  it('refuses a key space written by another format version', async () => {
    const { db } = await openDb()
    await sessionsOf(db).put(Buffer.from('V'), Buffer.from([0, 0, 0, 2]), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const err = await errorOf(openPersistence(db))
    expect(err).toBeInstanceOf(SessionPersistenceError)
    expect(err).toMatchObject({ code: 'GW_SESSION_FORMAT_VERSION' })
  })
})

describe('LevelSessionPersistence contract details', () => {
  it('rejects calls before setup and after destroy with codes', async () => {
    const persistence = new LevelSessionPersistence(new MemoryLevel() as unknown as LevelDatabase)
    // aedes calls these once per message and only handles a rejection: none may throw instead, early or late.
    const perMessage = (): Array<Promise<unknown>> => [
      persistence.countOffline(),
      persistence.subscriptionsByTopic('t'),
      persistence.outgoingEnqueueCombi([{ clientId: 'c', qos: 1 }], publish('t', 'x', 1)),
      persistence.outgoingClearMessageId({ id: 'c' }, publish('t', 'x', 1)),
      persistence.outgoingClearMessageId({ id: 'c' }, { cmd: 'puback', messageId: 1 }),
    ]
    for (const call of perMessage()) expect(await errorOf(call)).toMatchObject({ code: 'GW_SESSION_NOT_READY' })
    await persistence.setup({ id: 'gw', counter: 0 })
    await persistence.destroy()
    for (const call of perMessage()) expect(await errorOf(call)).toMatchObject({ code: 'GW_SESSION_CLOSED' })
    expect(await errorOf(persistence.destroy())).toMatchObject({ code: 'GW_SESSION_CLOSED' })
  })

  it('group-commits calls made together into one write batch, through the log store\'s writer', async () => {
    const db = new MemoryLevel()
    let batches = 0
    // abstract-level's implementation hook, which the store's and every sublevel's batches end in
    const internal = db as unknown as { _batch: (...args: unknown[]) => Promise<void> }
    const batch = internal._batch.bind(db)
    internal._batch = (...args: unknown[]) => {
      batches++
      return batch(...args)
    }
    const persistence = await openPersistence(db)
    batches = 0
    await Promise.all(Array.from({ length: 100 }, (_, i) => persistence.outgoingEnqueue({ clientId: `dev-${i}` }, publish('t', 'x', i + 1))))
    expect(batches).toBe(1)
    // a clear sees the body of an enqueue that is still in the queue
    const enqueued = persistence.outgoingEnqueue({ clientId: 'late' }, publish('t', 'late', 1000))
    await persistence.outgoingUpdate({ id: 'late' }, publish('t', 'late', 1000, { messageId: 1 }))
    expect((await persistence.outgoingClearMessageId({ id: 'late' }, { cmd: 'puback', messageId: 1 }))?.payload?.toString()).toBe('late')
    await enqueued
  })

  it('keeps client ids that extend each other apart', async () => {
    const persistence = new LevelSessionPersistence(new MemoryLevel() as unknown as LevelDatabase)
    await persistence.setup({ id: 'gw', counter: 0 })
    await persistence.outgoingEnqueue({ clientId: 'dev' }, publish('t', 'a', 1))
    await persistence.outgoingEnqueue({ clientId: 'dev1' }, publish('t', 'b', 2))
    expect((await toArray(persistence.outgoingStream({ id: 'dev' }))).map((p) => p.payload?.toString())).toEqual(['a'])
  })
})

// ---------------------------------------------------------------------------
// Through aedes itself, over in-memory streams (no sockets)

function streamPair (): { client: Duplex, server: Duplex } {
  const up = new PassThrough()
  const down = new PassThrough()
  return { client: Duplex.from({ readable: down, writable: up }), server: Duplex.from({ readable: up, writable: down }) }
}

interface Device {
  readonly client: MqttClient
  /** Every PUBLISH the client received, in order. */
  readonly messages: IPublishPacket[]
  /** Resolves with CONNACK's session present flag. */
  readonly connected: Promise<boolean>
}

function connect (broker: Aedes, options: IClientOptions): Device {
  const client = new MqttClient(() => {
    const { client: end, server } = streamPair()
    broker.handle(server)
    return end
  }, { protocolVersion: 4, reconnectPeriod: 0, keepalive: 0, ...options })
  const messages: IPublishPacket[] = []
  client.on('message', (_topic, _payload, packet) => { messages.push(packet) })
  const connected = new Promise<boolean>((resolve, reject) => {
    client.once('connect', (connack) => resolve(connack.sessionPresent))
    client.once('error', reject)
  })
  return { client, messages, connected }
}

function closeBroker (broker: Aedes): Promise<void> {
  return new Promise((resolve) => broker.close(() => resolve()))
}

describe('through aedes', () => {
  it('delivers a QoS 1 message queued for an offline device after the gateway restarts', async () => {
    const { dir, db } = await openDb()
    const firstPersistence = new LevelSessionPersistence(sessionsOf(db))
    const first = await Aedes.createBroker({ persistence: firstPersistence })
    const device = connect(first, { clientId: 'dev-1', clean: false })
    expect(await device.connected).toBe(false)
    await device.client.subscribeAsync('cmd/dev-1', { qos: 1 })
    await device.client.endAsync()

    const cloud = connect(first, { clientId: 'cloud', clean: true })
    await cloud.connected
    // aedes sends PUBACK before it stores the retained message and queues
    // offline copies; its 'publish' event comes after both. A shutdown that
    // does not wait for it loses them (see the report on PUBACK ordering).
    const published = new Promise<void>((resolve) => {
      first.on('publish', (packet) => { if (packet.topic === 'status/site') resolve() })
    })
    await cloud.client.publishAsync('cmd/dev-1', 'reboot', { qos: 1 }) // resolves on PUBACK
    await cloud.client.publishAsync('status/site', 'up', { qos: 1, retain: true })
    await published
    await cloud.client.endAsync()
    await closeBroker(first)
    await firstPersistence.destroy() // waits for queued writes
    await db.close()

    const reopened = (await openDb(dir)).db
    const persistence = new LevelSessionPersistence(sessionsOf(reopened))
    const second = await Aedes.createBroker({ persistence })
    const again = connect(second, { clientId: 'dev-1', clean: false })
    expect(await again.connected).toBe(true) // [MQTT-3.2.2-2] the session came back
    await expect.poll(() => again.messages.length).toBe(1)
    expect(again.messages.map((p) => [p.topic, p.payload.toString(), p.qos])).toEqual([['cmd/dev-1', 'reboot', 1]])
    // the device's PUBACK empties the queue
    await expect.poll(async () => (await toArray(persistence.outgoingStream({ id: 'dev-1' }))).length).toBe(0)

    await again.client.subscribeAsync('status/#', { qos: 1 })
    await expect.poll(() => again.messages.length).toBe(2)
    expect([again.messages[1]?.topic, again.messages[1]?.payload.toString(), again.messages[1]?.retain]).toEqual(['status/site', 'up', true])
    await again.client.endAsync()
    await closeBroker(second)
  })

  it('has a server-side publish (the bridge\'s downlink) queued on disk when broker.publish calls back', async () => {
    const { dir, db } = await openDb()
    const broker = await Aedes.createBroker({ persistence: new LevelSessionPersistence(sessionsOf(db)) })
    const device = connect(broker, { clientId: 'dev-7', clean: false })
    await device.connected
    await device.client.subscribeAsync('cmd/dev-7', { qos: 1 })
    await device.client.endAsync()
    await new Promise<void>((resolve, reject) => {
      broker.publish({ cmd: 'publish', topic: 'cmd/dev-7', payload: Buffer.from('on'), qos: 1, retain: false, dup: false },
        (err) => { if (err) reject(err); else resolve() })
    })
    await closeBroker(broker)
    const { persistence } = await restart(dir, db) // no destroy(): only what was written counts
    expect((await toArray(persistence.outgoingStream({ id: 'dev-7' }))).map((p) => p.payload?.toString())).toEqual(['on'])
  })
})

// ---------------------------------------------------------------------------
// What the ack of a logged message waits for (beforeAck, hooks/authorize-publish.ts)

describe('beforeAck: what persistent sessions need on disk before a logged message is acknowledged', () => {
  const STREAM = 't1/telemetry'
  const topicOf = (device: string): string => `t1/devices/${device}/telemetry/t`

  /** The log store and the persistence with cursors into it, as gateway.ts builds them. */
  async function withLog (dir?: string): Promise<{ dir: string, db: ClassicLevel, persistence: LevelSessionPersistence,
    append: (device: string) => Promise<{ stream: string, partition: number, offset: number }> }> {
    const opened = await openDb(dir)
    const store = await openLogStore({ db: opened.db as unknown as LevelDatabase })
    if (dir === undefined) await store.createStream(STREAM, { partitions: 2 })
    const persistence = new LevelSessionPersistence(sessionsOf(opened.db), { writer: store, log: store })
    await persistence.setup({ id: 'gw', counter: 0 })
    const append = async (device: string): Promise<{ stream: string, partition: number, offset: number }> => {
      const { partition, offset } = await store.append(STREAM, device, { payload: Buffer.from(device), topic: `devices/${device}/telemetry/t`, qos: 1 })
      return { stream: STREAM, partition, offset }
    }
    return { ...opened, persistence, append }
  }

  it('waits for nothing without a matching session, for the cursor of a session\'s first message of a partition, then for nothing', async () => {
    const gw = await withLog()
    expect(gw.persistence.beforeAck(topicOf('d0'), 1, await gw.append('d0'))).toBe('unmatched')
    await gw.persistence.markSession({ id: 'svc' })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 2 }]) // QoS 1 messages: min(2, 1)
    await gw.persistence.addSubscriptions({ id: 'clean-only' }, [{ topic: 't1/devices/d0/#', qos: 0 }]) // QoS 0: no cursor, no wait

    const at = await gw.append('d0')
    const first = gw.persistence.beforeAck(topicOf('d0'), 1, at)
    expect(first).toBeInstanceOf(Promise)
    // the partition's next message, before that cursor is on disk, waits for the same write
    const next = { ...at, offset: at.offset + 1 }
    expect(gw.persistence.beforeAck(topicOf('d0'), 1, next)).toBe(first)
    await first
    expect(gw.persistence.beforeAck(topicOf('d0'), 1, next)).toBe('ready')
    // another partition is another first message
    let device = 'd1'
    for (let i = 1; (await gw.append(device)).partition === at.partition; i++) device = `d${i + 1}`
    const other = gw.persistence.beforeAck(topicOf(device), 1, await gw.append(device))
    expect(other).toBeInstanceOf(Promise)
    await other

    // a kill -9 right after: the cursors are on disk, at the messages that created them
    await gw.db.close()
    const { persistence } = await withLog(gw.dir)
    const cursors = persistence.sessionStates().find((s) => s.clientId === 'svc')?.cursors ?? []
    expect(cursors).toContainEqual({ stream: STREAM, partition: at.partition, next: at.offset })
    expect(cursors).toHaveLength(2)
  })

  it('leaves a QoS 2 message to the copy aedes queues before the ack, creating nothing', async () => {
    const gw = await withLog()
    await gw.persistence.markSession({ id: 'svc' })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/#', qos: 2 }])
    expect(gw.persistence.beforeAck(topicOf('d0'), 2, await gw.append('d0'))).toBe('copies')
    expect(gw.persistence.sessionStates().find((s) => s.clientId === 'svc')?.cursors).toEqual([])
  })

  it('sees each SUBSCRIBE, UNSUBSCRIBE, clean session and session end at the next message, though it matches a topic once', async () => {
    const gw = await withLog()
    const topic = topicOf('d0')
    const filter = 't1/devices/+/telemetry/#'
    const next = async (): Promise<{ offset: number, partition: number, wait: unknown }> => {
      const at = await gw.append('d0')
      const wait = gw.persistence.beforeAck(topic, 1, at)
      if (wait instanceof Promise) await wait
      return { ...at, wait }
    }
    const cursorOf = (clientId: string): unknown => gw.persistence.sessionStates().find((s) => s.clientId === clientId)?.cursors
    const matching = async (): Promise<string[]> => (await gw.persistence.subscriptionsByTopic(topic)).map((s) => s.clientId).sort()
    const subscribe = async (clientId: string): Promise<void> => {
      await gw.persistence.markSession({ id: clientId })
      await gw.persistence.addSubscriptions({ id: clientId }, [{ topic: filter, qos: 1 }])
    }

    await subscribe('a')
    expect((await next()).wait).toBeInstanceOf(Promise) // a's cursor into the partition
    expect((await next()).wait).toBe('ready')
    expect(await matching()).toEqual(['a'])

    await subscribe('b')
    expect(await matching()).toEqual(['a', 'b'])
    const joined = await next()
    expect(joined.wait).toBeInstanceOf(Promise) // b's cursor, at the first message after its SUBSCRIBE
    expect(cursorOf('b')).toEqual([{ stream: STREAM, partition: joined.partition, next: joined.offset }])
    expect((await next()).wait).toBe('ready')

    // UNSUBSCRIBE drops a's cursors with its last subscription; subscribing again makes a new one at the next message.
    await gw.persistence.removeSubscriptions({ id: 'a' }, [filter])
    expect(cursorOf('a')).toEqual([])
    expect(await matching()).toEqual(['b'])
    await gw.persistence.addSubscriptions({ id: 'a' }, [{ topic: filter, qos: 1 }])
    const again = await next()
    expect(again.wait).toBeInstanceOf(Promise)
    expect(cursorOf('a')).toEqual([{ stream: STREAM, partition: again.partition, next: again.offset }])

    await gw.persistence.cleanSubscriptions({ id: 'b' }) // b connects with a clean session
    expect(await matching()).toEqual(['a'])
    expect((await next()).wait).toBe('ready')

    expect(await gw.persistence.dropSession('a')).toBe(true) // a's session ends (expiry)
    expect(await matching()).toEqual([])
    expect((await next()).wait).toBe('unmatched')
  })

  it('takes a logged message aedes enqueues for the subscriptions it was given through the cursors, a copy of one the log lacks', async () => {
    const gw = await withLog()
    const topic = topicOf('d0')
    await gw.persistence.markSession({ id: 'svc' })
    await gw.persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    const state = (): unknown => gw.persistence.sessionStates().find((s) => s.clientId === 'svc')
    // aedes' publish after no beforeAck (a will, a retained message): the enqueue creates the cursor.
    const at = await gw.append('d0')
    const logged = publish(topic, 'logged', 1)
    attachLogPosition(logged, at)
    await gw.persistence.outgoingEnqueueCombi(await gw.persistence.subscriptionsByTopic(topic), logged)
    expect(state()).toMatchObject({ cursors: [{ stream: STREAM, partition: at.partition, next: at.offset }], queued: 0 })
    const second = publish(topic, 'logged too', 2)
    attachLogPosition(second, await gw.append('d0'))
    await gw.persistence.outgoingEnqueueCombi(await gw.persistence.subscriptionsByTopic(topic), second)
    expect(state()).toMatchObject({ cursors: [{ stream: STREAM, partition: at.partition, next: at.offset }], queued: 0 })
    // The same topic without a log position (a replicated record): a copy, as for a topic no route sends to the log.
    await gw.persistence.outgoingEnqueueCombi(await gw.persistence.subscriptionsByTopic(topic), publish(topic, 'copy', 3))
    expect(state()).toMatchObject({ queued: 1 })
  })

  it('lets aedes deliver to a connected persistent session a live message it has no copy of (it subscribed meanwhile), not to others', async () => {
    const listeners = new Map<string, (client: SessionClient) => void>()
    const { dir, db } = await openDb()
    const persistence = new LevelSessionPersistence(sessionsOf(db))
    await persistence.setup({ id: 'gw', counter: 0, on: (event, listener) => { listeners.set(event, listener) } })
    await persistence.markSession({ id: 'dev-1' })
    listeners.get('client')?.({ id: 'dev-1' })
    await expect(persistence.outgoingUpdate({ id: 'dev-1' }, publish('t', 'x', 9, { messageId: 5 }))).resolves.toBeUndefined()
    // A QoS 2 one: aedes stores the PUBREL after the client's PUBREC, by packet id; it is there until the PUBCOMP.
    await persistence.outgoingUpdate({ id: 'dev-1' }, publish('t', 'y', 10, { qos: 2, messageId: 6 }))
    await expect(persistence.outgoingUpdate({ id: 'dev-1' }, { cmd: 'pubrel', messageId: 6 })).resolves.toBeUndefined()
    // no connection, or no persistent session: not found, as aedes-persistence says (aedes closes such a client)
    await persistence.markSession({ id: 'dev-2' })
    expect(await errorOf(persistence.outgoingUpdate({ id: 'dev-2' }, publish('t', 'x', 10, { messageId: 6 })))).toMatchObject({ code: 'GW_SESSION_NOT_FOUND' })
    listeners.get('client')?.({ id: 'clean' })
    expect(await errorOf(persistence.outgoingUpdate({ id: 'clean' }, publish('t', 'x', 11, { messageId: 7 })))).toMatchObject({ code: 'GW_SESSION_NOT_FOUND' })

    // Unacknowledged when the gateway stops: the next connection gets both again, the QoS 1 one with its packet id.
    const { persistence: after } = await restart(dir, db)
    expect(await toArray(after.outgoingStream({ id: 'dev-1' }))).toMatchObject([
      { cmd: 'publish', topic: 't', payload: Buffer.from('x'), qos: 1, messageId: 5 },
      { cmd: 'pubrel', messageId: 6 },
    ])
    expect(await after.outgoingClearMessageId({ id: 'dev-1' }, { cmd: 'puback', messageId: 5 })).toMatchObject({ payload: Buffer.from('x') })
    expect(await after.outgoingClearMessageId({ id: 'dev-1' }, { cmd: 'pubcomp', messageId: 6 })).toEqual({ cmd: 'pubrel', messageId: 6 })
    expect(await toArray(after.outgoingStream({ id: 'dev-1' }))).toEqual([])
  })

  it('counts a live copy it queues for a connected persistent session against the queue\'s bound, and keeps none whose write failed', async () => {
    const listeners = new Map<string, (client: SessionClient) => void>()
    const { db } = await openDb()
    const store = await openLogStore({ db: db as unknown as LevelDatabase })
    const overflows: string[] = []
    let failNext = false
    const writer = {
      write: async (ops: readonly ExtraOperation[]): Promise<void> => {
        if (failNext) { failNext = false; throw new Error('ENOSPC (injected)') }
        await store.write(ops)
      },
    }
    const persistence = new LevelSessionPersistence(sessionsOf(db), { writer, maxQueuedPerSession: 1, onQueueOverflow: (clientId, topic) => overflows.push(`${clientId} ${topic}`) })
    await persistence.setup({ id: 'gw', counter: 0, on: (event, listener) => { listeners.set(event, listener) } })
    await persistence.markSession({ id: 'dev-1' })
    listeners.get('client')?.({ id: 'dev-1' })
    // A failed write leaves nothing behind: the id is not busy, the bound not used.
    failNext = true
    expect(await errorOf(persistence.outgoingUpdate({ id: 'dev-1' }, publish('t', 'lost', 1, { messageId: 4 })))).toBeDefined()
    expect(persistence.sessionStates().find((x) => x.clientId === 'dev-1')).toMatchObject({ queued: 0 })
    await persistence.outgoingUpdate({ id: 'dev-1' }, publish('t', 'kept', 2, { messageId: 5 }))
    expect(persistence.sessionStates().find((x) => x.clientId === 'dev-1')).toMatchObject({ queued: 1 })
    // Past the bound: counted as an overflow, and it still goes out (unqueued), as any copy the bound drops.
    await expect(persistence.outgoingUpdate({ id: 'dev-1' }, publish('t', 'over', 3, { messageId: 6 }))).resolves.toBeUndefined()
    expect(overflows).toEqual(['dev-1 t'])
    expect(persistence.sessionStates().find((x) => x.clientId === 'dev-1')).toMatchObject({ queued: 1 })
    // A QoS 2 one past the bound goes out unqueued too; its PUBREL, after the client's PUBREC, is kept until the PUBCOMP.
    await expect(persistence.outgoingUpdate({ id: 'dev-1' }, publish('t', 'over2', 4, { qos: 2, messageId: 7 }))).resolves.toBeUndefined()
    await expect(persistence.outgoingUpdate({ id: 'dev-1' }, { cmd: 'pubrel', messageId: 7 })).resolves.toBeUndefined()
    expect(await toArray(persistence.outgoingStream({ id: 'dev-1' }))).toMatchObject([
      { cmd: 'publish', payload: Buffer.from('kept'), messageId: 5 },
      { cmd: 'pubrel', messageId: 7 },
    ])
    expect(await persistence.outgoingClearMessageId({ id: 'dev-1' }, { cmd: 'pubcomp', messageId: 7 })).toEqual({ cmd: 'pubrel', messageId: 7 })
  })

  it('creates a cursor again, and waits for it, when the write that created it failed: no ack counts on a cursor that is not on disk', async () => {
    const { dir, db } = await openDb()
    const store = await openLogStore({ db: db as unknown as LevelDatabase })
    await store.createStream(STREAM, { partitions: 2 })
    let failures = 1
    const writer = {
      write: async (ops: readonly ExtraOperation[]): Promise<void> => {
        if (failures > 0 && ops.some((op) => op.key[0] === TAG_CURSOR)) {
          failures--
          throw new Error('ENOSPC (injected)')
        }
        await store.write(ops)
      },
    }
    const persistence = new LevelSessionPersistence(sessionsOf(db), { writer, log: store })
    await persistence.setup({ id: 'gw', counter: 0 })
    await persistence.markSession({ id: 'svc' })
    await persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
    const append = async (): Promise<{ stream: string, partition: number, offset: number }> => {
      const { partition, offset } = await store.append(STREAM, 'd0', { payload: Buffer.from('d0'), topic: 'devices/d0/telemetry/t', qos: 1 })
      return { stream: STREAM, partition, offset }
    }

    const first = persistence.beforeAck(topicOf('d0'), 1, await append())
    expect(first).toBeInstanceOf(Promise)
    expect(await errorOf(first as Promise<void>)).toMatchObject({ code: 'GW_SESSION_WRITE_FAILED' }) // its publisher gets no ack
    const m2 = await append()
    const second = persistence.beforeAck(topicOf('d0'), 1, m2)
    expect(second).toBeInstanceOf(Promise) // not 'ready': the cursor is created again
    await second
    expect(persistence.beforeAck(topicOf('d0'), 1, await append())).toBe('ready')

    await db.close() // a kill -9
    const after = await withLog(dir)
    expect(after.persistence.sessionStates().find((s) => s.clientId === 'svc')?.cursors).toEqual([{ stream: STREAM, partition: m2.partition, next: m2.offset }])
  })

  it('deletes a cursor a message created while dropSession read the session\'s keys (it would hold retention and bring the session back)', async () => {
    // The message comes 0 to 11 turns into the drop: before, during and after the read of the cursor keys.
    for (let turns = 0; turns < 12; turns++) {
      const listeners = new Map<string, (client: SessionClient) => void>()
      const { dir, db } = await openDb()
      const store = await openLogStore({ db: db as unknown as LevelDatabase })
      await store.createStream(STREAM, { partitions: 2 })
      const persistence = new LevelSessionPersistence(sessionsOf(db), { writer: store, log: store })
      await persistence.setup({ id: 'gw', counter: 0, on: (event, listener) => { listeners.set(event, listener) } })
      await persistence.markSession({ id: 'svc' })
      await persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't1/devices/+/telemetry/#', qos: 1 }])
      const client = { id: 'svc' } // aedes' events carry one Client object per connection
      listeners.get('client')?.(client)
      listeners.get('clientDisconnect')?.(client)
      const { partition, offset } = await store.append(STREAM, 'd0', { payload: Buffer.from('d0'), topic: 'devices/d0/telemetry/t', qos: 1 })

      const dropping = persistence.dropSession('svc')
      for (let i = 0; i < turns; i++) await new Promise((resolve) => setImmediate(resolve))
      const wait = persistence.beforeAck(topicOf('d0'), 1, { stream: STREAM, partition, offset })
      if (wait instanceof Promise) await wait
      expect(await dropping).toBe(true)
      expect(persistence.cursorLag()).toEqual([])

      await db.close() // a kill -9
      const after = await withLog(dir)
      expect({ turns, present: after.persistence.hasSessionState({ id: 'svc' }), lag: after.persistence.cursorLag() })
        .toEqual({ turns, present: false, lag: [] })
      await after.db.close()
    }
  })

  it('deletes a copy queued while dropSession read the session\'s keys (QoS 2: the session would be back after a restart)', async () => {
    // The copy is queued 0 to 9 turns into the drop: before, during and after the read of the keys.
    for (let turns = 0; turns < 10; turns++) {
      const listeners = new Map<string, (client: SessionClient) => void>()
      const { dir, db } = await openDb()
      const store = await openLogStore({ db: db as unknown as LevelDatabase })
      const persistence = new LevelSessionPersistence(sessionsOf(db), { writer: store })
      await persistence.setup({ id: 'gw', counter: 0, on: (event, listener) => { listeners.set(event, listener) } })
      await persistence.markSession({ id: 'svc' })
      await persistence.addSubscriptions({ id: 'svc' }, [{ topic: 't/#', qos: 2 }])
      const client = { id: 'svc' } // aedes' events carry one Client object per connection
      listeners.get('client')?.(client)
      listeners.get('clientDisconnect')?.(client)

      const dropping = persistence.dropSession('svc')
      for (let i = 0; i < turns; i++) await new Promise((resolve) => setImmediate(resolve))
      const subs = await persistence.subscriptionsByTopic('t/x')
      const queued = persistence.outgoingEnqueueCombi(subs, { cmd: 'publish', topic: 't/x', payload: Buffer.from('q'), qos: 2, retain: false, dup: false, brokerId: 'gw', brokerCounter: turns + 1 })
      expect(await dropping).toBe(true)
      await queued

      await db.close() // a kill -9
      const after = await withLog(dir)
      expect({ turns, present: after.persistence.hasSessionState({ id: 'svc' }) }).toEqual({ turns, present: false })
      await after.db.close()
    }
  })
})
