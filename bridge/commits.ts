/**
 * Commits an uplink's progress to its consumer group: each lane's `done` (every
 * offset below it acknowledged or skipped) becomes the group's committed
 * offset for that partition, which is where a restart resumes and what holds
 * retention. One commit runs at a time; a commit asked for while one runs
 * joins it. A failed commit is logged and tried again at the next interval
 * (a closed store at shutdown is not an error).
 */
import { isStoreError, type LogStore } from '../store/index.ts'
import type { Lane } from './lanes.ts'
import type { BridgeLogger } from './uplink/status.ts'

export class OffsetCommits {
  readonly #store: LogStore
  readonly #group: string
  readonly #upstream: string
  readonly #logger: BridgeLogger
  readonly #lanes: readonly Lane[]
  #running: Promise<void> | null = null

  constructor (store: LogStore, group: string, upstream: string, logger: BridgeLogger, lanes: readonly Lane[]) {
    this.#store = store
    this.#group = group
    this.#upstream = upstream
    this.#logger = logger
    this.#lanes = lanes
  }

  /** Whether a commit is running. */
  get running (): boolean {
    return this.#running !== null
  }

  /** Commits each lane whose `done` passed its committed offset; resolves when the commit (or the one running) ends. */
  commit (): Promise<void> {
    if (this.#running !== null) return this.#running
    const work = async (): Promise<void> => {
      for (const lane of this.#lanes) {
        const target = lane.done
        if (target <= lane.committed) continue
        try {
          await this.#store.commitOffset(this.#group, lane.stream, lane.partition, target)
          lane.committed = target
        } catch (err) {
          if (isStoreError(err, 'STORE_CLOSED')) return
          this.#logger.error({ upstream: this.#upstream, err: (err as Error).message }, 'committing the upstream\'s offset failed')
          return
        }
      }
    }
    this.#running = work().finally(() => { this.#running = null })
    return this.#running
  }

  /** Waits for the commit running, if any (it does not start one). */
  async settled (): Promise<void> {
    await this.#running
  }
}
