/**
 * The dashboards against a real Prometheus: Debian's `prometheus` started on
 * a free 127.0.0.1 port with a temporary config scrapes a live gateway every
 * second and loads alerts.yaml. The gateway gets refused logins, one failed
 * log write (its file-size limit lowered with prlimit), bridge traffic (a
 * live upstream edgemq forwarding and sending commands, one delivered and
 * some expired; an upstream at a closed port; two records dead-lettered by
 * an upstream that refuses them) and a few seconds of bounded MQTT.js load,
 * while a retention-holding group and the closed port's uplink fall behind
 * the disk budget. Then every panel query and every variable query must
 * return data through /api/v1/query, every rule must evaluate without error,
 * the retention-drop, uplink-drop, dead-letter and expired-command alerts
 * must be firing and the disconnected-uplink alert pending (it waits 5 m).
 *
 * Under CI=true a missing prometheus or prlimit fails this test; elsewhere it is skipped.
 */
import { afterAll, describe, expect, it } from 'vitest'
import { ALERTS_FILE, loadAlertRules, loadDashboards, queries, substituteVariables, variableMetric, variableQuery } from '../helpers/dashboards.ts'
import { GROUP, UPSTREAMS, startExercisedGateway, type ExercisedGateway } from '../helpers/exercised-gateway.ts'
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
  test('every panel and variable query returns data, every rule evaluates, the drop, dead-letter and command alerts fire', async () => {
    requireTools(...TOOLS)
    gateway = await startExercisedGateway()
    prometheus = await startPrometheus({ targets: [gateway.httpTarget], ruleFiles: [ALERTS_FILE], scrapeIntervalSeconds: 1 })
    const prom = prometheus
    await waitFor('the first successful scrape', async () => (await prom.query('up{job="edgemq"} == 1')).length === 1, 10_000)

    await gateway.refusals()
    await gateway.failWrites(1500)
    await gateway.bridgeTraffic()
    // The dead-letter counter is born with its first record, which increase() cannot see: a second one, once
    // Prometheus holds the first, is what the increase() branch of EdgemqUplinkDeadLettered fires on.
    const deadLetters = `edgemq_bridge_dead_lettered_total{upstream="${UPSTREAMS.refusing}"}`
    await waitFor('Prometheus to scrape the first dead letter', async () => (await prom.query(`${deadLetters} == 1`)).length === 1, 10_000)
    expect(await gateway.deadLetter()).toBe(2)
    await gateway.load(5000)
    // A scrape that misses its 1 s timeout (a loaded 2-core machine, during the load) marks every series of the
    // gateway stale, and an instant query just after it finds nothing at all: query once the last scrapes all succeeded.
    // The rate windows ($__rate_interval = 10s) still hold the load; let two more scrapes land first.
    await waitFor('the scrapes after the load to succeed', async () => (await prom.query('min_over_time(up{job="edgemq"}[3s]) == 1')).length === 1, 20_000)
    const at = Date.now() / 1000
    // A sample is stamped with its scrape's start and the scrapes of one target run one after the other: once a
    // sample stamped a second past `at` is in, every scrape that began before `at` has landed (two, as before).
    await waitFor('two scrapes after the query time', async () => (await prom.query(`timestamp(up{job="edgemq"}) > ${at + 1}`)).length === 1, 20_000)

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

    const connected = Object.fromEntries((await prom.query('edgemq_bridge_connected', at)).map((s) => [s.metric.upstream, s.value[1]]))
    expect(connected[UPSTREAMS.live]).toBe('1')
    expect(connected[UPSTREAMS.down]).toBe('0')

    const rules = await prom.rules()
    expect(rules.filter((r) => r.health !== 'ok').map((r) => `${r.name}: ${r.health} ${r.lastError ?? ''}`)).toEqual([])
    expect(rules.length).toBe(loadAlertRules().length)
    const alerting = async (name: string, state: 'firing' | 'pending', labels: Record<string, string>): Promise<boolean> =>
      (await prom.rules()).some((r) => r.name === name && (r.alerts ?? [])
        .some((a) => a.state === state && Object.entries(labels).every(([k, v]) => a.labels[k] === v)))
    const expected: Array<[string, 'firing' | 'pending', Record<string, string>]> = [
      ['EdgemqRecordsDroppedByRetention', 'firing', { group: GROUP, tenant: 'default', stream: 'telemetry' }],
      ['EdgemqUplinkRecordsDropped', 'firing', { upstream: UPSTREAMS.down }],
      ['EdgemqUplinkDeadLettered', 'firing', { upstream: UPSTREAMS.refusing, tenant: 'default', stream: 'events' }],
      ['EdgemqUplinkCommandsExpiring', 'firing', { upstream: UPSTREAMS.live }],
      ['EdgemqUplinkDisconnected', 'pending', { upstream: UPSTREAMS.down }],
    ]
    for (const [name, state, labels] of expected) {
      await waitFor(`${name} ${JSON.stringify(labels)} to be ${state}`, () => alerting(name, state, labels), 30_000) // a deadline: a loaded machine evaluates the rules late
    }
    const after = await prom.rules()
    const alertsOf = (name: string): ReadonlyArray<{ readonly labels: Readonly<Record<string, string>> }> => after.find((r) => r.name === name)?.alerts ?? []
    // The uplink's own group is left to EdgemqUplinkRecordsDropped; only the connected uplink's link is up.
    expect(alertsOf('EdgemqRecordsDroppedByRetention').filter((a) => a.labels.group === `bridge.${UPSTREAMS.down}`)).toEqual([])
    expect(alertsOf('EdgemqUplinkDisconnected').filter((a) => a.labels.upstream === UPSTREAMS.live)).toEqual([])
    expect(after.find((r) => r.name === 'EdgemqGatewayDown')?.state).toBe('inactive')
  }, 180_000)
})
