/**
 * Small MQTT.js (v5, protocol 3.1.1) helpers for integration tests that need
 * the raw outcome of a CONNECT or SUBSCRIBE — the CONNACK return code, the
 * SUBACK granted QoS — rather than a rejected promise, and bounded waits.
 */
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt'

export type ConnectOutcome =
  | { readonly ok: true, readonly client: MqttClient, readonly sessionPresent: boolean }
  /** returnCode: the CONNACK's return code, or null when the connection closed without one (e.g. a TLS refusal). */
  | { readonly ok: false, readonly returnCode: number | null, readonly error: string }

/**
 * Connects once (no reconnects) and reports what happened: connected, a
 * CONNACK with a non-zero return code, or a transport failure / timeout.
 */
export function tryConnect (url: string, options: IClientOptions = {}, timeoutMs = 8000): Promise<ConnectOutcome> {
  const client = mqtt.connect(url, { protocolVersion: 4, reconnectPeriod: 0, connectTimeout: timeoutMs, ...options })
  bufferEarlyMessages(client)
  return new Promise((resolve) => {
    let returnCode: number | null = null
    const errors: string[] = []
    let settled = false
    const finish = (outcome: ConnectOutcome): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      if (!outcome.ok) client.end(true)
      resolve(outcome)
    }
    const timer = setTimeout(() => finish({ ok: false, returnCode, error: `no CONNACK within ${timeoutMs} ms` }), timeoutMs)
    client.on('packetreceive', (packet) => {
      if (packet.cmd === 'connack') returnCode = packet.returnCode ?? null
    })
    client.once('connect', (connack) => finish({ ok: true, client, sessionPresent: connack.sessionPresent }))
    // Kept for the client's whole life: a later socket error must not become an unhandled 'error' event.
    client.on('error', (err) => {
      errors.push(err.message)
      finish({ ok: false, returnCode, error: err.message })
    })
    client.once('close', () => finish({ ok: false, returnCode, error: errors.join('; ') || 'connection closed' }))
  })
}

/** Connects or throws with the reason; for clients the test expects to be accepted. */
export async function connectOk (url: string, options: IClientOptions = {}): Promise<MqttClient> {
  const outcome = await tryConnect(url, options)
  if (!outcome.ok) throw new Error(`connect to ${url} as ${options.username ?? 'anonymous'} failed: CONNACK ${outcome.returnCode ?? 'none'}: ${outcome.error}`)
  return outcome.client
}

/** Connects or throws with the reason, and tells whether the CONNACK said a session was present. */
export async function connectSession (url: string, options: IClientOptions = {}): Promise<{ client: MqttClient, sessionPresent: boolean }> {
  const outcome = await tryConnect(url, options)
  if (!outcome.ok) throw new Error(`connect to ${url} failed: CONNACK ${outcome.returnCode ?? 'none'}: ${outcome.error}`)
  return { client: outcome.client, sessionPresent: outcome.sessionPresent }
}

/** Subscribes and returns the SUBACK's granted QoS per filter (128 = refused). */
export function subscribeGranted (client: MqttClient, filters: string | string[], qos: 0 | 1 | 2 = 1, timeoutMs = 5000): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no SUBACK for ${String(filters)} within ${timeoutMs} ms`)), timeoutMs)
    client.subscribe(filters, { qos }, (err, _granted, packet) => {
      clearTimeout(timer)
      if (packet !== undefined) resolve((packet.granted as unknown[]).map((g) => (typeof g === 'number' ? g : -1)))
      else reject(err ?? new Error('SUBACK without a packet'))
    })
  })
}

export interface Received { readonly topic: string, readonly payload: string }

/**
 * Records every message the client receives from now on. `live: true` leaves
 * out messages sent from the retained store (RETAIN set on delivery, which
 * [MQTT-3.3.1-9] reserves for those), so earlier tests' retained messages do
 * not show up in a later test's wide subscription.
 */
export function collect (client: MqttClient, options: { live?: boolean } = {}): Received[] {
  const got: Received[] = []
  const take = (topic: string, payload: Buffer, retain: boolean): void => {
    if (options.live === true && retain) return
    got.push({ topic, payload: payload.toString() })
  }
  // Messages that came before this call, in the CONNACK's own chunk (a persistent session's queue): MQTT.js emits
  // them before the code awaiting the connect can attach a listener.
  const early = earlyMessages.get(client)
  earlyMessages.delete(client)
  for (const m of early ?? []) take(m.topic, m.payload, m.retain)
  client.on('message', (topic, payload, packet) => { take(topic, payload, packet.retain) })
  return got
}

/** The payloads (as text) of every message the client receives, those of the CONNACK's chunk included (see collect). */
export function collectPayloads (client: MqttClient): string[] {
  const got: string[] = []
  const early = earlyMessages.get(client)
  earlyMessages.delete(client)
  for (const m of early ?? []) got.push(m.payload.toString())
  client.on('message', (_topic, payload) => { got.push(payload.toString()) })
  return got
}

interface EarlyMessage { readonly topic: string, readonly payload: Buffer, readonly retain: boolean }
/** Per client from tryConnect/connectOk: what it received until the first collect() (see there). */
const earlyMessages = new WeakMap<MqttClient, EarlyMessage[]>()

function bufferEarlyMessages (client: MqttClient): void {
  const early: EarlyMessage[] = []
  earlyMessages.set(client, early)
  const onMessage = (topic: string, payload: Buffer, packet: { retain: boolean }): void => {
    if (!earlyMessages.has(client)) { client.off('message', onMessage); return }
    early.push({ topic, payload, retain: packet.retain })
  }
  client.on('message', onMessage)
}

/** Polls `check` every 20 ms until it holds or `ms` pass; returns whether it held. */
export async function waitFor (check: () => boolean | Promise<boolean>, ms: number): Promise<boolean> {
  const until = Date.now() + ms
  while (!(await check())) {
    if (Date.now() >= until) return false
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  return true
}

/** Waits `ms` (used to give a message that must NOT arrive a fair chance to arrive). */
export function sleep (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

/** Closes clients without waiting for the broker (best effort, bounded). */
export async function endAll (clients: Iterable<MqttClient>): Promise<void> {
  await Promise.all([...clients].map((c) => new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, 2000)
    c.end(true, {}, () => { clearTimeout(timer); resolve() })
  })))
}

/** Sums the samples of `name` on the gateway's /metrics whose labels include `labels` (0 when none exists yet). */
export async function metricValue (httpUrl: string, name: string, labels: Readonly<Record<string, string>> = {}): Promise<number> {
  const res = await fetch(`${httpUrl}/metrics`, { signal: AbortSignal.timeout(5000) })
  const text = await res.text()
  let total = 0
  let found = false
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue
    const m = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line)
    if (m === null || m[1] !== name) continue
    const have = new Map([...(m[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1] as string, x[2] as string]))
    if (Object.entries(labels).every(([k, v]) => have.get(k) === v)) { total += Number(m[3]); found = true }
  }
  return found ? total : 0
}

/**
 * A PINGREQ/PINGRESP round trip on the client's connection: once it resolves, the client has received everything
 * the gateway wrote to it before answering. A PUBACK comes only after the message was written to every matching
 * subscriber (aedes calls back from mqemitter once each delivery is written), and the gateway reads a connection's
 * next packet only after the CONNECT is done, queued messages included; so after those, a round trip on a client
 * proves that a message it has not received will not come. Rejects if the connection closes first.
 */
export function roundTrip (client: MqttClient, ms = 5000): Promise<void> {
  return new Promise((resolve, reject) => {
    const finish = (err?: Error): void => {
      clearTimeout(timer)
      client.removeListener('packetreceive', onPacket)
      client.removeListener('close', onClose)
      if (err === undefined) resolve()
      else reject(err)
    }
    const onPacket = (packet: { cmd: string }): void => { if (packet.cmd === 'pingresp') finish() }
    const onClose = (): void => finish(new Error('the connection closed before the PINGRESP'))
    const timer = setTimeout(() => finish(new Error(`no PINGRESP within ${ms} ms`)), ms)
    client.on('packetreceive', onPacket)
    client.on('close', onClose)
    if (!client.connected) return finish(new Error('not connected'))
    client.sendPing()
  })
}
