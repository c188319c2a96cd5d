/**
 * The mapping from LevelDB's and the OS's errors to GW_DATA_DIR_… codes, for
 * the cases `edgemq start` cannot be made to meet here: a read-only file
 * system needs a mount (data-dir.int.test.ts runs the others for real).
 */
import { mkdtemp, rm } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { dataDirError } from '../../../gateway/config/data-dir.ts'

let root: string
beforeAll(async () => { root = await mkdtemp(path.join(os.tmpdir(), 'edgemq-datadir-unit-')) })
afterAll(async () => { await rm(root, { recursive: true, force: true }) })

/** classic-level's shape: LEVEL_DATABASE_NOT_OPEN with the real error as its cause. */
function notOpen (cause: Error): Error {
  return Object.assign(new Error('Database failed to open', { cause }), { code: 'LEVEL_DATABASE_NOT_OPEN' })
}

describe('data directory errors', () => {
  it('a read-only file system, seen as errno by mkdir: GW_DATA_DIR_READ_ONLY naming the path', async () => {
    const dataDir = path.join(root, 'ro')
    const err = await dataDirError(Object.assign(new Error(`EROFS: read-only file system, mkdir '${dataDir}/db'`), { code: 'EROFS' }), dataDir)
    expect(err.code).toBe('GW_DATA_DIR_READ_ONLY')
    expect(err.message).toContain(path.join(dataDir, 'db'))
  })

  it('a read-only file system, seen by LevelDB creating its lock file: GW_DATA_DIR_READ_ONLY', async () => {
    const dataDir = path.join(root, 'ro2')
    const cause = Object.assign(new Error(`IO error: ${dataDir}/db/LOCK: Read-only file system`), { code: 'LEVEL_IO_ERROR' })
    const err = await dataDirError(notOpen(cause), dataDir)
    expect(err.code).toBe('GW_DATA_DIR_READ_ONLY')
    expect(err.cause).toBeDefined()
  })

  it('LevelDB\'s lock held: GW_DATA_DIR_LOCKED; LevelDB corruption at open: GW_DATA_DAMAGED', async () => {
    const dataDir = path.join(root, 'held')
    const locked = Object.assign(new Error(`IO error: lock ${dataDir}/db/LOCK: Resource temporarily unavailable`), { code: 'LEVEL_LOCKED' })
    expect((await dataDirError(notOpen(locked), dataDir)).code).toBe('GW_DATA_DIR_LOCKED')
    const corrupt = Object.assign(new Error('Corruption: bad record length'), { code: 'LEVEL_CORRUPTION' })
    expect((await dataDirError(notOpen(corrupt), dataDir)).code).toBe('GW_DATA_DAMAGED')
  })

  it('anything else: GW_DATA_DIR_UNUSABLE with the path and the system\'s words', async () => {
    const dataDir = path.join(root, 'other')
    const err = await dataDirError(notOpen(Object.assign(new Error('IO error: too many open files'), { code: 'LEVEL_IO_ERROR' })), dataDir)
    expect(err.code).toBe('GW_DATA_DIR_UNUSABLE')
    expect(err.message).toContain(dataDir)
    expect(err.message).toContain('too many open files')
  })
})
