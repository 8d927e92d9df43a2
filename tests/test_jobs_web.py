"""The dashboard's /ui routes and login (jobs/web/) on a bare app with the serve Guard, a real
JobStore and a fake runner: no model, no training. The browser drives the real server in
tests/test_jobs_browser.py."""
from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from tunesmith.config import Config  # noqa: E402
from tunesmith.jobs import spec, web  # noqa: E402
from tunesmith.jobs.context import JobsContext  # noqa: E402
from tunesmith.jobs.layout import Layout, new_id  # noqa: E402
from tunesmith.jobs.store import JobStore  # noqa: E402
from tunesmith.jobs.web import auth as a  # noqa: E402
from tunesmith.jobs.web.schema import form_schema  # noqa: E402
from tunesmith.serve.app import _install_error_handlers  # noqa: E402
from tunesmith.serve.checks import Guard  # noqa: E402

KEY = "s3cret-key"


class FakeRunner:
    """jobs.runner's submit_task: records the task; the test plays the subprocess."""

    def __init__(self, ctx):
        self.ctx, self.calls = ctx, []

    def submit_task(self, job_id, kind, argv, out_dir, task_id=None):
        self.calls.append((job_id, kind, argv, out_dir))
        assert task_id == out_dir.name
        return self.ctx.store.add_task(id=task_id, job_id=job_id, kind=kind,
                                       args={"argv": argv, "out_dir": str(out_dir)}, status="queued")


def make_app(tmp_path, api_key=None):
    layout = Layout.create(tmp_path / "jobs")
    ctx = JobsContext(store=JobStore(layout.db), layout=layout, base_name="tiny", base_spec="/models/tiny",
                      api_key=api_key)
    ctx.runner = FakeRunner(ctx)
    app = FastAPI()
    _install_error_handlers(app)

    @app.get("/v1/ping")  # stands in for the /v1 routes behind the same Guard
    async def ping():
        return {"ok": True}

    @app.post("/v1/ping")
    async def ping_post():
        return {"ok": True}

    web.routes(app, ctx)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=1 << 20, **web.guard_options(ctx))
    return app, ctx


def add_job(ctx, status="succeeded", validation=True):
    job_id, train = new_id("ftjob"), new_id("file")
    valid = new_id("file") if validation else None
    for f in filter(None, (train, valid)):
        ctx.layout.file_path(f).write_text('{"messages": []}\n')
    ctx.layout.job_dir(job_id).mkdir(parents=True)
    ctx.store.add_job(id=job_id, model="tiny", status=status, method={"type": "supervised"}, hyperparameters={},
                      training_file=train, validation_file=valid, seed=0)
    return job_id


@pytest.fixture()
def client(tmp_path):
    app, ctx = make_app(tmp_path)
    with TestClient(app) as c:
        c.ctx = ctx
        yield c


CSRF = {"X-CSRF-Token": "x"}


def test_page_static_and_csp(client):
    r = client.get("/")
    assert r.status_code == 200 and 'src="/ui/static/app.js"' in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "'unsafe-inline'" not in r.headers["content-security-policy"]  # the page runs only app.js
    assert client.get("/ui/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/static/style.css").status_code == 200
    assert 'src="/ui/static/job.js"' in r.text and client.get("/ui/static/job.js").status_code == 200
    assert client.get("/ui/static/..%2Fauth.py").status_code == 404
    assert client.get("/ui/static/auth.py").status_code == 404
    assert client.get("/favicon.ico").status_code == 204


def test_scripts_never_set_html_from_data():
    text = web.static_text("app.js") + web.static_text("job.js")
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML(", "document.write", "eval(", "new Function"):
        assert sink not in text, sink


def test_schema_derives_from_config_minus_forbidden(client):
    s = client.get("/ui/api/schema").json()
    keys = {f["key"]: f for f in s["config"]}
    assert s["base_model"] == "tiny" and s["methods"] == ["supervised", "dpo"]
    assert [h["key"] for h in s["hyperparameters"]] == ["n_epochs", "batch_size", "learning_rate_multiplier", "beta"]
    # every leaf of Config appears unless spec forbids it; nothing forbidden leaks into the form
    assert keys["method.r"]["help"] == Config.model_fields["method"].default_factory().model_fields["r"].description
    assert keys["method.r"]["kind"] == "int" and keys["method.r"]["default"] == 16
    assert "lora" in keys["method.name"]["allowed"] and keys["method.name"]["allowed"] == list(
        keys["method.name"]["allowed"])
    assert keys["train.schedule"]["allowed"] == ["cosine", "linear", "constant"]
    assert keys["train.distributed.deepspeed.zero_stage"]["kind"] == "int"
    assert keys["train.gradient_checkpointing"]["kind"] == "bool"
    assert keys["train.lr"]["kind"] == "float" and keys["data.template"]["nullable"]
    assert keys["method.target_modules"]["kind"] == "list" and keys["data.columns"]["kind"] == "dict"
    for key in keys:
        assert not any(key == f or key.startswith(f + ".") for f in spec.FORBIDDEN), key
    for forbidden in ("model.name", "data.train", "run.name", "prepare.seed", "eval.tasks",
                      "train.distributed.deepspeed.config", "model.trust_remote_code"):
        assert forbidden not in keys
    assert "q8_0" in s["export"]["gguf_quants"] and s["export"]["formats"][:2] == ["merged", "gguf"]
    # each key the form offers, set to its default, is accepted by the server's own validation
    cfg = spec._validated({"model": {"name": "m"}, "data": {"train": "t.jsonl"}},
                          {f["key"]: f["default"] for f in form_schema("tiny")["config"]})
    assert cfg.method.r == 16


def test_log_tail(client):
    job_id = add_job(client.ctx, status="running")
    assert client.get(f"/ui/api/jobs/{job_id}/log").json() == {"object": "list", "data": [], "exists": False}
    client.ctx.layout.log_path(job_id).write_text("".join(f"line {i}\n" for i in range(1000)))
    assert client.get(f"/ui/api/jobs/{job_id}/log?tail=3").json()["data"] == ["line 997", "line 998", "line 999"]
    assert client.get(f"/ui/api/jobs/{job_id}/log?tail=-1").status_code == 400
    assert client.get(f"/ui/api/jobs/{job_id}/log?tail=99999").status_code == 400
    r = client.get("/ui/api/jobs/ftjob-../log")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get(f"/ui/api/jobs/{new_id('ftjob')}/log").status_code == 404


def test_stream_replays_then_ends_when_terminal(client):
    ctx = client.ctx
    job_id = add_job(ctx, status="running")
    ctx.store.add_event(job_id, "started")
    ctx.store.add_event(job_id, "step 1", type="metrics", data={"step": 1, "total_steps": 2, "train_loss": 2.5,
                                                               "valid_loss": None, "learning_rate": 1e-4})
    ctx.store.set_status(job_id, "succeeded", "done")
    with client.stream("GET", f"/ui/api/jobs/{job_id}/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    blocks = [b for b in text.split("\n\n") if b.strip()]
    datas = [json.loads(b.split("data: ", 1)[1]) for b in blocks if b.startswith("id:")]
    assert [d["message"] for d in datas] == ["started", "step 1", "done"]  # oldest first
    assert datas[1]["type"] == "metrics" and datas[1]["data"]["train_loss"] == 2.5
    assert blocks[-1].startswith("event: end") and '"succeeded"' in blocks[-1]
    # a reconnect (EventSource's Last-Event-ID) gets only what came after
    with client.stream("GET", f"/ui/api/jobs/{job_id}/stream", headers={"Last-Event-ID": str(datas[1]["seq"])}) as r:
        again = "".join(r.iter_text())
    assert '"done"' in again and '"started"' not in again


def test_stream_follows_a_live_job(client):
    import threading

    ctx = client.ctx
    job_id = add_job(ctx, status="running")

    def trainer():  # the runner writing events while the stream is open
        for step in (1, 2, 3):
            time.sleep(0.3)
            ctx.store.add_event(job_id, f"step {step}", type="metrics", data={"step": step, "train_loss": 1.0 / step})
        ctx.store.set_status(job_id, "cancelled", "cancelled")

    t = threading.Thread(target=trainer)
    t.start()
    with client.stream("GET", f"/ui/api/jobs/{job_id}/stream") as r:
        text = "".join(r.iter_text())
    t.join()
    assert [f"step {i}" in text for i in (1, 2, 3)] == [True] * 3 and text.rstrip().endswith('{"status": "cancelled"}')


def test_export_compare_tasks_and_downloads(client):
    ctx = client.ctx
    running = add_job(ctx, status="running")
    r = client.post(f"/ui/api/jobs/{running}/export", json={"format": "merged"}, headers=CSRF)
    assert r.status_code == 409 and "succeeded" in r.json()["error"]["message"]
    job_id = add_job(ctx)
    assert client.post(f"/ui/api/jobs/{job_id}/export", json={"format": "merged"}).status_code == 403  # no header
    bad = client.post(f"/ui/api/jobs/{job_id}/export", json={"format": "gguf", "quant": "q2_k"}, headers=CSRF)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "quant"
    bad = client.post(f"/ui/api/jobs/{job_id}/export", json={"format": "../../x"}, headers=CSRF)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"

    r = client.post(f"/ui/api/jobs/{job_id}/export", json={"format": "gguf", "quant": "q8_0,f16"}, headers=CSRF)
    assert r.status_code == 200, r.text
    (_, kind, argv, out_dir), = ctx.runner.calls
    run_dir = str(ctx.layout.run_dir(job_id))
    assert kind == "export" and argv[:2] == ["export", run_dir]
    assert argv[argv.index("--format") + 1] == "gguf" and argv[argv.index("--quant") + 1] == "q8_0,f16"
    assert argv[argv.index("--out") + 1] == str(out_dir) and out_dir.parent == ctx.layout.job_dir(job_id) / "tasks"

    r = client.post(f"/ui/api/jobs/{job_id}/compare", json={}, headers=CSRF)
    (_, kind, cargv, cout) = ctx.runner.calls[1]
    valid = ctx.layout.file_path(ctx.store.job(job_id)["validation_file"])
    assert cargv == ["compare", run_dir, "--task", f"validation=perplexity:{valid}", "--out", str(cout)]
    no_valid = add_job(ctx, validation=False)
    client.post(f"/ui/api/jobs/{no_valid}/compare", json={}, headers=CSRF)
    train = ctx.layout.file_path(ctx.store.job(no_valid)["training_file"])
    assert ctx.runner.calls[2][2][3] == f"training=perplexity:{train}"

    # the runner finishes them: files appear in the listing and download; nothing else does
    out_dir.mkdir(parents=True)
    (out_dir / "model-q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    (out_dir / "Modelfile").write_text("FROM ./model-q8_0.gguf\n")
    (out_dir / ".staging").mkdir()
    (out_dir / ".staging" / "x").write_text("partial")
    (ctx.layout.job_dir(job_id) / "secret.txt").write_text("not yours")
    export_id = out_dir.name
    tasks = client.get(f"/ui/api/jobs/{job_id}/tasks").json()["data"]
    assert [t["status"] for t in tasks] == ["queued", "queued"] and tasks[0]["files"] == []
    ctx.store.update_task(export_id, status="succeeded")
    tasks = client.get(f"/ui/api/jobs/{job_id}/tasks").json()["data"]
    assert [f["name"] for f in tasks[0]["files"]] == ["Modelfile", "model-q8_0.gguf"]
    got = client.get(tasks[0]["files"][1]["url"])
    assert got.status_code == 200 and got.content == b"GGUF" + b"\0" * 10
    assert "attachment" in got.headers["content-disposition"]
    base = f"/ui/api/jobs/{job_id}/tasks/{export_id}/files/"
    for name in ("../secret.txt", "..%2Fsecret.txt", ".staging/x", "missing", "%2Fetc%2Fpasswd"):
        assert client.get(base + name).status_code == 404, name
    assert client.get(f"/ui/api/jobs/{no_valid}/tasks/{export_id}/files/Modelfile").status_code == 404  # other job

    # compare: 404 until one succeeded; then its JSON and its HTML (under a strict CSP)
    assert client.get(f"/ui/api/jobs/{job_id}/compare").status_code == 404
    assert client.get(f"/ui/jobs/{job_id}/report").status_code == 404
    cout.mkdir(parents=True)
    (cout / "compare.json").write_text(json.dumps({"base": "b", "tuned": "t", "tasks": [], "forgetting": []}))
    (cout / "compare.html").write_text("<html><body>report</body></html>")
    ctx.store.update_task(cout.name, status="succeeded")
    assert client.get(f"/ui/api/jobs/{job_id}/compare").json()["tuned"] == "t"
    rep = client.get(f"/ui/jobs/{job_id}/report")
    assert rep.text.endswith("report</body></html>") and "script-src" not in rep.headers["content-security-policy"]
    assert rep.headers["content-security-policy"].startswith("default-src 'none'")


def test_no_runner_is_503(client):
    client.ctx.runner = None
    job_id = add_job(client.ctx)
    r = client.post(f"/ui/api/jobs/{job_id}/compare", json={}, headers=CSRF)
    assert r.status_code == 503


# ---------------------------------------------------------------- login, session, CSRF

@pytest.fixture()
def keyed(tmp_path):
    app, ctx = make_app(tmp_path, api_key=KEY)
    with TestClient(app) as c:
        c.ctx = ctx
        yield c


def test_login_flow_cookies_and_csrf(keyed):
    c = keyed
    r = c.get("/")
    assert r.status_code == 200 and 'action="/ui/login"' in r.text and "app.js" not in r.text
    assert c.get("/ui/static/app.js").status_code == 200  # assets are open
    assert c.get("/favicon.ico").status_code == 204
    assert c.get("/ui/api/schema").status_code == 401
    assert c.get("/v1/ping").status_code == 401

    bad = c.post("/ui/login", data={"key": "wrong"}, follow_redirects=False)
    assert bad.status_code == 401 and "not this server" in bad.text and a.SESSION_COOKIE not in bad.cookies
    r = c.post("/ui/login", data={"key": KEY}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookies = r.headers.get_list("set-cookie")
    session = next(h for h in cookies if h.startswith(a.SESSION_COOKIE + "="))
    csrf_cookie = next(h for h in cookies if h.startswith(a.CSRF_COOKIE + "="))
    assert "HttpOnly" in session and "SameSite=strict" in session.replace("Strict", "strict")
    assert "HttpOnly" not in csrf_cookie and "SameSite=strict" in csrf_cookie.replace("Strict", "strict")
    assert KEY not in " ".join(cookies)  # the cookie never holds the key

    assert 'src="/ui/static/app.js"' in c.get("/").text
    assert c.get("/ui/api/schema").status_code == 200
    assert c.get("/v1/ping").status_code == 200  # the session opens the API for the page too
    csrf = c.cookies[a.CSRF_COOKIE]
    assert c.post("/v1/ping").status_code == 401  # a changing request without the CSRF header
    assert c.post("/v1/ping", headers={"X-CSRF-Token": "forged"}).status_code == 401
    assert c.post("/v1/ping", headers={"X-CSRF-Token": csrf}).status_code == 200
    # a bearer key still works alone; a wrong bearer is not rescued by the cookie
    assert c.post("/v1/ping", headers={"Authorization": "Bearer wrong", "X-CSRF-Token": csrf}).status_code == 401

    r = c.post("/ui/logout", follow_redirects=False)
    assert r.status_code == 303
    assert c.get("/ui/api/schema").status_code == 401


def test_session_values():
    auth = a.Auth(KEY, ttl_s=100)
    session, csrf = auth.new_session(now=1000)
    nonce = auth.session_nonce(session, now=1050)
    assert nonce and auth.csrf_ok(nonce, csrf) and not auth.csrf_ok(nonce, csrf[:-1] + ("1" if csrf[-1] == "0" else "0"))
    assert auth.session_nonce(session, now=1101) is None  # expired
    assert a.Auth("other-key").session_nonce(session, now=1050) is None  # the key changed
    issued, n, mac = session.split(".")
    assert auth.session_nonce(f"{int(issued) + 1}.{n}.{mac}", now=1050) is None  # tampered
    assert auth.session_nonce("garbage", now=1050) is None and auth.session_nonce(None) is None
    session, csrf = a.Auth(KEY).new_session()
    headers = {b"cookie": f"{a.SESSION_COOKIE}={session}".encode()}
    assert not a.Auth(KEY).session_check({"method": "GET"}, {b"cookie": b"bad;;=="})
    assert a.Auth(KEY).session_check({"method": "GET"}, headers)
    assert not a.Auth(KEY).session_check({"method": "DELETE"}, headers)
    assert a.Auth(KEY).session_check({"method": "DELETE"}, {**headers, b"x-csrf-token": csrf.encode()})


def test_a_cross_site_page_cannot_post_even_without_a_key(client):
    """A form or multipart POST from another site is a 'simple' request that no preflight stops:
    the Guard refuses writes whose Origin is not this server (API clients send no Origin)."""
    files = {"file": ("t.jsonl", b'{"messages": []}\n')}
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9"):
        r = client.post("/v1/ping", headers={"Origin": origin}, files=files)
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", origin
    assert client.post("/v1/ping", headers={"Origin": "http://testserver"}).status_code == 200  # same origin
    assert client.post("/v1/ping").status_code == 200                                       # no Origin: a client
    assert client.get("/v1/ping", headers={"Origin": "http://evil.example"}).status_code == 200
