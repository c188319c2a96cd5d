/**
 * The authorize hooks as thin adapters, without a broker: a context of
 * plain maps, a frozen config, a fresh metrics registry, and fake clients.
 */
import type { Client, PublishPacket, Subscription } from 'aedes'
import { pino } from 'pino'
import { Registry } from 'prom-client'
import { describe, expect, it } from 'vitest'
import type { Identity } from '../../../gateway/access/auth.ts'
import { buildConfig } from '../../../gateway/config/config.ts'
import { createMetrics } from '../../../gateway/metrics/metrics.ts'
import { authorizeForward } from '../../../gateway/mqtt/hooks/authorize-forward.ts'
import { authorizePublish } from '../../../gateway/mqtt/hooks/authorize-publish.ts'
import { authorizeSubscribe } from '../../../gateway/mqtt/hooks/authorize-subscribe.ts'
import { refusals, type ConnectInfo, type HookContext } from '../../../gateway/mqtt/hooks/context.ts'
import type { LogStore } from '../../../store/index.ts'

function context (mqtt: Record<string, unknown> = {}): HookContext {
  const config = buildConfig({
    mqtt,
    users: [{ username: 'd1', tenant: 'acme', role: 'device', password: `scrypt$16384$8$1$${'A'.repeat(22)}==$${'A'.repeat(43)}=` }],
    acl: [{ role: 'device', topic: 'devices/%c/commands/secret', access: 'subscribe', allow: false }],
  })
  const metrics = createMetrics(new Registry(), {
    store: {} as LogStore, diskFreeBytes: () => undefined, diskSizeBytes: () => undefined, healthy: () => true, version: 'test', gatewayId: 'gw',
  })
  const logger = pino({ level: 'silent' })
  const connects = new WeakMap<Client, ConnectInfo>()
  // Only what these two hooks read is real; the rest would be a broker's.
  return {
    config, metrics, logger, connects,
    broker: { on () {} },
    identities: new WeakMap(), connacked: new WeakSet(), toStore: new WeakMap(), oversized: new WeakSet(), sessionMarkers: new WeakSet(), tickets: new WeakMap(),
    replayConnections: new WeakMap(), startupWills: new WeakSet(),
    // a session with no cursor into the log: every live copy may go (sessions/cursors.ts decides otherwise)
    persistence: { forwardLive: () => true },
    ...refusals({ metrics, logger }, connects),
  } as unknown as HookContext
}

function device (ctx: HookContext, who: Identity, connected = true): Client {
  const client = { id: who.clientId, conn: {}, subscriptions: {}, clean: false } as unknown as Client
  ctx.identities.set(client, who)
  if (connected) ctx.connacked.add(client)
  return client
}

const D1: Identity = { tenant: 'acme', role: 'device', username: 'd1', clientId: 'd1' }

function subscribe (ctx: HookContext, client: Client, topic: string): { granted: Subscription | null | undefined, sub: Subscription } {
  const sub = { topic, qos: 1 } as Subscription
  let granted: Subscription | null | undefined
  authorizeSubscribe(ctx)(client, sub, (err, s) => { if (err) throw err; granted = s })
  return { granted, sub }
}

describe('authorizeSubscribe', () => {
  it('mounts an allowed filter in the client\'s tenant and queues it for the session store', () => {
    const ctx = context()
    const client = device(ctx, D1)
    const { granted, sub } = subscribe(ctx, client, 'devices/d1/commands/#')
    expect(granted?.topic).toBe('acme/devices/d1/commands/#')
    expect(ctx.toStore.get(client)).toEqual([sub])
  })

  it('refuses a denied or invalid filter (SUBACK 0x80) and never stores it', () => {
    const ctx = context()
    for (const topic of ['devices/other/commands/#', 'a/#/b']) {
      const client = device(ctx, D1)
      const { granted, sub } = subscribe(ctx, client, topic)
      expect(granted).toBeNull()
      expect(sub.topic).toBe(topic)
      expect(ctx.toStore.get(client)).toBeUndefined()
    }
  })

  it('refuses every filter of an oversized SUBSCRIBE and new filters over the session limit, counted by reason', () => {
    const ctx = context({ maxSubscriptionsPerSession: 2 })
    const client = device(ctx, D1)
    const hook = authorizeSubscribe(ctx)
    const ask = (topic: string, tag = false): Subscription | null | undefined => {
      const sub = { topic, qos: 1 } as Subscription
      if (tag) ctx.oversized.add(sub)
      let granted: Subscription | null | undefined
      hook(client, sub, (err, s) => { if (err) throw err; granted = s })
      return granted
    }
    expect(ask('devices/d1/commands/a', true)).toBeNull()
    expect(ask('devices/d1/commands/a')?.topic).toBe('acme/devices/d1/commands/a')
    expect(ask('devices/d1/commands/b')?.topic).toBe('acme/devices/d1/commands/b')
    expect(ask('devices/d1/commands/c')).toBeNull()
    // a filter the client holds is a resubscription, not a new one
    ;(client as unknown as { subscriptions: Record<string, unknown> }).subscriptions['acme/devices/d1/commands/a'] = { qos: 1 }
    expect(ask('devices/d1/commands/a')?.topic).toBe('acme/devices/d1/commands/a')
    expect(ctx.toStore.get(client)?.map((sub) => sub.topic)).toEqual(['acme/devices/d1/commands/a', 'acme/devices/d1/commands/b', 'acme/devices/d1/commands/a'])
  })

  it('takes a subscription restored before the CONNACK as already mounted, and refuses one of another tenant', () => {
    const ctx = context()
    const restoring = device(ctx, D1, false)
    expect(subscribe(ctx, restoring, 'acme/devices/d1/commands/#').granted?.topic).toBe('acme/devices/d1/commands/#')
    expect(subscribe(ctx, restoring, 'other/devices/d1/commands/#').granted).toBeNull()
  })

  it('answers a session-present marker with nothing subscribed', () => {
    const ctx = context()
    const marker = { topic: '$edgemq/session-present', qos: 0 } as Subscription
    ctx.sessionMarkers.add(marker)
    let granted: Subscription | null | undefined = marker
    const client = device(ctx, D1)
    authorizeSubscribe(ctx)(client, marker, (_err, s) => { granted = s })
    expect(granted).toBeNull()
    expect(ctx.toStore.get(client)).toBeUndefined()
  })
})

describe('authorizeForward', () => {
  const packet = (topic: string): Parameters<ReturnType<typeof authorizeForward>>[1] =>
    ({ cmd: 'publish', topic, payload: Buffer.from('x'), qos: 0, retain: false, dup: false }) as Parameters<ReturnType<typeof authorizeForward>>[1]

  it('unmounts a delivery of the client\'s tenant in place', () => {
    const ctx = context()
    const p = packet('acme/devices/d1/commands/reboot')
    expect(authorizeForward(ctx)(device(ctx, D1), p)).toBe(p)
    expect(p.topic).toBe('devices/d1/commands/reboot')
  })

  it('holds back a live copy the session reads from its cursors into the log instead', () => {
    const ctx = { ...context(), persistence: { forwardLive: () => false } } as unknown as HookContext
    const p = packet('acme/devices/d1/commands/reboot')
    expect(authorizeForward(ctx)(device(ctx, D1), p)).toBeNull()
    expect(p.topic).toBe('acme/devices/d1/commands/reboot')
  })

  it('never forwards across tenants, nor what the read ACL denies, nor to a client without an identity', () => {
    const ctx = context()
    const d1 = device(ctx, D1)
    expect(authorizeForward(ctx)(d1, packet('other/devices/d1/commands/reboot'))).toBeNull()
    expect(authorizeForward(ctx)(d1, packet('acme/devices/d1/commands/secret'))).toBeNull()
    expect(authorizeForward(ctx)({ id: 'ghost', conn: {} } as unknown as Client, packet('acme/devices/d1/commands/reboot'))).toBeNull()
  })

  it('gives the same verdict on every delivery of a topic, but follows the subscriptions for a `$` topic', () => {
    const ctx = context()
    const hook = authorizeForward(ctx)
    const d1 = device(ctx, D1)
    for (let i = 0; i < 3; i++) {
      expect(hook(d1, packet('acme/devices/d1/commands/reboot'))?.topic).toBe('devices/d1/commands/reboot')
      expect(hook(d1, packet('acme/devices/d1/commands/secret'))).toBeNull()
    }
    const svc = device(ctx, { tenant: 'acme', role: 'service', username: 'svc', clientId: 'svc' })
    expect(hook(svc, packet('acme/$edgemq/notice'))).toBeNull() // not subscribed to by name
    ;(svc as unknown as { subscriptions: Record<string, unknown> }).subscriptions['acme/$edgemq/#'] = { qos: 0 }
    expect(hook(svc, packet('acme/$edgemq/notice'))?.topic).toBe('$edgemq/notice')
  })
})

describe('authorizePublish: acknowledged, then delivered', () => {
  const D2: Identity = { tenant: 'acme', role: 'service', username: null, clientId: 'svc' }
  const position = { stream: 'acme/telemetry', partition: 0, offset: 0 }

  /** authorizePublish over an appender that is done at once and an aedes publish that finishes when the test says so. */
  function publisher (beforeAck: () => unknown): {
    publish: (client: Client, n: number, retain?: boolean) => { acked: boolean }
    delivered: Array<{ n: number, finish: () => void }>
  } {
    const delivered: Array<{ n: number, finish: () => void }> = []
    const ctx = {
      ...context(),
      users: [],
      persistence: { forwardLive: () => true, beforeAck },
      appender: {
        append: (_c: unknown, _w: unknown, _t: unknown, _p: unknown, done: (err: null, dup: boolean, at: typeof position) => void) =>
          done(null, false, position),
      },
      publish: (p: PublishPacket, _c: unknown, done: (err?: Error) => void) => { delivered.push({ n: Number(p.payload.toString()), finish: () => done() }) },
      startupWills: new WeakSet(),
      wills: { firesStoredWill: () => false },
    } as unknown as HookContext
    const hook = authorizePublish(ctx)
    return {
      delivered,
      publish (client, n, retain = false) {
        if (!ctx.identities.has(client)) ctx.identities.set(client, D2)
        const state = { acked: false }
        const p = { cmd: 'publish', topic: 'devices/d9/telemetry/t', payload: Buffer.from(String(n)), qos: 1, retain, dup: false, messageId: n + 1 }
        hook(client, p as unknown as PublishPacket, (err) => { if (err) throw err; state.acked = true })
        return state
      },
    }
  }

  it('acks before the delivery finishes; a retained message waits for its delivery, and the client\'s later ones for it', () => {
    const { publish, delivered } = publisher(() => 'unmatched')
    const svc = { id: 'svc', conn: {} } as unknown as Client
    expect(publish(svc, 0).acked).toBe(true)
    expect(delivered.map((d) => d.n)).toEqual([0])
    const retained = publish(svc, 1, true)
    const after = publish(svc, 2)
    expect([retained.acked, after.acked, delivered.length]).toEqual([false, false, 2])
    delivered[1]?.finish()
    expect([retained.acked, after.acked, delivered.map((d) => d.n)]).toEqual([true, true, [0, 1, 2]])
  })

  it('acks only once a cursor write is done, and holds the client\'s later publishes behind it', async () => {
    let write!: () => void
    const written = new Promise<void>((resolve) => { write = resolve })
    let first = true
    const { publish, delivered } = publisher(() => { if (!first) return 'ready'; first = false; return written })
    const svc = { id: 'svc', conn: {} } as unknown as Client
    const a = publish(svc, 0)
    const b = publish(svc, 1)
    expect([a.acked, b.acked, delivered.length]).toEqual([false, false, 0])
    write()
    await written
    expect([a.acked, b.acked, delivered.map((d) => d.n)]).toEqual([true, true, [0, 1]])
  })

  it('waits for delivery again once 1,000 acknowledged deliveries are under way: a slow subscriber slows publishers', () => {
    const { publish, delivered } = publisher(() => 'unmatched')
    const clients = Array.from({ length: 10 }, (_, i) => ({ id: `svc-${i}`, conn: {} }) as unknown as Client)
    for (let n = 0; n < 1000; n++) expect(publish(clients[n % 10] as Client, n).acked).toBe(true)
    const held = publish(clients[0] as Client, 1000)
    expect(held.acked).toBe(false)
    delivered[1000]?.finish()
    expect(held.acked).toBe(true)
    delivered[0]?.finish() // one under way less: acks come at once again
    expect(publish(clients[1] as Client, 1001).acked).toBe(true)
  })
})
