/**
 * The dashboards of a gateway that has seen no traffic yet, with a bridge
 * upstream configured, against a real Prometheus: every panel query returns
 * data (0, not "No data"), since the series the config names start at 0
 * (gateway/metrics/zero.ts). prometheus.int.test.ts covers a busy gateway.
 *
 * Under CI=true a missing prometheus fails this test; elsewhere it is skipped.
 */
import path from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { loadDashboards, queries, substituteVariables } from '../helpers/dashboards.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from '../helpers/gateway-process.ts'
import { INSTALL_HINT, freePort, requireTools, startPrometheus, toolsPresentOrCi, type PrometheusServer } from '../helpers/prometheus-process.ts'

const runs = toolsPresentOrCi('prometheus')

async function waitFor (what: string, check: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check().catch(() => false))) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 200))
  }
}

describe(`dashboards of a fresh gateway with a bridge upstream${runs ? '' : ` (skipped: ${INSTALL_HINT})`}`, () => {
  let gw: GatewayProcess | undefined
  let prometheus: PrometheusServer | undefined
  let cleanup: (() => Promise<void>) | undefined
  afterAll(async () => {
    await prometheus?.stop()
    await gw?.stop()
    await cleanup?.()
  }, 30_000)

  const test = runs ? it : it.skip
  test('every panel query returns data before any device connects', async () => {
    requireTools('prometheus')
    const scratch = await tempDir('edgemq-fresh-')
    cleanup = scratch.cleanup
    const closedPort = await freePort() // the upstream is down: nothing is forwarded, and the panels still show 0
    const config = await writeConfig(scratch.dir, {
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      bridge: { upstreams: [{ name: 'region', url: `mqtt://127.0.0.1:${closedPort}`, forward: [{ stream: 'telemetry' }], reconnectMaxMs: 1000 }] },
    })
    gw = await startGatewayProcess({ dataDir: path.join(scratch.dir, 'data'), config })
    prometheus = await startPrometheus({ targets: [new URL(gw.httpUrl).host], ruleFiles: [], scrapeIntervalSeconds: 1 })
    const prom = prometheus
    // Rates need two samples of each series inside their window.
    await waitFor('three scrapes', async () => Number((await prom.query('count_over_time(up{job="edgemq"}[1m])'))[0]?.value[1] ?? 0) >= 3, 20_000)

    // Undefined until the first record, and "No data" is the truth there: quantiles and means of appends that never
    // happened (0/0), and the age of the oldest record of empty partitions. And the table of unresolved NATS upstream
    // errors: this gateway has no NATS upstream, so it has none (test/dashboards/prometheus.int.test.ts fills it).
    const undefinedYet = /^(Append latency p|Group-commit size p|Oldest record age|Upstream errors \(NATS\))/
    const empty: string[] = []
    let checked = 0
    for (const { file, dashboard } of loadDashboards()) {
      const values: Record<string, string> = Object.fromEntries(dashboard.templating.list.map((v) => [v.name, '.+']))
      values.job = 'edgemq'
      await Promise.all(queries(dashboard).map(async ({ panel, target, expr }) => {
        if (undefinedYet.test(panel.title)) return
        const promql = substituteVariables(expr, values)
        const result = await prom.query(promql)
        checked++
        if (!result.some((s) => !Number.isNaN(Number(s.value[1])))) empty.push(`${file} "${panel.title}" ${target.refId}: ${promql}`)
      }))
    }
    expect(empty, 'queries that returned no data').toEqual([])
    expect(checked).toBeGreaterThan(40)
  }, 120_000)
})
