// The fine-tuning jobs section of a tenant's page, refreshed every 5 s.

import {adminPath, listAll} from '../api.js';
import {h, link, setRows, table} from '../dom.js';
import {DASH, fmtDate, statusClass} from '../format.js';
import {hashFor} from '../router.js';
import {guard} from '../ui.js';

function jobRow(t, job) {
  return h('tr', {'data-job': job.id},
    h('td', null, link(hashFor('tenants', t, 'jobs', job.id), job.id)),
    h('td', {class: statusClass(job.status)}, job.status),
    h('td', null, job.method && job.method.type ? job.method.type : DASH),
    h('td', null, job.suffix || DASH),
    h('td', null, fmtDate(job.created_at)),
    h('td', null, job.fine_tuned_model || DASH));
}

export function jobsSection(ctx, t) {
  const wrap = table({id: 'jobs-table'}, ['Job', 'Status', 'Method', 'Suffix', 'Created', 'Fine-tuned model'], [],
    'Loading…');
  const tableEl = wrap.querySelector('table');
  const load = () => guard(ctx, async () => {
    const jobs = await listAll(adminPath('tenants', t, 'fine_tuning', 'jobs'), {limit: 100});
    if (ctx.alive()) setRows(tableEl, jobs.map(job => jobRow(t, job)), 'No fine-tuning jobs.');
  });
  load().then(() => ctx.every(5000, load));
  return h('section', {class: 'panel', 'aria-labelledby': 'jobs-heading'},
    h('h2', {id: 'jobs-heading'}, 'Fine-tuning jobs'), wrap);
}
