/**
 * The /v1 pull and replay API: routing, authentication, and the stream and
 * consumer-group endpoints (records are served by http/records.ts).
 *
 * Tenants: a client names streams and groups inside its own tenant only.
 * Stream `telemetry` of a user of tenant `acme` is the store's
 * `acme/telemetry`; group `billing` is the store's group `acme/billing`.
 * Names containing `/` are refused, so no name reaches another tenant.
 *
 * Authentication (http/auth.ts): HTTP basic with the same users as MQTT,
 * or a bearer token of `apiTokens`; only the `service` and `admin` roles
 * may use the API. Without configured users and tokens, requests from a
 * loopback address are accepted as tenant `default`.
 */
import type { IncomingMessage, ServerResponse } from 'node:http'
import { isStoreError, type LogStore, type ResetSpec, type StreamInfo } from '../../store/index.ts'
import { ApiError, toApiError } from './errors.ts'
import { parseTime, QueryParams } from './params.ts'
import { ApiAuthenticator, AUTH_CHALLENGES, type Principal } from './auth.ts'
import { serveBatches } from './batches.ts'
import { AppendWaiters, clientGone, parseRecordsRequest, serveRecords, type PartitionTarget } from './records.ts'
import type { UpstreamStatus } from '../../bridge/index.ts'
import type { ApiTokenConfig, UserConfig } from '../config/config.ts'
import { bridgeGroupDoc, bridgeGroups, groupDoc, groupDocs, groupStreamDoc, partitionDoc, streamDoc, streamDocs, tenantGroups } from '../query/documents.ts'

export interface ApiDeps {
  readonly store: LogStore
  /** The configured users (config.users), the same as MQTT's. */
  readonly users: readonly UserConfig[]
  /** The configured bearer tokens (config.apiTokens). */
  readonly tokens?: readonly ApiTokenConfig[]
  /** Wall clock for relative times (`from=-15m`); injected by tests. */
  readonly now?: () => number
  readonly logger?: { warn (fields: Record<string, unknown>, message: string): void }
  /** The bridge's upstreams, for GET /v1/bridge; absent: no upstream is configured. */
  readonly bridge?: { status (): Promise<UpstreamStatus[]> }
}

export interface Api {
  /** Serves a request whose path starts with /v1. */
  handle (req: IncomingMessage, res: ServerResponse, url: URL): Promise<void>
  /** Ends every long-poll and stops listening to the store. */
  close (): void
}

const STREAM_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/
const GROUP_NAME = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/
const PARTITION = /^(?:0|[1-9][0-9]{0,4})$/
const MAX_BODY_BYTES = 64 * 1024

function sendJson (res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), ...headers })
  res.end(text)
}

export function sendApiError (res: ServerResponse, err: ApiError): void {
  const headers: Record<string, string> = { ...err.headers }
  const allow = err.details.allow
  if (typeof allow === 'string') headers.allow = allow
  // Without a challenge of its own, a 401 offers both schemes (one WWW-Authenticate line each).
  if (err.status === 401 && headers['www-authenticate'] === undefined) res.setHeader('www-authenticate', [...AUTH_CHALLENGES])
  sendJson(res, err.status, err.toJSON(), headers)
}

async function readJsonBody (req: IncomingMessage): Promise<Record<string, unknown>> {
  const declared = Number(req.headers['content-length'] ?? 0)
  if (declared > MAX_BODY_BYTES) throw new ApiError('HTTP_BODY_TOO_LARGE', `the body is ${declared} bytes; at most ${MAX_BODY_BYTES} are accepted`)
  const chunks: Buffer[] = []
  let size = 0
  for await (const chunk of req) {
    size += (chunk as Buffer).length
    if (size > MAX_BODY_BYTES) throw new ApiError('HTTP_BODY_TOO_LARGE', `the body is larger than ${MAX_BODY_BYTES} bytes`)
    chunks.push(chunk as Buffer)
  }
  let parsed: unknown
  try {
    parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'))
  } catch (cause) {
    throw new ApiError('HTTP_BAD_BODY', `the body is not JSON: ${(cause as Error).message}`, { cause })
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) throw new ApiError('HTTP_BAD_BODY', 'the body must be a JSON object')
  return parsed as Record<string, unknown>
}

function checkBodyKeys (body: Record<string, unknown>, allowed: readonly string[]): void {
  for (const key of Object.keys(body)) {
    if (!allowed.includes(key)) throw new ApiError('HTTP_BAD_BODY', `unknown field ${JSON.stringify(key)}; this endpoint takes ${allowed.join(', ')}`, { details: { field: key } })
  }
}

function bodyInteger (value: unknown, field: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new ApiError('HTTP_BAD_BODY', `${field} must be a non-negative integer, got ${JSON.stringify(value)}`, { details: { field } })
  }
  return value
}

export function createApi (deps: ApiDeps): Api {
  const { store } = deps
  const auth = new ApiAuthenticator(deps.users, deps.tokens ?? [], { logger: deps.logger })
  const now = deps.now ?? Date.now
  const waiters = new AppendWaiters(store)

  // ---------------------------------------------------------------- streams

  function resolveStream (who: Principal, name: string): { stream: string, name: string, info: StreamInfo } {
    const unknown = (): ApiError => new ApiError('HTTP_UNKNOWN_STREAM', `unknown stream ${JSON.stringify(name)}`, { details: { stream: name } })
    if (!STREAM_NAME.test(name)) throw unknown()
    const stream = `${who.tenant}/${name}`
    try {
      return { stream, name, info: store.streamInfo(stream) }
    } catch (err) {
      if (isStoreError(err, 'STORE_UNKNOWN_STREAM') || isStoreError(err, 'STORE_INVALID_NAME')) throw unknown()
      throw err
    }
  }

  function resolvePartition (s: { name: string, info: StreamInfo }, text: string): number {
    const p = PARTITION.test(text) ? Number(text) : NaN
    if (!(p < s.info.partitions)) {
      throw new ApiError('HTTP_UNKNOWN_PARTITION', `stream ${s.name} has partitions 0 to ${s.info.partitions - 1}, not ${JSON.stringify(text)}`, { details: { partition: text } })
    }
    return p
  }

  // ---------------------------------------------------------------- groups

  function groupId (who: Principal, name: string): string {
    if (!GROUP_NAME.test(name)) {
      throw new ApiError('HTTP_BAD_NAME', `invalid consumer group name ${JSON.stringify(name)}: 1 to 128 letters, digits, ".", "_", ":" and "-", starting with a letter or digit`,
        { details: { group: name } })
    }
    return `${who.tenant}/${name}`
  }

  async function commit (group: string, s: { stream: string, name: string, info: StreamInfo }, body: Record<string, unknown>): Promise<void> {
    checkBodyKeys(body, ['offsets'])
    const list = body.offsets
    if (!Array.isArray(list) || list.length === 0) {
      throw new ApiError('HTTP_BAD_BODY', 'offsets must be a non-empty array of {"partition": P, "offset": N}', { details: { field: 'offsets' } })
    }
    const commits = new Map<number, number>()
    list.forEach((entry: unknown, i) => {
      if (entry === null || typeof entry !== 'object' || Array.isArray(entry)) {
        throw new ApiError('HTTP_BAD_BODY', `offsets[${i}] must be {"partition": P, "offset": N}`, { details: { field: `offsets[${i}]` } })
      }
      const e = entry as Record<string, unknown>
      checkBodyKeys(e, ['partition', 'offset'])
      const partition = resolvePartition(s, String(bodyInteger(e.partition, `offsets[${i}].partition`)))
      const offset = bodyInteger(e.offset, `offsets[${i}].offset`)
      if (commits.has(partition)) throw new ApiError('HTTP_BAD_BODY', `partition ${partition} appears twice in offsets`, { details: { field: `offsets[${i}].partition` } })
      const end = store.partitionInfo(s.stream, partition).logEndOffset
      if (offset > end) {
        throw new ApiError('HTTP_OFFSET_OUT_OF_RANGE', `cannot commit offset ${offset} for ${s.name}[${partition}]: the log ends at ${end}`,
          { details: { offset, partition, logStartOffset: store.partitionInfo(s.stream, partition).logStartOffset, logEndOffset: end } })
      }
      commits.set(partition, offset)
    })
    for (const [partition, offset] of commits) await store.commitOffset(group, s.stream, partition, offset)
  }

  async function reset (group: string, s: { stream: string, name: string, info: StreamInfo }, body: Record<string, unknown>): Promise<void> {
    checkBodyKeys(body, ['to', 'offset', 'timestamp', 'partition'])
    const partition = body.partition === undefined ? undefined : resolvePartition(s, String(bodyInteger(body.partition, 'partition')))
    let spec: ResetSpec
    switch (body.to) {
      case 'earliest': case 'latest':
        if (body.offset !== undefined || body.timestamp !== undefined) throw new ApiError('HTTP_BAD_BODY', `to: ${body.to} takes no offset or timestamp`)
        spec = { to: body.to }
        break
      case 'offset':
        if (body.timestamp !== undefined) throw new ApiError('HTTP_BAD_BODY', 'to: offset takes an offset, not a timestamp', { details: { field: 'timestamp' } })
        spec = { to: 'offset', offset: bodyInteger(body.offset, 'offset') }
        break
      case 'timestamp': {
        if (body.offset !== undefined) throw new ApiError('HTTP_BAD_BODY', 'to: timestamp takes a timestamp, not an offset', { details: { field: 'offset' } })
        const t = body.timestamp
        let timestamp: number
        if (typeof t === 'number') {
          if (!Number.isSafeInteger(t) || t < 0) throw new ApiError('HTTP_BAD_TIME', `timestamp must be milliseconds since the epoch, got ${t}`, { details: { field: 'timestamp' } })
          timestamp = t
        } else if (typeof t === 'string') {
          timestamp = parseTime(t, now(), 'timestamp')
        } else {
          throw new ApiError('HTTP_BAD_TIME', 'to: timestamp needs a timestamp (milliseconds since the epoch or an ISO 8601 time)', { details: { field: 'timestamp' } })
        }
        spec = { to: 'timestamp', timestamp }
        break
      }
      default:
        throw new ApiError('HTTP_BAD_BODY', `to must be "earliest", "latest", "offset" or "timestamp", got ${JSON.stringify(body.to)}`, { details: { field: 'to' } })
    }
    await store.resetGroup(group, s.stream, spec, partition)
  }

  // ---------------------------------------------------------------- routing

  function noParams (url: URL): void {
    void new QueryParams(url.searchParams, [])
  }

  async function route (req: IncomingMessage, res: ServerResponse, url: URL, who: Principal): Promise<void> {
    let segments: string[]
    try {
      segments = url.pathname.split('/').slice(2).map((s) => decodeURIComponent(s))
    } catch {
      throw new ApiError('HTTP_BAD_REQUEST', `the path ${url.pathname} is not valid percent-encoding`)
    }
    if (segments.length > 0 && segments[segments.length - 1] === '') segments.pop()
    const method = req.method === 'HEAD' ? 'GET' : req.method ?? 'GET'
    const only = (...allowed: string[]): void => {
      if (!allowed.includes(method)) {
        throw new ApiError('HTTP_METHOD_NOT_ALLOWED', `${req.method ?? ''} is not allowed on ${url.pathname}; use ${allowed.join(' or ')}`, { details: { allow: allowed.join(', ') } })
      }
    }
    const [top, a, b, c, d, e, ...rest] = segments
    const notFound = (): ApiError => new ApiError('HTTP_NOT_FOUND', `no route ${url.pathname}`)
    if (rest.length > 0) throw notFound()

    if (top === 'streams') {
      if (a === undefined) { only('GET'); noParams(url); return sendJson(res, 200, { tenant: who.tenant, streams: streamDocs(store, who.tenant) }) }
      const s = resolveStream(who, a)
      if (b === undefined) { only('GET'); noParams(url); return sendJson(res, 200, { tenant: who.tenant, ...streamDoc(store, who.tenant, s.info) }) }
      let target: PartitionTarget
      if (b === 'records' && c === undefined) {
        // Without a partition: the partition of the one key asked for.
        only('GET')
        const keys = url.searchParams.getAll('key')
        if (keys.length !== 1) {
          throw new ApiError('HTTP_BAD_REQUEST', `${url.pathname} needs exactly one key parameter (it reads the partition of that key); use …/partitions/{p}/records otherwise`,
            { details: { parameter: 'key' } })
        }
        target = { stream: s.stream, name: s.name, partition: store.partitionFor(s.stream, keys[0] as string) }
      } else if (b === 'partitions' && c !== undefined && (d === undefined || (d === 'records' && e === undefined))) {
        only('GET')
        const partition = resolvePartition(s, c)
        if (d === undefined) { noParams(url); return sendJson(res, 200, { stream: s.name, ...partitionDoc(store, s.stream, partition) }) }
        target = { stream: s.stream, name: s.name, partition }
      } else {
        throw notFound()
      }
      const request = parseRecordsRequest(url.searchParams, now(), req.headers.accept, (g) => groupId(who, g))
      const ctx = { store, waiters, signal: clientGone(req, res) }
      return request.format === 'batches' ? serveBatches(ctx, target, request, res) : serveRecords(ctx, target, request, res)
    }

    if (top === 'groups') {
      if (a === undefined) {
        only('GET')
        noParams(url)
        const groups = await groupDocs(store, who.tenant)
        return sendJson(res, 200, { tenant: who.tenant, groups })
      }
      const group = groupId(who, a)
      const bridgeGroup = bridgeGroups(store, who.tenant).get(a)
      const readOnly = (): ApiError => new ApiError('HTTP_GROUP_READ_ONLY',
        `consumer group ${JSON.stringify(a)} is the bridge's: its offsets move as the upstream acknowledges records`, { details: { group: a } })
      if (b === undefined) {
        only('GET', 'DELETE')
        noParams(url)
        if (bridgeGroup !== undefined) {
          if (method === 'DELETE') throw readOnly()
          return sendJson(res, 200, await bridgeGroupDoc(store, who.tenant, a, bridgeGroup))
        }
        const g = tenantGroups(store, who.tenant).get(a)
        if (g === undefined) throw new ApiError('HTTP_UNKNOWN_GROUP', `unknown consumer group ${JSON.stringify(a)}`, { details: { group: a } })
        if (method === 'DELETE') {
          await store.deleteGroup(group)
          return sendJson(res, 200, { group: a, deleted: true })
        }
        return sendJson(res, 200, await groupDoc(store, who.tenant, a, g))
      }
      if (b !== 'streams' || c === undefined || e !== undefined) throw notFound()
      const s = resolveStream(who, c)
      noParams(url)
      if (d !== undefined && bridgeGroup !== undefined) throw readOnly()
      if (d === undefined) {
        only('GET')
      } else if (d === 'commit') {
        only('POST')
        await commit(group, s, await readJsonBody(req))
      } else if (d === 'reset') {
        only('POST')
        await reset(group, s, await readJsonBody(req))
      } else {
        throw notFound()
      }
      return sendJson(res, 200, { group: a, ...await groupStreamDoc(store, who.tenant, bridgeGroup?.id ?? group, s.stream) })
    }
    if (top === 'bridge') {
      only('GET')
      noParams(url)
      if (b !== undefined) throw notFound()
      // A tenant sees every upstream's connection state, and the offsets of its own streams only.
      const upstreams = (await deps.bridge?.status() ?? []).map((u) => ({ ...u, partitions: u.partitions.filter((p) => p.tenant === who.tenant) }))
      if (a === undefined) return sendJson(res, 200, { upstreams })
      const one = upstreams.find((u) => u.name === a)
      if (one === undefined) {
        throw new ApiError('HTTP_UNKNOWN_UPSTREAM', `no upstream named ${JSON.stringify(a)} (configured: ${upstreams.map((u) => u.name).join(', ') || 'none'})`, { details: { upstream: a } })
      }
      return sendJson(res, 200, one)
    }
    throw notFound()
  }

  return {
    async handle (req, res, url) {
      try {
        const who = await auth.authenticate(req.headers.authorization, req.socket.remoteAddress)
        await route(req, res, url, who)
      } catch (err) {
        const apiError = toApiError(err)
        if (apiError.status >= 500) deps.logger?.warn({ code: apiError.code, path: url.pathname, err: apiError.message }, 'HTTP API request failed')
        if (!res.headersSent) sendApiError(res, apiError)
        else res.destroy()
      }
    },
    close () {
      waiters.close()
    },
  }
}
