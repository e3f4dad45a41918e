#!/usr/bin/env node
// edgeplug-node-train: train an artifact folder on onnxruntime-web (WebAssembly) in Node.
// The same options, output lines and metrics file as `edgeplug train`; `edgeplug train --runtime node`
// runs this after converting .npz data to safetensors.
import fs from 'node:fs';
import {parseArgs} from 'node:util';
import {EdgeplugError, Trainer} from '../src/trainer.mjs';
import {FileStore, diskFolder, loadOrt, peakRssBytes} from '../src/node.mjs';

const USAGE = `usage: edgeplug-node-train ARTIFACTS --data TRAIN.safetensors [--eval EVAL.safetensors] [--epochs N]
  [--batch-size N] [--lr LR] [--seed N] [--checkpoint-every STEPS] [--keep-checkpoints N] [--restart]
  [--no-checkpoints] [--metrics FILE] [--threads N]`;

async function main(argv) {
  let parsed;
  try {
    parsed = parseArgs({args: argv, allowPositionals: true, options: {
      data: {type: 'string'}, eval: {type: 'string'}, epochs: {type: 'string', default: '1'},
      'batch-size': {type: 'string', default: '32'}, lr: {type: 'string'}, seed: {type: 'string', default: '0'},
      'checkpoint-every': {type: 'string'}, 'keep-checkpoints': {type: 'string', default: '2'},
      restart: {type: 'boolean', default: false}, 'no-checkpoints': {type: 'boolean', default: false},
      metrics: {type: 'string'}, threads: {type: 'string', default: '1'}, help: {type: 'boolean', default: false},
    }});
  } catch (error) {
    throw new EdgeplugError(`${error.message}\n${USAGE}`);
  }
  const {values: o, positionals} = parsed;
  if (o.help) { console.log(USAGE); return 0; }
  if (positionals.length !== 1 || !o.data) throw new EdgeplugError(`an artifact folder and --data are required\n${USAGE}`);
  const integer = (name, value, min) => {
    const number = Number(value);
    if (!Number.isInteger(number) || number < min) throw new EdgeplugError(`--${name} must be an integer >= ${min}, got ${value}`);
    return number;
  };
  const artifacts = positionals[0];
  const ort = await loadOrt(integer('threads', o.threads, 1));
  const trainer = new Trainer(ort, diskFolder(artifacts), {
    seed: integer('seed', o.seed, 0), lr: o.lr === undefined ? null : Number(o.lr),
    checkpointEvery: o['checkpoint-every'] === undefined ? null : integer('checkpoint-every', o['checkpoint-every'], 1),
    checkpoints: o['no-checkpoints'] ? null : new FileStore(artifacts, integer('keep-checkpoints', o['keep-checkpoints'], 1)),
    echo: (line) => console.log(line),
  });
  await trainer.contract(); // a folder this runtime cannot train is refused before the data is read
  const read = (file) => {
    if (!fs.existsSync(file)) throw new EdgeplugError(`data file not found: ${file}`);
    return fs.readFileSync(file);
  };
  const train = await trainer.dataset(read(o.data), o.data);
  const evalSet = o.eval ? await trainer.dataset(read(o.eval), o.eval) : null;
  const epochs = integer('epochs', o.epochs, 1);
  const result = await trainer.fit(train, evalSet, {epochs, batchSize: integer('batch-size', o['batch-size'], 1), resume: !o.restart});
  result.peak_rss_bytes = peakRssBytes();
  if (result.steps_run === 0) console.log(`nothing to do: the latest checkpoint already covers ${epochs} epochs (use --epochs to train longer or --restart)`);
  const step = result.median_step_seconds === null ? '-' : `${(result.median_step_seconds * 1000).toFixed(1)} ms`;
  console.log(`done: ${result.steps_run} steps, median step ${step}, peak memory ${Math.round(result.peak_rss_bytes / 2 ** 20)} MiB`);
  if (o.metrics) {
    const staging = `${o.metrics}.partial-${process.pid}`;
    fs.writeFileSync(staging, JSON.stringify(result, null, 2) + '\n');
    fs.renameSync(staging, o.metrics);
  }
  await trainer.release();
  return 0;
}

main(process.argv.slice(2)).then((code) => process.exit(code), (error) => {
  const oneLine = (text) => String(text).replace(/\s+/g, ' ').trim();
  if (error instanceof EdgeplugError) {
    console.error(`edgeplug: error: ${oneLine(error.message.split('\nusage')[0])}`);
    process.exit(2);
  }
  if (process.env.EDGEPLUG_DEBUG) console.error(error);
  console.error(`edgeplug: internal error: ${oneLine(error.message ?? error).slice(0, 600)} (set EDGEPLUG_DEBUG=1 for the stack and report it)`);
  process.exit(1);
});
