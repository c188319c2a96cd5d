/**
 * Terms and the exact lost tail (issue 16, terms.ts): a primary with
 * `acks: local` acknowledges messages its standby never got (the standby
 * SIGKILLed), then dies; the standby comes back and is promoted (epoch 2,
 * its term starting where its copy ends). The former primary restarts,
 * follows it, sets its data aside, and once the snapshot is in names the
 * tail the new primary lacks: exactly the messages acknowledged while the
 * standby was away, by partition and offset, in `<set-aside>.tail.json`,
 * and the records themselves in `<set-aside>.tail.ndjson`.
 */
import { readdir, readFile } from 'node:fs/promises'
import path from 'node:path'
import mqtt from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { runCli, tempDir, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { readWholeLog } from '../../helpers/log-reader.ts'
import { replicationAddress, startNode, waitFor } from './pair.ts'

async function publish (gw: GatewayProcess, device: string, from: number, count: number): Promise<string[]> {
  const c = await mqtt.connectAsync(gw.mqttUrl, { clientId: device, reconnectPeriod: 0, connectTimeout: 30_000 })
  const payloads: string[] = []
  try {
    for (let seq = from; seq < from + count; seq++) {
      const payload = JSON.stringify({ device, seq })
      await c.publishAsync(`devices/${device}/telemetry/seq`, payload, { qos: 1 })
      payloads.push(payload)
    }
  } finally {
    await c.endAsync()
  }
  return payloads
}

describe('leadership terms', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it('names exactly the tail a former primary wrote that the new primary lacks', { timeout: 180_000 }, async () => {
    const { dir, cleanup } = await tempDir('edgemq-terms-')
    cleanups.push(cleanup)
    const primary = await startNode(dir, 'a', { role: 'primary', acks: 'local' })
    cleanups.push(() => primary.kill())
    const standby = await startNode(dir, 'b', { role: 'standby', peer: replicationAddress(primary) })
    cleanups.push(() => standby.kill())
    await waitFor(primary, 'the standby in sync', (d) => d.inSync)
    for (let d = 0; d < 4; d++) await publish(primary, `dev-${d}`, 0, 5)
    await waitFor(primary, 'the standby to have every write', (d) => d.inSync && d.lag.writes === 0)

    await standby.kill()
    const tail: string[] = []
    for (let d = 0; d < 4; d++) tail.push(...await publish(primary, `dev-${d}`, 5, 5 + d))
    await primary.kill()

    const again = await startNode(dir, 'b', { role: 'standby', peer: replicationAddress(primary) })
    cleanups.push(() => again.kill())
    const promoted = await runCli(['promote', '--url', again.httpUrl, '--json'])
    expect(promoted.code, promoted.stderr).toBe(0)
    const doc = JSON.parse(promoted.stdout) as { epoch: number, listen: string }
    expect(doc.epoch).toBe(2)

    // Where each tail message sits in the former primary's log.
    const old = (await readWholeLog(path.join(dir, 'a'))).filter((r) => r.stream === 'default/telemetry')
    const want = new Set(old.filter((r) => tail.includes(r.payload)).map((r) => `${r.partition}/${r.offset}`))
    expect(want.size).toBe(tail.length)

    const back = await startNode(dir, 'a', { role: 'primary', acks: 'local', peer: doc.listen })
    cleanups.push(() => back.kill())
    await waitFor(back, 'the former primary to follow', (d) => d.role === 'standby' && d.inSync && d.epoch === 2)
    const deadline = Date.now() + 60_000
    while (!back.stderr().includes('GW_WARN_SET_ASIDE_TAIL') && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50))
    expect(back.stderr()).toMatch(/GW_WARN_SET_ASIDE_TAIL/)

    const asideDir = path.join(dir, 'a', 'set-aside')
    const tailFile = (await readdir(asideDir)).find((f) => f.endsWith('.tail.json'))
    expect(tailFile).toBeDefined()
    const named = JSON.parse(await readFile(path.join(asideDir, tailFile as string), 'utf8')) as {
      records: number, formerEpoch: number, nextEpoch: number, recordsFile: string | null
      ranges: Array<{ stream: string, partition: number, from: number, to: number }>
    }
    expect({ records: named.records, formerEpoch: named.formerEpoch, nextEpoch: named.nextEpoch }).toEqual({ records: tail.length, formerEpoch: 1, nextEpoch: 2 })
    const got = new Set<string>()
    for (const r of named.ranges) {
      expect(r.stream).toBe('default/telemetry')
      for (let o = r.from; o < r.to; o++) got.add(`${r.partition}/${o}`)
    }
    expect([...got].sort()).toEqual([...want].sort())
    // The records themselves, readable: exactly the tail's payloads at the offsets the former primary gave them.
    expect(named.recordsFile).toBe(path.join(asideDir, tailFile as string).replace(/\.json$/, '.ndjson'))
    const lines = (await readFile(named.recordsFile as string, 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as {
      stream: string, partition: number, offset: number, payload: string
    })
    expect(lines.map((l) => Buffer.from(l.payload, 'base64').toString()).sort()).toEqual([...tail].sort())
    expect(lines.map((l) => `${l.partition}/${l.offset}`).sort()).toEqual([...want].sort())
  })
})
