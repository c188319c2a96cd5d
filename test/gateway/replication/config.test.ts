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
    expect(replication).toEqual({ role: 'none', listen: '127.0.0.1:7883', peer: '', acks: 'local', maxLagMs: 2000, onStandbyLost: 'block', backlogBytes: 64 * 1024 * 1024 })
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
})
