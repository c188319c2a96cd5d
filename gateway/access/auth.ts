/**
 * Users, passwords and ACLs as pure functions; the broker's hooks are thin
 * adapters over these.
 *
 * Password hashes: `scrypt$N$r$p$<salt base64>$<hash base64>` (what
 * `edgemq passwd` prints), verified in constant time.
 *
 * API tokens (`apiTokens` in the config, printed by `edgemq token`) are
 * `emq_<name>_<secret>`: the name says which entry to check, so a request
 * costs one hash, never one per configured token; the secret is 32 random
 * bytes in base64url (43 characters). The config keeps only the token's hash,
 * in the same scrypt format as passwords.
 */
import { randomBytes, scrypt as scryptCb, timingSafeEqual, type ScryptOptions } from 'node:crypto'
import type { AclRule, ApiTokenConfig, Role, UserConfig } from '../config/config.ts'
import { GatewayError } from '../errors.ts'
import { topicMatches } from './topics.ts'

const KEY_LENGTH = 32

function scrypt (password: string | Buffer, salt: Buffer, options: ScryptOptions): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scryptCb(password, salt, KEY_LENGTH, { ...options, maxmem: 256 * options.N! * options.r! }, (err, key) => { if (err) reject(err); else resolve(key) })
  })
}

export async function hashPassword (password: string, options = { N: 16384, r: 8, p: 1 }): Promise<string> {
  const salt = randomBytes(16)
  const hash = await scrypt(password, salt, options)
  return `scrypt$${options.N}$${options.r}$${options.p}$${salt.toString('base64')}$${hash.toString('base64')}`
}

interface ParsedHash { N: number, r: number, p: number, salt: Buffer, hash: Buffer }

export function parseHash (encoded: string): ParsedHash {
  const parts = encoded.split('$')
  const [tag, n, r, p, salt, hash] = parts
  const N = Number(n)
  if (parts.length !== 6 || tag !== 'scrypt' || !Number.isInteger(N) || N < 2 || (N & (N - 1)) !== 0 ||
    !Number.isInteger(Number(r)) || !Number.isInteger(Number(p)) || salt === undefined || hash === undefined || hash.length === 0) {
    throw new GatewayError('GW_BAD_PASSWORD_HASH', 'password hash must look like scrypt$N$r$p$salt$hash (run `edgemq passwd`)')
  }
  return { N, r: Number(r), p: Number(p), salt: Buffer.from(salt, 'base64'), hash: Buffer.from(hash, 'base64') }
}

export async function verifyPassword (encoded: string, password: Buffer | string): Promise<boolean> {
  const parsed = parseHash(encoded)
  const candidate = await scrypt(password, parsed.salt, { N: parsed.N, r: parsed.r, p: parsed.p })
  return candidate.length === parsed.hash.length && timingSafeEqual(candidate, parsed.hash)
}

/** Who a connected client is, as the ACL sees it. */
export interface Identity {
  readonly tenant: string
  readonly role: Role | 'anonymous'
  readonly username: string | null
  readonly clientId: string
}

/** replicate: publishing a replicated record (`$dedupe/<id>/<topic>`), which a publish right alone does not give. */
export type Access = 'publish' | 'subscribe' | 'replicate'

/**
 * Built-in rules, after the configured ones: a device publishes under
 * devices/<client id>/ and subscribes to its own commands; services and
 * admins may use every topic of their tenant; anonymous clients (loopback or
 * allowAnonymous listeners) may too, as a plain local broker would allow.
 */
const BUILT_IN: readonly AclRule[] = [
  { role: 'device', topic: 'devices/%c/#', access: 'publish', allow: true },
  { role: 'device', topic: 'devices/%c/commands/#', access: 'subscribe', allow: true },
  { role: 'service', topic: '#', access: 'both', allow: true },
  { role: 'admin', topic: '#', access: 'both', allow: true },
  { role: 'anonymous', topic: '#', access: 'both', allow: true },
]

function substitute (pattern: string, who: Identity): string | null {
  if (pattern.includes('%u') && who.username === null) return null
  // A client id or username holding wildcards must not widen a rule.
  const safe = (s: string): string | null => (/[+#/]/.test(s) ? null : s)
  const user = who.username === null ? '' : safe(who.username)
  const client = safe(who.clientId)
  if ((pattern.includes('%u') && user === null) || (pattern.includes('%c') && client === null)) return null
  // One pass with a function: a replacement string would read `$&`, `$'`, `$$` in a name as patterns (a device
  // `a$$b` got `devices/a$b/#`), and a second pass would substitute a `%c` that a username brought in.
  return pattern.replace(/%[uc]/g, (v) => (v === '%u' ? user ?? '' : client ?? ''))
}

/**
 * Whether `who` may publish to `topic` / subscribe to `filter` / replicate
 * to `topic` (in its own tenant's topic space). The first matching rule
 * decides; no rule denies. A subscription filter is allowed when a rule's
 * filter covers it. `both` rules cover publish and subscribe, not replicate.
 */
export function isAllowed (rules: readonly AclRule[], who: Identity, access: Access, topic: string): boolean {
  for (const rule of [...rules, ...BUILT_IN]) {
    if (rule.role !== undefined && rule.role !== who.role) continue
    if (rule.username !== undefined && rule.username !== who.username) continue
    if (rule.access !== access && (rule.access !== 'both' || access === 'replicate')) continue
    const pattern = substitute(rule.topic, who)
    if (pattern === null) continue
    const covered = access === 'subscribe' ? filterCovers(pattern, topic) : topicMatches(pattern, topic)
    if (covered) return rule.allow
  }
  return false
}

/**
 * Whether `who` may publish replicated records (`$dedupe/<id>/<topic>`): the
 * store takes their dedupe id on trust, so a client that could guess ids
 * could have a bridge's records dropped as duplicates. Only an ACL
 * `replicate` grant gives the right — never to a device, whose identity is
 * its own client id. (The broker adds the open local mode: anonymous
 * clients on loopback with no users configured, where nobody is told apart.)
 */
export function mayReplicate (rules: readonly AclRule[], who: Identity, topic: string): boolean {
  return who.role !== 'device' && isAllowed(rules, who, 'replicate', topic)
}

/**
 * The client ids `user` may connect with, as a pattern (`%u` the username,
 * `*` one or more characters other than `/`, `+`, `#`): its
 * `clientIdPattern`, else `%u` for a device (a device login is bound to
 * its client id, which names its topics and its session), else null — a
 * service or admin may use any client id.
 */
export function clientIdPattern (user: UserConfig): string | null {
  return user.clientIdPattern ?? (user.role === 'device' ? '%u' : null)
}

/** Whether `clientId` fits `pattern` (see {@link clientIdPattern}) for `username`. */
export function clientIdMatches (pattern: string, username: string, clientId: string): boolean {
  return compileClientIdPattern(pattern, username).test(clientId)
}

function compileClientIdPattern (pattern: string, username: string): RegExp {
  const escape = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
  const source = pattern.split('%u').map((part) => part.split('*').map(escape).join('[^/+#]+')).join(escape(username))
  return new RegExp(`^(?:${source})$`, 'u')
}

/**
 * The client ids that bound users (a device, or any user with a clientIdPattern) own, per tenant. Binding a
 * login to its ids protects the client only if the ids are its alone: a service or admin without a pattern, or an
 * anonymous client, connecting with a device's id would take over the device's session (its subscriptions and
 * queued commands), receive the commands addressed to it, and log records under its client id. Such a CONNECT is
 * refused; a user whose own pattern covers the id may use it (overlapping patterns are the config's choice).
 */
export class ClientIdOwners {
  /** `<tenant>\u0000<id>` of every id a pattern without `*` names: most device logins, looked up in one step. */
  readonly #exact = new Set<string>()
  readonly #patterns = new Map<string, RegExp[]>()

  constructor (users: readonly UserConfig[]) {
    for (const user of users) {
      const pattern = clientIdPattern(user)
      if (pattern === null) continue
      if (!pattern.includes('*')) {
        this.#exact.add(`${user.tenant}\u0000${pattern.split('%u').join(user.username)}`)
        continue
      }
      let list = this.#patterns.get(user.tenant)
      if (list === undefined) this.#patterns.set(user.tenant, list = [])
      list.push(compileClientIdPattern(pattern, user.username))
    }
  }

  /** Whether a bound user of `tenant` owns `clientId`. */
  owned (tenant: string, clientId: string): boolean {
    if (this.#exact.has(`${tenant}\u0000${clientId}`)) return true
    return (this.#patterns.get(tenant) ?? []).some((re) => re.test(clientId))
  }
}

/** True when every topic `inner` matches is also matched by `outer`. */
export function filterCovers (outer: string, inner: string): boolean {
  const o = outer.split('/')
  const i = inner.split('/')
  for (let k = 0; k < o.length; k++) {
    const level = o[k] as string
    if (level === '#') return true
    const other = i[k]
    if (other === undefined) return false
    if (other === '#') return false
    if (level === '+') continue
    if (other === '+' || other !== level) return false
  }
  return o.length === i.length
}

export class UserDirectory {
  readonly #users: Map<string, UserConfig>
  constructor (users: readonly UserConfig[]) {
    this.#users = new Map(users.map((u) => [u.username, u]))
    for (const u of users) if (u.password !== undefined) parseHash(u.password)
  }

  get size (): number { return this.#users.size }

  get (username: string): UserConfig | undefined { return this.#users.get(username) }

  /** The user when the password matches, null otherwise (unknown users cost a hash too). */
  async authenticate (username: string, password: Buffer | undefined): Promise<UserConfig | null> {
    const user = this.#users.get(username)
    if (user?.password === undefined || password === undefined) {
      await verifyPassword(DUMMY_HASH, password ?? '')
      return null
    }
    return (await verifyPassword(user.password, password)) ? user : null
  }
}

const DUMMY_HASH = 'scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA='

// ---------------------------------------------------------------- API tokens

const TOKEN_PREFIX = 'emq_'
const TOKEN_SECRET_CHARS = 43
const TOKEN_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/

/** A new random token for the `apiTokens` entry called `name`. */
export function generateApiToken (name: string): string {
  if (!TOKEN_NAME.test(name)) {
    const rule = 'must be 1 to 64 letters, digits, ".", "_" and "-", starting with a letter or digit'
    throw new GatewayError('GW_CONFIG_INVALID', `token name ${JSON.stringify(name)} ${rule}`)
  }
  return `${TOKEN_PREFIX}${name}_${randomBytes(32).toString('base64url')}`
}

/** The entry name a token claims, or null when the text is not shaped like an edgemq token. */
export function apiTokenName (token: string): string | null {
  const secretAt = token.length - TOKEN_SECRET_CHARS
  if (!token.startsWith(TOKEN_PREFIX) || secretAt < TOKEN_PREFIX.length + 2 || token[secretAt - 1] !== '_') return null
  if (!/^[A-Za-z0-9_-]+$/.test(token.slice(secretAt))) return null
  const name = token.slice(TOKEN_PREFIX.length, secretAt - 1)
  return TOKEN_NAME.test(name) ? name : null
}

export class TokenDirectory {
  readonly #tokens: Map<string, ApiTokenConfig>
  constructor (tokens: readonly ApiTokenConfig[]) {
    this.#tokens = new Map(tokens.map((t) => [t.name, t]))
    for (const t of tokens) parseHash(t.tokenHash)
  }

  get size (): number { return this.#tokens.size }

  /** The entry when the token matches its hash, null otherwise (malformed and unknown tokens cost a hash too). */
  async authenticate (token: string): Promise<ApiTokenConfig | null> {
    const name = apiTokenName(token)
    const entry = name === null ? undefined : this.#tokens.get(name)
    if (entry === undefined) {
      await verifyPassword(DUMMY_HASH, token)
      return null
    }
    return (await verifyPassword(entry.tokenHash, token)) ? entry : null
  }
}
