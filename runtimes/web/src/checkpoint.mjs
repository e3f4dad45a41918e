// Reads the parameters out of an onnxruntime-training checkpoint (a flatbuffer, file identifier "ODTC";
// schema onnxruntime/core/flatbuffers/schema/ort_training_checkpoint.fbs and ort.fbs). onnxruntime-web
// 1.19.2's getContiguousParameters frees a stack address and corrupts the WebAssembly heap (a later
// step crashed with "unaligned access"), so this runtime reads the initial values from the file instead.

const FLOAT = 1; // onnxruntime.fbs.TensorDataType.FLOAT

class Reader {
  constructor(bytes) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.bytes = bytes;
  }
  u32(at) { return this.view.getUint32(at, true); }
  /** Position of field `slot` of the table at `table`, or null when absent. */
  field(table, slot) {
    const vtable = table - this.view.getInt32(table, true);
    const size = this.view.getUint16(vtable, true);
    const entry = 4 + 2 * slot;
    if (entry >= size) return null;
    const offset = this.view.getUint16(vtable + entry, true);
    return offset ? table + offset : null;
  }
  ref(at) { return at + this.u32(at); }
  table(table, slot) { const at = this.field(table, slot); return at === null ? null : this.ref(at); }
  vector(table, slot) {
    const at = this.table(table, slot);
    return at === null ? {start: 0, length: 0} : {start: at + 4, length: this.u32(at)};
  }
  tables(table, slot) {
    const {start, length} = this.vector(table, slot);
    return Array.from({length}, (_, i) => this.ref(start + 4 * i));
  }
  string(table, slot) {
    const at = this.table(table, slot);
    return at === null ? '' : new TextDecoder().decode(this.bytes.subarray(at + 4, at + 4 + this.u32(at)));
  }
  scalar(table, slot, read, fallback) { const at = this.field(table, slot); return at === null ? fallback : read(at); }
}

/** {name: {dims, data: Float32Array (a copy), trainable}} of every float32 parameter in the checkpoint. */
export function readCheckpointParameters(bytes, label = 'checkpoint') {
  const parameters = {};
  for (const [name, entry] of Object.entries(locateParameters(bytes, label))) {
    const data = new Float32Array(entry.length / 4);
    new Uint8Array(data.buffer).set(entry.view.subarray(entry.start, entry.start + entry.length));
    parameters[name] = {dims: entry.dims, data, trainable: entry.trainable};
  }
  return parameters;
}

/** A copy of the checkpoint with the values of `values` ({name: Float32Array}) written over its own: how a
 * resumed run puts saved parameters (and batch-norm statistics) back before its session opens. */
export function patchCheckpoint(bytes, values, label = 'checkpoint') {
  const copy = Uint8Array.from(ArrayBuffer.isView(bytes) ? new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength) : new Uint8Array(bytes));
  const where = locateParameters(copy, label);
  for (const [name, data] of Object.entries(values)) {
    const entry = where[name];
    if (!entry || entry.length !== data.byteLength) throw new Error(`${label} has no float32 parameter '${name}' of ${data.length} values`);
    copy.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), entry.start);
  }
  return copy;
}

function locateParameters(bytes, label) {
  const view = ArrayBuffer.isView(bytes) ? new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength) : new Uint8Array(bytes);
  if (view.byteLength < 8 || new TextDecoder().decode(view.subarray(4, 8)) !== 'ODTC') {
    throw new Error(`${label} is not an onnxruntime-training checkpoint (no ODTC identifier)`);
  }
  const r = new Reader(view);
  const root = r.ref(0);
  const module = r.table(root, 1);
  if (module === null) throw new Error(`${label} holds no module state`);
  if (r.scalar(module, 2, (at) => r.view.getUint8(at), 0)) throw new Error(`${label} is a nominal checkpoint (no parameter values)`);
  if (r.scalar(module, 3, (at) => r.view.getUint8(at), 0)) throw new Error(`${label} keeps its data in an external file, which this runtime does not read`);
  const parameters = {};
  for (const [slot, trainable] of [[0, true], [1, false]]) {
    for (const tensor of r.tables(module, slot)) {
      const name = r.string(tensor, 0);
      const dims = (() => { const {start, length} = r.vector(tensor, 2); return Array.from({length}, (_, i) => Number(r.view.getBigInt64(start + 8 * i, true))); })();
      const type = r.scalar(tensor, 3, (at) => r.view.getInt32(at, true), 0);
      if (type !== FLOAT) {
        if (trainable) throw new Error(`${label}: trainable parameter '${name}' is not float32 (data type ${type})`);
        continue; // frozen int8 weights (quantize-frozen) stay inside onnxruntime; only trainable values are needed
      }
      const {start, length} = r.vector(tensor, 4);
      parameters[name] = {dims, trainable, start, length, view};
    }
  }
  return parameters;
}
