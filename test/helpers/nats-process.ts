/**
 * A real `nats-server` with JetStream as the bridge's upstream, started by
 * the tests through bench/lib/nats-server.ts (as the Mosquitto helper uses
 * bench/lib/brokers.ts). `natsPolicy` follows mosquittoPolicy: without
 * nats-server the suites skip, except under CI=true, where one test fails
 * instead (.ci/run installs it).
 *
 * Also: reading back what a stream holds, for the tests' exactly-once counts.
 */
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager, type JsMsg } from '@nats-io/jetstream'
import { connect, type NatsConnection, type NodeConnectionOptions } from '@nats-io/transport-node'
import { findNatsServer } from '../../bench/lib/nats-server.ts'

export { findNatsServer, startNatsCluster, startNatsServer, type NatsNodeOptions, type NatsServerProcess } from '../../bench/lib/nats-server.ts'

export function natsPolicy (): { bin: string | null, missingInCi: boolean } {
  const bin = findNatsServer()
  return { bin, missingInCi: bin === null && process.env.CI === 'true' }
}

export async function natsClient (servers: string | readonly string[], options: NodeConnectionOptions = {}): Promise<NatsConnection> {
  return await connect({ servers: typeof servers === 'string' ? servers : [...servers], ...options })
}

/** One message of a stream as the tests look at it. */
export interface StoredNatsMessage {
  readonly seq: number
  readonly subject: string
  readonly msgId: string
  readonly payload: string
  readonly headers: Readonly<Record<string, string>>
}

/** Every message of `stream`, in stream order, read with an ephemeral pull consumer (bounded by the stream's count). */
export async function readStream (nc: NatsConnection, stream: string): Promise<StoredNatsMessage[]> {
  const jsm = await jetstreamManager(nc)
  const total = (await jsm.streams.info(stream)).state.messages
  const out: StoredNatsMessage[] = []
  if (total === 0) return out
  const info = await jsm.consumers.add(stream, { ack_policy: AckPolicy.None, deliver_policy: DeliverPolicy.All, inactive_threshold: 60_000_000_000 })
  const consumer = await jetstream(nc).consumers.get(stream, info.name)
  while (out.length < total) {
    const batch = await consumer.fetch({ max_messages: Math.min(5000, total - out.length), expires: 5000 })
    let got = 0
    for await (const m of batch) {
      got++
      out.push(toStored(m))
    }
    if (got === 0) throw new Error(`stream ${stream}: read ${out.length} of ${total} messages, then nothing more`)
  }
  await jsm.consumers.delete(stream, info.name).catch(() => {})
  return out
}

function toStored (m: JsMsg): StoredNatsMessage {
  const headers: Record<string, string> = {}
  for (const [k, v] of m.headers ?? []) headers[k] = v[0] ?? ''
  return { seq: m.seq, subject: m.subject, msgId: headers['Nats-Msg-Id'] ?? '', payload: m.string(), headers }
}
