/**
 * The parent's side of the load generator: starts N child processes
 * (load-child.ts) once, and for each run splits the publishers between them,
 * relays their phases and merges their results. Keeping the generator out of
 * the bench process means the bench's own work (starting brokers, reading
 * /proc and /metrics) never steals its event loop.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { LatencyHistogram } from './latency-histogram.ts'
import type { LoadResult, LoadSpec, Phase } from './mqtt/load.ts'

export type ParentMessage = { readonly type: 'run', readonly spec: LoadSpec } | { readonly type: 'exit' }
export type ChildMessage =
  | { readonly type: 'phase', readonly phase: Phase }
  | { readonly type: 'result', readonly result: LoadResult }
  | { readonly type: 'error', readonly message: string }

const CHILD = fileURLToPath(new URL('./load-child.ts', import.meta.url))

export interface MergedLoad {
  /** PUBLISHes confirmed per second in the window (QoS 1: PUBACKs; QoS 0: read before a PINGRESP). */
  readonly rate: number
  readonly latency: LatencyHistogram
  /** CPU of all generator processes in the window, in cores (1 = one core busy). */
  readonly generatorCores: number
  /** The busiest generator's event-loop utilisation in the window. */
  readonly generatorElu: number
  readonly unacked: number
  readonly windowMs: number
  /** PUBLISHes written per second in the window. */
  readonly writtenRate: number
  readonly perChild: readonly LoadResult[]
}

export class LoadGenerators {
  readonly #children: ChildProcess[] = []

  constructor (count: number) {
    for (let i = 0; i < count; i++) {
      const child = spawn(process.execPath, ['--import', 'tsx', CHILD], { stdio: ['ignore', 2, 2, 'ipc'] })
      child.on('error', (err) => process.stderr.write(`[bench] load generator ${i}: ${err.message}\n`))
      this.#children.push(child)
    }
    process.once('exit', () => { for (const c of this.#children) if (c.exitCode === null) c.kill('SIGKILL') })
  }

  /**
   * Runs `spec` with its publishers spread over the children. `onPhase` is
   * called (and awaited) once every child has entered the phase.
   */
  async run (spec: LoadSpec, onPhase: (phase: Phase) => Promise<void> | void): Promise<MergedLoad> {
    const parts = this.#children.map((_c, k) => spec.publishers.filter((_p, i) => i % this.#children.length === k))
    const active = this.#children.filter((_c, k) => (parts[k] as number[]).length > 0)
    const reached = new Map<Phase, number>()
    let phaseChain = Promise.resolve()
    let phaseError: unknown
    const results = await Promise.all(active.map((child) => new Promise<LoadResult>((resolve, reject) => {
      const onMessage = (message: ChildMessage): void => {
        if (message.type === 'phase') {
          const n = (reached.get(message.phase) ?? 0) + 1
          reached.set(message.phase, n)
          if (n === active.length) phaseChain = phaseChain.then(() => onPhase(message.phase)).catch((err: unknown) => { phaseError ??= err })
          return
        }
        child.off('message', onMessage)
        child.off('exit', onExit)
        if (message.type === 'result') resolve(message.result)
        else reject(new Error(`load generator: ${message.message}`))
      }
      const onExit = (code: number | null): void => reject(new Error(`load generator exited with code ${code}`))
      child.on('message', onMessage)
      child.once('exit', onExit)
      const message: ParentMessage = { type: 'run', spec: { ...spec, publishers: parts[this.#children.indexOf(child)] as number[] } }
      child.send(message)
    })))
    await phaseChain
    if (phaseError !== undefined) throw phaseError
    const latency = new LatencyHistogram()
    let rate = 0
    let writtenRate = 0
    let cores = 0
    let elu = 0
    let unacked = 0
    let windowMs = 0
    for (const r of results) {
      latency.add(r.latency)
      rate += r.acked / (r.windowMs / 1000)
      writtenRate += r.written / (r.windowMs / 1000)
      cores += (r.cpuUserMs + r.cpuSystemMs) / r.windowMs
      elu = Math.max(elu, r.eventLoopUtilization)
      unacked += r.unacked
      windowMs = Math.max(windowMs, r.windowMs)
    }
    return { rate, latency, generatorCores: cores, generatorElu: elu, unacked, windowMs, writtenRate, perChild: results }
  }

  async close (): Promise<void> {
    await Promise.all(this.#children.map((child) => new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) return resolve()
      child.once('exit', () => resolve())
      const message: ParentMessage = { type: 'exit' }
      child.send(message)
      setTimeout(() => child.kill('SIGKILL'), 2000).unref()
    })))
  }
}
