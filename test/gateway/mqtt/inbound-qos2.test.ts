/**
 * What InboundQos2 delivers again when a QoS 2 PUBLISH comes again for an
 * entry a gateway process that died stored (inbound-qos2.ts header), against
 * a session persistence kept in memory: the entry as it reads from disk after
 * a restart. The crash itself is in qos2-crash-redelivery.int.test.ts.
 */
import type { Client, PublishPacket } from 'aedes'
import { describe, expect, it } from 'vitest'
import { InboundQos2, type Qos2Persistence } from '../../../gateway/mqtt/inbound-qos2.ts'
import { logPositionOf, type LogPosition } from '../../../gateway/mqtt/log-position.ts'
import { noteQueuedCopy } from '../../../gateway/mqtt/queued-copies.ts'
import type { IncomingFields } from '../../../gateway/mqtt/sessions/format.ts'
import type { SessionPacket } from '../../../gateway/mqtt/sessions/persistence.ts'

const client = { id: 'device-1' } as unknown as Client
const POSITION: LogPosition = { stream: 'default/telemetry', partition: 3, offset: 41 }

/** One stored entry (messageId 7) as a restarted gateway loads it, and what the wrapper asked of the persistence. */
function restartedPersistence (entry: IncomingFields): Qos2Persistence & { marked: number[] } {
  const entries = new Map<number, SessionPacket & IncomingFields>([[7, { cmd: 'publish', topic: 'default/devices/d/telemetry', qos: 2, messageId: 7, ...entry }]])
  const marked: number[] = []
  return {
    marked,
    async incomingStorePacket () {},
    async incomingStorePacketWith (_client, _packet, write) { return await write([]) },
    async incomingGetPacket (_client, packet) {
      const stored = entries.get(packet.messageId as number)
      if (stored === undefined) throw new Error('not found')
      return { ...stored }
    },
    async incomingMarkDelivered (_client, messageId) { marked.push(messageId) },
    async incomingDelPacket () {},
    async cleanIncoming () {},
    hasIncomingPacket: (_client, messageId) => entries.has(messageId),
    incomingCount: () => entries.size,
  }
}

/** The device's retransmission (DUP) of messageId 7; resolves with the log positions the deliveries saw, one per delivery. */
async function retransmit (persistence: Qos2Persistence, options: { queuesCopy?: boolean } = {}): Promise<Array<LogPosition | undefined>> {
  const inbound = new InboundQos2(persistence, 0)
  const packet = { cmd: 'publish', topic: 'devices/d/telemetry', payload: Buffer.from('m1'), qos: 2, messageId: 7, dup: true, retain: false } as PublishPacket
  const seen: Array<LogPosition | undefined> = []
  const deliver = async (): Promise<void> => {
    seen.push(logPositionOf(packet))
    if (options.queuesCopy === true) noteQueuedCopy(packet)
  }
  expect(inbound.begin(client, packet, { deliver })).toBe('duplicate')
  await persistence.incomingGetPacket(client, packet as unknown as SessionPacket)
  // A second retransmission on the same connection (the device did not get this PUBREC either) delivers nothing more.
  const again = { ...packet, payload: Buffer.from('m1') } as PublishPacket
  expect(inbound.begin(client, again, { deliver })).toBe('duplicate')
  await persistence.incomingGetPacket(client, again as unknown as SessionPacket)
  return seen
}

describe('InboundQos2: a retransmission of an entry a dead process stored', () => {
  it('delivers it again with its record\'s log position, marked late: each session decides (its cursor or a copy)', async () => {
    const persistence = restartedPersistence({ edgemqPosition: POSITION })
    expect(await retransmit(persistence)).toEqual([{ ...POSITION, late: true }])
    expect(persistence.marked).toEqual([]) // no copy was queued: nothing to mark
  })

  it('marks the entry delivered once the delivery queued a copy for a session', async () => {
    const persistence = restartedPersistence({ edgemqPosition: POSITION })
    expect(await retransmit(persistence, { queuesCopy: true })).toEqual([{ ...POSITION, late: true }])
    expect(persistence.marked).toEqual([7])
  })

  it('delivers nothing for an entry marked delivered: its delivery was done before the crash', async () => {
    const persistence = restartedPersistence({ edgemqPosition: POSITION, edgemqDelivered: true })
    expect(await retransmit(persistence)).toEqual([])
  })

  it('delivers an entry of an older gateway (no position) again as a copy', async () => {
    const persistence = restartedPersistence({})
    expect(await retransmit(persistence)).toEqual([undefined])
  })
})
