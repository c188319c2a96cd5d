/**
 * `npm run bench -- nats`: how fast the bridge drains a backlog into a NATS
 * JetStream stream, against a plain NATS client (the same @nats-io client)
 * publishing the same records from memory with the same window of
 * outstanding PubAcks, in the same run. One JSON line per figure on stdout
 * (lib/report.ts); progress on stderr.
 *
 * The backlog: `--records` (default 1 M) records of 100 bytes from 100
 * devices (`dev-000` … `dev-099`, topic `devices/<id>/telemetry/t`),
 * appended with the store API to `default/telemetry` (8 partitions, the
 * device id as key) in a data dir no gateway has opened yet (bridge.ts's
 * `--fill=store`: the same drain rate as an MQTT fill, quicker).
 *
 * edgemq: `edgemq start` with a NATS upstream (`maxInflight` = `--window`,
 * default 256) whose stream does not exist yet, so it waits
 * (BRIDGE_NATS_STREAM_MISSING, retrying every 20 ms). The clock starts when
 * the bench creates the stream and stops when the stream holds every record
 * (stream info polled every 20 ms). Each record: subject
 * `edgemq.bench.default.telemetry.devices.<id>.telemetry.t`, Nats-Msg-Id =
 * its dedupe id, the six Edgemq-* headers.
 *
 * Baseline: one NATS connection in this process publishes the same records
 * (same subjects, payloads, Nats-Msg-Id and headers, built per publish as the
 * bridge does) from an array in memory with `js.publish`, at most `--window`
 * PubAcks outstanding; the clock starts at the stream's creation too, and
 * stops the same way (a publish refused with "no responders" while a new R3
 * stream settles is retried by the client). No log, no lanes, no commits:
 * what the client and the server cost on their own.
 *
 * Variants (positional, default both): `r1` one nats-server, stream R1;
 * `r3` three clustered nats-servers on loopback, stream R3 (the three
 * servers share the machine's two cores with the gateway). Every round
 * starts fresh servers and directories; the edgemq and baseline runs
 * alternate, the order flipping each round; each figure is the median of its
 * rounds. Arguments: variants, `--records=N`, `--rounds=N` (default 3),
 * `--quick` (100 k records, 1 round), `--window=N`.
 */
import { mkdir, writeFile } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { jetstream, jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import { connect, headers as natsHeaders, type NatsConnection } from '@nats-io/transport-node'
import { topicToSubject } from '../bridge/nats/subjects.ts'
import { openLogStore } from '../store/index.ts'
import { startEdgemq } from './lib/brokers.ts'
import { fillDevice, fillTopic } from './lib/mqtt/fill.ts'
import { findNatsServer, startNatsCluster, startNatsServer, type NatsServerProcess } from './lib/nats-server.ts'
import { TempDirs, info, median, report, round } from './lib/report.ts'
import { argv, intFlag } from './lib/flags.ts'

const QUICK = argv.includes('--quick')
const RECORDS = intFlag('records', QUICK ? 100_000 : 1_000_000)
const ROUNDS = intFlag('rounds', QUICK ? 1 : 3)
const WINDOW = intFlag('window', 256)
type Variant = 'r1' | 'r3'
const VARIANTS: readonly Variant[] = ['r1', 'r3']
const selected = argv.filter((a) => !a.startsWith('--'))
for (const v of selected) if (!VARIANTS.includes(v as Variant)) throw new Error(`unknown variant ${v}; expected r1 or r3`)
const variants = VARIANTS.filter((v) => selected.length === 0 || selected.includes(v))

const PAYLOAD_BYTES = 100
const DEVICES = 100
const PARTITIONS = 8
const GATEWAY_ID = 'bench'
const STREAM = 'EDGEMQ'
const POLL_MS = 20
const STALL_MS = 60_000

const dirs = new TempDirs()
const delay = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

/** The servers of one run: one node, or a cluster of three. */
async function startServers (bin: string, dir: string, variant: Variant): Promise<NatsServerProcess[]> {
  return variant === 'r1' ? [await startNatsServer(bin, dir)] : await startNatsCluster(bin, dir)
}

async function stopServers (servers: readonly NatsServerProcess[]): Promise<void> {
  for (const s of servers) await s.stop()
}

/** Creates the stream (the clock starts here) and resolves with the seconds until it holds `RECORDS` messages. */
async function timeDrain (jsm: JetStreamManager, variant: Variant): Promise<number> {
  const t0 = performance.now()
  await jsm.streams.add({ name: STREAM, subjects: ['edgemq.>'], num_replicas: variant === 'r1' ? 1 : 3, duplicate_window: 3_600_000 * 1_000_000 })
  let last = 0
  let lastChange = performance.now()
  for (;;) {
    const messages = (await jsm.streams.info(STREAM)).state.messages
    if (messages >= RECORDS) return (performance.now() - t0) / 1000
    if (messages !== last) { last = messages; lastChange = performance.now() }
    if (performance.now() - lastChange > STALL_MS) throw new Error(`the stream stalled at ${messages} of ${RECORDS} messages`)
    await delay(POLL_MS)
  }
}

/** The backlog, appended with the store API into `dataDir` before the gateway opens it. */
async function fillStore (dataDir: string): Promise<void> {
  await mkdir(dataDir, { recursive: true })
  const store = await openLogStore({ location: path.join(dataDir, 'db'), durability: 'async' })
  try {
    const stream = 'default/telemetry'
    await store.createStream(stream, { partitions: PARTITIONS })
    const devices = Array.from({ length: DEVICES }, (_v, i) => fillDevice(i))
    const payload = Buffer.alloc(PAYLOAD_BYTES, 7)
    let next = 0
    const worker = async (): Promise<void> => {
      while (next < RECORDS) {
        const i = next++
        const device = devices[i % DEVICES] as string
        await store.append(stream, device, { payload, topic: fillTopic(device), qos: 1, clientId: `fill-${i % 10}` })
      }
    }
    await Promise.all(Array.from({ length: 1000 }, worker))
  } finally {
    await store.close()
  }
}

async function edgemqRound (bin: string, variant: Variant): Promise<number> {
  const dir = await dirs.make(`nats-edgemq-${variant}`)
  const dataDir = path.join(dir, 'data')
  await fillStore(dataDir)
  const servers = await startServers(bin, dir, variant)
  const config = path.join(dir, 'edgemq.json')
  await writeFile(config, JSON.stringify({
    gatewayId: GATEWAY_ID,
    bridge: {
      upstreams: [{
        name: 'js', url: servers.map((s) => s.url).join(','), forward: [{ stream: 'telemetry' }], maxInflight: WINDOW,
        reconnectMinMs: POLL_MS, reconnectMaxMs: POLL_MS, nats: { stream: { name: STREAM } },
      }],
    },
  }))
  const gw = await startEdgemq(dataDir, [], undefined, ['--config', config])
  const nc = await connect({ servers: servers.map((s) => s.url) })
  try {
    const s = await (await fetch(`${gw.httpUrl as string}/v1/bridge`)).json() as { upstreams: Array<{ backlog: { messages: number } }> }
    if (s.upstreams[0]?.backlog.messages !== RECORDS) throw new Error(`the gateway reports a backlog of ${s.upstreams[0]?.backlog.messages}, expected ${RECORDS}`)
    return RECORDS / await timeDrain(await jetstreamManager(nc), variant)
  } catch (err) {
    throw new Error(`${(err as Error).message}\nedgemq stderr (tail):\n${gw.stderr().slice(-3000)}`)
  } finally {
    await nc.close()
    await gw.stop(60_000)
    await stopServers(servers)
    await dirs.remove(dir)
  }
}

interface Message { readonly subject: string, readonly payload: Uint8Array, readonly key: string, readonly topic: string, readonly partition: number, readonly offset: number }

/** The records as the gateway holds them: device i % 100, partition by device, offsets per partition. */
function records (): Message[] {
  const payload = new Uint8Array(PAYLOAD_BYTES).fill(7)
  const offsets = new Array<number>(PARTITIONS).fill(0)
  const out: Message[] = []
  for (let i = 0; i < RECORDS; i++) {
    const device = fillDevice(i % DEVICES)
    const topic = fillTopic(device)
    const partition = (i % DEVICES) % PARTITIONS
    const offset = offsets[partition] as number
    offsets[partition] = offset + 1
    out.push({ subject: `edgemq.${GATEWAY_ID}.default.telemetry.${topicToSubject(topic)}`, payload, key: device, topic, partition, offset })
  }
  return out
}

/** Publishes every message with at most WINDOW PubAcks outstanding. */
async function publishAll (nc: NatsConnection, messages: readonly Message[]): Promise<void> {
  const js = jetstream(nc)
  let next = 0
  let inflight = 0
  let done = 0
  await new Promise<void>((resolve, reject) => {
    const pump = (): void => {
      while (inflight < WINDOW && next < messages.length) {
        const m = messages[next++] as Message
        const h = natsHeaders()
        h.set('Edgemq-Stream', 'default/telemetry')
        h.set('Edgemq-Partition', String(m.partition))
        h.set('Edgemq-Offset', String(m.offset))
        h.set('Edgemq-Timestamp', String(Date.now()))
        h.set('Edgemq-Key', m.key)
        h.set('Edgemq-Topic', m.topic)
        inflight++
        // retries: a replicated stream's subject interest reaches every server a moment after its leader is elected, and
        // the client retries "no responders" with its backoff (the bridge reconnects and resends instead).
        js.publish(m.subject, m.payload, { msgID: `${GATEWAY_ID}/default/telemetry/${m.partition}/${m.offset}`, headers: h, retries: 20 }).then(() => {
          inflight--
          if (++done === messages.length) resolve()
          else pump()
        }, reject)
      }
    }
    pump()
  })
}

async function baselineRound (bin: string, variant: Variant, messages: readonly Message[]): Promise<number> {
  const dir = await dirs.make(`nats-baseline-${variant}`)
  const servers = await startServers(bin, dir, variant)
  const nc = await connect({ servers: servers.map((s) => s.url) })
  try {
    const jsm = await jetstreamManager(nc)
    const [seconds] = await Promise.all([timeDrain(jsm, variant), (async () => {
      // As the bridge does: publish once the stream exists and, replicated, has its leader.
      for (;;) {
        const i = await jsm.streams.info(STREAM).catch(() => null)
        if (i !== null && (i.config.num_replicas === 1 || (i.cluster?.leader ?? '') !== '')) break
        await delay(1)
      }
      await publishAll(nc, messages)
    })()])
    return RECORDS / seconds
  } finally {
    await nc.close()
    await stopServers(servers)
    await dirs.remove(dir)
  }
}

async function main (): Promise<number> {
  const bin = findNatsServer()
  if (bin === null) {
    process.stderr.write('[bench] nats: nats-server not found (PATH, /usr/sbin, /usr/local/sbin): `apt-get install nats-server`.\n')
    return 1
  }
  const t0 = performance.now()
  info(`nats bench: drain ${RECORDS} records (${PAYLOAD_BYTES} B) into JetStream (${variants.join(', ')}), edgemq vs a plain client from memory; ` +
    `${ROUNDS} rounds, ${WINDOW} PubAcks outstanding; node ${process.version}, ${os.cpus().length} cpus, load ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`)
  const messages = records()
  try {
    for (const variant of variants) {
      const edge: number[] = []
      const plain: number[] = []
      for (let r = 0; r < ROUNDS; r++) {
        const order = r % 2 === 0 ? ['edgemq', 'baseline'] : ['baseline', 'edgemq']
        for (const who of order) {
          const rate = who === 'edgemq' ? await edgemqRound(bin, variant) : await baselineRound(bin, variant, messages)
          ;(who === 'edgemq' ? edge : plain).push(rate)
          info(`round ${r + 1}/${ROUNDS} ${variant} ${who}: ${round(rate / 1000, 1)} k records/s`)
        }
      }
      report({
        bench: `nats.drain.${variant}`,
        unit: 'records/s',
        value: median(edge),
        baseline: `a plain @nats-io/jetstream client publishing the same records from memory, ${WINDOW} PubAcks outstanding`,
        baselineValue: median(plain),
        better: 'higher',
        params: { records: RECORDS, rounds: ROUNDS, window: WINDOW, payloadBytes: PAYLOAD_BYTES, partitions: PARTITIONS, replicas: variant === 'r1' ? 1 : 3 },
      })
    }
  } finally {
    await dirs.cleanup()
  }
  info(`nats bench done in ${round((performance.now() - t0) / 1000, 1)} s`)
  return 0
}

process.exitCode = await main()
