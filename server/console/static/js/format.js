// Number, size and date formatting (Intl, the browser's locale). Missing values show as a dash.

export const DASH = '—';

const integer = new Intl.NumberFormat(undefined, {maximumFractionDigits: 0});
const plain = new Intl.NumberFormat(undefined, {maximumFractionDigits: 0, useGrouping: false});
const oneDecimal = new Intl.NumberFormat(undefined, {maximumFractionDigits: 1});
const threeDecimals = new Intl.NumberFormat(undefined, {minimumFractionDigits: 3, maximumFractionDigits: 3});
const percent = new Intl.NumberFormat(undefined, {style: 'percent', minimumFractionDigits: 1, maximumFractionDigits: 1});

export const isNumber = v => typeof v === 'number' && Number.isFinite(v);

export const fmtInt = v => (isNumber(v) ? integer.format(v) : DASH);
export const fmtPlain = v => (isNumber(v) ? plain.format(v) : DASH);
export const fmtDecimal = v => (isNumber(v) ? oneDecimal.format(v) : DASH);
export const fmtLoss = v => (isNumber(v) ? threeDecimals.format(v) : DASH);
export const fmtPercent = v => (isNumber(v) ? percent.format(v) : DASH);
export const fmtMs = seconds => (isNumber(seconds) ? `${integer.format(seconds * 1000)} ms` : DASH);

// Bytes in B, KB, MB or GB (powers of 1024).
export function fmtSize(bytes) {
  if (!isNumber(bytes)) return DASH;
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? oneDecimal.format(value) : integer.format(value)} ${units[unit]}`;
}

// A Date from epoch seconds or an ISO string (one without a zone is read as UTC, as the API writes UTC).
export function toDate(value) {
  if (isNumber(value)) return new Date(value * 1000);
  if (typeof value !== 'string' || !value) return null;
  const zoned = /(?:[zZ]|[+-]\d\d:?\d\d)$/.test(value) || !/^\d{4}-\d\d-\d\dT/.test(value);
  const date = new Date(zoned ? value : `${value}Z`);
  return Number.isNaN(date.getTime()) ? null : date;
}

export function fmtDate(value) {
  const date = toDate(value);
  return date ? date.toLocaleString() : DASH;
}

export function fmtTime(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString(undefined, {hour: '2-digit', minute: '2-digit'});
}

// A class name for a status word from the API ("status-running"); anything unexpected is dropped.
export const statusClass = status => `status status-${String(status).replace(/[^a-z_]/g, '')}`;
