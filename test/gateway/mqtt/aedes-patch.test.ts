/**
 * Fixes the aedes patch (patches/aedes+2.0.0-beta.1.patch) makes to aedes' own behaviour, each against a real aedes
 * broker: the will sweep of a dead broker's wills runs one at a time, so a persistence whose delWill takes longer
 * than the sweep's interval does not get a will fired twice. (aedes' suite caught it under load on the project's
 * session persistence: "delivers old will in case of a crash", only one will delivered.)
 */
import memoryPersistence from 'aedes-persistence'
import { Aedes } from 'aedes'
import { afterEach, describe, expect, it, vi } from 'vitest'

/** What the test uses of aedes-persistence's memory persistence (its typings still describe the callback API). */
interface MemoryPersistence {
  setup (broker: { id: string }): Promise<void>
  putWill (client: { id: string }, packet: { topic: string, payload: Buffer, qos: number, retain: boolean }): Promise<void>
  delWill (client: { id: string }): Promise<unknown>
  streamWill (brokers: Record<string, number>): { toArray (): Promise<unknown[]> }
}
const memory = memoryPersistence as unknown as () => MemoryPersistence
/** aedes' emitter, which its typings do not declare. */
type WithEmitter = Aedes & { mq: { on (topic: string, notify: (packet: { payload: Buffer }, cb: () => void) => void): void } }

/** Waits for `done`, turn by turn of the event loop (the faked interval is not what turns it), bounded. */
async function turnsUntil (done: () => boolean | Promise<boolean>, turns = 10_000): Promise<void> {
  for (let k = 0; k < turns; k++) {
    if (await done()) return
    await new Promise((resolve) => setImmediate(resolve))
  }
  throw new Error(`not done after ${turns} turns of the event loop`)
}

afterEach(() => {
  vi.useRealTimers()
})

describe('aedes patch: the will sweep', () => {
  it('runs one sweep at a time: a will whose deletion is slow is fired once, not once per interval', async () => {
    // Only the sweep's interval is faked: aedes' own turns (setImmediate, nextTick) run for real.
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] })
    const persistence = memory()
    await persistence.setup({ id: 'another-broker' })
    await persistence.putWill({ id: 'dev-1' }, { topic: 'mywill', payload: Buffer.from('last will'), qos: 0, retain: false })
    // delWill is held until released, as a slow disk would hold it.
    const deletions: Array<() => void> = []
    const delWill = persistence.delWill.bind(persistence)
    persistence.delWill = async (client) => {
      await new Promise<void>((resolve) => deletions.push(resolve))
      return await delWill(client)
    }
    let sweeps = 0
    const streamWill = persistence.streamWill.bind(persistence)
    persistence.streamWill = (brokers) => {
      sweeps++
      return streamWill(brokers)
    }
    const heartbeatInterval = 10
    const broker = await Aedes.createBroker({ persistence: persistence as never, heartbeatInterval }) as WithEmitter
    try {
      const fired: string[] = []
      let onFired: (() => void) | undefined
      broker.mq.on('mywill', (packet, cb) => {
        fired.push(String(packet.payload))
        onFired?.()
        cb()
      })
      const firstFired = new Promise<void>((resolve) => { onFired = resolve })
      // The first sweep finds the will and fires it; its deletion is held.
      await vi.advanceTimersByTimeAsync(4 * heartbeatInterval)
      await firstFired
      await turnsUntil(() => deletions.length === 1)
      expect(sweeps).toBe(1)
      // Three more intervals while that deletion is held: no sweep starts beside it, the will is not fired again.
      for (let k = 0; k < 3; k++) await vi.advanceTimersByTimeAsync(4 * heartbeatInterval)
      expect(sweeps).toBe(1)
      expect(fired).toEqual(['last will'])
      // Deleted: the next sweep finds nothing.
      deletions.shift()?.()
      await turnsUntil(async () => (await streamWill({}).toArray()).length === 0)
      // Once the first sweep has ended, an interval sweeps again.
      await turnsUntil(async () => {
        await vi.advanceTimersByTimeAsync(4 * heartbeatInterval)
        return sweeps === 2
      }, 100)
      expect(fired).toEqual(['last will'])
    } finally {
      for (const release of deletions.splice(0)) release()
      await new Promise<void>((resolve) => broker.close(() => resolve()))
    }
  })
})
