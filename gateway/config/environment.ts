/**
 * The environment variables edgemq reads, read in one place, once.
 *
 * | variable           | used by                                                        |
 * | ------------------ | -------------------------------------------------------------- |
 * | `EDGEMQ_URL`       | client commands: the gateway's HTTP API (default http://127.0.0.1:9464) |
 * | `EDGEMQ_TOKEN`     | client commands: an API token (excludes `EDGEMQ_USER`)          |
 * | `EDGEMQ_USER`      | client commands: a user for Basic auth                          |
 * | `EDGEMQ_PASSWORD`  | client commands: that user's password                           |
 * | `npm_execpath`     | `edgemq start`: set when npm (npx) launched it (cli/npm-launcher.ts) |
 *
 * An empty value counts as unset, as a shell's `EDGEMQ_TOKEN=` means. The
 * composition roots (gateway/cli/main.ts and cli/start.ts for the commands, gateway.ts for the
 * gateway, which reads none) call {@link readEnvironment} and pass what they
 * need down; nothing else reads `process.env`.
 */

export interface Environment {
  readonly url: string | undefined
  readonly token: string | undefined
  readonly user: string | undefined
  readonly password: string | undefined
  /** Whether npm (or npx) started this process. */
  readonly launchedByNpm: boolean
}

export function readEnvironment (env: Readonly<Record<string, string | undefined>> = process.env): Environment {
  return Object.freeze({
    url: nonEmpty(env.EDGEMQ_URL),
    token: nonEmpty(env.EDGEMQ_TOKEN),
    user: nonEmpty(env.EDGEMQ_USER),
    password: nonEmpty(env.EDGEMQ_PASSWORD),
    launchedByNpm: env.npm_execpath !== undefined,
  })
}

function nonEmpty (value: string | undefined): string | undefined {
  return value === undefined || value === '' ? undefined : value
}
