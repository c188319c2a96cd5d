/**
 * `npx edgemq start` runs three processes: npm, the `sh -c` npm runs the bin
 * with, and the gateway (node). `$!` after `npx edgemq start &` is npm's pid,
 * and neither of npm's ways to stop passes the signal on to the gateway:
 * SIGTERM is forwarded to the shell, which dies of it and leaves the gateway
 * orphaned; SIGKILL ends npm alone. The gateway kept the ports and the
 * database, and the next start failed.
 *
 * So a gateway started by npm watches its launcher, and the two cases are told
 * apart by what is left:
 * - the shell between npm and the gateway is gone (our parent changed): npm
 *   was asked to stop (SIGTERM, SIGINT, SIGHUP); the gateway shuts down cleanly;
 * - npm is gone but the shell is still our parent: npm was SIGKILLed (npm
 *   handles every other signal); the gateway SIGKILLs itself, so
 *   `kill -9 $!` means what it says.
 *
 * Linux only: ancestors are read from /proc. Elsewhere nothing is watched.
 */
import { readFileSync } from 'node:fs'

/** Shells npm may run a bin with (`script-shell`); the launcher is the first ancestor that is not one. */
const SHELLS = new Set(['sh', 'dash', 'bash', 'ash', 'zsh', 'busybox'])

export interface ProcInfo { readonly comm: string, readonly state: string, readonly ppid: number }

/** `/proc/<pid>/stat`, or undefined when the process is gone or /proc is not there. */
export function readProc (pid: number): ProcInfo | undefined {
  let stat: string
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  } catch {
    return undefined
  }
  // "pid (comm) state ppid …"; comm may hold spaces and parentheses, so split at the last ")".
  const open = stat.indexOf('(')
  const close = stat.lastIndexOf(')')
  const [state, ppid] = stat.slice(close + 2).split(' ')
  return { comm: stat.slice(open + 1, close), state: state ?? '?', ppid: Number(ppid) }
}

export interface Launcher {
  /** npm's pid. */
  readonly pid: number
  /** Our parent when the watch started: the shell npm ran us with (or npm itself). */
  readonly parentPid: number
}

/**
 * The npm process that started this one, when `startedByNpm` (npm sets
 * npm_execpath for what it runs): our parent, or the parent of the shell
 * that is our parent.
 */
export function findNpmLauncher (startedByNpm: boolean, parentPid: number, read: (pid: number) => ProcInfo | undefined = readProc): Launcher | undefined {
  if (!startedByNpm) return undefined
  const parent = read(parentPid)
  if (parent === undefined) return undefined
  if (isNpm(parent)) return { pid: parentPid, parentPid }
  if (!SHELLS.has(parent.comm) || parent.ppid <= 1) return undefined
  const grandparent = read(parent.ppid)
  return grandparent !== undefined && isNpm(grandparent) ? { pid: parent.ppid, parentPid } : undefined
}

/**
 * npm names its process after the command ("npm exec edgemq", "npm run …"). npm_execpath alone is not enough:
 * anything npm runs passes it on, and a gateway that a program started under `npm test` spawned must not die with
 * that program.
 */
function isNpm (p: ProcInfo): boolean {
  return /^npm( |$)/.test(p.comm)
}

export type LauncherGone = 'stopped' | 'killed'

/**
 * What became of the launcher: undefined while it runs. A zombie is gone (nobody may reap it soon: PID 1 of a
 * container often does not). When npm is our parent itself, it forwards a stopping signal to us, so its
 * disappearance can only be a SIGKILL.
 */
export function launcherState (launcher: Launcher, currentParentPid: number, read: (pid: number) => ProcInfo | undefined = readProc): LauncherGone | undefined {
  const direct = launcher.pid === launcher.parentPid
  if (currentParentPid !== launcher.parentPid) return direct ? 'killed' : 'stopped'
  const npm = read(launcher.pid)
  if (npm !== undefined && npm.state !== 'Z') return undefined
  return 'killed'
}

/** Polls the launcher until it is gone, then calls `onGone` once. Returns a function that stops the watch. */
export function watchLauncher (launcher: Launcher, onGone: (how: LauncherGone) => void, intervalMs = 200): () => void {
  const timer = setInterval(() => {
    const how = launcherState(launcher, process.ppid)
    if (how === undefined) return
    clearInterval(timer)
    onGone(how)
  }, intervalMs)
  timer.unref()
  return () => clearInterval(timer)
}
