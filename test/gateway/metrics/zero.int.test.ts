/**
 * A fresh gateway's /metrics already has a series at 0 for every label set
 * its config names, so dashboards show 0 rather than "No data" and increase()
 * sees the first event.
 */
import path from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { KNOWN_LABELS } from '../../../gateway/metrics/zero.ts'
import { freePort } from '../../helpers/prometheus-process.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { scrape, type Sample } from '../../helpers/raw-mqtt.ts'

describe('/metrics of a fresh gateway', () => {
  let gw: GatewayProcess | undefined
  let cleanup: (() => Promise<void>) | undefined
  afterAll(async () => { await gw?.stop(); await cleanup?.() })

  it('has a 0 series per configured listener, tenant, stream, upstream and refusal reason', async () => {
    const scratch = await tempDir('edgemq-metrics-')
    cleanup = scratch.cleanup
    const closedPort = await freePort() // nothing listens: the uplink never connects, so nothing is forwarded
    const config = await writeConfig(scratch.dir, {
      tenants: ['acme'],
      streams: { telemetry: { partitions: 2 }, events: { partitions: 1 } },
      routes: [{ filter: 'devices/+/telemetry/#', stream: 'telemetry' }, { filter: 'devices/+/events/#', stream: 'events' }],
      mqtt: { listeners: [{ name: 'plain', type: 'tcp', port: 0 }, { name: 'web', type: 'ws', port: 0 }] },
      bridge: { upstreams: [{ name: 'region', url: `mqtt://127.0.0.1:${closedPort}`, forward: [{ tenant: 'acme', stream: 'telemetry' }], reconnectMaxMs: 1000 }] },
    })
    gw = await startGatewayProcess({ dataDir: path.join(scratch.dir, 'data'), config })
    const samples = await scrape(gw.httpUrl)
    const value = (name: string, labels: Record<string, string>): number | undefined =>
      samples.find((s: Sample) => s.name === name && Object.keys(labels).length === Object.keys(s.labels).length && Object.entries(labels).every(([k, v]) => s.labels[k] === v))?.value
    const expected: Array<[string, Record<string, string>]> = []
    for (const listener of ['plain', 'web']) {
      expected.push(['edgemq_mqtt_auth_failures_total', { listener }])
      for (const reason of KNOWN_LABELS.refusalReasons) expected.push(['edgemq_mqtt_connections_refused_total', { listener, reason }])
      for (const tenant of ['default', 'acme']) expected.push(['edgemq_mqtt_connected_clients', { tenant, listener }])
    }
    for (const tenant of ['default', 'acme']) {
      for (const stream of ['telemetry', 'events']) {
        expected.push(['edgemq_ingest_messages_total', { tenant, stream }], ['edgemq_ingest_bytes_total', { tenant, stream }])
      }
      for (const reason of KNOWN_LABELS.publishRefusals) expected.push(['edgemq_mqtt_publishes_refused_total', { tenant, reason }])
      for (const reason of KNOWN_LABELS.subscribeRefusals) expected.push(['edgemq_mqtt_subscriptions_refused_total', { tenant, reason }])
      expected.push(['edgemq_mqtt_session_queue_dropped_total', { tenant }])
      expected.push(['edgemq_mqtt_replays_active', { tenant }], ['edgemq_mqtt_replay_messages_total', { tenant }])
      for (const outcome of KNOWN_LABELS.replayOutcomes) expected.push(['edgemq_mqtt_replays_finished_total', { tenant, outcome }])
    }
    for (const entry of KNOWN_LABELS.damagedSessionEntries) expected.push(['edgemq_mqtt_session_damaged_entries_total', { entry }])
    for (const partition of ['0', '1']) expected.push(['edgemq_retention_dropped_records_total', { tenant: 'acme', stream: 'telemetry', partition, group: 'bridge.region' }])
    for (const name of ['edgemq_bridge_forwarded_messages_total', 'edgemq_bridge_forwarded_bytes_total', 'edgemq_bridge_dead_lettered_total']) {
      expected.push([name, { upstream: 'region', tenant: 'acme', stream: 'telemetry' }])
    }
    const missing = expected.filter(([name, labels]) => value(name, labels) !== 0).map(([name, labels]) => `${name}${JSON.stringify(labels)}`)
    expect(missing).toEqual([])
    expect(expected.length).toBeGreaterThan(60)
  }, 60_000)
})
