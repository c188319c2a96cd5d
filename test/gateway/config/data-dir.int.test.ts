/**
 * A data directory the gateway cannot use is refused with a GW_DATA_DIR_…
 * code that names the path, says what is wrong and what to do (issue 11),
 * through `edgemq start` as a user runs it. A read-only file system cannot be
 * made here without mounting one; test/gateway/data-dir.test.ts covers that
 * mapping.
 */
import { spawn } from 'node:child_process'
import { chmod, mkdir, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { runCliWithin, type CliResult } from '../../helpers/cli-run.ts'
import { startGatewayProcess, tempDir } from '../../helpers/gateway-process.ts'

const ROOT = path.resolve(import.meta.dirname, '../../..')
const BIN = path.join(ROOT, 'gateway/edgemq.mjs')
const NOBODY = 65534

let root: string
let cleanup: () => Promise<void>
beforeAll(async () => { ({ dir: root, cleanup } = await tempDir('edgemq-datadir-')) })
afterAll(async () => { await cleanup?.() })

function start (dataDir: string): Promise<CliResult> {
  return runCliWithin(['start', '--data-dir', dataDir, '--mqtt-port', '0', '--http-port', '0'], 60_000)
}

/** `edgemq start` as an unprivileged user (root may write anywhere). */
function startAsNobody (dataDir: string): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [BIN, 'start', '--data-dir', dataDir, '--mqtt-port', '0', '--http-port', '0'],
      { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], uid: NOBODY, gid: NOBODY, env: { ...process.env, HOME: '/tmp' } })
    let stdout = ''
    let stderr = ''
    let timedOut = false
    const timer = setTimeout(() => { timedOut = true; child.kill('SIGKILL') }, 60_000)
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString() })
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString() })
    child.on('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr, timedOut }) })
  })
}

function expectRefused (result: CliResult, code: string): void {
  expect(result.timedOut, result.stdout).toBe(false)
  expect(result.stdout).not.toMatch(/ ready: /)
  expect(result.code).toBe(1)
  expect(result.stderr).toMatch(new RegExp(`^edgemq: ${code}: `, 'm'))
}

describe('data directory the gateway cannot use', () => {
  it('held by another gateway: GW_DATA_DIR_LOCKED naming the lock file', async () => {
    const dir = path.join(root, 'held')
    const first = await startGatewayProcess({ dataDir: dir })
    try {
      const second = await start(dir)
      expectRefused(second, 'GW_DATA_DIR_LOCKED')
      expect(second.stderr).toContain(path.join(dir, 'db', 'LOCK'))
      expect(second.stderr).not.toMatch(/LEVEL_DATABASE_NOT_OPEN/)
    } finally {
      await first.stop()
    }
  })

  it('under a file: GW_DATA_DIR_NOT_DIRECTORY naming the file', async () => {
    const file = path.join(root, 'a-file')
    await writeFile(file, 'not a directory\n')
    const result = await start(path.join(file, 'data'))
    expectRefused(result, 'GW_DATA_DIR_NOT_DIRECTORY')
    expect(result.stderr).toContain(`${file} is a file`)
    expect(result.stderr).not.toMatch(/ENOTDIR:/)
  })

  it('a file itself: GW_DATA_DIR_NOT_DIRECTORY naming it', async () => {
    const file = path.join(root, 'data-file')
    await writeFile(file, 'not a directory\n')
    const result = await start(file)
    expectRefused(result, 'GW_DATA_DIR_NOT_DIRECTORY')
    expect(result.stderr).toContain(`${file} is a file`)
  })

  it('not writable by the gateway\'s user: GW_DATA_DIR_PERMISSION naming the directory', async () => {
    const parent = path.join(root, 'locked-away')
    await mkdir(parent)
    await chmod(root, 0o755)
    await chmod(parent, 0o555)
    const isRoot = process.getuid?.() === 0
    const result = isRoot ? await startAsNobody(path.join(parent, 'data')) : await start(path.join(parent, 'data'))
    expectRefused(result, 'GW_DATA_DIR_PERMISSION')
    expect(result.stderr).toContain(`may not write ${parent}`)
    expect(result.stderr).not.toMatch(/EACCES:/)
  })
})
