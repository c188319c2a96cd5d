/**
 * The `edgemq` command line. Each subcommand is a thin adapter: it parses
 * flags with commander and calls into the gateway, the store or the HTTP API.
 *
 * Each command imports what it uses when it runs, not before: a static import of every command's module made each
 * `edgemq` process load the config schema, the store, the bridge with MQTT.js and NATS, and pino, about 0.4 s of CPU
 * before `--help` (measured 2026-12-02: `edgemq --help` 0.63 s of CPU, of which node and tsx alone 0.2 s); the test
 * suite runs this command some hundred times. `start` is in start.ts. replay, tail, streams and groups still load the
 * bridge's index (MQTT.js, NATS) through gateway/query and gateway/access/topics.ts, about 0.1 s of CPU more.
 */
import { readFileSync } from 'node:fs'
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander'
import { CliError } from './errors.ts'
import { ApiClient } from './http-client.ts'
import type { AdminSource } from './admin.ts'
import type { OutputFormat, PayloadEncoding, Position, ReadSpec } from './replay.ts'
import type { StartFlags } from './start.ts'
import { readEnvironment } from '../config/environment.ts'
import { LOG_LEVELS } from '../logger.ts'

const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }

function port (value: string): number {
  const n = Number(value)
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError('expected a port number from 0 to 65535')
  return n
}

function nonNegative (value: string): number {
  const n = /^[0-9]{1,15}$/.test(value) ? Number(value) : NaN
  if (!Number.isSafeInteger(n)) throw new InvalidArgumentError('expected a non-negative integer')
  return n
}

function collect (value: string, previous: string[] = []): string[] {
  return [...previous, value]
}

// ---------------------------------------------------------------- client commands

const DEFAULT_URL = 'http://127.0.0.1:9464'

interface SourceFlags { url?: string, user?: string, password?: string, token?: string, dataDir?: string, tenant?: string }

interface ReadFlags extends SourceFlags {
  stream: string
  partition?: number
  from?: string
  to?: string
  device?: string[]
  topic?: string[]
  where?: string
  format: OutputFormat
  payload: PayloadEncoding
  out?: string
  maxRecords?: number
  progress: boolean
}

/** The client commands are a composition root too: the only place they read the environment. */
function apiClient (flags: SourceFlags): ApiClient {
  if (flags.tenant !== undefined) throw new CliError('CLI_BAD_ARGUMENT', '--tenant goes with --data-dir; over HTTP the tenant is the user\'s or the token\'s')
  const env = readEnvironment()
  const url = flags.url ?? env.url ?? DEFAULT_URL
  // Flags win over the environment; within either, a token and a user exclude each other (ApiClient says so).
  if (flags.token !== undefined || flags.user !== undefined || flags.password !== undefined) {
    const user = flags.user ?? (flags.token === undefined ? env.user : undefined)
    return new ApiClient({ url, token: flags.token, user, password: flags.password })
  }
  if (env.token !== undefined && env.user !== undefined) {
    throw new CliError('CLI_BAD_ARGUMENT', 'EDGEMQ_TOKEN and EDGEMQ_USER are both set: unset one, or choose with --token or --user')
  }
  return new ApiClient({ url, token: env.token, user: env.user, password: env.password })
}

/** Runs `fn` on the data directory (`--data-dir`) or the gateway over HTTP (`--url`, the default). */
async function withAdminSource<T> (flags: SourceFlags, fn: (source: AdminSource) => Promise<T>): Promise<T> {
  if (flags.dataDir === undefined) return await fn({ kind: 'http', api: apiClient(flags) })
  if (flags.url !== undefined || flags.user !== undefined || flags.password !== undefined || flags.token !== undefined) {
    throw new CliError('CLI_BAD_ARGUMENT',
      '--data-dir reads a stopped gateway\'s files; --url, --user, --password and --token are for a running one: give one or the other')
  }
  const { openDataDir } = await import('./offline.ts')
  const log = await openDataDir(flags.dataDir, flags.tenant ?? 'default')
  try {
    return await fn({ kind: 'offline', log })
  } finally {
    await log.close()
  }
}

function readSpec (flags: ReadFlags, now: number, parsePosition: (text: string, flag: string, now: number) => Position): ReadSpec {
  return {
    stream: flags.stream,
    partition: flags.partition,
    from: flags.from === undefined ? undefined : parsePosition(flags.from, '--from', now),
    to: flags.to === undefined ? undefined : parsePosition(flags.to, '--to', now),
    filters: { keys: flags.device ?? [], topics: flags.topic ?? [], where: flags.where },
    maxRecords: flags.maxRecords,
  }
}

/** Writes to stdout and waits until it reached the OS: `edgemq` ends with process.exit, which drops what a pipe has not taken yet. */
function print (text: string): Promise<void> {
  return new Promise((resolve) => process.stdout.write(text, () => resolve()))
}

/** Aborts on SIGINT / SIGTERM while `fn` runs, so that an interrupted run ends its output cleanly. */
async function interruptible<T> (fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController()
  const abort = (): void => controller.abort()
  process.once('SIGINT', abort)
  process.once('SIGTERM', abort)
  try {
    return await fn(controller.signal)
  } finally {
    process.off('SIGINT', abort)
    process.off('SIGTERM', abort)
  }
}

function addSourceOptions (command: Command, offline: boolean): Command {
  command
    .option('--url <url>', `the gateway's HTTP address (default ${DEFAULT_URL}, or EDGEMQ_URL)`)
    .option('--user <name>', 'a service or admin user (default EDGEMQ_USER)')
    .option('--password <password>', 'its password (default EDGEMQ_PASSWORD)')
    .option('--token <token>', 'a bearer token printed by `edgemq token`, instead of --user and --password (default EDGEMQ_TOKEN)')
  if (offline) {
    command
      .option('--data-dir <dir>', 'read a stopped gateway\'s data directory instead of asking a running one')
      .option('--tenant <name>', 'with --data-dir: the tenant whose streams to read (default "default")')
  }
  return command
}

function addReadOptions (command: Command): Command {
  return command
    .requiredOption('--stream <name>', 'the stream to read')
    .option('--partition <n>', 'only this partition (default: every partition, one after the other)', nonNegative)
    .option('--device <id>', 'only records with this key (device id); repeatable', collect)
    .option('--topic <filter>', 'only records whose MQTT topic matches this filter (+, #); repeatable', collect)
    .option('--where <expr>', 'only records whose JSON payload satisfies the expression, e.g. \'temp > 30 and site = "a"\'')
    .addOption(new Option('--format <format>', 'output format').choices(['ndjson', 'json', 'cbor']).default('ndjson'))
    .addOption(new Option('--payload <encoding>', 'payloads in ndjson/json output').choices(['utf8', 'base64']).default('utf8'))
    .option('--out <file>', 'write to this file instead of stdout')
    .option('--max-records <n>', 'stop after this many records', nonNegative)
}

function addClientCommands (program: Command, exit: (code: number) => void): void {
  const replayCommand = program.command('replay')
    .description('write a stream\'s records (a range, filtered) as NDJSON, JSON or CBOR, from a running gateway or a stopped one\'s data')
    .option('--from <position>',
      'start: earliest (default), latest, an offset (needs one partition), or a time (ISO 8601 with zone, date, now, -15m, @<epoch ms>)')
    .option('--to <position>', 'stop before this offset or before the first record at or after this time')
    .option('--no-progress', 'no progress bar (it is drawn only when stderr is a terminal anyway)')
  addReadOptions(replayCommand)
  addSourceOptions(replayCommand, true)
  replayCommand.action(async (flags: ReadFlags) => {
    const { httpSource, offlineSource, parsePosition, replay } = await import('./replay.ts')
    const spec = readSpec(flags, Date.now(), parsePosition)
    const output = { format: flags.format, payload: flags.payload, out: flags.out }
    const io = { stderr: process.stderr, progress: flags.progress }
    exit(await interruptible(async (signal) => {
      if (flags.dataDir === undefined) return await replay(httpSource(apiClient(flags)), spec, output, { ...io, signal })
      return await withAdminSource(flags, async (source) => {
        if (source.kind !== 'offline') throw new Error('unreachable')
        return await replay(offlineSource(source.log), spec, output, { ...io, signal })
      })
    }))
  })

  const tailCommand = program.command('tail')
    .description('follow a stream like tail -f: print records as they are appended, until interrupted')
    .option('--from <position>', 'start here instead of at the current end: earliest, latest, an offset (needs one partition), or a time')
    .option('--to <position>', 'stop at this offset or time')
  addReadOptions(tailCommand)
  addSourceOptions(tailCommand, false)
  tailCommand.action(async (flags: ReadFlags) => {
    const { parsePosition, tail } = await import('./replay.ts')
    const spec = readSpec(flags, Date.now(), parsePosition)
    exit(await interruptible((signal) => tail(apiClient(flags), spec, { format: flags.format, payload: flags.payload, out: flags.out },
      { stderr: process.stderr, progress: false, signal })))
  })

  const streams = program.command('streams')
    .description('list the streams: partitions, log start and end offsets, records, bytes, oldest and newest timestamps')
    .option('--stream <name>', 'only this stream')
    .option('--json', 'print the API\'s JSON document instead of a table')
  addSourceOptions(streams, true)
  streams.action(async (flags: SourceFlags & { stream?: string, json?: boolean }) => {
    const { listStreams, streamsTable } = await import('./admin.ts')
    const doc = await withAdminSource(flags, (source) => listStreams(source, flags.stream))
    await print(flags.json === true ? `${JSON.stringify(doc, null, 2)}\n` : streamsTable(doc.streams))
  })

  const groups = program.command('groups')
    .description('consumer groups: list (the default) with lag, reset offsets, delete')
  const groupsList = groups.command('list', { isDefault: true })
    .description('list the groups with committed offsets and lag per partition')
    .option('--group <name>', 'only this group')
    .option('--json', 'print the API\'s JSON document instead of a table')
  addSourceOptions(groupsList, true)
  groupsList.action(async (flags: SourceFlags & { group?: string, json?: boolean }) => {
    const { groupsTable, listGroups } = await import('./admin.ts')
    const doc = await withAdminSource(flags, (source) => listGroups(source, flags.group))
    await print(flags.json === true ? `${JSON.stringify(doc, null, 2)}\n` : groupsTable(doc.groups))
  })
  const groupsReset = groups.command('reset')
    .description('move a group\'s offsets on a stream (every partition, or --partition)')
    .requiredOption('--group <name>', 'the group')
    .requiredOption('--stream <name>', 'the stream')
    .requiredOption('--to <position>',
      'earliest, latest, an offset, or a time (ISO 8601 with zone, date, now, -15m, @<epoch ms>); offsets outside the log are clamped into it')
    .option('--partition <n>', 'only this partition', nonNegative)
    .option('--json', 'print the API\'s JSON answer instead of a table')
  addSourceOptions(groupsReset, false)
  groupsReset.action(async (flags: SourceFlags & { group: string, stream: string, to: string, partition?: number, json?: boolean }) => {
    const { groupsTable, resetGroup } = await import('./admin.ts')
    const result = await resetGroup(apiClient(flags), flags.group, flags.stream, flags.to, flags.partition, Date.now())
    await print(flags.json === true ? `${JSON.stringify(result, null, 2)}\n` : groupsTable([{ group: result.group, streams: [result] }]))
  })
  const groupsDelete = groups.command('delete')
    .description('delete a group and its offsets')
    .requiredOption('--group <name>', 'the group')
  addSourceOptions(groupsDelete, false)
  groupsDelete.action(async (flags: SourceFlags & { group: string }) => {
    const { deleteGroup } = await import('./admin.ts')
    await deleteGroup(apiClient(flags), flags.group)
    await print(`deleted group ${flags.group}\n`)
  })

  program.command('check')
    .description('verify a stopped gateway\'s data: every LevelDB block checksum, every batch, every offset; exit 0 when clean, 2 when damaged')
    .requiredOption('--data-dir <dir>', 'the data directory to check (the gateway must be stopped)')
    .option('--json', 'print the report as JSON')
    .option('--salvage <file>', 'also write every record that passes its checks to this new file (NDJSON, with stream and offset, payloads in base64)')
    .action(async (flags: { dataDir: string, json?: boolean, salvage?: string }) => {
      const { CHECK_EXIT_DAMAGED, checkDataDir, checkText } = await import('./check.ts')
      const check = await checkDataDir(flags.dataDir, { salvage: flags.salvage })
      await print(flags.json === true ? `${JSON.stringify(check, keysAsHex, 2)}\n` : checkText(check))
      exit(check.ok ? 0 : CHECK_EXIT_DAMAGED)
    })

  const sessionsCommand = program.command('sessions')
    .description('persistent MQTT sessions: connected or not, subscriptions, lag per cursor into the log (messages, seconds), queued copies')
    .option('--json', 'print the API\'s JSON document instead of a table')
  addSourceOptions(sessionsCommand, false)
  sessionsCommand.action(async (flags: SourceFlags & { json?: boolean }) => {
    const { listSessions, sessionsTable } = await import('./sessions.ts')
    const doc = await listSessions(apiClient(flags))
    await print(flags.json === true ? `${JSON.stringify(doc, null, 2)}\n` : sessionsTable(doc.sessions))
  })

  const bridge = program.command('bridge')
    .description('the bridge to upstream clusters')
  const bridgeStatusCommand = bridge.command('status', { isDefault: true })
    .description('per upstream: connected, backlog (messages, bytes, seconds), throughput, reconnects, dead letters, last error')
    .option('--upstream <name>', 'only this upstream')
    .option('--partitions', 'also one line per forwarded partition: committed and forwarded offsets, log end, backlog')
    .option('--json', 'print the API\'s JSON document instead of a table')
  addSourceOptions(bridgeStatusCommand, false)
  bridgeStatusCommand.action(async (flags: SourceFlags & { upstream?: string, partitions?: boolean, json?: boolean }) => {
    const { bridgeStatus, bridgeTable } = await import('./bridge.ts')
    const upstreams = await bridgeStatus(apiClient(flags), flags.upstream)
    await print(flags.json === true ? `${JSON.stringify({ upstreams }, null, 2)}\n` : bridgeTable(upstreams, flags.partitions === true))
  })

  const replication = program.command('replication')
    .description('the standby replica: role, epoch, peer, in sync or not, lag')
  const replicationStatusCommand = replication.command('status', { isDefault: true })
    .description('this gateway\'s replication role, epoch, peer, whether the standby is in sync, and its lag (writes, bytes, seconds)')
    .option('--json', 'print the API\'s JSON document instead of a table')
  addSourceOptions(replicationStatusCommand, false)
  replicationStatusCommand.action(async (flags: SourceFlags & { json?: boolean }) => {
    const { replicationStatus, replicationTable } = await import('./replication.ts')
    const s = await replicationStatus(apiClient(flags))
    await print(flags.json === true ? `${JSON.stringify(s, null, 2)}\n` : replicationTable(s))
  })
  const promoteCommand = program.command('promote')
    .description('promote the standby at --url to primary in the next epoch (it restarts itself as primary); waits until it answers as primary')
    .option('--json', 'print the new primary\'s replication status as JSON')
  addSourceOptions(promoteCommand, false)
  promoteCommand.action(async (flags: SourceFlags & { json?: boolean }) => {
    const { promote, replicationTable } = await import('./replication.ts')
    const s = await promote(apiClient(flags))
    await print(flags.json === true ? `${JSON.stringify(s, null, 2)}\n` : replicationTable(s))
  })
}

/** Buffers (LevelDB keys in the check report) as hex, not as JSON's arrays of numbers. */
function keysAsHex (_key: string, value: unknown): unknown {
  const buffer = value as { type?: unknown, data?: unknown }
  const isBuffer = buffer !== null && typeof buffer === 'object' && buffer.type === 'Buffer' && Array.isArray(buffer.data)
  return isBuffer ? Buffer.from(buffer.data as number[]).toString('hex') : value
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
    .addOption(new Option('--log-level <level>', 'least severe level logged (overrides log.level)').choices(LOG_LEVELS))
    .action(async (flags: StartFlags) => {
      const { start } = await import('./start.ts')
      exit(await start(flags, pkg.version))
    })

  program.command('passwd')
    .description('print a scrypt hash for users[].password; prompts for the password on a terminal (not echoed), else reads stdin')
    .action(async () => {
      const [{ readNewPassword }, { hashPassword }, { GatewayError }] = await Promise.all([
        import('./password.ts'), import('../access/auth.ts'), import('../errors.ts')])
      const password = await readNewPassword(process.stdin, process.stderr)
      if (password.length === 0) throw new GatewayError('GW_BAD_PASSWORD_HASH', 'empty password on stdin')
      console.log(await hashPassword(password))
    })
  program.command('token')
    .description('make a bearer token for the HTTP API: prints the token (keep it secret) and the apiTokens entry holding its hash')
    .requiredOption('--name <name>', 'the entry\'s name, unique in apiTokens and part of the token (letters, digits, ".", "_", "-")')
    .option('--tenant <name>', 'the tenant whose streams and groups the token reaches', 'default')
    .addOption(new Option('--role <role>', 'service or admin may use the API').choices(['service', 'admin', 'device']).default('service'))
    .option('--json', 'print {"token", "apiToken"} as JSON')
    .action(async (flags: { name: string, tenant: string, role: string, json?: boolean }) => {
      const { generateApiToken, hashPassword } = await import('../access/auth.ts')
      const name = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/
      for (const [flag, value] of [['--name', flags.name], ['--tenant', flags.tenant]] as const) {
        if (!name.test(value)) {
          throw new CliError('CLI_BAD_ARGUMENT', `${flag} ${JSON.stringify(value)}: 1 to 64 letters, digits, ".", "_" and "-", starting with a letter or digit`)
        }
      }
      const token = generateApiToken(flags.name)
      const entry = { name: flags.name, tenant: flags.tenant, role: flags.role, tokenHash: await hashPassword(token) }
      await print(flags.json === true
        ? `${JSON.stringify({ token, apiToken: entry })}\n`
        : `# the token, shown only now: give it to the client (--token, or EDGEMQ_TOKEN)\n${token}\n` +
          `# add this entry to apiTokens in the gateway's config (it holds only the token's hash)\n` +
          `- { name: ${entry.name}, tenant: ${entry.tenant}, role: ${entry.role}, tokenHash: "${entry.tokenHash}" }\n`)
    })
  addClientCommands(program, exit)
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
