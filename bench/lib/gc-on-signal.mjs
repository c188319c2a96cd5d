// Preloaded into a broker under measurement (`node --expose-gc --import <this file>`): SIGUSR2 runs two full
// garbage collections, so the idle-connections bench reads RSS without the garbage of the CONNECT burst that V8
// would otherwise collect at a time of its own choosing (seconds to minutes later).
process.on('SIGUSR2', () => {
  globalThis.gc?.()
  globalThis.gc?.()
})
