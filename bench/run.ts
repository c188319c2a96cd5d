/**
 * `npm run bench`: runs every bench file in this folder (each `*.ts` beside
 * this one), one after another, each in its own process so that one bench's
 * heap, LevelDB threads and page cache churn do not leak into the next.
 * Their JSON figure lines are passed through on stdout; anything else a child
 * prints on stdout goes to stderr, so stdout stays one figure per line.
 *
 * `npm run bench -- store` runs only the named benches; arguments after `--`
 * a second time are handed to each of them (`npm run bench -- store -- --quick`).
 */
import { spawn } from 'node:child_process'
import { readdir } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const self = basename(fileURLToPath(import.meta.url))

const args = process.argv.slice(2)
const split = args.indexOf('--')
const names = split < 0 ? args : args.slice(0, split)
const passThrough = split < 0 ? [] : args.slice(split + 1)

const available = (await readdir(here)).filter((f) => f.endsWith('.ts') && f !== self).map((f) => f.slice(0, -3)).sort()
for (const name of names) {
  if (!available.includes(name)) throw new Error(`no bench named ${name}; have ${available.join(', ')}`)
}
const benches = names.length === 0 ? available : names

function runBench (name: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', join(here, `${name}.ts`), ...passThrough], {
      stdio: ['ignore', 'pipe', 'inherit'],
    })
    const lines = createInterface({ input: child.stdout })
    lines.on('line', (line) => {
      if (isFigure(line)) process.stdout.write(`${line}\n`)
      else process.stderr.write(`[${name}] ${line}\n`)
    })
    child.on('error', reject)
    child.on('close', (code, signal) => resolve(code ?? (signal === null ? 1 : 128)))
  })
}

function isFigure (line: string): boolean {
  try {
    const value: unknown = JSON.parse(line)
    return typeof value === 'object' && value !== null && 'bench' in value
  } catch {
    return false
  }
}

let failed = 0
for (const name of benches) {
  process.stderr.write(`[bench] running ${name}\n`)
  const code = await runBench(name)
  if (code !== 0) {
    failed++
    process.stderr.write(`[bench] ${name} exited with code ${code}\n`)
  }
}
process.exitCode = failed === 0 ? 0 : 1
