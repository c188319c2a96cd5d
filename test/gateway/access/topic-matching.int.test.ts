/**
 * aedes' live routing (mqemitter's qlobber) and the session store's offline
 * queues (sessions/persistence.ts) match topics by the same rules as the spec
 * table (fixtures/topic-matching-table.ts), through a real gateway: one
 * client per filter of the table receives the table's topics live, and the
 * same subscriptions in persistent sessions receive them from their offline
 * queues after a reconnect. Each client's last message is a sentinel
 * published after the table's topics: a session's messages arrive in order,
 * so once the sentinel is in, a topic that did not arrive never will.
 */
import path from 'node:path'
import mqtt, { type MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { collect, endAll, waitFor, type Received } from '../../helpers/mqtt-probe.ts'
import { MATCH_TABLE, TABLE_FILTERS, TABLE_TOPICS } from '../fixtures/topic-matching-table.ts'

const SENTINEL = 'matcher-sentinel'

describe('topic matching through the broker', () => {
  const cleanups: Array<() => Promise<void>> = []
  const clients = new Set<MqttClient>()
  let gw: GatewayProcess

  const connect = async (clientId: string, clean: boolean): Promise<MqttClient> => {
    const client = await mqtt.connectAsync(gw.mqttUrl, { protocolVersion: 4, reconnectPeriod: 0, clientId, clean })
    clients.add(client)
    return client
  }

  /** Publishes every topic of the table, then the sentinel, all QoS 1. */
  const publishTable = async (round: string): Promise<void> => {
    const pub = await connect(`matcher-pub-${round}`, true)
    for (const topic of TABLE_TOPICS) await pub.publishAsync(topic, round, { qos: 1 })
    await pub.publishAsync(SENTINEL, round, { qos: 1 })
    await pub.endAsync()
  }

  /** What each filter's client got before the sentinel, checked row by row against the table. */
  const expectTable = async (got: ReadonlyMap<string, Received[]>, round: string): Promise<void> => {
    for (const [filter, messages] of got) {
      expect(await waitFor(() => messages.some((m) => m.topic === SENTINEL && m.payload === round), 10_000), `sentinel for ${filter}`).toBe(true)
    }
    const mismatches = MATCH_TABLE.filter(([filter, topic, matches]) => {
      const received = (got.get(filter) ?? []).some((m) => m.topic === topic && m.payload === round)
      return received !== matches
    })
    expect(mismatches).toEqual([])
  }

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-matcher-')
    cleanups.push(cleanup)
    // The built-in rules let nobody publish to a `$` topic (their `#` does not match one); this gateway does, so the
    // table's `$` rows reach the broker's matchers.
    const config = await writeConfig(dir, {
      acl: [{ role: 'anonymous', topic: '$SYS/#', access: 'publish', allow: true }, { role: 'anonymous', topic: '$other/#', access: 'publish', allow: true }],
      mqtt: { listeners: [{ type: 'tcp', port: 0, allowAnonymous: true }] },
    })
    gw = await startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
    cleanups.push(async () => { await gw.stop() })
  }, 60_000)
  afterAll(async () => {
    await endAll(clients)
    for (const c of cleanups.reverse()) await c().catch(() => {})
  }, 30_000)

  it('delivers live exactly the topics the specification matches', async () => {
    const got = new Map<string, Received[]>()
    for (const [i, filter] of TABLE_FILTERS.entries()) {
      const sub = await connect(`matcher-live-${i}`, true)
      got.set(filter, collect(sub, { live: true }))
      await sub.subscribeAsync([filter, SENTINEL], { qos: 1 })
    }
    await publishTable('live')
    await expectTable(got, 'live')
  }, 60_000)

  it('queues for an offline persistent session exactly the topics the specification matches', async () => {
    for (const [i, filter] of TABLE_FILTERS.entries()) {
      const sub = await connect(`matcher-offline-${i}`, false)
      await sub.subscribeAsync([filter, SENTINEL], { qos: 1 })
      await sub.endAsync()
    }
    await publishTable('offline')
    const got = new Map<string, Received[]>()
    for (const [i, filter] of TABLE_FILTERS.entries()) {
      // Messages queued while offline arrive right after the CONNACK: the listener is in place before the connect.
      const sub = mqtt.connect(gw.mqttUrl, { protocolVersion: 4, reconnectPeriod: 0, clientId: `matcher-offline-${i}`, clean: false })
      clients.add(sub)
      got.set(filter, collect(sub, { live: true }))
    }
    await expectTable(got, 'offline')
  }, 60_000)
})
