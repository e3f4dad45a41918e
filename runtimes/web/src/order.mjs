// The sample order of an epoch: numpy.random.default_rng([seed, epoch]).permutation(n), bit for bit,
// so that this runtime feeds the same batches as the Python trainer (docs/device-runtime.md).
// SeedSequence (numpy/random/bit_generator.pyx) -> PCG64 (XSL-RR 128/64) -> Generator.shuffle
// (Fisher-Yates from the end, each index drawn by masked rejection from 32-bit outputs).

const M32 = 0xffffffffn;
const M64 = (1n << 64n) - 1n;
const M128 = (1n << 128n) - 1n;
const PCG_MULT = 0x2360ed051fc65da44385df649fccf645n;
const INIT_A = 0x43b0d7e5, MULT_A = 0x931e8875, INIT_B = 0x8b51f9dd, MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd, MIX_MULT_R = 0x4973f715, POOL_SIZE = 4;

const mul32 = (a, b) => Math.imul(a, b) >>> 0;

function hashmix(value, hash) {
  value = (value ^ hash.c) >>> 0;
  hash.c = mul32(hash.c, MULT_A);
  value = mul32(value, hash.c);
  return (value ^ (value >>> 16)) >>> 0;
}

function mix(x, y) {
  const result = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
  return (result ^ (result >>> 16)) >>> 0;
}

/** numpy's coercion of a non-negative integer to uint32 words, least significant first. */
function words(value) {
  let big = BigInt(value);
  if (big < 0n) throw new Error('seeds must be non-negative');
  const out = [];
  do { out.push(Number(big & M32)); big >>= 32n; } while (big > 0n);
  return out;
}

/** SeedSequence(entropy).generate_state(count) as uint32 words. */
export function seedSequenceState(entropy, count) {
  const entropyWords = entropy.flatMap(words);
  const pool = new Array(POOL_SIZE).fill(0);
  const hash = {c: INIT_A};
  for (let i = 0; i < POOL_SIZE; i++) pool[i] = hashmix(i < entropyWords.length ? entropyWords[i] : 0, hash);
  for (let src = 0; src < POOL_SIZE; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src], hash));
  }
  for (let src = POOL_SIZE; src < entropyWords.length; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) pool[dst] = mix(pool[dst], hashmix(entropyWords[src], hash));
  }
  const state = [];
  let hashConst = INIT_B;
  for (let i = 0; i < count; i++) {
    let value = (pool[i % POOL_SIZE] ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_B);
    value = mul32(value, hashConst);
    state.push((value ^ (value >>> 16)) >>> 0);
  }
  return state;
}

/** numpy's PCG64 bit generator seeded from a SeedSequence. */
export class PCG64 {
  constructor(entropy) {
    const w = seedSequenceState(entropy, 8);
    const u64 = (i) => (BigInt(w[2 * i + 1]) << 32n) | BigInt(w[2 * i]);
    const seed = (u64(0) << 64n) | u64(1);
    const inc = (u64(2) << 64n) | u64(3);
    this.inc = ((inc << 1n) | 1n) & M128;
    this.state = 0n;
    this.step();
    this.state = (this.state + seed) & M128;
    this.step();
    this.buffered = null;
  }

  step() {
    this.state = (this.state * PCG_MULT + this.inc) & M128;
  }

  next64() {
    this.step();
    const high = this.state >> 64n;
    const xored = (high ^ (this.state & M64)) & M64;
    const rot = high >> 58n;
    return ((xored >> rot) | (xored << ((64n - rot) & 63n))) & M64;
  }

  next32() {
    if (this.buffered !== null) {
      const value = this.buffered;
      this.buffered = null;
      return value;
    }
    const next = this.next64();
    this.buffered = Number(next >> 32n);
    return Number(next & M32);
  }

  /** A uniform integer in [0, max] by masked rejection (numpy's random_interval). */
  interval(max) {
    if (max === 0) return 0;
    if (max > 0xffffffff) throw new Error('data sets above 2^32 samples are not supported');
    let mask = max;
    mask |= mask >>> 1; mask |= mask >>> 2; mask |= mask >>> 4; mask |= mask >>> 8; mask |= mask >>> 16;
    mask >>>= 0;
    let value;
    do { value = (this.next32() & mask) >>> 0; } while (value > max);
    return value;
  }
}

/** numpy.random.default_rng([seed, epoch]).permutation(n). */
export function epochOrder(seed, epoch, n) {
  const rng = new PCG64([seed, epoch]);
  const order = new Int32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  for (let i = n - 1; i >= 1; i--) {
    const j = rng.interval(i);
    const t = order[i]; order[i] = order[j]; order[j] = t;
  }
  return order;
}
