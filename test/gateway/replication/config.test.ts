/** The replication slice of the config: defaults, and each bad input refused with GW_CONFIG_INVALID naming the key. */
import { describe, expect, it } from 'vitest'
import { buildConfig } from '../../../gateway/config/config.ts'

function refused (replication: unknown): string {
  try {
    buildConfig({ replication })
  } catch (err) {
    expect((err as { code: string }).code).toBe('GW_CONFIG_INVALID')
    return (err as Error).message
  }
  throw new Error('accepted')
}

describe('replication config', () => {
  it('defaults to no replication, local acks and block', () => {
    const { replication } = buildConfig({})
    expect(replication).toEqual({
      role: 'none', listen: '127.0.0.1:7883', peer: '', acks: 'local', maxLagMs: 2000, silenceMs: 5000, onStandbyLost: 'block', backlogBytes: 64 * 1024 * 1024, catchUpBytes: 256 * 1024 * 1024, coordination: {},
    })
  })

  it('takes a primary and a standby naming each other', () => {
    expect(buildConfig({ replication: { role: 'primary', listen: '0.0.0.0:7883', peer: '10.0.0.2:7883', acks: 'replicated' } }).replication.acks).toBe('replicated')
    expect(buildConfig({ replication: { role: 'standby', listen: '[::1]:7883', peer: '10.0.0.1:7883' } }).replication.role).toBe('standby')
  })

  it('refuses bad input with a message that names the key', () => {
    expect(refused({ role: 'standby' })).toMatch(/"replication.peer" is required for a standby/)
    expect(refused({ role: 'standby', peer: 'nohost' })).toMatch(/"replication.peer" must be host:port/)
    expect(refused({ role: 'standby', peer: '10.0.0.1:0' })).toMatch(/needs the primary's port/)
    expect(refused({ role: 'primary', listen: '127.0.0.1:99999' })).toMatch(/"replication.listen" must be host:port/)
    expect(refused({ role: 'primary', peer: 'a b:1' })).toMatch(/"replication.peer" must be host:port/)
    expect(refused({ role: 'standby', peer: '10.0.0.1:7883', acks: 'replicated' })).toMatch(/"replication.acks" replicated needs replication.role primary/)
    expect(refused({ role: 'leader' })).toMatch(/"replication.role" must be one of "none", "primary", "standby"/)
    expect(refused({ acks: 'all' })).toMatch(/"replication.acks" must be one of/)
    expect(refused({ onStandbyLost: 'panic' })).toMatch(/"replication.onStandbyLost" must be one of/)
    expect(refused({ maxLagMs: 1 })).toMatch(/"replication.maxLagMs"/)
    expect(refused({ role: 'primary', lease: 'etcd' })).toMatch(/unknown key "replication.lease"/)
  })

  describe('coordination (etcd lease)', () => {
    const standby = { role: 'standby', peer: '10.0.0.1:7883' }
    const etcd = (o: Record<string, unknown>): unknown => ({ ...standby, coordination: { etcd: { endpoints: ['http://10.0.0.3:2379'], ...o } } })

    it('is off by default and takes endpoints, a TTL in whole seconds and a prefix', () => {
      expect(buildConfig({ replication: standby }).replication.coordination).toEqual({})
      const { coordination } = buildConfig({ replication: etcd({}) }).replication
      expect(coordination.etcd).toEqual({ endpoints: ['http://10.0.0.3:2379'], leaseTtlMs: 5000, prefix: '/edgemq' })
      const c = buildConfig({ replication: etcd({ endpoints: ['https://[::1]:2379', 'http://e2:2379'], leaseTtlMs: 3000, prefix: '/site/a' }) })
      expect(c.replication.coordination.etcd?.leaseTtlMs).toBe(3000)
    })

    it('refuses bad input with a message that names the key', () => {
      expect(refused(etcd({ endpoints: [] }))).toMatch(/"replication.coordination.etcd.endpoints" must NOT have fewer than 1 items/)
      expect(refused({ ...standby, coordination: { etcd: {} } })).toMatch(/missing key "replication.coordination.etcd.endpoints"/)
      expect(refused(etcd({ endpoints: ['10.0.0.3:2379'] }))).toMatch(/"replication.coordination.etcd.endpoints" must be http\(s\):\/\/host:port/)
      expect(refused(etcd({ endpoints: ['http://10.0.0.3'] }))).toMatch(/"replication.coordination.etcd.endpoints" must be http/)
      expect(refused(etcd({ leaseTtlMs: 1000 }))).toMatch(/"replication.coordination.etcd.leaseTtlMs" must be >= 2000/)
      expect(refused(etcd({ leaseTtlMs: 2500 }))).toMatch(/"replication.coordination.etcd.leaseTtlMs" must be multiple of 1000/)
      expect(refused(etcd({ prefix: 'edgemq' }))).toMatch(/"replication.coordination.etcd.prefix" must match pattern/)
      expect(refused({ ...standby, coordination: { zookeeper: {} } })).toMatch(/unknown key "replication.coordination.zookeeper"/)
      expect(refused({ coordination: { etcd: { endpoints: ['http://e:2379'] } } })).toMatch(/"replication.coordination" needs replication.role primary or/)
    })
  })
})
