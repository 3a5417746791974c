// Hash routing. Each view renders into #view with a context whose timers end when the route changes.

import {clearError} from './ui.js';
import {fill} from './dom.js';

let routes = [];
let current = null;

// A view's context: `alive()` turns false on navigation; `every(ms, fn)` polls until then (or until fn
// resolves to false), never overlapping itself.
function makeContext(root) {
  const timers = new Set();
  let alive = true;
  const ctx = {
    root,
    alive: () => alive,
    every(ms, fn) {
      const schedule = () => {
        const timer = setTimeout(async () => {
          timers.delete(timer);
          if (!alive) return;
          const again = await fn();
          if (alive && again !== false) schedule();
        }, ms);
        timers.add(timer);
      };
      schedule();
    },
    dispose() {
      alive = false;
      timers.forEach(clearTimeout);
      timers.clear();
    },
  };
  return ctx;
}

// ['tenants', 'acme', 'jobs', 'ftjob-1'] from '#/tenants/acme/jobs/ftjob-1'; null when malformed.
function segments(hash) {
  if (!hash.startsWith('#/')) return null;
  try {
    return hash.slice(2).split('/').map(decodeURIComponent);
  } catch {
    return null;
  }
}

// '#/tenants/acme' from segments, each encoded.
export function hashFor(...parts) {
  return `#/${parts.map(part => encodeURIComponent(String(part))).join('/')}`;
}

// `table` is [{pattern: ['tenants', ':t'], nav: 'nav-tenants', view(ctx, params)}].
export function setRoutes(table) {
  routes = table;
}

function match(parts) {
  for (const route of routes) {
    if (route.pattern.length !== parts.length) continue;
    const isParam = (p, i) => p.startsWith(':') && parts[i] !== '';
    if (!route.pattern.every((p, i) => isParam(p, i) || p === parts[i])) continue;
    return {route, params: parts.filter((_, i) => route.pattern[i].startsWith(':'))};
  }
  return null;
}

function markNav(id) {
  for (const a of document.querySelectorAll('header nav a')) {
    if (a.id === id) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

// Ends the shown view: its timers stop and its content (a new key's secret, say) is removed.
export function stop() {
  if (current) current.dispose();
  current = null;
  fill(document.getElementById('view'));
}

// Renders the view for the current hash; an unknown one goes to the tenant list.
export function render() {
  const parts = segments(window.location.hash);
  const found = parts && match(parts);
  if (!found) {
    if (window.location.hash === '#/tenants') return; // no tenants route registered
    window.location.replace('#/tenants'); // fires hashchange, which renders
    return;
  }
  stop();
  clearError();
  markNav(found.route.nav);
  current = makeContext(document.getElementById('view'));
  found.route.view(current, ...found.params);
}
