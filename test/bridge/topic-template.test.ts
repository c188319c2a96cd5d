import { describe, expect, it } from 'vitest'
import type { BridgeErrorCode } from '../../bridge/errors.ts'
import { captureTopic, parseCommandMapping, parseTemplate, RECORD_VARIABLES, splitDedupeTopic, templateProblem } from '../../bridge/topic-template.ts'

const values = { site: 'gw1', region: 'eu', upstream: 'cloud', tenant: 'default', stream: 'telemetry', partition: '3', key: 'dev-42', topic: 'devices/dev-42/telemetry/t' }

describe('remote topic templates', () => {
  it('fills in every variable', () => {
    expect(parseTemplate('sites/{site}/{region}/{stream}/{partition}/{key}/{topic}', RECORD_VARIABLES).render(values))
      .toBe('sites/gw1/eu/telemetry/3/dev-42/devices/dev-42/telemetry/t')
    expect(parseTemplate('{topic}', RECORD_VARIABLES).render(values)).toBe(values.topic)
  })

  it.each([
    ['sites/{site/{topic}', 'unknown variable {site/{topic} (known:'],
    ['sites/{nope}/{topic}', 'unknown variable {nope}'],
    ['sites/{site}/{topic', 'unclosed "{" at position 13'],
    ['sites/site}/x', 'unmatched "}" at position 10'],
    ['sites/+/{topic}', 'cannot contain the wildcards'],
    ['sites/#', 'cannot contain the wildcards'],
    ['', 'empty template'],
  ])('refuses %j: %s', (source) => {
    // The message reaches the user as a config error; test/bridge/config.test.ts checks it there.
    expect(() => parseTemplate(source, RECORD_VARIABLES)).toThrow(expect.objectContaining({ code: 'BRIDGE_TOPIC_TEMPLATE' }))
  })

  it('reports problems without throwing', () => {
    expect(templateProblem('{topic}', RECORD_VARIABLES)).toBeNull()
    expect(templateProblem('{x}', RECORD_VARIABLES)).toMatch(/unknown variable \{x\}/)
  })
})

describe('topic captures', () => {
  it('returns what each wildcard matched', () => {
    expect(captureTopic('cmd/+/x/#', 'cmd/a/x/b/c')).toEqual(['a', 'b/c'])
    expect(captureTopic('cmd/#', 'cmd')).toEqual(['']) // # covers its parent level [MQTT-4.7.1-2]
    expect(captureTopic('cmd/+', 'cmd/a/b')).toBeNull()
    expect(captureTopic('#', '$SYS/x')).toBeNull() // [MQTT-4.7.2-1]
  })
})

describe('command mappings', () => {
  const conn = { site: 'gw1', region: 'eu', upstream: 'cloud' }

  it('maps a remote topic to the local one, wildcard by wildcard', () => {
    const m = parseCommandMapping('cmd/{site}/+/#', 'devices/+/commands/#', conn)
    expect(m.remoteFilter).toBe('cmd/gw1/+/#')
    expect(m.toLocal('cmd/gw1/dev-42/reboot')).toBe('devices/dev-42/commands/reboot')
    expect(m.toLocal('cmd/gw1/dev-42/a/b')).toBe('devices/dev-42/commands/a/b')
    expect(m.toLocal('cmd/gw2/dev-42/reboot')).toBeNull()
    expect(parseCommandMapping('c/{region}/+', 'devices/+/commands/set', conn).toLocal('c/eu/d1')).toBe('devices/d1/commands/set')
  })

  it.each<[string, string, BridgeErrorCode, string]>([
    ['cmd/+/#', 'devices/+/commands', 'BRIDGE_COMMAND_MAPPING', 'must have the same wildcards'],
    ['cmd/#', 'devices/+/commands/#', 'BRIDGE_COMMAND_MAPPING', 'must have the same wildcards'],
    ['cmd/#/x', 'devices/#', 'BRIDGE_COMMAND_MAPPING', 'remote filter "cmd/#/x": # must be the whole last level'],
    ['cmd/+', 'dev+/x', 'BRIDGE_COMMAND_MAPPING', 'local filter "dev+/x": + must be a whole level'],
    ['cmd/{nope}/+', 'devices/+', 'BRIDGE_TOPIC_TEMPLATE', 'unknown variable {nope}'],
  ])('refuses remote %j with local %j (%s: %s)', (remote, local, code) => {
    // The message reaches the user as a config error; test/bridge/config.test.ts checks it there.
    expect(() => parseCommandMapping(remote, local, conn)).toThrow(expect.objectContaining({ code }))
  })
})

describe('$dedupe/ topics', () => {
  it('splits the dedupe id from the topic', () => {
    expect(splitDedupeTopic('$dedupe/edge-1/default/telemetry/3/1234/devices/d/telemetry/t'))
      .toEqual({ dedupeId: 'edge-1/default/telemetry/3/1234', topic: 'devices/d/telemetry/t' })
  })

  it.each([
    'devices/d/telemetry',
    '$dedupe/edge-1/default/telemetry/3/1234',
    '$dedupe/edge-1/default/telemetry/3/12x/devices/d',
    '$dedupe/edge-1/default/telemetry/-1/5/devices/d',
    '$dedupe//default/telemetry/3/5/devices/d',
    '$dedupe/edge-1/default/telemetry/3/5/',
  ])('ignores %j', (topic) => {
    expect(splitDedupeTopic(topic)).toBeNull()
  })
})
