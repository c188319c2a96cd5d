/**
 * Renders the reference pages that the code can speak for itself, so they
 * cannot drift from it:
 *
 * - docs/configuration.md from the config schema (`describeConfig()`, which
 *   walks the schema gateway/config/config.ts composes from the per-folder slices);
 * - docs/errors.md from the error-code registries of each folder's errors.ts;
 * - docs/metrics.md from the metrics the gateway and the bridge register on a
 *   fresh prom-client registry;
 * - the "Every command and flag" section of docs/cli.md from the commands'
 *   own --help (the rest of that page is prose, kept by hand).
 *
 * `npm run docs` writes the stale ones; `npm run docs -- --check` exits 1
 * and names the stale ones. test/docs/generated.test.ts fails when a
 * committed file differs from what this renders.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import type { Command } from 'commander'
import { Counter, Gauge, Histogram, Registry, Summary } from 'prom-client'
import { BRIDGE_ERROR_CODES } from '../bridge/errors.ts'
import { createBridgeMetrics } from '../bridge/metrics.ts'
import { HTTP_ERROR_CODES } from '../gateway/http/errors.ts'
import { buildProgram } from '../gateway/cli/main.ts'
import { CLI_ERROR_CODES } from '../gateway/cli/errors.ts'
import { describeConfig } from '../gateway/config/config.ts'
import { GATEWAY_ERROR_CODES, GATEWAY_WARNING_CODES } from '../gateway/errors.ts'
import { createMetrics, type MetricsSources } from '../gateway/metrics/metrics.ts'
import { SESSION_ERROR_CODES } from '../gateway/mqtt/sessions/persistence.ts'
import { createLeaseMetrics, createReplicationMetrics } from '../gateway/replication/metrics.ts'
import { STORE_ERROR_CODES } from '../store/errors.ts'

export const REGENERATE = 'npm run docs'

/** GitHub's anchor for a heading (github-slugger): lower case, punctuation dropped, spaces to hyphens. */
export function anchor (heading: string): string {
  return heading.toLowerCase().replace(/[^\p{L}\p{N}\p{M} _-]/gu, '').replaceAll(' ', '-')
}

const banner = (source: string): string =>
  `<!-- Generated from ${source} by docs/generate.ts: edit the code, then run \`${REGENERATE}\`. -->`

/**
 * A table cell: `|` would end the cell, and outside code spans `<name>` would
 * be read as an HTML tag and vanish from the rendered page.
 */
function cell (text: string): string {
  return text.split(/(`[^`]*`)/).map((part, i) => {
    if (i % 2 === 1) return part.replaceAll('|', '\\|')
    return part.replaceAll('|', '\\|').replaceAll('<', '&lt;').replaceAll('>', '&gt;')
  }).join('')
}

export function renderConfigurationDoc (): string {
  const keys = describeConfig()
  // One section per top-level key, in schema order, so the page has a table of contents.
  const sections = new Map<string, typeof keys>()
  for (const k of keys) {
    const top = /^[^.[]+/.exec(k.key)?.[0] ?? k.key
    sections.set(top, [...(sections.get(top) ?? []), k])
  }
  const row = (k: (typeof keys)[number]): string =>
    `| \`${k.key}\` | ${k.default === '' ? '—' : `\`${k.default}\``} | ${cell(k.description)} |`
  return [
    '# Configuration reference',
    '',
    banner('the config schema (gateway/config/config.ts and the slices it composes)'),
    '',
    'One YAML or JSON file (`edgemq start --config FILE`), validated against one',
    'schema when the gateway starts: an unknown key or a bad value stops start-up',
    'with `GW_CONFIG_INVALID` and a message naming the key. Every key has a default',
    '(— means the key is required where its parent is given, or is derived as its',
    'description says). The validated config is frozen; nothing is re-read while',
    'the gateway runs, so a change needs a restart.',
    '',
    'Examples: [a config with TLS, WebSocket, two tenants and users](mqtt.md#an-example-config),',
    '[a bridge to two regions](bridge.md), [a starting config for a site](../deploy/edgemq.yaml).',
    'Keys are listed in schema order; `a[]` is each element of the list `a`,',
    '`a.<name>` each entry of the map `a`.',
    '',
    [...sections.keys()].map((top) => `[\`${top}\`](#${anchor(top)})`).join(' · '),
    '',
    ...[...sections].flatMap(([top, rows]) => [
      `## ${top}`,
      '',
      '| key | default | description |',
      '| --- | --- | --- |',
      ...rows.map(row),
      '',
    ]),
  ].join('\n').replace(/\n+$/, '\n')
}

interface CodeRow { readonly code: string, readonly status?: number, readonly description: string }

function codeRows (registry: Record<string, string>): CodeRow[] {
  return Object.entries(registry).map(([code, description]) => ({ code, description }))
}

function codeTable (rows: readonly CodeRow[], withStatus: boolean): string[] {
  return [
    withStatus ? '| code | status | meaning |' : '| code | meaning |',
    withStatus ? '| --- | ---: | --- |' : '| --- | --- |',
    ...rows.map((r) => withStatus
      ? `| \`${r.code}\` | ${r.status ?? ''} | ${cell(r.description)} |`
      : `| \`${r.code}\` | ${cell(r.description)} |`),
  ]
}

export function renderErrorsDoc (): string {
  const sections: Array<{ title: string, source: string, intro: string, rows: CodeRow[], withStatus?: boolean }> = [
    {
      title: 'Store', source: 'store/errors.ts', intro: 'Codes `STORE_…`, raised by the log; the HTTP API and the command line answer with codes of their own.',
      rows: codeRows(STORE_ERROR_CODES),
    },
    {
      title: 'Gateway', source: 'gateway/errors.ts', intro: 'Codes `GW_…`: start-up and MQTT refusals; `$replay` refusals also answer SUBACK 0x80 for that filter.',
      rows: codeRows(GATEWAY_ERROR_CODES),
    },
    {
      title: 'Gateway warnings', source: 'gateway/errors.ts',
      intro: 'Codes `GW_WARN_…`: settings that work but are weak, logged by `edgemq start` as one warning line each (field `code`); the gateway runs on.',
      rows: codeRows(GATEWAY_WARNING_CODES),
    },
    {
      title: 'Sessions', source: 'gateway/mqtt/sessions/persistence.ts', intro: 'Codes `GW_SESSION_…` of the MQTT session persistence on the same LevelDB.',
      rows: codeRows(SESSION_ERROR_CODES),
    },
    {
      title: 'HTTP API', source: 'gateway/http/errors.ts',
      intro: 'Codes `HTTP_…`. Every error response is `{"error":{"code":"HTTP_…","message":"…", …details}}` with this status.',
      rows: Object.entries(HTTP_ERROR_CODES).map(([code, e]) => ({ code, status: e.status, description: e.description })),
      withStatus: true,
    },
    {
      title: 'Command line', source: 'gateway/cli/errors.ts',
      intro: 'Codes `CLI_…`. The client commands print `edgemq: <code>: <message>` on stderr and exit 1; the same problem has the same code over HTTP (`--url`) and with `--data-dir`.',
      rows: codeRows(CLI_ERROR_CODES),
    },
    {
      title: 'Bridge', source: 'bridge/errors.ts', intro: 'Codes `BRIDGE_…` of the bridge to upstream clusters.',
      rows: codeRows(BRIDGE_ERROR_CODES),
    },
  ]
  return [
    '# Error codes',
    '',
    banner('the error-code registries (each folder\'s errors.ts)'),
    '',
    'Errors carry a stable `code` (tests match on the code, never on the',
    'message) and, where a lower layer failed, a `cause`.',
    '',
    ...sections.map((s) => `- [${s.title}](#${anchor(s.title)})`),
    '',
    ...sections.flatMap((s) => [
      `## ${s.title}`,
      '',
      `${s.intro} Registry: [\`${s.source}\`](../${s.source}).`,
      '',
      ...codeTable(s.rows, s.withStatus === true),
      '',
    ]),
  ].join('\n').replace(/\n+$/, '\n')
}

/** The edgemq_ metrics as registered, without the store or the bridge running (nothing is collected). */
function registeredMetrics (): Array<{ name: string, type: string, help: string, labels: readonly string[] }> {
  const registry = new Registry()
  const unused = (): never => { throw new Error('docs/generate.ts renders metric definitions and never collects them') }
  const sources: MetricsSources = {
    store: new Proxy({}, { get: unused }) as MetricsSources['store'],
    diskFreeBytes: unused,
    diskSizeBytes: unused,
    healthy: unused,
    version: '',
    gatewayId: '',
  }
  createMetrics(registry, sources)
  createBridgeMetrics(registry, [], unused, { now: unused })
  createReplicationMetrics(registry, { role: unused, epoch: unused, inSync: unused, lag: unused, backlogBytes: unused })
  createLeaseMetrics(registry, unused)
  return registry.getMetricsAsArray()
    .filter((m) => m.name.startsWith('edgemq_'))
    .map((m) => {
      const type = m instanceof Counter ? 'counter' : m instanceof Gauge ? 'gauge' : m instanceof Histogram ? 'histogram' : m instanceof Summary ? 'summary' : 'untyped'
      const labels = (m as unknown as { labelNames?: readonly string[] }).labelNames ?? []
      return { name: m.name, type, help: m.help, labels }
    })
}

export function renderMetricsDoc (): string {
  const metrics = registeredMetrics()
  const family = (name: string): string => {
    if (name.startsWith('edgemq_bridge_')) return 'Bridge'
    if (name.startsWith('edgemq_replication_')) return 'Replication'
    if (name === 'edgemq_groups' || /^edgemq_group_(committed|lag)/.test(name)) return 'Consumer groups'
    if (/^edgemq_(store_|partition_|streams$|retention_|group_commit_|append_)/.test(name)) return 'Log (store)'
    return 'Gateway and MQTT'
  }
  const families = ['Gateway and MQTT', 'Log (store)', 'Consumer groups', 'Bridge', 'Replication'].map((title) => ({ title, match: (n: string) => family(n) === title }))
  return [
    '# Metrics',
    '',
    banner('the metrics gateway/metrics/metrics.ts and bridge/metrics.ts register'),
    '',
    '`GET /metrics` on the HTTP port (default `127.0.0.1:9464`) answers in',
    'Prometheus text format. Besides the `edgemq_` metrics below it carries',
    'Node\'s process metrics (`process_…`, `nodejs_…`, from prom-client\'s',
    'default collectors). Labels are tenant, stream, partition, group, listener,',
    'upstream, reason — never a device or client id, so the series count does',
    'not grow with the fleet. [`dashboards/`](../dashboards/README.md) has',
    'Grafana dashboards and Prometheus alert rules built on these.',
    '',
    'Counters and gauges whose label values the config names (listeners,',
    'tenants, streams, each upstream\'s forwarded streams, and every refusal',
    'reason, replay outcome and kind of damaged session entry) are there at 0',
    'from the first scrape ([`gateway/metrics/zero.ts`](../gateway/metrics/zero.ts)),',
    'and a shared subscription\'s counters from its group\'s start: a panel shows 0',
    'rather than "No data", and `increase()` sees the first event.',
    '',
    ...families.map((f) => `- [${f.title}](#${anchor(f.title)})`),
    '',
    ...families.flatMap((f) => [
      `## ${f.title}`,
      '',
      '| metric | type | labels | meaning |',
      '| --- | --- | --- | --- |',
      ...metrics.filter((m) => f.match(m.name)).map((m) =>
        `| \`${m.name}\` | ${m.type} | ${m.labels.map((l) => `\`${l}\``).join(', ') || '—'} | ${cell(m.help)} |`),
      '',
    ]),
  ].join('\n').replace(/\n+$/, '\n')
}

const CLI_BEGIN = '<!-- BEGIN generated from gateway/cli/main.ts by docs/generate.ts: run `npm run docs` -->'
const CLI_END = '<!-- END generated -->'

/** Every command's --help, at a fixed width and without colour (commander otherwise adapts both to the terminal it runs in). */
export function renderCliHelp (): string {
  const blocks: string[] = []
  const walk = (command: Command, name: string): void => {
    command.configureHelp({ ...command.configureHelp(), helpWidth: 100 })
    command.configureOutput({ ...command.configureOutput(), getOutHasColors: () => false })
    blocks.push(`\`${name} --help\`:`, '', '```text', command.helpInformation().trimEnd(), '```', '')
    for (const sub of command.commands) walk(sub, `${name} ${sub.name()}`)
  }
  walk(buildProgram(() => {}), 'edgemq')
  return [CLI_BEGIN, '', ...blocks, CLI_END].join('\n')
}

/** Replaces the generated section of a hand-written page, between its BEGIN and END markers. */
function replaceSection (file: string, current: string, section: string): string {
  const begin = current.indexOf(CLI_BEGIN)
  const end = current.indexOf(CLI_END)
  if (begin < 0 || end < begin) throw new Error(`${file} lost its generated section's markers (${CLI_BEGIN} … ${CLI_END})`)
  return current.slice(0, begin) + section + current.slice(end + CLI_END.length)
}

/** Each page as the generator renders it, from the committed text (pages with a hand-written part keep it). */
export const GENERATED_DOCS: ReadonlyArray<{ file: string, render: (current: string) => string }> = [
  { file: 'docs/configuration.md', render: renderConfigurationDoc },
  { file: 'docs/errors.md', render: renderErrorsDoc },
  { file: 'docs/metrics.md', render: renderMetricsDoc },
  { file: 'docs/cli.md', render: (current) => replaceSection('docs/cli.md', current, renderCliHelp()) },
]

const root = fileURLToPath(new URL('..', import.meta.url))

function readOrEmpty (file: string): string {
  try {
    return readFileSync(root + file, 'utf8')
  } catch {
    return ''
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const check = process.argv.includes('--check')
  const stale: string[] = []
  for (const doc of GENERATED_DOCS) {
    const text = doc.render(readOrEmpty(doc.file))
    if (readOrEmpty(doc.file) === text) continue
    stale.push(doc.file)
    if (!check) writeFileSync(root + doc.file, text)
  }
  if (check && stale.length > 0) {
    console.error(`stale: ${stale.join(', ')}; run \`${REGENERATE}\``)
    process.exit(1)
  }
  console.log(stale.length === 0 ? 'docs up to date' : `wrote ${stale.join(', ')}`)
}
