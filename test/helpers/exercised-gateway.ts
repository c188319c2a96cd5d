/**
 * A live gateway (`edgemq start` in a child process) set up so that every
 * labelled series the dashboards and alert rules read exists: two tenants on
 * two listeners, a device user, a retention-holding consumer group seeded in
 * the data directory before start, and a small disk budget so retention drops
 * records that group has not consumed. Helpers drive it: refused and failed
 * logins, an ACL-denied publish, a bounded MQTT.js publish load, and a real
 * failed log write (the process' file-size limit lowered with prlimit, so
 * LevelDB's writes fail with EFBIG; raised again, the store recovers).
 *
 * The bridge has four upstreams, so every bridge series exists with data:
 * - `region`, a second `edgemq start` (the cloud side), which takes the
 *   forwarded streams and the command receipts and sends commands down
 *   (`cmd/{site}/+/#` → `devices/+/commands/#`, with a time-to-live so an
 *   undelivered command expires);
 * - `down`, a closed loopback port: never connected, reconnecting, its
 *   backlog growing until the disk budget drops records it had not forwarded;
 * - `refusing`, the same edgemq, whose `unrouted: reject` refuses the topic
 *   this upstream's template makes: a 3.1.1 broker refuses by disconnecting,
 *   so each record it forwards (only `devices/+/events/refused`) ends in the
 *   dead-letter stream after one attempt;
 * - `nats-down`, a NATS upstream on a closed port: its coded error
 *   (BRIDGE_NATS_UNREACHABLE) in edgemq_bridge_upstream_error.
 */
import { execFileSync } from 'node:child_process'
import { mkdir } from 'node:fs/promises'
import path from 'node:path'
import mqtt, { type MqttClient } from 'mqtt'
import { hashPassword } from '../../gateway/access/auth.ts'
import { openLogStore } from '../../store/index.ts'
import { startGatewayProcess, tempDir, writeConfig, type GatewayProcess } from './gateway-process.ts'
import { freePort } from './prometheus-process.ts'

export const GROUP = 'uplink-test'
export const GATEWAY_ID = 'edge-dash'
/** The bridge's upstreams (their consumer groups are `bridge.<name>`). */
export const UPSTREAMS = { live: 'region', down: 'down', refusing: 'refusing', natsDown: 'nats-down' } as const
/** Streams the live upstream forwards with data once {@link ExercisedGateway.bridgeTraffic} ran. */
export const FORWARDED_STREAMS = ['telemetry', 'events', 'command-receipts'] as const
const DEVICE_USER = 'sensor-7'
const DEVICE_PASSWORD = 'not-a-secret'
const COMMAND_TTL_MS = 1500

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
  /**
   * Bridge traffic that creates every labelled bridge series: one record per
   * forwarded stream through `region`, a command from `region` that a device
   * takes and at least one that expires (their receipts go back up), and one
   * record dead-lettered by `refusing`. Resolves once /metrics shows all of it and
   * the `down` upstream has a backlog.
   */
  bridgeTraffic (): Promise<void>
  /** One more record refused by `refusing`; resolves with its dead-letter count once /metrics shows it. */
  deadLetter (): Promise<number>
  close (): Promise<void>
}

export interface Sample { readonly labels: Readonly<Record<string, string>>, readonly value: number }

/** The samples of one metric in a Prometheus text exposition. */
export function samples (exposition: string, name: string): Sample[] {
  const out: Sample[] = []
  for (const line of exposition.split('\n')) {
    if (!line.startsWith(name) || !/[ {]/.test(line[name.length] ?? '')) continue
    const m = /^[^{ ]+(?:\{(.*)\})? (\S+)/.exec(line)
    if (m === null) continue
    const labels = Object.fromEntries([...(m[1] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((l) => [l[1] as string, l[2] as string]))
    out.push({ labels, value: Number(m[2]) })
  }
  return out
}

/** Sum of the samples of `name` whose labels include `labels`. */
function total (exposition: string, name: string, labels: Readonly<Record<string, string>> = {}): number {
  return samples(exposition, name)
    .filter((s) => Object.entries(labels).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + s.value, 0)
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

/** Polls `check` every 100 ms until it holds; fails after `timeoutMs`, naming `what`. */
async function until (what: string, check: () => Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(100)
  }
}

/** Resolves when the connection attempt ended, whatever the outcome (used for the refusals). */
async function attempt (url: string, options: mqtt.IClientOptions): Promise<void> {
  try { (await connect(url, options)).end(true) } catch { /* refused: what these attempts are for */ }
}

/**
 * The cloud side: an edgemq that logs what the bridge forwards and carries
 * commands and receipts, and refuses (by disconnecting, as MQTT 3.1.1 has no
 * negative PUBACK) any other topic.
 */
async function startRegion (dir: string): Promise<GatewayProcess> {
  const config = await writeConfig(dir, {
    gatewayId: UPSTREAMS.live,
    unrouted: 'reject',
    routes: [
      { filter: 'devices/+/telemetry/#', stream: 'telemetry', keyLevel: 1 },
      { filter: 'devices/+/events/#', stream: 'events', keyLevel: 1 },
      { filter: 'cmd/+/+/#', stream: 'commands', keyLevel: 2 },
      { filter: 'sites/+/receipts/#', stream: 'events', keyLevel: 1 },
      { filter: 'k/dev-ok/#', stream: 'events', keyLevel: 1 }, // the refusing upstream's one accepted key
    ],
    mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
  })
  return startGatewayProcess({ dataDir: path.join(dir, 'data'), config })
}

export async function startExercisedGateway (): Promise<ExercisedGateway> {
  const { dir, cleanup } = await tempDir('edgemq-dash-')
  const dataDir = path.join(dir, 'data')
  let region: GatewayProcess | undefined
  try {
    await mkdir(path.join(dir, 'region'))
    region = await startRegion(path.join(dir, 'region'))
    const regionUrl = region.mqttUrl
    const closedPort = await freePort() // nothing listens there: the `down` upstream never connects
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
      gatewayId: GATEWAY_ID,
      bridge: {
        commitIntervalMs: 100,
        upstreams: [
          {
            name: UPSTREAMS.live, kind: 'edgemq', region: 'eu-1', url: regionUrl, reconnectMinMs: 50, reconnectMaxMs: 500,
            forward: [{ stream: 'telemetry' }, { stream: 'events' }],
            commands: [{ remote: 'cmd/{site}/+/#', local: 'devices/+/commands/#', ttlMs: COMMAND_TTL_MS }],
          },
          { name: UPSTREAMS.down, url: `mqtt://127.0.0.1:${closedPort}`, reconnectMinMs: 100, reconnectMaxMs: 1000, connectTimeoutMs: 1000 },
          {
            name: UPSTREAMS.refusing, url: regionUrl, reconnectMinMs: 50, reconnectMaxMs: 200, maxDeliveryAttempts: 1,
            // The region takes dev-ok's records and disconnects on the others (unrouted: reject): over MQTT 3.1.1 a
            // disconnect counts as a refusal only on a link that has carried an acknowledged record.
            forward: [{ stream: 'events', filter: 'devices/+/events/refused' }], topicTemplate: 'k/{key}/{topic}',
          },
          { name: UPSTREAMS.natsDown, url: `nats://127.0.0.1:${closedPort}`, reconnectMinMs: 100, reconnectMaxMs: 1000, connectTimeoutMs: 1000 },
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
    const deadLettered = async (): Promise<number> => total(await metrics(), 'edgemq_bridge_dead_lettered_total', { upstream: UPSTREAMS.refusing })
    const deadLetter = async (): Promise<number> => {
      const before = await deadLettered()
      const ok = await connect(openUrl, { clientId: 'dev-ok' })
      try {
        await ok.publishAsync('devices/dev-ok/events/refused', 'the upstream takes this key', { qos: 1 })
      } finally {
        await ok.endAsync()
      }
      const device = await connect(openUrl, { clientId: 'dev-refused' })
      try {
        await device.publishAsync('devices/dev-refused/events/refused', 'the upstream refuses this key', { qos: 1 })
      } finally {
        await device.endAsync()
      }
      await until('a record dead-lettered by the refusing upstream', async () => await deadLettered() > before)
      return deadLettered()
    }

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
      async bridgeTraffic () {
        const device = await connect(openUrl, { clientId: 'dev-cmd', clean: true })
        const cloud = await connect(regionUrl, { clientId: 'cloud-service' })
        try {
          const delivered = new Promise<void>((resolve) => device.on('message', () => resolve()))
          await device.subscribeAsync('devices/dev-cmd/commands/#', { qos: 1 })
          await device.publishAsync('devices/dev-cmd/telemetry/temp', '21.5', { qos: 1 })
          await device.publishAsync('devices/dev-cmd/events/boot', 'booted', { qos: 1 })
          // The uplink subscribes to its command topics after it connects; until then a command is not routed to it.
          // Commands to a device that is not there expire, so sending them until one arrives leaves only expiries.
          await until('the live upstream to receive a command', async () => {
            await cloud.publishAsync(`cmd/${GATEWAY_ID}/dev-absent/reboot`, 'reboot', { qos: 1 })
            return total(await metrics(), 'edgemq_bridge_commands_received_total', { upstream: UPSTREAMS.live }) > 0
          })
          await cloud.publishAsync(`cmd/${GATEWAY_ID}/dev-cmd/reboot`, 'reboot', { qos: 1 })
          await withTimeout(delivered, 20_000, 'the command to dev-cmd was not delivered')
        } finally {
          await device.endAsync()
          await cloud.endAsync()
        }
        await deadLetter()
        await until('every bridge series with data', async () => {
          const text = await metrics()
          const forwarded = (stream: string): number => total(text, 'edgemq_bridge_forwarded_messages_total', { upstream: UPSTREAMS.live, tenant: 'default', stream })
          return FORWARDED_STREAMS.every((s) => forwarded(s) > 0)
            && total(text, 'edgemq_bridge_commands_delivered_total', { upstream: UPSTREAMS.live }) > 0
            && total(text, 'edgemq_bridge_commands_expired_total', { upstream: UPSTREAMS.live }) > 0
            && total(text, 'edgemq_bridge_connected', { upstream: UPSTREAMS.live }) === 1
            && total(text, 'edgemq_bridge_backlog_messages', { upstream: UPSTREAMS.down }) > 0
            && total(text, 'edgemq_bridge_reconnects_total', { upstream: UPSTREAMS.down }) > 0
        })
      },
      deadLetter,
      async close () {
        await gw.stop()
        await region?.stop()
        await cleanup()
      },
    }
  } catch (err) {
    await region?.kill()
    await cleanup()
    throw err
  }
}
