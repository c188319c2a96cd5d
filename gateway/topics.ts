/**
 * MQTT topic rules as pure functions: filter matching, validation of topic
 * names and filters, and the tenant mount point that isolates tenants.
 *
 * Tenants: every topic a client uses is prefixed inside the broker with its
 * tenant (`<tenant>/<topic>`), and the prefix is removed again on the way out,
 * so a client can neither publish into nor subscribe to another tenant's
 * topics whatever filter it sends — as EMQX's and VerneMQ's mount points do.
 */

// The bridge validates the filters of its config with the same rule; it owns it, since it may not import the gateway.
import { filterProblem } from '../bridge/topic-template.ts'

/** [MQTT-4.7.1] `+` matches one level, `#` the rest (including the parent level); `$` topics are not matched by leading wildcards [MQTT-4.7.2-1]. */
export function topicMatches (filter: string, topic: string): boolean {
  if (topic.startsWith('$') && (filter.startsWith('+') || filter.startsWith('#'))) return false
  const f = filter.split('/')
  const t = topic.split('/')
  for (let i = 0; i < f.length; i++) {
    const level = f[i] as string
    if (level === '#') return true
    if (i >= t.length) return false
    if (level !== '+' && level !== t[i]) return false
  }
  return f.length === t.length
}

/** Why a PUBLISH topic name is invalid, or null. [MQTT-3.3.2-2] no wildcards; [MQTT-1.5.3-2] no U+0000. */
export function topicNameProblem (topic: string): string | null {
  if (topic.length === 0) return 'empty topic'
  if (topic.includes('\u0000')) return 'topic contains U+0000'
  if (topic.includes('+') || topic.includes('#')) return 'wildcards are not allowed in a PUBLISH topic'
  if (Buffer.byteLength(topic, 'utf8') > 65535) return 'topic longer than 65535 bytes'
  return null
}

/** Why a SUBSCRIBE topic filter is invalid, or null. [MQTT-4.7.1-2] `#` last and alone; [MQTT-4.7.1-3] `+` alone in its level. */
export const topicFilterProblem: (filter: string) => string | null = filterProblem

export function mountTopic (tenant: string, topic: string): string {
  return `${tenant}/${topic}`
}

/**
 * The client id aedes knows a client by: scoped by its tenant, since aedes keys session takeover, stored
 * subscriptions and offline queues by it. U+0000 is refused in client ids, so a scoped id never equals another
 * tenant's (or tenant "default"'s unscoped) id.
 */
export function scopedClientId (tenant: string, clientId: string): string {
  return tenant === 'default' ? clientId : `${tenant}\u0000${clientId}`
}

/** Removes the tenant prefix; null when the topic is not inside the tenant. */
export function unmountTopic (tenant: string, topic: string): string | null {
  return topic.startsWith(`${tenant}/`) ? topic.slice(tenant.length + 1) : null
}

/**
 * Whether some topic name matches both filters (a route's and a subscription's). Conservative about the `$` rule
 * [MQTT-4.7.2-1]: it may say yes where only `$` topics would match both, never no where a topic matches both.
 */
export function filtersOverlap (a: string, b: string): boolean {
  const x = a.split('/')
  const y = b.split('/')
  for (let i = 0; ; i++) {
    const l = x[i]
    const r = y[i]
    if (l === '#' || r === '#') return true
    // A `#` left in the longer one (which also matches the parent level) was caught above.
    if (l === undefined || r === undefined) return l === r
    if (l !== '+' && r !== '+' && l !== r) return false
  }
}
