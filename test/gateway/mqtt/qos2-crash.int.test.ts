/**
 * QoS 2 across kill -9 at any point of the exchange: every message that got
 * a PUBREC is in the log exactly once and reaches a persistent subscriber,
 * while the device resumes its unfinished exchanges after each restart
 * [MQTT-4.4.0-1] and then reuses the same packet ids for new messages.
 */
import type { Packet } from 'mqtt-packet'
import { afterAll, describe, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { readWholeLog } from '../../helpers/log-reader.ts'
import { rawConnect, type RawClient } from '../../helpers/raw-client.ts'

const TOPIC = 'devices/q2k/telemetry/x'
/** Exchanges in flight per cycle, using packet ids 1..IN_FLIGHT every cycle. */
const IN_FLIGHT = 20
const CYCLES = 8

interface Exchange { readonly payload: string, state: 'sent' | 'rec' | 'comp' }

async function connect (url: string, clientId: string): Promise<RawClient> {
  const c = await rawConnect(url)
  c.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId, clean: false, keepalive: 30 })
  expect(await c.next('connack')).toMatchObject({ returnCode: 0 })
  return c
}

/** A deterministic pseudo-random sequence, so a failing run can be repeated. */
function lcg (seed: number): () => number {
  let s = seed
  return () => { s = (s * 1103515245 + 12345) % 2147483648; return s / 2147483648 }
}

/**
 * Plays the device's side of the exchanges on one connection until all are
 * complete or the connection closes: PUBREL on PUBREC (sent twice in one
 * write with `repeatPubrel`, as a device unsure of its first may do), done
 * on PUBCOMP. Kills the gateway when the `killAt`-th PUBREC/PUBCOMP arrives.
 */
function drive (c: RawClient, exchanges: Map<number, Exchange>, acknowledged: Set<string>, gw: GatewayProcess, options: { killAt?: number, repeatPubrel?: boolean } = {}): Promise<void> {
  let seen = 0
  return new Promise((resolve) => {
    const check = (): void => { if ([...exchanges.values()].every((x) => x.state === 'comp')) { stop(); resolve() } }
    const stop = c.onPacket((p: Packet) => {
      if (p.cmd !== 'pubrec' && p.cmd !== 'pubcomp') return
      const x = exchanges.get(p.messageId as number)
      if (x === undefined) return
      if (p.cmd === 'pubrec' && x.state !== 'comp') {
        x.state = 'rec'
        acknowledged.add(x.payload)
        const pubrel: Packet = { cmd: 'pubrel', messageId: p.messageId }
        c.sendAll(options.repeatPubrel === true ? [pubrel, pubrel] : [pubrel])
      } else if (p.cmd === 'pubcomp') {
        x.state = 'comp'
      }
      if (++seen === options.killAt) gw.child.kill('SIGKILL')
      check()
    })
    void c.closed.then(() => { stop(); resolve() })
    check()
  })
}

describe('QoS 2 across kill -9', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups) await c() })

  it('logs every message that got a PUBREC exactly once and delivers it, with kills at random points and packet ids reused', async () => {
    const { dir, cleanup } = await tempDir()
    cleanups.push(cleanup)
    let gw = await startGatewayProcess({ dataDir: dir })
    cleanups.push(() => gw.kill())
    // A persistent subscriber, offline throughout: its queue shows what was delivered.
    let sub = await connect(gw.mqttUrl, 'q2k-sub')
    sub.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'devices/+/telemetry/#', qos: 1 }] })
    await sub.next('suback')
    sub.send({ cmd: 'disconnect' })
    await sub.closed

    const seed = 20261201
    const random = lcg(seed)
    const exchanges = new Map<number, Exchange>()
    const acknowledged = new Set<string>()
    let serial = 0
    const kills: number[] = []
    for (let cycle = 0; cycle <= CYCLES; cycle++) {
      const c = await connect(gw.mqttUrl, 'q2k')
      // Resume what the kill interrupted: PUBLISH again (DUP) without a PUBREC, PUBREL again without a PUBCOMP.
      const resumed = drive(c, exchanges, acknowledged, gw)
      for (const [id, x] of exchanges) {
        if (x.state === 'sent') c.send({ cmd: 'publish', topic: TOPIC, payload: Buffer.from(x.payload), qos: 2, messageId: id, dup: true, retain: false })
        if (x.state === 'rec') c.send({ cmd: 'pubrel', messageId: id })
      }
      await resumed
      expect([...exchanges.values()].every((x) => x.state === 'comp'), `cycle ${cycle} (seed ${seed}) resumed`).toBe(true)
      if (cycle === CYCLES) { c.end(); break }
      // New messages on the same packet ids, and a kill -9 at the killAt-th PUBREC or PUBCOMP.
      for (let id = 1; id <= IN_FLIGHT; id++) exchanges.set(id, { payload: `m${serial++}`, state: 'sent' })
      const killAt = 1 + Math.floor(random() * 2 * IN_FLIGHT)
      kills.push(killAt)
      const killed = drive(c, exchanges, acknowledged, gw, { killAt, repeatPubrel: true })
      c.sendAll([...exchanges].map(([id, x]) => ({ cmd: 'publish', topic: TOPIC, payload: Buffer.from(x.payload), qos: 2, messageId: id, dup: false, retain: false })))
      await killed
      await gw.kill()
      c.end()
      gw = await startGatewayProcess({ dataDir: dir })
    }
    expect(acknowledged.size).toBe(CYCLES * IN_FLIGHT)

    // Every acknowledged message reaches the subscriber's queue (at least once: a kill may repeat a delivery).
    const delivered = new Set<string>()
    sub = await connect(gw.mqttUrl, 'q2k-sub')
    const all = new Promise<void>((resolve) => {
      sub.onPacket((p) => {
        if (p.cmd !== 'publish') return
        sub.send({ cmd: 'puback', messageId: p.messageId })
        delivered.add(p.payload.toString())
        if ([...acknowledged].every((m) => delivered.has(m))) resolve()
      })
    })
    await Promise.race([all, sub.closed])
    expect([...acknowledged].filter((m) => !delivered.has(m)), `undelivered (seed ${seed}, kills at ${kills.join(',')})`).toEqual([])
    sub.end()
    await gw.kill()

    const logged = (await readWholeLog(dir)).filter((r) => r.clientId === 'q2k').map((r) => r.payload)
    const twice = logged.filter((m, i) => logged.indexOf(m) !== i)
    expect({ missing: [...acknowledged].filter((m) => !logged.includes(m)), twice }, `seed ${seed}, kills at ${kills.join(',')}`).toEqual({ missing: [], twice: [] })
    expect(logged).toHaveLength(acknowledged.size)
  })
})
