/**
 * The Grafana dashboards, provisioning files and alert rules as data: unique
 * uids and panel ids, the ${datasource} variable everywhere, units that match
 * what each query returns, every panel documented, every alert with a
 * summary and a runbook. Whether the metrics they name exist is checked
 * against a running gateway in dashboards.int.test.ts, and whether the
 * queries return data against a real Prometheus in prometheus.int.test.ts.
 */
import { readFileSync } from 'node:fs'
import path from 'node:path'
import { describe, expect, it } from 'vitest'
import { parse } from 'yaml'
import {
  DASHBOARDS_DIR, allPanels, expectedUnits, loadAlertRules, loadDashboards, metricNames, queries, substituteVariables,
  variableMetric, variableQuery, type Dashboard,
} from '../helpers/dashboards.ts'

const dashboards = loadDashboards()
const rules = loadAlertRules()
const readme = readFileSync(path.join(DASHBOARDS_DIR, 'README.md'), 'utf8')

/** A value for every variable a dashboard defines, as a test would choose them. */
function variableValues (d: Dashboard): Record<string, string> {
  return Object.fromEntries(d.templating.list.map((v) => [v.name, v.type === 'datasource' ? 'prometheus' : '.+']))
}

describe('PromQL helpers', () => {
  it('metricNames finds selected metrics and skips functions, keywords, labels, ranges and numbers', () => {
    expect(metricNames('histogram_quantile(0.99, sum by (instance, le) (rate(edgemq_append_duration_seconds_bucket{job=~".+", le!="x"}[10s])))'))
      .toEqual(['edgemq_append_duration_seconds_bucket'])
    expect(metricNames('a_bytes / (a_bytes + b_bytes) > 0.85 and on (job) (up offset 10m == 1) or vector(1e9)')).toEqual(['a_bytes', 'b_bytes', 'up'])
    expect(metricNames('sum(x_total) without (kind) unless ignoring(y) group_left(z) w')).toEqual(['w', 'x_total'])
    expect(metricNames('time() - edgemq_partition_oldest_timestamp_seconds{stream="a b (c)"}')).toEqual(['edgemq_partition_oldest_timestamp_seconds'])
  })

  it('substituteVariables fills Grafana variables and refuses unknown ones', () => {
    expect(substituteVariables('rate(x{job=~"$job", i=~"${instance}"}[$__rate_interval])', { job: 'edgemq', instance: '.+' }))
      .toBe('rate(x{job=~"edgemq", i=~".+"}[10s])')
    expect(() => substituteVariables('x{a="$nope"}', {})).toThrow(/\$nope/)
  })

  it('expectedUnits follows the metric names\' unit suffixes', () => {
    expect(expectedUnits('histogram_quantile(0.5, sum by (le) (rate(a_seconds_bucket[1m])))')).toEqual(['s'])
    expect(expectedUnits('rate(a_bytes_total[1m])')).toContain('Bps')
    expect(expectedUnits('rate(a_messages_total[1m])')).toEqual(['ops'])
    expect(expectedUnits('a_bytes')).toContain('bytes')
    expect(expectedUnits('a_used_bytes / (a_used_bytes + a_free_bytes)')).toEqual(['percentunit'])
    expect(expectedUnits('time() - a_timestamp_seconds')).toEqual(['s'])
    expect(expectedUnits('a_offset - b_offset')).toContain('none')
  })
})

describe('Grafana dashboards', () => {
  it('there are the fleet overview, store detail, gateway detail and bridge detail dashboards', () => {
    expect(dashboards.map((d) => d.dashboard.uid).sort()).toEqual(['edgemq-bridge', 'edgemq-fleet', 'edgemq-gateway', 'edgemq-store'])
  })

  it('uids and titles are unique across dashboards', () => {
    const uids = dashboards.map((d) => d.dashboard.uid)
    const titles = dashboards.map((d) => d.dashboard.title)
    expect(new Set(uids).size).toBe(uids.length)
    expect(new Set(titles).size).toBe(titles.length)
  })

  for (const { file, dashboard } of dashboards) {
    describe(file, () => {
      const panels = allPanels(dashboard)
      const dataPanels = panels.filter((p) => p.type !== 'row')

      it('panel ids are unique', () => {
        const ids = panels.map((p) => p.id)
        expect(ids.filter((id, i) => ids.indexOf(id) !== i)).toEqual([])
      })

      it('has a Prometheus data source variable, and every panel, target and query variable uses it', () => {
        const ds = dashboard.templating.list.find((v) => v.name === 'datasource')
        expect(ds).toMatchObject({ type: 'datasource', query: 'prometheus' })
        for (const p of dataPanels) {
          expect(p.datasource, p.title).toEqual({ type: 'prometheus', uid: '${datasource}' })
          for (const t of p.targets ?? []) expect(t.datasource, `${p.title} ${t.refId}`).toEqual({ type: 'prometheus', uid: '${datasource}' })
        }
        for (const v of dashboard.templating.list.filter((x) => x.type === 'query')) {
          expect(v.datasource, v.name).toEqual({ type: 'prometheus', uid: '${datasource}' })
        }
      })

      it('every panel has queries with unique refIds, and a description', () => {
        for (const p of dataPanels) {
          const refIds = (p.targets ?? []).map((t) => t.refId)
          expect(refIds.length, p.title).toBeGreaterThan(0)
          expect(new Set(refIds).size, p.title).toBe(refIds.length)
          expect(p.description ?? '', p.title).not.toBe('')
        }
      })

      it('queries use only the dashboard\'s own variables and name at least one metric', () => {
        const values = variableValues(dashboard)
        for (const { panel, target, expr } of queries(dashboard)) {
          const promql = substituteVariables(expr, values)
          expect(metricNames(promql).length, `${panel.title} ${target.refId}`).toBeGreaterThan(0)
        }
        for (const v of dashboard.templating.list) {
          const q = variableQuery(v)
          if (q === undefined) continue
          expect(variableMetric(q), v.name).toBeDefined()
          substituteVariables(q, values)
        }
      })

      it('units match what each query returns (bytes, seconds, ops/s, ratios, counts)', () => {
        const values = variableValues(dashboard)
        const wrong: string[] = []
        for (const p of dataPanels) {
          const unit = p.fieldConfig?.defaults?.unit
          for (const t of p.targets ?? []) {
            if (t.expr === undefined) continue
            const allowed = expectedUnits(substituteVariables(t.expr, values))
            if (unit === undefined || !allowed.includes(unit)) wrong.push(`${p.title} ${t.refId}: unit ${unit ?? '(none)'}, expected one of ${allowed.join(', ')}`)
          }
        }
        expect(wrong).toEqual([])
      })

      it('panels sit inside the 24-column grid without overlapping', () => {
        const boxes = panels.map((p) => ({ title: p.title, ...p.gridPos }))
        for (const b of boxes) expect(b.x + b.w, b.title).toBeLessThanOrEqual(24)
        const overlaps = boxes.flatMap((a, i) => boxes.slice(i + 1)
          .filter((b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h)
          .map((b) => `${a.title} / ${b.title}`))
        expect(overlaps).toEqual([])
      })

      it('dashboards/README.md describes the dashboard and each of its panels', () => {
        expect(readme).toContain(dashboard.title)
        expect(dataPanels.map((p) => p.title).filter((t) => !readme.includes(t))).toEqual([])
      })
    })
  }
})

describe('alert rules', () => {
  it('names are unique', () => {
    const names = rules.map((r) => r.alert)
    expect(names.filter((n, i) => names.indexOf(n) !== i)).toEqual([])
  })

  it('cover what the gateway, the store, the bridge and replication report', () => {
    expect(rules.map((r) => r.alert).sort()).toEqual([
      'EdgemqAuthFailureSpike', 'EdgemqBackpressureSustained', 'EdgemqConsumerGroupLagGrowing', 'EdgemqDiskAlmostFull',
      'EdgemqDiskFreeLow', 'EdgemqGatewayDown', 'EdgemqGatewayUnhealthy', 'EdgemqRecordsDroppedByRetention', 'EdgemqStandbyOutOfSync', 'EdgemqStoreErrors',
      'EdgemqUplinkBacklogGrowing', 'EdgemqUplinkCommandsExpiring', 'EdgemqUplinkDeadLettered', 'EdgemqUplinkDisconnected',
      'EdgemqUplinkRecordsDropped',
    ])
  })

  it('each has a severity, a summary and a runbook line, and is in the README', () => {
    for (const r of rules) {
      expect(['page', 'warning'], r.alert).toContain(r.labels?.severity)
      expect(r.annotations?.summary ?? '', r.alert).not.toBe('')
      expect(r.annotations?.runbook ?? '', r.alert).not.toBe('')
      expect(readme, r.alert).toContain(r.alert)
    }
  })
})

describe('Grafana provisioning', () => {
  const load = (file: string): unknown => parse(readFileSync(path.join(DASHBOARDS_DIR, 'provisioning', file), 'utf8'))

  it('provisions a default Prometheus data source', () => {
    const doc = load('datasources/prometheus.yaml') as { apiVersion: number, datasources: Array<Record<string, unknown>> }
    expect(doc.apiVersion).toBe(1)
    expect(doc.datasources).toHaveLength(1)
    expect(doc.datasources[0]).toMatchObject({ type: 'prometheus', access: 'proxy', isDefault: true })
  })

  it('provides the dashboards from a file provider whose path the README tells where to put them', () => {
    const doc = load('dashboards/edgemq.yaml') as { apiVersion: number, providers: Array<{ type: string, options: { path: string } }> }
    expect(doc.apiVersion).toBe(1)
    expect(doc.providers).toHaveLength(1)
    const provider = doc.providers[0]
    expect(provider?.type).toBe('file')
    expect(path.isAbsolute(provider?.options.path ?? '')).toBe(true)
    expect(readme).toContain(provider?.options.path)
  })
})
