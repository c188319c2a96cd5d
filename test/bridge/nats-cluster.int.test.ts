/**
 * edgemq → a three-node JetStream cluster on loopback with an R3 stream: a
 * backlog drained while the stream's leader is SIGKILLed and restarted lands
 * exactly once, and the uplink gets back on its own. (Order is not asserted
 * here: a publish refused while a leader is elected can be stored after later
 * ones of its partition; docs/bridge.md says so.)
 */
import { jetstreamManager } from '@nats-io/jetstream'
import { afterAll, describe, expect, it } from 'vitest'
import { bridgeStatus, drained, publishAcked, waitFor } from '../helpers/bridge-fixtures.ts'
import { tempDir } from '../helpers/gateway-process.ts'
import { readWholeLog } from '../helpers/log-reader.ts'
import { natsClient, natsPolicy, readStream, startNatsCluster, type NatsServerProcess } from '../helpers/nats-process.ts'
import { expectExactlyOnce, startNatsEdge } from '../helpers/nats-fixtures.ts'

const policy = natsPolicy()
const bin = policy.bin

it.runIf(policy.missingInCi)('has nats-server under CI', () => {
  expect.fail('nats-server is missing: .ci/run installs it; the NATS cluster tests cannot run')
})

describe.skipIf(bin === null)('bridge: edgemq → a three-node JetStream cluster (R3)', () => {
  const cleanups: Array<() => Promise<void>> = []
  afterAll(async () => { for (const c of cleanups.reverse()) await c() })

  it('the stream leader SIGKILLed and restarted mid-drain: nothing lost, nothing twice, the uplink reconnects by itself', async () => {
    const t = await tempDir('edgemq-nats-cluster-')
    cleanups.push(t.cleanup)
    const nodes: NatsServerProcess[] = await startNatsCluster(bin as string, t.dir)
    cleanups.push(async () => { for (const n of nodes) await n.kill() })
    const url = nodes.map((n) => n.url).join(',')
    // The stream does not exist yet: a backlog builds while the edge takes data.
    const edge = await startNatsEdge(t.dir, { url, nats: { ackTimeoutMs: 3000, stream: { create: false } } })
    cleanups.push(() => edge.kill())
    const acked = await publishAcked(edge.mqttUrl, ['dev-a', 'dev-b', 'dev-c', 'dev-d'], 2000, 0, 100)
    expect(acked).toHaveLength(8000)

    const nc = await natsClient(nodes.map((n) => n.url), { maxReconnectAttempts: -1, reconnectTimeWait: 200 })
    cleanups.push(() => nc.close())
    const jsm = await jetstreamManager(nc)
    await jsm.streams.add({ name: 'EDGEMQ', subjects: ['edgemq.>'], num_replicas: 3, duplicate_window: 600_000 * 1_000_000 })
    const info = async (): Promise<{ messages: number, leader: string | undefined }> => {
      const i = await jsm.streams.info('EDGEMQ')
      return { messages: i.state.messages, leader: i.cluster?.leader }
    }
    const { leader: leaderName } = await waitFor('the drain to be under way', async () => {
      const i = await info()
      return i.messages >= 2000 && i.leader !== undefined ? i : undefined
    }, 120_000, 5)
    const index = nodes.findIndex((n) => n.name === leaderName)
    expect(index).toBeGreaterThanOrEqual(0)
    const leader = nodes[index] as NatsServerProcess
    await leader.kill()
    expect((await bridgeStatus(edge.httpUrl))[0]?.forwardedMessages).toBeLessThan(acked.length) // killed mid-drain
    nodes[index] = await leader.restart()
    const after = await drained(edge.httpUrl, 'js', 180_000)
    expect(after.connected).toBe(true) // back by itself: nobody touched the edge
    if (after.lastError !== null) expect(after.lastError.resolvedAt).not.toBeNull()
    expect(after.jetstream).toMatchObject({ stream: 'EDGEMQ', replicas: 3 })
    expect(nodes.map((n) => n.name)).toContain(after.natsServer?.name) // the status names the node it is connected to
    expect(await edge.stop()).toBe(0)
    await waitFor('the stream to answer with everything', async () => (await info()).messages === acked.length ? true : undefined, 60_000)
    expectExactlyOnce(await readWholeLog(`${t.dir}/data`), await readStream(nc, 'EDGEMQ'))
  })
})
