/**
 * `npm run bench -- mqtt-replay`: how fast edgemq replays its log to one
 * plain MQTT 3.1.1 QoS 1 subscriber through `$replay/earliest/<filter>`, with
 * two baselines measured in the same run. One JSON line per figure on stdout
 * (see lib/report.ts); progress on stderr.
 *
 * The log: `--records` (default 1,000,000) records of 100 bytes from 100
 * devices (`devices/dev-<i>/telemetry/t`) in `default/telemetry`, 8
 * partitions, written once before the gateway starts (through the store,
 * `durability: async`). edgemq runs as `edgemq start` with the embedded
 * default config (`mqtt.replay.inflight` 1,000).
 *
 * The subscriber (lib/replay-clients.ts) connects, subscribes to
 * `$replay/earliest/devices/+/telemetry/#` at QoS 1, acknowledges every
 * PUBLISH at once (one write of PUBACKs per read) and stops at the `$done`
 * marker. Throughput is records over the time from its CONNACK to the
 * marker.
 *
 * Baselines:
 * - `mqtt-replay.throughput` against **Mosquitto delivering the same number
 *   of queued messages** to a persistent QoS 1 session that reconnects: what
 *   a broker does when it hands a client its backlog. Mosquitto keeps the
 *   queue in memory (`persistence false`), with its queue limits lifted
 *   (`max_queued_messages 0`, `max_queued_bytes 0`) and the same window
 *   (`max_inflight_messages 1000`). The backlog is published before each
 *   Mosquitto round and is not timed.
 * - `mqtt-replay.vs-store-read` against `LogStore.read()` of the same
 *   records in this process (all partitions, 1,000 records per read): how
 *   much of the store's read rate reaches an MQTT subscriber.
 *
 * Rounds alternate edgemq and Mosquitto, the order flipping each round; the
 * figure is the median. Arguments: `--quick` (one round of 100,000
 * records), `--records=N`, `--rounds=N`, `--mosquitto=PATH`.
 */
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { openLogStore } from '../store/index.ts'
import { findMosquitto, mosquittoVersion, processCpuSeconds, startEdgemq, startMosquitto, type RunningBroker } from './lib/brokers.ts'
import { publishBacklog, runSubscriber } from './lib/replay-clients.ts'
import { TempDirs, info, median, report, round } from './lib/report.ts'
import { argv, flag, intFlag } from './lib/flags.ts'

const QUICK = argv.includes('--quick')
const RECORDS = intFlag('records', QUICK ? 100_000 : 1_000_000)
const ROUNDS = intFlag('rounds', QUICK ? 1 : 3)
const PAYLOAD_BYTES = 100
const DEVICES = 100
const PARTITIONS = 8
/** edgemq's default mqtt.replay.inflight, and Mosquitto's max_inflight_messages to match. */
const WINDOW = 1000
const FILTER = 'devices/+/telemetry/#'
const TARGET = '>= 100 k msgs/s to one QoS 1 subscriber for 1 M records of 100 bytes'
const TIMEOUT_MS = 600_000

const topic = (i: number): string => `devices/dev-${i % DEVICES}/telemetry/t`
const dirs = new TempDirs()

/** Writes the log into `<dataDir>/db` and measures one read of it through the store. */
async function seed (dataDir: string): Promise<{ seedMs: number, readRate: number }> {
  const store = await openLogStore({ location: path.join(dataDir, 'db'), durability: 'async' })
  await store.createStream('default/telemetry', { partitions: PARTITIONS })
  const payload = Buffer.alloc(PAYLOAD_BYTES, 0x61)
  const started = performance.now()
  const group = 10_000
  for (let i = 0; i < RECORDS; i += group) {
    await Promise.all(Array.from({ length: Math.min(group, RECORDS - i) }, (_, k) => {
      const device = `dev-${(i + k) % DEVICES}`
      return store.append('default/telemetry', device, { payload, topic: topic(i + k), qos: 1, clientId: device })
    }))
  }
  const seedMs = performance.now() - started
  const readStart = performance.now()
  let read = 0
  for (let p = 0; p < PARTITIONS; p++) {
    for (let offset = 0; ;) {
      const r = await store.read('default/telemetry', p, offset, { maxRecords: 1000 })
      if (r.records.length === 0) break
      read += r.records.length
      offset = r.nextOffset
    }
  }
  const readRate = read / ((performance.now() - readStart) / 1000)
  await store.close()
  if (read !== RECORDS) throw new Error(`read back ${read} of ${RECORDS} records`)
  return { seedMs, readRate }
}

interface Round { readonly rate: number, readonly firstMs: number, readonly brokerCores: number | undefined, readonly clientCores: number }

async function timed (broker: RunningBroker, run: () => ReturnType<typeof runSubscriber>, expected: number): Promise<Round> {
  const cpuBefore = processCpuSeconds(broker.pid)
  const r = await run()
  const cpuAfter = processCpuSeconds(broker.pid)
  if (r.received !== expected) throw new Error(`${broker.name}: received ${r.received} messages, expected ${expected}`)
  return {
    rate: RECORDS / (r.ms / 1000),
    firstMs: r.firstMs,
    brokerCores: cpuBefore === undefined || cpuAfter === undefined ? undefined : (cpuAfter - cpuBefore) / (r.ms / 1000),
    clientCores: (r.cpuUserMs + r.cpuSystemMs) / r.ms,
  }
}

async function edgemqRound (edgemq: RunningBroker, n: number): Promise<Round> {
  return timed(edgemq, () => runSubscriber({
    host: edgemq.host, port: edgemq.port, clientId: `replay-${n}`, clean: true, subscribe: `$replay/earliest/${FILTER}`,
    // RECORDS history messages, then the $done marker.
    wantTopics: false, until: (count) => count === RECORDS + 1, timeoutMs: TIMEOUT_MS,
  }), RECORDS + 1)
}

async function mosquittoRound (bin: string, n: number): Promise<Round> {
  const dir = await dirs.make('mosquitto')
  const broker = await startMosquitto(bin, dir, ['max_queued_messages 0', 'max_queued_bytes 0', `max_inflight_messages ${WINDOW}`])
  try {
    const clientId = `backlog-${n}`
    // The persistent session subscribes and leaves; the backlog queues up for it.
    await runSubscriber({ host: broker.host, port: broker.port, clientId, clean: false, subscribe: FILTER, wantTopics: false, until: () => false, timeoutMs: 500 })
      .catch((err: Error) => { if (!/still waiting/.test(err.message)) throw err })
    info(`mosquitto round ${n}: publishing the backlog of ${RECORDS}`)
    await publishBacklog({ host: broker.host, port: broker.port, clientId: `publisher-${n}`, count: RECORDS, payloadBytes: PAYLOAD_BYTES, window: WINDOW, topic, timeoutMs: TIMEOUT_MS })
    return await timed(broker, () => runSubscriber({
      host: broker.host, port: broker.port, clientId, clean: false, wantTopics: false, until: (count) => count === RECORDS, timeoutMs: TIMEOUT_MS,
    }), RECORDS)
  } finally {
    await broker.stop()
    await dirs.remove(dir)
  }
}

async function main (): Promise<void> {
  const bin = findMosquitto(flag('mosquitto'))
  if (bin === null) {
    process.stderr.write('mqtt-replay bench: mosquitto not found (apt-get install mosquitto, or --mosquitto=PATH): it is the baseline\n')
    process.exit(1)
  }
  const dataDir = await dirs.make('replay')
  info(`writing ${RECORDS} records of ${PAYLOAD_BYTES} bytes`)
  const { seedMs, readRate } = await seed(dataDir)
  info(`written in ${Math.round(seedMs)} ms; store read ${Math.round(readRate)} records/s`)
  const edgemq = await startEdgemq(dataDir)
  const ours: Round[] = []
  const theirs: Round[] = []
  try {
    for (let n = 0; n < ROUNDS; n++) {
      const order = n % 2 === 0 ? ['edgemq', 'mosquitto'] : ['mosquitto', 'edgemq']
      for (const which of order) {
        const r = which === 'edgemq' ? await edgemqRound(edgemq, n) : await mosquittoRound(bin, n)
        ;(which === 'edgemq' ? ours : theirs).push(r)
        info(`round ${n} ${which}: ${Math.round(r.rate)} msgs/s, first message after ${round(r.firstMs, 1)} ms, broker ${r.brokerCores === undefined ? '?' : round(r.brokerCores, 2)} cores`)
      }
    }
  } finally {
    await edgemq.stop()
    await dirs.cleanup()
  }
  const value = median(ours.map((r) => r.rate))
  const params = {
    records: RECORDS, payloadBytes: PAYLOAD_BYTES, partitions: PARTITIONS, devices: DEVICES, window: WINDOW, rounds: ROUNDS, target: TARGET,
    edgemqRounds: ours.map((r) => Math.round(r.rate)),
    edgemqFirstMessageMs: ours.map((r) => round(r.firstMs, 1)),
    edgemqCores: ours.map((r) => (r.brokerCores === undefined ? Number.NaN : round(r.brokerCores, 2))),
    subscriberCores: ours.map((r) => round(r.clientCores, 2)),
  }
  report({
    bench: 'mqtt-replay.throughput', unit: 'msgs/s', value, better: 'higher',
    baseline: `Mosquitto ${mosquittoVersion(bin)} delivering the same number of queued QoS 1 messages to a reconnecting persistent session (in memory, max_inflight_messages ${WINDOW})`,
    baselineValue: median(theirs.map((r) => r.rate)),
    params: {
      ...params,
      mosquittoRounds: theirs.map((r) => Math.round(r.rate)),
      mosquittoCores: theirs.map((r) => (r.brokerCores === undefined ? Number.NaN : round(r.brokerCores, 2))),
      roundRatios: ours.map((r, i) => round(r.rate / (theirs[i] as Round).rate)),
    },
  })
  report({
    bench: 'mqtt-replay.vs-store-read', unit: 'msgs/s', value, better: 'higher',
    baseline: 'LogStore.read() of the same records in the bench process (all partitions, 1,000 records per read)',
    baselineValue: readRate,
    params,
  })
}

await main()
