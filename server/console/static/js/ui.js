// Shared view plumbing: the error banner, and running API actions with confirm, error display and reload.

import {ApiError} from './api.js';
import {h} from './dom.js';

const banner = () => document.getElementById('error');

export function clearError() {
  const el = banner();
  el.textContent = '';
  el.hidden = true;
}

// Shows a failure in the banner; a 401 that signed out is shown on the sign-in screen instead.
export function showError(error) {
  if (error instanceof ApiError && error.signedOut) return;
  const el = banner();
  el.textContent = error instanceof ApiError ? error.text : 'Something went wrong in the console.';
  el.hidden = false;
  if (!(error instanceof ApiError)) console.error(error); // a bug here, not the API's answer
}

// Runs `fn` for a view; errors go to the banner while the view is still shown. Resolves to fn's value or
// undefined on failure.
export async function guard(ctx, fn) {
  try {
    return await fn();
  } catch (error) {
    if (ctx.alive()) showError(error);
    return undefined;
  }
}

// An action: optional confirm, the call, then (on success, view still shown) clear the banner and `then`.
// Resolves to true when the action succeeded.
export async function act(ctx, {question, run, then}) {
  if (question && !window.confirm(question)) return false;
  return guard(ctx, async () => {
    const result = await run();
    if (!ctx.alive()) return false;
    clearError();
    if (then) await then(result);
    return true;
  }).then(done => done === true);
}

// Handles a form's submit with `act`, the submit button disabled while it runs.
export function onSubmit(form, ctx, action) {
  form.addEventListener('submit', async event => {
    event.preventDefault();
    const buttons = form.querySelectorAll('button[type=submit]');
    buttons.forEach(b => { b.disabled = true; });
    try {
      await act(ctx, action());
    } finally {
      buttons.forEach(b => { b.disabled = false; });
    }
  });
}

// A button that runs an action when clicked, disabled meanwhile. `action(button)` returns act's options.
export function actionButton(ctx, attrs, label, action) {
  const button = h('button', {type: 'button', ...attrs}, label);
  button.addEventListener('click', async () => {
    button.disabled = true;
    try {
      await act(ctx, action(button));
    } finally {
      if (button.isConnected) button.disabled = false;
    }
  });
  return button;
}
