// The fine-tuning page: an artifact folder (served at artifacts/ or picked), data the user picks,
// training with the runtime in ../src, loss and accuracy shown as it goes. window.edgeplug exposes
// the state for the end-to-end browser test.
import * as ort from '/dist/ort.training.wasm.min.mjs';
import {EdgeplugError, MemoryStore, Trainer, metricsText} from '/src/trainer.mjs';

ort.env.wasm.wasmPaths = `${location.origin}/dist/`; // absolute: a relative path resolves against dist/ itself
const $ = (id) => document.getElementById(id);
const state = {folder: null, trainer: null, train: null, evalSet: null, losses: [], running: false, result: null, error: null};
window.edgeplug = state;

function status(text, error = false) {
  $('status').textContent = text;
  $('status').className = error ? 'error' : '';
}

function servedFolder() {
  return {
    label: 'artifacts/',
    async read(relative) {
      const response = await fetch(`/artifacts/${relative}`);
      if (!response.ok) throw new Error(`artifacts/${relative}: HTTP ${response.status}`);
      return new Uint8Array(await response.arrayBuffer());
    },
  };
}

function pickedFolder(files) {
  const byPath = new Map();
  for (const file of files) byPath.set(file.webkitRelativePath.split('/').slice(1).join('/'), file);
  const root = files[0]?.webkitRelativePath.split('/')[0] ?? 'folder';
  return {
    label: root,
    async read(relative) {
      const file = byPath.get(relative);
      if (!file) throw new Error(`${root}/${relative} is missing`);
      return new Uint8Array(await file.arrayBuffer());
    },
  };
}

async function useFolder(folder) {
  state.folder = folder;
  const trainer = new Trainer(ort, folder);
  const device = await trainer.contract(); // refuses folders that need Python, with one message
  state.device = device;
  const sets = device.artifact_sets.length;
  $('model').textContent = `${folder.label}: inputs ${device.data_inputs.map((i) => `${i.name} [${i.shape}]`).join(', ')}; `
    + `loss ${device.loss} on '${device.output}'; ${device.optimizer.name}, lr ${device.optimizer.lr}, schedule ${device.optimizer.schedule.name}`
    + (sets > 1 ? `; ${sets} stages` : '');
  if (!$('lr').value) $('lr').value = device.optimizer.lr;
  state.train = state.evalSet = null;
  refresh();
}

async function loadData(file, which) {
  const trainer = new Trainer(ort, state.folder);
  const dataset = await trainer.dataset(new Uint8Array(await file.arrayBuffer()), file.name);
  state[which] = dataset;
  refresh();
  return dataset;
}

function refresh() {
  $('train').disabled = state.running || !state.folder || !state.train;
  if (!state.running && state.folder && !state.train) status('Pick the training data.');
  if (!state.running && state.train) status(`Ready: ${state.train.length} training samples${state.evalSet ? `, ${state.evalSet.length} evaluation samples` : ''}.`);
}

function drawChart() {
  const canvas = $('chart');
  const context = canvas.getContext('2d');
  context.clearRect(0, 0, canvas.width, canvas.height);
  const losses = state.losses;
  if (losses.length < 2) return;
  const top = Math.max(...losses), pad = 28;
  context.strokeStyle = '#999';
  context.strokeRect(pad, 8, canvas.width - pad - 8, canvas.height - pad - 8);
  context.fillStyle = '#555';
  context.font = '11px system-ui';
  context.fillText(top.toFixed(2), 2, 16);
  context.fillText('0', 14, canvas.height - pad);
  context.fillText(`step ${losses.length}`, canvas.width - 70, canvas.height - 8);
  context.strokeStyle = '#0b63c4';
  context.beginPath();
  losses.forEach((loss, i) => {
    const x = pad + (i / (losses.length - 1)) * (canvas.width - pad - 8);
    const y = 8 + (1 - loss / top) * (canvas.height - pad - 8);
    i ? context.lineTo(x, y) : context.moveTo(x, y);
  });
  context.stroke();
}

function addEpochRow(entry) {
  const cell = (v, digits) => (v === null || v === undefined ? '–' : v.toFixed(digits));
  const row = document.createElement('tr');
  for (const text of [entry.epoch || 'before', cell(entry.train?.loss, 4), cell(entry.train?.accuracy, 3), cell(entry.eval?.loss, 4),
    cell(entry.eval?.accuracy, 3), entry.seconds.toFixed(1)]) {
    const td = document.createElement('td');
    td.textContent = text;
    row.appendChild(td);
  }
  $('epochs-table').querySelector('tbody').appendChild(row);
}

async function train() {
  state.running = true;
  state.losses = [];
  state.result = state.error = null;
  $('epochs-table').querySelector('tbody').replaceChildren();
  $('download').disabled = true;
  refresh();
  const threads = Number($('threads').value) || 1;
  ort.env.wasm.numThreads = crossOriginIsolated ? threads : 1;
  const epochs = Number($('epochs').value), batchSize = Number($('batch-size').value);
  const trainer = new Trainer(ort, state.folder, {
    seed: Number($('seed').value) || 0, lr: $('lr').value ? Number($('lr').value) : null, checkpoints: new MemoryStore(),
    echo: (line) => status(line),
    onEpoch: (entry) => addEpochRow(entry),
    onStep: async ({epoch, step, loss}) => {
      state.losses.push(loss);
      if (step % 5 === 0) {
        drawChart();
        status(`epoch ${epoch + 1}/${epochs}, step ${step}: loss ${loss.toFixed(4)}`);
        await new Promise((r) => setTimeout(r, 0)); // let the page repaint
      }
    },
  });
  state.trainer = trainer;
  try {
    const result = await trainer.fit(state.train, state.evalSet, {epochs, batchSize, resume: false});
    state.result = result;
    drawChart();
    const last = result.epochs.at(-1);
    status(`done: ${result.steps_run} steps, median step ${(result.median_step_seconds * 1000).toFixed(1)} ms; `
      + metricsText('train', last.train) + (last.eval ? '  ' + metricsText('eval', last.eval) : ''));
    $('download').disabled = false;
    $('export-hint').hidden = false;
  } catch (error) {
    state.error = error.message;
    status(error instanceof EdgeplugError ? error.message : `internal error: ${error.message}`, true);
  } finally {
    state.running = false;
    $('train').disabled = false;
  }
}

async function download() {
  const blob = new Blob([await state.trainer.trainedParameters()], {type: 'application/octet-stream'});
  const link = document.createElement('a');
  link.href = URL.createObjectURL(blob);
  link.download = 'training_state.safetensors';
  link.click();
  URL.revokeObjectURL(link.href);
}

async function offerServedData() {
  const response = await fetch('/data/');
  if (!response.ok) return;
  const files = await response.json();
  if (!files.length) return;
  const holder = $('served-data');
  holder.append('or use data served with the page: ');
  for (const [which, label] of [['train', 'train on'], ['evalSet', 'evaluate on']]) {
    const select = document.createElement('select');
    select.id = `served-${which}`;
    select.append(new Option(`(${label})`, ''), ...files.map((f) => new Option(f, f)));
    select.addEventListener('change', async () => {
      if (!select.value) return;
      const bytes = await (await fetch(`/data/${select.value}`)).arrayBuffer();
      await guarded(() => loadData(new File([bytes], select.value), which));
    });
    holder.append(select, ' ');
  }
}

async function guarded(action) {
  try {
    return await action();
  } catch (error) {
    state.error = error.message;
    status(error.message, true);
  }
}

$('folder').addEventListener('change', (e) => guarded(() => useFolder(pickedFolder([...e.target.files]))));
$('train-file').addEventListener('change', (e) => e.target.files[0] && guarded(() => loadData(e.target.files[0], 'train')));
$('eval-file').addEventListener('change', (e) => e.target.files[0] && guarded(() => loadData(e.target.files[0], 'evalSet')));
$('train').addEventListener('click', train);
$('download').addEventListener('click', download);
await guarded(() => useFolder(servedFolder()));
await guarded(offerServedData);
state.ready = true;
