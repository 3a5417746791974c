"""Hostile input across the OpenAI, files, fine-tuning and admin APIs: each answer is a 4xx in OpenAI's
error shape, never a 5xx, a stack trace, a key or a path, and the engine still answers afterwards."""

from __future__ import annotations

import httpx

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def cases(gateway):
    beta_file = gateway.client(gateway.tenants["beta"].key).files.create(
        file=("b.jsonl", b'{"messages": []}\n'), purpose="fine-tune").id
    huge = 10**30
    yield "malformed-json", "alpha", "POST", CHAT, {"content": b'{"model": "support", "messages": [', "json": None}
    yield "json-array", "alpha", "POST", CHAT, {"content": b"[1, 2, 3]"}
    yield "json-null", "alpha", "POST", CHAT, {"content": b"null"}
    yield "not-utf8", "alpha", "POST", CHAT, {"content": b"\xff\xfe\x00{"}
    yield "model-wrong-type", "alpha", "POST", CHAT, {"json": {"model": ["x"], "messages": MSG}}
    yield "messages-wrong-type", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": "hi"}}
    yield "unknown-role", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": [{"role": "root"}]}}
    yield "huge-max-tokens", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": MSG, "max_tokens": huge}}
    yield "negative-max-tokens", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": MSG,
                                                                  "max_tokens": -5}}
    yield "huge-n", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": MSG, "n": 10000}}
    yield "top-logprobs", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": MSG, "logprobs": True,
                                                           "top_logprobs": 10000}}
    yield "prompt-logprobs", "alpha", "POST", "/v1/completions", {"json": {"model": "support", "prompt": "x",
                                                                           "prompt_logprobs": 20}}
    yield "too-many-stops", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": MSG,
                                                             "stop": [str(i) for i in range(100)]}}
    yield "chat-template", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": MSG,
                                                            "chat_template": "{{ raise('x') }}"}}
    yield "chat-template-kwargs", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": MSG,
                                                                   "chat_template_kwargs": {"a": 1}}}
    yield "guided-backend", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": MSG,
                                                             "guided_decoding_backend": "outlines"}}
    yield "nan-temperature", "alpha", "POST", CHAT, {"content": b'{"model": "support", "messages": [{"role": '
                                                                b'"user", "content": "x"}], "temperature": NaN}'}
    yield "nul-in-model", "alpha", "POST", CHAT, {"json": {"model": "sup\x00port", "messages": MSG}}
    yield "unicode-model", "alpha", "POST", CHAT, {"json": {"model": "süppört", "messages": MSG}}
    yield "traversal-model", "alpha", "POST", CHAT, {"json": {"model": "../../beta/legal", "messages": MSG}}
    yield "traversal-version", "alpha", "POST", CHAT, {"json": {"model": "support@../../1", "messages": MSG}}
    yield "huge-version", "alpha", "POST", CHAT, {"json": {"model": f"support@{huge}", "messages": MSG}}
    yield "superscript-version", "alpha", "POST", CHAT, {"json": {"model": "x@\u00b2", "messages": MSG}}  # was a 500
    # Message structure reaches the engine typed (tests/test_request_shapes.py has the full set).
    yield "content-wrong-type", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": [
        {"role": "user", "content": {"$ref": "#"}}]}}
    yield "image-part", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}]}]}}
    yield "custom-tool", "alpha", "POST", CHAT, {"json": {"model": "support", "messages": MSG, "tools": [
        {"type": "custom", "custom": {"name": "shell"}}]}}
    yield "token-out-of-vocab", "alpha", "POST", "/v1/completions", {"json": {"model": "support",
                                                                             "prompt": [2**31 - 1]}}
    yield "prompt-flood", "alpha", "POST", "/v1/completions", {"json": {"model": "support", "prompt": ["x"] * 1025}}
    yield "other-tenants-adapter", "alpha", "POST", CHAT, {"json": {"model": "legal", "messages": MSG}}
    yield "engine-name", "alpha", "POST", CHAT, {"json": {"model": "beta--legal--v1", "messages": MSG}}
    yield "oversized-body", "alpha", "POST", CHAT, {"content": b'{"model": "' + b"a" * (9 << 20) + b'"}'}
    yield "no-key", None, "POST", CHAT, {"json": {"model": "support", "messages": MSG}}
    yield "unicode-tenant-header", "alpha", "GET", "/v1/models", {"headers": {"X-Tenant-ID": "b\u00e9ta".encode()}}
    yield "file-wrong-purpose", "alpha", "POST", "/v1/files", {"files": {"file": ("x.jsonl", b"{}")},
                                                               "data": {"purpose": "assistants"}}
    yield "file-no-file", "alpha", "POST", "/v1/files", {"data": {"purpose": "fine-tune"}}
    yield "file-traversal-id", "alpha", "GET", "/v1/files/..%2F..%2Fetc%2Fpasswd", {}
    yield "other-tenants-file", "alpha", "GET", f"/v1/files/{beta_file}", {}
    yield "job-other-tenants-file", "alpha", "POST", "/v1/fine_tuning/jobs", {"json": {
        "model": gateway.settings.served_model_name, "training_file": beta_file}}
    yield "job-bad-suffix", "alpha", "POST", "/v1/fine_tuning/jobs", {"json": {
        "model": gateway.settings.served_model_name, "training_file": beta_file, "suffix": "../x"}}
    yield "job-negative-epochs", "alpha", "POST", "/v1/fine_tuning/jobs", {"json": {
        "model": gateway.settings.served_model_name, "training_file": "file-x", "hyperparameters": {"n_epochs": -1}}}
    yield "job-huge-rank", "alpha", "POST", "/v1/fine_tuning/jobs", {"json": {
        "model": gateway.settings.served_model_name, "training_file": "file-x", "lora_rank": huge}}
    yield "job-unknown-model", "alpha", "POST", "/v1/fine_tuning/jobs", {"json": {
        "model": "gpt-4", "training_file": "file-x"}}
    yield "job-missing", "alpha", "GET", "/v1/fine_tuning/jobs/ftjob-nope", {}
    yield "events-bad-limit", "alpha", "GET", "/v1/fine_tuning/jobs", {"params": {"limit": -3}}
    yield "admin-with-tenant-key", "alpha", "GET", "/admin/tenants", {}
    yield "admin-nul-tenant", "admin", "POST", "/admin/tenants", {"json": {"id": "a\x00b"}}
    yield "admin-traversal-tenant", "admin", "GET", "/admin/tenants/..%2Fregistry", {}
    yield "admin-huge-limit", "admin", "POST", "/admin/tenants", {"json": {"id": "nu", "limits": {
        "requests_per_minute": huge}}}
    yield "admin-negative-limit", "admin", "PATCH", "/admin/tenants/alpha", {"json": {"limits": {
        "max_tokens": -1}}}
    yield "admin-unknown-field", "admin", "PATCH", "/admin/tenants/alpha", {"json": {"owner": "me"}}
    yield "admin-activate-wrong-type", "admin", "POST", "/admin/tenants/alpha/adapters/support/activate", {
        "json": {"version": "latest"}}
    yield "admin-activate-other-tenant", "admin", "POST", "/admin/tenants/alpha/adapters/legal/activate", {
        "json": {"version": 1}}
    yield "admin-delete-huge-version", "admin", "DELETE", f"/admin/tenants/alpha/adapters/support/versions/{huge}", {}
    beta_key_id = gateway.tenants["beta"].key.split("-")[1]
    yield "admin-revoke-other-tenants-key", "admin", "DELETE", f"/admin/tenants/alpha/keys/{beta_key_id}", {}
    yield "admin-audit-bad-limit", "admin", "GET", "/admin/audit", {"params": {"limit": 10**9}}


def test_hostile_input_gets_clean_4xx(gateway):
    keys = {"alpha": gateway.tenants["alpha"].key, "admin": gateway.settings.admin_key.get_secret_value()}
    seen = 0
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        for name, who, method, path, kwargs in cases(gateway):
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            headers = {**kwargs.pop("headers", {})}
            if who:
                headers["Authorization"] = f"Bearer {keys[who]}"
            if "content" in kwargs:
                headers.setdefault("Content-Type", "application/json")
            response = client.request(method, path, headers=headers, **kwargs)
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], name
            # Keys, traces, paths, and alpha's own engine-side names ("alpha--support--v1") stay inside.
            for secret in (*keys.values(), "Traceback", str(gateway.settings.data_dir), "/work/", "alpha--"):
                assert secret not in response.text, (name, secret)
            seen += 1
    assert seen >= 40
    # Nothing of that hurt the engine or other tenants.
    beta = gateway.client(gateway.tenants["beta"].key)
    assert beta.chat.completions.create(model="legal", messages=MSG, max_tokens=3).choices[0].message.content
    assert gateway.admin("GET", "/tenants/alpha").json()["limits"]["max_tokens"] is None  # the bad PATCH did nothing
