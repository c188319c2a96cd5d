/**
 * A device that publishes QoS 1 at full speed and records every PUBACK, for
 * the tests that kill a gateway (or cut its standby's link) under load and
 * then compare its log with what was acknowledged (ack-durability,
 * replication takeover, link cut, standby restart).
 */
import type mqtt from 'mqtt'

export interface Acked { readonly device: string, readonly seq: number }

export interface PublishOptions {
  readonly window: number
  readonly maxMs: number
  /** Polled between publishes: once true, no new publish starts and the ones in flight are awaited (until maxMs), then the client ends. */
  readonly stop?: () => boolean
  /** Bytes of padding in each payload (default none). */
  readonly padding?: number
}

/** The payload a publisher sends for `seq`: what the tests look for in the log. */
export function ackedPayload (device: string, seq: number, padding = 0): string {
  return JSON.stringify(padding === 0 ? { device, seq } : { device, seq, pad: 'x'.repeat(padding) })
}

/**
 * Publishes `{device, seq}` on `devices/<device>/telemetry/seq` with up to `window` in flight until the connection
 * dies under it, `stop` says so, or `maxMs` passes; pushes each acknowledged one to `acked`. Returns the next unused seq.
 */
export async function publishUntilKilled (client: mqtt.MqttClient, device: string, firstSeq: number, acked: Acked[],
  options: PublishOptions): Promise<number> {
  let seq = firstSeq
  let alive = client.connected
  client.on('close', () => { alive = false })
  const inflight = new Set<Promise<void>>()
  const deadline = Date.now() + options.maxMs
  const stopped = options.stop ?? (() => false)
  while (alive && Date.now() < deadline && !stopped()) {
    while (inflight.size < options.window && alive && !stopped()) {
      const s = seq++
      const p = client.publishAsync(`devices/${device}/telemetry/seq`, ackedPayload(device, s, options.padding), { qos: 1 })
        .then(() => { acked.push({ device, seq: s }) }, () => {})
        .finally(() => { inflight.delete(p) })
      inflight.add(p)
    }
    // The next ack, or a moment if none comes (the connection may be half-dead): bounded by the deadline above.
    await Promise.race([...inflight, new Promise((resolve) => setTimeout(resolve, 50))])
  }
  // Stopped: the publishes in flight are answered before the client goes (bounded by the same deadline).
  while (alive && stopped() && inflight.size > 0 && Date.now() < deadline) await Promise.race([...inflight, new Promise((resolve) => setTimeout(resolve, 50))])
  client.end(true)
  return seq
}
