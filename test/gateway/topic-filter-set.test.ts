import { describe, expect, it } from 'vitest'
import { compileTopicFilters } from '../../gateway/topic-filter-set.ts'
import { topicMatches } from '../../gateway/topics.ts'

const FILTERS = [
  '#', '+', '+/#', 'a', 'a/#', 'a/+', 'a/b', 'a/+/c', '+/b/#', 'a//c', '/+', '$SYS/#', '$SYS/+/x', 'devices/+/telemetry/#',
  'devices/d1/commands/#', '+/+/+', 'a/b/c/d', '', '/',
]
const TOPICS = [
  'a', 'a/b', 'a/b/c', 'a//c', '/a', '/', '', 'b/b/x', '$SYS/broker/x', '$SYS', '$other/a/b', 'devices/d1/telemetry/temp',
  'devices/d1/commands/reboot', 'devices/d2/commands', 'a/b/c/d', 'a/b/c/d/e', 'x/y/z',
]

describe('compileTopicFilters', () => {
  it('agrees with topicMatches on every filter alone and on every pair of filters', () => {
    for (const f of FILTERS) {
      const one = compileTopicFilters([f])
      for (const t of TOPICS) expect(one(t), `${JSON.stringify(f)} vs ${JSON.stringify(t)}`).toBe(topicMatches(f, t))
      for (const g of FILTERS) {
        const two = compileTopicFilters([f, g])
        for (const t of TOPICS) expect(two(t), `[${f}, ${g}] vs ${t}`).toBe(topicMatches(f, t) || topicMatches(g, t))
      }
    }
  })

  it('matches nothing with no filters', () => {
    expect(compileTopicFilters([])('a/b')).toBe(false)
  })
})
