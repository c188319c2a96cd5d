/**
 * The password `edgemq passwd` hashes: typed at a prompt that does not echo
 * it when stdin is a terminal (asked twice, as passwd(1) does), else read
 * from stdin (`echo -n secret | edgemq passwd`).
 */
import type { ReadStream } from 'node:tty'
import { CliError } from './errors.ts'

/** Reads one line from a terminal in raw mode, echoing nothing. Ctrl-C and Ctrl-D abort. */
export function promptHidden (input: ReadStream, output: NodeJS.WritableStream, prompt: string): Promise<string> {
  const wasRaw = input.isRaw
  // Raw before the prompt shows: what is typed after seeing it is never echoed.
  input.setRawMode(true)
  input.resume()
  output.write(prompt)
  return new Promise((resolve, reject) => {
    let typed = ''
    const finish = (err: Error | null): void => {
      input.off('data', onData)
      input.setRawMode(wasRaw)
      input.pause()
      output.write('\n')
      if (err === null) resolve(typed); else reject(err)
    }
    const onData = (chunk: Buffer): void => {
      for (const ch of chunk.toString('utf8')) {
        if (ch === '\r' || ch === '\n') return finish(null)
        if (ch === '\u0003' || ch === '\u0004') return finish(new CliError('CLI_BAD_ARGUMENT', 'no password given (interrupted)'))
        if (ch === '\u007f' || ch === '\b') typed = [...typed].slice(0, -1).join('')
        else if (ch >= ' ') typed += ch
      }
    }
    input.on('data', onData)
  })
}

export async function readPasswordFromStdin (stdin: NodeJS.ReadableStream): Promise<string> {
  const chunks: Buffer[] = []
  for await (const chunk of stdin) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '')
}

/** On a terminal: prompts twice on stderr and insists both match; otherwise reads stdin. */
export async function readNewPassword (stdin: NodeJS.ReadStream, stderr: NodeJS.WritableStream): Promise<string> {
  if (stdin.isTTY !== true) return await readPasswordFromStdin(stdin)
  const tty = stdin as unknown as ReadStream
  const first = await promptHidden(tty, stderr, 'Password: ')
  const again = await promptHidden(tty, stderr, 'Repeat password: ')
  if (first !== again) throw new CliError('CLI_BAD_ARGUMENT', 'the two passwords differ')
  return first
}
