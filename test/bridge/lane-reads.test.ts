/**
 * An uplink's lanes when a higher-priority lane's read of the log fails: it holds lower-priority lanes back only
 * while the read is in flight (lanes.ts), so a read that fails, again and again (a damaged batch), or finds the
 * records gone (the disk budget deleted them), must let the telemetry backlog go on. A real UplinkCore on a LevelDB
 * temp dir, with a transport that acknowledges each message on the next turn, one in flight.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { openLogStore, StoreError, systemClock, type LogStore, type StoredRecord } from '../../store/index.ts'
import { UplinkCore } from '../../bridge/uplink/core.ts'
import { advance, type Lane, type Pending } from '../../bridge/lanes.ts'
import { parseTemplate, RECORD_VARIABLES } from '../../bridge/topic-template.ts'
import type { UpstreamConfig } from '../../bridge/config-schema.ts'

const TELEMETRY = 2000
/** Telemetry messages sent before the alarm is appended. */
const BEFORE_ALARM = 100

const cleanup: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const step of cleanup.splice(0).reverse()) await step()
})

interface Run {
  readonly store: LogStore
  readonly sent: string[]
  readonly errors: string[]
  readonly warnings: string[]
  /** Resolves once the telemetry backlog went out; its message names what was sent if it did not. */
  readonly allSent: Promise<void>
}

/**
 * Telemetry (priority 0) has TELEMETRY records; one alarm (priority 5) is appended once BEFORE_ALARM of them went
 * out. Its reads fail with `failAlarmRead`, the first only after an acknowledgement's pump found that lane reading
 * and sent nothing (telemetry waits for the read, nothing is in flight): only the failure can let it go on.
 */
async function run (failAlarmRead: (store: LogStore) => Error): Promise<Run> {
  const dir = await mkdtemp(join(tmpdir(), 'edgemq-lane-reads-'))
  const store = await openLogStore({ location: dir })
  cleanup.push(async () => { await store.close(); await rm(dir, { recursive: true, force: true }) })
  await store.createStream('acme/telemetry', { partitions: 1 })
  await store.createStream('acme/alarms', { partitions: 1 })
  for (let from = 0; from < TELEMETRY; from += 500) {
    await Promise.all(Array.from({ length: 500 }, async (_v, i) => await store.append('acme/telemetry', 'k', { payload: Buffer.from(`t${from + i}`), topic: 't', qos: 1 })))
  }
  const sent: string[] = []
  let alarmReading = false
  let release = (): void => {}
  const released = new Promise<void>((resolve) => { release = resolve })
  const read = store.read.bind(store)
  store.read = async (stream, partition, from, options) => {
    if (stream !== 'acme/alarms') return await read(stream, partition, from, options)
    alarmReading = true
    await released
    throw failAlarmRead(store)
  }
  const config = {
    name: 'cloud', region: 'r', url: 'mqtt://127.0.0.1:1', kind: 'mqtt', mqttVersion: 'auto', tls: { rejectUnauthorized: true },
    forward: [{ tenant: 'acme', stream: 'telemetry', filter: '#', priority: 0 }, { tenant: 'acme', stream: 'alarms', filter: '#', priority: 5 }],
    topicTemplate: '{topic}', maxInflight: 1, maxMessagesPerSecond: 0, maxBytesPerSecond: 0, maxDeliveryAttempts: 3,
    reconnectMinMs: 50, reconnectMaxMs: 500, connectTimeoutMs: 1000, keepaliveSeconds: 30, commands: [], receiptTopic: 'r/{topic}',
    nats: {},
  } as unknown as UpstreamConfig
  const errors: string[] = []
  const warnings: string[] = []
  const logger = {
    info: () => {},
    warn: (_f: Record<string, unknown>, m: string) => { warnings.push(m) },
    error: (_f: Record<string, unknown>, m: string) => { errors.push(m) },
  }
  let done = (): void => {}
  const allSent = new Promise<void>((resolve) => { done = resolve })
  const room = (): boolean => core.inflight < 1
  const send = (lane: Lane, entry: Pending): void => {
    core.inflight++
    sent.push(`${lane.name}:${(entry.record as StoredRecord).offset}`)
    if (sent.length === BEFORE_ALARM) void store.append('acme/alarms', 'k', { payload: Buffer.from('a0'), topic: 'a', qos: 1 })
    if (sent.filter((s) => s.startsWith('telemetry:')).length === TELEMETRY) done()
    setImmediate(() => {
      core.acked(lane, entry)
      advance(lane)
      core.inflight--
      core.refill(1, false)
    })
  }
  const core: UplinkCore = new UplinkCore(config, { store, gatewayId: 'edge', clock: systemClock, logger, commitIntervalMs: 100_000 }, {
    ready: () => true,
    pump: () => {
      core.drain(room, () => null, send)
      core.fillEmpty()
      // The pump sent nothing while the alarm's read is in flight (telemetry waits for it): now let it fail.
      if (alarmReading && core.inflight === 0) release()
    },
    deadLettered: () => {},
  })
  await core.start(() => ({ record: parseTemplate('{topic}', RECORD_VARIABLES), receipt: parseTemplate('{topic}', RECORD_VARIABLES) }))
  cleanup.push(async () => { await core.stop(async () => {}) })
  core.catchUp()
  core.schedulePump()
  return { store, sent, errors, warnings, allSent }
}

describe('an uplink lane whose read fails', () => {
  it('holds lower-priority lanes back only while its read is in flight: a read that keeps failing lets the telemetry backlog go on', async () => {
    const r = await run(() => new Error('damaged batch (injected)'))
    await r.allSent
    expect(r.sent.filter((s) => s.startsWith('telemetry:'))).toEqual(Array.from({ length: TELEMETRY }, (_v, i) => `telemetry:${i}`))
    expect(r.errors).toContain('reading the log failed; retrying')
    expect(r.sent).not.toContain('alarms:0')
  }, 30_000)

  it('lets the lower-priority lanes go when retention deleted the records it was reading', async () => {
    const r = await run((store) => {
      const info = store.partitionInfo.bind(store)
      // The disk budget deleted the alarm meanwhile: the partition starts at its end.
      store.partitionInfo = (stream, partition) => {
        const p = info(stream, partition)
        return stream === 'acme/alarms' ? { ...p, logStartOffset: p.logEndOffset } : p
      }
      return new StoreError('STORE_OFFSET_OUT_OF_RANGE', 'below the log start (injected)')
    })
    await r.allSent
    expect(r.sent.filter((s) => s.startsWith('telemetry:'))).toHaveLength(TELEMETRY)
    expect(r.warnings).toContain('records dropped by retention before they were forwarded')
    expect(r.errors).toEqual([])
  }, 30_000)
})
