/**
 * The `edgemq` command line. Each subcommand is a thin adapter: it parses
 * flags with commander and calls into the gateway, the store or the HTTP API.
 */
import { readFileSync } from 'node:fs'
import { Command, CommanderError, InvalidArgumentError } from 'commander'
import { parse as parseYaml } from 'yaml'
import { pino, destination } from 'pino'
import { hashPassword } from './auth.ts'
import { buildConfig, type GatewayConfig } from './config.ts'
import { GatewayError } from './errors.ts'
import { startGateway } from './gateway.ts'

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }

function port (value: string): number {
  const n = Number(value)
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError('expected a port number from 0 to 65535')
  return n
}

interface StartFlags { config?: string, dataDir?: string, mqttPort?: number, httpPort?: number }

/** The config file (or the embedded default) with the command-line flags applied, validated. */
export function resolveStartConfig (flags: StartFlags): GatewayConfig {
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
    else if (parsed !== null && parsed !== undefined) throw new GatewayError('GW_CONFIG_INVALID', `${flags.config}: the config must be a mapping of keys to values`)
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
  return buildConfig(raw, source)
}

async function start (flags: StartFlags): Promise<number> {
  const logger = pino({ level: 'info', base: undefined }, destination({ dest: 2, sync: true }))
  const config = resolveStartConfig(flags)
  const gateway = await startGateway(config, { logger })
  const mqtt = gateway.listeners.map((l) => `${l.config.name} ${l.config.type === 'ws' || l.config.type === 'wss' ? `${l.config.type}://${l.host}:${l.port}${l.config.path}` : `${l.config.type === 'tls' ? 'mqtts' : 'mqtt'}://${l.host}:${l.port}`}`)
  console.log(`edgemq ${pkg.version} ready: mqtt ${mqtt.join(', ')}; http http://${gateway.http.host}:${gateway.http.port}; data ${config.dataDir}`)
  return new Promise<number>((resolve) => {
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
  })
}

async function readPassword (): Promise<string> {
  const chunks: Buffer[] = []
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '')
}

export function buildProgram (exit: (code: number) => void): Command {
  const program = new Command('edgemq')
    .description('Edge gateway for IoT fleets: MQTT in front, a durable partitioned replayable log behind.')
    .version(pkg.version)
    .exitOverride()

  program.command('start')
    .description('run the gateway (with no flags: data in ./data, MQTT on 127.0.0.1:1883, HTTP on 127.0.0.1:9464)')
    .option('--config <file>', 'YAML or JSON config file')
    .option('--data-dir <dir>', 'data directory (overrides dataDir)')
    .option('--mqtt-port <n>', 'port of the first tcp listener; 0 picks a free one', port)
    .option('--http-port <n>', 'HTTP port for /health, /metrics and the API; 0 picks a free one', port)
    .action(async (flags: StartFlags) => { exit(await start(flags)) })

  program.command('passwd')
    .description('print a scrypt hash for users[].password; reads the password from stdin')
    .action(async () => {
      const password = await readPassword()
      if (password.length === 0) throw new GatewayError('GW_BAD_PASSWORD_HASH', 'empty password on stdin')
      console.log(await hashPassword(password))
    })
  return program
}

/** Runs the command line and returns the process exit code. */
export async function main (argv: readonly string[]): Promise<number> {
  let code = 0
  const program = buildProgram((c) => { code = c })
  try {
    await program.parseAsync([...argv])
    return code
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode
    const coded = err as { code?: string, message: string }
    console.error(`edgemq: ${coded.code !== undefined ? `${coded.code}: ` : ''}${coded.message}`)
    return 1
  }
}
