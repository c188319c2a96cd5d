/**
 * A device that publishes QoS 1 at full speed and records every PUBACK, for
 * the tests that kill a gateway under load and then compare its log with
 * what was acknowledged (ack-durability, replication takeover).
 */
import type mqtt from 'mqtt'

export interface Acked { readonly device: string, readonly seq: number }

/**
 * Publishes `{device, seq}` on `devices/<device>/telemetry/seq` with up to `window` in flight until the connection
 * dies under it or `maxMs` passes; pushes each acknowledged one to `acked`. Returns the next unused seq.
 */
export async function publishUntilKilled (client: mqtt.MqttClient, device: string, firstSeq: number, acked: Acked[],
  options: { readonly window: number, readonly maxMs: number }): Promise<number> {
  let seq = firstSeq
  let alive = client.connected
  client.on('close', () => { alive = false })
  const inflight = new Set<Promise<void>>()
  const deadline = Date.now() + options.maxMs
  while (alive && Date.now() < deadline) {
    while (inflight.size < options.window && alive) {
      const s = seq++
      const p = client.publishAsync(`devices/${device}/telemetry/seq`, JSON.stringify({ device, seq: s }), { qos: 1 })
        .then(() => { acked.push({ device, seq: s }) }, () => {})
        .finally(() => { inflight.delete(p) })
      inflight.add(p)
    }
    // The next ack, or a moment if none comes (the connection may be half-dead): bounded by the deadline above.
    await Promise.race([...inflight, new Promise((resolve) => setTimeout(resolve, 50))])
  }
  client.end(true)
  return seq
}
