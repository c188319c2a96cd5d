/**
 * Opening the data directory (`dataDir`, LevelDB under `<dataDir>/db`) and
 * saying plainly why it cannot be opened: held by another process, read-only,
 * not a directory, not writable by this user, or damaged. LevelDB's own
 * errors (`LEVEL_DATABASE_NOT_OPEN: Database failed to open`, raw errno text)
 * name neither the problem nor the fix, so the path is examined here instead:
 * the nearest existing part of it says what is wrong.
 */
import { constants } from 'node:fs'
import { access, mkdir, stat } from 'node:fs/promises'
import path from 'node:path'
import { ClassicLevel } from 'classic-level'
import { checkTableFiles, type TableDamage } from '../../store/index.ts'
import { GatewayError } from '../errors.ts'

/** Creates `dataDir` if needed and opens its database; a GatewayError with a GW_DATA_… code when it cannot. */
export async function openDataDirDatabase (dataDir: string): Promise<ClassicLevel<Buffer, Buffer>> {
  const location = path.join(dataDir, 'db')
  try {
    await mkdir(location, { recursive: true })
    const db = new ClassicLevel<Buffer, Buffer>(location, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
    await db.open()
    return db
  } catch (err) {
    throw await dataDirError(err, dataDir)
  }
}

/** The GW_ error for a failure to create or open the database in `dataDir`. */
export async function dataDirError (err: unknown, dataDir: string): Promise<GatewayError> {
  const location = path.join(dataDir, 'db')
  const code = innermostCode(err)
  if (code === 'LEVEL_LOCKED') {
    return new GatewayError('GW_DATA_DIR_LOCKED',
      `data directory ${dataDir} is in use by another process (LevelDB's lock ${path.join(location, 'LOCK')} is held): ` +
        'stop the other gateway or edgemq command using it, or give this gateway its own --data-dir',
      { cause: err })
  }
  if (code === 'LEVEL_CORRUPTION') return await damagedDataDir(err, dataDir)
  return (await diagnosePath(location, err)) ?? fromErrno(code, location, dataDir, err)
}

/**
 * GW_DATA_DAMAGED for a store that refused to open (STORE_DAMAGED,
 * STORE_CORRUPT_BATCH, LevelDB corruption), naming the table files whose
 * checksums fail. Reads every table file: only on this error path.
 */
export async function damagedDataDir (err: unknown, dataDir: string): Promise<GatewayError> {
  let files = ''
  try {
    const { damage } = await checkTableFiles(path.join(dataDir, 'db'))
    if (damage.length > 0) files = `; damaged files: ${describeTableDamage(damage)}`
  } catch {
    // The files could not even be listed; the store's error below still names the damage.
  }
  return new GatewayError('GW_DATA_DAMAGED',
    `data directory ${dataDir} is damaged: ${(err as Error).message}${files}. ` +
    'The gateway does not start on damaged data, so that nothing is lost without notice: ' +
    `run \`edgemq check --data-dir ${dataDir}\` for the full report, then follow "Damaged data" in docs/operations.md`,
    { cause: err })
}

export function describeTableDamage (damage: readonly TableDamage[]): string {
  return damage.map((d) => `${d.file} (${d.problem} at byte ${d.offset})`).join(', ')
}

/** Walks up from `target` to the first part that exists and says what is wrong with it, or undefined when nothing is. */
async function diagnosePath (target: string, err: unknown): Promise<GatewayError | undefined> {
  for (let p = path.resolve(target); ; p = path.dirname(p)) {
    let isDir: boolean
    try {
      isDir = (await stat(p)).isDirectory()
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code
      if (code === 'ENOENT' && path.dirname(p) !== p) continue
      if (code === 'ENOTDIR') continue // a file further up; found when we get there
      return undefined
    }
    if (!isDir) {
      return new GatewayError('GW_DATA_DIR_NOT_DIRECTORY',
        `${p} is a file, not a directory, so the data directory ${target} cannot be created there: move the file or choose another --data-dir`, { cause: err })
    }
    try {
      await access(p, constants.W_OK | constants.X_OK)
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code
      if (code === 'EROFS') return readOnly(p, err)
      if (code === 'EACCES' || code === 'EPERM') return permission(p, err)
      return undefined
    }
    // Writable: LevelDB failed on something else (a file inside, LOCK or CURRENT); the errno says what.
    return undefined
  }
}

function fromErrno (code: string | undefined, location: string, dataDir: string, err: unknown): GatewayError {
  const message = innermostMessage(err)
  if (code === 'EROFS' || /read-only file system/i.test(message)) return readOnly(location, err)
  if (code === 'EACCES' || code === 'EPERM' || /permission denied/i.test(message)) return permission(location, err)
  if (code === 'ENOTDIR' || code === 'EEXIST' || /not a directory/i.test(message)) {
    const message = `${location} (or a part of its path) is a file, not a directory: move it or choose another --data-dir`
    return new GatewayError('GW_DATA_DIR_NOT_DIRECTORY', message, { cause: err })
  }
  return new GatewayError('GW_DATA_DIR_UNUSABLE', `cannot open the data directory ${dataDir} (database ${location}): ${message}`, { cause: err })
}

function readOnly (p: string, err: unknown): GatewayError {
  return new GatewayError('GW_DATA_DIR_READ_ONLY',
    `${p} is on a read-only file system; the gateway writes its log there: mount it read-write or choose another --data-dir`, { cause: err })
}

function permission (p: string, err: unknown): GatewayError {
  const who = typeof process.getuid === 'function' ? ` (uid ${process.getuid()})` : ''
  return new GatewayError('GW_DATA_DIR_PERMISSION',
    `the gateway's user${who} may not write ${p}: change its owner or mode (chown, chmod), or choose another --data-dir`, { cause: err })
}

function innermostCode (err: unknown): string | undefined {
  let code: string | undefined
  type Chained = { code?: unknown, cause?: unknown } | undefined
  for (let e = err as Chained, depth = 0; e !== null && typeof e === 'object' && depth < 8; e = e.cause as Chained, depth++) {
    if (typeof e.code === 'string') code = e.code
  }
  return code
}

function innermostMessage (err: unknown): string {
  let e = err as { message?: string, cause?: unknown } | undefined
  while (e?.cause !== undefined && e.cause !== null && typeof e.cause === 'object') e = e.cause as typeof e
  return e?.message ?? String(err)
}
