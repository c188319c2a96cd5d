/**
 * The JSON document of a tenant's persistent MQTT sessions: what GET
 * /v1/sessions answers and `edgemq sessions` prints. A session belongs to the
 * tenant its client id is scoped by (access/topics.ts scopedClientId: the
 * tenant the client authenticated as), so no other tenant's session is ever
 * listed; its filters and streams are shown without the tenant prefix.
 *
 * Lag per cursor, as consumer groups count it (LogStore.groupLag): in
 * messages, log end − next offset (from the log start when retention passed
 * the cursor); in seconds, now − timestamp of the record at the next offset,
 * 0 when caught up.
 */
import type { LogStore } from '../../store/index.ts'
import { unmountTopic, unscopedClientId } from '../access/topics.ts'
import type { SessionState } from '../mqtt/sessions/persistence.ts'

export interface SessionCursorDoc {
  readonly stream: string
  readonly partition: number
  readonly nextOffset: number
  readonly logEndOffset: number
  readonly lagMessages: number
  readonly lagSeconds: number
}

export interface SessionDoc {
  readonly clientId: string
  readonly connected: boolean
  /** ms since the epoch; null while connected. */
  readonly offlineSince: number | null
  readonly subscriptions: ReadonlyArray<{ readonly filter: string, readonly qos: number }>
  readonly lagMessages: number
  readonly lagSeconds: number
  readonly cursors: readonly SessionCursorDoc[]
  /** Copies queued for the session (unrouted topics, QoS 2), besides what its cursors read from the log. */
  readonly queued: number
}

async function cursorDoc (store: LogStore, tenant: string, now: number, c: SessionState['cursors'][number]): Promise<SessionCursorDoc | null> {
  const name = unmountTopic(tenant, c.stream)
  if (name === null) return null
  let start: number
  let end: number
  try {
    ({ logStartOffset: start, logEndOffset: end } = store.partitionInfo(c.stream, c.partition))
  } catch {
    return null // the stream was deleted: the cursor reads nothing
  }
  const next = Math.max(c.next, start)
  let lagSeconds = 0
  if (next < end) {
    const oldest = (await store.read(c.stream, c.partition, next, { maxRecords: 1 })).records[0]
    if (oldest !== undefined) lagSeconds = Math.max(0, (now - oldest.timestamp) / 1000)
  }
  return { stream: name, partition: c.partition, nextOffset: c.next, logEndOffset: end, lagMessages: Math.max(0, end - next), lagSeconds }
}

/** At most this many sessions per page of GET /v1/sessions (the default page size too). */
export const MAX_SESSIONS_PER_PAGE = 1000

/** One page of a tenant's sessions; `next` is the `after` of the following page, null on the last. */
export interface SessionsPage {
  readonly sessions: SessionDoc[]
  readonly next: string | null
}

/**
 * The persistent sessions of `tenant` ordered by client id: at most `limit`
 * of them, after client id `after` (exclusive) when given. Only the page's
 * sessions read the log for their lag, so a page costs O(limit) reads
 * however many sessions the gateway holds.
 */
export async function sessionDocs (
  store: LogStore, tenant: string, states: readonly SessionState[], now: number,
  page: { readonly limit?: number, readonly after?: string } = {},
): Promise<SessionsPage> {
  const limit = page.limit ?? MAX_SESSIONS_PER_PAGE
  const mine = states.flatMap((state) => {
    const clientId = unscopedClientId(tenant, state.clientId)
    return clientId === null || (page.after !== undefined && clientId <= page.after) ? [] : [{ clientId, state }]
  }).sort((a, b) => a.clientId < b.clientId ? -1 : a.clientId > b.clientId ? 1 : 0)
  const docs: SessionDoc[] = []
  for (const { clientId, state } of mine.slice(0, limit)) {
    const cursors: SessionCursorDoc[] = []
    for (const c of state.cursors) {
      const doc = await cursorDoc(store, tenant, now, c)
      if (doc !== null) cursors.push(doc)
    }
    docs.push({
      clientId,
      connected: state.connected,
      offlineSince: state.connected ? null : state.offlineSince,
      subscriptions: state.subscriptions.flatMap((s) => {
        const filter = unmountTopic(tenant, s.topic)
        return filter === null ? [] : [{ filter, qos: s.qos }]
      }),
      lagMessages: cursors.reduce((n, c) => n + c.lagMessages, 0),
      lagSeconds: cursors.reduce((max, c) => Math.max(max, c.lagSeconds), 0),
      cursors,
      queued: state.queued,
    })
  }
  return { sessions: docs, next: mine.length > limit ? docs[docs.length - 1]!.clientId : null }
}
