// The keys section of a tenant's page: the list, revoking, and a new key's secret (shown once).

import {adminPath, api, listAll} from '../api.js';
import {fill, h, setRows, table} from '../dom.js';
import {fmtDate} from '../format.js';
import {actionButton, guard} from '../ui.js';

// The box with a new key's secret; it lives in the view, so navigating away removes it.
function secretBox(secret, close) {
  const copy = h('button', {type: 'button', class: 'copy'}, 'Copy');
  copy.addEventListener('click', () => {
    navigator.clipboard.writeText(secret).then(() => { copy.textContent = 'Copied'; }, () => {
      copy.textContent = 'Copy failed: select the key';
    });
  });
  const done = h('button', {type: 'button', id: 'new-key-dismiss'}, 'Done');
  done.addEventListener('click', close);
  return h('div', {id: 'new-key', class: 'notice', role: 'status'},
    h('p', null, 'Copy this key now: it is shown once and cannot be read back.'),
    h('p', null, h('code', {id: 'new-key-secret'}, secret)),
    h('div', {class: 'actions'}, copy, done));
}

function keyRow(ctx, t, key, reload) {
  const revoke = key.revoked_at ? null : actionButton(ctx, {class: 'revoke danger'}, 'Revoke', () => ({
    question: `Revoke key ${key.id}? Clients using it are refused at once.`,
    run: () => api(adminPath('tenants', t, 'keys', key.id), {method: 'DELETE'}),
    then: reload,
  }));
  return h('tr', {'data-key': key.id},
    h('td', null, h('code', null, key.id)),
    h('td', null, fmtDate(key.created_at)),
    h('td', {class: 'state'}, key.revoked_at ? `revoked ${fmtDate(key.revoked_at)}` : 'active'),
    h('td', null, revoke));
}

// The section element; it loads its list at once.
export function keysSection(ctx, t) {
  const wrap = table({id: 'keys-table'}, ['Key', 'Created', 'State', ''], [], 'Loading…');
  const tableEl = wrap.querySelector('table');
  const slot = h('div');
  const reload = () => guard(ctx, async () => {
    const keys = await listAll(adminPath('tenants', t, 'keys'), {limit: 1000});
    if (ctx.alive()) setRows(tableEl, keys.map(key => keyRow(ctx, t, key, reload)), 'No keys yet.');
  });
  const create = actionButton(ctx, {id: 'key-create'}, 'Create key', () => ({
    run: () => api(adminPath('tenants', t, 'keys'), {method: 'POST'}),
    then: made => {
      fill(slot, secretBox(made.key, () => fill(slot)));
      return reload();
    },
  }));
  reload();
  return h('section', {class: 'panel', 'aria-labelledby': 'keys-heading'},
    h('h2', {id: 'keys-heading'}, 'API keys'), wrap, h('div', {class: 'actions'}, create), slot);
}
