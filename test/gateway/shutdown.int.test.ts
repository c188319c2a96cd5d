/**
 * One ordered shutdown (gateway/shutdown.ts), for a normal close and for a
 * start that fails half-way: steps run in reverse start order — stop
 * accepting MQTT connections, drain the appends the clients started, stop
 * the bridge, close the store and then the database — and a failed start
 * leaves nothing open behind it: no server or socket, and a data directory
 * that can be opened again at once.
 */
import net from 'node:net'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import mqtt from 'mqtt'
import { pino, type Logger } from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import { buildConfig } from '../../gateway/config/config.ts'
import { GatewayError } from '../../gateway/errors.ts'
import { startGateway } from '../../gateway/gateway.ts'
import { tempDir } from '../helpers/gateway-process.ts'
import { readWholeLog } from '../helpers/log-reader.ts'

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => { for (const c of cleanups.splice(0).reverse()) await c().catch(() => {}) })

/** A debug logger whose lines the test reads back, and the shutdown steps among them in the order they ran. */
function capturingLogger (): { logger: Logger, steps: () => string[] } {
  const lines: Array<{ msg?: string, step?: string }> = []
  const logger = pino({ level: 'debug' }, { write: (line: string) => { lines.push(JSON.parse(line) as { msg?: string, step?: string }) } })
  return { logger, steps: () => lines.filter((l) => l.msg === 'shutdown step').map((l) => l.step as string) }
}

/** Open TCP servers and sockets of this process, by kind. */
function tcpHandles (): { servers: number, sockets: number } {
  const info = process.getActiveResourcesInfo()
  return { servers: info.filter((r) => r === 'TCPServerWrap').length, sockets: info.filter((r) => r === 'TCPSocketWrap').length }
}

/**
 * The TCP handles once libuv has let go of the closed ones: a server whose close callback ran stays listed until
 * its handle is freed, a few turns of the loop later. Polls until they equal `expected` (bounded), then returns them.
 */
async function settledTcpHandles (expected: { servers: number, sockets: number }): Promise<{ servers: number, sockets: number }> {
  const until = Date.now() + 5000
  let now = tcpHandles()
  while ((now.servers !== expected.servers || now.sockets !== expected.sockets) && Date.now() < until) {
    await new Promise((resolve) => setTimeout(resolve, 10))
    now = tcpHandles()
  }
  return now
}

async function scratch (): Promise<string> {
  const { dir, cleanup } = await tempDir('edgemq-shutdown-')
  cleanups.push(cleanup)
  return dir
}

/** A bridge upstream nobody listens on (port 1): the uplink starts, retries in the background, and must stop with the gateway. */
const DEAD_UPSTREAM = { name: 'cloud', url: 'mqtt://127.0.0.1:1', forward: [{ stream: 'telemetry' }], reconnectMinMs: 50, reconnectMaxMs: 200 }

describe('shutdown', () => {
  it('after a listener fails to bind, closes everything it opened in reverse order, and the data directory opens again at once', async () => {
    const dir = await scratch()
    const blocker = net.createServer()
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve))
    cleanups.push(() => new Promise<void>((resolve) => blocker.close(() => resolve())))
    const taken = (blocker.address() as net.AddressInfo).port
    const config = buildConfig({
      dataDir: dir,
      mqtt: { listeners: [{ name: 'first', type: 'tcp', port: 0 }, { name: 'second', type: 'tcp', port: taken }] },
      http: { port: 0 },
      bridge: { upstreams: [DEAD_UPSTREAM] },
    })
    const before = tcpHandles()
    const { logger, steps } = capturingLogger()

    const failed = await startGateway(config, { logger }).then(() => null, (err: unknown) => err)
    expect(failed).toBeInstanceOf(GatewayError)
    expect((failed as GatewayError).code).toBe('GW_LISTEN_FAILED')

    // Everything had started but the second listener; all of it is closed, listeners first, the database last.
    expect(steps()).toEqual(['mqtt listeners', 'standby acks', 'appends', 'http', 'bridge', 'broker', 'session expiry', 'sessions', 'session drop warnings', 'disk usage', 'store', 'replication', 'database'])
    expect(await settledTcpHandles(before)).toEqual(before)
    // The LevelDB lock is released: the data directory opens again, and a gateway starts on it.
    const db = new ClassicLevel(path.join(dir, 'db'))
    await db.open()
    await db.close()
    const again = await startGateway(buildConfig({ dataDir: dir, mqtt: { listeners: [{ type: 'tcp', port: 0 }] }, http: { port: 0 } }), {
      logger: pino({ level: 'silent' }),
    })
    await again.close()
    expect(await settledTcpHandles(before)).toEqual(before)
  }, 60_000)

  it('on close stops accepting, drains the appends, stops the bridge, then closes the store: every acknowledged message is in the log', async () => {
    const dir = await scratch()
    const config = buildConfig({
      dataDir: dir,
      mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
      http: { port: 0 },
      bridge: { upstreams: [DEAD_UPSTREAM] },
    })
    const { logger, steps } = capturingLogger()
    const gw = await startGateway(config, { logger })
    const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${gw.listeners[0]?.port}`, { clientId: 'dev-1', reconnectPeriod: 0 })
    const sent = 50
    await Promise.all(Array.from({ length: sent }, (_, i) => client.publishAsync('devices/dev-1/telemetry/t', `m${i}`, { qos: 1 })))
    await gw.close()
    client.end(true)

    const order = steps()
    expect(order.slice(0, 5)).toEqual(['retention', 'mqtt listeners', 'standby acks', 'appends', 'http'])
    const at = (step: string): number => order.indexOf(step)
    expect(at('mqtt listeners')).toBeLessThan(at('appends'))
    expect(at('appends')).toBeLessThan(at('bridge'))
    expect(at('bridge')).toBeLessThan(at('store'))
    expect(at('store')).toBeLessThan(at('database'))
    expect(order.at(-1)).toBe('database')
    expect(new Set(order).size).toBe(order.length) // each step once

    const payloads = (await readWholeLog(dir)).filter((r) => r.stream === 'default/telemetry').map((r) => r.payload)
    for (let i = 0; i < sent; i++) expect(payloads).toContain(`m${i}`)
  }, 60_000)
})
