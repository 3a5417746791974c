// #/traffic: requests, errors, tokens and time to first token per tenant and adapter; the engines.

import {api} from '../api.js';
import {lineChart, sparkline} from '../chart.js';
import {fill, h, table} from '../dom.js';
import {fmtDecimal, fmtInt, fmtMs, fmtTime} from '../format.js';
import {guard} from '../ui.js';

const MAX_CHARTED = 8;
const NO_TRAFFIC = 'No traffic in the window.';

const adapterName = series => series.adapter ?? 'base model';
const seriesName = series => `${series.tenant} / ${adapterName(series)}`;

function trafficRow(series) {
  return h('tr', {'data-series': `${series.tenant}/${series.adapter ?? 'base'}`},
    h('td', null, series.tenant),
    h('td', null, adapterName(series)),
    h('td', {class: 'requests num'}, fmtInt(series.requests)),
    h('td', {class: 'errors num'}, fmtInt(series.errors)),
    h('td', {class: 'tokens num'}, fmtInt(series.prompt_tokens + series.completion_tokens)),
    h('td', {class: 'ttft num'}, fmtMs(series.ttft_p50_seconds)),
    h('td', null, sparkline(series.points.map(p => p.requests), `requests per interval, ${seriesName(series)}`)));
}

// Ticks on whole minutes (1, 2, 5, 10, 15 or 30 apart) across the charted times.
function timeTicks(series) {
  const times = series.flatMap(item => item.points.map(p => p.t));
  const [min, max] = [Math.min(...times), Math.max(...times)];
  const step = 60 * ([1, 2, 5, 10, 15, 30].find(m => (max - min) / (m * 60) <= 6) || 60);
  const out = [];
  for (let t = Math.ceil(min / step) * step; t <= max; t += step) out.push(t);
  return out;
}

// The two charts over the busiest series; nothing when there are no points.
function charts(all) {
  const shown = [...all].sort((a, b) => b.requests - a.requests).slice(0, MAX_CHARTED);
  // pointClass: dots too, where intervals without requests leave a median on its own.
  const line = (pick, pointClass) => shown.map(item => ({name: seriesName(item), pointClass,
    points: item.points.map(p => ({x: p.t, y: pick(p)}))}));
  const opts = {xLabel: 'time', xFormat: fmtTime, xTicks: timeTicks(shown)};
  const requests = lineChart(line(p => p.requests), {...opts, id: 'traffic-chart-requests', yLabel: 'requests',
    yZero: true});
  const ttft = lineChart(line(p => (p.ttft_p50_seconds === null ? null : p.ttft_p50_seconds * 1000), 'ttft-point'),
    {...opts, id: 'traffic-chart-ttft', yLabel: 'TTFT p50 (ms)', yZero: true});
  const note = all.length > MAX_CHARTED ? h('p', {class: 'hint'}, `The ${MAX_CHARTED} busiest of ${all.length}.`) : null;
  return [
    requests && h('section', {class: 'panel'}, h('h2', null, 'Requests per interval'), note, requests),
    ttft && h('section', {class: 'panel'}, h('h2', null, 'Time to first token (p50)'), ttft),
  ];
}

function showTraffic(el, traffic) {
  const minutes = fmtDecimal(traffic.window_seconds / 60);
  fill(el,
    h('p', {class: 'summary'}, `Last ${minutes} minutes on this gateway, every ${fmtInt(traffic.interval_seconds)} s.`),
    table({id: 'traffic-table'}, ['Tenant', 'Adapter', 'Requests', 'Errors', 'Tokens', 'TTFT p50', 'Trend'],
      traffic.series.map(trafficRow), NO_TRAFFIC),
    traffic.series.length ? charts(traffic.series) : null);
}

function engineRow(engine) {
  const held = engine.adapters.map(a => h('li', null, `${a.tenant} / ${a.model || `${a.adapter}@${a.version}`}`));
  return h('tr', {class: 'engine'},
    h('td', null, engine.url),
    h('td', {class: engine.up ? 'up' : 'up down'}, engine.up ? 'in rotation' : 'out of rotation'),
    h('td', {class: 'in-flight num'}, fmtInt(engine.in_flight)),
    h('td', {class: 'adapters'}, held.length ? h('ul', {class: 'plain'}, held) : 'none'));
}

function showEngines(el, engines) {
  fill(el, table({id: 'engines-table'}, ['Engine', 'State', 'In flight', 'Adapters held'],
    engines.data.map(engineRow), 'No engines.'));
}

export function trafficView(ctx) {
  document.title = 'Traffic · loraserve console';
  const trafficEl = h('div', null, h('p', null, 'Loading…'));
  const enginesEl = h('div');
  ctx.root.append(h('h1', null, 'Traffic'), trafficEl,
    h('section', {class: 'panel'}, h('h2', null, 'Engines'), enginesEl));
  const load = () => Promise.all([
    guard(ctx, async () => {
      const traffic = await api('/admin/traffic');
      if (ctx.alive()) showTraffic(trafficEl, traffic);
    }),
    guard(ctx, async () => {
      const engines = await api('/admin/engines');
      if (ctx.alive()) showEngines(enginesEl, engines);
    }),
  ]);
  load().then(() => ctx.every(5000, load));
}
