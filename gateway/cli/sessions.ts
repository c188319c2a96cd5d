/**
 * `edgemq sessions`: the tenant's persistent MQTT sessions from a running
 * gateway's GET /v1/sessions, one line per cursor into the log (a session
 * without cursors gets one line): connected or offline, its lag in messages
 * and seconds, and the copies queued for it. `--json` prints the document
 * (every page of it: the CLI follows `next`).
 */
import type { ApiClient } from './http-client.ts'
import { table } from './admin.ts'
import type { SessionDoc, SessionsPage } from '../query/sessions.ts'

export type { SessionDoc } from '../query/sessions.ts'

type SessionsPageDoc = { tenant: string, next: string | null } & SessionsPage

/** Every session of the tenant: GET /v1/sessions page after page, until a page has no `next`. */
export async function listSessions (api: ApiClient): Promise<{ tenant: string, sessions: SessionDoc[] }> {
  const sessions: SessionDoc[] = []
  let after: string | null = null
  let tenant = ''
  do {
    const page: SessionsPageDoc = await api.json<SessionsPageDoc>(api.url(['sessions'], { after: after ?? undefined }))
    tenant = page.tenant
    sessions.push(...page.sessions)
    after = page.next
  } while (after !== null)
  return { tenant, sessions }
}

export function sessionsTable (sessions: readonly SessionDoc[]): string {
  const rows = sessions.flatMap((s) => {
    const state = s.connected ? 'connected' : s.offlineSince === null ? 'offline' : `offline since ${new Date(s.offlineSince).toISOString()}`
    const filters = s.subscriptions.map((f) => `${f.filter} (qos ${f.qos})`).join(', ') || '-'
    if (s.cursors.length === 0) return [[s.clientId, state, '-', '-', '-', '-', 0, 0, s.queued, filters]]
    return s.cursors.map((c) => [s.clientId, state, c.stream, c.partition, c.nextOffset, c.logEndOffset, c.lagMessages, c.lagSeconds, s.queued, filters])
  })
  return table(['CLIENT', 'STATE', 'STREAM', 'PARTITION', 'NEXT', 'LOG-END', 'LAG', 'LAG-SECONDS', 'QUEUED', 'SUBSCRIPTIONS'], rows)
}
