import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { cachedValidator } from '../../../gateway/config/validator-cache.ts'

const SCHEMA = {
  type: 'object',
  additionalProperties: false,
  properties: {
    name: { type: 'string', pattern: '^[a-z]+$', maxLength: 8 },
    port: { type: 'integer', minimum: 0, maximum: 65535, default: 1883 },
  },
}
const OPTIONS = { useDefaults: true, allErrors: false, strict: true }

/** What a validator says of each input: valid or not, the defaults it filled in, its first error's keyword and path. */
function verdicts (validate: ReturnType<typeof cachedValidator>): unknown[] {
  return [{}, { name: 'abc' }, { name: 'ABC' }, { name: 'toolongname' }, { port: -1 }, { other: 1 }, { name: 'ünï' }].map((input) => {
    const data = structuredClone(input)
    const ok = validate(data)
    const first = validate.errors?.[0]
    return { ok, data, error: first === undefined ? null : [first.keyword, first.instancePath] }
  })
}

describe('config validator cache', () => {
  let dir: string | undefined
  afterEach(async () => { if (dir !== undefined) await rm(dir, { recursive: true, force: true }) })

  it('writes the compiled validator once, and the one loaded from it judges every input as the compiled one did', async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'edgemq-ajv-'))
    const compiled = cachedValidator('t', SCHEMA, OPTIONS, dir)
    const files = await readdir(dir)
    expect(files).toHaveLength(1)
    const loaded = cachedValidator('t', SCHEMA, OPTIONS, dir)
    expect(loaded).not.toBe(compiled)
    expect(await readdir(dir)).toEqual(files)
    expect(verdicts(loaded)).toEqual(verdicts(compiled))
    // A changed schema is another file, not the old validator.
    const stricter = cachedValidator('t', { ...SCHEMA, required: ['name'] }, OPTIONS, dir)
    expect(stricter({})).toBe(false)
    expect(await readdir(dir)).toHaveLength(2)
  })

  it('compiles again over a damaged file, and works where nothing can be written', async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'edgemq-ajv-'))
    cachedValidator('t', SCHEMA, OPTIONS, dir)
    const [file] = await readdir(dir)
    await writeFile(path.join(dir, file as string), 'module.exports = (') // cut short by a crash of the disk, say
    const again = cachedValidator('t', SCHEMA, OPTIONS, dir)
    expect(verdicts(again)[0]).toEqual({ ok: true, data: { port: 1883 }, error: null })
    expect(await readFile(path.join(dir, file as string), 'utf8')).toContain('validate')
    // A path under a file cannot be a directory: compiled, used, not saved.
    const unwritable = cachedValidator('t', SCHEMA, OPTIONS, path.join(dir, file as string, 'sub'))
    expect(unwritable({ name: 'ABC' })).toBe(false)
  })
})
