// The fine-tuning page end to end in headless Chromium (Debian's `chromium`, driven by playwright-core):
// the page loads the digits example's folder, the user picks the support and query data, trains, and sees
// loss and accuracy per epoch; the losses equal the Node runtime's step by step. Skipped, with the reason,
// only where no Chromium is installed ($CHROMIUM names another binary; .ci/run installs Debian's).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {test} from 'node:test';
import {diskFolder, loadOrt} from '../src/node.mjs';
import {Trainer} from '../src/trainer.mjs';
import {serve} from '../serve.mjs';
import {digits, fixturesUnavailable} from './fixtures.mjs';

const CANDIDATES = [process.env.CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome'].filter(Boolean);
const chromium = CANDIDATES.find((p) => fs.existsSync(p));
const skip = fixturesUnavailable() ?? (chromium ? false : `no Chromium installed (looked for ${CANDIDATES.join(', ')}); install Debian's chromium package or set CHROMIUM`);

test('the page fine-tunes the example on picked data in headless Chromium', {skip, timeout: 240_000}, async () => {
  const {chromium: driver} = await import('playwright-core');
  const {artifacts, support, query, dir} = digits();
  const {server, url} = await serve({artifacts});
  const browser = await driver.launch({executablePath: chromium, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage']});
  try {
    const page = await browser.newPage();
    const problems = [];
    page.on('pageerror', (error) => problems.push(error.message));
    await page.goto(url);
    await page.waitForFunction(() => window.edgeplug?.ready === true, null, {timeout: 60_000});
    assert.match(await page.textContent('#model'), /inputs image \[batch,1,8,8\]; loss cross-entropy on 'logits'; adamw, lr 0.01/);
    await page.setInputFiles('#train-file', support);
    await page.setInputFiles('#eval-file', query);
    await page.waitForFunction(() => window.edgeplug.train && window.edgeplug.evalSet);
    await page.fill('#epochs', '4');
    await page.fill('#batch-size', '10');
    await page.click('#train');
    await page.waitForFunction(() => window.edgeplug.result || window.edgeplug.error, null, {timeout: 180_000});
    const {result, error} = await page.evaluate(() => ({result: window.edgeplug.result, error: window.edgeplug.error}));
    assert.equal(error, null);
    assert.equal(result.steps_run, 20);
    const rows = await page.$$eval('#epochs-table tbody tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)));
    assert.equal(rows.length, 5, 'a row before training and one per epoch');
    assert.equal(rows[0][0], 'before');
    assert.equal(rows[0][4], result.initial_eval.accuracy.toFixed(3));
    assert.equal(rows[4][4], result.epochs[3].eval.accuracy.toFixed(3), 'the table shows the eval accuracy');
    assert.match(await page.textContent('#status'), /^done: 20 steps, median step [\d.]+ ms; train_loss/);
    assert.equal(await page.isEnabled('#download'), true);
    if (process.env.EDGEPLUG_SCREENSHOT) await page.screenshot({path: process.env.EDGEPLUG_SCREENSHOT, fullPage: true});
    assert.deepEqual(problems, []);

    // the same run in Node: the browser's WebAssembly gives the same losses
    const ort = await loadOrt(1);
    const node = new Trainer(ort, diskFolder(artifacts));
    const nodeResult = await node.fit(await node.dataset(fs.readFileSync(support), 's'), await node.dataset(fs.readFileSync(query), 'q'), {epochs: 4, batchSize: 10});
    await node.release();
    assert.deepEqual(result.step_losses, nodeResult.step_losses);
    assert.equal(result.epochs[3].eval.accuracy, nodeResult.epochs[3].eval.accuracy);
    fs.rmSync(dir, {recursive: true, force: true});
  } finally {
    await browser.close();
    server.close();
  }
});
