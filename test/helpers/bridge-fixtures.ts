/**
 * Helpers for the bridge's integration tests: free ports for upstreams that
 * must come back on the same address, bounded polling, the bridge status of
 * a running gateway, and a device that publishes QoS 1 and records its acks.
 */
import mqtt from 'mqtt'
import { freePort } from '../../bench/lib/brokers.ts'
import { startMosquitto, type MosquittoProcess } from './mosquitto-process.ts'

export { freePort }

/** Polls `check` until it returns a value other than undefined, or fails after `timeoutMs` with `what`. */
export async function waitFor<T> (what: string, check: () => Promise<T | undefined> | T | undefined, timeoutMs = 30_000, everyMs = 100): Promise<T> {
  const until = Date.now() + timeoutMs
  let last: unknown
  for (;;) {
    try {
      const v = await check()
      if (v !== undefined) return v
    } catch (err) {
      last = err
    }
    if (Date.now() > until) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last === undefined ? '' : `: ${String(last)}`}`)
    await new Promise((resolve) => setTimeout(resolve, everyMs))
  }
}

export interface UpstreamStatusDoc {
  name: string
  kind: 'mqtt' | 'edgemq' | 'nats'
  mqttVersion: '5' | '3.1.1' | null
  dedupeId: 'user-property' | 'topic-prefix' | 'none' | 'nats-msg-id'
  connected: boolean
  reconnects: number
  connectFailures: number
  inflight: number
  forwardedMessages: number
  deadLettered: number
  commandsReceived: number
  lastError: { message: string, code?: string, at: string, resolvedAt: string | null } | null
  jetstream?: { stream: string, duplicateWindowMs: number, replicas: number, duplicateAcks: number } | null
  natsServer?: { name: string, version: string, jetstream: boolean } | null
  backlog: { messages: number, bytes: number, seconds: number }
  partitions: Array<{ tenant: string, stream: string, partition: number, committedOffset: number, forwardedOffset: number, logEndOffset: number, backlogMessages: number }>
}

export async function bridgeStatus (httpUrl: string): Promise<UpstreamStatusDoc[]> {
  // Bounded: a request the gateway never answers is an error waitFor retries and reports, not a wait until the test's timeout.
  const res = await fetch(`${httpUrl}/v1/bridge`, { signal: AbortSignal.timeout(20_000) })
  if (res.status !== 200) throw new Error(`GET /v1/bridge: ${res.status} ${await res.text()}`)
  return ((await res.json()) as { upstreams: UpstreamStatusDoc[] }).upstreams
}

/** Waits until upstream `name` has forwarded everything (no backlog, nothing in flight). */
export function drained (httpUrl: string, name: string, timeoutMs = 60_000): Promise<UpstreamStatusDoc> {
  return waitFor(`upstream ${name} to drain`, async () => {
    const s = (await bridgeStatus(httpUrl)).find((u) => u.name === name)
    return s !== undefined && s.connected && s.backlog.messages === 0 && s.inflight === 0 ? s : undefined
  }, timeoutMs)
}

/**
 * Publishes `count` QoS 1 messages per device (payload `<device>:<seq>`) with a
 * window in flight, and returns the acknowledged ones. Stops early, without
 * throwing, when the connection drops (the gateway was killed). A connect
 * that fails is an error: see publishAckedUntilKilled for publishers that
 * may still be connecting when the test kills the gateway.
 */
export function publishAcked (mqttUrl: string, devices: readonly string[], count: number, firstSeq = 0, window = 20): Promise<string[]> {
  return publish(mqttUrl, devices, count, firstSeq, window, false)
}

/**
 * publishAcked for a load the test SIGKILLs the gateway under: a device whose connect the dying gateway never answered
 * (closed, refused or reset) has nothing acknowledged, as one whose connection dropped; anything else still throws.
 */
export function publishAckedUntilKilled (mqttUrl: string, devices: readonly string[], count: number, firstSeq = 0, window = 20): Promise<string[]> {
  return publish(mqttUrl, devices, count, firstSeq, window, true)
}

async function publish (mqttUrl: string, devices: readonly string[], count: number, firstSeq: number, window: number, mayDie: boolean): Promise<string[]> {
  const acked: string[] = []
  await Promise.all(devices.map(async (device) => {
    // allowRetries false: a connection closed before its CONNACK rejects; MQTT.js' connectAsync otherwise waits for
    // ever when the server closes without an error, as a gateway SIGKILLed while a CONNECT waits for its answer does.
    // That is how the outage tests hung until their 300 s timeout: a publisher still connecting when the edge was killed.
    const client = await mqtt.connectAsync(mqttUrl, { clientId: `pub-${device}`, reconnectPeriod: 0, connectTimeout: 5000 }, false)
      .catch((err: unknown) => {
        if (mayDie && gatewayGone(err)) return null
        throw new Error(`pub-${device} could not connect to ${mqttUrl}: ${String(err)}`, { cause: err })
      })
    if (client === null) return
    client.on('error', () => {})
    let alive = true
    // MQTT.js keeps a dropped connection's in-flight publishes pending (for a reconnect we never make): stop waiting.
    const closed = new Promise<void>((resolve) => client.on('close', () => { alive = false; resolve() }))
    const inflight = new Set<Promise<void>>()
    for (let seq = firstSeq; seq < firstSeq + count && alive; seq++) {
      const payload = `${device}:${seq}`
      const p = client.publishAsync(`devices/${device}/telemetry/t`, payload, { qos: 1 })
        .then(() => { acked.push(payload) }, () => {})
        .finally(() => { inflight.delete(p) })
      inflight.add(p)
      if (inflight.size >= window) await withinDeadline(Promise.race([...inflight, closed]), () => `${inflight.size} publishes of ${device}`)
    }
    try {
      await withinDeadline(Promise.race([Promise.all(inflight), closed]), () => `${inflight.size} publishes of ${device}`)
    } finally {
      client.end(true)
    }
  }))
  return acked
}

/** A connect that failed because nothing answers any more: closed before CONNACK, refused or reset (not a refusal or a timeout). */
function gatewayGone (err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code
  return (err instanceof Error && err.message === 'Couldn\'t connect to server') || code === 'ECONNREFUSED' || code === 'ECONNRESET' || code === 'EPIPE'
}

/** How long publishAcked waits for a PUBACK on a connection that stays up. */
const PUBACK_DEADLINE_MS = 60_000

/** `wait`, or a clear error when no PUBACK came for PUBACK_DEADLINE_MS on a live connection (instead of a hung test). */
async function withinDeadline<T> (wait: Promise<T>, what: () => string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const stuck = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`no PUBACK for ${what()} within ${PUBACK_DEADLINE_MS} ms on a live connection`)), PUBACK_DEADLINE_MS)
  })
  try {
    return await Promise.race([wait, stuck])
  } finally {
    clearTimeout(timer)
  }
}

/** A delivery or expiry receipt as the bridge publishes it upstream (gateway/mqtt/commands.ts). */
export interface CommandReceipt { status: string, topic: string, command: string, upstream: string }

export interface CommandCloud {
  /** The upstream Mosquitto. */
  readonly upstream: MosquittoProcess
  /** The cloud's MQTT 5 client, subscribed to the site's receipts. */
  readonly cloud: mqtt.MqttClient
  readonly receipts: CommandReceipt[]
  /** The status of the first receipt for a local command topic, once it arrives. */
  receiptFor (topic: string): Promise<string>
}

/**
 * A Mosquitto upstream in `dir` and a cloud client collecting `site`'s command receipts; everything started is
 * pushed onto `cleanups`.
 */
export async function startCommandCloud (bin: string, dir: string, cleanups: Array<() => Promise<void>>, site = 'edge-1'): Promise<CommandCloud> {
  const up = await startMosquitto(bin, dir, await freePort())
  cleanups.push(() => up.kill())
  const cloud = await mqtt.connectAsync(up.url, { protocolVersion: 5, reconnectPeriod: 0 })
  cleanups.push(() => cloud.endAsync())
  const receipts: CommandReceipt[] = []
  cloud.on('message', (_topic, payload) => { receipts.push(JSON.parse(payload.toString()) as CommandReceipt) })
  await cloud.subscribeAsync(`sites/${site}/receipts/#`, { qos: 1 })
  return {
    upstream: up, cloud, receipts,
    receiptFor: (topic) => waitFor(`a receipt for ${topic}`, () => receipts.find((r) => r.topic === topic)?.status),
  }
}
