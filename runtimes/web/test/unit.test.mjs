// The runtime's pure parts: safetensors, the epoch order (numpy's), learning-rate schedules, data checks.
// Expected numbers come from numpy / edgeplug.schedules (Python), printed once and pasted here.
import assert from 'node:assert/strict';
import {test} from 'node:test';
import {epochOrder, seedSequenceState} from '../src/order.mjs';
import {parseSafetensors, serializeSafetensors} from '../src/safetensors.mjs';
import {makeSchedule} from '../src/schedule.mjs';
import {EdgeplugError, makeDataset, readContract} from '../src/trainer.mjs';

test('epoch order is numpy.random.default_rng([seed, epoch]).permutation(n)', () => {
  // numpy 2.x: list(np.random.default_rng([s, e]).permutation(n)[:12])
  assert.deepEqual(Array.from(epochOrder(0, 0, 10)), [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]);
  assert.deepEqual(Array.from(epochOrder(0, 1, 50).slice(0, 12)), [9, 21, 31, 26, 41, 5, 48, 10, 42, 0, 47, 1]);
  assert.deepEqual(Array.from(epochOrder(7, 3, 1000).slice(0, 12)), [919, 225, 21, 78, 70, 40, 82, 156, 66, 517, 275, 127]);
  assert.deepEqual(Array.from(epochOrder(123456789012, 2, 5)), [2, 1, 0, 3, 4]);
  const order = epochOrder(3, 9, 777);
  assert.deepEqual(Array.from(order).sort((a, b) => a - b), Array.from({length: 777}, (_, i) => i));
});

test('SeedSequence state words match numpy', () => {
  // list(np.random.SeedSequence([0, 0]).generate_state(4)), list(np.random.SeedSequence([1, 2]).generate_state(3))
  assert.deepEqual(seedSequenceState([0, 0], 4), [2968811710, 3677149159, 745650761, 2884920346]);
  assert.deepEqual(seedSequenceState([1, 2], 3), [1596810411, 3615836353, 2321460393]);
});

test('schedules give edgeplug.schedules values', () => {
  const at = (spec) => [0, 2, 4, 6, 8, 10].map(makeSchedule(0.01, spec, 10));
  assert.deepEqual(at(null), [0.01, 0.01, 0.01, 0.01, 0.01, 0.01]);
  const cosine = at({name: 'cosine', warmup_steps: 2, final_lr_fraction: 0.1});
  [0.005, 0.01, 0.008681980515339464, 0.0055000000000000005, 0.0023180194846605367, 0.001]
    .forEach((want, i) => assert.ok(Math.abs(cosine[i] - want) <= 1e-15 * want, `cosine step ${2 * i}: ${cosine[i]} vs ${want}`));
  assert.deepEqual(at({name: 'linear'}), [0.01, 0.008, 0.006, 0.004, 0.0019999999999999996, 0]);
  assert.deepEqual(at({name: 'step', gamma: 0.5, step_size: 3}), [0.01, 0.01, 0.005, 0.0025, 0.0025, 0.00125]);
  assert.throws(() => makeSchedule(0.01, {name: 'bogus'}, 10)(0), /unknown learning-rate schedule 'bogus'/);
});

test('safetensors round trip keeps names, types, shapes, values and metadata', () => {
  const tensors = {
    a: {type: 'float32', dims: [2, 3], data: Float32Array.from([1, 2, 3, 4, 5, 6.5])},
    labels: {type: 'int64', dims: [3], data: BigInt64Array.from([0n, 7n, -1n])},
    flag: {type: 'uint8', dims: [1], data: Uint8Array.from([1])},
  };
  const bytes = serializeSafetensors(tensors, {format: 'edgeplug-data'});
  const {tensors: back, metadata} = parseSafetensors(bytes);
  assert.deepEqual(metadata, {format: 'edgeplug-data'});
  for (const [name, t] of Object.entries(tensors)) {
    assert.equal(back[name].type, t.type);
    assert.deepEqual(back[name].dims, t.dims);
    assert.deepEqual(Array.from(back[name].data), Array.from(t.data));
  }
  assert.equal((8 + Number(new DataView(bytes.buffer).getBigUint64(0, true))) % 8, 0, 'data section is 8-byte aligned');
});

test('a truncated or foreign file is refused with its name', () => {
  assert.throws(() => parseSafetensors(new Uint8Array(3), 'x.safetensors'), /x.safetensors is not a safetensors file/);
  const bytes = serializeSafetensors({a: {type: 'float32', dims: [4], data: new Float32Array(4)}});
  assert.throws(() => parseSafetensors(bytes.slice(0, bytes.length - 4), 'cut.safetensors'), /cut.safetensors: tensor 'a' does not fit/);
});

const CONTRACT = {
  data_inputs: [{name: 'image', dtype: 'float32', shape: ['batch', 1, 2, 2]}], loss: 'cross-entropy', accuracy: 'argmax',
};

test('data is checked against the contract: names, shapes, dtypes, labels', () => {
  const image = {type: 'float32', dims: [3, 1, 2, 2], data: new Float32Array(12)};
  const labels = {type: 'int32', dims: [3], data: Int32Array.from([0, 1, 2])};
  const ok = makeDataset({image, labels}, CONTRACT, 'd');
  assert.equal(ok.length, 3);
  assert.equal(ok.labels.type, 'int64');
  assert.throws(() => makeDataset({pixels: image, labels}, CONTRACT, 'd'), /d: no tensor for model input 'image' \(tensors: pixels, labels\)/);
  assert.throws(() => makeDataset({image: {...image, dims: [3, 1, 3, 2], data: new Float32Array(18)}, labels}, CONTRACT, 'd'), /has shape \(3,1,3,2\) but the model expects/);
  assert.throws(() => makeDataset({image, labels: {type: 'float32', dims: [3], data: new Float32Array(3)}}, CONTRACT, 'd'), /cross-entropy needs integer class indices/);
  assert.throws(() => makeDataset({image}, CONTRACT, 'd'), /no labels tensor/);
  assert.throws(() => makeDataset({image, labels: {...labels, dims: [2], data: Int32Array.from([0, 1])}}, CONTRACT, 'd'), /has 3 samples, the labels 2/);
});

const folderWith = (report) => ({label: 'out', read: async () => new TextEncoder().encode(JSON.stringify(report))});

test('folders that need Python, lack the contract or a portable step are refused with one clear message', async () => {
  await assert.rejects(readContract(folderWith({})), (e) => e instanceof EdgeplugError && /no device_runtime/.test(e.message));
  await assert.rejects(readContract({label: 'nowhere', read: async () => { throw new Error('ENOENT'); }}), /nowhere is not an edgeplug artifact folder/);
  const needsPython = {device_runtime: {contract_version: 1, needs_python: true, needs_python_because: ["pass 'x' runs Python runtime hooks in the training loop (plugin 'p')"], artifact_sets: []}};
  await assert.rejects(readContract(folderWith(needsPython)), /out needs Python at run time \(pass 'x' runs Python runtime hooks in the training loop \(plugin 'p'\)\); train it with the Python runtime/);
  const newer = {device_runtime: {contract_version: 99, needs_python: false, needs_python_because: [], artifact_sets: []}};
  await assert.rejects(readContract(folderWith(newer)), /uses device contract 99/);
  const noStep = {device_runtime: {contract_version: 1, needs_python: false, needs_python_because: [], artifact_sets: [{dir: '.', portable: null, portable_missing_because: 'the optimizer model\'s ops (Foo) have no portable step'}]}};
  await assert.rejects(readContract(folderWith(noStep)), /artifact set '.' cannot train on this runtime: the optimizer model's ops \(Foo\) have no portable step/);
});
