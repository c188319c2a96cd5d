import { describe, expect, it } from 'vitest'
import { Shutdown, type ShutdownLogger } from '../../gateway/shutdown.ts'

function recorder (): { logger: ShutdownLogger, errors: unknown[] } {
  const errors: unknown[] = []
  return { logger: { debug: () => {}, error: (fields) => { errors.push(fields) } }, errors }
}

describe('Shutdown', () => {
  it('runs the steps once, last registered first, however often it is asked', async () => {
    const { logger } = recorder()
    const shutdown = new Shutdown({ logger, stepTimeoutMs: 10_000 })
    const ran: string[] = []
    for (const name of ['database', 'store', 'bridge', 'listeners']) shutdown.add(name, async () => { ran.push(name) })
    expect(shutdown.order).toEqual(['listeners', 'bridge', 'store', 'database'])
    await Promise.all([shutdown.run(), shutdown.run()])
    await shutdown.run()
    expect(ran).toEqual(['listeners', 'bridge', 'store', 'database'])
  })

  it('goes on past a step that fails and past one that never finishes, and logs both', async () => {
    const { logger, errors } = recorder()
    const shutdown = new Shutdown({ logger, stepTimeoutMs: 50 })
    const ran: string[] = []
    shutdown.add('database', async () => { ran.push('database') })
    shutdown.add('stuck', () => new Promise<void>(() => {}))
    shutdown.add('failing', async () => { throw new Error('boom') })
    await shutdown.run()
    expect(ran).toEqual(['database'])
    expect(errors).toEqual([
      expect.objectContaining({ step: 'failing', err: 'boom' }),
      expect.objectContaining({ step: 'stuck', timeoutMs: 50 }),
    ])
  })

  it('runs a step added after the shutdown began at once', async () => {
    const { logger } = recorder()
    const shutdown = new Shutdown({ logger, stepTimeoutMs: 10_000 })
    let late = false
    let release: () => void = () => {}
    shutdown.add('slow', () => new Promise<void>((resolve) => { release = resolve }))
    const running = shutdown.run()
    const added = new Promise<void>((resolve) => shutdown.add('late', async () => { late = true; resolve() }))
    await added
    expect(late).toBe(true)
    release()
    await running
  })
})
