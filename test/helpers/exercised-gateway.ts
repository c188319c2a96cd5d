/**
 * A live gateway (`edgemq start` in a child process) set up so that every
 * labelled series the dashboards and alert rules read exists: two tenants on
 * two listeners, a device user, a retention-holding consumer group seeded in
 * the data directory before start, and a small disk budget so retention drops
 * records that group has not consumed. Helpers drive it: refused and failed
 * logins, an ACL-denied publish, a bounded MQTT.js publish load, and a real
 * failed log write (the process' file-size limit lowered with prlimit, so
 * LevelDB's writes fail with EFBIG; raised again, the store recovers).
 */
import { execFileSync } from 'node:child_process'
import path from 'node:path'
import mqtt, { type MqttClient } from 'mqtt'
import { hashPassword } from '../../gateway/auth.ts'
import { openLogStore } from '../../store/index.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from './gateway-process.ts'

export const GROUP = 'uplink-test'
const DEVICE_USER = 'sensor-7'
const DEVICE_PASSWORD = 'not-a-secret'

export interface ExercisedGateway {
  readonly gw: GatewayProcess
  /** Anonymous clients, tenant "default". */
  readonly openUrl: string
  /** Users only (tenant "acme"). */
  readonly secureUrl: string
  /** host:port of the HTTP server, for a scrape config. */
  readonly httpTarget: string
  metrics (): Promise<string>
  /** A failed login and an anonymous client on the users-only listener; a device publishing outside its ACL. */
  refusals (): Promise<void>
  /** `publishers` anonymous devices plus the device user publish for `durationMs` (bounded), QoS 0 and 1. */
  load (durationMs: number, publishers?: number): Promise<number>
  /** Makes log writes fail until one store error is counted, holds the fault for `holdMs`, then lets the store recover. */
  failWrites (holdMs: number): Promise<void>
  close (): Promise<void>
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

async function withTimeout<T> (promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([promise, new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(what)), ms) })])
  } finally {
    clearTimeout(timer)
  }
}

/** Connects once, no reconnects; rejects on a refused CONNACK. */
function connect (url: string, options: mqtt.IClientOptions): Promise<MqttClient> {
  return mqtt.connectAsync(url, { protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000, ...options })
}

/** Resolves when the connection attempt ended, whatever the outcome (used for the refusals). */
async function attempt (url: string, options: mqtt.IClientOptions): Promise<void> {
  try { (await connect(url, options)).end(true) } catch { /* refused: what these attempts are for */ }
}

export async function startExercisedGateway (): Promise<ExercisedGateway> {
  const { dir, cleanup } = await tempDir('edgemq-dash-')
  const dataDir = path.join(dir, 'data')
  try {
    // A retention-holding group that never consumes, committed at offset 0, so the disk budget drops records it needs.
    const seed = await openLogStore({ location: path.join(dataDir, 'db') })
    await seed.createStream('default/telemetry', { partitions: 8 })
    await seed.setGroup(GROUP, { holdsRetention: true })
    for (let p = 0; p < 8; p++) await seed.commitOffset(GROUP, 'default/telemetry', p, 0)
    await seed.close()

    const config = await writeConfig(dir, {
      tenants: ['default', 'acme'],
      store: { diskBudgetBytes: 64 * 1024, retentionIntervalMs: 500 },
      users: [{ username: DEVICE_USER, password: await hashPassword(DEVICE_PASSWORD, { N: 1024, r: 8, p: 1 }), tenant: 'acme', role: 'device' }],
      mqtt: {
        listeners: [
          { name: 'open', type: 'tcp', port: 0, allowAnonymous: true },
          { name: 'secure', type: 'tcp', port: 0 },
        ],
      },
    })
    const gw = await startGatewayProcess({ dataDir, config })
    const openUrl = gw.urls.open
    const secureUrl = gw.urls.secure
    if (openUrl === undefined || secureUrl === undefined) {
      await gw.kill()
      throw new Error(`listeners missing from ${JSON.stringify(gw.urls)}`)
    }
    const metrics = async (): Promise<string> => (await fetch(`${gw.httpUrl}/metrics`)).text()

    return {
      gw, openUrl, secureUrl,
      httpTarget: new URL(gw.httpUrl).host,
      metrics,
      async refusals () {
        await attempt(secureUrl, { clientId: DEVICE_USER, username: DEVICE_USER, password: 'wrong password' })
        await attempt(secureUrl, { clientId: 'anonymous-1' })
        const device = await connect(secureUrl, { clientId: DEVICE_USER, username: DEVICE_USER, password: DEVICE_PASSWORD })
        // Acknowledged but neither logged nor delivered (acl-denied): a device may only publish under its own id.
        await device.publishAsync('devices/sensor-8/telemetry/temp', '21.5', { qos: 1 })
        await device.endAsync()
      },
      async load (durationMs, publishers = 3) {
        const until = Date.now() + durationMs
        let sent = 0
        const run = async (client: MqttClient, id: string): Promise<void> => {
          try {
            // Ten in flight at a time, so group commits hold more than one record; at most 2,000 per client.
            for (let n = 0; Date.now() < until && n < 2000; n += 10) {
              await Promise.all(Array.from({ length: 10 }, (_, i) =>
                client.publishAsync(`devices/${id}/${i === 0 ? 'events/boot' : 'telemetry/temp'}`, JSON.stringify({ n: n + i, t: 21.5 }), { qos: i % 5 === 0 ? 0 : 1 })))
              sent += 10
              await sleep(20)
            }
          } finally {
            await client.endAsync()
          }
        }
        await Promise.all([
          ...Array.from({ length: publishers }, (_, i) => connect(openUrl, { clientId: `dev-${i}` }).then((c) => run(c, `dev-${i}`))),
          connect(secureUrl, { clientId: DEVICE_USER, username: DEVICE_USER, password: DEVICE_PASSWORD }).then((c) => run(c, DEVICE_USER)),
        ])
        return sent
      },
      async failWrites (holdMs) {
        const pid = gw.child.pid
        if (pid === undefined) throw new Error('gateway has no pid')
        const soft = execFileSync('prlimit', ['--pid', String(pid), '--fsize', '--output', 'SOFT', '--noheadings', '--raw'], { encoding: 'utf8' }).trim()
        if (!/^(?:unlimited|\d+)$/.test(soft)) throw new Error(`prlimit printed no FSIZE limit: ${soft}`)
        const restore = (): void => { execFileSync('prlimit', ['--pid', String(pid), `--fsize=${soft}:`]) }
        const client = await connect(openUrl, { clientId: 'dev-fault' })
        try {
          // Any write that extends a file now fails with EFBIG (Node ignores SIGXFSZ); the gateway's stdio are pipes.
          execFileSync('prlimit', ['--pid', String(pid), '--fsize=1:'])
          const acked = client.publishAsync('devices/dev-fault/telemetry/temp', 'written after the disk recovers', { qos: 1 })
          acked.catch(() => {}) // awaited below; rejects only if the client is closed first, on a failure already thrown
          const deadline = Date.now() + 10_000
          while (!/^edgemq_store_errors_total\{kind="write"\} [1-9]/m.test(await metrics())) {
            if (Date.now() > deadline) throw new Error('no store error counted while writes were failing')
            await sleep(100)
          }
          await sleep(holdMs)
          restore()
          // Held back while the log could not write it, acknowledged once the store has recovered.
          await withTimeout(acked, 15_000, 'publish not acknowledged after the disk recovered')
        } finally {
          if (gw.child.exitCode === null) restore()
          client.end(true)
        }
      },
      async close () {
        await gw.stop()
        await cleanup()
      },
    }
  } catch (err) {
    await cleanup()
    throw err
  }
}
