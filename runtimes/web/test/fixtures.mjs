// Test fixtures built with the Python side of edgeplug (the venv's python, or $EDGEPLUG_PYTHON): the digits
// example's artifact folder and its support/query data as safetensors. Built once per process.
import {execFileSync} from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {fileURLToPath} from 'node:url';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const PYTHON = process.env.EDGEPLUG_PYTHON ?? 'python';
let built = null;

/** Why the fixtures cannot be built here (no python with edgeplug), or null. */
export function fixturesUnavailable() {
  try {
    execFileSync(PYTHON, ['-c', 'import edgeplug, sklearn'], {stdio: 'ignore'});
    return null;
  } catch {
    return `no python with edgeplug and scikit-learn (${PYTHON}); activate the venv or set EDGEPLUG_PYTHON`;
  }
}

export function edgeplug(...args) {
  return execFileSync(PYTHON, ['-m', 'edgeplug.cli', ...args], {encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe']});
}

/** {dir, artifacts, support, query, supportNpz, queryNpz}: a fresh copy of the artifact folder per call. */
export function digits() {
  if (!built) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgeplug-web-'));
    const example = path.join(REPO, 'examples', 'digits_fewshot');
    execFileSync(PYTHON, [path.join(example, 'prepare_data.py'), dir], {stdio: 'ignore'});
    edgeplug('rewrite', path.join(example, 'pretrained_cnn.onnx'), '--recipe', path.join(example, 'recipe.yaml'),
      '--calibration-data', path.join(dir, 'support.npz'), '-o', path.join(dir, 'built'));
    for (const name of ['support', 'query']) {
      edgeplug('pack-data', path.join(dir, 'built'), path.join(dir, `${name}.npz`), '-o', path.join(dir, `${name}.safetensors`));
    }
    built = dir;
  }
  const copy = fs.mkdtempSync(path.join(built, 'copy-'));
  fs.cpSync(path.join(built, 'built'), path.join(copy, 'artifacts'), {recursive: true});
  return {
    dir: copy, artifacts: path.join(copy, 'artifacts'),
    support: path.join(built, 'support.safetensors'), query: path.join(built, 'query.safetensors'),
    supportNpz: path.join(built, 'support.npz'), queryNpz: path.join(built, 'query.npz'),
  };
}
