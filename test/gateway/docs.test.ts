/**
 * The reference in docs/ is the user's: every config key and every error
 * code the gateway can raise must be in it (fastify's rule for its error
 * codes), and the pages rendered from the code must be what the code renders
 * now, so they cannot drift from it.
 */
import fs from 'node:fs'
import path from 'node:path'
import { describe, expect, it } from 'vitest'
import { GENERATED_DOCS, REGENERATE, anchor } from '../../docs/generate.ts'
import { BRIDGE_ERROR_CODES } from '../../bridge/errors.ts'
import { describeConfig } from '../../gateway/config/config.ts'
import { HTTP_ERROR_CODES } from '../../gateway/http/errors.ts'
import { CLI_ERROR_CODES } from '../../gateway/cli/errors.ts'
import { GATEWAY_ERROR_CODES, GATEWAY_WARNING_CODES } from '../../gateway/errors.ts'
import { SESSION_ERROR_CODES } from '../../gateway/mqtt/sessions/persistence.ts'
import { STORE_ERROR_CODES } from '../../store/errors.ts'

const read = (file: string): string => fs.readFileSync(new URL(`../../${file}`, import.meta.url), 'utf8')

describe('docs/', () => {
  it.each(GENERATED_DOCS.map((d) => [d.file, d.render] as const))('%s is what docs/generate.ts renders from the code', (file, render) => {
    const committed = fs.existsSync(new URL(`../../${file}`, import.meta.url)) ? read(file) : ''
    expect(committed === render(committed), `${file} is stale: run \`${REGENERATE}\` and commit the result`).toBe(true)
  })

  it('documents every config key, with its default', () => {
    const reference = read('docs/configuration.md')
    const missing = describeConfig().filter((k) => !reference.includes(`| \`${k.key}\` |`)).map((k) => k.key)
    expect(missing).toEqual([])
  })

  it('gives every config key a description', () => {
    expect(describeConfig().filter((k) => k.description.trim() === '').map((k) => k.key)).toEqual([])
  })

  it('documents every store, gateway, session, HTTP, CLI and bridge error code, and every start-up warning code', () => {
    const errors = read('docs/errors.md')
    const codes = [
      ...Object.keys(STORE_ERROR_CODES), ...Object.keys(GATEWAY_ERROR_CODES), ...Object.keys(GATEWAY_WARNING_CODES), ...Object.keys(SESSION_ERROR_CODES),
      ...Object.keys(HTTP_ERROR_CODES), ...Object.keys(CLI_ERROR_CODES), ...Object.keys(BRIDGE_ERROR_CODES),
    ]
    expect(codes.filter((code) => !errors.includes(`| \`${code}\` |`))).toEqual([])
  })
})

describe('links in README.md, BENCHMARKS.md, dashboards/README.md and docs/', () => {
  const pages = ['README.md', 'BENCHMARKS.md', 'dashboards/README.md', ...fs.readdirSync(new URL('../../docs/', import.meta.url)).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`)]
  const anchorsOf = (page: string): Set<string> => {
    const text = read(page).replace(/```[\s\S]*?```/g, '')
    return new Set([...text.matchAll(/^#{1,6} (.+)$/gm)].map((m) => anchor(m[1] ?? '')))
  }

  it.each(pages)('every relative link in %s names a file (and a heading) that exists', (page) => {
    const text = read(page).replace(/```[\s\S]*?```/g, '').replace(/`[^`\n]*`/g, (code) => code.startsWith('`[') ? code : '')
    const broken: string[] = []
    for (const [, target] of text.matchAll(/\]\(([^)\s]+)\)/g)) {
      if (target === undefined || /^[a-z]+:/.test(target)) continue
      const [file = '', hash] = target.split('#')
      const resolved = file === '' ? page : path.posix.normalize(path.posix.join(path.posix.dirname(page), file))
      if (!fs.existsSync(new URL(`../../${resolved}`, import.meta.url))) broken.push(target)
      else if (hash !== undefined && resolved.endsWith('.md') && !anchorsOf(resolved).has(hash)) broken.push(target)
    }
    expect(broken).toEqual([])
  })
})
