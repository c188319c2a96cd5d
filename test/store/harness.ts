/**
 * Backends the store's conformance suite runs against, and a fake clock.
 * Each backend can reopen a store on the same data, so every write test also
 * runs across close → reopen (recovery path included).
 */
import fs from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import { MemoryLevel } from 'memory-level'
import { openLogStore, type LevelDatabase, type LogStore, type LogStoreOptions } from '../../store/index.ts'

export type StoreOptions = Omit<LogStoreOptions, 'db' | 'location'>

export interface Backend {
  readonly name: string
  /** Opens a store on fresh, empty data. */
  open (options?: StoreOptions): Promise<LogStore>
  /** Closes `store` and opens a new one on the same data. */
  reopen (store: LogStore, options?: StoreOptions): Promise<LogStore>
  /** Opens a store on the existing data; the previous store must be closed. */
  openExisting (options?: StoreOptions): Promise<LogStore>
  /** The raw database of a closed store, for fault injection; close it before openExisting. */
  raw (): Promise<LevelDatabase>
  /** A fresh, open database of this kind that the caller owns (for a store given `db`); reopened by close() → open(). */
  database (): Promise<LevelDatabase>
  /** Releases everything. */
  destroy (): Promise<void>
}

export class FakeClock {
  constructor (public t = 1_700_000_000_000) {}
  now (): number { return this.t }
  advance (ms: number): void { this.t += ms }
}

export function classicBackend (): Backend {
  let dir: string | undefined
  let shared: ClassicLevel<Buffer, Buffer> | undefined
  let lastOptions: StoreOptions = {}
  return {
    name: 'classic-level',
    async open (options = {}) {
      dir = await fs.mkdtemp(path.join(os.tmpdir(), 'edgemq-store-'))
      lastOptions = options
      return openLogStore({ ...options, location: dir })
    },
    async reopen (store, options = lastOptions) {
      await store.close()
      return this.openExisting(options)
    },
    async openExisting (options = lastOptions) {
      return openLogStore({ ...options, location: dir as string })
    },
    async raw () {
      const db = new ClassicLevel<Buffer, Buffer>(dir as string, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
      await db.open()
      return db as unknown as LevelDatabase
    },
    async database () {
      dir = await fs.mkdtemp(path.join(os.tmpdir(), 'edgemq-store-'))
      shared = new ClassicLevel<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
      await shared.open()
      return shared as unknown as LevelDatabase
    },
    async destroy () {
      await shared?.close()
      if (dir !== undefined) await fs.rm(dir, { recursive: true, force: true })
    },
  }
}

/** memory-level keeps its data across close() → open() of the same instance. */
export function memoryBackend (): Backend {
  let db: MemoryLevel<Buffer, Buffer> | undefined
  let lastOptions: StoreOptions = {}
  const asLevel = (): LevelDatabase => db as unknown as LevelDatabase
  return {
    name: 'memory-level',
    async open (options = {}) {
      db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
      lastOptions = options
      return openLogStore({ ...options, db: asLevel() })
    },
    async reopen (store, options = lastOptions) {
      await store.close()
      return this.openExisting(options)
    },
    async openExisting (options = lastOptions) {
      if (asLevel().status === 'open') await asLevel().close()
      return openLogStore({ ...options, db: asLevel() })
    },
    async raw () {
      if (asLevel().status !== 'open') await asLevel().open()
      return asLevel()
    },
    async database () {
      db = new MemoryLevel<Buffer, Buffer>({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
      await db.open()
      return asLevel()
    },
    async destroy () {
      await db?.close()
    },
  }
}

export const backends: ReadonlyArray<() => Backend> = [classicBackend, memoryBackend]

export function payloadOf (i: number, size = 16): Buffer {
  const b = Buffer.alloc(size)
  b.write(`p${i}:`, 'utf8')
  for (let k = String(i).length + 2; k < size; k++) b[k] = (i * 31 + k) & 0xff
  return b
}
