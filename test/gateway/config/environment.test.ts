import { describe, expect, it } from 'vitest'
import { readEnvironment } from '../../../gateway/config/environment.ts'

describe('readEnvironment', () => {
  it('reads the EDGEMQ_ variables and whether npm launched the process', () => {
    const env = readEnvironment({ EDGEMQ_URL: 'http://gw:9464', EDGEMQ_TOKEN: 'emq_a_b', EDGEMQ_USER: 'ops', EDGEMQ_PASSWORD: 'pw', npm_execpath: '/npm' })
    expect(env).toEqual({ url: 'http://gw:9464', token: 'emq_a_b', user: 'ops', password: 'pw', launchedByNpm: true })
    expect(Object.isFrozen(env)).toBe(true)
  })

  it('treats empty values as unset, and nothing set as nothing', () => {
    expect(readEnvironment({ EDGEMQ_URL: '', EDGEMQ_TOKEN: '', EDGEMQ_USER: '', EDGEMQ_PASSWORD: '' }))
      .toEqual({ url: undefined, token: undefined, user: undefined, password: undefined, launchedByNpm: false })
    expect(readEnvironment({})).toEqual({ url: undefined, token: undefined, user: undefined, password: undefined, launchedByNpm: false })
  })
})
