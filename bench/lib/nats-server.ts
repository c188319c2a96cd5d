/**
 * `nats-server` (Debian's package, 2.9.x) with JetStream on loopback, for the
 * NATS bench and the NATS bridge tests: one node, or a cluster of three with
 * routes between them, each with its config and JetStream store in a
 * directory of the caller's. Ports are picked by the caller (or free ones),
 * so a restarted node comes back on the same address.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { accessSync, constants } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { jetstreamManager } from '@nats-io/jetstream'
import { connect } from '@nats-io/transport-node'
import { freePort, freePorts } from './brokers.ts'

const children = new Set<ChildProcess>()
process.once('exit', () => { for (const c of children) c.kill('SIGKILL') })

/** The nats-server executable on PATH, /usr/sbin or /usr/local/sbin; null when none. */
export function findNatsServer (): string | null {
  const dirs = [...(process.env.PATH ?? '').split(path.delimiter).filter((d) => d !== ''), '/usr/sbin', '/usr/local/sbin', '/usr/bin']
  for (const dir of dirs) {
    const file = path.join(dir, 'nats-server')
    try {
      accessSync(file, constants.X_OK)
      return file
    } catch {
      // not there
    }
  }
  return null
}

export interface NatsNodeOptions {
  /** Client port; a free one when not given. */
  readonly port?: number
  readonly name?: string
  /** Extra lines of the server config (authorization blocks, TLS, …). */
  readonly extra?: readonly string[]
  /** Cluster membership: this node's route port and every node's route port. */
  readonly cluster?: { readonly name: string, readonly port: number, readonly routes: readonly number[] }
  /** false: no JetStream (a plain NATS server). */
  readonly jetstream?: boolean
}

export interface NatsServerProcess {
  readonly port: number
  readonly url: string
  readonly name: string
  /** Everything the server logged. */
  readonly log: () => string
  /** SIGKILL, and wait for the exit. */
  kill (): Promise<void>
  /** SIGTERM (lame duck is not waited for), and wait for the exit. */
  stop (): Promise<void>
  /** Starts the same node again (same ports, same store dir) after kill() or stop(), with `extra` config lines if given. */
  restart (extra?: readonly string[]): Promise<NatsServerProcess>
}

/** How many times a start that lost its port to another process is tried again. */
const PORT_ATTEMPTS = 5

function lostPort (err: unknown): boolean {
  return err instanceof Error && err.message.includes('address already in use')
}

/**
 * Starts nats-server with JetStream on 127.0.0.1, its config and store under `dir`; resolves once it listens for
 * clients. A free port picked here that another process takes first is replaced by another; a port the caller
 * gave (a restart) is tried again for a while, since what holds it is usually a short connection's local end.
 */
export async function startNatsServer (bin: string, dir: string, options: NatsNodeOptions = {}): Promise<NatsServerProcess> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startNatsServerOnce(bin, dir, options)
    } catch (err) {
      if (!lostPort(err) || attempt >= PORT_ATTEMPTS) throw err
      if (options.port !== undefined) await new Promise((resolve) => setTimeout(resolve, 1000 * attempt))
    }
  }
}

async function startNatsServerOnce (bin: string, dir: string, options: NatsNodeOptions): Promise<NatsServerProcess> {
  const port = options.port ?? await freePort()
  const name = options.name ?? `n${port}`
  const store = path.join(dir, `nats-${name}`)
  await mkdir(store, { recursive: true })
  const lines = [
    `listen: "127.0.0.1:${port}"`,
    `server_name: "${name}"`,
    ...(options.jetstream === false ? [] : [`jetstream { store_dir: "${store}", max_memory_store: 64MB, max_file_store: 2GB }`]),
    ...(options.cluster === undefined
      ? []
      : [
          `cluster { name: "${options.cluster.name}", listen: "127.0.0.1:${options.cluster.port}", ` +
            `routes: [${options.cluster.routes.filter((p) => p !== options.cluster?.port).map((p) => `"nats-route://127.0.0.1:${p}"`).join(', ')}] }`,
        ]),
    ...(options.extra ?? []),
  ]
  const config = path.join(dir, `nats-${name}.conf`)
  await writeFile(config, `${lines.join('\n')}\n`)
  const child = spawn(bin, ['-c', config], { stdio: ['ignore', 'ignore', 'pipe'] })
  children.add(child)
  let log = ''
  child.stderr.on('data', (d: Buffer) => { log += d.toString(); if (log.length > 2_000_000) log = log.slice(-1_000_000) })
  const exited = new Promise<void>((resolve) => child.once('exit', () => { children.delete(child); resolve() }))
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`nats-server ${name} did not get ready within 20 s:\n${log}`)), 20_000)
    const check = (): void => { if (log.includes('Server is ready')) { clearTimeout(timer); resolve() } }
    child.stderr.on('data', check)
    void exited.then(() => { clearTimeout(timer); reject(new Error(`nats-server ${name} exited before it was ready:\n${log}`)) })
  })
  const node: NatsServerProcess = {
    port, name, url: `nats://127.0.0.1:${port}`,
    log: () => log,
    async kill () {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
      await exited
    },
    async stop () {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM')
      await exited
    },
    restart: (extra) => startNatsServer(bin, dir, { ...options, port, name, ...(extra === undefined ? {} : { extra }) }),
  }
  return node
}

/** Three JetStream nodes clustered on loopback; resolves once a stream with one replica per node can be created. */
export async function startNatsCluster (bin: string, dir: string, size = 3): Promise<NatsServerProcess[]> {
  let nodes: NatsServerProcess[] | undefined
  for (let attempt = 1; nodes === undefined; attempt++) {
    // Every node's client and route port is fixed before any starts (each node names the others' routes), so a
    // port lost to another process means a fresh set of ports, and a fresh store directory for the fresh cluster.
    const ports = await freePorts(2 * size)
    const routes = ports.slice(size)
    const started = await Promise.allSettled(ports.slice(0, size).map((port, i) => startNatsServerOnce(bin, path.join(dir, `cluster-${attempt}`), {
      port, name: `c${i + 1}`, cluster: { name: 'edgemq-test', port: routes[i] as number, routes },
    })))
    const failed = started.find((s): s is PromiseRejectedResult => s.status === 'rejected')
    if (failed === undefined) {
      nodes = started.map((s) => (s as PromiseFulfilledResult<NatsServerProcess>).value)
      break
    }
    await Promise.all(started.map((s) => s.status === 'fulfilled' ? s.value.kill() : undefined))
    if (!lostPort(failed.reason) || attempt >= PORT_ATTEMPTS) throw failed.reason
  }
  const nc = await connect({ servers: nodes.map((n) => n.url) })
  try {
    const until = Date.now() + 30_000
    for (;;) {
      try {
        // Ready when a replicated stream can be placed on every node ("no suitable peers for placement" until then).
        const jsm = await jetstreamManager(nc, { timeout: 2000 })
        await jsm.streams.add({ name: 'READY_PROBE', subjects: ['ready-probe.>'], num_replicas: size })
        await jsm.streams.delete('READY_PROBE')
        break
      } catch (err) {
        if (Date.now() > until) throw new Error(`the NATS cluster's JetStream did not come up: ${(err as Error).message}`)
        await new Promise((resolve) => setTimeout(resolve, 250))
      }
    }
  } finally {
    await nc.close()
  }
  return nodes
}
