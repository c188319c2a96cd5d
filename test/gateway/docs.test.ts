/**
 * The README is the user's reference: every config key and every error code
 * the gateway can raise must be in it (fastify's rule for its error codes).
 */
import fs from 'node:fs'
import { describe, expect, it } from 'vitest'
import { BRIDGE_ERROR_CODES } from '../../bridge/errors.ts'
import { describeConfig } from '../../gateway/config.ts'
import { HTTP_ERROR_CODES } from '../../gateway/api-errors.ts'
import { CLI_ERROR_CODES } from '../../gateway/cli-errors.ts'
import { GATEWAY_ERROR_CODES } from '../../gateway/errors.ts'
import { SESSION_ERROR_CODES } from '../../gateway/session-persistence.ts'

const readme = fs.readFileSync(new URL('../../README.md', import.meta.url), 'utf8')

describe('README', () => {
  it('documents every config key, with its default', () => {
    const missing = describeConfig().filter((k) => !readme.includes(`| \`${k.key}\` |`)).map((k) => k.key)
    expect(missing).toEqual([])
  })

  it('gives every config key a description', () => {
    expect(describeConfig().filter((k) => k.description.trim() === '').map((k) => k.key)).toEqual([])
  })

  it('documents every gateway, session, HTTP, CLI and bridge error code', () => {
    const codes = [...Object.keys(GATEWAY_ERROR_CODES), ...Object.keys(SESSION_ERROR_CODES), ...Object.keys(HTTP_ERROR_CODES), ...Object.keys(CLI_ERROR_CODES), ...Object.keys(BRIDGE_ERROR_CODES)]
    expect(codes.filter((code) => !readme.includes(`\`${code}\``))).toEqual([])
  })
})
