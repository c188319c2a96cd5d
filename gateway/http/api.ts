/**
 * The /v1 pull and replay API as fastify routes: authentication, and the
 * stream and consumer-group endpoints (records are served by
 * http/records.ts and http/batches.ts). Each route's parameters, query and
 * body are checked by its JSON schema (http/schemas.ts) before its handler
 * runs; the handlers check what needs the store.
 *
 * Tenants: a client names streams and groups inside its own tenant only.
 * Stream `telemetry` of a user of tenant `acme` is the store's
 * `acme/telemetry`; group `billing` is the store's group `acme/billing`.
 * Names containing `/` are refused, so no name reaches another tenant; only a
 * shared subscription's group, `share/<group>/<filter>`, has them (sent as
 * %2F), and it stays under the tenant's `<tenant>/share/` prefix.
 *
 * Authentication (http/auth.ts): HTTP basic with the same users as MQTT,
 * or a bearer token of `apiTokens`; only the `service` and `admin` roles
 * may use the API. Without configured users and tokens, requests from a
 * loopback address are accepted as tenant `default`.
 */
import type { ServerResponse } from 'node:http'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { isStoreError, systemClock, type Clock, type LogStore, type ResetSpec, type StreamInfo } from '../../store/index.ts'
import { ApiError, toApiError } from './errors.ts'
import { parseTime } from './params.ts'
import { ApiAuthenticator, AUTH_CHALLENGES, type Principal } from './auth.ts'
import { serveBatches } from './batches.ts'
import {
  AppendWaiters, clientGone, FORMAT_MEDIA_TYPES, parseRecordsRequest, serveRecords, type OutputFormat, type PartitionTarget, type RecordsQuery,
} from './records.ts'
import { routePath } from './routes.ts'
import {
  COMMIT_BODY, GROUP_PARAMS, GROUP_STREAM_PARAMS, KEY_RECORDS_QUERY, NO_QUERY, PARTITION_PARAMS, RECORDS_QUERY, RECORDS_RESPONSES, RESET_BODY,
  SESSIONS_QUERY, STREAM_PARAMS, UPSTREAM_PARAMS,
  type CommitBody, type GroupParams, type GroupStreamParams, type PartitionParams, type ResetBody, type StreamParams, type UpstreamParams,
} from './schemas.ts'
import type { UpstreamStatus } from '../../bridge/index.ts'
import type { ApiTokenConfig, UserConfig } from '../config/config.ts'
import type { SessionState } from '../mqtt/sessions/persistence.ts'
import { sessionDocs } from '../query/sessions.ts'
import { GatewayError } from '../errors.ts'
import { shareSubscriptionOf } from '../mqtt/shared/share-topic.ts'
import {
  bridgeGroupDoc, bridgeGroups, groupDocs, groupStreamDoc, partitionDoc, streamDoc, streamDocs, tenantGroupDoc, tenantGroups,
} from '../query/documents.ts'

export interface ApiDeps {
  readonly store: LogStore
  /** The configured users (config.users), the same as MQTT's. */
  readonly users: readonly UserConfig[]
  /** The configured bearer tokens (config.apiTokens). */
  readonly tokens?: readonly ApiTokenConfig[]
  /** Wall clock for relative times (`from=-15m`); injected by tests. */
  /** Where `now` and relative times come from (the store's Clock; the system's when not given). */
  readonly clock?: Clock
  readonly logger?: { warn (fields: Record<string, unknown>, message: string): void }
  /** The bridge's upstreams, for GET /v1/bridge; absent: no upstream is configured. */
  readonly bridge?: { status (): Promise<UpstreamStatus[]> }
  /**
   * This gateway's replication role, epoch, peer and lag, for GET /v1/replication; `replicated` resolves once the
   * writes so far are acknowledged as replication.acks says (the standby's too under replicated), awaited before a
   * write is answered.
   */
  readonly replication?: { status (): unknown, promote (): Promise<{ readonly epoch: number }>, replicated? (): Promise<void> }
  /** Set to the number of reads waiting for an append (long-polls); the gateway passes its edgemq_http_waiting_reads gauge. */
  readonly waitingReads?: { set (value: number): void }
  /** The persistent MQTT sessions, for GET /v1/sessions; absent: none is listed. */
  readonly sessions?: { states (): readonly SessionState[] }
  /**
   * The MQTT shared subscriptions, which delete their own groups (DELETE /v1/groups/share%2F...): refused with
   * GW_SHARE_IN_USE while a share has members. Absent: the store's group is deleted as any.
   */
  readonly shares?: { deleteGroup (id: string): Promise<void> }
}

declare module 'fastify' {
  interface FastifyRequest {
    /** Who calls /v1: set by the API's onRequest hook (http/auth.ts) before anything else runs; null elsewhere. */
    principal: Principal | null
  }
}

export interface Api {
  /** Adds the hooks and routes to `app`, an encapsulated instance with the prefix /v1. */
  register (app: FastifyInstance): void
  /** Ends every long-poll and stops listening to the store. */
  close (): void
}

const PARTITION = /^(?:0|[1-9][0-9]{0,4})$/
/** Our media types, and the text ones with the charset the responses state (an Accept range with a parameter matches only a type with it). */
const MEDIA_TYPE_FORMATS = new Map<string, OutputFormat>([
  ...Object.entries(FORMAT_MEDIA_TYPES).map(([format, type]) => [type, format as OutputFormat] as const),
  ['application/json; charset=utf-8', 'json'], ['application/x-ndjson; charset=utf-8', 'ndjson'],
])

/** The format the Accept header asks for (@fastify/accepts: q-values, then the header's order); json when it names none of ours. */
function acceptedFormat (request: FastifyRequest): OutputFormat {
  const type = request.accepts().type([...MEDIA_TYPE_FORMATS.keys()])
  return typeof type === 'string' ? MEDIA_TYPE_FORMATS.get(type) ?? 'json' : 'json'
}

/** The headers of an error response: the error's own, Allow for a 405, and for a 401 without a challenge of its own both schemes. */
export function errorHeaders (err: ApiError): Record<string, string | string[]> {
  const headers: Record<string, string | string[]> = { ...err.headers }
  const allow = err.details.allow
  if (typeof allow === 'string') headers.allow = allow
  // One WWW-Authenticate line per scheme.
  if (err.status === 401 && headers['www-authenticate'] === undefined) headers['www-authenticate'] = [...AUTH_CHALLENGES]
  return headers
}

/** Writes an error on a response the route took over from fastify (reply.hijack), as the server's error handler would. */
function writeApiError (res: ServerResponse, err: ApiError): void {
  const text = JSON.stringify(err.toJSON())
  res.writeHead(err.status, { ...errorHeaders(err), 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

function principal (request: FastifyRequest): Principal {
  if (request.principal === null) throw new ApiError('HTTP_INTERNAL', 'the request was not authenticated')
  return request.principal
}

export function createApi (deps: ApiDeps): Api {
  const { store } = deps
  const auth = new ApiAuthenticator(deps.users, deps.tokens ?? [], { logger: deps.logger })
  const clock = deps.clock ?? systemClock
  const now = (): number => clock.now()
  const waiters = new AppendWaiters(store, (n) => deps.waitingReads?.set(n))

  // ---------------------------------------------------------------- streams

  /** The tenant's stream `name` (its syntax was checked by the route's schema). */
  function resolveStream (who: Principal, name: string): { stream: string, name: string, info: StreamInfo } {
    const stream = `${who.tenant}/${name}`
    try {
      return { stream, name, info: store.streamInfo(stream) }
    } catch (err) {
      if (isStoreError(err, 'STORE_UNKNOWN_STREAM') || isStoreError(err, 'STORE_INVALID_NAME')) {
        throw new ApiError('HTTP_UNKNOWN_STREAM', `unknown stream ${JSON.stringify(name)}`, { details: { stream: name } })
      }
      throw err
    }
  }

  function resolvePartition (s: { name: string, info: StreamInfo }, text: string): number {
    const p = PARTITION.test(text) ? Number(text) : NaN
    if (!(p < s.info.partitions)) {
      throw new ApiError('HTTP_UNKNOWN_PARTITION', `stream ${s.name} has partitions 0 to ${s.info.partitions - 1}, not ${JSON.stringify(text)}`,
        { details: { partition: text } })
    }
    return p
  }

  // ---------------------------------------------------------------- groups

  /** The store's name of the tenant's group `name` (its syntax was checked by the route's schema). */
  function groupId (who: Principal, name: string): string {
    return `${who.tenant}/${name}`
  }

  async function commit (group: string, s: { stream: string, name: string, info: StreamInfo }, body: CommitBody): Promise<void> {
    const commits = new Map<number, number>()
    body.offsets.forEach((e, i) => {
      const partition = resolvePartition(s, String(e.partition))
      const offset = e.offset
      if (commits.has(partition)) {
        throw new ApiError('HTTP_BAD_BODY', `partition ${partition} appears twice in offsets`, { details: { field: `offsets[${i}].partition` } })
      }
      const end = store.partitionInfo(s.stream, partition).logEndOffset
      if (offset > end) {
        throw new ApiError('HTTP_OFFSET_OUT_OF_RANGE', `cannot commit offset ${offset} for ${s.name}[${partition}]: the log ends at ${end}`,
          { details: { offset, partition, logStartOffset: store.partitionInfo(s.stream, partition).logStartOffset, logEndOffset: end } })
      }
      commits.set(partition, offset)
    })
    for (const [partition, offset] of commits) await store.commitOffset(group, s.stream, partition, offset)
  }

  async function reset (group: string, s: { stream: string, name: string, info: StreamInfo }, body: ResetBody): Promise<void> {
    const partition = body.partition === undefined ? undefined : resolvePartition(s, String(body.partition))
    let spec: ResetSpec
    switch (body.to) {
      case 'earliest': case 'latest':
        if (body.offset !== undefined || body.timestamp !== undefined) throw new ApiError('HTTP_BAD_BODY', `to: ${body.to} takes no offset or timestamp`)
        spec = { to: body.to }
        break
      case 'offset':
        if (body.timestamp !== undefined) {
          throw new ApiError('HTTP_BAD_BODY', 'to: offset takes an offset, not a timestamp', { details: { field: 'timestamp' } })
        }
        if (body.offset === undefined) throw new ApiError('HTTP_BAD_BODY', 'to: offset needs an offset', { details: { field: 'offset' } })
        spec = { to: 'offset', offset: body.offset }
        break
      case 'timestamp': {
        if (body.offset !== undefined) throw new ApiError('HTTP_BAD_BODY', 'to: timestamp takes a timestamp, not an offset', { details: { field: 'offset' } })
        const t = body.timestamp
        if (t === undefined) {
          throw new ApiError('HTTP_BAD_TIME', 'to: timestamp needs a timestamp (milliseconds since the epoch or an ISO 8601 time)',
            { details: { field: 'timestamp' } })
        }
        spec = { to: 'timestamp', timestamp: typeof t === 'number' ? t : parseTime(t, now(), 'timestamp') }
        break
      }
    }
    await store.resetGroup(group, s.stream, spec, partition)
  }

  // ---------------------------------------------------------------- records

  async function records (request: FastifyRequest, reply: FastifyReply, target: PartitionTarget, query: RecordsQuery): Promise<void> {
    const who = principal(request)
    const parsed = parseRecordsRequest(query, now(), acceptedFormat(request), (g) => groupId(who, g))
    // From here the response is written straight to the socket, as it is read (fastify adds nothing to the streaming paths).
    reply.hijack()
    const res = reply.raw
    const ctx = { store, waiters, signal: clientGone(request.raw, res) }
    try {
      await (parsed.format === 'batches' ? serveBatches(ctx, target, parsed, res) : serveRecords(ctx, target, parsed, res))
    } catch (err) {
      const apiError = toApiError(err)
      if (apiError.status >= 500) deps.logger?.warn({ code: apiError.code, path: request.url, err: apiError.message }, 'HTTP API request failed')
      if (!res.headersSent) writeApiError(res, apiError)
      else res.destroy()
    }
  }

  // ---------------------------------------------------------------- routes

  function register (app: FastifyInstance): void {
    app.decorateRequest('principal', null)
    // Every /v1 request, those that end in 404 or 405 included, is authenticated first.
    app.addHook('onRequest', async (request) => {
      request.principal = await auth.authenticate(request.headers.authorization, request.socket.remoteAddress)
    })
    app.setNotFoundHandler(async (request) => {
      throw new ApiError('HTTP_NOT_FOUND', `no route ${request.url.split('?')[0] ?? ''}`)
    })

    const streams = { tags: ['streams'] }
    routePath(app, '/streams', {
      GET: {
        schema: { ...streams, summary: 'The tenant\'s streams, with per-partition offsets, bytes and timestamps.', querystring: NO_QUERY },
        handler: async (request) => {
          const who = principal(request)
          return { tenant: who.tenant, streams: streamDocs(store, who.tenant) }
        },
      },
    })
    routePath(app, '/streams/:stream', {
      GET: {
        schema: { ...streams, summary: 'One stream.', params: STREAM_PARAMS, querystring: NO_QUERY },
        handler: async (request) => {
          const who = principal(request)
          const s = resolveStream(who, (request.params as StreamParams).stream)
          return { tenant: who.tenant, ...streamDoc(store, who.tenant, s.info) }
        },
      },
    })
    routePath(app, '/streams/:stream/partitions/:partition', {
      GET: {
        schema: { ...streams, summary: 'One partition.', params: PARTITION_PARAMS, querystring: NO_QUERY },
        handler: async (request) => {
          const params = request.params as PartitionParams
          const s = resolveStream(principal(request), params.stream)
          return { stream: s.name, ...partitionDoc(store, s.stream, resolvePartition(s, params.partition)) }
        },
      },
    })
    routePath(app, '/streams/:stream/partitions/:partition/records', {
      GET: {
        schema: {
          ...streams,
          summary: 'Fetch records of one partition: JSON, NDJSON (streamed), CBOR, or the stored batches.',
          params: PARTITION_PARAMS, querystring: RECORDS_QUERY, response: RECORDS_RESPONSES,
        },
        handler: async (request, reply) => {
          const params = request.params as PartitionParams
          const s = resolveStream(principal(request), params.stream)
          const target = { stream: s.stream, name: s.name, partition: resolvePartition(s, params.partition) }
          await records(request, reply, target, request.query as RecordsQuery)
        },
      },
    })
    routePath(app, '/streams/:stream/records', {
      GET: {
        schema: {
          ...streams,
          summary: 'Fetch the records of one key, from the partition the key maps to.',
          params: STREAM_PARAMS, querystring: KEY_RECORDS_QUERY, response: RECORDS_RESPONSES,
        },
        handler: async (request, reply) => {
          const s = resolveStream(principal(request), (request.params as StreamParams).stream)
          const query = request.query as Omit<RecordsQuery, 'key'> & { key: string }
          const target = { stream: s.stream, name: s.name, partition: store.partitionFor(s.stream, query.key) }
          await records(request, reply, target, { ...query, key: [query.key] })
        },
      },
    })

    routePath(app, '/sessions', {
      GET: {
        schema: {
          tags: ['sessions'], querystring: SESSIONS_QUERY,
          summary: 'The tenant\'s persistent MQTT sessions by client id, a page at a time (`next` is the next page\'s `after`): '
            + 'connected or not, subscriptions, and per cursor into the log the lag in messages and seconds.',
        },
        handler: async (request) => {
          const who = principal(request)
          const page = request.query as { limit?: number, after?: string }
          return { tenant: who.tenant, ...await sessionDocs(store, who.tenant, deps.sessions?.states() ?? [], now(), page) }
        },
      },
    })

    const groups = { tags: ['groups'] }
    // A write here is a LevelDB write of its own, not a group commit, so no commit gate holds it: under acks: replicated it is
    // answered once the standby has it, as a PUBACK is.
    const replicated = async (): Promise<void> => { await deps.replication?.replicated?.() }
    const readOnly = (group: string): ApiError => new ApiError('HTTP_GROUP_READ_ONLY', shareSubscriptionOf(group) === null
      ? `consumer group ${JSON.stringify(group)} is the bridge's: its offsets move as the upstream acknowledges records`
      : `consumer group ${JSON.stringify(group)} is the shared subscription ${shareSubscriptionOf(group)}'s: its offsets move as its members ` +
        'acknowledge records (it can be deleted once it has no member)', { details: { group } })
    routePath(app, '/groups', {
      GET: {
        schema: {
          ...groups, summary: 'The tenant\'s consumer groups with their lag, and the bridge\'s groups that forward its streams.', querystring: NO_QUERY,
        },
        handler: async (request) => {
          const who = principal(request)
          return { tenant: who.tenant, groups: await groupDocs(store, who.tenant) }
        },
      },
    })
    routePath(app, '/groups/:group', {
      GET: {
        schema: { ...groups, summary: 'One consumer group with its lag.', params: GROUP_PARAMS, querystring: NO_QUERY },
        handler: async (request) => {
          const who = principal(request)
          const { group } = request.params as GroupParams
          const bridgeGroup = bridgeGroups(store, who.tenant).get(group)
          if (bridgeGroup !== undefined) return await bridgeGroupDoc(store, who.tenant, group, bridgeGroup)
          const g = tenantGroups(store, who.tenant).get(group)
          if (g === undefined) throw new ApiError('HTTP_UNKNOWN_GROUP', `unknown consumer group ${JSON.stringify(group)}`, { details: { group } })
          return await tenantGroupDoc(store, who.tenant, group, g)
        },
      },
      DELETE: {
        schema: { ...groups, summary: 'Delete a consumer group.', params: GROUP_PARAMS, querystring: NO_QUERY },
        handler: async (request) => {
          const who = principal(request)
          const { group } = request.params as GroupParams
          if (bridgeGroups(store, who.tenant).has(group)) throw readOnly(group)
          if (!tenantGroups(store, who.tenant).has(group)) {
            throw new ApiError('HTTP_UNKNOWN_GROUP', `unknown consumer group ${JSON.stringify(group)}`, { details: { group } })
          }
          if (shareSubscriptionOf(group) === null || deps.shares === undefined) {
            await store.deleteGroup(groupId(who, group))
            await replicated()
            return { group, deleted: true }
          }
          try {
            await deps.shares.deleteGroup(groupId(who, group))
          } catch (err) {
            if (!(err instanceof GatewayError && err.code === 'GW_SHARE_IN_USE')) throw err
            throw new ApiError('HTTP_GROUP_IN_USE', err.message, { cause: err, details: { group } })
          }
          await replicated()
          return { group, deleted: true }
        },
      },
    })

    /** The group's offsets on one stream, after `change` (commit, reset) when there is one. */
    const groupStream = (change?: (group: string, s: ReturnType<typeof resolveStream>, request: FastifyRequest) => Promise<void>) =>
      async (request: FastifyRequest): Promise<unknown> => {
        const who = principal(request)
        const params = request.params as GroupStreamParams
        const s = resolveStream(who, params.stream)
        const bridgeGroup = bridgeGroups(store, who.tenant).get(params.group)
        if (change !== undefined) {
          if (bridgeGroup !== undefined || shareSubscriptionOf(params.group) !== null) throw readOnly(params.group)
          await change(groupId(who, params.group), s, request)
          await replicated()
        }
        return { group: params.group, ...await groupStreamDoc(store, who.tenant, bridgeGroup?.id ?? groupId(who, params.group), s.stream) }
      }
    routePath(app, '/groups/:group/streams/:stream', {
      GET: {
        schema: {
          ...groups, summary: 'The group\'s committed offset per partition of one stream, with lag.', params: GROUP_STREAM_PARAMS, querystring: NO_QUERY,
        },
        handler: groupStream(),
      },
    })
    routePath(app, '/groups/:group/streams/:stream/commit', {
      POST: {
        schema: {
          ...groups,
          summary: 'Commit the next offset to consume, per partition; creates the group.',
          params: GROUP_STREAM_PARAMS, querystring: NO_QUERY, body: COMMIT_BODY,
        },
        handler: groupStream(async (group, s, request) => await commit(group, s, request.body as CommitBody)),
      },
    })
    routePath(app, '/groups/:group/streams/:stream/reset', {
      POST: {
        schema: {
          ...groups,
          summary: 'Move the group to the earliest, latest, an offset or a time, on one partition or all (clamped into the log).',
          params: GROUP_STREAM_PARAMS, querystring: NO_QUERY, body: RESET_BODY,
        },
        handler: groupStream(async (group, s, request) => await reset(group, s, request.body as ResetBody)),
      },
    })

    const bridge = { tags: ['bridge'] }
    /** A tenant sees every upstream's connection state, and the offsets of its own streams only. */
    const upstreams = async (who: Principal): Promise<UpstreamStatus[]> =>
      (await deps.bridge?.status() ?? []).map((u) => ({ ...u, partitions: u.partitions.filter((p) => p.tenant === who.tenant) }))
    routePath(app, '/bridge', {
      GET: {
        schema: { ...bridge, summary: 'The bridge\'s upstreams: connection state, backlog and offsets of the tenant\'s streams.', querystring: NO_QUERY },
        handler: async (request) => ({ upstreams: await upstreams(principal(request)) }),
      },
    })
    routePath(app, '/bridge/:upstream', {
      GET: {
        schema: { ...bridge, summary: 'One upstream.', params: UPSTREAM_PARAMS, querystring: NO_QUERY },
        handler: async (request) => {
          const all = await upstreams(principal(request))
          const name = (request.params as UpstreamParams).upstream
          const one = all.find((u) => u.name === name)
          if (one === undefined) {
            const configured = all.map((u) => u.name).join(', ') || 'none'
            throw new ApiError('HTTP_UNKNOWN_UPSTREAM', `no upstream named ${JSON.stringify(name)} (configured: ${configured})`,
              { details: { upstream: name } })
          }
          return one
        },
      },
    })
    routePath(app, '/replication', {
      GET: {
        schema: {
          tags: ['operations'], summary: 'Replication: role, epoch, peer, whether the standby is in sync, and its lag (docs/operations.md, "Standby replica").',
          querystring: NO_QUERY,
        },
        handler: async (request) => {
          principal(request)
          return deps.replication?.status() ?? { role: 'none' }
        },
      },
    })
    routePath(app, '/replication/promote', {
      POST: {
        schema: {
          tags: ['operations'], querystring: NO_QUERY,
          summary: 'Promote this standby: it stops following, starts the next epoch and restarts as primary (admin only; `edgemq promote`).',
        },
        handler: async (request) => {
          const who = principal(request)
          if (who.role === 'service') throw new ApiError('HTTP_FORBIDDEN', 'promoting a standby needs an admin user or token (or loopback without users)')
          if (deps.replication === undefined) throw new ApiError('HTTP_PROMOTE_REFUSED', 'this gateway has no replication')
          try {
            return { promoted: true, ...await deps.replication.promote() }
          } catch (err) {
            if ((err as { code?: unknown }).code === 'GW_PROMOTE_REFUSED') throw new ApiError('HTTP_PROMOTE_REFUSED', (err as Error).message, { cause: err })
            throw err
          }
        },
      },
    })
  }

  return {
    register,
    close () {
      waiters.close()
    },
  }
}
