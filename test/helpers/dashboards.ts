/**
 * Reads what dashboards/ ships — Grafana dashboard JSON, Prometheus alert
 * rules and their promtool tests — and the small amount of PromQL and
 * exposition-format parsing the dashboard tests need: which metric names an
 * expression reads, what a panel query becomes once Grafana has substituted
 * its variables, and which metric names a gateway's /metrics declares.
 */
import { readdirSync, readFileSync } from 'node:fs'
import path from 'node:path'
import { parse } from 'yaml'

export const DASHBOARDS_DIR = path.resolve(import.meta.dirname, '../../dashboards')
export const GRAFANA_DIR = path.join(DASHBOARDS_DIR, 'grafana')
export const ALERTS_FILE = path.join(DASHBOARDS_DIR, 'prometheus/alerts.yaml')
export const ALERT_TESTS_FILE = path.join(DASHBOARDS_DIR, 'prometheus/alerts.test.yaml')
export const SCRAPE_FILE = path.join(DASHBOARDS_DIR, 'prometheus/scrape.yaml')

export interface DataSourceRef { readonly type?: string, readonly uid?: string }

export interface Target {
  readonly refId: string
  readonly expr?: string
  readonly datasource?: DataSourceRef
  readonly legendFormat?: string
  readonly instant?: boolean
}

export interface Panel {
  readonly id: number
  readonly type: string
  readonly title: string
  readonly description?: string
  readonly datasource?: DataSourceRef
  readonly gridPos: { readonly h: number, readonly w: number, readonly x: number, readonly y: number }
  readonly fieldConfig?: { readonly defaults?: { readonly unit?: string } }
  readonly targets?: readonly Target[]
  /** Collapsed rows carry their panels inside. */
  readonly panels?: readonly Panel[]
}

export interface TemplateVariable {
  readonly name: string
  readonly type: string
  readonly query?: string | { readonly query: string }
  readonly datasource?: DataSourceRef
  readonly includeAll?: boolean
  readonly allValue?: string
}

export interface Dashboard {
  readonly uid: string
  readonly title: string
  readonly panels: readonly Panel[]
  readonly templating: { readonly list: readonly TemplateVariable[] }
}

export interface DashboardFile { readonly file: string, readonly dashboard: Dashboard }

function isRecord (v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

/** Checks the fields the tests rely on, so a malformed file fails with its name rather than a TypeError. */
function asDashboard (file: string, value: unknown): Dashboard {
  const fail = (what: string): never => { throw new Error(`${file}: ${what}`) }
  if (!isRecord(value)) return fail('not a JSON object')
  if (typeof value.uid !== 'string' || value.uid === '') fail('no uid')
  if (typeof value.title !== 'string') fail('no title')
  if (!Array.isArray(value.panels)) fail('no panels array')
  if (!isRecord(value.templating) || !Array.isArray(value.templating.list)) fail('no templating.list')
  const checkPanel = (p: unknown): void => {
    if (!isRecord(p) || typeof p.id !== 'number' || typeof p.type !== 'string' || typeof p.title !== 'string') {
      return fail(`panel without numeric id, type and title: ${JSON.stringify(p).slice(0, 120)}`)
    }
    if (p.targets !== undefined && (!Array.isArray(p.targets) || !p.targets.every((t) => isRecord(t) && typeof t.refId === 'string'))) {
      fail(`panel ${p.id}: targets without refId`)
    }
    if (Array.isArray(p.panels)) p.panels.forEach(checkPanel)
  }
  ;(value.panels as unknown[]).forEach(checkPanel)
  return value as unknown as Dashboard
}

export function loadDashboards (): DashboardFile[] {
  return readdirSync(GRAFANA_DIR).filter((f) => f.endsWith('.json')).sort().map((file) => ({
    file,
    dashboard: asDashboard(file, JSON.parse(readFileSync(path.join(GRAFANA_DIR, file), 'utf8'))),
  }))
}

/** Every panel, rows' nested panels included. */
export function allPanels (d: Dashboard): Panel[] {
  const out: Panel[] = []
  const walk = (ps: readonly Panel[]): void => { for (const p of ps) { out.push(p); if (p.panels !== undefined) walk(p.panels) } }
  walk(d.panels)
  return out
}

/** Panel targets that carry a PromQL expression. */
export function queries (d: Dashboard): Array<{ panel: Panel, target: Target, expr: string }> {
  return allPanels(d).flatMap((panel) => (panel.targets ?? [])
    .filter((t): t is Target & { expr: string } => typeof t.expr === 'string' && t.expr.trim() !== '')
    .map((target) => ({ panel, target, expr: target.expr })))
}

export function variableQuery (v: TemplateVariable): string | undefined {
  return typeof v.query === 'string' ? (v.type === 'query' ? v.query : undefined) : v.query?.query
}

// ---------------------------------------------------------------- alert rules

export interface AlertRule {
  readonly alert: string
  readonly expr: string
  readonly for?: string
  readonly labels?: Readonly<Record<string, string>>
  readonly annotations?: Readonly<Record<string, string>>
}

export interface RuleGroup { readonly name: string, readonly rules: ReadonlyArray<AlertRule | { readonly record: string, readonly expr: string }> }

export function loadAlertRules (): AlertRule[] {
  const doc = parse(readFileSync(ALERTS_FILE, 'utf8')) as { groups: RuleGroup[] }
  return doc.groups.flatMap((g) => g.rules.filter((r): r is AlertRule => 'alert' in r))
}

export interface AlertRuleTest {
  readonly eval_time: string
  readonly alertname: string
  readonly exp_alerts?: ReadonlyArray<{ readonly exp_labels?: Readonly<Record<string, string>> }> | null
}

export interface RuleTestCase {
  readonly name?: string
  readonly alert_rule_test?: readonly AlertRuleTest[]
}

export function loadAlertRuleTests (): AlertRuleTest[] {
  const doc = parse(readFileSync(ALERT_TESTS_FILE, 'utf8')) as { tests: RuleTestCase[] }
  return doc.tests.flatMap((t) => t.alert_rule_test ?? [])
}

// ---------------------------------------------------------------- PromQL

const NOT_METRICS = new Set(['and', 'or', 'unless', 'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'offset', 'bool', 'inf', 'nan'])

/**
 * The metric names a PromQL expression selects (Grafana variables must be
 * substituted first). Strings, label matchers, grouping label lists, range
 * and subquery brackets and offsets are removed; what is left that is an
 * identifier, not a keyword and not a function call is a metric name.
 */
export function metricNames (expr: string): string[] {
  let s = expr.replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""')
  s = s.replace(/\{[^}]*\}/g, ' ')
  s = s.replace(/\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ')
  s = s.replace(/\[[^\]]*\]/g, ' ')
  s = s.replace(/\boffset\s+-?\w+/g, ' ')
  const names = new Set<string>()
  for (const m of s.matchAll(/[A-Za-z_:][A-Za-z0-9_:]*/g)) {
    const start = m.index
    if (start > 0 && /[0-9.]/.test(s[start - 1] as string)) continue // the exponent of 1e9
    if (/^\s*\(/.test(s.slice(start + m[0].length))) continue // a function call
    if (NOT_METRICS.has(m[0].toLowerCase())) continue
    names.add(m[0])
  }
  return [...names].sort()
}

/** The metric a Grafana `label_values(metric{...}, label)` variable query reads. */
export function variableMetric (query: string): string | undefined {
  return /^\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)/.exec(query)?.[1]
}

/**
 * What Grafana sends to Prometheus: `$__rate_interval` and friends become a
 * duration, `$name` / `${name}` / `${name:fmt}` / `[[name]]` the given values
 * (regexes for multi-value variables). An unknown variable throws.
 */
export function substituteVariables (expr: string, values: Readonly<Record<string, string>>): string {
  const builtins: Record<string, string> = { __rate_interval: '10s', __interval: '10s', __range: '1m', __range_s: '60', __interval_ms: '10000' }
  const value = (name: string): string => {
    const v = builtins[name] ?? values[name]
    if (v === undefined) throw new Error(`no value for Grafana variable $${name} in ${expr}`)
    return v
  }
  return expr
    .replace(/\$\{(\w+)(?::\w+)?\}/g, (_m, name: string) => value(name))
    .replace(/\[\[(\w+)\]\]/g, (_m, name: string) => value(name))
    .replace(/\$(\w+)/g, (_m, name: string) => value(name))
}

/**
 * The Grafana units a query's result can honestly be shown in, from the
 * metric names' unit suffixes and what the expression does with them:
 * a quantile or mean of `_seconds` is seconds, a rate of `_bytes_total` is
 * bytes/s, a rate of any other counter is ops/s, a ratio of bytes is a
 * fraction, a `_bytes` gauge is bytes, an age from `_timestamp_seconds` is
 * seconds; counts (offsets, messages, clients) have no unit.
 */
export function expectedUnits (expr: string): readonly string[] {
  const names = metricNames(expr)
  const all = (suffix: RegExp): boolean => names.length > 0 && names.every((n) => suffix.test(n))
  const seconds = names.some((n) => /_seconds(?:_bucket|_sum|_count)?$/.test(n))
  if (/\bhistogram_quantile\s*\(/.test(expr)) return seconds ? ['s'] : ['none', 'short']
  if (/_sum\b/.test(expr) && /_count\b/.test(expr) && expr.includes('/')) return seconds ? ['s'] : ['none', 'short']
  if (/\btime\s*\(\s*\)\s*-/.test(expr) && all(/_timestamp_seconds$/)) return ['s']
  if (all(/_bytes$/) && expr.includes('/')) return ['percentunit']
  if (/\b(?:rate|irate|deriv)\s*\(/.test(expr)) {
    if (all(/_bytes_total$/)) return ['Bps', 'binBps']
    if (all(/_seconds_total$/)) return ['percentunit'] // CPU seconds per second: 1 = one core
    return ['ops']
  }
  if (all(/_bytes$/)) return ['bytes', 'decbytes']
  if (all(/_seconds$/)) return ['s']
  return ['none', 'short']
}

// ---------------------------------------------------------------- exposition format

export interface ExportedMetrics {
  /** Every series name a scrape can contain: declared families, with _bucket/_sum/_count for histograms and summaries. */
  readonly declared: ReadonlySet<string>
  /** Names that had at least one sample in this scrape. */
  readonly sampled: ReadonlySet<string>
}

/** Parses Prometheus text exposition (what GET /metrics returns). */
export function parseExposition (text: string): ExportedMetrics {
  const declared = new Set<string>()
  const sampled = new Set<string>()
  for (const line of text.split('\n')) {
    const type = /^# TYPE ([A-Za-z_:][A-Za-z0-9_:]*) (\w+)/.exec(line)
    if (type !== null) {
      const [, name, kind] = type as unknown as [string, string, string]
      if (kind === 'histogram') for (const s of ['_bucket', '_sum', '_count']) declared.add(name + s)
      else if (kind === 'summary') for (const s of ['', '_sum', '_count']) declared.add(name + s)
      else if (kind === 'counter' && !name.endsWith('_total')) { declared.add(name); declared.add(`${name}_total`) } else declared.add(name)
      continue
    }
    if (line === '' || line.startsWith('#')) continue
    const sample = /^[A-Za-z_:][A-Za-z0-9_:]*/.exec(line)
    if (sample !== null) { sampled.add(sample[0]); declared.add(sample[0]) }
  }
  return { declared, sampled }
}

/** Series Prometheus itself adds to every scrape target; not exported by the gateway, but valid in its queries. */
export const SCRAPE_SERIES: ReadonlySet<string> = new Set(['up'])
