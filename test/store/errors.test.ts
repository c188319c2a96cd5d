import fs from 'node:fs'
import { describe, expect, it } from 'vitest'
import { STORE_ERROR_CODES, StoreError } from '../../store/errors.ts'

describe('store error codes', () => {
  it('documents every code in docs/errors.md', () => {
    const errors = fs.readFileSync(new URL('../../docs/errors.md', import.meta.url), 'utf8')
    const missing = Object.keys(STORE_ERROR_CODES).filter((code) => !errors.includes(`\`${code}\``))
    expect(missing).toEqual([])
  })

  it('carries code and cause', () => {
    const cause = new Error('ENOSPC')
    const err = new StoreError('STORE_WRITE_FAILED', 'write failed', { cause })
    expect(err).toMatchObject({ code: 'STORE_WRITE_FAILED', cause, name: 'StoreError' })
    expect(err).toBeInstanceOf(Error)
  })
})
