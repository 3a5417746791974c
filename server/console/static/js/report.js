// An evaluation report (`adapter.evaluation`) as a table, for the adapter and job pages.

import {facts, h, table} from './dom.js';
import {DASH, fmtDate, fmtDecimal, fmtInt, fmtLoss, fmtPercent} from './format.js';

export const MODELS = ['adapter', 'replaces', 'base', 'few_shot'];
const MODEL_NAMES = {adapter: 'this version', replaces: 'version it replaces', base: 'base model',
  few_shot: 'base, few-shot'};
const SETS = {golden: 'golden', general: 'general'};

// One model's entry of one set: the figures, or its error across the row.
function entryRow(set, model, entry) {
  const head = [h('td', null, set), h('td', null, MODEL_NAMES[model])];
  if (entry.error) {
    return h('tr', {class: 'error-row'}, head, h('td', {colspan: 6}, `error: ${entry.error}`));
  }
  return h('tr', null, head,
    h('td', null, entry.version === undefined || entry.version === null ? DASH : `v${entry.version}`),
    h('td', null, fmtInt(entry.examples)),
    h('td', null, fmtLoss(entry.loss)),
    h('td', null, fmtLoss(entry.perplexity)),
    h('td', null, fmtPercent(entry.exact_match)),
    h('td', null, fmtPercent(entry.similarity)));
}

function promotionText(promotion) {
  return `${promotion.promoted ? 'promoted' : 'not promoted'} (${promotion.policy}): ${promotion.reason}`;
}

// The whole report: its summary, then one row per set and model.
export function reportTable(report) {
  const rows = [];
  for (const [key, set] of Object.entries(SETS)) {
    for (const model of MODELS) {
      const entry = report[key] && report[key][model];
      if (entry) rows.push(entryRow(set, model, entry));
    }
  }
  return h('div', {class: 'report'},
    facts([
      ['Examples', fmtInt(report.examples)],
      ['Took', report.seconds === undefined ? null : `${fmtDecimal(report.seconds)} s`],
      ['Evaluated', fmtDate(report.created_at)],
      ['Promotion', report.promotion ? promotionText(report.promotion) : null],
    ]),
    table({class: 'report-table'},
      ['Set', 'Model', 'Version', 'Examples', 'Loss', 'Perplexity', 'Exact match', 'Similarity'], rows,
      'The report has no figures.'));
}

// An entry's figure (`pick(entry)`), or a dash; an entry that failed reads "error".
export function figure(report, set, model, pick) {
  const entry = report && report[set] && report[set][model];
  if (!entry) return DASH;
  return entry.error ? 'error' : pick(entry);
}
