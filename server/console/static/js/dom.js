// DOM building without HTML parsing: every string becomes a text node, never markup.

const SVG_NS = 'http://www.w3.org/2000/svg';

// Appends children: strings and numbers as text nodes, arrays flattened, null/false skipped.
function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// Sets attributes; `on: {event: fn}` adds listeners. Inline styles and handlers are refused (CSP).
function setAttrs(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === 'on') {
      for (const [event, fn] of Object.entries(value)) el.addEventListener(event, fn);
    } else if (name === 'style' || /^on/i.test(name)) {
      throw new Error(`attribute ${name} is not allowed`);
    } else if (value === true) {
      el.setAttribute(name, '');
    } else if (value !== false && value !== null && value !== undefined) {
      el.setAttribute(name, String(value));
    }
  }
  return el;
}

// h('td', {class: 'status'}, job.status) → <td class="status">…</td>
export function h(tag, attrs, ...children) {
  return append(setAttrs(document.createElement(tag), attrs), children);
}

// The same for SVG elements.
export function s(tag, attrs, ...children) {
  return append(setAttrs(document.createElementNS(SVG_NS, tag), attrs), children);
}

// Replaces an element's content.
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// An in-page link; only hash routes are built here.
export function link(hash, ...children) {
  if (!hash.startsWith('#/')) throw new Error('only hash links');
  return h('a', {href: hash}, ...children);
}

// A table inside a horizontally scrolling wrapper; `rows` are <tr> elements.
export function table(attrs, headers, rows, empty) {
  const body = h('tbody');
  const el = h('table', attrs, h('thead', null, h('tr', null, headers.map(t => h('th', {scope: 'col'}, t)))), body);
  setRows(el, rows, empty);
  return h('div', {class: 'table-wrap'}, el);
}

// Replaces a table's body rows; `empty` is the text shown when there are none.
export function setRows(tableEl, rows, empty = 'None.') {
  const body = tableEl.tBodies[0];
  const width = tableEl.tHead ? tableEl.tHead.rows[0].cells.length : 1;
  fill(body, rows.length ? rows : h('tr', {class: 'empty'}, h('td', {colspan: width}, empty)));
}

// A labelled input stacked in a form.
export function field(label, input, hint) {
  return h('div', {class: 'field'}, h('label', {for: input.id}, label), input, hint && h('small', null, hint));
}

// A submit button.
export function submit(label, attrs) {
  return h('button', {type: 'submit', ...attrs}, label);
}

// A <dl> of [term, value] pairs; null values are left out.
export function facts(pairs, attrs) {
  return h('dl', {class: 'facts', ...attrs}, pairs.filter(([, v]) => v !== null && v !== undefined)
    .map(([term, value]) => [h('dt', null, term), h('dd', null, value)]));
}
