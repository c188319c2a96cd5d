/**
 * Compiled JSON-schema validators kept as code between runs. ajv turns a schema into a function by generating its
 * source and compiling it; for the config schema that took about 130 ms of CPU at every `edgemq start`, every CLI
 * command that reads a config, and every test file that builds one, and the HTTP routes' schemas about 150 ms more at
 * every start. ajv's standalone mode writes that source out
 * (https://ajv.js.org/standalone.html); requiring it again costs about 15 ms.
 *
 * The file is named by a hash of the schema, the ajv options and ajv's version, so a changed schema never meets an
 * old validator. It is written to a temporary name and renamed, so a process that reads it never sees half of one. A
 * file that cannot be read or loaded is compiled again and replaced; a directory that cannot be written (a read-only
 * install) only means compiling at every start, as before (one ajv per set of options, tried once per process).
 */
import { createHash } from 'node:crypto'
import { mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import type { Ajv as AjvClass, AnySchema, Options, ValidateFunction } from 'ajv'

const require = createRequire(import.meta.url)

/** Beside the packages, where build tools keep their caches (node_modules/.cache), and npm ci starts afresh. */
export const VALIDATOR_CACHE_DIR = fileURLToPath(new URL('../../node_modules/.cache/edgemq/', import.meta.url))

/** The validator of `schema` under `options`: loaded from `dir` when compiled before, else compiled and saved there. */
export function cachedValidator (name: string, schema: AnySchema, options: Options, dir = VALIDATOR_CACHE_DIR): ValidateFunction {
  const { version } = require('ajv/package.json') as { version: string }
  const key = createHash('sha256').update(JSON.stringify({ schema, options, version })).digest('hex').slice(0, 16)
  const file = path.join(dir, `${name}-${key}.cjs`)
  try {
    const loaded: unknown = require(file)
    if (typeof loaded === 'function') return loaded as ValidateFunction
  } catch {
    // Not compiled yet, or damaged: compiled again below.
  }
  const ajv = compilerFor(options)
  const validate = ajv.compile(schema)
  if (unwritable.has(dir)) return validate
  const tmp = `${file}.${process.pid}.tmp`
  try {
    mkdirSync(dir, { recursive: true })
    // The code requires ajv's runtime helpers (ucs2length for maxLength) by package name: resolved here, so the file
    // loads wherever it is kept; moved with node_modules, it fails to load and is compiled again.
    const code = standaloneCode()(ajv, validate)
      .replace(/require\("(ajv\/dist\/runtime\/[\w./-]+)"\)/g, (_m, id: string) => `require(${JSON.stringify(require.resolve(id))})`)
    writeFileSync(tmp, code)
    renameSync(tmp, file)
  } catch {
    // Read-only (a container whose node_modules belongs to root, say): not tried again by this process.
    unwritable.add(dir)
    try { rmSync(tmp, { force: true }) } catch { /* the directory itself is not there */ }
  }
  return validate
}

/** Directories this process could not write a validator to. */
const unwritable = new Set<string>()

/**
 * One ajv per set of options, as before the cache: a new instance per schema cost 3x the CPU of a start that cannot
 * write its cache (each instance compiles its meta-schema and warms up anew).
 */
const compilers = new Map<string, AjvClass>()
function compilerFor (options: Options): AjvClass {
  const key = JSON.stringify(options)
  let ajv = compilers.get(key)
  if (ajv === undefined) {
    // ajv itself only when compiling: its import is about 50 ms of a start that finds the files.
    const { Ajv } = require('ajv') as { Ajv: typeof AjvClass }
    ajv = new Ajv({ ...options, code: { ...options.code, source: true } })
    compilers.set(key, ajv)
  }
  return ajv
}

function standaloneCode (): (ajv: AjvClass, validate: ValidateFunction) => string {
  return (require('ajv/dist/standalone') as { default: (ajv: AjvClass, validate: ValidateFunction) => string }).default
}
