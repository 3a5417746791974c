// #/tenants/{t}/adapters/{a}: an adapter's versions, their evaluations, activation and rollback.

import {adminPath, api} from '../api.js';
import {facts, fill, h, link, table} from '../dom.js';
import {DASH, fmtDate, fmtLoss, fmtPercent, fmtSize} from '../format.js';
import {reportTable, figure} from '../report.js';
import {hashFor} from '../router.js';
import {actionButton, guard} from '../ui.js';

const HEADERS = ['Version', 'State', 'Actions', 'Rank · size · source', 'Golden: version', 'Golden: base',
  'Golden: few-shot', 'General loss: version', 'General loss: base', 'Promotion'];

const goldenText = entry => `${fmtPercent(entry.similarity)} · ${fmtLoss(entry.loss)}`;

function state(version) {
  if (version.active) return 'active';
  return version.awaiting_evaluation ? 'awaiting evaluation' : 'inactive';
}

// The evaluation cells: golden similarity · loss for the version, the base and few-shot; general loss.
function evaluationCells(report) {
  const golden = model => figure(report, 'golden', model, goldenText);
  const general = model => figure(report, 'general', model, entry => fmtLoss(entry.loss));
  return [
    h('td', {class: 'golden-adapter'}, golden('adapter')),
    h('td', {class: 'golden-base'}, golden('base')),
    h('td', {class: 'golden-few-shot'}, golden('few_shot')),
    h('td', {class: 'general-adapter'}, general('adapter')),
    h('td', {class: 'general-base'}, general('base')),
    h('td', {class: 'promotion'}, report && report.promotion ? report.promotion.reason : DASH),
  ];
}

// The row's buttons: activate (or roll back), evaluate, delete.
function actions(ctx, page, adapter, version) {
  const n = version.version;
  const base = adminPath('tenants', adapter.tenant, 'adapters', adapter.name);
  const note = h('span', {class: 'row-status', role: 'status'});
  const older = adapter.active_version !== null && n < adapter.active_version;
  const activate = actionButton(ctx, {class: 'activate'}, older ? `Roll back to v${n}` : 'Activate', () => ({
    run: () => api(`${base}/activate`, {method: 'POST', json: {version: n}}),
    then: page.reload,
  }));
  activate.hidden = version.active;
  activate.disabled = version.active;
  const evaluate = adapter.golden_set && actionButton(ctx, {class: 'evaluate'}, 'Evaluate', () => ({
    run: async () => {
      note.textContent = 'Evaluating…';
      try {
        return await api(`${base}/versions/${n}/evaluate`, {method: 'POST'});
      } finally {
        note.textContent = '';
      }
    },
    then: page.reload,
  }));
  const remove = actionButton(ctx, {class: 'delete-version danger'}, 'Delete', () => ({
    question: `Delete version ${n} of ${adapter.name}? Requests for ${adapter.name}@${n} are refused from then on.`,
    run: () => api(`${base}/versions/${n}`, {method: 'DELETE'}),
    then: adapter.versions.length === 1 ? page.leave : page.reload,
  }));
  return h('td', {class: 'version-actions'}, h('div', {class: 'row-actions'}, activate, evaluate, remove, note));
}

function versionRow(ctx, page, adapter, version) {
  return h('tr', {'data-version': version.version, class: version.active ? 'active' : null},
    h('td', null, `v${version.version}`),
    h('td', {class: 'state'}, state(version)),
    actions(ctx, page, adapter, version),
    h('td', {class: 'version-details'}, `r${version.rank} · ${fmtSize(version.size_bytes)} · ${version.source}`,
      h('div', {class: 'hint'}, fmtDate(version.created_at))),
    evaluationCells(version.evaluation));
}

function reports(versions) {
  const evaluated = versions.filter(v => v.evaluation);
  if (!evaluated.length) return h('p', null, 'No evaluation reports.');
  return evaluated.map(v => h('details', {class: 'report', 'data-version': v.version},
    h('summary', null, `v${v.version}: report of ${fmtDate(v.evaluation.created_at)}`), reportTable(v.evaluation)));
}

function policy(adapter) {
  const forgetting = adapter.max_forgetting === null || adapter.max_forgetting === undefined ? ''
    : ` (max forgetting ${adapter.max_forgetting})`;
  return `${adapter.promotion}${forgetting}`;
}

function render(ctx, page, body, adapter) {
  const versions = [...adapter.versions].sort((a, b) => b.version - a.version);
  fill(body,
    facts([
      ['Model clients call', h('code', null, adapter.model)],
      ['Active version', adapter.active_version === null ? 'none' : `v${adapter.active_version}`],
      ['Golden set', adapter.golden_set || 'none'],
      ['Promotion', policy(adapter)],
    ]),
    h('h2', null, 'Versions'),
    h('p', {class: 'hint'}, 'Golden cells: similarity · loss on the golden set. "—": no report.'),
    table({id: 'versions-table'}, HEADERS, versions.map(v => versionRow(ctx, page, adapter, v)), 'No versions.'),
    h('h2', null, 'Evaluation reports'),
    reports(versions));
}

export function adapterView(ctx, t, a) {
  document.title = `${t} / ${a} · loraserve console`;
  const tenantHash = hashFor('tenants', t);
  const body = h('div');
  const page = {
    leave: () => { window.location.hash = tenantHash; },
    reload: () => guard(ctx, async () => {
      const adapter = await api(adminPath('tenants', t, 'adapters', a));
      if (ctx.alive()) render(ctx, page, body, adapter);
    }),
  };
  const remove = actionButton(ctx, {id: 'adapter-delete', class: 'danger'}, 'Delete adapter', () => ({
    question: `Delete adapter ${a} and all its versions? Requests for it are refused from then on.`,
    run: () => api(adminPath('tenants', t, 'adapters', a), {method: 'DELETE'}),
    then: page.leave,
  }));
  ctx.root.append(h('p', {class: 'crumbs'}, link(hashFor('tenants'), 'Tenants'), ' / ', link(tenantHash, t)),
    h('h1', {id: 'adapter-title'}, `${t} / ${a}`), body,
    h('section', {class: 'panel danger-zone'}, h('h2', null, 'Delete'), remove));
  page.reload();
}
