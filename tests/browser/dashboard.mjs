// Loads the built-in dashboard in headless Chromium (Debian's /usr/bin/chromium), enters the API
// key when it asks for one, waits for live points of a chosen car, checks the fleet map has a
// marker per car and that nothing is fetched from another site (no tile server is set), picks
// a history range and waits for the history API's points on a time axis, checks a second tab
// on another car sees only that car, and saves a screenshot.
// Usage: node dashboard.mjs BASE_URL VIN_A VIN_B SCREENSHOT.png [API_KEY]
import { chromium } from 'playwright-core';

const [base, vinA, vinB, screenshot, apiKey] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
const fail = async (message) => {
  console.error(message);
  await browser.close();
  process.exit(1);
};
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  const elsewhere = [];
  page.on('request', (r) => { if (!r.url().startsWith(base) && !r.url().startsWith('ws')) elsewhere.push(r.url()); });
  // With a key, the dashboard must ask for it (and the key must never be in the URL).
  const enterKey = async (tab) => {
    if (!apiKey) return;
    await tab.waitForFunction(() => document.body.dataset.needsKey === '1', null, { timeout: 20000 });
    await tab.fill('#api-key', apiKey);
    await tab.click('#key-form button');
  };
  await page.goto(`${base}/?vin=${vinA}`);
  await enterKey(page);
  // The fleet table fills from /v1/vehicles, the chart from the WebSocket.
  await page.waitForFunction(() => Number(document.body.dataset.cars || 0) >= 2, null, { timeout: 20000 });
  await page.waitForFunction(() => Number(document.body.dataset.points || 0) >= 3, null, { timeout: 20000 });
  if (apiKey && await page.locator('#key-form').isVisible()) await fail('the key form stays after a good key');
  const first = await page.evaluate(() => ({ vin: document.body.dataset.vin, points: Number(document.body.dataset.points) }));
  if (first.vin !== vinA) await fail(`first tab watches ${first.vin}, not ${vinA}`);
  const rows = await page.locator('tr.car').count();
  // Every simulated car is connected: the fleet table says so (from each car's latest state).
  await page.waitForFunction((n) => document.querySelectorAll('tr.car td.link.online').length >= n, rows, { timeout: 20000 });
  const online = await page.locator('tr.car td.link.online').count();
  // The map: a marker per car with a position (Leaflet draws each as an interactive SVG path).
  await page.waitForFunction((n) => Number(document.body.dataset.markers || 0) >= n, rows, { timeout: 20000 });
  const markers = await page.locator('#map path.leaflet-interactive').count();
  // A history range: the history API answers (six hours: per-minute rollups), drawn on a time axis.
  await page.click('#ranges button[data-range="6"]');
  await page.waitForFunction(() => Number(document.body.dataset.historyPoints || 0) >= 1, null, { timeout: 20000 });
  const history = await page.evaluate(() => ({
    points: Number(document.body.dataset.historyPoints),
    resolution: document.body.dataset.historyResolution,
    ticks: Number(document.body.dataset.ticks || 0),
  }));

  const second = await browser.newPage();
  await second.goto(`${base}/?vin=${vinB}`);
  await enterKey(second);
  await second.waitForFunction(() => Number(document.body.dataset.points || 0) >= 3, null, { timeout: 20000 });
  const other = await second.evaluate(() => ({ vin: document.body.dataset.vin, foreign: Number(document.body.dataset.foreign || 0) }));
  if (other.vin !== vinB) await fail(`second tab watches ${other.vin}, not ${vinB}`);
  if (other.foreign !== 0) await fail(`second tab got ${other.foreign} readings of other cars`);

  await page.screenshot({ path: screenshot });
  if (elsewhere.length) await fail(`fetched from elsewhere: ${elsewhere.join(', ')}`);
  if (apiKey && page.url().includes(apiKey)) await fail('the API key is in the URL');
  if (errors.length) await fail(`page errors: ${errors.join('; ')}`);
  console.log(JSON.stringify({ rows, online, markers, history, points: first.points, second: other }));
} catch (e) {
  await fail(String(e));
}
await browser.close();
