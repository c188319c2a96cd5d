/** The rule that decides whether a standby may promote itself when the primary's lease expired (election.ts), without a broker or etcd. */
import { describe, expect, it } from 'vitest'
import { promotionRefusal, type StandbyView } from '../../../gateway/replication/election.ts'

const NOW = 1_000_000
const inSync: StandbyView = { position: { history: 'h', seq: 10, epoch: 3 }, snapshotting: false, connected: false, lastContact: { at: NOW - 5000, lagMs: 0 } }
const leader = { node: 'a', epoch: 3, inSync: true }

describe('promotionRefusal', () => {
  it('lets a standby that was in sync at the primary\'s last contact, and is cut off from it, promote', () => {
    expect(promotionRefusal(inSync, leader, 2000, NOW)).toBeNull()
    expect(promotionRefusal({ ...inSync, lastContact: { at: NOW - 5000, lagMs: 2000 } }, leader, 2000, NOW)).toBeNull()
  })

  it('refuses a standby without a complete copy', () => {
    expect(promotionRefusal({ ...inSync, position: null }, leader, 2000, NOW)).toMatch(/no complete copy/)
    expect(promotionRefusal({ ...inSync, snapshotting: true }, leader, 2000, NOW)).toMatch(/no complete copy/)
  })

  it('refuses a standby that lagged more than maxLagMs at the last contact, or never heard from the primary', () => {
    expect(promotionRefusal({ ...inSync, lastContact: { at: NOW - 5000, lagMs: 2001 } }, leader, 2000, NOW)).toMatch(/2001 ms behind/)
    expect(promotionRefusal({ ...inSync, lastContact: null }, leader, 2000, NOW)).toMatch(/not heard from the primary/)
  })

  it('refuses when the primary\'s last word in etcd says out of sync, is missing, or is of another epoch', () => {
    expect(promotionRefusal(inSync, { ...leader, inSync: false }, 2000, NOW)).toMatch(/out of sync/)
    expect(promotionRefusal(inSync, null, 2000, NOW)).toMatch(/never seen in etcd/)
    expect(promotionRefusal(inSync, { ...leader, epoch: 4 }, 2000, NOW)).toMatch(/epoch 4, this copy is of epoch 3/)
  })

  it('refuses while the primary still sends to the standby (the primary lost etcd, not its life)', () => {
    expect(promotionRefusal({ ...inSync, connected: true, lastContact: { at: NOW - 100, lagMs: 0 } }, leader, 2000, NOW)).toMatch(/still sends/)
    expect(promotionRefusal({ ...inSync, connected: true, lastContact: { at: NOW - 2000, lagMs: 0 } }, leader, 2000, NOW)).toBeNull()
  })
})
