/**
 * The routes' JSON schemas over real sockets: the OpenAPI document built
 * from them (valid OpenAPI 3, listing every route the server answers, each
 * of which answers), and the error body each kind of schema failure gets
 * (code, status and the detail that names what failed), the same as the
 * hand-written checks gave before the move to fastify.
 */
import path from 'node:path'
import { Validator } from '@seriousme/openapi-schema-validator'
import { pino } from 'pino'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig } from '../../../gateway/config/config.ts'
import { startGateway, type Gateway } from '../../../gateway/gateway.ts'
import { HTTP_ERROR_CODES } from '../../../gateway/http/errors.ts'
import { OPENAPI_PATH } from '../../../gateway/http/server.ts'
import { tempDir } from '../../helpers/gateway-process.ts'

interface ErrorBody { readonly error: { readonly code: string, readonly message: string, readonly [k: string]: unknown } }
interface Operation { readonly parameters?: ReadonlyArray<{ name: string, in: string }>, readonly security?: unknown[] }
interface OpenApiDocument {
  readonly openapi: string
  readonly paths: Readonly<Record<string, Readonly<Record<string, Operation>>>>
}

describe('HTTP API schemas and their OpenAPI document', () => {
  let gw: Gateway
  let base: string
  const cleanups: Array<() => Promise<void>> = []

  beforeAll(async () => {
    const { dir, cleanup } = await tempDir('edgemq-openapi-')
    cleanups.push(cleanup)
    // No users: loopback requests are tenant default; the default config's streams (telemetry, 8 partitions).
    gw = await startGateway(buildConfig({
      dataDir: path.join(dir, 'data'),
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      http: { port: 0 },
    }), { logger: pino({ level: 'silent' }) })
    cleanups.push(() => gw.close())
    base = `http://127.0.0.1:${gw.http.port}`
    await gw.store.append('default/telemetry', 'dev-1', { payload: Buffer.from('{"t":1}'), topic: 'devices/dev-1/telemetry' })
  }, 30_000)

  afterAll(async () => { for (const c of cleanups.reverse()) await c().catch(() => {}) })

  async function call (pathAndQuery: string, init: RequestInit = {}): Promise<Response> {
    return await fetch(`${base}${pathAndQuery}`, { signal: AbortSignal.timeout(20_000), ...init })
  }
  async function expectError (pathAndQuery: string, status: number, code: string, init: RequestInit = {}): Promise<ErrorBody['error']> {
    const res = await call(pathAndQuery, init)
    expect(res.headers.get('content-type'), pathAndQuery).toMatch(/^application\/json/)
    const body = await res.json() as ErrorBody
    expect({ status: res.status, code: body.error?.code }, pathAndQuery).toEqual({ status, code })
    expect(typeof body.error.message).toBe('string')
    return body.error
  }
  const post = (body: string, contentType = 'application/json'): RequestInit => ({ method: 'POST', body, headers: { 'content-type': contentType } })

  it('serves a valid OpenAPI 3 document that lists every route the server answers, each of which answers', async () => {
    const res = await call(OPENAPI_PATH)
    expect(res.status).toBe(200)
    expect(res.headers.get('content-type')).toMatch(/^application\/json/)
    const doc = await res.json() as OpenApiDocument
    const validator = new Validator()
    const result = await validator.validate(doc as unknown as Parameters<Validator['validate']>[0])
    expect(result.errors ?? [], JSON.stringify(result.errors)).toEqual([])
    expect(result.valid).toBe(true)
    expect(validator.version).toMatch(/^3\./)

    // The server's routes (what fastify registered, less HEAD and the 405 answers) and the document's operations are the same set.
    const served = gw.http.routes.map((r) => `${r.method} ${r.path}`).sort()
    const documented = Object.entries(doc.paths).flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`)).sort()
    expect(documented).toEqual(served)
    const expected = ['GET /health', 'GET /metrics', `GET ${OPENAPI_PATH}`, 'GET /v1/streams/{stream}/partitions/{partition}/records',
      'POST /v1/groups/{group}/streams/{stream}/reset']
    for (const route of expected) {
      expect(served).toContain(route)
    }

    // Every documented operation answers (an error of its own, such as an unknown group, is an answer; no route is not).
    const values: Record<string, string> = { stream: 'telemetry', partition: '0', group: 'g1', upstream: 'none' }
    const bodies: Record<string, string> = { commit: '{"offsets":[{"partition":0,"offset":0}]}', reset: '{"to":"earliest"}' }
    for (const [template, ops] of Object.entries(doc.paths)) {
      const url = template.replace(/\{([a-z]+)\}/g, (_, name: string) => values[name] ?? name)
      for (const method of Object.keys(ops)) {
        const query = template.endsWith('/streams/{stream}/records') ? '?key=dev-1' : ''
        const init: RequestInit = method === 'post' ? post(bodies[template.split('/').at(-1) ?? ''] ?? '{}') : { method: method.toUpperCase() }
        const answer = await call(`${url}${query}`, init)
        const text = await answer.text()
        const code = answer.headers.get('content-type')?.startsWith('application/json') === true && text.startsWith('{"error"')
          ? (JSON.parse(text) as ErrorBody).error.code
          : null
        expect(code, `${method} ${url}`).not.toBe('HTTP_NOT_FOUND')
        expect(code, `${method} ${url}`).not.toBe('HTTP_METHOD_NOT_ALLOWED')
      }
    }

    // The records parameters are all there, and a path parameter names the error its schema gives.
    const records = doc.paths['/v1/streams/{stream}/partitions/{partition}/records']?.get
    expect(records?.parameters?.filter((p) => p.in === 'query').map((p) => p.name).sort()).toEqual(
      ['endOffset', 'format', 'from', 'group', 'key', 'maxBytes', 'maxRecords', 'offset', 'payload', 'to', 'topic', 'wait', 'where'])
    expect(JSON.stringify(records?.parameters?.find((p) => p.name === 'stream'))).toContain('HTTP_UNKNOWN_STREAM')
    // Health and metrics need no credentials; the API does.
    expect(doc.paths['/metrics']?.get?.security).toEqual([])
    expect(records?.security).toBeUndefined()
  })

  it('gives every query parameter problem HTTP_BAD_REQUEST or HTTP_TOO_MANY_VALUES, naming the parameter', async () => {
    const records = '/v1/streams/telemetry/partitions/0/records'
    const cases: ReadonlyArray<readonly [string, string]> = [
      ['maxRecord=5', 'maxRecord'], ['offset=1&offset=2', 'offset'], ['maxRecords=abc', 'maxRecords'], ['maxRecords=1.5', 'maxRecords'],
      ['maxRecords=', 'maxRecords'], ['maxRecords=0', 'maxRecords'], ['endOffset=-1', 'endOffset'], ['wait=61', 'wait'], ['format=xml', 'format'],
      ['payload=hex', 'payload'], ['offset=first', 'offset'], ['offset=-1', 'offset'], ['where=a&where=b', 'where'],
      ['maxBytes=123456789012345678', 'maxBytes'],
    ]
    for (const [query, parameter] of cases) expect((await expectError(`${records}?${query}`, 400, 'HTTP_BAD_REQUEST')).parameter, query).toBe(parameter)
    expect(await expectError('/v1/streams?verbose=1', 400, 'HTTP_BAD_REQUEST')).toMatchObject({ parameter: 'verbose' })
    const keys = Array.from({ length: 1001 }, (_, i) => `key=k${i}`).join('&')
    expect(await expectError(`${records}?${keys}`, 400, 'HTTP_TOO_MANY_VALUES')).toMatchObject({ parameter: 'key', max: 1000 })
    const topics = Array.from({ length: 101 }, (_, i) => `topic=t/${i}`).join('&')
    expect(await expectError(`${records}?${topics}`, 400, 'HTTP_TOO_MANY_VALUES')).toMatchObject({ parameter: 'topic', max: 100 })
    // …/records without a partition reads the partition of exactly one key.
    expect(await expectError('/v1/streams/telemetry/records', 400, 'HTTP_BAD_REQUEST')).toMatchObject({ parameter: 'key' })
    expect(await expectError('/v1/streams/telemetry/records?key=a&key=b', 400, 'HTTP_BAD_REQUEST')).toMatchObject({ parameter: 'key' })
    expect(await expectError(`${records}?group=-x`, 400, 'HTTP_BAD_NAME')).toMatchObject({ parameter: 'group' })
    // A parameter given once where a list is allowed, and integers as text, are read.
    const p = gw.store.partitionFor('default/telemetry', 'dev-1')
    const page = await call(`/v1/streams/telemetry/partitions/${p}/records?key=dev-1&topic=devices/%2B/telemetry&maxRecords=5&wait=0`)
    expect(page.status).toBe(200)
    expect(((await page.json()) as { records: unknown[] }).records).toHaveLength(1)
  })

  it('gives path parameters the code of what they name, and bodies HTTP_BAD_BODY naming the field', async () => {
    expect(await expectError('/v1/streams/bad%2Fname', 404, 'HTTP_UNKNOWN_STREAM')).toMatchObject({ stream: 'bad/name' })
    expect(await expectError(`/v1/streams/${'s'.repeat(129)}`, 404, 'HTTP_UNKNOWN_STREAM')).toMatchObject({ stream: 's'.repeat(129) })
    expect(await expectError('/v1/streams/telemetry/partitions/x1', 404, 'HTTP_UNKNOWN_PARTITION')).toMatchObject({ partition: 'x1' })
    expect(await expectError('/v1/streams/telemetry/partitions/99', 404, 'HTTP_UNKNOWN_PARTITION')).toMatchObject({ partition: '99' })
    expect(await expectError('/v1/groups/-x', 400, 'HTTP_BAD_NAME')).toMatchObject({ group: '-x' })
    await expectError('/v1/streams/%E0%A4%A', 400, 'HTTP_BAD_REQUEST')
    await expectError(`/v1/streams/${'s'.repeat(2000)}`, 400, 'HTTP_BAD_REQUEST')

    const commit = '/v1/groups/g/streams/telemetry/commit'
    const bad: ReadonlyArray<readonly [string, string | undefined]> = [
      ['{"offsets":[{"partition":0,"offset":"1"}]}', 'offsets[0].offset'],
      ['{"offsets":[{"partition":0,"offset":1,"extra":1}]}', 'offsets[0].extra'],
      ['{"offsets":[{"partition":0}]}', 'offsets[0].offset'],
      ['{"offsets":[{"partition":0,"offset":1.5}]}', 'offsets[0].offset'],
      ['{"offsets":[{"partition":true,"offset":1}]}', 'offsets[0].partition'],
      ['{"offsets":[]}', 'offsets'],
      ['{"offsets":[{"partition":0,"offset":1}],"extra":1}', 'extra'],
      ['{}', 'offsets'],
      ['[]', undefined],
      ['"x"', undefined],
      ['{not json', undefined],
    ]
    for (const [body, field] of bad) expect((await expectError(commit, 400, 'HTTP_BAD_BODY', post(body))).field, body).toBe(field)
    await expectError(commit, 400, 'HTTP_BAD_BODY', { method: 'POST' })
    await expectError(commit, 413, 'HTTP_BODY_TOO_LARGE', post(JSON.stringify({ offsets: [], pad: 'x'.repeat(70_000) })))
    const reset = '/v1/groups/g/streams/telemetry/reset'
    expect(await expectError(reset, 400, 'HTTP_BAD_TIME', post('{"to":"timestamp","timestamp":true}'))).toMatchObject({ field: 'timestamp' })
    expect(await expectError(reset, 400, 'HTTP_BAD_TIME', post('{"to":"timestamp","timestamp":-1}'))).toMatchObject({ field: 'timestamp' })
    expect(await expectError(reset, 400, 'HTTP_BAD_BODY', post('{"to":"never"}'))).toMatchObject({ field: 'to' })
    // None of those created the group.
    await expectError('/v1/groups/g', 404, 'HTTP_UNKNOWN_GROUP')
    // A body is JSON whatever its Content-Type (curl -d sends a form's).
    const p = gw.store.partitionFor('default/telemetry', 'dev-1')
    const ok = await call(commit, post(`{"offsets":[{"partition":${p},"offset":1}]}`, 'application/x-www-form-urlencoded'))
    expect(ok.status).toBe(200)
    expect(((await ok.json()) as { partitions: Array<{ committedOffset: number | null }> }).partitions[p]?.committedOffset).toBe(1)
  })

  it('answers methods a path does not have with 405 and Allow, HEAD like GET, and a trailing slash like none', async () => {
    for (const [method, url, allow] of [['DELETE', '/v1/streams', 'GET'], ['OPTIONS', '/v1/streams', 'GET'], ['PUT', '/v1/groups/g', 'GET, DELETE'],
      ['GET', '/v1/groups/g/streams/telemetry/reset', 'POST'], ['POST', '/health', 'GET, HEAD'], ['POST', OPENAPI_PATH, 'GET, HEAD']] as const) {
      const res = await call(url, { method })
      expect({ status: res.status, allow: res.headers.get('allow'), code: ((await res.json()) as ErrorBody).error.code }, `${method} ${url}`)
        .toEqual({ status: 405, allow, code: 'HTTP_METHOD_NOT_ALLOWED' })
    }
    await expectError('/nothing', 404, 'HTTP_NOT_FOUND')
    await expectError('/v1', 404, 'HTTP_NOT_FOUND')
    await expectError('/v1/streams/telemetry/partitions', 404, 'HTTP_NOT_FOUND')
    const head = await call('/v1/streams', { method: 'HEAD' })
    expect(head.status).toBe(200)
    expect(await head.text()).toBe('')
    expect(await (await call('/v1/streams/')).json()).toEqual(await (await call('/v1/streams')).json())
    const metrics = await call('/metrics')
    expect(metrics.headers.get('content-type')).toMatch(/^text\/plain/)
    expect(await metrics.text()).toContain('edgemq_')
    expect(await (await call('/health')).json()).toEqual({ status: 'ok', reasons: [] })
    // Every code a response can carry is in the registry (docs/errors.md).
    expect(Object.keys(HTTP_ERROR_CODES)).toContain('HTTP_METHOD_NOT_ALLOWED')
  })

  it('picks the records format from Accept, honouring q-values and media-type parameters', async () => {
    const records = '/v1/streams/telemetry/partitions/0/records'
    const cases: ReadonlyArray<readonly [string, RegExp]> = [
      ['application/x-ndjson', /^application\/x-ndjson/],
      ['application/x-ndjson; charset=utf-8', /^application\/x-ndjson/],
      ['application/cbor;q=0.5, application/x-ndjson', /^application\/x-ndjson/],
      ['application/vnd.edgemq.batches+cbor-seq', /^application\/vnd\.edgemq\.batches\+cbor-seq$/],
      ['application/cbor', /^application\/cbor$/],
      ['*/*', /^application\/json/],
      ['text/html', /^application\/json/],
    ]
    for (const [accept, type] of cases) {
      const res = await call(records, { headers: { accept } })
      expect(res.status, accept).toBe(200)
      expect(res.headers.get('content-type'), accept).toMatch(type)
      await res.arrayBuffer()
    }
    // The parameter wins over the header.
    expect((await call(`${records}?format=json`, { headers: { accept: 'application/x-ndjson' } })).headers.get('content-type')).toMatch(/^application\/json/)
  })
})
