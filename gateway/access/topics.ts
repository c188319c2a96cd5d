/**
 * MQTT topic rules: the one filter matcher every part of the gateway uses,
 * validation of topic names and filters, and the tenant mount point that
 * isolates tenants.
 *
 * Tenants: every topic a client uses is prefixed inside the broker with its
 * tenant (`<tenant>/<topic>`), and the prefix is removed again on the way out,
 * so a client can neither publish into nor subscribe to another tenant's
 * topics whatever filter it sends — as EMQX's and VerneMQ's mount points do.
 */

import { createRequire } from 'node:module'
// The bridge validates the filters of its config with the same rule; it owns it, since it may not import the gateway.
import { filterProblem } from '../../bridge/index.ts'

/**
 * The longest topic, in levels, that aedes accepts (its maxTopicLevels ceiling, which is also the default max_words
 * of the qlobber tries inside mqemitter and aedes-persistence).
 */
export const MAX_TOPIC_LEVELS = 100

/**
 * The longest topic name or filter, in levels, a client may use: inside the broker every topic gains one level, its
 * tenant (mountTopic), and a mounted topic over MAX_TOPIC_LEVELS makes aedes close the connection ("topic has too
 * many levels", after the record was appended) and qlobber throw in the session store. Refused up front instead,
 * with a reason the client sees (a refused publish, SUBACK 0x80).
 */
export const MAX_CLIENT_TOPIC_LEVELS = MAX_TOPIC_LEVELS - 1

/** qlobber's options, as its constructor reads them. qlobber ships no types. */
export interface QlobberOptions {
  readonly separator: string
  readonly wildcard_one: string
  readonly wildcard_some: string
  /** `+` also matches an empty level: `sport/+` matches `sport/` [MQTT-4.7.1-3]. qlobber's default is false. */
  readonly match_empty_levels: boolean
  readonly max_words: number
}

/**
 * The one configuration of the MQTT topic matcher. Every matcher of the gateway is a qlobber trie built with it: the
 * routes, the ACL, commands and replays (topicMatches), HTTP record filters (compileTopicFilters), and the session
 * store's offline queues and retained messages (sessions/persistence.ts). aedes' live routing is mqemitter's qlobber,
 * which aedes builds with `matchEmptyLevels: true` (aedes.js), the same rule; the integration test
 * test/gateway/topic-matching.int.test.ts pins that a subscription receives the same topics live and offline.
 * qlobber does not know the `$` rule [MQTT-4.7.2-1]: aedes applies it to live routing, compileTopicFilters here.
 */
export const QLOBBER_OPTIONS: QlobberOptions = Object.freeze({
  separator: '/', wildcard_one: '+', wildcard_some: '#', match_empty_levels: true, max_words: MAX_TOPIC_LEVELS,
})

interface QlobberTrue {
  add (filter: string): unknown
  test (topic: string): boolean
}
const require = createRequire(import.meta.url)
const { QlobberTrue: QlobberTrueClass } = require('qlobber') as { QlobberTrue: new (options: QlobberOptions) => QlobberTrue }

function levelCount (topic: string): number {
  let n = 1
  for (let i = topic.indexOf('/'); i !== -1; i = topic.indexOf('/', i + 1)) n++
  return n
}

function startsWithWildcard (filter: string): boolean {
  return filter.startsWith('+') || filter.startsWith('#')
}

/**
 * Many (valid) MQTT topic filters compiled into one predicate that holds when a topic matches at least one of them:
 * one trie walk per topic, where testing each filter in turn split the topic once per filter (22 million splits for
 * a thousand filters over 20,000 records). [MQTT-4.7.1] `+` matches exactly one level, an empty one too; `#` the
 * rest, including the parent level (`sport/#` matches `sport`); [MQTT-4.7.2-1] a filter starting with a wildcard
 * matches no topic starting with `$`.
 *
 * No topic longer than MAX_TOPIC_LEVELS enters the gateway (aedes refuses it), and qlobber throws on one: such a
 * topic matches nothing here, and a longer filter is cut to what it can match of a topic within the bound.
 */
export function compileTopicFilters (filters: readonly string[]): (topic: string) => boolean {
  const all = new QlobberTrueClass(QLOBBER_OPTIONS)
  const dollar = new QlobberTrueClass(QLOBBER_OPTIONS) // the filters a `$` topic can match
  for (const filter of filters) {
    const levels = levelCount(filter)
    if (levels > MAX_TOPIC_LEVELS + 1 || (levels === MAX_TOPIC_LEVELS + 1 && !filter.endsWith('/#'))) continue
    // `<100 levels>/#` still matches the 100-level topic it starts with.
    const bounded = levels > MAX_TOPIC_LEVELS ? filter.slice(0, -2) : filter
    all.add(bounded)
    if (!startsWithWildcard(filter)) dollar.add(bounded)
  }
  return (topic) => levelCount(topic) <= MAX_TOPIC_LEVELS && (topic.startsWith('$') ? dollar : all).test(topic)
}

// topicMatches is called with few distinct filters (routes, ACL patterns, a replay's filter, subscriptions), each
// compiled once; the cache is emptied when full, so a client cycling through filters only costs recompiling.
const compiled = new Map<string, (topic: string) => boolean>()
const COMPILED_MAX = 10_000

/** Whether the topic matches the (valid) filter, by the rules of compileTopicFilters. */
export function topicMatches (filter: string, topic: string): boolean {
  let matches = compiled.get(filter)
  if (matches === undefined) {
    if (compiled.size >= COMPILED_MAX) compiled.clear()
    compiled.set(filter, matches = compileTopicFilters([filter]))
  }
  return matches(topic)
}

/**
 * [MQTT-4.7.2-1] for the broker's deliveries. Inside aedes every topic is mounted under its tenant, so the `$` rule
 * that aedes (and qlobber) would apply at the first level never sees a client's `$` topic, and a mounted `acme/#`
 * matches `acme/$SYS/x`. A client gets an (unmounted) `$` topic only when one of its (mounted) subscriptions
 * matches it by the spec's rules.
 */
export function dollarTopicSubscribed (tenant: string, mountedFilters: Iterable<string>, topic: string): boolean {
  for (const mounted of mountedFilters) {
    const filter = unmountTopic(tenant, mounted)
    if (filter !== null && topicMatches(filter, topic)) return true
  }
  return false
}

/** Why a PUBLISH topic name is invalid, or null. [MQTT-3.3.2-2] no wildcards; [MQTT-1.5.3-2] no U+0000. */
export function topicNameProblem (topic: string): string | null {
  if (topic.length === 0) return 'empty topic'
  if (topic.includes('\u0000')) return 'topic contains U+0000'
  if (topic.includes('+') || topic.includes('#')) return 'wildcards are not allowed in a PUBLISH topic'
  if (Buffer.byteLength(topic, 'utf8') > 65535) return 'topic longer than 65535 bytes'
  if (levelCount(topic) > MAX_CLIENT_TOPIC_LEVELS) return `topic has more than ${MAX_CLIENT_TOPIC_LEVELS} levels`
  return null
}

/** Why a SUBSCRIBE topic filter is invalid, or null. [MQTT-4.7.1-2] `#` last and alone; [MQTT-4.7.1-3] `+` alone in its level. */
export function topicFilterProblem (filter: string): string | null {
  const problem = filterProblem(filter)
  if (problem !== null) return problem
  return levelCount(filter) > MAX_CLIENT_TOPIC_LEVELS ? `filter has more than ${MAX_CLIENT_TOPIC_LEVELS} levels` : null
}

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

/** The client's own id from aedes' (scopedClientId's inverse); null when the id is another tenant's. */
export function unscopedClientId (tenant: string, scoped: string): string | null {
  if (tenant === 'default') return scoped.includes('\u0000') ? null : scoped
  return scoped.startsWith(`${tenant}\u0000`) ? scoped.slice(tenant.length + 1) : null
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
