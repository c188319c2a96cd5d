/**
 * The order a client's publishes reach delivery in (gateway/mqtt/hooks/delivery-order.ts), without a broker:
 * turns record when they start; a test finishes them by hand.
 */
import type { Client } from 'aedes'
import { describe, expect, it } from 'vitest'
import { DeliveryOrder } from '../../../../gateway/mqtt/hooks/delivery-order.ts'

const client = (): Client => ({ id: 'c' }) as unknown as Client

/** A promise and its settling functions. */
function deferred (): { promise: Promise<void>, resolve: () => void, reject: (err: Error) => void } {
  let resolve!: () => void
  let reject!: (err: Error) => void
  const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej })
  return { promise, resolve, reject }
}

describe('DeliveryOrder', () => {
  it('lets a client with nothing under way go at once, and is clear again once every turn is done', () => {
    const order = new DeliveryOrder()
    const c = client()
    expect(order.clear(c)).toBe(true)
    const started: string[] = []
    let finish!: () => void
    order.deliverBeforeAck(c, (finished) => { started.push('a'); finish = finished })
    expect(started).toEqual(['a'])
    expect(order.clear(c)).toBe(false)
    order.ackBeforeDelivery(c, null, () => { started.push('b') })
    expect(started).toEqual(['a']) // acknowledged first, it would overtake the delivery under way
    finish()
    expect(started).toEqual(['a', 'b'])
    expect(order.clear(c)).toBe(true)
    expect(order.clear(client())).toBe(true) // per client
  })

  it('does not make publishes delivered before their ack wait for one another', () => {
    const order = new DeliveryOrder()
    const c = client()
    const started: number[] = []
    const finishers: Array<() => void> = []
    for (let i = 0; i < 3; i++) order.deliverBeforeAck(c, (finished) => { started.push(i); finishers.push(finished) })
    expect(started).toEqual([0, 1, 2])
    order.ackBeforeDelivery(c, null, () => { started.push(3) })
    finishers[2]?.()
    finishers[0]?.()
    expect(started).toEqual([0, 1, 2])
    finishers[1]?.()
    finishers[1]?.() // a second call changes nothing
    expect(started).toEqual([0, 1, 2, 3])
    expect(order.clear(c)).toBe(true)
  })

  it('holds every later publish of the client behind one that waits, in order, and hands a failed wait to its turn', async () => {
    const order = new DeliveryOrder()
    const c = client()
    const other = client()
    const first = deferred()
    const second = deferred()
    const started: string[] = []
    const errors: unknown[] = []
    order.ackBeforeDelivery(c, first.promise, (_f, err) => { started.push('w1'); errors.push(err) })
    order.ackBeforeDelivery(c, null, () => { started.push('fast') })
    order.deliverBeforeAck(c, (finished) => { started.push('slow'); finished() })
    order.ackBeforeDelivery(c, second.promise, (_f, err) => { started.push('w2'); errors.push(err) })
    order.ackBeforeDelivery(c, null, () => { started.push('last') })
    order.ackBeforeDelivery(other, null, () => { started.push('other') })
    expect(started).toEqual(['other'])
    second.reject(new Error('cursor write failed')) // settles before the first: still waits for its turn
    await second.promise.catch(() => {})
    expect(started).toEqual(['other'])
    first.resolve()
    await first.promise
    expect(started).toEqual(['other', 'w1', 'fast', 'slow', 'w2', 'last'])
    expect(errors).toEqual([undefined, new Error('cursor write failed')])
    expect(order.clear(c)).toBe(true)
  })

  it('starts thousands of turns queued behind a wait in one loop, not one stack frame each', async () => {
    const order = new DeliveryOrder()
    const c = client()
    const gate = deferred()
    let started = 0
    order.ackBeforeDelivery(c, gate.promise, () => { started++ })
    for (let i = 0; i < 50_000; i++) {
      if (i % 2 === 0) order.ackBeforeDelivery(c, null, () => { started++ })
      else order.deliverBeforeAck(c, (finished) => { started++; finished() })
    }
    gate.resolve()
    await gate.promise
    expect(started).toBe(50_001)
    expect(order.clear(c)).toBe(true)
  })
})
