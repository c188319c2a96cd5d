import { describe, expect, it } from 'vitest'
import { ClientIdOwners, clientIdMatches, clientIdPattern, filterCovers, hashPassword, isAllowed, mayReplicate, parseHash, UserDirectory, verifyPassword, type Identity } from '../../../gateway/access/auth.ts'
import type { AclRule } from '../../../gateway/config/config.ts'

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
  it('substitutes a $ or a %c in a username or client id literally, in one pass', () => {
    expect(isAllowed([], { ...device, clientId: 'm$$1' }, 'subscribe', 'devices/m$$1/commands/#')).toBe(true)
    expect(isAllowed([], { ...device, clientId: 'm$$1' }, 'subscribe', 'devices/m$1/commands/#')).toBe(false)
    expect(isAllowed([], { ...device, clientId: '$`' }, 'publish', 'devices/devices//x')).toBe(false)
    const rules: AclRule[] = [{ role: 'device', topic: 'users/%u/#', access: 'publish', allow: true }]
    expect(isAllowed(rules, { ...device, username: 'a%c' }, 'publish', 'users/a%c/x')).toBe(true)
    expect(isAllowed(rules, { ...device, username: 'a%c' }, 'publish', 'users/adev-1/x')).toBe(false)
  })
  it('decides filter coverage', () => {
    expect(filterCovers('a/#', 'a/b/+')).toBe(true)
    expect(filterCovers('a/+', 'a/#')).toBe(false)
    expect(filterCovers('a/+/c', 'a/+/c')).toBe(true)
    expect(filterCovers('a/b/c', 'a/+/c')).toBe(false)
  })
})

describe('replicated ($dedupe/) records', () => {
  const admin: Identity = { tenant: 'acme', role: 'admin', username: 'root', clientId: 'root-1' }
  const anonymous: Identity = { tenant: 'default', role: 'anonymous', username: null, clientId: 'x' }
  it('are refused to everyone without a replicate grant, publish rights and "both" rules included', () => {
    for (const who of [device, service, admin, anonymous]) expect(mayReplicate([], who, 'devices/d/telemetry'), who.role).toBe(false)
    expect(mayReplicate([{ topic: '#', access: 'both', allow: true }], service, 'devices/d/telemetry')).toBe(false)
  })
  it('are allowed by a replicate grant, on the topics it names, never to a device', () => {
    const rules: AclRule[] = [
      { username: 'svc', topic: 'devices/#', access: 'replicate', allow: true },
      { topic: '#', access: 'replicate', allow: true },
    ]
    expect(mayReplicate(rules.slice(0, 1), service, 'devices/d/telemetry')).toBe(true)
    expect(mayReplicate(rules.slice(0, 1), service, 'alarms/d')).toBe(false)
    expect(mayReplicate(rules, device, 'devices/dev-1/telemetry')).toBe(false)
    // A replicate rule grants no plain publish.
    expect(isAllowed(rules, device, 'publish', 'alarms/x')).toBe(false)
  })
})

describe('client id binding', () => {
  it('binds a device to its username by default, and leaves services free', () => {
    expect(clientIdPattern({ username: 'line-7', tenant: 'acme', role: 'device' })).toBe('%u')
    expect(clientIdPattern({ username: 'svc', tenant: 'acme', role: 'service' })).toBeNull()
    expect(clientIdPattern({ username: 'svc', tenant: 'acme', role: 'service', clientIdPattern: 'svc-*' })).toBe('svc-*')
  })
  it('matches %u literally and * as one or more characters without / + #', () => {
    expect(clientIdMatches('%u', 'line-7', 'line-7')).toBe(true)
    expect(clientIdMatches('%u', 'line-7', 'victim-9')).toBe(false)
    expect(clientIdMatches('%u', 'line-7', 'line-7x')).toBe(false)
    expect(clientIdMatches('%u', 'line-7', '')).toBe(false)
    expect(clientIdMatches('%u', 'a.b', 'axb')).toBe(false) // regex characters in a username are literal
    expect(clientIdMatches('%u-*', 'line-7', 'line-7-sensor-3')).toBe(true)
    expect(clientIdMatches('%u-*', 'line-7', 'line-7-')).toBe(false)
    expect(clientIdMatches('%u-*', 'line-7', 'line-7-a/b')).toBe(false)
    expect(clientIdMatches('%u-*', 'line-7', 'line-8-a')).toBe(false)
    expect(clientIdMatches('plant-*.(x)', 'u', 'plant-3.(x)')).toBe(true)
  })
})

describe('client ids owned by bound users', () => {
  const owners = new ClientIdOwners([
    { username: 'line-7', tenant: 'acme', role: 'device' },
    { username: 'fleet', tenant: 'acme', role: 'device', clientIdPattern: 'fleet-*' },
    { username: 'historian', tenant: 'acme', role: 'service', clientIdPattern: 'historian' },
    { username: 'ops', tenant: 'acme', role: 'service' },
  ])
  it('owns each bound user\'s ids in its tenant only; an unbound service owns none', () => {
    expect(['line-7', 'fleet-3', 'historian'].map((id) => owners.owned('acme', id))).toEqual([true, true, true])
    expect(['ops', 'fleet-', 'line-7x', ''].map((id) => owners.owned('acme', id))).toEqual([false, false, false, false])
    expect(owners.owned('globex', 'line-7')).toBe(false)
    expect(owners.owned('default', 'fleet-3')).toBe(false)
  })
})
