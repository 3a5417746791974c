// The adapters section of a tenant's page: the list and the upload form.

import {adminPath, api, listAll} from '../api.js';
import {field, h, link, setRows, submit, table} from '../dom.js';
import {DASH, fmtInt, fmtSize} from '../format.js';
import {hashFor} from '../router.js';
import {guard, onSubmit} from '../ui.js';

const UPLOADING = 'Uploading… (the version is validated, loaded and evaluated before it serves)';

// The version with the highest number, or undefined.
const newest = adapter => adapter.versions.reduce((a, b) => (!a || b.version > a.version ? b : a), undefined);

function adapterRow(t, adapter) {
  const latest = newest(adapter);
  return h('tr', {'data-adapter': adapter.name},
    h('td', null, link(hashFor('tenants', t, 'adapters', adapter.name), adapter.name)),
    h('td', {class: 'active-version'}, adapter.active_version === null ? 'none' : `v${adapter.active_version}`),
    h('td', null, fmtInt(adapter.versions.length)),
    h('td', null, latest ? fmtSize(latest.size_bytes) : DASH),
    h('td', null, adapter.promotion));
}

// The multipart body: the name, then each chosen file under `files` and/or the archive under `archive`.
function uploadBody(form) {
  const body = new FormData();
  body.append('name', form.querySelector('#upload-name').value.trim());
  for (const file of form.querySelector('#upload-files').files) body.append('files', file, file.name);
  const archive = form.querySelector('#upload-archive').files[0];
  if (archive) body.append('archive', archive, archive.name);
  return body;
}

// "Published x v3, active." or, when its promotion policy kept it back, why.
function publishedText(adapter) {
  const latest = newest(adapter);
  if (!latest) return `Published ${adapter.name}.`;
  const promotion = latest.evaluation && latest.evaluation.promotion;
  const state = latest.active ? 'active' : `not active${promotion ? `: ${promotion.reason}` : ''}`;
  return `Published ${adapter.name} v${latest.version}, ${state}.`;
}

function uploadForm(ctx, t, reload) {
  const status = h('p', {id: 'upload-status', role: 'status'});
  const form = h('form', {id: 'upload-form', class: 'stacked'},
    field('Adapter name', h('input', {id: 'upload-name', name: 'name', required: true, maxlength: 63,
      autocomplete: 'off', spellcheck: 'false'})),
    field('Files', h('input', {id: 'upload-files', name: 'files', type: 'file', multiple: true}),
      'adapter_config.json and adapter_model.safetensors'),
    field('Or an archive', h('input', {id: 'upload-archive', name: 'archive', type: 'file',
      accept: '.tar.gz,.tgz,.zip'}), 'A .tar.gz or .zip holding both files'),
    submit('Upload'), status);
  onSubmit(form, ctx, () => ({
    run: async () => {
      status.textContent = UPLOADING;
      try {
        return await api(adminPath('tenants', t, 'adapters'), {method: 'POST', form: uploadBody(form)});
      } catch (error) {
        status.textContent = '';
        throw error;
      }
    },
    then: adapter => {
      status.textContent = publishedText(adapter);
      form.reset();
      return reload();
    },
  }));
  return form;
}

// The section element and a reload function; `onLoad(adapters)` runs after each load.
export function adaptersSection(ctx, t, onLoad) {
  const wrap = table({id: 'adapters-table'}, ['Adapter', 'Active', 'Versions', 'Newest size', 'Promotion'], [],
    'Loading…');
  const tableEl = wrap.querySelector('table');
  const reload = () => guard(ctx, async () => {
    const adapters = await listAll(adminPath('tenants', t, 'adapters'), {limit: 1000});
    if (!ctx.alive()) return;
    setRows(tableEl, adapters.map(adapter => adapterRow(t, adapter)), 'No adapters yet.');
    onLoad(adapters);
  });
  const el = h('section', {class: 'panel', 'aria-labelledby': 'adapters-heading'},
    h('h2', {id: 'adapters-heading'}, 'Adapters'), wrap,
    h('h3', null, 'Upload a version'), uploadForm(ctx, t, reload));
  return {el, reload};
}
