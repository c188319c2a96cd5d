/**
 * A real Mosquitto as the bridge's upstream: a child process on a loopback
 * port chosen by the test (so a restarted broker comes back on the same
 * address), with the config lines the test needs. Under CI=true a missing
 * mosquitto fails the test; elsewhere `mosquittoOrSkip` lets it skip.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { writeFile } from 'node:fs/promises'
import net from 'node:net'
import path from 'node:path'
import { findMosquitto } from '../../bench/lib/brokers.ts'

const children = new Set<ChildProcess>()
process.once('exit', () => { for (const c of children) c.kill('SIGKILL') })

/** The mosquitto binary; throws under CI=true when it is missing (.ci/run installs it), null elsewhere. */
export function mosquittoBinary (): string | null {
  const bin = findMosquitto()
  if (bin === null && process.env.CI === 'true') throw new Error('mosquitto is not installed (apt-get install mosquitto); the bridge tests need it under CI')
  return bin
}

export interface MosquittoProcess {
  readonly port: number
  readonly url: string
  readonly log: () => string
  kill (): Promise<void>
  /** SIGTERM: Mosquitto saves its persistence file and exits. */
  stop (): Promise<void>
}

/** Starts mosquitto on 127.0.0.1:`port` with anonymous access plus `extra` config lines (default `persistence false`); `dir` holds its config. */
export async function startMosquitto (bin: string, dir: string, port: number, extra: readonly string[] = []): Promise<MosquittoProcess> {
  const config = path.join(dir, `mosquitto-${port}.conf`)
  await writeFile(config, [`listener ${port} 127.0.0.1`, 'allow_anonymous true', 'log_dest stderr', 'log_type all',
    ...(extra.some((l) => l.startsWith('persistence ')) ? [] : ['persistence false']), ...extra, ''].join('\n'))
  const child = spawn(bin, ['-c', config], { stdio: ['ignore', 'ignore', 'pipe'] })
  children.add(child)
  let log = ''
  child.stderr?.on('data', (d: Buffer) => { log = (log + d.toString()).slice(-200_000) })
  const exited = new Promise<void>((resolve) => child.once('exit', () => { children.delete(child); resolve() }))
  let gone = false
  void exited.then(() => { gone = true })
  const until = Date.now() + 10_000
  for (;;) {
    if (gone) throw new Error(`mosquitto exited before listening on ${port}:\n${log}`)
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port }, () => { s.destroy(); resolve(true) })
      s.once('error', () => resolve(false))
    })
    if (ok) break
    if (Date.now() > until) throw new Error(`mosquitto did not listen on ${port}:\n${log}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  return {
    port,
    url: `mqtt://127.0.0.1:${port}`,
    log: () => log,
    async kill () {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
      await exited
    },
    async stop () {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM')
      await exited
    },
  }
}
