/**
 * `npm run bench -- replication`: QoS 1 ingest into a primary with a standby,
 * `acks: replicated` (PUBACK after the standby's fsync too) against
 * `acks: local` (PUBACK after the primary's fsync), on a fresh pair each, in
 * the same run, rounds interleaved (local, replicated, local, replicated)
 * and the median of each reported; the ratio is replicated / local (issue 16
 * asks >= 0.7). Also: the standby's lag in seconds (GET /v1/replication on
 * the primary, sampled every 100 ms during the load) p50/p99 per mode, and
 * the time from SIGKILL of a primary to its promoted standby acknowledging a
 * publish (`POST /v1/replication/promote`, then a QoS 1 publish retried
 * until acknowledged), against the time a single gateway takes to restart
 * on its data (`edgemq start` to its first acknowledged publish).
 *
 * Automatic takeover (replication.coordination, with etcd-server installed):
 * a pair holding its lease in an etcd on loopback (`leaseTtlMs` 2000), the
 * primary SIGKILLed after a short load, timed to the standby's first
 * acknowledged publish once it promoted itself; baseline the manual takeover
 * above (kill, promote command, first ack), same run. Issue 16's target is
 * under the lease TTL plus 2 s. `-- --takeover-only` skips the ingest rounds
 * (the manual takeover then follows a short load of 1,000 messages).
 *
 * Load (lib/mqtt/fill.ts): `--messages` (default 50,000) of 100 bytes from
 * 4 connections with 100 in flight each, 10 devices per connection.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Etcd3 } from 'etcd3'
import mqtt from 'mqtt'
import { stringify } from 'yaml'
import { findEtcd, startEtcd } from './lib/etcd-server.ts'
import { argv } from './lib/flags.ts'
import { fill } from './lib/mqtt/fill.ts'
import { info, median, percentile, report, TempDirs } from './lib/report.ts'

const BIN = fileURLToPath(new URL('../gateway/edgemq.mjs', import.meta.url))
const MESSAGES = Number(process.argv.find((a) => a.startsWith('--messages='))?.split('=')[1] ?? 50_000)
const ROUNDS = argv.includes('--takeover-only') ? 0 : 2
const LEASE_TTL_MS = 2000

interface Node { child: ChildProcess, mqtt: { host: string, port: number }, http: string, replication: string | null, exited: Promise<void> }

async function startNode (dir: string, name: string, replication: Record<string, unknown> | null): Promise<Node> {
  const config = join(dir, `${name}.yaml`)
  await writeFile(config, stringify({
    gatewayId: 'bench', mqtt: { listeners: [{ type: 'tcp', port: 0 }], maxInflightPerClient: 1000 }, http: { port: 0 },
    ...(replication === null ? {} : { replication: { listen: '127.0.0.1:0', ...replication } }),
  }))
  const child = spawn(process.execPath, [BIN, 'start', '--config', config, '--data-dir', join(dir, name), '--log-level', 'warn'], { stdio: ['ignore', 'pipe', 'inherit'] })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  const line = await new Promise<string>((resolve, reject) => {
    let out = ''
    const timer = setTimeout(() => reject(new Error(`${name} did not start`)), 60_000)
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString()
      const ready = out.split('\n').find((l) => l.includes(' ready: '))
      if (ready !== undefined) { clearTimeout(timer); resolve(ready) }
    })
  })
  const m = /mqtt:\/\/([\d.]+):(\d+)/.exec(line)!
  return {
    child, exited, mqtt: { host: m[1]!, port: Number(m[2]) }, http: /http (http:\/\/\S+?);/.exec(line)![1]!,
    replication: / replication primary (\S+)$/.exec(line)?.[1] ?? null,
  }
}

async function stop (node: Node, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (node.child.exitCode === null && node.child.signalCode === null) node.child.kill(signal)
  await node.exited
}

async function status (node: Node): Promise<{ role: string, inSync: boolean, lag: { seconds: number } }> {
  return await (await fetch(`${node.http}/v1/replication`)).json() as { role: string, inSync: boolean, lag: { seconds: number } }
}

async function until (what: string, check: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    try { if (await check()) return } catch { /* not up yet */ }
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  throw new Error(`timed out: ${what}`)
}

/** Publishes one QoS 1 message, retrying (bounded) until a gateway at `url` acknowledges it. */
async function firstAck (url: string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    try {
      const c = await mqtt.connectAsync(url, { clientId: 'probe', reconnectPeriod: 0, connectTimeout: 2000 })
      try {
        // A standby not yet promoted closes the connection on a PUBLISH: the publish would wait for an ack forever.
        await Promise.race([
          c.publishAsync('devices/probe/telemetry/t', 'x', { qos: 1 }),
          new Promise((_resolve, reject) => { c.once('close', () => reject(new Error('closed'))); setTimeout(() => reject(new Error('no ack')), 2000) }),
        ])
      } finally {
        c.end(true)
      }
      return
    } catch { await new Promise((resolve) => setTimeout(resolve, 20)) }
  }
  throw new Error('no publish acknowledged')
}

/** SIGKILL of the primary to the promoted standby's first acknowledged publish, promoted by `POST /v1/replication/promote`. */
async function manualTakeover (primary: Node, standby: Node): Promise<number> {
  const t0 = performance.now()
  await stop(primary, 'SIGKILL')
  await fetch(`${standby.http}/v1/replication/promote`, { method: 'POST' })
  await until('promoted', async () => (await status(standby)).role === 'primary')
  await firstAck(`mqtt://${standby.mqtt.host}:${standby.mqtt.port}`)
  return performance.now() - t0
}

/** SIGKILL of the primary to the standby's first acknowledged publish once it promoted itself (etcd lease). */
async function automaticTakeover (dir: string, etcdBin: string): Promise<number> {
  const etcd = await startEtcd(etcdBin, dir)
  try {
    const coordination = { etcd: { endpoints: [etcd.url], leaseTtlMs: LEASE_TTL_MS } }
    const primary = await startNode(dir, 'p', { role: 'primary', acks: 'replicated', coordination })
    const standby = await startNode(dir, 's', { role: 'standby', peer: primary.replication, coordination })
    await until('standby in sync', async () => (await status(primary)).inSync)
    await fill({ host: primary.mqtt.host, port: primary.mqtt.port, messages: 1000, connections: 4, devicesPerConnection: 10, payloadBytes: 100, window: 100 })
    // The primary's word "in sync" must be in etcd before the kill, or the standby rightly refuses to promote itself.
    const client = new Etcd3({ hosts: etcd.url })
    await until('the primary\'s in-sync word in etcd', async () => (await client.get('/edgemq/bench/leader').json() as { inSync?: boolean } | null)?.inSync === true)
    client.close()
    const t0 = performance.now()
    await stop(primary, 'SIGKILL')
    await firstAck(`mqtt://${standby.mqtt.host}:${standby.mqtt.port}`, 60_000)
    const ms = performance.now() - t0
    await stop(standby)
    return ms
  } finally {
    await etcd.kill()
  }
}

const dirs = new TempDirs()
try {
  const rates: Record<'local' | 'replicated', number[]> = { local: [], replicated: [] }
  const lags: Record<'local' | 'replicated', number[]> = { local: [], replicated: [] }
  let takeoverMs = 0
  for (let round = 0; round < ROUNDS; round++) {
    for (const acks of ['local', 'replicated'] as const) {
      const dir = await dirs.make(`replication-${acks}`)
      const primary = await startNode(dir, 'p', { role: 'primary', acks })
      const standby = await startNode(dir, 's', { role: 'standby', peer: primary.replication })
      await until('standby in sync', async () => (await status(primary)).inSync)
      let sampling = true
      const sampler = (async () => {
        while (sampling) {
          lags[acks].push((await status(primary)).lag.seconds)
          await new Promise((resolve) => setTimeout(resolve, 100))
        }
      })()
      const result = await fill({ host: primary.mqtt.host, port: primary.mqtt.port, messages: MESSAGES, connections: 4, devicesPerConnection: 10, payloadBytes: 100, window: 100 })
      sampling = false
      await sampler
      rates[acks].push(result.rate)
      info(`round ${round} acks ${acks}: ${Math.round(result.rate)} msg/s`)
      // Takeover: kill -9 the primary, promote the standby, until it acknowledges a publish.
      if (acks === 'replicated' && round === ROUNDS - 1) takeoverMs = await manualTakeover(primary, standby)
      await stop(standby)
      await stop(primary)
      await dirs.remove(dir)
    }
  }
  if (ROUNDS === 0) {
    const dir = await dirs.make('replication-takeover')
    const primary = await startNode(dir, 'p', { role: 'primary', acks: 'replicated' })
    const standby = await startNode(dir, 's', { role: 'standby', peer: primary.replication })
    await until('standby in sync', async () => (await status(primary)).inSync)
    await fill({ host: primary.mqtt.host, port: primary.mqtt.port, messages: 1000, connections: 4, devicesPerConnection: 10, payloadBytes: 100, window: 100 })
    takeoverMs = await manualTakeover(primary, standby)
    await stop(standby)
    await dirs.remove(dir)
  }
  const etcdBin = findEtcd()
  if (etcdBin === null) {
    info('etcd not installed (apt-get install etcd-server): no automatic takeover figure')
  } else {
    const autoMs = await automaticTakeover(await dirs.make('replication-auto'), etcdBin)
    info(`automatic takeover ${Math.round(autoMs)} ms with a lease of ${LEASE_TTL_MS} ms (target under ${LEASE_TTL_MS + 2000} ms)`)
    report({
      bench: 'replication.takeover.automatic', unit: 'ms', value: autoMs,
      baseline: 'the manual takeover of this run (kill -9, POST /v1/replication/promote, first ack)',
      baselineValue: takeoverMs, better: 'lower', params: { leaseTtlMs: LEASE_TTL_MS, targetMs: LEASE_TTL_MS + 2000 },
    })
  }
  const params = { messages: MESSAGES, payloadBytes: 100, connections: 4, window: 100, rounds: ROUNDS, durability: 'sync' }
  if (ROUNDS > 0) {
  report({
    bench: 'replication.ingest.replicated', unit: 'msg/s', value: median(rates.replicated), baseline: 'the same pair with acks: local (median of rounds)',
    baselineValue: median(rates.local), better: 'higher', params,
  })
  for (const acks of ['local', 'replicated'] as const) {
    const sorted = Float64Array.from(lags[acks]).sort()
    report({
      bench: `replication.lag.${acks}`, unit: 's', value: percentile(sorted, 99), baseline: 'p50 of the same samples',
      baselineValue: Math.max(percentile(sorted, 50), 0.001), better: 'lower', params: { ...params, samples: sorted.length },
    })
  }
  }
  // Baseline for the takeover: a single gateway restarting on its data after kill -9, to its first acknowledged publish.
  const dir = await dirs.make('replication-restart')
  const single = await startNode(dir, 'g', null)
  await firstAck(`mqtt://${single.mqtt.host}:${single.mqtt.port}`)
  await stop(single, 'SIGKILL')
  const t0 = performance.now()
  const again = await startNode(dir, 'g', null)
  await firstAck(`mqtt://${again.mqtt.host}:${again.mqtt.port}`)
  const restartMs = performance.now() - t0
  await stop(again)
  report({
    bench: 'replication.takeover', unit: 'ms', value: takeoverMs, baseline: 'a single gateway restarted on its data after kill -9, to its first ack',
    baselineValue: restartMs, better: 'lower', params: {},
  })
} finally {
  await dirs.cleanup()
}
