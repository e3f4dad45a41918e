// Node side of the runtime: onnxruntime-web's training build loaded by file path (its package's
// `exports` hide it from Node), an artifact folder on disk, checkpoints as folders written atomically.

import fs from 'node:fs';
import path from 'node:path';
import {fileURLToPath} from 'node:url';

const ORT_ENTRY = new URL('../node_modules/onnxruntime-web/dist/ort.training.wasm.mjs', import.meta.url);

/** onnxruntime-web's training module, set to `threads` WebAssembly threads. */
export async function loadOrt(threads = 1) {
  if (!fs.existsSync(fileURLToPath(ORT_ENTRY))) {
    throw new Error(`onnxruntime-web is not installed: run 'npm ci' in ${fileURLToPath(new URL('..', import.meta.url))}`);
  }
  if (threads > 1 && typeof globalThis.location === 'undefined') {
    // The bundle is built for browsers (isNode = false): with threads it would fetch its WebAssembly glue
    // into a blob: URL, which Node can neither fetch (file:) nor import. With a location whose origin is
    // that of file: URLs ('null'), the glue counts as same-origin and is imported from its file.
    globalThis.location = {origin: 'null', href: ORT_ENTRY.href};
  }
  const ort = await import(ORT_ENTRY.href);
  ort.env.wasm.numThreads = threads;
  ort.env.logLevel = 'error';
  return ort;
}

/** An artifact folder on disk, read by relative path (never outside the folder). */
export function diskFolder(dir) {
  const root = path.resolve(dir);
  return {
    label: dir,
    async read(relative) {
      const full = path.resolve(root, relative);
      if (!full.startsWith(root + path.sep)) throw new Error(`${relative} is outside ${dir}`);
      return new Uint8Array(await fs.promises.readFile(full));
    },
  };
}

const COMPLETE = /^step-\d{8,}$/;

/** Checkpoints under <folder>/checkpoints/step-N/, LATEST naming the newest; the layout edgeplug's Python side reads. */
export class FileStore {
  constructor(artifactDir, keep = 2) {
    this.dir = path.join(artifactDir, 'checkpoints');
    this.keep = keep;
  }

  complete(name) {
    const folder = path.join(this.dir, name);
    return COMPLETE.test(name) && fs.existsSync(path.join(folder, 'trainer.json'))
      && (fs.existsSync(path.join(folder, 'state')) || fs.existsSync(path.join(folder, 'training_state.safetensors')));
  }

  names() {
    return fs.existsSync(this.dir) ? fs.readdirSync(this.dir).filter((n) => this.complete(n)).sort() : [];
  }

  async latest() {
    const names = this.names();
    return names.at(-1) ?? null; // LATEST is only a hint: the newest complete folder wins, as in Python
  }

  async has(name, file) { return fs.existsSync(path.join(this.dir, name, file)); }
  async read(name, file) { return new Uint8Array(await fs.promises.readFile(path.join(this.dir, name, file))); }
  async readText(name, file) { return fs.promises.readFile(path.join(this.dir, name, file), 'utf8'); }

  async write(name, files) {
    await fs.promises.mkdir(this.dir, {recursive: true});
    const staging = path.join(this.dir, `.${name}.partial-${process.pid}-${Date.now()}`);
    await fs.promises.mkdir(staging);
    try {
      for (const [file, content] of Object.entries(files)) {
        const handle = await fs.promises.open(path.join(staging, file), 'w');
        await handle.writeFile(content);
        await handle.sync();
        await handle.close();
      }
      const target = path.join(this.dir, name);
      await fs.promises.rm(target, {recursive: true, force: true});
      await fs.promises.rename(staging, target);
    } finally {
      await fs.promises.rm(staging, {recursive: true, force: true});
    }
    const pointer = path.join(this.dir, `.LATEST.partial-${process.pid}`);
    await fs.promises.writeFile(pointer, `${name}\n`);
    await fs.promises.rename(pointer, path.join(this.dir, 'LATEST'));
    for (const old of this.names().slice(0, -this.keep)) {
      if (old !== name) await fs.promises.rm(path.join(this.dir, old), {recursive: true, force: true});
    }
  }

  async clear() { await fs.promises.rm(this.dir, {recursive: true, force: true}); }
}

/** Peak resident memory of this process (bytes). */
export function peakRssBytes() {
  return process.resourceUsage().maxRSS * 1024;
}
