/**
 * The `edgemq` command line. Each subcommand is a thin adapter: it parses
 * flags with commander and calls into the gateway, the store or the HTTP API.
 */
import { readFileSync } from 'node:fs'
import { Command, CommanderError } from 'commander'

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }

export function buildProgram (): Command {
  const program = new Command('edgemq')
    .description('Edge gateway for IoT fleets: MQTT in front, a durable partitioned replayable log behind.')
    .version(pkg.version)
    .exitOverride()
  return program
}

/** Runs the command line and returns the process exit code. */
export async function main (argv: readonly string[]): Promise<number> {
  const program = buildProgram()
  try {
    await program.parseAsync([...argv])
    return 0
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode
    console.error(`edgemq: ${(err as Error).message}`)
    return 1
  }
}
