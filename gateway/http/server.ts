/**
 * The gateway's HTTP server: GET /health, GET /metrics and the /v1 pull and
 * replay API (api.ts). Errors are JSON `{"error":{"code":"HTTP_…",
 * "message":"…"}}` with a stable code; the codes are in http/errors.ts.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { Registry } from 'prom-client'
import { createApi, sendApiError, type Api, type ApiDeps } from './api.ts'
import { ApiError, toApiError } from './errors.ts'
import { GatewayError } from '../errors.ts'

export interface HttpDeps {
  readonly registry: Registry
  readonly health: () => { healthy: boolean, reasons: string[] }
  /** The /v1 API's store and users; without it /v1 is not served. */
  readonly api?: ApiDeps
}

export interface RunningHttpServer {
  readonly host: string
  readonly port: number
  close (): Promise<void>
}

function sendJson (res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

export async function startHttpServer (options: { host: string, port: number }, deps: HttpDeps): Promise<RunningHttpServer> {
  const api: Api | undefined = deps.api === undefined ? undefined : createApi(deps.api)
  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://localhost')
    if (api !== undefined && (url.pathname === '/v1' || url.pathname.startsWith('/v1/'))) return api.handle(req, res, url)
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      return sendApiError(res, new ApiError('HTTP_METHOD_NOT_ALLOWED', `${req.method ?? ''} is not allowed on ${url.pathname}`, { details: { allow: 'GET, HEAD' } }))
    }
    switch (url.pathname) {
      case '/health': {
        const h = deps.health()
        return sendJson(res, h.healthy ? 200 : 503, { status: h.healthy ? 'ok' : 'unhealthy', reasons: h.reasons })
      }
      case '/metrics': {
        const text = await deps.registry.metrics()
        res.writeHead(200, { 'content-type': deps.registry.contentType })
        res.end(text)
        return
      }
      default:
        return sendApiError(res, new ApiError('HTTP_NOT_FOUND', `no route ${url.pathname}`))
    }
  }
  const server = http.createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (!res.headersSent) sendApiError(res, toApiError(err))
      else res.destroy()
    })
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', (cause) => reject(new GatewayError('GW_LISTEN_FAILED', `HTTP server cannot listen on ${options.host}:${options.port}: ${cause.message}`, { cause })))
    server.listen(options.port, options.host, () => resolve())
  })
  const address = server.address() as AddressInfo
  return {
    host: address.address,
    port: address.port,
    close: () => new Promise<void>((resolve) => {
      api?.close()
      server.closeAllConnections()
      server.close(() => resolve())
    }),
  }
}
