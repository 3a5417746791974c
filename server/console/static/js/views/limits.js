// A tenant's limits: the number inputs (shared by the create and edit forms) and a compact description.

import {field, h} from '../dom.js';
import {fmtPlain} from '../format.js';

// [id suffix, API field, label]
const LIMITS = [
  ['rpm', 'requests_per_minute', 'Requests per minute'],
  ['tpm', 'tokens_per_minute', 'Tokens per minute'],
  ['concurrency', 'max_concurrent_requests', 'Concurrent requests'],
  ['max-tokens', 'max_tokens', 'Max tokens per request'],
];

// The four optional number inputs, ids `${prefix}-rpm` etc., prefilled from `limits`.
export function limitFields(prefix, limits = {}) {
  return LIMITS.map(([suffix, name, label]) => field(label, h('input', {
    id: `${prefix}-${suffix}`, name, type: 'number', min: 1, step: 1, inputmode: 'numeric',
    placeholder: 'no limit', value: limits[name] ?? null,
  })));
}

// {requests_per_minute: 60, …} from the filled inputs (an empty one means no limit: left out).
export function readLimits(form, prefix) {
  const limits = {};
  for (const [suffix, name] of LIMITS) {
    const text = form.querySelector(`#${prefix}-${suffix}`).value.trim();
    if (text !== '') limits[name] = Number(text);
  }
  return limits;
}

// "60 req/min · 10000 tok/min · 4 concurrent · max 512 tokens", or "none".
export function describeLimits(limits = {}) {
  const parts = [];
  const has = name => typeof limits[name] === 'number';
  if (has('requests_per_minute')) parts.push(`${fmtPlain(limits.requests_per_minute)} req/min`);
  if (has('tokens_per_minute')) parts.push(`${fmtPlain(limits.tokens_per_minute)} tok/min`);
  if (has('max_concurrent_requests')) parts.push(`${fmtPlain(limits.max_concurrent_requests)} concurrent`);
  if (has('max_tokens')) parts.push(`max ${fmtPlain(limits.max_tokens)} tokens`);
  return parts.length ? parts.join(' · ') : 'none';
}
