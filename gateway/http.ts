/**
 * The gateway's HTTP server: GET /health and GET /metrics (the /v1 API joins
 * it later). Errors are JSON with a stable code.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { Registry } from 'prom-client'
import { GatewayError } from './errors.ts'

export interface HttpDeps {
  readonly registry: Registry
  readonly health: () => { healthy: boolean, reasons: string[] }
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
  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://localhost')
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      return sendJson(res, 405, { error: { code: 'HTTP_METHOD_NOT_ALLOWED', message: `${req.method ?? ''} is not allowed on ${url.pathname}` } })
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
        return sendJson(res, 404, { error: { code: 'HTTP_NOT_FOUND', message: `no route ${url.pathname}` } })
    }
  }
  const server = http.createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (!res.headersSent) sendJson(res, 500, { error: { code: 'HTTP_INTERNAL', message: (err as Error).message } })
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
    close: () => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()) }),
  }
}
