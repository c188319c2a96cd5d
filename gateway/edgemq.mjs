#!/usr/bin/env node
// The `edgemq` command. The sources are TypeScript run through tsx's loader,
// so a fresh clone needs no build step after `npm install`.
import { register } from 'tsx/esm/api'

register()
const { main } = await import('./cli/main.ts')
process.exit(await main(process.argv))
