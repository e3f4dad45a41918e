// End to end in Node: the digits example's folder trains, evaluates, checkpoints, resumes bit for bit,
// and `edgeplug export` takes the parameters it saved.
import assert from 'node:assert/strict';
import {execFileSync, spawn} from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import {test} from 'node:test';
import {FileStore, diskFolder, loadOrt} from '../src/node.mjs';
import {MemoryStore, Trainer} from '../src/trainer.mjs';
import {digits, edgeplug, fixturesUnavailable} from './fixtures.mjs';

const skip = fixturesUnavailable() ?? false;
const CLI = path.join(path.dirname(new URL(import.meta.url).pathname), '..', 'bin', 'train.mjs');

async function trainer(artifacts, options = {}) {
  const ort = await loadOrt(1);
  return new Trainer(ort, diskFolder(artifacts), options);
}

test('trains the digits example and resumes to the same parameters', {skip}, async () => {
  const {artifacts, support, query} = digits();
  const read = (f) => fs.readFileSync(f);
  const whole = await trainer(artifacts, {checkpoints: new MemoryStore()});
  const train = await whole.dataset(read(support), 'support');
  const evalSet = await whole.dataset(read(query), 'query');
  const full = await whole.fit(train, evalSet, {epochs: 3, batchSize: 10});
  assert.equal(full.steps_run, 15);
  assert.ok(full.epochs.at(-1).train.loss < full.epochs[0].train.loss, 'the training loss fell');
  const fullParameters = await whole.trainedParameters();

  const store = new FileStore(artifacts);
  const first = await trainer(artifacts, {checkpoints: store, checkpointEvery: 3});
  const part = await first.fit(train, null, {epochs: 1, batchSize: 10});
  assert.deepEqual(part.step_losses, full.step_losses.slice(0, 5));
  const second = await trainer(artifacts, {checkpoints: store});
  const rest = await second.fit(train, evalSet, {epochs: 3, batchSize: 10});
  assert.equal(rest.resumed_from_step, 5);
  assert.deepEqual(rest.step_losses, full.step_losses.slice(5), 'a resumed run feeds the same batches and reaches the same losses');
  assert.deepEqual(await second.trainedParameters(), fullParameters, 'bit-identical parameters after resume');
  assert.equal(rest.epochs.at(-1).eval.accuracy, full.epochs.at(-1).eval.accuracy);

  // edgeplug export reads the node checkpoint; the exported model scores what the runtime measured
  const exported = path.join(artifacts, '..', 'trained.onnx');
  edgeplug('export', artifacts, '-o', exported);
  const scored = execFileSync(process.env.EDGEPLUG_PYTHON ?? 'python', ['-c', `
import numpy as np, onnxruntime as ort
from edgeplug import tensorfile
t, _ = tensorfile.load(${JSON.stringify(query)})
s = ort.InferenceSession(${JSON.stringify(exported)})
print((s.run(None, {'image': t['image']})[0].argmax(1) == t['labels']).mean())`], {encoding: 'utf8'});
  assert.equal(Number(scored), rest.epochs.at(-1).eval.accuracy);
  await whole.release(); await first.release(); await second.release();
});

test('the command line: same lines and metrics file as edgeplug train, one-line errors', {skip}, () => {
  const {artifacts, support, query, dir} = digits();
  const metrics = path.join(dir, 'metrics.json');
  const out = execFileSync('node', [CLI, artifacts, '--data', support, '--eval', query, '--epochs', '2', '--batch-size', '25', '--metrics', metrics], {encoding: 'utf8'});
  assert.match(out, /^before training: eval_loss \d\.\d{4} {2}eval_acc \d\.\d{3}$/m);
  assert.match(out, /^epoch 2\/2 {2}train_loss .* eval_acc \d\.\d{3} {2}\(\d+\.\d s\)$/m);
  assert.match(out, /^done: 4 steps, median step [\d.]+ ms, peak memory \d+ MiB$/m);
  const result = JSON.parse(fs.readFileSync(metrics, 'utf8'));
  assert.deepEqual(Object.keys(result).sort(), ['epochs', 'initial_eval', 'median_step_seconds', 'peak_rss_bytes', 'resumed_from_step', 'step_losses', 'step_seconds', 'steps_run']);
  assert.equal(result.step_losses.length, 4);
  assert.ok(fs.existsSync(path.join(artifacts, 'checkpoints', 'step-00000004', 'training_state.safetensors')));

  const again = execFileSync('node', [CLI, artifacts, '--data', support, '--epochs', '2', '--batch-size', '25'], {encoding: 'utf8'});
  assert.match(again, /nothing to do: the latest checkpoint already covers 2 epochs/);
  for (const [args, message] of [
    [['--data', support, '--batch-size', '0'], /^edgeplug: error: --batch-size must be an integer >= 1, got 0\n$/],
    [['--data', path.join(dir, 'missing.safetensors')], /^edgeplug: error: data file not found: .*missing.safetensors\n$/],
    [['--data', query, '--batch-size', '7'], /^edgeplug: error: the checkpoint was made with 50 training samples, this data has 849; use the same data or --restart\n$/],
  ]) {
    assert.throws(() => execFileSync('node', [CLI, artifacts, ...args], {encoding: 'utf8', stdio: 'pipe'}), (error) => {
      assert.equal(error.status, 2);
      assert.match(error.stderr, message);
      return true;
    });
  }
});

test('a folder that needs Python is refused with one line', {skip}, () => {
  const {artifacts, support} = digits();
  const report = JSON.parse(fs.readFileSync(path.join(artifacts, 'report.json'), 'utf8'));
  report.device_runtime.needs_python = true;
  report.device_runtime.needs_python_because = ["pass 'class-offset' runs Python runtime hooks in the training loop (plugin 'x')"];
  fs.writeFileSync(path.join(artifacts, 'report.json'), JSON.stringify(report));
  assert.throws(() => execFileSync('node', [CLI, artifacts, '--data', support], {encoding: 'utf8', stdio: 'pipe'}), (error) => {
    assert.equal(error.status, 2);
    assert.equal(error.stderr.trim().split('\n').length, 1);
    assert.match(error.stderr, /needs Python at run time \(pass 'class-offset' runs Python runtime hooks/);
    return true;
  });
});

test('a run killed with SIGKILL resumes from its last checkpoint to the same parameters', {skip}, async () => {
  const straight = digits();
  const killed = digits();
  const args = (artifacts) => [CLI, artifacts, '--data', straight.support, '--epochs', '12', '--batch-size', '5', '--checkpoint-every', '3'];
  execFileSync('node', args(straight.artifacts), {encoding: 'utf8'});
  const child = spawn('node', args(killed.artifacts), {stdio: 'ignore'});
  const checkpoints = path.join(killed.artifacts, 'checkpoints');
  const started = Date.now();
  // kill it once a mid-run checkpoint exists (120 steps in all; the first checkpoint is at step 3)
  while (!(fs.existsSync(checkpoints) && fs.readdirSync(checkpoints).some((n) => /^step-\d+$/.test(n)))) {
    if (Date.now() - started > 60_000) throw new Error('no checkpoint appeared');
    await new Promise((r) => setTimeout(r, 20));
  }
  child.kill('SIGKILL');
  await new Promise((r) => child.on('exit', r));
  const resumed = execFileSync('node', args(killed.artifacts), {encoding: 'utf8'});
  assert.match(resumed, /^resuming from step-\d{8} /m);
  const state = (artifacts) => fs.readFileSync(path.join(artifacts, 'checkpoints', 'step-00000120', 'training_state.safetensors'));
  assert.deepEqual(state(killed.artifacts), state(straight.artifacts), 'bit-identical parameters and optimizer state');
});

test('two WebAssembly threads give the losses of one', {skip}, () => {
  const {artifacts, support, dir} = digits();
  const losses = (threads) => {
    const metrics = path.join(dir, `threads-${threads}.json`);
    execFileSync('node', [CLI, artifacts, '--data', support, '--epochs', '1', '--batch-size', '10', '--no-checkpoints',
      '--threads', String(threads), '--metrics', metrics], {encoding: 'utf8'});
    return JSON.parse(fs.readFileSync(metrics, 'utf8')).step_losses;
  };
  const one = losses(1), two = losses(2);
  assert.equal(two.length, 5);
  two.forEach((loss, i) => assert.ok(Math.abs(loss - one[i]) <= 1e-5 * Math.abs(one[i]), `step ${i}: ${loss} vs ${one[i]}`));
});
