/**
 * The settings `edgemq start` warns about or refuses, without starting a
 * gateway (startup.int.test.ts reads the same warnings from a real start).
 */
import { describe, expect, it } from 'vitest'
import { hashPassword } from '../../../gateway/access/auth.ts'
import { buildConfig } from '../../../gateway/config/config.ts'
import { checkStartupSettings } from '../../../gateway/config/startup-checks.ts'

const codes = (config: Record<string, unknown>): string[] => checkStartupSettings(buildConfig({ gatewayId: 'gw', ...config })).map((w) => w.code)

describe('startup checks', () => {
  it('say nothing about the defaults, nor about a hash edgemq passwd printed', async () => {
    expect(codes({})).toEqual([])
    const password = await hashPassword('pw')
    expect(codes({ users: [{ username: 'a', tenant: 't', role: 'device', password }] })).toEqual([])
  })

  it('warn once per weak setting', async () => {
    const weak = await hashPassword('pw', { N: 1024, r: 8, p: 1 })
    const tiny = await hashPassword('pw', { N: 16384, r: 1, p: 1 })
    expect(codes({
      store: { durability: 'async' },
      users: [{ username: 'a', tenant: 't', role: 'device', password: weak }],
      apiTokens: [{ name: 'ci', tenant: 't', role: 'service', tokenHash: tiny }],
    })).toEqual(['GW_WARN_ASYNC_DURABILITY', 'GW_WARN_WEAK_HASH'])
  })

  it('warn about HTTP on the network only when nothing there asks for credentials', async () => {
    expect(codes({ http: { host: '0.0.0.0' } })).toEqual(['GW_WARN_OPEN_HTTP'])
    expect(codes({ http: { host: '::1' } })).toEqual([])
    const password = await hashPassword('pw')
    expect(codes({ http: { host: '0.0.0.0' }, users: [{ username: 'a', tenant: 't', role: 'service', password }] })).toEqual([])
  })

  it('refuse hashes that can never match: placeholders, a salt or digest that is not base64, a digest of the wrong length', () => {
    for (const password of ['scrypt$16384$8$1$...$...', 'scrypt$16384$8$1$c2FsdA==$aGFzaA==', 'scrypt$16384$8$1$$AAAA', 'scrypt$16384$8$0$c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=']) {
      expect(() => checkStartupSettings(buildConfig({ users: [{ username: 'a', tenant: 't', role: 'device', password }] })), password)
        .toThrow(expect.objectContaining({ code: 'GW_BAD_PASSWORD_HASH' }))
    }
  })

  it('a clear-text password is a config error that says to run edgemq passwd', () => {
    expect(() => buildConfig({ users: [{ username: 'a', tenant: 't', role: 'device', password: 'hunter2' }] }))
      .toThrow(expect.objectContaining({ code: 'GW_CONFIG_INVALID', message: expect.stringContaining('edgemq passwd') }))
  })
})
