/**
 * `edgemq passwd` on a terminal prompts twice and echoes nothing; piped, it
 * reads stdin. The terminal is a real pseudo-terminal made by util-linux's
 * `script`.
 */
import { spawn, spawnSync } from 'node:child_process'
import path from 'node:path'
import { describe, expect, it } from 'vitest'
import { verifyPassword } from '../../../gateway/access/auth.ts'
import { runCliWithin } from '../../helpers/cli-run.ts'

const ROOT = path.resolve(import.meta.dirname, '../../..')
const BIN = path.join(ROOT, 'gateway/edgemq.mjs')
const hasScript = spawnSync('script', ['--version']).status === 0

interface Terminal { readonly output: () => string, type (text: string): void, waitFor (text: string): Promise<void>, readonly exited: Promise<number | null> }

/** Runs `edgemq passwd` with its stdin, stdout and stderr on a pseudo-terminal. */
function onTerminal (): Terminal {
  const child = spawn('script', ['-qfec', `exec ${process.execPath} ${BIN} passwd`, '/dev/null'], { cwd: ROOT, stdio: ['pipe', 'pipe', 'inherit'], env: { ...process.env, SHELL: '/bin/sh' } })
  let output = ''
  const waiting: Array<{ text: string, resolve: () => void }> = []
  child.stdout.on('data', (d: Buffer) => {
    output += d.toString()
    for (const w of waiting.splice(0)) { if (output.includes(w.text)) w.resolve(); else waiting.push(w) }
  })
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve))
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000)
  void exited.then(() => clearTimeout(timer))
  return {
    output: () => output,
    type: (text) => { child.stdin.write(text) },
    waitFor: (text) => new Promise((resolve, reject) => {
      if (output.includes(text)) return resolve()
      waiting.push({ text, resolve })
      void exited.then(() => reject(new Error(`exited before printing ${JSON.stringify(text)}:\n${output}`)))
    }),
    exited,
  }
}

describe('edgemq passwd', () => {
  it.runIf(hasScript || process.env.CI === 'true')('on a terminal, prompts twice without echoing and prints the hash of what was typed', async () => {
    const tty = onTerminal()
    await tty.waitFor('Password: ')
    tty.type('s3cret pass\r')
    await tty.waitFor('Repeat password: ')
    tty.type('s3cret pass\r')
    expect(await tty.exited).toBe(0)
    expect(tty.output()).not.toContain('s3cret')
    const hash = /scrypt\$\S+/.exec(tty.output())?.[0]
    expect(hash, tty.output()).toBeDefined()
    expect(await verifyPassword(hash!, 's3cret pass')).toBe(true)
  }, 30_000)

  it.runIf(hasScript || process.env.CI === 'true')('on a terminal, refuses two different passwords (CLI_BAD_ARGUMENT)', async () => {
    const tty = onTerminal()
    await tty.waitFor('Password: ')
    tty.type('one\r')
    await tty.waitFor('Repeat password: ')
    tty.type('two\r')
    expect(await tty.exited).toBe(1)
    expect(tty.output()).toContain('CLI_BAD_ARGUMENT')
    expect(tty.output()).not.toContain('scrypt$')
  }, 30_000)

  it('piped, reads the password from stdin', async () => {
    const r = await runCliWithin(['passwd'], 20_000, 'piped pw\n')
    expect(r.code, r.stderr).toBe(0)
    expect(await verifyPassword(r.stdout.trim(), 'piped pw')).toBe(true)
  }, 30_000)
})
