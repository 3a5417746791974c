// Entry point: sign-in and sign-out, and the routes of the console's views.

import {ApiError, isSignedIn, signIn, signOut, whenRevoked} from './api.js';
import {render, setRoutes, stop} from './router.js';
import {clearError} from './ui.js';
import {tenantsView} from './views/tenants.js';
import {tenantView} from './views/tenant.js';
import {adapterView} from './views/adapter.js';
import {jobView} from './views/job.js';
import {trafficView} from './views/traffic.js';

const $ = id => document.getElementById(id);

setRoutes([
  {pattern: ['tenants'], nav: 'nav-tenants', view: tenantsView},
  {pattern: ['tenants', ':t'], nav: 'nav-tenants', view: tenantView},
  {pattern: ['tenants', ':t', 'adapters', ':a'], nav: 'nav-tenants', view: adapterView},
  {pattern: ['tenants', ':t', 'jobs', ':id'], nav: 'nav-tenants', view: jobView},
  {pattern: ['traffic'], nav: 'nav-traffic', view: trafficView},
]);

const REFUSED = 'That key was not accepted.';
const NOT_ADMIN = 'That is not an admin key: the console takes the admin key.';

// Why a sign-in failed, in words.
function signInFailure(error) {
  if (!(error instanceof ApiError)) return 'Signing in failed.';
  if (error.status === 401) return `${REFUSED} ${error.message}`;
  if (error.status === 403) return `${NOT_ADMIN} ${error.message}`;
  return error.text;
}

function showSignin(message) {
  stop();
  clearError();
  $('app').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message || '';
  $('signin-key').focus();
}

function showApp() {
  $('signin').hidden = true;
  $('signin-error').textContent = '';
  $('app').hidden = false;
  render();
}

$('signin-form').addEventListener('submit', async event => {
  event.preventDefault();
  const input = $('signin-key');
  const button = event.currentTarget.querySelector('button[type=submit]');
  const candidate = input.value.trim();
  input.value = ''; // the key is kept in memory only, not in the field
  if (!candidate) {
    $('signin-error').textContent = 'Enter the admin key.';
    return;
  }
  button.disabled = true;
  try {
    await signIn(candidate);
    showApp();
  } catch (error) {
    showSignin(signInFailure(error));
  } finally {
    button.disabled = false;
  }
});

$('signout').addEventListener('click', () => {
  signOut();
  showSignin('');
});

// The key stopped working (revoked, say): back to the sign-in screen.
whenRevoked(message => showSignin(`${REFUSED} ${message}`));

window.addEventListener('hashchange', () => {
  if (isSignedIn()) render();
});

showSignin('');
