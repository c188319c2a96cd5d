import { describe, expect, it } from 'vitest'
import { filterCovers, hashPassword, isAllowed, parseHash, UserDirectory, verifyPassword, type Identity } from '../../gateway/auth.ts'
import type { AclRule } from '../../gateway/config.ts'

const device: Identity = { tenant: 'acme', role: 'device', username: 'd1', clientId: 'dev-1' }
const service: Identity = { tenant: 'acme', role: 'service', username: 'svc', clientId: 'svc-1' }

describe('passwords', () => {
  it('hashes with scrypt and verifies in constant time', async () => {
    const hash = await hashPassword('s3cret', { N: 1024, r: 8, p: 1 })
    expect(hash).toMatch(/^scrypt\$1024\$8\$1\$/)
    expect(await verifyPassword(hash, 's3cret')).toBe(true)
    expect(await verifyPassword(hash, Buffer.from('s3cret'))).toBe(true)
    expect(await verifyPassword(hash, 'wrong')).toBe(false)
    expect(await hashPassword('s3cret', { N: 1024, r: 8, p: 1 })).not.toBe(hash)
  })
  it('rejects malformed hashes with GW_BAD_PASSWORD_HASH', () => {
    for (const bad of ['plain', 'scrypt$3$8$1$a$b', 'scrypt$1024$8$1$salt$', 'bcrypt$1$2$3$4$5']) {
      expect(() => parseHash(bad), bad).toThrow(expect.objectContaining({ code: 'GW_BAD_PASSWORD_HASH' }))
    }
  })
  it('authenticates known users only', async () => {
    const dir = new UserDirectory([{ username: 'd1', tenant: 'acme', role: 'device', password: await hashPassword('pw', { N: 1024, r: 8, p: 1 }) }])
    expect(await dir.authenticate('d1', Buffer.from('pw'))).toMatchObject({ tenant: 'acme' })
    expect(await dir.authenticate('d1', Buffer.from('nope'))).toBeNull()
    expect(await dir.authenticate('ghost', Buffer.from('pw'))).toBeNull()
    expect(await dir.authenticate('d1', undefined)).toBeNull()
  })
})

describe('ACL', () => {
  it('lets a device publish under its own client id and subscribe to its own commands only', () => {
    expect(isAllowed([], device, 'publish', 'devices/dev-1/telemetry/t')).toBe(true)
    expect(isAllowed([], device, 'publish', 'devices/dev-2/telemetry/t')).toBe(false)
    expect(isAllowed([], device, 'subscribe', 'devices/dev-1/commands/#')).toBe(true)
    expect(isAllowed([], device, 'subscribe', 'devices/+/commands/#')).toBe(false)
    expect(isAllowed([], device, 'subscribe', '#')).toBe(false)
  })
  it('lets services use every topic of their tenant', () => {
    expect(isAllowed([], service, 'subscribe', 'devices/+/telemetry/#')).toBe(true)
    expect(isAllowed([], service, 'publish', 'devices/dev-9/commands/x')).toBe(true)
  })
  it('applies configured rules first, with %u and %c substitution, deny included', () => {
    const rules: AclRule[] = [
      { role: 'device', topic: 'users/%u/#', access: 'publish', allow: true },
      { username: 'svc', topic: 'secret/#', access: 'both', allow: false },
    ]
    expect(isAllowed(rules, device, 'publish', 'users/d1/x')).toBe(true)
    expect(isAllowed(rules, device, 'publish', 'users/d2/x')).toBe(false)
    expect(isAllowed(rules, service, 'subscribe', 'secret/#')).toBe(false)
    expect(isAllowed(rules, service, 'subscribe', 'secret/a')).toBe(false)
    expect(isAllowed(rules, service, 'publish', 'open/a')).toBe(true)
  })
  it('does not let wildcards in a client id widen a rule', () => {
    const sneaky: Identity = { ...device, clientId: '#' }
    expect(isAllowed([], sneaky, 'subscribe', 'devices/#')).toBe(false)
    expect(isAllowed([], { ...device, clientId: 'a/b' }, 'publish', 'devices/a/b/x')).toBe(false)
  })
  it('decides filter coverage', () => {
    expect(filterCovers('a/#', 'a/b/+')).toBe(true)
    expect(filterCovers('a/+', 'a/#')).toBe(false)
    expect(filterCovers('a/+/c', 'a/+/c')).toBe(true)
    expect(filterCovers('a/b/c', 'a/+/c')).toBe(false)
  })
})
