/**
 * `edgemq start`: the config (file, embedded default, flags), the gateway, its ready line, and the signals that stop
 * it. main.ts loads this module only for `start`, so that the client commands do not pay for the config schema, the
 * logger and the gateway's imports (each command loads only what it uses: see main.ts).
 */
import { readFileSync } from 'node:fs'
import { parse as parseYaml } from 'yaml'
import { buildConfig, configSchema, type GatewayConfig } from '../config/config.ts'
import { readEnvironment } from '../config/environment.ts'
import { chooseGatewayId, storeGatewayId, type GatewayIdChoice } from '../config/gateway-id.ts'
import { createLogger, type LogLevel } from '../logger.ts'
import { GatewayError } from '../errors.ts'
import { findNpmLauncher, watchLauncher } from './npm-launcher.ts'
import type { Gateway } from '../gateway.ts'
import type { Logger } from 'pino'

export interface StartFlags { config?: string, dataDir?: string, mqttPort?: number, httpPort?: number, logLevel?: LogLevel }

/**
 * The config file (or the embedded default) with the command-line flags applied, validated; without a
 * configured gatewayId, the one kept in the data directory (or a new one): gateway-id.ts says why.
 */
export function resolveStartConfig (flags: StartFlags): { config: GatewayConfig, gatewayId: GatewayIdChoice | undefined } {
  let raw: Record<string, unknown> = {}
  const source = flags.config ?? 'embedded default config'
  if (flags.config !== undefined) {
    let text: string
    try {
      text = readFileSync(flags.config, 'utf8')
    } catch (cause) {
      throw new GatewayError('GW_CONFIG_INVALID', `cannot read config file ${flags.config}: ${(cause as Error).message}`, { cause })
    }
    let parsed: unknown
    try {
      parsed = parseYaml(text, { uniqueKeys: true })
    } catch (cause) {
      throw new GatewayError('GW_CONFIG_INVALID', `${flags.config}: not valid YAML/JSON: ${(cause as Error).message}`, { cause })
    }
    if (parsed !== null && typeof parsed === 'object' && !Array.isArray(parsed)) raw = parsed as Record<string, unknown>
    else if (parsed !== null && parsed !== undefined) {
      throw new GatewayError('GW_CONFIG_INVALID', `${flags.config}: the config must be a mapping of keys to values`)
    }
  }
  if (flags.dataDir !== undefined) raw.dataDir = flags.dataDir
  if (flags.httpPort !== undefined) raw.http = { ...(raw.http as object | undefined), port: flags.httpPort }
  if (flags.mqttPort !== undefined) {
    const mqtt = { ...(raw.mqtt as Record<string, unknown> | undefined) }
    const listeners = Array.isArray(mqtt.listeners) ? [...(mqtt.listeners as Array<Record<string, unknown>>)] : [{ type: 'tcp' }]
    const i = listeners.findIndex((l) => l.type === 'tcp')
    if (i === -1) throw new GatewayError('GW_CONFIG_INVALID', '--mqtt-port needs a tcp listener in mqtt.listeners')
    listeners[i] = { ...listeners[i], port: flags.mqttPort }
    raw.mqtt = { ...mqtt, listeners }
  }
  if (flags.logLevel !== undefined) raw.log = { ...(raw.log as object | undefined), level: flags.logLevel }
  // A malformed dataDir or gatewayId is left to buildConfig to report.
  const dataDir = raw.dataDir ?? configSchema.properties.dataDir.default
  if (typeof dataDir !== 'string' || (raw.gatewayId !== undefined && typeof raw.gatewayId !== 'string')) {
    return { config: buildConfig(raw, source), gatewayId: undefined }
  }
  const gatewayId = chooseGatewayId(dataDir, raw.gatewayId as string | undefined)
  return { config: buildConfig({ ...raw, gatewayId: gatewayId.id }, source), gatewayId }
}

/** `edgemq start`: runs the gateway until SIGTERM / SIGINT (or npm's exit); resolves to the exit code. */
export async function start (flags: StartFlags, version: string): Promise<number> {
  const { config, gatewayId } = resolveStartConfig(flags)
  const logger = createLogger(config.log.level, { pretty: process.stderr.isTTY })
  if (gatewayId?.changed === true) {
    logger.warn({ code: 'GW_WARN_GATEWAY_ID_CHANGED', gatewayId: gatewayId.id, previous: gatewayId.stored },
      `gatewayId is ${gatewayId.id}, the data directory was ${gatewayId.stored ?? ''}'s: upstreams see a new gateway (new dedupe ids and client ids)`)
  }
  // Loaded only once the config is valid: a refused config (start-up tests run dozens) does not pay for the broker.
  const { startGateway } = await import('../gateway.ts')
  let gateway = await startGateway(config, { logger })
  // Kept once the gateway runs: a start refused for its config leaves the data directory untouched.
  if (gatewayId !== undefined && gatewayId.stored !== gatewayId.id) {
    try {
      storeGatewayId(config.dataDir, gatewayId.id)
    } catch (err) {
      logger.error({ gatewayId: gatewayId.id, err: (err as Error).message },
        'cannot keep the gateway id in the data directory: the next start without gatewayId will pick another')
    }
  }
  // The signal handlers are in place before the ready line: a supervisor may send SIGTERM as soon as it reads it.
  const stopped = new Promise<number>((resolve) => {
    const stop = (signal: string): void => {
      logger.info({ signal }, 'shutting down')
      const timer = setTimeout(() => {
        logger.error({ timeoutMs: config.shutdownTimeoutMs }, 'shutdown took too long; exiting')
        resolve(1)
      }, config.shutdownTimeoutMs)
      timer.unref()
      gateway.close().then(() => { clearTimeout(timer); resolve(0) }, (err: unknown) => {
        logger.error({ err: String(err) }, 'shutdown failed')
        resolve(1)
      })
    }
    process.once('SIGTERM', () => stop('SIGTERM'))
    process.once('SIGINT', () => stop('SIGINT'))
    // Under `npx edgemq start`, the pid a user signals is npm's (gateway/cli/npm-launcher.ts says why we follow it).
    const launcher = findNpmLauncher(readEnvironment().launchedByNpm, process.ppid)
    if (launcher !== undefined) {
      watchLauncher(launcher, (how) => {
        if (how === 'stopped') return stop('npm exited')
        logger.error({ npmPid: launcher.pid }, 'npm was killed (SIGKILL): killing the gateway the same way')
        process.kill(process.pid, 'SIGKILL')
      })
    }
  })
  announce(gateway, logger, version)
  // A promoted standby restarts as primary in this process, on the ports it had, so its clients' addresses stay valid.
  const restartWhenPromoted = (): void => {
    void gateway.promoted.then(async () => {
      logger.warn({}, 'promoted: restarting as primary')
      const previous = gateway
      await previous.close()
      gateway = await startGateway(samePorts(previous), { logger })
      announce(gateway, logger, version)
      restartWhenPromoted()
    }).catch((err: unknown) => {
      logger.fatal({ err: String(err) }, 'restart as primary failed')
      process.exit(1)
    })
  }
  restartWhenPromoted()
  return await stopped
}

/** The log line and the ready line: the addresses the gateway bound. */
function announce (gateway: Gateway, logger: Logger, version: string): void {
  const { config, replication } = gateway
  const mqtt = gateway.listeners.map((l) => {
    const { type } = l.config
    const url = type === 'ws' || type === 'wss' ? `${type}://${l.host}:${l.port}${l.config.path}` : `${type === 'tls' ? 'mqtts' : 'mqtt'}://${l.host}:${l.port}`
    return `${l.config.name} ${url}`
  })
  const http = `http://${gateway.http.host}:${gateway.http.port}`
  logger.info({ version, gatewayId: config.gatewayId, mqtt, http, dataDir: config.dataDir, replication: replication.role }, 'gateway started')
  const replicating = replication.role === 'none' ? '' : `; replication ${replication.role} ${replication.listenAddress ?? `of ${config.replication.peer}`}`
  console.log(`edgemq ${version} ready: mqtt ${mqtt.join(', ')}; http ${http}; data ${config.dataDir}; gateway ${config.gatewayId}${replicating}`)
}

/** The gateway's config with the ports it bound instead of 0. */
function samePorts (gateway: Gateway): GatewayConfig {
  const raw = structuredClone(gateway.config) as unknown as { mqtt: { listeners: Array<{ port: number }> }, http: { port: number } }
  gateway.listeners.forEach((l, i) => { (raw.mqtt.listeners[i] as { port: number }).port = l.port })
  raw.http.port = gateway.http.port
  return buildConfig(raw, 'the running config')
}
