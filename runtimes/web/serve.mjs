#!/usr/bin/env node
// Serves the fine-tuning page with an artifact folder on 127.0.0.1:
//   node serve.mjs --artifacts OUT [--data DIR] [--port 8080]
// /            the page (web/)            /src/  the runtime            /dist/  onnxruntime-web's files
// /artifacts/  the artifact folder        /data/ optional .safetensors data files to offer on the page
// With the cross-origin isolation headers the page may use more than one WebAssembly thread.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import {fileURLToPath} from 'node:url';
import {parseArgs} from 'node:util';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const TYPES = {
  '.html': 'text/html; charset=utf-8', '.mjs': 'text/javascript', '.js': 'text/javascript', '.css': 'text/css',
  '.wasm': 'application/wasm', '.json': 'application/json', '.onnx': 'application/octet-stream',
  '.safetensors': 'application/octet-stream', '.png': 'image/png',
};

/** Start the server; resolves to {server, url}. Only files under the mapped folders are served. */
export function serve({artifacts, data = null, port = 0, host = '127.0.0.1'}) {
  const roots = {
    '/dist/': path.join(HERE, 'node_modules', 'onnxruntime-web', 'dist'),
    '/src/': path.join(HERE, 'src'),
    '/artifacts/': path.resolve(artifacts),
    ...(data ? {'/data/': path.resolve(data)} : {}),
    '/': path.join(HERE, 'web'),
  };
  const server = http.createServer((request, response) => {
    const url = new URL(request.url, 'http://localhost');
    let pathname = decodeURIComponent(url.pathname);
    if (pathname === '/data/' && data) {
      const files = fs.readdirSync(roots['/data/']).filter((f) => f.endsWith('.safetensors')).sort();
      response.writeHead(200, {'content-type': 'application/json', 'cross-origin-resource-policy': 'same-origin'});
      response.end(JSON.stringify(files));
      return;
    }
    if (pathname === '/') pathname = '/index.html';
    const prefix = Object.keys(roots).find((p) => pathname.startsWith(p) || (p === '/' && pathname.startsWith('/')));
    const root = roots[prefix];
    const file = path.resolve(root, '.' + pathname.slice(prefix.length - 1));
    if (!file.startsWith(root + path.sep) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      response.writeHead(404, {'content-type': 'text/plain'});
      response.end('not found');
      return;
    }
    response.writeHead(200, {
      'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream',
      'cross-origin-opener-policy': 'same-origin',
      'cross-origin-embedder-policy': 'require-corp',
      'cross-origin-resource-policy': 'same-origin',
      'cache-control': 'no-store',
    });
    fs.createReadStream(file).pipe(response);
  });
  return new Promise((resolve) => server.listen(port, host, () => {
    resolve({server, url: `http://${host}:${server.address().port}/`});
  }));
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const {values} = parseArgs({options: {artifacts: {type: 'string'}, data: {type: 'string'}, port: {type: 'string', default: '8080'}}});
  if (!values.artifacts) {
    console.error('usage: node serve.mjs --artifacts OUT [--data DIR] [--port 8080]');
    process.exit(2);
  }
  const {url} = await serve({artifacts: values.artifacts, data: values.data, port: Number(values.port)});
  console.log(`open ${url} (Ctrl-C to stop)`);
}
