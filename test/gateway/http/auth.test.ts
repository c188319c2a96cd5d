/**
 * Who may call the /v1 API: basic credentials, bearer tokens, anonymous
 * loopback, roles, and the cache that keeps scrypt off the per-request path.
 * Real scrypt hashes (with a small N), no sockets; the HTTP side is in
 * api.int.test.ts.
 */
import { describe, expect, it } from 'vitest'
import { ApiAuthenticator, isLoopbackAddress } from '../../../gateway/http/auth.ts'
import { apiTokenName, generateApiToken, hashPassword, TokenDirectory, verifyPassword } from '../../../gateway/access/auth.ts'
import { buildConfig, type ApiTokenConfig, type Role, type UserConfig } from '../../../gateway/config/config.ts'

const FAST = { N: 1024, r: 8, p: 1 }

async function token (name: string, tenant: string, role: Role): Promise<{ token: string, entry: ApiTokenConfig }> {
  const t = generateApiToken(name)
  return { token: t, entry: { name, tenant, role, tokenHash: await hashPassword(t, FAST) } }
}

const bearer = (t: string): string => `Bearer ${t}`
const basic = (user: string, pw: string): string => `Basic ${Buffer.from(`${user}:${pw}`).toString('base64')}`

/** The error `fn` rejects with: its code, status and WWW-Authenticate challenge. */
async function refusal (p: Promise<unknown>): Promise<{ code: string, status: number, challenge: string | undefined }> {
  try {
    await p
  } catch (err) {
    const e = err as { code: string, status: number, headers: Record<string, string> }
    return { code: e.code, status: e.status, challenge: e.headers['www-authenticate'] }
  }
  throw new Error('expected a refusal')
}

describe('API tokens', () => {
  it('are emq_<name>_<43 base64url characters> and name their entry, whatever the name holds', () => {
    for (const name of ['ci', 'ci-reader', 'a_b', 'x.y_z-1', 'n'.repeat(64)]) {
      const t = generateApiToken(name)
      expect(t).toMatch(/^emq_.+_[A-Za-z0-9_-]{43}$/)
      expect(apiTokenName(t)).toBe(name)
    }
    expect(generateApiToken('ci')).not.toBe(generateApiToken('ci'))
    const a = (n: number): string => 'a'.repeat(n)
    for (const bad of ['', 'emq_', 'abc', `emq__${a(43)}`, `emq_ci-${a(43)}`, `emq_ci_${a(42)}`, `emq_ci_${a(42)}=`, `xyz_ci_${a(43)}`, `emq_-x_${a(43)}`]) {
      expect(apiTokenName(bad), bad).toBeNull()
    }
    expect(() => generateApiToken('bad name')).toThrow(expect.objectContaining({ code: 'GW_CONFIG_INVALID' }))
  })

  it('verify against their scrypt hash only', async () => {
    const a = await token('a', 'acme', 'service')
    const b = await token('b', 'acme', 'service')
    expect(await verifyPassword(a.entry.tokenHash, a.token)).toBe(true)
    const dir = new TokenDirectory([a.entry, b.entry])
    expect(await dir.authenticate(a.token)).toEqual(a.entry)
    expect(await dir.authenticate(b.token)).toEqual(b.entry)
    // b's secret under a's name, a token of an unknown name, something that is no token at all.
    expect(await dir.authenticate(`emq_a_${b.token.slice(-43)}`)).toBeNull()
    expect(await dir.authenticate(generateApiToken('c'))).toBeNull()
    expect(await dir.authenticate('hello')).toBeNull()
  })

  it('refuse a malformed hash in the config at start-up', () => {
    expect(() => new TokenDirectory([{ name: 'a', tenant: 't', role: 'service', tokenHash: 'scrypt$3$8$1$a$b' }]))
      .toThrow(expect.objectContaining({ code: 'GW_BAD_PASSWORD_HASH' }))
  })

  it('are a config key: names are unique, hashes look like scrypt, and their tenants exist', () => {
    const entry = { name: 'ci', tenant: 'acme', role: 'service', tokenHash: 'scrypt$1024$8$1$AAAA$AAAA' }
    const config = buildConfig({ apiTokens: [entry] })
    expect(config.apiTokens).toEqual([entry])
    expect(config.tenants).toContain('acme')
    expect(buildConfig({}).apiTokens).toEqual([])
    const bad: Array<[unknown, string]> = [
      [[entry, { ...entry, tenant: 'other' }], 'apiTokens.1.name'],
      [[{ ...entry, tokenHash: 'hunter2' }], 'apiTokens.0.tokenHash'],
      [[{ ...entry, role: 'root' }], 'apiTokens.0.role'],
      [[{ ...entry, token: 'x' }], 'apiTokens.0.token'],
      [[{ ...entry, name: 'with space' }], 'apiTokens.0.name'],
      [[{ name: 'x', tenant: 'acme', role: 'service' }], 'apiTokens.0.tokenHash'],
    ]
    for (const [apiTokens, key] of bad) {
      expect(() => buildConfig({ apiTokens }), key).toThrow(expect.objectContaining({ code: 'GW_CONFIG_INVALID', message: expect.stringContaining(key) }))
    }
  })
})

describe('API authentication', () => {
  async function setup (options: { cacheEntries?: number } = {}): Promise<{
    auth: ApiAuthenticator, tokens: Record<'acme' | 'globex' | 'admin' | 'device', string>
  }> {
    const acme = await token('acme-reader', 'acme', 'service')
    const globex = await token('globex-reader', 'globex', 'service')
    const admin = await token('acme-admin', 'acme', 'admin')
    const device = await token('dev-1', 'acme', 'device')
    const users: UserConfig[] = [{ username: 'svc', tenant: 'acme', role: 'service', password: await hashPassword('pw', FAST) }]
    const auth = new ApiAuthenticator(users, [acme.entry, globex.entry, admin.entry, device.entry], options)
    return { auth, tokens: { acme: acme.token, globex: globex.token, admin: admin.token, device: device.token } }
  }

  it('accepts a valid token as its tenant and role, and basic credentials beside it', async () => {
    const { auth, tokens } = await setup()
    expect(await auth.authenticate(bearer(tokens.acme), '10.0.0.9')).toEqual({ tenant: 'acme', role: 'service', via: 'bearer', name: 'acme-reader' })
    expect(await auth.authenticate(bearer(tokens.globex), '10.0.0.9')).toMatchObject({ tenant: 'globex', role: 'service' })
    expect(await auth.authenticate(bearer(tokens.admin), '10.0.0.9')).toMatchObject({ tenant: 'acme', role: 'admin' })
    // The scheme is case-insensitive (RFC 7235); extra spaces are tolerated.
    expect(await auth.authenticate(`bearer  ${tokens.acme}`, '10.0.0.9')).toMatchObject({ tenant: 'acme' })
    expect(await auth.authenticate(basic('svc', 'pw'), '10.0.0.9')).toEqual({ tenant: 'acme', role: 'service', via: 'basic', name: 'svc' })
  })

  it('refuses a wrong or unknown token with HTTP_BAD_TOKEN and a Bearer invalid_token challenge', async () => {
    const { auth, tokens } = await setup()
    const invalid = { code: 'HTTP_BAD_TOKEN', status: 401, challenge: 'Bearer realm="edgemq", error="invalid_token"' }
    const flipped = tokens.acme.slice(0, -1) + (tokens.acme.endsWith('A') ? 'B' : 'A')
    for (const t of [flipped, generateApiToken('acme-reader'), generateApiToken('nobody'), `emq_globex-reader_${tokens.acme.slice(-43)}`, 'abc.def']) {
      expect(await refusal(auth.authenticate(bearer(t), '10.0.0.9')), t).toEqual(invalid)
    }
  })

  it('refuses malformed Authorization headers with their codes', async () => {
    const { auth, tokens } = await setup()
    const cases: Array<[string, string]> = [
      ['Bearer', 'HTTP_BAD_TOKEN'],
      ['Bearer ', 'HTTP_BAD_TOKEN'],
      [`Bearer ${tokens.acme} extra`, 'HTTP_BAD_TOKEN'],
      [`Bearer "${tokens.acme}"`, 'HTTP_BAD_TOKEN'],
      ['Bearer a=b', 'HTTP_BAD_TOKEN'],
      [`Bearer\t${tokens.acme}`, 'HTTP_BAD_CREDENTIALS'],
      [tokens.acme, 'HTTP_BAD_CREDENTIALS'],
      [`Token ${tokens.acme}`, 'HTTP_BAD_CREDENTIALS'],
      ['Basic !!!', 'HTTP_BAD_CREDENTIALS'],
      [`Basic ${Buffer.from('no-colon').toString('base64')}`, 'HTTP_BAD_CREDENTIALS'],
      [basic('svc', 'wrong'), 'HTTP_BAD_CREDENTIALS'],
    ]
    for (const [header, code] of cases) {
      const r = await refusal(auth.authenticate(header, '127.0.0.1'))
      expect({ header, code: r.code, status: r.status }).toEqual({ header, code, status: 401 })
      // A bearer refusal says so in its challenge; the others get the server's default challenges.
      if (code === 'HTTP_BAD_TOKEN') expect(r.challenge).toMatch(/^Bearer realm="edgemq", error="invalid_token"$/)
      else expect(r.challenge).toBeUndefined()
    }
  })

  it('refuses a device-role token with 403 and an insufficient_scope challenge', async () => {
    const { auth, tokens } = await setup()
    expect(await refusal(auth.authenticate(bearer(tokens.device), '10.0.0.9')))
      .toEqual({ code: 'HTTP_FORBIDDEN', status: 403, challenge: 'Bearer realm="edgemq", error="insufficient_scope"' })
    // Cached or not, the role is checked on every request.
    expect(await refusal(auth.authenticate(bearer(tokens.device), '10.0.0.9'))).toMatchObject({ code: 'HTTP_FORBIDDEN' })
  })

  it('hashes a token once, then serves it from the cache; failures are never cached', async () => {
    const { auth, tokens } = await setup()
    await auth.authenticate(bearer(tokens.acme), '10.0.0.9')
    expect(auth.hashChecks).toBe(1)
    for (let i = 0; i < 5; i++) await auth.authenticate(bearer(tokens.acme), '10.0.0.9')
    expect(auth.hashChecks).toBe(1)
    const wrong = tokens.acme.slice(0, -2) + 'zz'
    for (let i = 0; i < 3; i++) await refusal(auth.authenticate(bearer(wrong), '10.0.0.9'))
    expect(auth.hashChecks).toBe(4)
    expect(auth.cached).toBe(1)
  })

  it('keeps the cache bounded, dropping the oldest entry first', async () => {
    const { auth, tokens } = await setup({ cacheEntries: 2 })
    await auth.authenticate(bearer(tokens.acme), '10.0.0.9')
    await auth.authenticate(bearer(tokens.globex), '10.0.0.9')
    await auth.authenticate(bearer(tokens.admin), '10.0.0.9')
    expect(auth.cached).toBe(2)
    expect(auth.hashChecks).toBe(3)
    await auth.authenticate(bearer(tokens.admin), '10.0.0.9')
    await auth.authenticate(bearer(tokens.globex), '10.0.0.9')
    expect(auth.hashChecks).toBe(3)
    await auth.authenticate(bearer(tokens.acme), '10.0.0.9') // the oldest, dropped: hashed again
    expect(auth.hashChecks).toBe(4)
  })

  it('accepts anonymous requests from loopback only while neither users nor tokens are configured', async () => {
    const open = new ApiAuthenticator([], [])
    expect(await open.authenticate(undefined, '127.0.0.1')).toEqual({ tenant: 'default', role: 'anonymous', via: 'anonymous', name: null })
    expect(await open.authenticate('', '::ffff:127.0.0.2')).toMatchObject({ tenant: 'default' })
    expect(await refusal(open.authenticate(undefined, '10.0.0.9'))).toMatchObject({ code: 'HTTP_AUTH_REQUIRED', status: 401 })
    const { entry } = await token('ci', 'acme', 'service')
    const withToken = new ApiAuthenticator([], [entry])
    expect(await refusal(withToken.authenticate(undefined, '127.0.0.1'))).toMatchObject({ code: 'HTTP_AUTH_REQUIRED', status: 401 })
    expect(isLoopbackAddress('::1')).toBe(true)
    expect(isLoopbackAddress('128.0.0.1')).toBe(false)
  })
})
