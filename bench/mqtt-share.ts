/**
 * `npm run bench -- mqtt-share`: how fast a shared subscription
 * (`$share/<group>/devices/+/telemetry/#`) drains a backlog of the log to its
 * members, against `$replay/earliest/<same filter>` delivering the same
 * records to one subscriber of the same gateway in the same run (the log's
 * other MQTT read path, with its own window of 1,000). One JSON line per
 * figure on stdout (lib/report.ts); progress on stderr.
 *
 * The log: `--records` (default 200,000) records of 100 bytes from 100
 * devices in `default/telemetry`, 8 partitions, written before the gateway
 * starts, together with one share group per round committed at offset 0 (a
 * share that never committed would start at the log end). edgemq runs as
 * `edgemq start` with the embedded default config (`mqtt.share.inflight`
 * 100 per member).
 *
 * Each member (lib/replay-clients.ts) acknowledges every PUBLISH at once; a
 * round ends when the members together received every record. Throughput is
 * records over the time from the first member's connect to the last record;
 * the replay is timed the same way, to its `$done` marker. Rounds alternate
 * the share (1 member, then 2, then 1 MQTT 5 member) and the replay; the
 * figures are medians. The MQTT 5 member's figure has the same run's 3.1.1
 * member as its baseline: what framing each record with its properties
 * (the record's partition, offset and time as user properties) costs.
 * Arguments: `--quick` (one round of 50,000 records), `--records=N`,
 * `--rounds=N`.
 */
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { shareGroupId } from '../gateway/mqtt/shared/share-topic.ts'
import { openLogStore } from '../store/index.ts'
import { startEdgemq, type RunningBroker } from './lib/brokers.ts'
import { runSubscriber } from './lib/replay-clients.ts'
import { TempDirs, info, median, report } from './lib/report.ts'
import { argv, intFlag } from './lib/flags.ts'

const QUICK = argv.includes('--quick')
const RECORDS = intFlag('records', QUICK ? 50_000 : 200_000)
const ROUNDS = intFlag('rounds', QUICK ? 1 : 3)
const PAYLOAD_BYTES = 100
const DEVICES = 100
const PARTITIONS = 8
const FILTER = 'devices/+/telemetry/#'
const MEMBER_COUNTS = [1, 2] as const
const TIMEOUT_MS = 300_000

/** The share rounds: members, and their protocol version. */
const SHARE_KINDS = [...MEMBER_COUNTS.map((members) => ({ members, version: 4 as const })), { members: 1, version: 5 as const }]
type ShareKind = typeof SHARE_KINDS[number]
const groupOf = (round: number, kind: ShareKind): string => `bench-${round}-${kind.members}-v${kind.version}`
const dirs = new TempDirs()

/** Writes the log, and every round's share group at offset 0, into `<dataDir>/db`. */
async function seed (dataDir: string): Promise<void> {
  const store = await openLogStore({ location: path.join(dataDir, 'db'), durability: 'async' })
  await store.createStream('default/telemetry', { partitions: PARTITIONS })
  const payload = Buffer.alloc(PAYLOAD_BYTES, 0x61)
  for (let i = 0; i < RECORDS; i += 10_000) {
    await Promise.all(Array.from({ length: Math.min(10_000, RECORDS - i) }, (_, k) => {
      const device = `dev-${(i + k) % DEVICES}`
      return store.append('default/telemetry', device, { payload, topic: `devices/${device}/telemetry/t`, qos: 1, clientId: device })
    }))
  }
  for (let n = 0; n < ROUNDS; n++) {
    for (const kind of SHARE_KINDS) {
      const group = shareGroupId('default', groupOf(n, kind), FILTER)
      await store.setGroup(group, { holdsRetention: false })
      for (let p = 0; p < PARTITIONS; p++) await store.commitOffset(group, 'default/telemetry', p, 0)
    }
  }
  await store.close()
}

/** Members of one share drain the backlog together; records per second. */
async function shareRound (edgemq: RunningBroker, n: number, kind: ShareKind): Promise<number> {
  const { members, version } = kind
  let total = 0
  let stop = (): void => {}
  const stopped = new Promise<void>((resolve) => { stop = resolve })
  const started = performance.now()
  let ended = 0
  const results = await Promise.all(Array.from({ length: members }, (_, m) => runSubscriber({
    host: edgemq.host, port: edgemq.port, clientId: `share-${n}-${members}-v${version}-${m}`, clean: true, protocolVersion: version,
    subscribe: `$share/${groupOf(n, kind)}/${FILTER}`, wantTopics: false, timeoutMs: TIMEOUT_MS, stop: stopped,
    until: () => {
      if (++total < RECORDS) return false
      ended = performance.now()
      stop()
      return true
    },
  })))
  const received = results.reduce((sum, r) => sum + r.received, 0)
  if (received !== RECORDS) throw new Error(`share of ${members}: received ${received} messages, expected ${RECORDS}`)
  return RECORDS / ((ended - started) / 1000)
}

async function replayRound (edgemq: RunningBroker, n: number): Promise<number> {
  const started = performance.now()
  const r = await runSubscriber({
    host: edgemq.host, port: edgemq.port, clientId: `replay-${n}`, clean: true, subscribe: `$replay/earliest/${FILTER}`,
    wantTopics: false, until: (count) => count === RECORDS + 1, timeoutMs: TIMEOUT_MS,
  })
  if (r.received !== RECORDS + 1) throw new Error(`replay: received ${r.received} messages, expected ${RECORDS + 1}`)
  return RECORDS / ((performance.now() - started) / 1000)
}

async function main (): Promise<void> {
  const dataDir = await dirs.make('share')
  info(`writing ${RECORDS} records of ${PAYLOAD_BYTES} bytes`)
  await seed(dataDir)
  const edgemq = await startEdgemq(dataDir)
  const shares = new Map<ShareKind, number[]>(SHARE_KINDS.map((k) => [k, []]))
  const replays: number[] = []
  try {
    for (let n = 0; n < ROUNDS; n++) {
      const replayFirst = n % 2 === 1
      if (replayFirst) replays.push(await replayRound(edgemq, n))
      for (const kind of SHARE_KINDS) {
        const rate = await shareRound(edgemq, n, kind)
        shares.get(kind)?.push(rate)
        info(`round ${n} share of ${kind.members} (MQTT ${kind.version === 5 ? '5' : '3.1.1'}): ${Math.round(rate)} msgs/s`)
      }
      if (!replayFirst) replays.push(await replayRound(edgemq, n))
      info(`round ${n} replay: ${Math.round(replays[replays.length - 1] as number)} msgs/s`)
    }
  } finally {
    await edgemq.stop()
    await dirs.cleanup()
  }
  for (const kind of SHARE_KINDS.filter((k) => k.version === 4)) {
    const { members } = kind
    const rates = shares.get(kind) as number[]
    report({
      bench: `mqtt-share.drain-${members}-member${members === 1 ? '' : 's'}`, unit: 'msgs/s', value: median(rates), better: 'higher',
      baseline: '$replay/earliest of the same records to one QoS 1 subscriber of the same gateway (window 1,000)',
      baselineValue: median(replays),
      params: {
        records: RECORDS, payloadBytes: PAYLOAD_BYTES, partitions: PARTITIONS, devices: DEVICES, members, rounds: ROUNDS, inflightPerMember: 100,
        shareRounds: rates.map(Math.round), replayRounds: replays.map(Math.round),
      },
    })
  }
  const v4 = shares.get(SHARE_KINDS[0] as ShareKind) as number[]
  const v5 = shares.get(SHARE_KINDS[SHARE_KINDS.length - 1] as ShareKind) as number[]
  report({
    bench: 'mqtt-share.drain-1-member-mqtt5', unit: 'msgs/s', value: median(v5), better: 'higher',
    baseline: 'the same share drained by one MQTT 3.1.1 member in the same run (records framed without properties)',
    baselineValue: median(v4),
    params: {
      records: RECORDS, payloadBytes: PAYLOAD_BYTES, partitions: PARTITIONS, devices: DEVICES, members: 1, rounds: ROUNDS, inflightPerMember: 100,
      mqtt5Rounds: v5.map(Math.round), mqtt311Rounds: v4.map(Math.round),
    },
  })
}

await main()
