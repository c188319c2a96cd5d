/**
 * Entry point of a load-generator child process (see load-process.ts for
 * the parent's side). It waits for `run` messages on the IPC channel, runs
 * the load (mqtt/load.ts) and answers with phase messages and the result.
 * One child serves every round of a bench, so its start-up is paid once.
 */
import { runLoad } from './mqtt/load.ts'
import type { ChildMessage, ParentMessage } from './load-process.ts'

function send (message: ChildMessage): void {
  process.send?.(message)
}

if (process.send === undefined) {
  process.stderr.write('load-child.ts is started by bench/lib/load-process.ts with an IPC channel\n')
  process.exit(2)
}

process.on('message', (message: ParentMessage) => {
  if (message.type === 'exit') {
    process.disconnect()
    return
  }
  runLoad(message.spec, (phase) => send({ type: 'phase', phase })).then(
    (result) => send({ type: 'result', result }),
    (err: unknown) => send({ type: 'error', message: err instanceof Error ? err.message : String(err) }),
  )
})
