/**
 * A real aedes broker on the project's session persistence (memory-level, each write its own batch in call order), on
 * a loopback port, for the tests that hold aedes' CONNECT steps at a chosen point (cut-short-clean-connect,
 * cut-short-connect-will, clean-step-before-read). What a restart finds is read by a second persistence on the same
 * database (`sessions`). Every broker started is closed by {@link closeSessionBrokers}, which the tests call after
 * each case.
 */
import net, { type AddressInfo } from 'node:net'
import { Aedes, type Client } from 'aedes'
import { MemoryLevel } from 'memory-level'
import type mqtt from 'mqtt'
import type { LevelDatabase } from '../../../../store/index.ts'
import { LevelSessionPersistence } from '../../../../gateway/mqtt/sessions/persistence.ts'
import type { RawConnection } from '../../../helpers/raw-mqtt.ts'

/** aedes' broker with the fields of the patch and of aedes the tests read, which its typings do not declare. */
export type PatchedBroker = Aedes & {
  clients: Record<string, Client | undefined>
  _registering: Map<string, Client[]>
  _connecting: Map<string, Set<Client>>
  /** The CONNECTs whose session read or clean step waits for another CONNECT of the id. */
  _waitingConnects?: Map<string, unknown>
}

export interface SessionBroker {
  readonly broker: PatchedBroker
  readonly persistence: LevelSessionPersistence
  readonly sessions: LevelDatabase
  readonly url: string
  /** MQTT.js clients and raw connections of the case, ended with the broker. */
  readonly clients: mqtt.MqttClient[]
  readonly raw: RawConnection[]
  /** Releases of takeovers still held ({@link holdTakeover}): a failed case leaves one, and the broker's close waits for it. */
  readonly held: Array<() => void>
}

const open: Array<SessionBroker & { readonly server: net.Server }> = []

/**
 * Starts a broker; `prepare` wraps or extends the persistence before aedes gets it. On `sessions`, a database another
 * broker of the case wrote, it starts as a gateway restarted on that data does; on a new database otherwise.
 */
export async function startSessionBroker (prepare: (persistence: LevelSessionPersistence) => void = () => {}, sessions = freshSessions()): Promise<SessionBroker> {
  const persistence = new LevelSessionPersistence(sessions)
  prepare(persistence)
  const broker = await Aedes.createBroker({ persistence: persistence as never }) as PatchedBroker
  const server = net.createServer((socket) => { broker.handle(socket) })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const started = { broker, persistence, sessions, server, url: `mqtt://127.0.0.1:${(server.address() as AddressInfo).port}`, clients: [], raw: [], held: [] }
  open.push(started)
  return started
}

function freshSessions (): LevelDatabase {
  const db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
  return db.sublevel<Buffer, Buffer>('sessions', { keyEncoding: 'buffer', valueEncoding: 'buffer' }) as unknown as LevelDatabase
}

/**
 * Makes the persistence record the session when aedes reads it, as the gateway's hook does (hooks/sessions.ts:
 * markSession): a `prepare` for {@link startSessionBroker}.
 */
export function markSessionOnRead (persistence: LevelSessionPersistence): void {
  const read = persistence.subscriptionsByClient.bind(persistence)
  persistence.subscriptionsByClient = async (client) => {
    const subs = await read(client)
    await persistence.markSession(client)
    return subs
  }
}

/** Closes every broker started, with its clients and connections (after each case). */
export async function closeSessionBrokers (): Promise<void> {
  for (const { broker, server, clients, raw, held } of open.splice(0)) {
    for (const release of held) release()
    for (const c of clients) c.end(true)
    for (const r of raw) r.destroy()
    await new Promise<void>((resolve) => broker.close(() => resolve()))
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
}

/** Waits for `done`, turn by turn of the event loop, bounded. */
export async function turnsUntil (done: () => boolean, turns = 10_000): Promise<void> {
  for (let k = 0; k < turns; k++) {
    if (done()) return
    await new Promise((resolve) => setImmediate(resolve))
  }
  throw new Error(`not done after ${turns} turns of the event loop`)
}

/**
 * Holds the DISCONNECT of a takeover of `holder` until released (once), as a socket that does not drain holds it: the
 * registration taking it over waits meanwhile. The release is also kept in `h.held`, for the close after the case.
 */
export function holdTakeover (h: SessionBroker, holder: Client): () => void {
  const disconnect = holder.disconnect.bind(holder)
  let release = (): void => {}
  holder.disconnect = ((packet: unknown, done: () => void) => { release = () => { disconnect(packet as never, done) } }) as Client['disconnect']
  const once = (): void => {
    const pending = release
    release = () => {}
    pending()
  }
  h.held.push(once)
  return once
}
