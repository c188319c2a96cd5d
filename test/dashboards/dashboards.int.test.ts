/**
 * Every metric a dashboard panel, a dashboard variable or an alert rule names
 * is one a running gateway exports, with samples: `edgemq start` in a child
 * process, driven by MQTT.js clients (publishes on two tenants, a failed
 * login, an ACL-denied publish) and bridged to three upstreams (a live edgemq
 * that also sends commands, a closed port, and one that refuses a record into
 * the dead-letter stream), so its labelled series exist; then GET /metrics.
 * A family that is declared but has no sample yet (a labelled counter before
 * its first event) does not count. Histograms count through their
 * _bucket/_sum/_count series; `up` is added by Prometheus.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  SCRAPE_SERIES, loadAlertRules, loadDashboards, metricNames, parseExposition, queries, substituteVariables,
  variableMetric, variableQuery, type ExportedMetrics,
} from '../helpers/dashboards.ts'
import { FORWARDED_STREAMS, UPSTREAMS, samples, startExercisedGateway, type ExercisedGateway } from '../helpers/exercised-gateway.ts'

/** Every metric name the dashboards (panels and variables) and the alert rules read. */
function referencedMetrics (): string[] {
  const names = new Set<string>()
  for (const { dashboard } of loadDashboards()) {
    const values = Object.fromEntries(dashboard.templating.list.map((v) => [v.name, '.+']))
    for (const { expr } of queries(dashboard)) for (const n of metricNames(substituteVariables(expr, values))) names.add(n)
    for (const v of dashboard.templating.list) {
      const q = variableQuery(v)
      const metric = q === undefined ? undefined : variableMetric(q)
      if (metric !== undefined) names.add(metric)
    }
  }
  for (const r of loadAlertRules()) for (const n of metricNames(r.expr)) names.add(n)
  return [...names].filter((n) => !SCRAPE_SERIES.has(n)).sort()
}

describe('dashboards and alert rules name only metrics the gateway exports', () => {
  let gateway: ExercisedGateway | undefined
  let text: string
  let exported: ExportedMetrics

  beforeAll(async () => {
    gateway = await startExercisedGateway()
    await gateway.refusals()
    await gateway.bridgeTraffic()
    // Load until the log outgrows the disk budget and retention (on a timer) drops records the lagging groups need,
    // the last series to appear; bounded, and the test below names whatever is still missing.
    const wanted = referencedMetrics()
    const deadline = Date.now() + 30_000
    for (;;) {
      await gateway.load(1000, 2)
      text = await gateway.metrics()
      exported = parseExposition(text)
      if (wanted.every((n) => exported.sampled.has(n)) || Date.now() > deadline) break
    }
  }, 90_000)
  afterAll(async () => { await gateway?.close() }, 30_000)

  /** Names that are not exported with at least one sample. */
  const unknown = (names: readonly string[]): string[] => names.filter((n) => !exported.sampled.has(n) && !SCRAPE_SERIES.has(n))

  it('the gateway was driven: labelled series of ingest, connections, refusals and partitions have samples', () => {
    for (const name of ['edgemq_ingest_messages_total', 'edgemq_mqtt_connected_clients', 'edgemq_mqtt_connections_refused_total',
      'edgemq_mqtt_auth_failures_total', 'edgemq_mqtt_publishes_refused_total', 'edgemq_append_duration_seconds_bucket']) {
      expect(exported.sampled.has(name), name).toBe(true)
    }
  })

  it('the bridge was driven: every upstream has its series, the labelled counters exist for what happened', () => {
    const upstreamsOf = (name: string): string[] => [...new Set(samples(text, name).map((s) => s.labels.upstream ?? ''))].sort()
    const all = Object.values(UPSTREAMS).sort()
    for (const name of ['edgemq_bridge_connected', 'edgemq_bridge_backlog_messages', 'edgemq_bridge_backlog_bytes', 'edgemq_bridge_backlog_seconds',
      'edgemq_bridge_inflight_messages', 'edgemq_bridge_reconnects_total', 'edgemq_bridge_dropped_records_total',
      'edgemq_bridge_commands_received_total', 'edgemq_bridge_commands_delivered_total', 'edgemq_bridge_commands_expired_total']) {
      expect(upstreamsOf(name), name).toEqual(all)
    }
    const value = (name: string, labels: Record<string, string>): number | undefined =>
      samples(text, name).find((s) => Object.entries(labels).every(([k, v]) => s.labels[k] === v))?.value
    expect(value('edgemq_bridge_connected', { upstream: UPSTREAMS.live })).toBe(1)
    expect(value('edgemq_bridge_connected', { upstream: UPSTREAMS.down })).toBe(0)
    expect(value('edgemq_bridge_backlog_messages', { upstream: UPSTREAMS.down })).toBeGreaterThan(0)
    expect(value('edgemq_bridge_backlog_seconds', { upstream: UPSTREAMS.down })).toBeGreaterThan(0)
    // Born with their first event, one series per upstream, tenant and stream.
    for (const stream of FORWARDED_STREAMS) {
      for (const name of ['edgemq_bridge_forwarded_messages_total', 'edgemq_bridge_forwarded_bytes_total']) {
        expect(value(name, { upstream: UPSTREAMS.live, tenant: 'default', stream }), `${name} ${stream}`).toBeGreaterThan(0)
      }
    }
    expect(value('edgemq_bridge_dead_lettered_total', { upstream: UPSTREAMS.refusing, tenant: 'default', stream: 'events' })).toBe(1)
    expect(value('edgemq_bridge_commands_delivered_total', { upstream: UPSTREAMS.live })).toBeGreaterThan(0)
    expect(value('edgemq_bridge_commands_expired_total', { upstream: UPSTREAMS.live })).toBeGreaterThan(0)
    // Each upstream is also a consumer group: the live one has committed what it forwarded.
    expect(samples(text, 'edgemq_group_lag_messages').some((s) => s.labels.group === `bridge.${UPSTREAMS.live}`)).toBe(true)
  })

  for (const { file, dashboard } of loadDashboards()) {
    it(`${file}: every panel query and variable query names exported metrics`, () => {
      const values = Object.fromEntries(dashboard.templating.list.map((v) => [v.name, '.+']))
      const missing: string[] = []
      for (const { panel, target, expr } of queries(dashboard)) {
        for (const name of unknown(metricNames(substituteVariables(expr, values)))) missing.push(`${panel.title} ${target.refId}: ${name}`)
      }
      for (const v of dashboard.templating.list) {
        const q = variableQuery(v)
        const metric = q === undefined ? undefined : variableMetric(q)
        if (metric !== undefined && unknown([metric]).length > 0) missing.push(`variable ${v.name}: ${metric}`)
      }
      expect(missing).toEqual([])
    })
  }

  it('every alert rule expression names exported metrics', () => {
    const missing = loadAlertRules().flatMap((r) => unknown(metricNames(r.expr)).map((n) => `${r.alert}: ${n}`))
    expect(missing).toEqual([])
  })
})
