/**
 * The dashboards against a real Prometheus: Debian's `prometheus` started on
 * a free 127.0.0.1 port with a temporary config scrapes a live gateway every
 * second and loads alerts.yaml. The gateway gets refused logins, one failed
 * log write (its file-size limit lowered with prlimit) and a few seconds of
 * bounded MQTT.js load, while a retention-holding group falls behind the
 * disk budget. Then every panel query and every variable query must return
 * data through /api/v1/query, every rule must evaluate without error, and
 * the retention-drop alert must be firing.
 *
 * Under CI=true a missing prometheus or prlimit fails this test; elsewhere it is skipped.
 */
import { afterAll, describe, expect, it } from 'vitest'
import { ALERTS_FILE, loadDashboards, queries, substituteVariables, variableMetric, variableQuery } from '../helpers/dashboards.ts'
import { startExercisedGateway, type ExercisedGateway } from '../helpers/exercised-gateway.ts'
import { INSTALL_HINT, requireTools, startPrometheus, toolsPresentOrCi, type PrometheusServer } from '../helpers/prometheus-process.ts'

const TOOLS = ['prometheus', 'prlimit']
const runs = toolsPresentOrCi(...TOOLS)
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

async function waitFor (what: string, check: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check().catch(() => false))) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await sleep(200)
  }
}

describe(`dashboards against a real Prometheus scraping a live gateway${runs ? '' : ` (skipped: ${INSTALL_HINT}; prlimit is in util-linux)`}`, () => {
  let gateway: ExercisedGateway | undefined
  let prometheus: PrometheusServer | undefined
  afterAll(async () => {
    await prometheus?.stop()
    await gateway?.close()
  }, 30_000)

  const test = runs ? it : it.skip
  test('every panel and variable query returns data, every rule evaluates, the retention-drop alert fires', async () => {
    requireTools(...TOOLS)
    const started = Date.now()
    gateway = await startExercisedGateway()
    prometheus = await startPrometheus({ targets: [gateway.httpTarget], ruleFiles: [ALERTS_FILE], scrapeIntervalSeconds: 1 })
    const prom = prometheus
    await waitFor('the first successful scrape', async () => (await prom.query('up{job="edgemq"} == 1')).length === 1, 10_000)

    await gateway.refusals()
    await gateway.failWrites(1500)
    await gateway.load(5000)
    // Query at the end of the load, so every rate window ($__rate_interval = 10s) lies inside it; let two more scrapes land first.
    const at = Date.now() / 1000
    await sleep(2500)

    const empty: string[] = []
    let checked = 0
    for (const { file, dashboard } of loadDashboards()) {
      const values: Record<string, string> = Object.fromEntries(dashboard.templating.list.map((v) => [v.name, '.+']))
      values.job = 'edgemq'
      const jobs = queries(dashboard).map(async ({ panel, target, expr }) => {
        const promql = substituteVariables(expr, values)
        const result = await prom.query(promql, at)
        checked++
        if (!result.some((s) => !Number.isNaN(Number(s.value[1])))) empty.push(`${file} "${panel.title}" ${target.refId}: ${promql}`)
      })
      // A variable query label_values(metric{...}, label) has values when the selector matches series that carry the label.
      for (const v of dashboard.templating.list) {
        const q = variableQuery(v)
        const m = q === undefined ? null : /^\s*label_values\((.+),\s*(\w+)\s*\)\s*$/.exec(q)
        if (q === undefined || m === null || variableMetric(q) === undefined) continue
        const promql = `count by (${m[2] as string}) (${substituteVariables(m[1] as string, values)})`
        jobs.push(prom.query(promql, at).then((result) => {
          checked++
          if (result.length === 0) empty.push(`${file} variable ${v.name}: ${q}`)
        }))
      }
      await Promise.all(jobs)
    }
    expect(empty, 'queries that returned no data').toEqual([])
    expect(checked).toBeGreaterThan(40)

    const rules = await prom.rules()
    expect(rules.filter((r) => r.health !== 'ok').map((r) => `${r.name}: ${r.health} ${r.lastError ?? ''}`)).toEqual([])
    expect(rules.length).toBe(9)
    await waitFor('EdgemqRecordsDroppedByRetention to fire', async () => (await prom.rules())
      .some((r) => r.name === 'EdgemqRecordsDroppedByRetention' && r.state === 'firing'
        && (r.alerts ?? []).some((a) => a.labels.group === 'uplink-test' && a.labels.tenant === 'default' && a.labels.stream === 'telemetry')), 5000)
    expect((await prom.rules()).find((r) => r.name === 'EdgemqGatewayDown')?.state).toBe('inactive')
    expect(Date.now() - started).toBeLessThan(60_000)
  }, 90_000)
})
