/**
 * `$share/<group>/<filter>` parsing and the store group name of a share:
 * every malformed subscription is GW_SHARE_BAD_SUBSCRIPTION, and group names
 * are valid store names that cannot collide across tenants, groups or
 * filters, and read back to the subscription.
 */
import { describe, expect, it } from 'vitest'
import { GatewayError } from '../../../../gateway/errors.ts'
import { isShareTopic, parseShareSubscription, shareGroupId, shareSubscriptionOf } from '../../../../gateway/mqtt/shared/share-topic.ts'
import { checkGroupName } from '../../../../store/validate.ts'

function codeOf (subscription: string): string | undefined {
  try {
    parseShareSubscription(subscription)
    return undefined
  } catch (err) {
    return err instanceof GatewayError ? err.code : 'not a GatewayError'
  }
}

describe('$share subscriptions', () => {
  it('recognises the $share namespace only as a whole first level', () => {
    expect(isShareTopic('$share')).toBe(true)
    expect(isShareTopic('$share/g/x')).toBe(true)
    expect(isShareTopic('$shared/g/x')).toBe(false)
    expect(isShareTopic('share/g/x')).toBe(false)
  })

  it('parses group and filter', () => {
    expect(parseShareSubscription('$share/workers/devices/+/telemetry/#')).toEqual({ group: 'workers', filter: 'devices/+/telemetry/#' })
    expect(parseShareSubscription('$share/g/#')).toEqual({ group: 'g', filter: '#' })
    expect(parseShareSubscription('$share/g//a')).toEqual({ group: 'g', filter: '/a' })
  })

  it.each([
    '$share', '$share/', '$share//devices/#', '$share/g', '$share/g/', '$share/g+/x', '$share/+/x', '$share/g#/x', '$share/#/x',
    '$share/g/a/#/b', '$share/g/a+/b', '$share/g/$share/h/x', '$share/g/$replay/earliest/#', `$share/g/${'x/'.repeat(120)}x`,
    `$share/${'g'.repeat(190)}/x`,
  ])('refuses %s with GW_SHARE_BAD_SUBSCRIPTION', (subscription) => {
    expect(codeOf(subscription)).toBe('GW_SHARE_BAD_SUBSCRIPTION')
  })

  it('names each share\'s consumer group with a valid store name that reads back, distinct per tenant, group and filter', () => {
    const cases = [
      ['acme', 'w', 'devices/+/telemetry/#'], ['globex', 'w', 'devices/+/telemetry/#'], ['acme', 'w2', 'devices/+/telemetry/#'],
      ['acme', 'w', 'devices/+/events/#'], ['acme', 'w:2B', 'x'], ['acme', 'wé', 'x'],
      ['acme', 'a.b-c_d', 'a b/ü/:x'], ['acme', 'w', '#'],
    ] as Array<[string, string, string]>
    const ids = cases.map(([tenant, group, filter]) => shareGroupId(tenant, group, filter))
    expect(new Set(ids).size).toBe(ids.length)
    ids.forEach((id, i) => {
      expect(() => checkGroupName(id)).not.toThrow()
      const [tenant, group, filter] = cases[i] as [string, string, string]
      expect(id.startsWith(`${tenant}/share/`)).toBe(true)
      expect(shareSubscriptionOf(id.slice(tenant.length + 1))).toBe(`$share/${group}/${filter}`)
    })
    expect(shareGroupId('acme', 'w', 'devices/+/telemetry/#')).toBe('acme/share/w/devices/:2B/telemetry/:23')
    // A group of the HTTP API (no "/") is never read as a share's.
    expect(shareSubscriptionOf('share')).toBeNull()
    expect(shareSubscriptionOf('billing')).toBeNull()
  })
})
