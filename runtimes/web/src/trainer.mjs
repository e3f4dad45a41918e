// Trains an edgeplug artifact folder with onnxruntime-web's training build (WebAssembly), in Node or a
// browser, following the device contract in report.json `device_runtime` (docs/device-runtime.md).
//
// onnxruntime-web 1.19.2 has no learning-rate setter and cannot save checkpoints, so this runtime runs
// each artifact set's portable files: `training_model_gradients.onnx` in a TrainingSession (its outputs
// include every trainable parameter's gradient) and `optimizer_step.onnx` in an InferenceSession (the
// same optimizer op with tensor inputs). It keeps the parameters and optimizer state itself, loads the
// updated parameters back after each step, and saves everything in its own checkpoints.

import {patchCheckpoint, readCheckpointParameters} from './checkpoint.mjs';
import {epochOrder} from './order.mjs';
import {parseSafetensors, serializeSafetensors} from './safetensors.mjs';
import {makeSchedule} from './schedule.mjs';

export const CONTRACT_VERSION = 1;
const DEVICE_STATE = 'training_state.safetensors';
const CARRIED_STATE = 'carried_state.safetensors';
const PROGRESS = 'trainer.json';

/** A user-facing error: one line that names the problem and what to do. */
export class EdgeplugError extends Error {}

const join = (dir, file) => (dir === '.' || dir === '' ? file : `${dir}/${file}`);
const product = (dims) => dims.reduce((a, b) => a * Number(b), 1);

/** Read report.json and check that this runtime can train the folder; returns its device contract. */
export async function readContract(folder) {
  let report;
  try {
    report = JSON.parse(new TextDecoder().decode(await folder.read('report.json')));
  } catch {
    throw new EdgeplugError(`${folder.label} is not an edgeplug artifact folder (no readable report.json); run 'edgeplug rewrite' first`);
  }
  const device = report.device_runtime;
  if (!device) {
    throw new EdgeplugError(`${folder.label} was written by an edgeplug without a device contract (report.json has no device_runtime); rewrite it with this edgeplug`);
  }
  if (device.contract_version > CONTRACT_VERSION) {
    throw new EdgeplugError(`${folder.label} uses device contract ${device.contract_version}; this runtime knows ${CONTRACT_VERSION}: update the runtime`);
  }
  if (device.needs_python) {
    throw new EdgeplugError(`${folder.label} needs Python at run time (${device.needs_python_because.join('; ')}); train it with the Python runtime ('edgeplug train')`);
  }
  for (const set of device.artifact_sets) {
    if (!set.portable) {
      throw new EdgeplugError(`${folder.label}: artifact set '${set.dir}' cannot train on this runtime: ${set.portable_missing_because}`);
    }
  }
  return device;
}

/** Check a data set ({name: {type, dims, data}} from a safetensors file) against the contract. */
export function makeDataset(tensors, device, label = 'data') {
  const inputs = {};
  const arrays = {...tensors};
  for (const spec of device.data_inputs) {
    const key = arrays[spec.name] ? spec.name : (device.data_inputs.length === 1 && arrays.x ? 'x' : null);
    if (!key) {
      throw new EdgeplugError(`${label}: no tensor for model input '${spec.name}' (tensors: ${Object.keys(arrays).join(', ') || 'none'}); write the data with 'edgeplug pack-data'`);
    }
    inputs[spec.name] = conform(arrays[key], spec, `${label}: tensor '${key}' (model input '${spec.name}')`);
  }
  const labelKey = ['labels', 'y'].find((k) => arrays[k]);
  if (!labelKey) throw new EdgeplugError(`${label}: no labels tensor (looked for labels or y)`);
  const labels = conformLabels(arrays[labelKey], device, `${label}: labels '${labelKey}'`);
  const length = Number(labels.dims[0]);
  for (const [name, tensor] of Object.entries(inputs)) {
    if (Number(tensor.dims[0]) !== length) throw new EdgeplugError(`${label}: '${name}' has ${tensor.dims[0]} samples, the labels ${length}`);
  }
  if (length === 0) throw new EdgeplugError(`${label}: holds no samples`);
  return {inputs, labels, length, label};
}

function conform(tensor, spec, label) {
  if (tensor.dims.length !== spec.shape.length) throw new EdgeplugError(`${label} has shape (${tensor.dims}) but the model expects (${spec.shape})`);
  spec.shape.forEach((want, axis) => {
    if (axis > 0 && Number.isInteger(want) && want > 0 && Number(tensor.dims[axis]) !== want) {
      throw new EdgeplugError(`${label} has shape (${tensor.dims}) but the model expects (${spec.shape})`);
    }
  });
  if (tensor.type === spec.dtype) return tensor;
  if (spec.dtype === 'float32' && tensor.type === 'float64') return {...tensor, type: 'float32', data: Float32Array.from(tensor.data)};
  throw new EdgeplugError(`${label} has dtype ${tensor.type} but the model expects ${spec.dtype}`);
}

function conformLabels(tensor, device, label) {
  if (device.loss === 'cross-entropy') {
    if (tensor.dims.length !== 1) throw new EdgeplugError(`${label} has shape (${tensor.dims}); cross-entropy needs one class index per sample`);
    if (tensor.type === 'int64') return tensor;
    if (['int32', 'uint8', 'int8', 'int16', 'uint16', 'uint32'].includes(tensor.type)) {
      return {...tensor, type: 'int64', data: BigInt64Array.from(tensor.data, (v) => BigInt(v))};
    }
    throw new EdgeplugError(`${label} has dtype ${tensor.type}; cross-entropy needs integer class indices`);
  }
  if (tensor.type === 'float32') return tensor;
  if (tensor.type === 'float64') return {...tensor, type: 'float32', data: Float32Array.from(tensor.data)};
  throw new EdgeplugError(`${label} has dtype ${tensor.type}; ${device.loss} needs float targets`);
}

/** Rows `indices` of every tensor of a data set, as {name: {type, dims, data}} plus labels. */
function takeRows(dataset, indices) {
  const rows = {};
  for (const [name, tensor] of [...Object.entries(dataset.inputs), ['labels', dataset.labels]]) {
    const width = product(tensor.dims.slice(1));
    const data = new tensor.data.constructor(indices.length * width);
    indices.forEach((index, row) => data.set(tensor.data.subarray(index * width, (index + 1) * width), row * width));
    rows[name] = {type: tensor.type, dims: [indices.length, ...tensor.dims.slice(1)], data};
  }
  return rows;
}

const finite = (data) => data.every((v) => Number.isFinite(v));

/** One artifact set opened in onnxruntime-web: training session, optimizer step, parameters and state held here. */
class ArtifactSet {
  constructor(ort, spec, number) {
    this.ort = ort;
    this.spec = spec;
    this.number = number;
    this.trainable = spec.parameters.filter((p) => p.trainable);
    this.size = this.trainable.reduce((n, p) => n + product(p.shape), 0);
  }

  async open(folder, saved) {
    const {ort, spec} = this;
    const read = (file) => folder.read(join(spec.dir, file));
    const label = join(spec.dir, spec.checkpoint);
    let checkpoint = await read(spec.checkpoint);
    if (saved) checkpoint = patchCheckpoint(checkpoint, this.savedParameters(saved.state), label); // resume: saved values in place
    // the values come from the file: onnxruntime-web's getContiguousParameters corrupts its heap
    const initial = readCheckpointParameters(checkpoint, label);
    this.session = await ort.TrainingSession.create({
      checkpointState: checkpoint,
      trainModel: await read(spec.portable.training_model),
      evalModel: await read(spec.portable.state_eval_model ?? spec.eval_model),
    });
    this.updated = {};
    this.stepper = await ort.InferenceSession.create(await read(spec.portable.optimizer_step_model));
    this.state = {};
    for (const name of spec.portable.state) {
      this.state[name] = this.trainable.map((p) => {
        if (name !== 'params') return new Float32Array(product(p.shape));
        const value = initial[p.name];
        if (!value || value.data.length !== product(p.shape)) throw new EdgeplugError(`${join(spec.dir, spec.checkpoint)} lacks parameter '${p.name}'; rewrite the folder`);
        return value.data;
      });
    }
    this.steps = 0; // optimizer steps taken (the optimizer op's step input is this + 1)
    this.carried = {};
    if (spec.carried_state.length) {
      const {tensors} = parseSafetensors(await read(spec.carried_state_file), `${join(spec.dir, spec.carried_state_file)}`);
      for (const s of spec.carried_state) this.carried[s.input] = tensors[s.input];
    }
    if (saved) await this.restore(saved);
  }

  /** {name: values} of the parameters and updated statistics a checkpoint saved for this set. */
  savedParameters(state) {
    const values = {};
    for (const kind of ['param', 'updated']) {
      const prefix = `${this.number}:${kind}:`;
      for (const [key, tensor] of Object.entries(state)) if (key.startsWith(prefix)) values[key.slice(prefix.length)] = tensor.data;
    }
    return values;
  }

  /** Restore the optimizer state and carried state saved by `save` (the parameters are in the patched checkpoint). */
  async restore({state, carried}) {
    const prefix = `${this.number}:`;
    for (const name of this.spec.portable.state) {
      this.state[name] = this.trainable.map((p) => {
        const key = `${prefix}${name === 'params' ? 'param' : name}:${p.name}`;
        const tensor = state[key];
        if (!tensor || tensor.data.length !== product(p.shape)) throw new EdgeplugError(`the checkpoint lacks ${key}; pass --restart`);
        return Float32Array.from(tensor.data);
      });
    }
    this.steps = Number(state[`${prefix}step`].data[0]);
    for (const s of this.spec.carried_state) {
      const tensor = carried?.[`${prefix}${s.input}`];
      if (!tensor) throw new EdgeplugError(`the checkpoint lacks the carried state ${s.input}; pass --restart`);
      this.carried[s.input] = tensor;
    }
  }

  save(tensors, carried) {
    const prefix = `${this.number}:`;
    for (const name of this.spec.portable.state) {
      this.trainable.forEach((p, k) => {
        tensors[`${prefix}${name === 'params' ? 'param' : name}:${p.name}`] = {type: 'float32', dims: p.shape, data: this.state[name][k]};
      });
    }
    tensors[`${prefix}step`] = {type: 'int64', dims: [1], data: BigInt64Array.from([BigInt(this.steps)])};
    for (const [name, tensor] of Object.entries(this.updated)) tensors[`${prefix}updated:${name}`] = tensor;
    for (const [name, tensor] of Object.entries(this.carried)) carried[`${prefix}${name}`] = tensor;
  }

  async loadParameters() {
    const buffer = new Float32Array(this.size);
    let offset = 0;
    for (const data of this.state.params) { buffer.set(data, offset); offset += data.length; }
    await this.session.loadParametersBuffer(new Uint8Array(buffer.buffer), true);
  }

  /** The carried-state feeds for a batch of `batch` samples, and the inputs fed the state itself. */
  carriedFeeds(batch, evaluating) {
    const feeds = {};
    const matched = new Set();
    for (const s of this.spec.carried_state) {
      if (evaluating && !s.eval) continue;
      const value = this.carried[s.input];
      if (s.batch_axis === null || Number(value.dims[s.batch_axis]) === batch) {
        feeds[s.input] = new this.ort.Tensor(value.type, value.data, value.dims);
        matched.add(s.input);
        continue;
      }
      const dims = value.dims.slice();
      dims[s.batch_axis] = batch;
      const data = new value.data.constructor(product(dims));
      if (s.other_batch === 'identity') for (let i = 0; i < Math.min(dims[0], dims[1]); i++) data[i * dims[1] + i] = 1;
      feeds[s.input] = new this.ort.Tensor(value.type, data, dims);
    }
    return {feeds, matched};
  }

  tensor(t) {
    return new this.ort.Tensor(t.type, t.data, t.dims);
  }

  /** One training step of this set: forward, backward, optimizer step with `lr`; returns its outputs. */
  async train(values, batch, lr) {
    const {ort, spec, session} = this;
    const {feeds: carriedFeeds, matched} = this.carriedFeeds(batch, false);
    const outputs = await session.runTrainStep(this.ordered(session.trainingInputNames, carriedFeeds, values, 'training'));
    const portable = spec.portable;
    const step = {};
    for (const scalar of portable.scalar_inputs) {
      if (scalar.name === 'learning_rate') step[scalar.name] = new ort.Tensor('float32', Float32Array.from([lr]), scalar.shape);
      else if (scalar.name === 'step') step[scalar.name] = new ort.Tensor('int64', BigInt64Array.from([BigInt(this.steps + 1)]), scalar.shape);
      else throw new EdgeplugError(`the optimizer step reads '${scalar.name}', which this runtime does not know`);
    }
    this.trainable.forEach((p, k) => {
      step[`gradients.${k}`] = outputs[portable.gradient_outputs[k]];
      for (const name of portable.state) step[`${name}.${k}`] = new ort.Tensor('float32', this.state[name][k], p.shape);
    });
    const updated = await this.stepper.run(step);
    if (updated[portable.flag_output].data[0]) this.steps += 1;
    for (const name of portable.state) this.state[name] = this.trainable.map((p, k) => updated[`${name}.${k}.new`].data);
    await this.loadParameters();
    await session.lazyResetGrad();
    for (const s of spec.carried_state) {
      const out = outputs[s.output];
      if (matched.has(s.input) && out && out.dims.join() === s.shape.join() && finite(out.data)) {
        this.carried[s.input] = {type: out.type, dims: out.dims.slice(), data: out.data.slice()};
      }
    }
    return outputs;
  }

  async evaluate(values, batch) {
    const {feeds} = this.carriedFeeds(batch, true);
    const returned = await this.session.runEvalStep(this.ordered(this.session.evalInputNames, feeds, values, 'eval'));
    // onnxruntime-web 1.19.2 keys eval results by the *training* model's output names, in order: undo that
    const outputs = {};
    this.session.evalOutputNames.forEach((name, i) => { outputs[name] = returned[this.session.trainingOutputNames[i]]; });
    return outputs;
  }

  /** Feeds in the model's input order: onnxruntime-web 1.19.2 passes training feeds by position, in
   * the order of the object's keys, whatever their names. */
  ordered(names, carried, values, model) {
    const feeds = {};
    for (const name of names) {
      if (carried[name]) feeds[name] = carried[name];
      else if (values[name]) feeds[name] = this.tensor(values[name]);
      else throw new EdgeplugError(`the ${model} model needs input '${name}', which neither the data nor an earlier stage provides`);
    }
    return feeds;
  }

  async release() {
    await this.session?.release();
    await this.stepper?.release();
  }
}

const plain = (t) => ({type: t.type, dims: t.dims.slice(), data: t.data});

/**
 * The training loop: deterministic sample order (numpy's default_rng([seed, epoch]).permutation), the
 * recipe's learning-rate schedule by global step, checkpoints at epoch ends and every checkpointEvery
 * steps, resume from the newest checkpoint. Mirrors edgeplug.Trainer; writes the same metrics.
 */
export class Trainer {
  /**
   * @param ort onnxruntime-web's training module
   * @param folder {label, read(relativePath) -> Promise<Uint8Array>}
   * @param options {seed, lr, checkpointEvery, checkpoints (a store, or null for none), echo, now}
   */
  constructor(ort, folder, options = {}) {
    this.ort = ort;
    this.folder = folder;
    this.seed = options.seed ?? 0;
    this.lrOverride = options.lr ?? null;
    this.checkpointEvery = options.checkpointEvery ?? null;
    this.store = options.checkpoints ?? null;
    this.echo = options.echo ?? (() => {});
    this.onStep = options.onStep ?? (() => {});
    this.onEpoch = options.onEpoch ?? (() => {});
    this.now = options.now ?? (() => performance.now() / 1000);
    this.sets = null;
  }

  async contract() {
    this.device ??= await readContract(this.folder);
    return this.device;
  }

  async dataset(bytes, label) {
    const {tensors} = parseSafetensors(bytes, label);
    return makeDataset(tensors, await this.contract(), label);
  }

  async open(checkpoint) {
    const device = await this.contract();
    await this.release();
    const saved = checkpoint ? {
      state: parseSafetensors(await this.store.read(checkpoint, DEVICE_STATE), `${checkpoint}/${DEVICE_STATE}`).tensors,
      carried: (await this.store.has(checkpoint, CARRIED_STATE))
        ? parseSafetensors(await this.store.read(checkpoint, CARRIED_STATE), `${checkpoint}/${CARRIED_STATE}`).tensors : null,
    } : null;
    this.sets = [];
    for (const [number, spec] of device.artifact_sets.entries()) {
      const set = new ArtifactSet(this.ort, spec, number);
      await set.open(this.folder, saved);
      this.sets.push(set);
    }
    // a passed-on output is dropped once the last set that reads it has run
    this.lastReader = {};
    const handedOn = new Set(device.artifact_sets.flatMap((s) => s.passes_on));
    device.artifact_sets.forEach((s, number) => s.train_inputs.forEach((name) => { if (handedOn.has(name)) this.lastReader[name] = number; }));
  }

  async release() {
    for (const set of this.sets ?? []) await set.release();
    this.sets = null;
  }

  /** One sweep through the artifact sets; training steps each set's optimizer right after it ran. */
  async sweep(rows, {train, lr}) {
    const batch = Number(rows.labels.dims[0]);
    const values = {...rows};
    let outputs = null;
    for (const [number, set] of this.sets.entries()) {
      outputs = train ? await set.train(values, batch, lr) : await set.evaluate(values, batch);
      for (const name of Object.keys(values)) if (this.lastReader[name] === number) delete values[name];
      for (const name of set.spec.passes_on) values[name] = plain(outputs[name]);
    }
    return outputs;
  }

  lossOf(outputs, set, training) {
    const name = training ? set.spec.train_outputs[0] : set.spec.eval_outputs[0];
    return Number(outputs[name].data[0]);
  }

  correct(outputs, labels) {
    const device = this.device;
    if (device.accuracy !== 'argmax' || !outputs[device.output]) return 0;
    const logits = outputs[device.output].data;
    const n = Number(labels.dims[0]);
    const width = logits.length / n;
    let hits = 0;
    for (let i = 0; i < n; i++) {
      let best = 0;
      for (let j = 1; j < width; j++) if (logits[i * width + j] > logits[i * width + best]) best = j;
      if (BigInt(best) === BigInt(labels.data[i])) hits += 1;
    }
    return hits;
  }

  /** Mean loss and accuracy (cross-entropy) of the current parameters, in batches of `batchSize`. */
  async evaluate(dataset, batchSize = 256) {
    if (!this.sets) await this.open(this.store ? await this.latestOwn() : null);
    let loss = 0, correct = 0;
    for (let start = 0; start < dataset.length; start += batchSize) {
      const indices = Array.from({length: Math.min(batchSize, dataset.length - start)}, (_, i) => start + i);
      const rows = takeRows(dataset, indices);
      const outputs = await this.sweep(rows, {train: false});
      loss += this.lossOf(outputs, this.sets.at(-1), false) * indices.length;
      correct += this.correct(outputs, rows.labels);
    }
    return {loss: loss / dataset.length, accuracy: this.device.accuracy ? correct / dataset.length : null};
  }

  async latestOwn() {
    const latest = await this.store.latest();
    if (!latest) return null;
    const progress = JSON.parse(await this.store.readText(latest, PROGRESS));
    if ((progress.runtime ?? 'python') !== 'node' || !(await this.store.has(latest, DEVICE_STATE))) {
      throw new EdgeplugError(`checkpoint ${latest} was written by the ${progress.runtime ?? 'python'} runtime, whose optimizer state this runtime cannot load; continue with that runtime or pass --restart`);
    }
    return latest;
  }

  /** Train for `epochs` epochs (the total target), resuming from the newest checkpoint unless resume is false. */
  async fit(train, evalSet, {epochs = 1, batchSize = 32, resume = true} = {}) {
    if (epochs < 1 || batchSize < 1) throw new EdgeplugError('epochs and batch size must be at least 1');
    const device = await this.contract();
    if (this.store && !resume) await this.store.clear();
    const checkpoint = this.store && resume ? await this.latestOwn() : null;
    let progress = {epoch: 0, batch: 0, step: 0, history: []};
    if (checkpoint) {
      progress = JSON.parse(await this.store.readText(checkpoint, PROGRESS));
      if (![undefined, null, train.length].includes(progress.num_samples)) throw new EdgeplugError(`the checkpoint was made with ${progress.num_samples} training samples, this data has ${train.length}; use the same data or --restart`);
      if (![undefined, null, this.seed].includes(progress.seed)) throw new EdgeplugError(`the checkpoint was made with seed ${progress.seed}; resume with --seed ${progress.seed} or pass --restart`);
      if (![undefined, null, batchSize].includes(progress.batch_size)) throw new EdgeplugError(`the checkpoint was made with batch size ${progress.batch_size}; resume with the same or pass --restart`);
    }
    const resumedFrom = checkpoint ? progress.step : null;
    await this.open(checkpoint);
    this.probe = takeRows(train, [0]); // a one-sample batch for reading updated statistics (collectUpdated)
    const stepsPerEpoch = Math.ceil(train.length / batchSize);
    const lr = this.lrOverride ?? device.optimizer.lr;
    const schedule = makeSchedule(lr, device.optimizer.schedule, epochs * stepsPerEpoch);
    let initial = null;
    if (checkpoint) this.echo(`resuming from ${checkpoint} (epoch ${progress.epoch + 1}, batch ${progress.batch})`);
    if (evalSet && !checkpoint) {
      initial = await this.evaluate(evalSet);
      this.echo(`before training: ${metricsText('eval', initial)}`);
      await this.onEpoch({epoch: 0, train: null, eval: initial, seconds: 0}); // epoch 0: before training, eval only
    }
    const stepTimes = [], stepLosses = [];
    while (progress.epoch < epochs) {
      const epoch = progress.epoch;
      const order = epochOrder(this.seed, epoch, train.length);
      const started = this.now();
      progress.running ??= {loss: 0, correct: 0, seen: 0};
      const sums = progress.running;
      while (progress.batch < stepsPerEpoch) {
        const indices = Array.from(order.subarray(progress.batch * batchSize, (progress.batch + 1) * batchSize));
        const rows = takeRows(train, indices);
        const tick = this.now();
        const outputs = await this.sweep(rows, {train: true, lr: schedule(progress.step)});
        stepTimes.push(this.now() - tick);
        const loss = this.lossOf(outputs, this.sets.at(-1), true);
        stepLosses.push(loss);
        if (!Number.isFinite(loss)) throw new EdgeplugError(`the loss became ${loss} at step ${progress.step}; lower the learning rate (--lr)`);
        sums.loss += loss * indices.length;
        sums.correct += this.correct(outputs, rows.labels);
        sums.seen += indices.length;
        progress.batch += 1;
        progress.step += 1;
        await this.onStep({epoch, step: progress.step, loss});
        if (this.checkpointEvery && progress.step % this.checkpointEvery === 0 && progress.batch < stepsPerEpoch) {
          await this.save(progress, train, batchSize);
        }
      }
      const trainMetrics = {loss: sums.loss / sums.seen, accuracy: device.accuracy ? sums.correct / sums.seen : null};
      const evalMetrics = evalSet ? await this.evaluate(evalSet) : null;
      const seconds = this.now() - started;
      progress.history.push({epoch: epoch + 1, train: trainMetrics, eval: evalMetrics, seconds: Math.round(seconds * 1000) / 1000});
      await this.onEpoch(progress.history.at(-1));
      delete progress.running;
      progress.epoch += 1;
      progress.batch = 0;
      this.echo(`epoch ${epoch + 1}/${epochs}  ${metricsText('train', trainMetrics)}${evalMetrics ? '  ' + metricsText('eval', evalMetrics) : ''}  (${seconds.toFixed(1)} s)`);
      await this.save(progress, train, batchSize);
    }
    const sorted = stepTimes.slice().sort((a, b) => a - b);
    const median = sorted.length ? (sorted.length % 2 ? sorted[(sorted.length - 1) / 2] : (sorted[sorted.length / 2 - 1] + sorted[sorted.length / 2]) / 2) : null;
    return {
      epochs: progress.history, initial_eval: initial, steps_run: stepTimes.length, resumed_from_step: resumedFrom,
      median_step_seconds: median, peak_rss_bytes: 0, step_losses: stepLosses,
      step_seconds: stepTimes.map((t) => Math.round(t * 1e6) / 1e6),
    };
  }

  /** Read the frozen parameters training updated in place (batch-norm statistics) through the state eval
   * models: one evaluation sweep over a one-sample batch, which changes nothing. */
  async collectUpdated() {
    if (!this.probe || !this.sets.some((set) => set.spec.portable.updated_output)) return;
    const values = {...this.probe};
    for (const [number, set] of this.sets.entries()) {
      const outputs = await set.evaluate(values, 1);
      if (set.spec.portable.updated_output) {
        const flat = outputs[set.spec.portable.updated_output].data;
        const shapes = Object.fromEntries(set.spec.parameters.map((p) => [p.name, p.shape]));
        let offset = 0;
        for (const name of set.spec.portable.updated_parameters) {
          const count = product(shapes[name]);
          set.updated[name] = {type: 'float32', dims: shapes[name], data: flat.slice(offset, offset + count)};
          offset += count;
        }
      }
      for (const name of set.spec.passes_on) values[name] = plain(outputs[name]);
      for (const name of Object.keys(values)) if (this.lastReader[name] === number) delete values[name];
    }
  }

  async save(progress, train, batchSize) {
    if (!this.store) return;
    await this.collectUpdated();
    const tensors = {}, carried = {};
    for (const set of this.sets) set.save(tensors, carried);
    const files = {
      [DEVICE_STATE]: serializeSafetensors(tensors, {format: 'edgeplug-training-state', runtime: 'node'}),
      [PROGRESS]: JSON.stringify({...progress, num_samples: train.length, batch_size: batchSize, seed: this.seed, runtime: 'node'}, null, 2) + '\n',
    };
    if (Object.keys(carried).length) files[CARRIED_STATE] = serializeSafetensors(carried, {format: 'edgeplug-carried-state'});
    await this.store.write(`step-${String(progress.step).padStart(8, '0')}`, files);
  }

  /** The trained parameters of every set as a safetensors file that `edgeplug export --checkpoint` accepts. */
  async trainedParameters() {
    await this.collectUpdated();
    const tensors = {}, carried = {};
    for (const set of this.sets) set.save(tensors, carried);
    return serializeSafetensors(tensors, {format: 'edgeplug-training-state', runtime: 'node'});
  }
}

export function metricsText(prefix, metrics) {
  const text = `${prefix}_loss ${metrics.loss.toFixed(4)}`;
  return metrics.accuracy === null || metrics.accuracy === undefined ? text : `${text}  ${prefix}_acc ${metrics.accuracy.toFixed(3)}`;
}

/** Checkpoints kept in memory (browsers): the same interface as the Node file store. */
export class MemoryStore {
  constructor(keep = 2) { this.keep = keep; this.checkpoints = new Map(); }
  async latest() { return [...this.checkpoints.keys()].sort().at(-1) ?? null; }
  async has(name, file) { return Boolean(this.checkpoints.get(name)?.[file]); }
  async read(name, file) {
    const value = this.checkpoints.get(name)[file];
    return typeof value === 'string' ? new TextEncoder().encode(value) : value;
  }
  async readText(name, file) {
    const value = this.checkpoints.get(name)[file];
    return typeof value === 'string' ? value : new TextDecoder().decode(value);
  }
  async write(name, files) {
    this.checkpoints.set(name, files);
    for (const old of [...this.checkpoints.keys()].sort().slice(0, -this.keep)) this.checkpoints.delete(old);
  }
  async clear() { this.checkpoints.clear(); }
}
