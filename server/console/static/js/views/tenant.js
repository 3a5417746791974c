// #/tenants/{t}: a tenant's limits, default adapter, keys, adapters and fine-tuning jobs.

import {adminPath, api} from '../api.js';
import {facts, field, fill, h, link, submit} from '../dom.js';
import {fmtDate} from '../format.js';
import {hashFor} from '../router.js';
import {actionButton, guard, onSubmit} from '../ui.js';
import {adaptersSection} from './adapters.js';
import {jobsSection} from './jobs.js';
import {keysSection} from './keys.js';
import {limitFields, readLimits} from './limits.js';

const patch = (t, json) => api(adminPath('tenants', t), {method: 'PATCH', json});

function limitsForm(ctx, tenant) {
  const saved = h('span', {id: 'limits-saved', class: 'saved', role: 'status'});
  const form = h('form', {id: 'limits-form', class: 'stacked'},
    h('div', {class: 'field-row'}, limitFields('limits', tenant.limits)),
    h('p', {class: 'hint'}, 'An empty field means no limit of that kind.'),
    h('div', {class: 'actions'}, submit('Save limits'), saved));
  onSubmit(form, ctx, () => {
    saved.textContent = '';
    return {run: () => patch(tenant.id, {limits: readLimits(form, 'limits')}), then: () => {
      saved.textContent = 'Saved.';
    }};
  });
  return h('section', {class: 'panel'}, h('h2', null, 'Limits'), form);
}

// The default adapter form; `setAdapters(names)` fills its options once the adapters are loaded.
function defaultAdapterForm(ctx, tenant) {
  let current = tenant.default_adapter;
  const select = h('select', {id: 'default-adapter', name: 'default_adapter'});
  const saved = h('span', {id: 'default-adapter-saved', class: 'saved', role: 'status'});
  const setAdapters = names => {
    const all = current && !names.includes(current) ? [...names, current] : names;
    fill(select, h('option', {value: ''}, '(base model)'),
      all.map(name => h('option', {value: name, selected: name === current}, name)));
  };
  const form = h('form', {id: 'default-adapter-form', class: 'stacked'},
    field('Adapter used when a request names no model', select),
    h('div', {class: 'actions'}, submit('Save'), saved));
  onSubmit(form, ctx, () => {
    saved.textContent = '';
    return {run: () => patch(tenant.id, {default_adapter: select.value || null}), then: updated => {
      current = updated.default_adapter;
      saved.textContent = 'Saved.';
    }};
  });
  setAdapters([]);
  return {el: h('section', {class: 'panel'}, h('h2', null, 'Default adapter'), form), setAdapters};
}

function deleteButton(ctx, t) {
  return actionButton(ctx, {id: 'tenant-delete', class: 'danger'}, 'Delete tenant', () => ({
    question: `Delete tenant ${t}? Its keys, adapters and jobs are deleted with it.`,
    run: () => api(adminPath('tenants', t), {method: 'DELETE'}),
    then: () => { window.location.hash = '#/tenants'; },
  }));
}

function page(ctx, tenant) {
  const t = tenant.id;
  const defaults = defaultAdapterForm(ctx, tenant);
  const adapters = adaptersSection(ctx, t, list => defaults.setAdapters(list.map(a => a.name)));
  ctx.root.append(
    facts([['Created', fmtDate(tenant.created_at)]]),
    limitsForm(ctx, tenant),
    defaults.el,
    keysSection(ctx, t),
    adapters.el,
    jobsSection(ctx, t),
    h('section', {class: 'panel danger-zone'}, h('h2', null, 'Delete'),
      h('p', null, 'Deleting the tenant cancels its jobs and removes its keys, adapters and files.'),
      deleteButton(ctx, t)));
  adapters.reload();
}

export function tenantView(ctx, t) {
  document.title = `${t} · loraserve console`;
  ctx.root.append(h('p', {class: 'crumbs'}, link(hashFor('tenants'), '← Tenants')),
    h('h1', {id: 'tenant-title'}, t));
  guard(ctx, async () => {
    const tenant = await api(adminPath('tenants', t));
    if (ctx.alive()) page(ctx, tenant);
  });
}
