/**
 * One `etcd` (Debian's etcd-server, 3.4.x) on loopback, for the replication
 * lease tests and bench: client and peer ports picked free (or given, so a
 * restarted member comes back on the same address), its data directory in a
 * directory of the caller's. Ready once its health endpoint answers.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { accessSync, constants } from 'node:fs'
import path from 'node:path'
import { freePorts } from './brokers.ts'

const children = new Set<ChildProcess>()
process.once('exit', () => { for (const c of children) c.kill('SIGKILL') })

/** The etcd executable on PATH or /usr/bin, /usr/sbin; null when none. */
export function findEtcd (): string | null {
  const dirs = [...(process.env.PATH ?? '').split(path.delimiter).filter((d) => d !== ''), '/usr/bin', '/usr/sbin', '/usr/local/bin']
  for (const dir of dirs) {
    const file = path.join(dir, 'etcd')
    try {
      accessSync(file, constants.X_OK)
      return file
    } catch {
      // not there
    }
  }
  return null
}

export interface EtcdProcess {
  readonly url: string
  readonly log: () => string
  /** SIGKILL, and wait for the exit. */
  kill (): Promise<void>
  /** Starts the same member again (same ports, same data) after kill(). */
  restart (): Promise<EtcdProcess>
}

export async function startEtcd (bin: string, dir: string, ports?: { client: number, peer: number }): Promise<EtcdProcess> {
  const [client, peer] = ports === undefined ? await freePorts(2) as [number, number] : [ports.client, ports.peer]
  const url = `http://127.0.0.1:${client}`
  const peerUrl = `http://127.0.0.1:${peer}`
  const child = spawn(bin, [
    '--name', 'edgemq-test', '--data-dir', path.join(dir, 'etcd'),
    '--listen-client-urls', url, '--advertise-client-urls', url,
    '--listen-peer-urls', peerUrl, '--initial-advertise-peer-urls', peerUrl, '--initial-cluster', `edgemq-test=${peerUrl}`,
  ], { stdio: ['ignore', 'ignore', 'pipe'] })
  children.add(child)
  let log = ''
  child.stderr.on('data', (d: Buffer) => { log += d.toString(); if (log.length > 2_000_000) log = log.slice(-1_000_000) })
  const exited = new Promise<void>((resolve) => child.once('exit', () => { children.delete(child); resolve() }))
  let gone = false
  void exited.then(() => { gone = true })
  const deadline = Date.now() + 30_000
  for (;;) {
    if (gone) throw new Error(`etcd exited before it was ready:\n${log}`)
    const ok = await fetch(`${url}/health`).then(async (r) => r.ok && (await r.json() as { health?: string }).health === 'true', () => false)
    if (ok) break
    if (Date.now() > deadline) {
      child.kill('SIGKILL')
      throw new Error(`etcd did not get ready within 30 s:\n${log}`)
    }
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  return {
    url,
    log: () => log,
    async kill () {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
      await exited
    },
    restart: () => startEtcd(bin, dir, { client, peer }),
  }
}
