/**
 * MQTT listeners: TCP, TLS, WebSocket and secure WebSocket servers that wrap
 * every connection in a ConnectionGuard and hand it to aedes.
 */
import { readFileSync } from 'node:fs'
import http from 'node:http'
import https from 'node:https'
import net, { type AddressInfo } from 'node:net'
import tls from 'node:tls'
import type { Duplex } from 'node:stream'
import type { Aedes } from 'aedes'
import type { Logger } from 'pino'
import { WebSocketServer, createWebSocketStream } from 'ws'
import type { ListenerTagged } from './broker.ts'
import type { ListenerConfig } from '../config/config.ts'
import { slimClient } from './aedes-internals.ts'
import type { BurstCompaction } from './burst-compaction.ts'
import { ConnectionGuard, type GuardGroup, type GuardOptions } from './connection-guard.ts'
import { GatewayError } from '../errors.ts'
import type { GatewayMetrics } from '../metrics/metrics.ts'

export interface RunningListener {
  readonly config: ListenerConfig
  readonly host: string
  readonly port: number
  /** Stops accepting connections (existing ones are closed by aedes). */
  close (): Promise<void>
}

export interface ListenerDeps {
  readonly broker: Aedes
  readonly metrics: GatewayMetrics
  readonly logger: Logger
  readonly guards: GuardGroup
  readonly maxPacketBytes: number
  readonly maxInflight: number
  readonly publishRate: number
  /** mqtt.slowSubscriberTimeoutMs (0: never). */
  readonly slowSubscriberMs: number
  /** Told of every accepted connection, to give memory back once a burst of them is over (burst-compaction.ts). */
  readonly bursts?: Pick<BurstCompaction, 'connected'>
}

function tlsOptions (listener: ListenerConfig): tls.TlsOptions {
  const t = listener.tls
  if (t === undefined) throw new GatewayError('GW_TLS_FILES', `listener ${listener.name} needs tls.cert and tls.key`)
  const read = (what: string, file: string): Buffer => {
    try {
      return readFileSync(file)
    } catch (cause) {
      throw new GatewayError('GW_TLS_FILES', `listener ${listener.name}: cannot read tls.${what} ${file}: ${(cause as Error).message}`, { cause })
    }
  }
  return {
    cert: read('cert', t.cert),
    key: read('key', t.key),
    ...(t.ca === undefined ? {} : { ca: read('ca', t.ca) }),
    requestCert: t.requestCert,
    rejectUnauthorized: t.requestCert,
  }
}

/** Errors of a connection's stream are reported through aedes' connectionError; one function for all of them. */
function ignoreError (): void {}

export async function startListener (listener: ListenerConfig, deps: ListenerDeps): Promise<RunningListener> {
  const { broker, metrics, logger } = deps
  // One options object per listener, shared by its connections: an idle connection keeps no closures of its own.
  const guardOptions: GuardOptions = {
    maxPacketBytes: deps.maxPacketBytes,
    maxInflight: deps.maxInflight,
    publishRate: deps.publishRate,
    slowSubscriberMs: deps.slowSubscriberMs,
    group: deps.guards,
    onViolation: (reason, detail, clientId, guard) => {
      metrics.connectionsRefused.inc({ listener: listener.name, reason })
      logger.warn({ clientId, listener: listener.name, remote: guard.remoteAddress, reason }, `connection closed: ${detail}`)
    },
    onRateLimited: (clientId, guard) => {
      metrics.publishesRefused.inc({ tenant: 'unknown', reason: 'rate-limited' })
      logger.warn({ clientId, listener: listener.name, remote: guard.remoteAddress }, 'client over mqtt.publishRatePerClient: slowing it down')
    },
  }
  const accept = (stream: Duplex, req?: http.IncomingMessage): void => {
    const guard = new ConnectionGuard(stream, guardOptions)
    const tagged = guard as ListenerTagged
    tagged.listener = listener
    // certIdentity reads the peer certificate here: the wss stream aedes gets is a WebSocket, not the TLS socket.
    const tlsSocket = stream instanceof tls.TLSSocket ? stream : req?.socket instanceof tls.TLSSocket ? req.socket : undefined
    if (tlsSocket !== undefined) tagged.tlsSocket = tlsSocket
    stream.on('error', ignoreError)
    slimClient(broker.handle(guard as unknown as net.Socket, req as http.IncomingMessage))
    deps.bursts?.connected()
  }

  let server: net.Server
  switch (listener.type) {
    case 'tcp':
      server = net.createServer({ noDelay: true }, (socket) => accept(socket))
      break
    case 'tls':
      server = tls.createServer({ ...tlsOptions(listener) }, (socket) => accept(socket))
      break
    case 'ws':
    case 'wss': {
      const web = listener.type === 'ws' ? http.createServer() : https.createServer(tlsOptions(listener))
      const wss = new WebSocketServer({ server: web, path: listener.path, maxPayload: deps.maxPacketBytes + 8 })
      wss.on('connection', (ws, req) => accept(createWebSocketStream(ws), req))
      server = web
      break
    }
  }
  await new Promise<void>((resolve, reject) => {
    server.once('error', (cause) => reject(new GatewayError('GW_LISTEN_FAILED',
      `listener ${listener.name} cannot listen on ${listener.host}:${listener.port}: ${cause.message}`, { cause })))
    server.listen(listener.port, listener.host, () => resolve())
  })
  server.on('error', (err) => logger.error({ listener: listener.name, err: err.message }, 'listener error'))
  const address = server.address() as AddressInfo
  return {
    config: listener,
    host: address.address,
    port: address.port,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  }
}
