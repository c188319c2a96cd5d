/**
 * Every metric a dashboard panel, a dashboard variable or an alert rule names
 * is one a running gateway exports: `edgemq start` in a child process, driven
 * by MQTT.js clients (publishes on two tenants, a failed login, an ACL-denied
 * publish) so its labelled series exist, then GET /metrics. Histograms count
 * through their _bucket/_sum/_count series; `up` is added by Prometheus.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  SCRAPE_SERIES, loadAlertRules, loadDashboards, metricNames, parseExposition, queries, substituteVariables,
  variableMetric, variableQuery, type ExportedMetrics,
} from '../helpers/dashboards.ts'
import { startExercisedGateway, type ExercisedGateway } from '../helpers/exercised-gateway.ts'

describe('dashboards and alert rules name only metrics the gateway exports', () => {
  let gateway: ExercisedGateway | undefined
  let exported: ExportedMetrics

  beforeAll(async () => {
    gateway = await startExercisedGateway()
    await gateway.refusals()
    await gateway.load(1000, 2)
    exported = parseExposition(await gateway.metrics())
  }, 60_000)
  afterAll(async () => { await gateway?.close() }, 30_000)

  const unknown = (names: readonly string[]): string[] => names.filter((n) => !exported.declared.has(n) && !SCRAPE_SERIES.has(n))

  it('the gateway was driven: labelled series of ingest, connections, refusals and partitions have samples', () => {
    for (const name of ['edgemq_ingest_messages_total', 'edgemq_mqtt_connected_clients', 'edgemq_mqtt_connections_refused_total',
      'edgemq_mqtt_auth_failures_total', 'edgemq_mqtt_publishes_refused_total', 'edgemq_append_duration_seconds_bucket']) {
      expect(exported.sampled.has(name), name).toBe(true)
    }
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
