// SVG line charts built with DOM calls. Colours come from the `series-N` classes in console.css.

import {h, s} from './dom.js';

const W = 720;
const H = 300;
const M = {top: 12, right: 20, bottom: 46, left: 64};
const tickFormat = new Intl.NumberFormat(undefined, {maximumFractionDigits: 3});

// A round step near raw (1, 2 or 5 times a power of ten).
function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(raw));
  const f = raw / power;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * power;
}

function ticks(min, max, count = 5) {
  const step = niceStep((max - min) / count);
  const out = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

// [min, max] of the values, widened when they are all equal.
function extent(values, withZero) {
  let min = Math.min(...values);
  let max = Math.max(...values);
  if (withZero) min = Math.min(0, min);
  if (min === max) {
    const pad = Math.abs(min) * 0.1 || 1;
    return [min - pad, max + pad];
  }
  return [min, max];
}

// Runs of consecutive points with a numeric y (a null y breaks the line).
function runs(points) {
  const out = [[]];
  for (const p of points) {
    if (Number.isFinite(p.y)) out[out.length - 1].push(p);
    else if (out[out.length - 1].length) out.push([]);
  }
  return out.filter(run => run.length);
}

function axes(xs, ys, scale, opts) {
  const g = s('g', {class: 'axes'});
  const [x0, x1] = [M.left, W - M.right];
  const [y0, y1] = [H - M.bottom, M.top];
  for (const v of ys) {
    const y = scale.y(v);
    g.append(s('line', {class: 'grid', x1: x0, x2: x1, y1: y, y2: y}),
      s('text', {class: 'tick', x: x0 - 6, y: y + 4, 'text-anchor': 'end'}, (opts.yFormat || tickFormat.format)(v)));
  }
  for (const v of xs) {
    const x = scale.x(v);
    g.append(s('line', {class: 'tick-mark', x1: x, x2: x, y1: y0, y2: y0 + 4}),
      s('text', {class: 'tick', x, y: y0 + 18, 'text-anchor': 'middle'}, (opts.xFormat || tickFormat.format)(v)));
  }
  g.append(s('line', {class: 'axis', x1: x0, x2: x1, y1: y0, y2: y0}),
    s('line', {class: 'axis', x1: x0, x2: x0, y1: y0, y2: y1}),
    s('text', {class: 'axis-label', x: (x0 + x1) / 2, y: H - 6, 'text-anchor': 'middle'}, opts.xLabel || ''),
    s('text', {class: 'axis-label', x: 14, y: (y0 + y1) / 2, 'text-anchor': 'middle',
      transform: `rotate(-90 14 ${(y0 + y1) / 2})`}, opts.yLabel || ''));
  return g;
}

function seriesGroup(series, index, scale) {
  const g = s('g', {class: `series series-${index % 8}`});
  for (const run of runs(series.points)) {
    const points = run.map(p => `${scale.x(p.x).toFixed(1)},${scale.y(p.y).toFixed(1)}`).join(' ');
    g.append(s('polyline', {class: 'line', points}));
  }
  if (series.pointClass) {
    for (const p of series.points.filter(q => Number.isFinite(q.y))) {
      g.append(s('circle', {class: series.pointClass, cx: scale.x(p.x).toFixed(1), cy: scale.y(p.y).toFixed(1), r: 3},
        s('title', null, `${series.name}: ${tickFormat.format(p.y)} at ${tickFormat.format(p.x)}`)));
    }
  }
  return g;
}

function legend(series) {
  return h('ul', {class: 'legend'}, series.map((item, i) =>
    h('li', null, h('span', {class: `swatch series-${i % 8}`, 'aria-hidden': 'true'}), item.name)));
}

// A line chart of `series` ([{name, points: [{x, y}], pointClass?}]) in a <figure> with a legend.
// opts: xLabel, yLabel, id (of the svg), xFormat / yFormat (tick labels), xTicks, yZero (start y at 0).
// Returns null when no series has a point.
export function lineChart(series, opts = {}) {
  const all = series.flatMap(item => item.points).filter(p => Number.isFinite(p.y) && Number.isFinite(p.x));
  if (!all.length) return null;
  // x spans every point, those without a y too: charts of one time window share one axis.
  const [xMin, xMax] = extent(series.flatMap(item => item.points.map(p => p.x)).filter(Number.isFinite), false);
  const yTicks = ticks(...extent(all.map(p => p.y), opts.yZero));
  const [yMin, yMax] = [Math.min(yTicks[0], ...all.map(p => p.y)), Math.max(yTicks.at(-1), ...all.map(p => p.y))];
  const scale = {
    x: v => M.left + ((v - xMin) / (xMax - xMin)) * (W - M.left - M.right),
    y: v => H - M.bottom - ((v - yMin) / (yMax - yMin)) * (H - M.top - M.bottom),
  };
  const label = `${opts.yLabel || 'value'} by ${opts.xLabel || 'x'}`;
  const svg = s('svg', {id: opts.id, class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': label},
    axes(opts.xTicks || ticks(xMin, xMax, 6), yTicks, scale, opts), series.map((item, i) => seriesGroup(item, i, scale)));
  return h('figure', {class: 'chart-figure'}, svg, legend(series));
}

// A small line of values, scaled to its own maximum.
export function sparkline(values, label) {
  const max = Math.max(1, ...values.filter(Number.isFinite));
  const step = values.length > 1 ? 100 / (values.length - 1) : 0;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(22 - ((v || 0) / max) * 20).toFixed(1)}`);
  return s('svg', {class: 'spark', viewBox: '0 0 100 24', preserveAspectRatio: 'none', role: 'img',
    'aria-label': label}, s('polyline', {points: points.join(' ')}));
}
