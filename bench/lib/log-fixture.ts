/**
 * The records the store benches write and read, and the two ways of holding
 * them: the store (`openLogStore`) and raw classic-level, their baseline.
 *
 * Records come from `appenders` devices (`dev-000` …, topic
 * `devices/<id>/telemetry`, QoS 1, client id = device id), each with one
 * fixed payload of `payloadBytes` (random bytes unless `payload` says
 * otherwise). The raw side stores the same records the plainest way a
 * LevelDB log could: one cbor array of `[timestamp, key, topic, payload,
 * qos, clientId, headers]` rows per value, RAW_RECORDS_PER_VALUE rows each
 * (the layout behind DESIGN.md's measured facts). It deliberately does not
 * use the store's batch encoder, so the baseline stays fixed while the
 * store's format changes.
 */
import { randomBytes } from 'node:crypto'
import { ClassicLevel } from 'classic-level'
import { Encoder } from 'cbor-x'
import { openLogStore, partitionForKey, type CommitStats, type Durability, type LogStore, type ReadOptions, type RecordInput } from '../../store/index.ts'

export const RAW_RECORDS_PER_VALUE = 1000
export const cbor = new Encoder({ useRecords: false, structuredClone: false, mapsAsObjects: true, variableMapSize: true })

export type RawDb = ClassicLevel<Buffer, Buffer>

export interface Device {
  readonly key: string
  readonly partition: number
  readonly record: RecordInput
  readonly topic: string
  readonly payload: Buffer
}

export interface FixtureOptions {
  readonly stream: string
  readonly partitions: number
  readonly appenders: number
  readonly payloadBytes: number
  /** A device's payload (exactly payloadBytes long); random bytes by default. */
  readonly payload?: (key: string) => Buffer
  /** Only devices whose key maps to this partition (so one partition holds every record). */
  readonly onlyPartition?: number
  /** A device's headers (as the gateway stamps `edgemq-user` on an authenticated client's records); none by default. */
  readonly headers?: (key: string) => Readonly<Record<string, string>>
}

export interface CommitTally { commits: number, records: number }

export function check (ok: boolean, message: string): void {
  if (!ok) throw new Error(`bench check failed: ${message}`)
}

export async function openRaw (location: string): Promise<RawDb> {
  const db = new ClassicLevel<Buffer, Buffer>(location, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await db.open()
  return db
}

/** Same shape as the store's batch keys: tag, stream id, partition, base offset. */
export function rawKey (partition: number, base: number): Buffer {
  const key = Buffer.allocUnsafe(17)
  key[0] = 0x42
  key.writeUInt32BE(1, 1)
  key.writeUInt32BE(partition, 5)
  key.writeUInt32BE(Math.floor(base / 2 ** 32), 9)
  key.writeUInt32BE(base % 2 ** 32, 13)
  return key
}

/** Calls `onValues` with the raw db's values in key order, 8 at a time (one iterator round trip each). */
export async function forEachRawValues (db: RawDb, onValues: (values: Buffer[]) => Promise<void> | void): Promise<void> {
  const iterator = db.iterator()
  try {
    for (;;) {
      const entries = await iterator.nextv(8)
      if (entries.length === 0) return
      await onValues(entries.map(([, value]) => value))
    }
  } finally {
    await iterator.close()
  }
}

export async function openStore (location: string, tally?: CommitTally, durability: Durability = 'sync'): Promise<LogStore> {
  const onCommit = tally === undefined ? undefined : (s: CommitStats): void => { tally.commits++; tally.records += s.records }
  return openLogStore({ location, durability, observer: { onCommit } })
}

export class LogFixture {
  readonly stream: string
  readonly partitions: number
  readonly payloadBytes: number
  readonly devices: readonly Device[]
  /** The partitions the raw side writes: all, or `onlyPartition`. */
  readonly used: readonly number[]

  constructor (options: FixtureOptions) {
    this.stream = options.stream
    this.partitions = options.partitions
    this.payloadBytes = options.payloadBytes
    const devices: Device[] = []
    for (let i = 0; devices.length < options.appenders; i++) {
      const key = `dev-${String(i).padStart(3, '0')}`
      const partition = partitionForKey(key, options.partitions)
      if (options.onlyPartition !== undefined && partition !== options.onlyPartition) continue
      const topic = `devices/${key}/telemetry`
      const payload = options.payload?.(key) ?? randomBytes(options.payloadBytes)
      check(payload.length === options.payloadBytes, `payload of ${key} is ${payload.length} bytes, not ${options.payloadBytes}`)
      const headers = options.headers?.(key)
      const record: RecordInput = headers === undefined ? { payload, topic, qos: 1, clientId: key } : { payload, topic, qos: 1, clientId: key, headers }
      devices.push({ key, partition, record, topic, payload })
    }
    this.devices = devices
    this.used = options.onlyPartition === undefined ? Array.from({ length: options.partitions }, (_, p) => p) : [options.onlyPartition]
  }

  rawRow (d: Device): unknown[] {
    return [Date.now(), d.key, d.topic, d.payload, 1, d.key, null]
  }

  /** `count` distinct values of RAW_RECORDS_PER_VALUE rows each, encoded before any timing starts. */
  preEncodedValues (count: number): Buffer[] {
    const values: Buffer[] = []
    for (let v = 0; v < count; v++) {
      const rows: unknown[] = []
      for (let i = 0; i < RAW_RECORDS_PER_VALUE; i++) rows.push(this.rawRow(this.devices[(v * 7 + i) % this.devices.length] as Device))
      values.push(cbor.encode(rows))
    }
    return values
  }

  /** Writes `records` as one value per used partition per write (`sync` by default); returns records/s. */
  async rawAppend (db: RawDb, records: number, values: readonly Buffer[], sync = true): Promise<number> {
    const parts = this.used
    const perWrite = parts.length * RAW_RECORDS_PER_VALUE
    const writes = Math.ceil(records / perWrite)
    const t0 = performance.now()
    for (let w = 0; w < writes; w++) {
      const ops: Array<{ type: 'put', key: Buffer, value: Buffer }> = new Array(parts.length)
      for (let k = 0; k < parts.length; k++) {
        ops[k] = { type: 'put', key: rawKey(parts[k] as number, w * RAW_RECORDS_PER_VALUE), value: values[(w * parts.length + k) % values.length] as Buffer }
      }
      await db.batch(ops, { sync })
    }
    return (writes * perWrite) / ((performance.now() - t0) / 1000)
  }

  /** Iterates the whole raw db and cbor-decodes every value; returns records/s. */
  async rawRead (db: RawDb, expected: number): Promise<number> {
    const t0 = performance.now()
    let records = 0
    let bytes = 0
    await forEachRawValues(db, (values) => {
      for (const value of values) {
        const rows = cbor.decode(value) as unknown[][]
        for (const row of rows) bytes += (row[3] as Uint8Array).byteLength
        records += rows.length
      }
    })
    const seconds = (performance.now() - t0) / 1000
    check(records === expected && bytes === expected * this.payloadBytes, `raw read saw ${records} records, expected ${expected}`)
    return records / seconds
  }

  /** One appender: keeps `window` appends in flight until it has appended `count`. */
  appender (store: LogStore, device: Device, count: number, window: number): Promise<void> {
    return new Promise((resolve, reject) => {
      let issued = 0
      let done = 0
      const next = (): void => {
        issued++
        store.append(this.stream, device.key, device.record).then(onDone, reject)
      }
      const onDone = (): void => {
        if (++done === count) resolve()
        else if (issued < count) next()
      }
      if (count === 0) resolve()
      for (let k = 0; k < window && k < count; k++) next()
    })
  }

  /** Appends `records` spread over the appenders; returns records/s. */
  async storeAppend (store: LogStore, records: number, window: number): Promise<number> {
    const perAppender = Math.ceil(records / this.devices.length)
    const t0 = performance.now()
    await Promise.all(this.devices.map((d) => this.appender(store, d, perAppender, window)))
    return (perAppender * this.devices.length) / ((performance.now() - t0) / 1000)
  }

  /** Reads every partition from its start to its end with `options` (read()'s defaults when absent); returns records/s. */
  async storeRead (store: LogStore, expected: number, options?: ReadOptions): Promise<number> {
    const t0 = performance.now()
    let records = 0
    let bytes = 0
    for (let p = 0; p < this.partitions; p++) {
      const info = store.partitionInfo(this.stream, p)
      let offset = info.logStartOffset
      while (offset < info.logEndOffset) {
        const result = await store.read(this.stream, p, offset, options)
        for (const r of result.records) bytes += r.payload.byteLength
        records += result.records.length
        offset = result.nextOffset
      }
    }
    const seconds = (performance.now() - t0) / 1000
    check(records === expected && bytes === expected * this.payloadBytes, `store read saw ${records} records, expected ${expected}`)
    return records / seconds
  }

  storeRecordCount (store: LogStore): number {
    let n = 0
    for (let p = 0; p < this.partitions; p++) n += store.partitionInfo(this.stream, p).logEndOffset
    return n
  }
}
