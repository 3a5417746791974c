// #/tenants/{t}/jobs/{id}: a fine-tuning job live: status, loss curve, events and evaluation.

import {adminPath, api, listAll} from '../api.js';
import {lineChart} from '../chart.js';
import {facts, fill, h, link} from '../dom.js';
import {fmtDate, fmtInt, isNumber, statusClass, toDate} from '../format.js';
import {reportTable} from '../report.js';
import {hashFor} from '../router.js';
import {actionButton, guard} from '../ui.js';

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const eventNumber = event => Number(String(event.id).replace(/^ftevent-/, '')) || 0;

// An event's figure: in its data, or in the data's `metrics` (where epoch checkpoints keep theirs).
function metric(event, key) {
  const data = event.data || {};
  if (isNumber(data[key])) return data[key];
  return data.metrics && isNumber(data.metrics[key]) ? data.metrics[key] : null;
}

// [{x: step, y}] from the events with a numeric step and `key`, by step.
function points(events, key) {
  return events.map(e => ({x: metric(e, 'step'), y: metric(e, key)}))
    .filter(p => p.x !== null && p.y !== null)
    .sort((a, b) => a.x - b.x);
}

// Training loss per step (or per epoch when there are no step points) and validation loss per epoch.
function lossSeries(events) {
  const perStep = points(events, 'loss');
  return [
    {name: 'training', points: perStep.length ? perStep : points(events, 'train_loss'), pointClass: 'train-point'},
    {name: 'validation', points: points(events, 'valid_loss'), pointClass: 'valid-point'},
  ];
}

function chart(events) {
  const figure = lineChart(lossSeries(events), {id: 'loss-chart', xLabel: 'step', yLabel: 'loss'});
  return figure || h('p', {id: 'loss-chart-empty', class: 'empty'}, 'No points yet.');
}

function eventItem(event) {
  const date = toDate(event.created_at);
  return h('li', {class: `event level-${String(event.level).replace(/[^a-z]/g, '')}`},
    h('time', {datetime: date ? date.toISOString() : null}, fmtDate(event.created_at)), ' ',
    h('span', {class: 'level'}, event.level), ' ',
    h('span', {class: 'message'}, event.message));
}

function fineTunedModel(t, model) {
  if (!model) return null;
  return link(hashFor('tenants', t, 'adapters', model.split('@')[0]), model);
}

function jobFacts(t, job) {
  return facts([
    ['Model', job.model],
    ['Suffix', job.suffix],
    ['Method', job.method ? job.method.type : null],
    ['Fine-tuned model', fineTunedModel(t, job.fine_tuned_model)],
    ['Trained tokens', isNumber(job.trained_tokens) ? fmtInt(job.trained_tokens) : null],
    ['Training file', job.training_file],
    ['Validation file', job.validation_file],
    ['Created', fmtDate(job.created_at)],
    ['Finished', job.finished_at ? fmtDate(job.finished_at) : null],
    ['Error', job.status === 'failed' && job.error ? h('span', {id: 'job-error'}, job.error.message) : null],
  ]);
}

function evaluation(job) {
  const report = job.result && job.result.evaluation;
  return report ? reportTable(report) : h('p', null, 'No evaluation.');
}

// The page's parts; `show(job, events, eventsChanged)` brings them up to date.
function layout(ctx, t, id, refresh) {
  const parts = {
    status: h('span', {id: 'job-status'}),
    facts: h('div'),
    chart: h('div', {class: 'chart-slot'}),
    evaluation: h('section', {id: 'job-evaluation', class: 'panel'}),
    events: h('ol', {id: 'job-events', class: 'events'}),
  };
  const cancel = actionButton(ctx, {id: 'job-cancel', class: 'danger'}, 'Cancel job', () => ({
    question: `Cancel job ${id}?`,
    run: () => api(adminPath('tenants', t, 'fine_tuning', 'jobs', id, 'cancel'), {method: 'POST'}),
    then: refresh,
  }));
  cancel.hidden = true;
  ctx.root.append(
    h('p', {class: 'crumbs'}, link(hashFor('tenants'), 'Tenants'), ' / ', link(hashFor('tenants', t), t)),
    h('h1', {id: 'job-title'}, id),
    h('p', {class: 'job-state'}, 'Status: ', parts.status, ' ', cancel),
    parts.facts,
    h('section', {class: 'panel'}, h('h2', null, 'Loss'), parts.chart),
    parts.evaluation,
    h('section', {class: 'panel'}, h('h2', null, 'Events'), parts.events));
  return (job, events, eventsChanged) => {
    parts.status.textContent = job.status;
    parts.status.className = statusClass(job.status);
    cancel.hidden = TERMINAL.has(job.status);
    fill(parts.facts, jobFacts(t, job));
    fill(parts.evaluation, h('h2', null, 'Evaluation'), evaluation(job));
    if (!eventsChanged) return;
    fill(parts.chart, chart(events));
    fill(parts.events, events.length ? events.map(eventItem) : h('li', {class: 'empty'}, 'No events yet.'));
  };
}

export function jobView(ctx, t, id) {
  document.title = `${id} · loraserve console`;
  const path = adminPath('tenants', t, 'fine_tuning', 'jobs', id);
  const seen = new Map();
  let job = null;
  // Adds events not seen yet; true when there were any.
  const add = list => {
    const unseen = list.filter(e => !seen.has(e.id));
    unseen.forEach(e => seen.set(e.id, e));
    return unseen.length > 0;
  };
  const newestFirst = () => [...seen.values()].sort((a, b) => eventNumber(b) - eventNumber(a));
  // Fetches the job and its events, newest first, page by page until a page reaches an event already seen
  // (all of them the first time). Resolves to whether it worked.
  const load = first => guard(ctx, async () => {
    const reachesSeen = page => page.data.some(e => seen.has(e.id));
    const [fresh, events] = await Promise.all([api(path), listAll(`${path}/events`, {limit: 100}, reachesSeen)]);
    if (!ctx.alive()) return false;
    job = fresh;
    const changed = add(events) || first;
    show(job, newestFirst(), changed);
    return true;
  });
  const show = layout(ctx, t, id, () => load(false));
  let finalRefresh = true;
  const poll = async () => {
    await load(false);
    if (!job || !TERMINAL.has(job.status)) return true;
    const again = finalRefresh;
    finalRefresh = false;
    return again;
  };
  load(true).then(() => {
    if (job && !TERMINAL.has(job.status)) ctx.every(2000, poll);
  });
}
