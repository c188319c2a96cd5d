/**
 * MQTT 5 request/response for commands (bridge/downlink.ts): a command's
 * Response Topic and Correlation Data travel with it to the command sink; a
 * response topic that is not a topic name (a wildcard, empty, a NUL) is
 * ignored with a warning, and the command is stored all the same.
 */
import type { IPublishPacket, MqttClient } from 'mqtt'
import { describe, expect, it } from 'vitest'
import { Downlink, responseTopicProblem, type IncomingCommand } from '../../bridge/downlink.ts'
import type { UpstreamConfig } from '../../bridge/config-schema.ts'
import { buildConfig } from '../../gateway/config/config.ts'
import { systemClock } from '../../store/index.ts'

function downlink (): { link: Downlink, accepted: IncomingCommand[], warnings: Array<Record<string, unknown>> } {
  const config = buildConfig({
    gatewayId: 'edge-1',
    bridge: { upstreams: [{ name: 'cloud', url: 'mqtt://127.0.0.1:1883', mqttVersion: '5', commands: [{ remote: 'cmd/{site}/+/#', local: 'devices/+/commands/#' }] }] },
  })
  const accepted: IncomingCommand[] = []
  const warnings: Array<Record<string, unknown>> = []
  const logger = { info: () => {}, warn: (fields: Record<string, unknown>) => { warnings.push(fields) }, error: () => {} }
  const link = new Downlink(config.bridge.upstreams[0] as UpstreamConfig, {
    gatewayId: 'edge-1', clock: systemClock, logger, commands: { accept: async (c) => { accepted.push(c) } },
  })
  return { link, accepted, warnings }
}

async function handle (link: Downlink, properties: IPublishPacket['properties']): Promise<void> {
  const packet = { cmd: 'publish', topic: 'cmd/edge-1/d1/led', payload: Buffer.from('on'), qos: 1, dup: false, retain: false, properties } as IPublishPacket
  await new Promise<void>((resolve, reject) => {
    link.handle(packet, {} as MqttClient, (err) => { if (err) reject(err); else resolve() }, { generation: 0, recordError: () => {} })
  })
}

describe('command request/response', () => {
  it('passes a command\'s response topic and correlation data on to the sink', async () => {
    const { link, accepted } = downlink()
    await handle(link, { responseTopic: 'replies/app-7', correlationData: Buffer.from('req-1') })
    await handle(link, { responseTopic: 'replies/app-7' })
    await handle(link, undefined)
    expect(accepted.map((c) => c.response)).toEqual([
      { topic: 'replies/app-7', correlationData: Buffer.from('req-1') },
      { topic: 'replies/app-7' },
      undefined,
    ])
  })

  it('ignores a response topic that is not a topic name, with a warning, and stores the command anyway', async () => {
    const { link, accepted, warnings } = downlink()
    for (const bad of ['replies/+', 'replies/#', '', 'a\u0000b']) await handle(link, { responseTopic: bad, correlationData: Buffer.from('x') })
    expect(accepted).toHaveLength(4)
    expect(accepted.every((c) => c.response === undefined && c.localTopic === 'devices/d1/commands/led')).toBe(true)
    expect(warnings.map((w) => w.reason)).toEqual(['it has a wildcard', 'it has a wildcard', 'it is empty', 'it has a NUL character'])
    expect(responseTopicProblem('x'.repeat(65536))).toBe('it is longer than 65535 bytes')
    expect(responseTopicProblem('$share-free/replies')).toBe(null)
  })
})
