/**
 * `$share/<group>/<filter>`: shared subscriptions for MQTT 5 clients
 * [MQTT-4.8.2] and for MQTT 3.1.1 clients, as Mosquitto, EMQX and HiveMQ
 * accept them. A shared subscription is named by its group AND its filter:
 * `$share/g/a/#` and `$share/g/b/#` are two shares, as in MQTT 5.
 *
 * The durable part of a share is a consumer group of the log, named
 *
 *     <tenant>/share/<group>/<filter>
 *
 * with every character outside `A-Z a-z 0-9 . _ -` of the group, and outside
 * those and `/` of the filter, written as `:` and two hex digits per UTF-8
 * byte (`devices/+/telemetry/#` → `devices/:2B/telemetry/:23`), since the
 * store's group names are letters, digits and `. _ : / -`. The name cannot
 * collide with a group of the HTTP API (those have no `/` after the tenant),
 * with the bridge's (`bridge.<upstream>`, no tenant), or with another
 * tenant's (the tenant comes first). Pure; tested without a broker.
 */
import { topicFilterProblem } from '../../access/topics.ts'
import { GatewayError } from '../../errors.ts'

export const SHARE_LEVEL = '$share'
/** The level between the tenant and the share's group in the store's group name. */
export const SHARE_GROUP_LEVEL = 'share'
/** The store's limit on a group name (store/validate.ts), and the longest tenant name (a stream's tenant part) within it. */
const MAX_GROUP_ID = 200
const MAX_TENANT = 64

const USAGE = 'expected $share/<group>/<topic filter>, e.g. $share/workers/devices/+/telemetry/#'

export interface ShareRequest {
  /** The share's name, as the client wrote it. */
  readonly group: string
  /** The topic filter the share's members receive (inside the client's tenant). */
  readonly filter: string
}

/** Whether a filter is in the shared-subscription namespace (`$share` or `$share/...`). */
export function isShareTopic (topic: string): boolean {
  return topic.startsWith(SHARE_LEVEL) && (topic.length === SHARE_LEVEL.length || topic[SHARE_LEVEL.length] === '/')
}

/**
 * Reads a `$share/<group>/<filter>` subscription. The group is non-empty and
 * holds no `/`, `+` or `#` [MQTT-4.8.2-1, -2]; the filter is a valid topic
 * filter that is not itself a `$share` or `$replay` one. Throws
 * GW_SHARE_BAD_SUBSCRIPTION.
 */
export function parseShareSubscription (subscription: string): ShareRequest {
  const bad = (why: string): GatewayError => new GatewayError('GW_SHARE_BAD_SUBSCRIPTION', `${JSON.stringify(subscription)}: ${why}; ${USAGE}`)
  if (!isShareTopic(subscription)) throw bad('not a shared subscription')
  const rest = subscription.slice(SHARE_LEVEL.length + 1)
  const slash = rest.indexOf('/')
  const group = slash === -1 ? rest : rest.slice(0, slash)
  if (group === '') throw bad('the group name is empty')
  if (group.includes('+') || group.includes('#')) throw bad('the group name cannot hold a wildcard')
  if (slash === -1 || slash === rest.length - 1) throw bad('no topic filter after the group name')
  const filter = rest.slice(slash + 1)
  const problem = topicFilterProblem(filter)
  if (problem !== null) throw bad(`topic filter ${JSON.stringify(filter)}: ${problem}`)
  if (filter.startsWith('$share/') || filter === '$share' || filter.startsWith('$replay/') || filter === '$replay') {
    throw bad('the filter of a share cannot be a $share or $replay subscription')
  }
  // The same limit in every tenant: the group name counts as if the tenant's name were as long as one may be.
  if (MAX_TENANT + shareGroupId('', group, filter).length > MAX_GROUP_ID) throw bad('group and filter too long for a consumer group name')
  return { group, filter }
}

const PLAIN = /[A-Za-z0-9._-]/

function escape (text: string, keepSlash: boolean): string {
  let out = ''
  for (const ch of text) {
    if (PLAIN.test(ch) || (keepSlash && ch === '/')) { out += ch; continue }
    for (const byte of Buffer.from(ch, 'utf8')) out += `:${byte.toString(16).toUpperCase().padStart(2, '0')}`
  }
  return out
}

/** The store's consumer group of a share in `tenant` (see the header). */
export function shareGroupId (tenant: string, group: string, filter: string): string {
  return `${tenant}/${SHARE_GROUP_LEVEL}/${escape(group, false)}/${escape(filter, true)}`
}

function unescape (text: string): string {
  const bytes: number[] = []
  for (let i = 0; i < text.length; i++) {
    if (text[i] === ':') { bytes.push(parseInt(text.slice(i + 1, i + 3), 16)); i += 2 } else bytes.push(text.charCodeAt(i))
  }
  return Buffer.from(bytes).toString('utf8')
}

/**
 * The subscription (`$share/<group>/<filter>`) of a tenant group name as
 * the HTTP API lists it (`share/<group>/<filter>`, escaped); null when the
 * name is not a share's.
 */
export function shareSubscriptionOf (tenantGroup: string): string | null {
  const prefix = `${SHARE_GROUP_LEVEL}/`
  if (!tenantGroup.startsWith(prefix)) return null
  const rest = tenantGroup.slice(prefix.length)
  const slash = rest.indexOf('/')
  if (slash <= 0) return null
  return `${SHARE_LEVEL}/${unescape(rest.slice(0, slash))}/${unescape(rest.slice(slash + 1))}`
}
