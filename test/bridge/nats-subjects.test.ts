/**
 * The topic ↔ subject mapping (reversible, always valid tokens), the subject
 * template and the coverage check the uplink runs against a stream's subjects.
 */
import { describe, expect, it } from 'vitest'
import { isBridgeError } from '../../bridge/errors.ts'
import { escapeToken, parseSubjectTemplate, subjectCovers, subjectToTopic, topicToSubject, unescapeToken } from '../../bridge/nats/subjects.ts'

const VALUES = { site: 'plant-7', region: 'eu', upstream: 'js', tenant: 'default', stream: 'telemetry', partition: '3', key: 'dev-42', topic: 'devices/dev-42/t' }

describe('topic ↔ subject', () => {
  it('maps levels to tokens and escapes what a token cannot hold, reversibly', () => {
    expect(topicToSubject('devices/dev-42/telemetry')).toBe('devices.dev-42.telemetry')
    expect(topicToSubject('devices/dev.42/a b/*/>/50%')).toBe('devices.dev%2E42.a%20b.%2A.%3E.50%25')
    expect(topicToSubject('a//b/')).toBe('a.%_.b.%_')
    expect(topicToSubject('/')).toBe('%_.%_')
    expect(topicToSubject('tab\there/é/%_')).toBe('tab%09here.é.%25_')
    for (const t of ['devices/dev.42/a b/*/>/50%', 'a//b/', '/', 'tab\there/é/%_', '%2E', '%', 'x\u007fy', '$SYS/x']) {
      const s = topicToSubject(t)
      expect(s.split('.').every((tok) => tok !== '' && !/[\s*>]/.test(tok)), s).toBe(true)
      expect(subjectToTopic(s)).toBe(t)
    }
  })

  it('refuses a token no escape made', () => {
    expect(unescapeToken(escapeToken('a.b'))).toBe('a.b')
    let err: unknown
    try { unescapeToken('50%') } catch (e) { err = e }
    expect(isBridgeError(err, 'BRIDGE_SUBJECT_TEMPLATE')).toBe(true)
  })
})

describe('subject template', () => {
  it('renders escaped values, {topic} as tokens', () => {
    const t = parseSubjectTemplate('edgemq.{site}.{tenant}.{stream}.{topic}')
    expect(t.render({ ...VALUES, topic: 'devices/dev.42/t' })).toBe('edgemq.plant-7.default.telemetry.devices.dev%2E42.t')
    expect(parseSubjectTemplate('k.{key}.p{partition}').render({ ...VALUES, key: 'a.b' })).toBe('k.a%2Eb.p3')
  })

  it('gives the filter the stream must cover once the lane is known', () => {
    const t = parseSubjectTemplate('edgemq.{site}.{tenant}.{stream}.{key}.{topic}')
    expect(t.pattern({ site: 'plant-7', tenant: 'default', stream: 'telemetry' })).toBe('edgemq.plant-7.default.telemetry.*.>')
    expect(parseSubjectTemplate('x.s-{site}.{partition}').pattern({ site: 'a.b' })).toBe('x.s-a%2Eb.*')
  })

  it.each([
    ['.{topic}', /empty token/],
    ['a..{topic}', /empty token/],
    ['a.{topic}.b', /last token/],
    ['a.x{topic}', /whole token/],
    ['a b.{topic}', /white space/],
    ['a.*.{topic}', /white space, "\*" or ">"/],
    ['a.>', /white space, "\*" or ">"/],
  ])('refuses %s', (source, message) => {
    let err: unknown
    try { parseSubjectTemplate(source) } catch (e) { err = e }
    expect(isBridgeError(err, 'BRIDGE_SUBJECT_TEMPLATE')).toBe(true)
    expect((err as Error).message).toMatch(message)
  })

  it('refuses an unknown variable with the topic template\'s code', () => {
    let err: unknown
    try { parseSubjectTemplate('a.{device}') } catch (e) { err = e }
    expect(isBridgeError(err, 'BRIDGE_TOPIC_TEMPLATE')).toBe(true)
  })
})

describe('subjectCovers', () => {
  it.each([
    ['edgemq.>', 'edgemq.plant-7.default.telemetry.>', true],
    ['edgemq.*.default.>', 'edgemq.plant-7.default.telemetry.*.>', true],
    ['edgemq.plant-7.>', 'edgemq.plant-8.default.>', false],
    ['edgemq.*.*', 'edgemq.plant-7.>', false],
    ['edgemq.>', 'edgemq', false],
    ['a.*', 'a.*', true],
    ['a.b', 'a.*', false],
    ['>', 'a.b.>', true],
    ['a.b.c', 'a.b.c', true],
    ['a.b', 'a.b.c', false],
  ])('%s covers %s: %s', (outer, inner, covered) => {
    expect(subjectCovers(outer, inner)).toBe(covered)
  })
})
