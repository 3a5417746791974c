// #/tenants: every tenant, and the form that creates one.

import {adminPath, api, listAll} from '../api.js';
import {field, h, link, setRows, submit, table} from '../dom.js';
import {fmtDate} from '../format.js';
import {hashFor} from '../router.js';
import {guard, onSubmit} from '../ui.js';
import {describeLimits, limitFields, readLimits} from './limits.js';

function tenantRow(tenant) {
  return h('tr', {'data-tenant': tenant.id},
    h('td', null, link(hashFor('tenants', tenant.id), tenant.id)),
    h('td', null, tenant.default_adapter || '(base model)'),
    h('td', null, describeLimits(tenant.limits)),
    h('td', null, fmtDate(tenant.created_at)));
}

function createForm(ctx, reload) {
  const form = h('form', {id: 'tenant-create-form', class: 'stacked'},
    field('Tenant id', h('input', {id: 'tenant-id', name: 'id', required: true, maxlength: 63, autocomplete: 'off',
      spellcheck: 'false'}), 'Lower-case letters, digits and single hyphens.'),
    h('div', {class: 'field-row'}, limitFields('tenant')),
    submit('Create tenant'));
  onSubmit(form, ctx, () => ({
    run: () => api('/admin/tenants', {method: 'POST', json: {
      id: form.querySelector('#tenant-id').value.trim(), limits: readLimits(form, 'tenant')}}),
    then: () => {
      form.reset();
      return reload();
    },
  }));
  return form;
}

export function tenantsView(ctx) {
  const wrap = table({id: 'tenants-table'}, ['Tenant', 'Default adapter', 'Limits', 'Created'], [], 'Loading…');
  const tableEl = wrap.querySelector('table');
  const reload = () => guard(ctx, async () => {
    const tenants = await listAll(adminPath('tenants'), {limit: 100});
    if (ctx.alive()) setRows(tableEl, tenants.map(tenantRow), 'No tenants yet.');
  });
  ctx.root.append(
    h('h1', null, 'Tenants'),
    wrap,
    h('section', {class: 'panel'}, h('h2', null, 'New tenant'), createForm(ctx, reload)));
  document.title = 'Tenants · loraserve console';
  reload();
}
