// Named tensors in safetensors format: an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {string: string}}, then the
// raw little-endian bytes (offsets count from the end of the header). edgeplug writes data sets,
// carried state and checkpoints in it (docs/device-runtime.md).

const ARRAYS = {
  F32: Float32Array, F64: Float64Array, I64: BigInt64Array, I32: Int32Array, I16: Int16Array,
  I8: Int8Array, U8: Uint8Array, U16: Uint16Array, U32: Uint32Array, U64: BigUint64Array, BOOL: Uint8Array,
};
const ORT_TYPES = {
  F32: 'float32', F64: 'float64', I64: 'int64', I32: 'int32', I16: 'int16', I8: 'int8', U8: 'uint8',
  U16: 'uint16', U32: 'uint32', U64: 'uint64', BOOL: 'bool',
};
const CODES = Object.fromEntries(Object.entries(ORT_TYPES).map(([code, type]) => [type, code]));

/** The onnxruntime tensor type of a safetensors dtype code ('F32' -> 'float32'). */
export function ortType(code) {
  const type = ORT_TYPES[code];
  if (!type) throw new Error(`unsupported safetensors dtype ${code}`);
  return type;
}

/** Numpy-style dtype names, as report.json writes them. */
export const NUMPY_TYPES = {float32: 'float32', float64: 'float64', int64: 'int64', int32: 'int32', uint8: 'uint8', bool: 'bool', int8: 'int8', int16: 'int16', uint16: 'uint16', uint32: 'uint32', uint64: 'uint64'};

/**
 * Parse a safetensors file. Returns {tensors: {name: {type, dims, data}}, metadata}, where type is an
 * onnxruntime tensor type ('float32', 'int64', ...) and data a typed array holding a copy of the values.
 */
export function parseSafetensors(bytes, label = 'tensor file') {
  // a plain Uint8Array view: Node's Buffer.slice shares memory instead of copying
  const view = ArrayBuffer.isView(bytes) ? new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength) : new Uint8Array(bytes);
  if (view.byteLength < 8) throw new Error(`${label} is not a safetensors file (too short)`);
  const length = Number(new DataView(view.buffer, view.byteOffset, 8).getBigUint64(0, true));
  if (8 + length > view.byteLength) throw new Error(`${label} is not a safetensors file (header runs past the end)`);
  let header;
  try {
    header = JSON.parse(new TextDecoder().decode(view.subarray(8, 8 + length)));
  } catch {
    throw new Error(`${label} is not a safetensors file (unreadable header)`);
  }
  const start = 8 + length;
  const tensors = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const Kind = ARRAYS[entry.dtype];
    if (!Kind) throw new Error(`${label}: tensor '${name}' has unsupported dtype ${entry.dtype}`);
    const [begin, end] = entry.data_offsets;
    const count = entry.shape.reduce((a, b) => a * b, 1);
    if (end - begin !== count * Kind.BYTES_PER_ELEMENT || start + end > view.byteLength) {
      throw new Error(`${label}: tensor '${name}' does not fit its byte range`);
    }
    const copy = view.slice(start + begin, start + end); // aligned copy
    tensors[name] = {type: ortType(entry.dtype), dims: entry.shape.slice(), data: new Kind(copy.buffer, 0, count)};
  }
  return {tensors, metadata: header.__metadata__ || {}};
}

/** Serialize {name: {type, dims, data}} (type an onnxruntime tensor type) with string metadata. */
export function serializeSafetensors(tensors, metadata = {}) {
  const header = {};
  if (Object.keys(metadata).length) header.__metadata__ = Object.fromEntries(Object.entries(metadata).map(([k, v]) => [k, String(v)]));
  let offset = 0;
  const names = Object.keys(tensors);
  for (const name of names) {
    const {type, dims, data} = tensors[name];
    const code = CODES[type];
    if (!code) throw new Error(`cannot store tensor '${name}' of type ${type}`);
    header[name] = {dtype: code, shape: dims.map(Number), data_offsets: [offset, offset + data.byteLength]};
    offset += data.byteLength;
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.byteLength / 8) * 8; // keep the data 8-byte aligned (spaces are valid JSON)
  const headerBytes = new Uint8Array(padded).fill(0x20);
  headerBytes.set(json);
  json = headerBytes;
  const out = new Uint8Array(8 + json.byteLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.byteLength), true);
  out.set(json, 8);
  let at = 8 + json.byteLength;
  for (const name of names) {
    const {data} = tensors[name];
    out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), at);
    at += data.byteLength;
  }
  return out;
}
