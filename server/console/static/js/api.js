// The admin API client. The admin key lives only in this module's memory: never in storage, cookies or URLs.

const NO_ANSWER = 'The gateway did not answer.';

let key = null;
let signedIn = false;
let onRevoked = () => {};

// A failed call: `status` 0 when the gateway did not answer; `signedOut` when a 401 ended the session.
export class ApiError extends Error {
  constructor(status, message, signedOut = false) {
    super(message);
    this.status = status;
    this.signedOut = signedOut;
  }

  // "409: Adapter 'x' …", or the bare message when there was no answer.
  get text() {
    return this.status ? `${this.status}: ${this.message}` : this.message;
  }
}

// `handler(message)` runs when the key is refused after sign-in (revoked, say).
export function whenRevoked(handler) {
  onRevoked = handler;
}

// The API's error message from a failed response, or the HTTP reason when the body is not the API's.
async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && typeof body.error.message === 'string') return body.error.message;
  } catch {
    // not JSON: fall through
  }
  return res.statusText || 'The request failed.';
}

// Calls the API: `json` is sent as a JSON body, `form` (FormData) as multipart. Resolves to the parsed
// body (null for 204); rejects with an ApiError.
export async function api(path, {method = 'GET', json, form} = {}) {
  if (key === null) throw new ApiError(401, 'Signed out.', true);
  const headers = {Authorization: `Bearer ${key}`};
  let body;
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  let res;
  try {
    res = await fetch(path, {method, headers, body, credentials: 'omit', cache: 'no-store'});
  } catch {
    throw new ApiError(0, NO_ANSWER);
  }
  if (res.ok) return res.status === 204 ? null : res.json().catch(() => null);
  const message = await errorMessage(res);
  if (res.status === 401 && signedIn) {
    signOut();
    onRevoked(message);
    throw new ApiError(401, message, true);
  }
  throw new ApiError(res.status, message);
}

// Every item of a paged list, following `has_more` / `last_id`; `until(page)` can stop it early.
export async function listAll(path, params = {}, until = () => false) {
  const items = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams(params);
    if (after !== null) query.set('after', after);
    const page = await api(`${path}?${query}`);
    items.push(...page.data);
    if (!page.has_more || !page.last_id || page.last_id === after || until(page)) return items;
    after = page.last_id;
  }
}

// Tries the key on the tenant list; keeps it only when the gateway takes it as an admin key.
export async function signIn(candidate) {
  key = candidate;
  try {
    await api('/admin/tenants?limit=1');
    signedIn = true;
  } catch (error) {
    signOut();
    throw error;
  }
}

export function signOut() {
  key = null;
  signedIn = false;
}

export const isSignedIn = () => signedIn;

// '/admin/tenants/a%2Fb/…' from path segments, each encoded.
export function adminPath(...segments) {
  return `/admin/${segments.map(part => encodeURIComponent(String(part))).join('/')}`;
}
