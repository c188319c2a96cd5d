/**
 * A NATS upstream's config: a nats:// URL makes the kind, the defaults, and
 * each bad value refused at start-up naming its key.
 */
import { describe, expect, it } from 'vitest'
import { upstreamKind } from '../../bridge/config-schema.ts'
import { buildConfig } from '../../gateway/config/config.ts'

function withNats (upstream: Record<string, unknown>): unknown {
  return { gatewayId: 'gw1', bridge: { upstreams: [{ name: 'js', url: 'nats://127.0.0.1:4222', ...upstream }] } }
}

describe('NATS upstream config', () => {
  it('a nats:// URL is a NATS upstream, with the JetStream defaults filled in', () => {
    const u = buildConfig(withNats({})).bridge.upstreams[0]
    expect(u === undefined ? null : upstreamKind(u)).toBe('nats')
    expect(u?.nats).toMatchObject({
      subject: 'edgemq.{site}.{tenant}.{stream}.{topic}', minDuplicateWindowMs: 3_600_000, ackTimeoutMs: 10_000,
      stream: { name: 'EDGEMQ', create: false, subjects: ['edgemq.>'], replicas: 1, storage: 'file', duplicateWindowMs: 3_600_000 },
    })
    const cluster = buildConfig(withNats({ url: 'nats://a:4222, tls://b:4222', kind: 'nats' })).bridge.upstreams[0]
    expect(cluster === undefined ? null : upstreamKind(cluster)).toBe('nats')
    expect(upstreamKind({ kind: 'mqtt', url: 'mqtt://a' })).toBe('mqtt')
  })

  it.each([
    [{ url: 'nats://a:4222,mqtt://b:1883' }, '"bridge.upstreams.0.url" of a nats upstream must be nats:// or tls:// URLs'],
    [{ url: 'mqtt://a:1883', kind: 'nats' }, '"bridge.upstreams.0.url" of a nats upstream must be nats:// or tls:// URLs'],
    [{ url: 'nats://a:4222', kind: 'edgemq' }, '"bridge.upstreams.0.url" is a NATS URL but kind is "edgemq"'],
    [{ url: 'nats://a:4222,' + 'nats//b' }, '"bridge.upstreams.0.url" is not a URL'],
    [{ username: 'u', nats: { token: 't' } }, 'sets more than one of username, nats.token, nats.nkeySeedFile and nats.credsFile'],
    [{ password: 'p' }, '"bridge.upstreams.0.password" needs username'],
    [{ nats: { subject: 'a.{topic}.b' } }, '"bridge.upstreams.0.nats.subject" {topic} must be the last token'],
    [{ nats: { subject: 'a.*.{topic}' } }, '"bridge.upstreams.0.nats.subject" token 1 holds white space'],
    [{ nats: { receiptSubject: 'r..{topic}' } }, '"bridge.upstreams.0.nats.receiptSubject" empty token'],
    [{ nats: { stream: { duplicateWindowMs: 60_000 } } }, '"bridge.upstreams.0.nats.stream.duplicateWindowMs" (60000) is below nats.minDuplicateWindowMs'],
    [{ nats: { stream: { name: 'a.b' } } }, '"bridge.upstreams.0.nats.stream.name" must match pattern'],
    [{ nats: { stream: { storage: 'tape' } } }, '"bridge.upstreams.0.nats.stream.storage" must be one of "file", "memory"'],
    [{ nats: { stream: { replicas: 7 } } }, '"bridge.upstreams.0.nats.stream.replicas" must be <= 5'],
    [{ nats: { ackTimeoutMs: 5 } }, '"bridge.upstreams.0.nats.ackTimeoutMs" must be >= 100'],
    [{ nats: { nkey: 'x' } }, 'unknown key "bridge.upstreams.0.nats.nkey"'],
    [{ forward: [{ stream: 'nope' }] }, '"bridge.upstreams.0.forward.0.stream" names unknown stream "nope"'],
    [{ tls: { key: 'k.pem' } }, '"bridge.upstreams.0.tls" needs both cert and key'],
    [{ commands: [{ remote: 'cmd//+', local: 'devices/+/commands' }] }, '"bridge.upstreams.0.commands.0.remote" has an empty level'],
  ])('refuses %j', (upstream, message) => {
    expect(() => buildConfig(withNats(upstream))).toThrow(expect.objectContaining({ code: 'GW_CONFIG_INVALID', message: expect.stringContaining(message) as unknown }))
  })
})
