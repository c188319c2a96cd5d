/**
 * Bad bridge config is refused at start-up with a message naming the key
 * (through the gateway's buildConfig, as `edgemq start` reads it).
 */
import { describe, expect, it } from 'vitest'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { Bridge } from '../../bridge/bridge.ts'
import { dedupeCarrier, protocolVersions, type UpstreamConfig } from '../../bridge/config-schema.ts'
import { buildConfig } from '../../gateway/config/config.ts'
import { openLogStore, systemClock } from '../../store/index.ts'

function withUpstream (upstream: Record<string, unknown>, extra: Record<string, unknown> = {}): unknown {
  return { gatewayId: 'gw1', bridge: { upstreams: [{ name: 'cloud', url: 'mqtt://127.0.0.1:1883', ...upstream }] }, ...extra }
}

describe('bridge config', () => {
  it('fills in the defaults', () => {
    const config = buildConfig(withUpstream({}))
    const u = config.bridge.upstreams[0]
    expect(u).toMatchObject({ kind: 'mqtt', mqttVersion: 'auto', maxInflight: 100, topicTemplate: '{topic}', forward: [{ stream: 'telemetry', tenant: 'default', filter: '#', priority: 0 }, { stream: 'events' }] })
    expect(config.bridge.commitIntervalMs).toBe(200)
    expect(buildConfig({}).bridge.upstreams).toEqual([])
  })

  it.each([
    [{ forward: [{ stream: 'nope' }] }, '"bridge.upstreams.0.forward.0.stream" names unknown stream "nope"'],
    [{ forward: [{ stream: 'telemetry', tenant: 'acme' }] }, '"bridge.upstreams.0.forward.0.tenant" names unknown tenant "acme"'],
    [{ forward: [{ stream: 'telemetry', filter: 'a/#/b' }] }, '"bridge.upstreams.0.forward.0.filter" is not a valid MQTT topic filter'],
    [{ url: 'not a url' }, '"bridge.upstreams.0.url" is not a URL'],
    [{ url: 'http://example.com' }, '"bridge.upstreams.0.url" must start with mqtt://, mqtts://, ws:// or wss://'],
    [{ topicTemplate: 'sites/{site}/{nope}' }, '"bridge.upstreams.0.topicTemplate" unknown variable {nope}'],
    [{ topicTemplate: 'sites/+/{topic}' }, '"bridge.upstreams.0.topicTemplate" a topic template cannot contain the wildcards'],
    [{ receiptTopic: '{topic' }, '"bridge.upstreams.0.receiptTopic" unclosed "{"'],
    [{ commands: [{ remote: 'cmd/+/#', local: 'devices/+/commands' }] }, '"bridge.upstreams.0.commands.0" local filter "devices/+/commands" must have the same wildcards'],
    [{ dedupeId: 'user-property', mqttVersion: '3.1.1' }, '"bridge.upstreams.0.dedupeId" user-property needs mqttVersion "5"'],
    [{ dedupeId: 'user-property', kind: 'edgemq' }, '"bridge.upstreams.0.dedupeId" user-property needs mqttVersion "5"'],
    [{ dedupeId: 'topic-prefix' }, '"bridge.upstreams.0.dedupeId" topic-prefix is only for kind "edgemq"'],
    [{ kind: 'kafka' }, '"bridge.upstreams.0.kind" must be one of "mqtt", "edgemq"'],
    [{ mqttVersion: '4' }, '"bridge.upstreams.0.mqttVersion" must be one of "auto", "5", "3.1.1"'],
    [{ maxInflight: 0 }, '"bridge.upstreams.0.maxInflight" must be >= 1'],
    [{ reconnectMinMs: 1000, reconnectMaxMs: 100 }, '"bridge.upstreams.0.reconnectMaxMs" is below reconnectMinMs'],
    [{ tls: { cert: 'c.pem' } }, '"bridge.upstreams.0.tls" needs both cert and key'],
    [{ name: 'bad name' }, '"bridge.upstreams.0.name" must match pattern'],
    [{ colour: 'red' }, 'unknown key "bridge.upstreams.0.colour"'],
  ])('refuses %j', (upstream, message) => {
    expect(() => buildConfig(withUpstream(upstream))).toThrow(expect.objectContaining({ code: 'GW_CONFIG_INVALID', message: expect.stringContaining(message) as unknown }))
  })

  it.each([
    [{}, [5, 4], ['user-property', 'none']],
    [{ mqttVersion: '3.1.1' }, [4], ['none']],
    [{ mqttVersion: '5' }, [5], ['user-property']],
    [{ kind: 'edgemq' }, [4], ['topic-prefix']],
    [{ kind: 'edgemq', mqttVersion: '5' }, [5], ['user-property']],
    [{ dedupeId: 'none' }, [5, 4], ['none', 'none']],
    [{ dedupeId: 'user-property' }, [5, 4], ['user-property', 'none']],
  ])('%j speaks MQTT levels %j, the dedupe id going as %j on each', (upstream, levels, carriers) => {
    const u = buildConfig(withUpstream(upstream)).bridge.upstreams[0] as UpstreamConfig
    expect(protocolVersions(u)).toEqual(levels)
    expect(levels.map((v) => dedupeCarrier(u, v as 4 | 5))).toEqual(carriers)
  })

  it('refuses two upstreams of one name', () => {
    const u = { name: 'cloud', url: 'mqtt://127.0.0.1:1883' }
    expect(() => buildConfig({ bridge: { upstreams: [u, u] } })).toThrow('"bridge.upstreams.1.name" duplicates upstream name "cloud"')
  })

  it('refuses a missing url, naming it', () => {
    expect(() => buildConfig({ bridge: { upstreams: [{ name: 'cloud' }] } })).toThrow('missing key "bridge.upstreams.0.url"')
  })

  it('refuses to build an upstream with command mappings but nowhere to deliver commands (BRIDGE_NO_COMMAND_SINK)', async () => {
    const config = buildConfig(withUpstream({ commands: [{ remote: 'cmd/{site}/+/#', local: 'devices/+/commands/#' }] }))
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgemq-bridge-config-'))
    const store = await openLogStore({ location: dir })
    try {
      const logger = { info: () => {}, warn: () => {}, error: () => {} }
      expect(() => new Bridge(config.bridge, { store, gatewayId: 'gw1', clock: systemClock, logger })).toThrow(expect.objectContaining({ code: 'BRIDGE_NO_COMMAND_SINK' }))
    } finally {
      await store.close()
      fs.rmSync(dir, { recursive: true, force: true })
    }
  })
})
