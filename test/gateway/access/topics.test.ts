import { MemoryLevel } from 'memory-level'
import { describe, expect, it } from 'vitest'
import {
  compileTopicFilters, dollarTopicSubscribed, mountTopic, scopedClientId, topicFilterProblem, topicMatches, topicNameProblem, unmountTopic,
  unscopedClientId,
} from '../../../gateway/access/topics.ts'
import { compileRoutes } from '../../../gateway/mqtt/routing.ts'
import { buildConfig } from '../../../gateway/config/config.ts'
import { LevelSessionPersistence, type SessionPacket } from '../../../gateway/mqtt/sessions/persistence.ts'
import type { LevelDatabase } from '../../../store/index.ts'
import { MATCH_TABLE, TABLE_FILTERS, TABLE_TOPICS } from '../fixtures/topic-matching-table.ts'

// The same table runs against aedes' live routing and the offline queues in topic-matching.int.test.ts.
describe('the specification\'s matching table', () => {
  it.each(MATCH_TABLE)('topicMatches(%j, %j) is %s (%s)', (filter, topic, matches) => {
    expect(topicMatches(filter, topic)).toBe(matches)
  })

  it('holds for compileTopicFilters, each filter alone and all of them at once', () => {
    for (const [filter, topic, matches] of MATCH_TABLE) {
      expect(compileTopicFilters([filter])(topic), `${filter} vs ${topic}`).toBe(matches)
    }
    const all = compileTopicFilters(TABLE_FILTERS)
    for (const topic of TABLE_TOPICS) {
      expect(all(topic), topic).toBe(TABLE_FILTERS.some((f) => topicMatches(f, topic)))
    }
  })

  it('holds for compileTopicFilters on every pair of filters', () => {
    for (const f of TABLE_FILTERS) {
      for (const g of TABLE_FILTERS) {
        const two = compileTopicFilters([f, g])
        for (const t of TABLE_TOPICS) expect(two(t), `[${f}, ${g}] vs ${t}`).toBe(topicMatches(f, t) || topicMatches(g, t))
      }
    }
  })

  it('holds for the session store\'s subscriptions and retained messages', async () => {
    const store = new LevelSessionPersistence(new MemoryLevel() as unknown as LevelDatabase)
    await store.setup({ id: 'gw', counter: 0 })
    for (const filter of TABLE_FILTERS) await store.addSubscriptions({ id: filter }, [{ topic: filter, qos: 1 }])
    for (const topic of TABLE_TOPICS) await store.storeRetained({ cmd: 'publish', topic, payload: Buffer.from('x'), qos: 0, retain: true })
    for (const [filter, topic, matches] of MATCH_TABLE) {
      // aedes applies the `$` rule to what this trie returns (and the gateway in authorizeForward, see topics.ts).
      if (!topic.startsWith('$')) {
        const subscribers = (await store.subscriptionsByTopic(topic)).map((s) => s.clientId)
        expect(subscribers.includes(filter), `subscription ${filter} vs ${topic}`).toBe(matches)
      }
      const retained: SessionPacket[] = await store.createRetainedStreamCombi([filter]).toArray()
      expect(retained.some((p) => p.topic === topic), `retained ${topic} for ${filter}`).toBe(matches)
    }
  })

  it('gives a tenant\'s `$` topic only to a client with a subscription that matches it', () => {
    expect(dollarTopicSubscribed('acme', ['acme/#', 'acme/+/x'], '$SYS/x')).toBe(false)
    expect(dollarTopicSubscribed('acme', ['acme/#', 'acme/$SYS/#'], '$SYS/x')).toBe(true)
    expect(dollarTopicSubscribed('acme', ['other/$SYS/#'], '$SYS/x')).toBe(false)
  })

  it('matches nothing with no filters, and no topic longer than aedes accepts', () => {
    expect(compileTopicFilters([])('a/b')).toBe(false)
    const long = Array(101).fill('a').join('/')
    expect(topicMatches('#', long)).toBe(false)
    expect(topicMatches('#', Array(100).fill('a').join('/'))).toBe(true)
    expect(topicMatches(`${Array(100).fill('a').join('/')}/#`, Array(100).fill('a').join('/'))).toBe(true)
    expect(topicMatches(Array(101).fill('a').join('/'), Array(100).fill('a').join('/'))).toBe(false)
  })
})

describe('topic names and filters', () => {
  it('rejects invalid topic names and filters with a reason', () => {
    expect(topicNameProblem('a/+/b')).toMatch(/wildcard/)
    expect(topicNameProblem('a/#')).toMatch(/wildcard/)
    expect(topicNameProblem('a\u0000b')).toMatch(/U\+0000/)
    expect(topicNameProblem('')).toMatch(/empty/)
    expect(topicNameProblem('devices/1/telemetry')).toBeNull()
    expect(topicFilterProblem('a/#/b')).toMatch(/#/)
    expect(topicFilterProblem('a/b#')).toMatch(/#/)
    expect(topicFilterProblem('a/b+/c')).toMatch(/\+/)
    expect(topicFilterProblem('a/+/#')).toBeNull()
  })

  it('leaves room for the tenant level: at most 99 levels in a client\'s topic or filter', () => {
    const levels = (n: number): string => Array(n).fill('a').join('/')
    expect(topicNameProblem(levels(99))).toBeNull()
    expect(topicNameProblem(levels(100))).toMatch(/more than 99 levels/)
    expect(topicFilterProblem(`${levels(98)}/#`)).toBeNull()
    expect(topicFilterProblem(`${levels(99)}/#`)).toMatch(/more than 99 levels/)
    expect(topicNameProblem(`${'/'.repeat(99)}`)).toMatch(/more than 99 levels/)
  })

  it('mounts and unmounts tenant prefixes', () => {
    expect(mountTopic('acme', 'devices/1')).toBe('acme/devices/1')
    expect(unmountTopic('acme', 'acme/devices/1')).toBe('devices/1')
    expect(unmountTopic('acme', 'acmex/devices/1')).toBeNull()
  })

  it('gives back a client id only to the tenant that scoped it', () => {
    expect(unscopedClientId('acme', scopedClientId('acme', 'billing'))).toBe('billing')
    expect(unscopedClientId('default', scopedClientId('default', 'billing'))).toBe('billing')
    // Another tenant's, one whose name the tenant's starts, and tenant default's bare ids: none is the tenant's.
    expect(unscopedClientId('globex', scopedClientId('acme', 'billing'))).toBeNull()
    expect(unscopedClientId('acme', scopedClientId('acmex', 'billing'))).toBeNull()
    expect(unscopedClientId('acme', 'billing')).toBeNull()
    expect(unscopedClientId('acme', 'acme/billing')).toBeNull()
    expect(unscopedClientId('default', scopedClientId('acme', 'billing'))).toBeNull()
  })
})

describe('routing', () => {
  const route = compileRoutes(buildConfig({}).routes)
  it('routes the default device topics with the device id as key', () => {
    expect(route('devices/42/telemetry/temp')).toEqual({ stream: 'telemetry', key: '42' })
    expect(route('devices/42/telemetry')).toEqual({ stream: 'telemetry', key: '42' })
    expect(route('devices/a-b/events/door')).toEqual({ stream: 'events', key: 'a-b' })
    expect(route('devices/7/commands/reboot')).toEqual({ stream: 'commands', key: '7' })
  })
  it('returns null for a topic no route matches', () => {
    expect(route('weather/today')).toBeNull()
    expect(route('devices/42/other')).toBeNull()
  })
  it('takes the first matching route and the configured key level', () => {
    const r = compileRoutes(buildConfig({ streams: { a: { partitions: 1 }, b: { partitions: 1 } }, routes: [{ filter: 'site/+/x/+/#', stream: 'a', keyLevel: 3 }, { filter: 'site/+/#', stream: 'b', keyLevel: 1 }] }).routes)
    expect(r('site/s1/x/dev9/temp')).toEqual({ stream: 'a', key: 'dev9' })
    expect(r('site/s1/x/dev9')).toEqual({ stream: 'a', key: 'dev9' })
    expect(r('site/s1/x')).toEqual({ stream: 'b', key: 's1' })
  })
})
