/**
 * Who is calling the /v1 API, from the request's Authorization header:
 *
 * - `Basic` with the users of MQTT (`users[]`, scrypt password hashes);
 * - `Bearer` with a token of `apiTokens[]` (RFC 6750; tokens are
 *   `emq_<name>_<secret>`, see auth.ts), which has a tenant and a role of
 *   its own, like a user;
 * - nothing, from a loopback address, when neither users nor tokens are
 *   configured: tenant `default`, the rule MQTT's loopback listeners follow.
 *
 * Only the roles `service` and `admin` may use the API; `device` gets 403.
 *
 * A successful check is cached for a minute, so a polling consumer does not
 * pay a scrypt hash per request. The cache is keyed by an HMAC of the
 * credentials under a per-process random key: neither passwords nor tokens
 * are held in memory, and a lookup's timing says nothing about a secret
 * (the secret itself is compared in constant time, by scrypt and
 * timingSafeEqual, only on a miss). The cache is bounded (the oldest entry
 * goes first); failures are never cached.
 */
import { createHmac, randomBytes } from 'node:crypto'
import { ApiError } from './errors.ts'
import { apiTokenName, TokenDirectory, UserDirectory } from '../access/auth.ts'
import type { ApiTokenConfig, Role, UserConfig } from '../config/config.ts'

export interface Principal {
  readonly tenant: string
  readonly role: 'service' | 'admin' | 'anonymous'
  /** How the caller authenticated, and as whom (a username, a token name; null when anonymous). */
  readonly via: 'basic' | 'bearer' | 'anonymous'
  readonly name: string | null
}

export interface ApiAuthOptions {
  /** Entries of the cache of successful checks (default 1000). */
  readonly cacheEntries?: number
  /** How long a successful check is trusted, in ms (default 60 s). */
  readonly cacheMs?: number
  readonly logger?: { warn (fields: Record<string, unknown>, message: string): void }
}

const REALM = 'realm="edgemq"'
/** Both schemes are offered when a request brought no usable credentials. */
export const AUTH_CHALLENGES: readonly string[] = [`Basic ${REALM}, charset="UTF-8"`, `Bearer ${REALM}`]
/** RFC 6750 section 2.1: the characters of a b64token. */
const B64TOKEN = /^[A-Za-z0-9\-._~+/]+=*$/

/** A request from this machine: 127.0.0.0/8, ::1, or either mapped into IPv6. */
export function isLoopbackAddress (address: string | undefined): boolean {
  if (address === undefined) return false
  const a = address.startsWith('::ffff:') ? address.slice(7) : address
  return a === '::1' || /^127\.\d+\.\d+\.\d+$/.test(a)
}

interface Checked { readonly tenant: string, readonly role: Role, readonly via: 'basic' | 'bearer', readonly name: string }

class SuccessCache {
  readonly #key = randomBytes(32)
  readonly #entries = new Map<string, { checked: Checked, expires: number }>()
  constructor (private readonly capacity: number, private readonly ttlMs: number) {}

  id (...parts: ReadonlyArray<string | Buffer>): string {
    const h = createHmac('sha256', this.#key)
    for (const p of parts) h.update(p).update('\u0000')
    return h.digest('base64')
  }

  get (id: string): Checked | undefined {
    const hit = this.#entries.get(id)
    if (hit === undefined) return undefined
    if (hit.expires < performance.now()) { this.#entries.delete(id); return undefined }
    return hit.checked
  }

  set (id: string, checked: Checked): void {
    this.#entries.delete(id)
    if (this.#entries.size >= this.capacity) this.#entries.delete(this.#entries.keys().next().value as string)
    this.#entries.set(id, { checked, expires: performance.now() + this.ttlMs })
  }

  get size (): number { return this.#entries.size }
}

export class ApiAuthenticator {
  readonly #users: UserDirectory
  readonly #tokens: TokenDirectory
  readonly #cache: SuccessCache
  readonly #logger: ApiAuthOptions['logger']
  #hashChecks = 0

  constructor (users: readonly UserConfig[], tokens: readonly ApiTokenConfig[], options: ApiAuthOptions = {}) {
    this.#users = new UserDirectory(users)
    this.#tokens = new TokenDirectory(tokens)
    this.#cache = new SuccessCache(options.cacheEntries ?? 1000, options.cacheMs ?? 60_000)
    this.#logger = options.logger
  }

  /** Passwords and tokens hashed so far: the cache's misses (for tests). */
  get hashChecks (): number { return this.#hashChecks }

  /** Entries in the cache of successful checks. */
  get cached (): number { return this.#cache.size }

  /** The caller of a request with this Authorization header from this address; an ApiError (401, 403) otherwise. */
  async authenticate (header: string | undefined, remoteAddress: string | undefined): Promise<Principal> {
    if (header === undefined || header === '') {
      const open = this.#users.size === 0 && this.#tokens.size === 0
      if (open && isLoopbackAddress(remoteAddress)) return { tenant: 'default', role: 'anonymous', via: 'anonymous', name: null }
      throw new ApiError('HTTP_AUTH_REQUIRED', open
        ? 'anonymous access is allowed from loopback only; configure users or apiTokens to use the API from elsewhere'
        : 'send a bearer token (Authorization: Bearer emq_…) or the credentials of a service or admin user with HTTP basic authentication')
    }
    const scheme = /^([A-Za-z]+)(?: +(.*))?$/.exec(header)
    const kind = scheme?.[1]?.toLowerCase()
    const rest = (scheme?.[2] ?? '').trim()
    let checked: Checked
    if (kind === 'bearer') checked = await this.#bearer(rest, remoteAddress)
    else if (kind === 'basic') checked = await this.#basic(rest, remoteAddress)
    else throw new ApiError('HTTP_BAD_CREDENTIALS', 'the Authorization header must be "Basic " and base64 of username:password, or "Bearer " and a token')
    if (checked.role !== 'service' && checked.role !== 'admin') {
      const who = checked.via === 'bearer' ? `token ${checked.name}` : `user ${checked.name}`
      throw new ApiError('HTTP_FORBIDDEN', `${who} has role ${checked.role}; the API is for service and admin roles`, checked.via === 'bearer'
        ? { headers: { 'www-authenticate': `Bearer ${REALM}, error="insufficient_scope"` } }
        : {})
    }
    return { tenant: checked.tenant, role: checked.role, via: checked.via, name: checked.name }
  }

  async #basic (credentials: string, remote: string | undefined): Promise<Checked> {
    const decoded = /^[A-Za-z0-9+/]+=*$/.test(credentials) ? Buffer.from(credentials, 'base64') : undefined
    const colon = decoded?.indexOf(0x3a) ?? -1
    if (decoded === undefined || colon < 0) {
      throw new ApiError('HTTP_BAD_CREDENTIALS', 'the Authorization header must be HTTP basic: "Basic " and base64 of username:password')
    }
    const username = decoded.subarray(0, colon).toString('utf8')
    const password = decoded.subarray(colon + 1)
    const id = this.#cache.id('basic', username, password)
    const hit = this.#cache.get(id)
    if (hit !== undefined) return hit
    this.#hashChecks++
    const user = await this.#users.authenticate(username, password)
    if (user === null) {
      this.#logger?.warn({ username, remote }, 'HTTP API: bad username or password')
      throw new ApiError('HTTP_BAD_CREDENTIALS', 'bad username or password')
    }
    const checked: Checked = { tenant: user.tenant, role: user.role, via: 'basic', name: user.username }
    this.#cache.set(id, checked)
    return checked
  }

  async #bearer (token: string, remote: string | undefined): Promise<Checked> {
    const invalid = (message: string): ApiError => new ApiError('HTTP_BAD_TOKEN', message,
      { headers: { 'www-authenticate': `Bearer ${REALM}, error="invalid_token"` } })
    if (!B64TOKEN.test(token)) throw invalid('the Authorization header must be "Bearer " followed by one token (RFC 6750)')
    const id = this.#cache.id('bearer', token)
    const hit = this.#cache.get(id)
    if (hit !== undefined) return hit
    this.#hashChecks++
    const entry = await this.#tokens.authenticate(token)
    if (entry === null) {
      // The token's claimed name only: the secret never goes to the log.
      this.#logger?.warn({ token: apiTokenName(token) ?? '(not an edgemq token)', remote }, 'HTTP API: bad bearer token')
      throw invalid('unknown or wrong token (tokens look like emq_<name>_<secret> and are printed by `edgemq token`)')
    }
    const checked: Checked = { tenant: entry.tenant, role: entry.role, via: 'bearer', name: entry.name }
    this.#cache.set(id, checked)
    return checked
  }
}
