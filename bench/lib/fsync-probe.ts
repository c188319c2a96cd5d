/**
 * What one durable commit and one loopback round trip cost on this machine,
 * measured the same way (a sequential loop; mean, median and p99), for the
 * fsync-bound ceiling of a load that keeps one message in flight per device:
 * with every waiting device's record in each group commit, the best a
 * gateway can do is one commit per (commit + round trip), so
 * devices / (commit + round trip) messages per second. The ceiling takes the
 * means: a rate is set by the mean cycle, and on a shared disk the sync
 * write's tail (p99 of several ms while other jobs fsync) moves the mean far
 * from the median.
 *
 * - `level`: a classic-level `batch()` of one 100-byte put with `sync: true`
 *   in a fresh database (LevelDB's write-ahead log append and fdatasync, via
 *   libuv's thread pool: the floor of edgemq's group commit);
 * - `fdatasync`: a 100-byte append to a plain file and `datasync()`, through
 *   the same thread pool (the disk alone);
 * - `roundTrip`: a QoS 1 PUBLISH and its PUBACK over loopback TCP to a child
 *   process that answers at once (lib/null-broker.ts): the network and two
 *   Node event loops, nothing else.
 */
import { open, rm } from 'node:fs/promises'
import net from 'node:net'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { ClassicLevel } from 'classic-level'
import { startListeningChild } from './brokers.ts'
import { frameAt, disconnectSocket } from './mqtt/frame.ts'
import { percentile } from './report.ts'

/** Mean, median and 99th percentile of one probe, in ms. */
export interface ProbeTimes { readonly meanMs: number, readonly p50Ms: number, readonly p99Ms: number, readonly samples: number }

export interface FsyncProbe {
  readonly level: ProbeTimes
  readonly fdatasync: ProbeTimes
  readonly roundTrip: ProbeTimes
}

const PAYLOAD = Buffer.alloc(100, 0x61)
/** Each probe runs this many times and at most this long, after a few unmeasured runs. */
const WARMUP = 20
const MAX_SAMPLES = 1000
const MAX_MS = 1500

function times (samples: number[]): ProbeTimes {
  const sorted = Float64Array.from(samples).sort()
  const meanMs = samples.reduce((a, b) => a + b, 0) / samples.length
  return { meanMs, p50Ms: percentile(sorted, 50), p99Ms: percentile(sorted, 99), samples: samples.length }
}

/** Runs `once` WARMUP times, then until MAX_SAMPLES or MAX_MS, timing each. */
async function loop (once: (i: number) => Promise<void>): Promise<ProbeTimes> {
  for (let i = 0; i < WARMUP; i++) await once(i)
  const samples: number[] = []
  const until = performance.now() + MAX_MS
  for (let i = 0; i < MAX_SAMPLES && performance.now() < until; i++) {
    const t0 = performance.now()
    await once(WARMUP + i)
    samples.push(performance.now() - t0)
  }
  return times(samples)
}

async function probeLevel (dir: string): Promise<ProbeTimes> {
  const location = path.join(dir, 'fsync-probe-db')
  const db = new ClassicLevel<Buffer, Buffer>(location, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await db.open()
  try {
    const key = Buffer.alloc(8)
    return await loop(async (i) => {
      key.writeBigUInt64BE(BigInt(i))
      await db.batch([{ type: 'put', key, value: PAYLOAD }], { sync: true })
    })
  } finally {
    await db.close()
    await rm(location, { recursive: true, force: true })
  }
}

async function probeFdatasync (dir: string): Promise<ProbeTimes> {
  const file = path.join(dir, 'fsync-probe.bin')
  const handle = await open(file, 'a')
  try {
    return await loop(async () => {
      await handle.write(PAYLOAD)
      await handle.datasync()
    })
  } finally {
    await handle.close()
    await rm(file, { force: true })
  }
}

const CONNECT = Buffer.from([0x10, 0x11, 0x00, 0x04, 0x4d, 0x51, 0x54, 0x54, 0x04, 0x02, 0x00, 0x3c, 0x00, 0x05, 0x70, 0x72, 0x6f, 0x62, 0x65])
const TOPIC = Buffer.from('devices/probe/telemetry/t')

function publishFrame (id: number): Buffer {
  const remaining = 2 + TOPIC.length + 2 + PAYLOAD.length
  if (remaining >= 128 * 128) throw new Error('the probe\'s PUBLISH needs a remaining length of at most two bytes')
  const header = remaining < 128 ? [0x32, remaining] : [0x32, (remaining & 0x7f) | 0x80, remaining >> 7] // PUBLISH QoS 1 [MQTT-2.2.3]
  const frame = Buffer.allocUnsafe(header.length + remaining)
  frame.set(header, 0)
  let at = header.length
  at = frame.writeUInt16BE(TOPIC.length, at)
  at += TOPIC.copy(frame, at)
  at = frame.writeUInt16BE(id, at)
  PAYLOAD.copy(frame, at)
  return frame
}

/** One packet read at a time from the socket: resolves with the next whole frame's type, rejects once the socket closed. */
function packetReader (socket: net.Socket): () => Promise<number> {
  let buf: Buffer = Buffer.alloc(0)
  let waiting: { resolve: (type: number) => void, reject: (err: Error) => void } | null = null
  let closed = false
  const take = (): void => {
    if (waiting === null) return
    const frame = frameAt(buf, 0)
    if (frame === null) {
      if (closed) waiting.reject(new Error('the round-trip probe\'s connection closed'))
      return
    }
    const type = (buf[0] as number) >> 4
    buf = buf.subarray(frame.body + frame.length)
    const { resolve } = waiting
    waiting = null
    resolve(type)
  }
  socket.on('data', (chunk: Buffer) => { buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]); take() })
  socket.on('close', () => { closed = true; take() })
  return () => new Promise((resolve, reject) => { waiting = { resolve, reject }; take() })
}

async function probeRoundTrip (): Promise<ProbeTimes> {
  const broker = await startListeningChild(fileURLToPath(new URL('./null-broker.ts', import.meta.url)), ['0'], 'null broker')
  try {
    const socket = net.connect(broker.port, '127.0.0.1')
    socket.setNoDelay(true)
    await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject) })
    const next = packetReader(socket)
    socket.write(CONNECT)
    if (await next() !== 2) throw new Error('the null broker did not answer CONNECT with CONNACK')
    const result = await loop(async (i) => {
      socket.write(publishFrame((i % 65535) + 1))
      if (await next() !== 4) throw new Error('the null broker did not answer PUBLISH with PUBACK')
    })
    await disconnectSocket(socket)
    return result
  } finally {
    await broker.stop()
  }
}

/** Runs the three probes one after another (never at once: each would slow the others), in `dir` (the data directory's file system). */
export async function probeFsync (dir: string): Promise<FsyncProbe> {
  const level = await probeLevel(dir)
  const fdatasync = await probeFdatasync(dir)
  const roundTrip = await probeRoundTrip()
  return { level, fdatasync, roundTrip }
}

/** Messages per second `devices` devices with one message in flight each can get at best: devices / (mean commit + mean round trip). */
export function fsyncCeiling (devices: number, probe: FsyncProbe, commit: (p: FsyncProbe) => ProbeTimes = (p) => p.level): number {
  return devices / ((commit(probe).meanMs + probe.roundTrip.meanMs) / 1000)
}
