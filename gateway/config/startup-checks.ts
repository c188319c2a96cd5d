/**
 * Settings that are valid but weak, reported at start as one warning line
 * each with a code (GW_WARN_…), and password hashes that can never match
 * (a placeholder copied from an example), refused at start: a user whose
 * hash is `scrypt$16384$8$1$...$...` could never log in, and nobody would
 * find out until a device tried.
 */
import type { Logger } from 'pino'
import type { GatewayConfig } from './config.ts'
import { GatewayError, type GatewayWarningCode } from '../errors.ts'
import { isLoopback } from '../mqtt/broker.ts'

export interface StartupWarning {
  readonly code: GatewayWarningCode
  readonly fields: Readonly<Record<string, unknown>>
  readonly message: string
}

const STRONG = { N: 16384, r: 8, p: 1 }
const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/
/** auth.ts derives 32-byte keys: a hash of another length never verifies. */
const KEY_BYTES = 32

interface Hashed { readonly key: string, readonly hash: string }

function hashes (config: GatewayConfig): Hashed[] {
  return [
    ...config.users.flatMap((u, i) => u.password === undefined ? [] : [{ key: `users.${i}.password`, hash: u.password }]),
    ...config.apiTokens.map((t, i) => ({ key: `apiTokens.${i}.tokenHash`, hash: t.tokenHash })),
  ]
}

function shortened (hash: string): string {
  return hash.length > 40 ? `${hash.slice(0, 40)}…` : hash
}

/** The cost parameters of a well-formed hash; throws GW_BAD_PASSWORD_HASH for one that can never verify. */
function costOf ({ key, hash }: Hashed): { N: number, r: number, p: number } {
  const [, n, r, p, salt = '', digest = ''] = hash.split('$')
  const cost = { N: Number(n), r: Number(r), p: Number(p) }
  const wellFormed = hash.split('$').length === 6 && Number.isInteger(cost.N) && cost.N >= 2 && (cost.N & (cost.N - 1)) === 0 &&
    Number.isInteger(cost.r) && cost.r >= 1 && Number.isInteger(cost.p) && cost.p >= 1 &&
    BASE64.test(salt) && BASE64.test(digest) && Buffer.from(digest, 'base64').length === KEY_BYTES
  if (!wellFormed) {
    throw new GatewayError('GW_BAD_PASSWORD_HASH',
      `"${key}" is not a hash \`edgemq passwd\` or \`edgemq token\` printed (a placeholder?): ${JSON.stringify(shortened(hash))}`)
  }
  return cost
}

/** Refuses hashes that can never match; returns the warnings for weak settings, one per setting. */
export function checkStartupSettings (config: GatewayConfig): StartupWarning[] {
  const warnings: StartupWarning[] = []
  const weak = hashes(config).filter((h) => { const c = costOf(h); return c.N < STRONG.N || c.r < STRONG.r })
  if (config.store.durability === 'async') {
    warnings.push({
      code: 'GW_WARN_ASYNC_DURABILITY', fields: { durability: 'async' }, message: 'store.durability is async: acknowledged messages may be lost on power loss',
    })
  }
  if (weak.length > 0) {
    warnings.push({
      code: 'GW_WARN_WEAK_HASH', fields: { keys: weak.map((h) => h.key) },
      message: `${weak.map((h) => h.key).join(', ')}: scrypt cost below N=${STRONG.N}, r=${STRONG.r}; print a new hash with \`edgemq passwd\``,
    })
  }
  if (!isLoopback(config.http.host) && config.users.length === 0 && config.apiTokens.length === 0) {
    warnings.push({
      code: 'GW_WARN_OPEN_HTTP', fields: { host: config.http.host },
      message: `HTTP binds ${config.http.host} without users or API tokens: the API and /metrics (tenant, stream and upstream names) are open to the network`,
    })
  }
  return warnings
}

/** Refuses configurations that would expose an open broker beyond this machine; warns of anonymous network listeners. */
export function checkListenerSecurity (config: GatewayConfig, logger: Pick<Logger, 'warn'>): void {
  for (const l of config.mqtt.listeners) {
    if (isLoopback(l.host)) continue
    if (l.allowAnonymous) {
      const fields = { code: 'GW_WARN_ANONYMOUS_LISTENER', listener: l.name, host: l.host }
      logger.warn(fields, 'listener accepts anonymous clients from the network (allowAnonymous: true)')
    } else if (config.users.length === 0) {
      throw new GatewayError('GW_INSECURE_LISTENER', `listener ${l.name} binds ${l.host}, which is not loopback, and no users are configured: ` +
        'add users, or set mqtt.listeners[].allowAnonymous: true to accept anonymous clients on purpose')
    }
  }
}

/** Every check at start, in order: refusals throw, each warning is logged as one line with its code. */
export function checkStartup (config: GatewayConfig, logger: Pick<Logger, 'warn'>): void {
  checkListenerSecurity(config, logger)
  for (const w of checkStartupSettings(config)) logger.warn({ code: w.code, ...w.fields }, w.message)
}
