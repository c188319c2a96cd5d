import { describe, expect, it } from 'vitest'
import { mountTopic, topicFilterProblem, topicMatches, topicNameProblem, unmountTopic } from '../../gateway/topics.ts'
import { compileRoutes } from '../../gateway/routing.ts'
import { buildConfig } from '../../gateway/config.ts'

describe('topic matching', () => {
  it.each([
    ['a/+/c', 'a/b/c', true], ['a/+/c', 'a/b/d', false], ['a/#', 'a', true], ['a/#', 'a/b/c', true],
    ['#', 'a/b', true], ['+', 'a/b', false], ['+/+', '/x', true], ['#', '$SYS/x', false], ['+/x', '$SYS/x', false],
    ['$SYS/#', '$SYS/x', true], ['a/b', 'a/b/', false],
  ])('%s matches %s: %s', (filter, topic, expected) => {
    expect(topicMatches(filter, topic)).toBe(expected)
  })

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

  it('mounts and unmounts tenant prefixes', () => {
    expect(mountTopic('acme', 'devices/1')).toBe('acme/devices/1')
    expect(unmountTopic('acme', 'acme/devices/1')).toBe('devices/1')
    expect(unmountTopic('acme', 'acmex/devices/1')).toBeNull()
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
