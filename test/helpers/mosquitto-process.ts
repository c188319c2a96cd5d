/**
 * A real Mosquitto as the bridge's upstream, on a loopback port chosen by the
 * test (so a restarted broker comes back on the same address), started with
 * the bench's launcher (bench/lib/brokers.ts). `mosquittoPolicy` follows the
 * openssl rule of tls-fixtures.ts: without mosquitto the suites skip, except
 * under CI=true, where one test fails instead (CI installs it).
 */
import { findMosquitto, startMosquittoWithConfig } from '../../bench/lib/brokers.ts'

export function mosquittoPolicy (): { bin: string | null, missingInCi: boolean } {
  const bin = findMosquitto()
  return { bin, missingInCi: bin === null && process.env.CI === 'true' }
}

export interface MosquittoProcess {
  readonly port: number
  readonly url: string
  /** Everything Mosquitto logged (log_type all). */
  readonly log: () => string
  /** SIGKILL, and wait for the exit. */
  kill (): Promise<void>
  /** SIGTERM: Mosquitto saves its persistence file and exits. */
  stop (): Promise<void>
}

/** Starts mosquitto on 127.0.0.1:`port` with anonymous access plus `extra` config lines (default `persistence false`); `dir` holds its config. */
export async function startMosquitto (bin: string, dir: string, port: number, extra: readonly string[] = []): Promise<MosquittoProcess> {
  const lines = [
    `listener ${port} 127.0.0.1`, 'allow_anonymous true', 'log_dest stderr', 'log_type all',
    ...(extra.some((l) => l.startsWith('persistence ')) ? [] : ['persistence false']), ...extra,
  ]
  let log = ''
  const broker = await startMosquittoWithConfig(bin, dir, port, lines, (line) => { log += `${line}\n` })
  return {
    port,
    url: `mqtt://127.0.0.1:${port}`,
    log: () => log,
    async kill () {
      try { process.kill(broker.pid, 'SIGKILL') } catch { /* already gone */ }
      await broker.stop()
    },
    async stop () { await broker.stop() },
  }
}
