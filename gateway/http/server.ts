/**
 * The gateway's HTTP server, on fastify: GET /health, GET /metrics, the
 * /v1 pull and replay API (api.ts), and GET /v1/openapi.json, the OpenAPI
 * 3 document that @fastify/swagger builds from the routes' JSON schemas.
 *
 * Errors are JSON `{"error":{"code":"HTTP_…","message":"…", …details}}`
 * with a stable code (http/errors.ts). Whatever fails, a handler or fastify
 * itself (a schema, a body too large, a path that is not valid
 * percent-encoding, no route), ends in one error handler that writes that
 * shape; a 405 carries Allow, a 401 its challenges.
 *
 * Validation: two ajv instances. Paths and queries are text, so theirs
 * coerces (`maxRecords=5` is the integer 5; a parameter given once is an
 * array of one where the schema wants an array); bodies are JSON and are
 * taken as they are (`"5"` is not an offset). Neither removes unknown
 * properties or fills in defaults: an unknown parameter is an error.
 * Response schemas document; replies are serialised with JSON.stringify.
 */
import type { AddressInfo } from 'node:net'
import accepts from '@fastify/accepts'
import swagger from '@fastify/swagger'
import type { ErrorObject, Options as AjvOptions } from 'ajv'
import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify'
import type { Registry } from 'prom-client'
import { createApi, errorHeaders, type Api, type ApiDeps } from './api.ts'
import { ApiError, toApiError, validationError } from './errors.ts'
import { routePath } from './routes.ts'
import { cachedValidator } from '../config/validator-cache.ts'
import { ERROR_CODE_KEYWORD } from './schemas.ts'
import { GatewayError } from '../errors.ts'

export interface HttpDeps {
  readonly registry: Registry
  readonly health: () => { healthy: boolean, reasons: string[] }
  /** The /v1 API's store and users; without it /v1 is not served. */
  readonly api?: ApiDeps
  /** The version the OpenAPI document states (package.json's). */
  readonly version?: string
}

/** A route the server answers (method and path as the OpenAPI document writes them, `{name}` for a parameter). */
export interface ServedRoute {
  readonly method: string
  readonly path: string
}

export interface RunningHttpServer {
  readonly host: string
  readonly port: number
  /** Every route the server answers: what the OpenAPI document must list (HEAD and the 405 answers aside). */
  readonly routes: readonly ServedRoute[]
  close (): Promise<void>
}

export const OPENAPI_PATH = '/v1/openapi.json'
/** Request bodies (commit, reset) are small JSON objects. */
const MAX_BODY_BYTES = 64 * 1024

const AJV_COMMON: AjvOptions = {
  // The failing value and schema, for the error messages and x-error-code (errors.ts).
  verbose: true,
  allErrors: false,
  removeAdditional: false,
  useDefaults: false,
  keywords: [ERROR_CODE_KEYWORD],
  // reset's timestamp is an integer or a string.
  allowUnionTypes: true,
}

function sendError (reply: FastifyReply, err: ApiError): void {
  void reply.code(err.status).headers(errorHeaders(err)).type('application/json; charset=utf-8').send(err.toJSON())
}

/** The OpenAPI path of a fastify route: `:name` becomes `{name}`. */
function openApiPath (url: string): string {
  return url.replace(/:([A-Za-z0-9_]+)/g, '{$1}')
}

async function buildServer (deps: HttpDeps, api: Api | undefined, routes: ServedRoute[]): Promise<FastifyInstance> {
  const app = Fastify({
    logger: false,
    bodyLimit: MAX_BODY_BYTES,
    // Close long-polls and streams at once on shutdown, as the gateway's close expects.
    forceCloseConnections: true,
    // Node's own defaults, which the server had before fastify (fastify's are no request timeout and 72 s keep-alive):
    // a request (not its response: long-polls and streams are unaffected) must arrive within 5 minutes.
    requestTimeout: 300_000,
    keepAliveTimeout: 5_000,
    routerOptions: {
      ignoreTrailingSlash: true,
      // Names are at most 128 characters; percent-encoded, three times that.
      maxParamLength: 1024,
    },
    schemaErrorFormatter: (errors, part) => validationError(errors as ErrorObject[], part),
    // Errors of the router (a path that is not valid percent-encoding, a segment too long) take the same way as the others.
    frameworkErrors: (err, _request, reply) => sendError(reply, toApiError(err)),
  })
  // Compiled once and kept as code (config/validator-cache.ts): compiling the routes' schemas was about 150 ms of
  // CPU at every start.
  app.setValidatorCompiler(({ schema, httpPart }) => httpPart === 'body'
    ? cachedValidator('http-body', schema, { ...AJV_COMMON, coerceTypes: false })
    : cachedValidator('http-query', schema, { ...AJV_COMMON, coerceTypes: 'array' }))
  app.setSerializerCompiler(() => (data) => JSON.stringify(data))

  // Bodies are JSON whatever their Content-Type says (curl -d sends application/x-www-form-urlencoded).
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', { parseAs: 'string' }, (_request, text, done) => {
    if (text === '') return done(new ApiError('HTTP_BAD_BODY', 'the body is empty; this endpoint takes a JSON object'), undefined)
    try {
      done(null, JSON.parse(text as string))
    } catch (cause) {
      done(new ApiError('HTTP_BAD_BODY', `the body is not JSON: ${(cause as Error).message}`, { cause }), undefined)
    }
  })

  app.setErrorHandler((err, request, reply) => {
    const apiError = toApiError(err)
    if (apiError.status >= 500) deps.api?.logger?.warn({ code: apiError.code, path: request.url, err: apiError.message }, 'HTTP request failed')
    sendError(reply, apiError)
  })
  app.setNotFoundHandler(async (request) => {
    throw new ApiError('HTTP_NOT_FOUND', `no route ${request.url.split('?')[0] ?? ''}`)
  })

  app.addHook('onRoute', (route) => {
    const methods = Array.isArray(route.method) ? route.method : [route.method]
    const hidden = (route.schema as { hide?: boolean } | undefined)?.hide === true
    for (const method of methods) if (method !== 'HEAD' && !hidden) routes.push({ method, path: openApiPath(route.url) })
  })

  await app.register(accepts)
  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'edgemq HTTP API',
        version: deps.version ?? '0.0.0',
        description: 'Health, metrics, and the /v1 pull and replay API of an edgemq gateway (docs/http-api.md). ' +
          'Every error is {"error":{"code":"HTTP_…","message":"…"}}; the codes are in docs/errors.md.',
      },
      components: {
        securitySchemes: {
          basic: { type: 'http', scheme: 'basic', description: 'A service or admin user of the gateway (the same users as MQTT).' },
          bearer: { type: 'http', scheme: 'bearer', description: 'A token of apiTokens (emq_<name>_<secret>, printed by `edgemq token`).' },
        },
      },
      security: [{ basic: [] }, { bearer: [] }],
    },
  })

  const open = { security: [] as Array<Record<string, string[]>> }
  routePath(app, '/health', {
    GET: {
      schema: { ...open, tags: ['operations'], summary: '200 while log writes succeed, 503 with the reasons otherwise.' },
      handler: async (_request, reply) => {
        const h = deps.health()
        return await reply.code(h.healthy ? 200 : 503).send({ status: h.healthy ? 'ok' : 'unhealthy', reasons: h.reasons })
      },
    },
  }, 'GET, HEAD')
  routePath(app, '/metrics', {
    GET: {
      schema: { ...open, tags: ['operations'], summary: 'Prometheus metrics, text format (docs/metrics.md).' },
      handler: async (_request, reply) => await reply.type(deps.registry.contentType).send(await deps.registry.metrics()),
    },
  }, 'GET, HEAD')
  if (api !== undefined) {
    routePath(app, OPENAPI_PATH, {
      GET: {
        schema: { ...open, tags: ['operations'], summary: 'This document: the OpenAPI 3 description of the API, built from the routes\' schemas.' },
        handler: async () => app.swagger(),
      },
    }, 'GET, HEAD')
    await app.register(async (v1) => { api.register(v1) }, { prefix: '/v1' })
    // Long-polls end before the connections are closed.
    app.addHook('preClose', async () => { api.close() })
  }
  await app.ready()
  return app
}

export async function startHttpServer (options: { host: string, port: number }, deps: HttpDeps): Promise<RunningHttpServer> {
  const api: Api | undefined = deps.api === undefined ? undefined : createApi(deps.api)
  const routes: ServedRoute[] = []
  const app = await buildServer(deps, api, routes)
  try {
    await app.listen({ host: options.host, port: options.port })
  } catch (cause) {
    await app.close()
    throw new GatewayError('GW_LISTEN_FAILED', `HTTP server cannot listen on ${options.host}:${options.port}: ${(cause as Error).message}`, { cause })
  }
  const address = app.server.address() as AddressInfo
  return {
    host: address.address,
    port: address.port,
    routes,
    close: async () => { await app.close() },
  }
}
