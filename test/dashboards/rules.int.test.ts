/**
 * The alert rules through promtool (Debian's prometheus package):
 * `check rules`, `check config` of the sample scrape config, and the unit
 * tests in alerts.test.yaml — which must hold, for every alert, a case where
 * it fires and one where it stays quiet.
 *
 * Under CI=true a missing promtool fails these tests; elsewhere they are skipped.
 */
import path from 'node:path'
import { describe, expect, it } from 'vitest'
import { ALERT_TESTS_FILE, ALERTS_FILE, SCRAPE_FILE, loadAlertRuleTests, loadAlertRules } from '../helpers/dashboards.ts'
import { INSTALL_HINT, requireTools, runTool, toolsPresentOrCi } from '../helpers/prometheus-process.ts'

const withPromtool = toolsPresentOrCi('promtool') ? it : it.skip

describe(`alert rules under promtool${toolsPresentOrCi('promtool') ? '' : ` (skipped: ${INSTALL_HINT})`}`, () => {
  const rules = loadAlertRules()

  withPromtool('promtool check rules accepts every rule', () => {
    requireTools('promtool')
    const { code, output } = runTool('promtool', ['check', 'rules', ALERTS_FILE])
    expect(code, output).toBe(0)
    expect(output).toContain(`SUCCESS: ${rules.length} rules found`)
  })

  withPromtool('promtool check config accepts the sample scrape config and the rules it loads', () => {
    requireTools('promtool')
    const { code, output } = runTool('promtool', ['check', 'config', SCRAPE_FILE])
    expect(code, output).toBe(0)
    expect(output).toContain('SUCCESS: 1 rule files found')
  })

  withPromtool('promtool test rules passes', () => {
    requireTools('promtool')
    // rule_files in the test file are relative to its directory.
    const { code, output } = runTool('promtool', ['test', 'rules', path.basename(ALERT_TESTS_FILE)], path.dirname(ALERT_TESTS_FILE))
    expect(code, output).toBe(0)
    expect(output).toContain('SUCCESS')
  })

  it('every alert has a test where it fires and one where it stays quiet, and no test names an unknown alert', () => {
    const tests = loadAlertRuleTests()
    const names = new Set(rules.map((r) => r.alert))
    const fires = new Set(tests.filter((t) => (t.exp_alerts ?? []).length > 0).map((t) => t.alertname))
    const quiet = new Set(tests.filter((t) => (t.exp_alerts ?? []).length === 0).map((t) => t.alertname))
    expect([...names].filter((n) => !fires.has(n)), 'alerts without a firing case').toEqual([])
    expect([...names].filter((n) => !quiet.has(n)), 'alerts without a quiet case').toEqual([])
    expect(tests.map((t) => t.alertname).filter((n) => !names.has(n)), 'tests of unknown alerts').toEqual([])
  })
})
