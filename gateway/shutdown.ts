/**
 * One ordered shutdown for the gateway's parts, used both by a normal close
 * and by a start that failed half-way.
 *
 * The composition root registers a step for each part right after the part
 * has started (and, for a part that must go first, right before it starts);
 * `run()` takes the steps in reverse registration order, so a part closes
 * only after everything that was started on top of it. Each step is bounded:
 * a step that has not finished after `stepTimeoutMs` is logged and left
 * behind, and the next one runs, so one stuck part cannot keep the database
 * (and its lock) open for good. A step that fails is logged and the next one
 * runs too. Every step is logged at debug as it starts (`step`), which is
 * how a test observes the order.
 */

/** What the shutdown logs through (a pino logger is one). */
export interface ShutdownLogger {
  debug (fields: Record<string, unknown>, msg: string): void
  error (fields: Record<string, unknown>, msg: string): void
}

export interface ShutdownStep {
  readonly name: string
  close (): Promise<void>
}

export class Shutdown {
  readonly #steps: ShutdownStep[] = []
  readonly #logger: ShutdownLogger
  readonly #stepTimeoutMs: number
  #running: Promise<void> | undefined

  constructor (options: { readonly logger: ShutdownLogger, readonly stepTimeoutMs: number }) {
    this.#logger = options.logger
    this.#stepTimeoutMs = options.stepTimeoutMs
  }

  /** Registers a step; it runs before every step registered earlier (at once, when the shutdown has begun). */
  add (name: string, close: () => Promise<void>): void {
    if (this.#running !== undefined) {
      void this.#runStep({ name, close })
      return
    }
    this.#steps.push({ name, close })
  }

  /** The names of the steps in the order run() takes them. */
  get order (): string[] {
    return this.#steps.map((s) => s.name).reverse()
  }

  /** Runs every step once, last registered first; later calls return the same promise. */
  run (): Promise<void> {
    this.#running ??= (async () => {
      for (const step of [...this.#steps].reverse()) await this.#runStep(step)
    })()
    return this.#running
  }

  async #runStep (step: ShutdownStep): Promise<void> {
    this.#logger.debug({ step: step.name }, 'shutdown step')
    let timer: NodeJS.Timeout | undefined
    const timedOut = new Promise<'timeout'>((resolve) => { timer = setTimeout(() => resolve('timeout'), this.#stepTimeoutMs).unref() })
    try {
      const outcome = await Promise.race([step.close().then(() => 'done' as const), timedOut])
      if (outcome === 'timeout') {
        this.#logger.error({ step: step.name, timeoutMs: this.#stepTimeoutMs }, 'shutdown step did not finish in time: going on without it')
      }
    } catch (err) {
      this.#logger.error({ step: step.name, err: (err as Error).message }, 'shutdown step failed: going on')
    } finally {
      clearTimeout(timer)
    }
  }
}
