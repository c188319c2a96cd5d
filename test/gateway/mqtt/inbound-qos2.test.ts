/**
 * What InboundQos2 delivers again when a QoS 2 PUBLISH comes again for an
 * entry a gateway process that died stored (inbound-qos2.ts header), against
 * a session persistence kept in memory: the entry as it reads from disk after
 * a restart. The crash itself is in qos2-crash-redelivery.int.test.ts.
 * And what the connection a clean CONNECT is taking over may still do to the
 * new connection's QoS 2 exchanges (the same id, one persistence).
 */
import type { Client, PublishPacket } from 'aedes'
import { MemoryLevel } from 'memory-level'
import { describe, expect, it } from 'vitest'
import type { LevelDatabase } from '../../../store/index.ts'
import { InboundQos2, type Qos2Persistence } from '../../../gateway/mqtt/inbound-qos2.ts'
import { logPositionOf, type LogPosition } from '../../../gateway/mqtt/log-position.ts'
import { noteQueuedCopy } from '../../../gateway/mqtt/queued-copies.ts'
import type { IncomingFields } from '../../../gateway/mqtt/sessions/format.ts'
import { LevelSessionPersistence, type SessionPacket } from '../../../gateway/mqtt/sessions/persistence.ts'

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
    sessionDiscarded: () => false,
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

describe('InboundQos2: the connection a clean CONNECT is taking over', () => {
  /**
   * `old` held dev-1's session; `fresh`, a clean CONNECT of dev-1, discarded it (its clean step comes before the
   * takeover that closes `old`). A real session persistence in memory; appends are counted, not logged.
   */
  async function takenOver (): Promise<{ inbound: InboundQos2, persistence: LevelSessionPersistence, old: Client, fresh: Client }> {
    const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const persistence = new LevelSessionPersistence(db.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase)
    await persistence.setup({ id: 'b1' })
    const old = { id: 'dev-1', version: 4 } as unknown as Client
    const fresh = { id: 'dev-1', version: 4 } as unknown as Client
    await persistence.markSession(old) // it holds the session (as the gateway's hook records a persistent CONNECT)
    await persistence.cleanSubscriptions(fresh)
    return { inbound: new InboundQos2(persistence as unknown as Qos2Persistence, 0), persistence, old, fresh }
  }

  function publish (messageId: number, dup = false): PublishPacket {
    return { cmd: 'publish', topic: 'up/dev-1', payload: Buffer.from('m'), qos: 2, messageId, dup, retain: false } as PublishPacket
  }

  it('starts no append under a packet id the new connection may use: its PUBLISH with that id is new, not a retransmission', async () => {
    const { inbound, persistence, old, fresh } = await takenOver()
    const appended: string[] = []
    const plan = (who: string): { append: () => Promise<void>, deliver: () => Promise<void> } => ({
      append: async () => { appended.push(who) },
      deliver: async () => {},
    })
    const stale = publish(7)
    inbound.begin(old, stale, plan('old'))
    expect(inbound.begin(fresh, publish(7), plan('fresh'))).toBe('new')
    await inbound.running(fresh, 7)
    expect(appended).toEqual(['fresh'])
    // aedes' store step for the old connection's PUBLISH: refused, so it closes that connection and acknowledges nothing.
    await expect(persistence.incomingGetPacket(old as never, stale as never)).rejects.toMatchObject({ code: 'GW_SESSION_NOT_FOUND' })
    await expect(persistence.incomingStorePacket(old as never, stale as never)).rejects.toMatchObject({ code: 'GW_SESSION_TAKEN_OVER' })
  })

  it('leaves the new connection\'s exchanges alone when it closes (3.1.1 clean): a retransmission is not delivered again', async () => {
    const { inbound, persistence, old, fresh } = await takenOver()
    let delivered = 0
    const plan = { append: async (): Promise<void> => {}, deliver: async (): Promise<void> => { delivered++ } }
    expect(inbound.begin(fresh, publish(7), plan)).toBe('new')
    await inbound.running(fresh, 7)
    await persistence.cleanIncoming(old as never) // aedes' close of a 3.1.1 clean connection
    const again = publish(7, true)
    expect(inbound.begin(fresh, again, plan)).toBe('duplicate')
    await persistence.incomingGetPacket(fresh as never, again as never)
    expect({ delivered, stored: persistence.hasIncomingPacket(fresh as never, 7) }).toEqual({ delivered: 1, stored: true })
  })
})
