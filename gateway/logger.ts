/**
 * The gateway's log: JSON lines on stderr with `level` as a name ("info")
 * and `time` as ISO 8601, for log shippers; on a terminal, pino-pretty's
 * readable lines instead. Both are written synchronously, so the lines
 * before a crash or a SIGKILL are not lost in a buffer.
 */
import { pino, destination, stdTimeFunctions, type Level, type Logger } from 'pino'
import pretty from 'pino-pretty'

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const
export type LogLevel = Level | 'silent'

export function createLogger (level: LogLevel, options: { pretty: boolean }): Logger {
  const settings = {
    level,
    base: undefined,
    timestamp: stdTimeFunctions.isoTime,
    formatters: { level: (label: string) => ({ level: label }) },
  }
  if (options.pretty) return pino(settings, pretty({ destination: 2, sync: true, colorize: true, translateTime: 'SYS:standard' }))
  return pino(settings, destination({ dest: 2, sync: true }))
}

/**
 * Log fields for an aedes client id. broker.ts scopes a non-default tenant's client ids as `<tenant>U+0000<id>`;
 * a log shows the id the device sent and its tenant instead of that internal key.
 */
export function clientFields (id: string | null | undefined): { clientId: string | null, tenant?: string } {
  if (typeof id !== 'string') return { clientId: id ?? null }
  const at = id.indexOf('\u0000')
  return at === -1 ? { clientId: id } : { clientId: id.slice(at + 1), tenant: id.slice(0, at) }
}

/** Socket errors that only mean the peer went away: a device losing power or its network is not an error of ours. */
const ORDINARY_DISCONNECTS = new Set(['ECONNRESET', 'EPIPE', 'ECONNABORTED', 'ETIMEDOUT', 'ERR_STREAM_PREMATURE_CLOSE'])

export function isOrdinaryDisconnect (err: Error): boolean {
  return ORDINARY_DISCONNECTS.has((err as NodeJS.ErrnoException).code ?? '')
}
