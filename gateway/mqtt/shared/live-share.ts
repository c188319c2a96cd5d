/**
 * The live part of a shared subscription: messages on topics that no route
 * sends to the log. aedes routes each matching PUBLISH to one deliver
 * function per share (a subscription of the share's mounted filter on the
 * broker, `broker.subscribe`, aedes' public API); it hands the message to the
 * next connected member in turn that may read it, through aedes' own client
 * delivery (`client.publish`: authorizeForward unmounts the topic and holds
 * the ACL; a persistent member's session queue keeps it like any of its
 * messages). Not durable: a message published while no member is connected
 * is not kept for the share. Routed topics are skipped here: the share's log
 * part delivers them (share-groups.ts).
 */
import type { Aedes, PublishPacket } from 'aedes'
import { isAllowed } from '../../access/auth.ts'
import { mountTopic, unmountTopic } from '../../access/topics.ts'
import type { AclRule } from '../../config/config.ts'
import type { Router } from '../routing.ts'
import type { Member } from './lane.ts'

type Deliver = (packet: PublishPacket, cb: () => void) => void
/** What aedes keeps of an MQTT 5 PUBLISH besides its properties: when its Message Expiry Interval runs out (ms). */
type LivePacket = PublishPacket & { messageExpiry?: number }

/**
 * An MQTT 5 member gets the publisher's properties [MQTT-3.3.2-17, -18 ...] with its own Subscription Identifier
 * [MQTT-3.3.4-3], and the expiry aedes tracks; an MQTT 3.1.1 member none.
 */
function v5 (packet: LivePacket, member: Member): Partial<LivePacket> {
  if (member.conn.mqtt5 !== true) return {}
  const properties = { ...packet.properties, subscriptionIdentifier: member.subscriptionId }
  if (properties.subscriptionIdentifier === undefined) delete properties.subscriptionIdentifier
  return { properties, ...(packet.messageExpiry === undefined ? {} : { messageExpiry: packet.messageExpiry }) }
}

export interface LiveShareDeps {
  readonly broker: Aedes
  readonly acl: readonly AclRule[]
  readonly route: Router
  readonly tenant: string
  readonly filter: string
  /** The share's members, in join order (the share keeps the list). */
  readonly members: readonly Member[]
  /** Counts a message handed to a member. */
  readonly delivered: () => void
}

export class LiveShare {
  readonly #deps: LiveShareDeps
  #turn = 0
  #deliver: Deliver | null = null

  constructor (deps: LiveShareDeps) {
    this.#deps = deps
  }

  /** Starts receiving the share's messages from aedes (with its first member). */
  start (): void {
    if (this.#deliver !== null) return
    const { tenant, filter, route, broker } = this.#deps
    const wildcardFirst = filter.startsWith('+') || filter.startsWith('#')
    this.#deliver = (packet, cb) => {
      const topic = unmountTopic(tenant, packet.topic)
      // [MQTT-4.7.2-1] a filter starting with a wildcard matches no `$` topic.
      if (topic === null || route(topic) !== null || (wildcardFirst && topic.startsWith('$'))) return cb()
      const member = this.#next(topic)
      if (member === undefined) return cb()
      this.#deps.delivered()
      const qos = Math.min(member.qos, packet.qos) as 0 | 1
      member.client.publish({ cmd: 'publish', topic: packet.topic, payload: packet.payload, qos, retain: false, dup: false, ...v5(packet, member) },
        () => cb())
    }
    broker.subscribe(mountTopic(tenant, filter), this.#deliver as never, () => {})
  }

  /** Stops (when the last member left). */
  stop (): void {
    if (this.#deliver === null) return
    this.#deps.broker.unsubscribe(mountTopic(this.#deps.tenant, this.#deps.filter), this.#deliver as never, () => {})
    this.#deliver = null
  }

  /** The next member in turn that is connected and may read the topic. */
  #next (topic: string): Member | undefined {
    const { members, acl } = this.#deps
    const n = members.length
    for (let k = 0; k < n; k++) {
      const m = members[(this.#turn++) % n] as Member
      if (!m.gone && isAllowed(acl, m.who, 'subscribe', topic)) return m
    }
    return undefined
  }
}
