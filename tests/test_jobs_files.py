"""The Files API (jobs/files.py) driven by the real `openai` client against a uvicorn server on
127.0.0.1: OpenAI's FileObject shapes, the audit on upload (a `tunesmith data inspect`
subprocess on a tiny Llama's tokenizer), and the security rules: size limit while streaming,
content checks naming the line, ids only (never a client's name) in paths, the API key."""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from families import build_family_model
from serve_fake import running
from tunesmith.jobs import files as jf
from tunesmith.jobs.context import JobsContext, JobsLimits
from tunesmith.jobs.layout import Layout
from tunesmith.jobs.store import JobStore
from tunesmith.jobs.upload import FORM_OVERHEAD, display_name

KEY = "sk-test-files"
LIMIT = 16 << 10  # max_upload_bytes of the test server
BASE = "tiny-llama"
ID_RE = re.compile(r"^file-[0-9a-f]{24}$")


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def jsonl(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


CHAT_ROWS = [chat("Order 3 red mugs to Oslo.", "Done: 3 red mugs."),
             chat("Mail me at jane.doe@example.com", "Noted."),
             chat("What is 2+2?", "4"),
             chat("Order 3 red mugs to Oslo.", "Done: 3 red mugs."),  # line 4: exact duplicate of line 1
             {"body": "no known format"},                            # line 5: invalid
             "",                                                      # line 6: blank, skipped
             chat("Thanks!", "You're welcome.")]


def files_app(ctx: JobsContext):
    from fastapi import FastAPI

    from tunesmith.serve.app import _install_error_handlers
    from tunesmith.serve.checks import Guard

    app = FastAPI()
    _install_error_handlers(app)
    jf.routes(app, ctx)
    app.add_middleware(Guard, api_key=KEY, max_body_bytes=1 << 20, body_limits=jf.body_limits(ctx))
    return app


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    base = build_family_model("llama", root / "base", seed=0)
    layout = Layout.create(root / "jobs")
    ctx = JobsContext(JobStore(layout.db), layout, base_name=BASE, base_spec=str(base),
                      limits=JobsLimits(max_upload_bytes=LIMIT, max_files=100), api_key=KEY)
    yield ctx
    if ctx.auditor is not None:
        ctx.auditor.close()
    ctx.store.close()


@pytest.fixture(scope="module")
def url(ctx):
    with running(files_app(ctx)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat_file(ctx, client):
    """The chat upload, audited (shared: each audit is a subprocess loading a tokenizer)."""
    data = jsonl(CHAT_ROWS)
    f = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert f.status == "uploaded"  # answered before the audit ends
    assert jf.wait_for_audits(ctx, [f.id], timeout_s=180)
    return f, data


def stored(ctx) -> set[str]:
    """What the uploads left under files/ (audit reports, written meanwhile by audits, aside)."""
    return {p.name for p in (ctx.layout.root / "files").iterdir() if ".audit.json" not in p.name}


def test_upload_is_a_file_object_and_its_audit_becomes_status_details(ctx, client, chat_file):
    f, data = chat_file
    assert ID_RE.match(f.id) and f.object == "file" and f.purpose == "fine-tune"
    assert f.bytes == len(data) and f.filename == "train.jsonl" and abs(f.created_at - time.time()) < 300
    got = client.files.retrieve(f.id)
    assert got.status == "processed", got.status_details
    # 5 valid rows (the duplicate counts, the blank line does not), line 5 invalid, 1 duplicate, 1 email
    details = got.status_details
    assert details.startswith("5 valid rows (5 messages)"), details
    assert "1 invalid rows" in details and "line 5: cannot tell the format" in details, details
    assert "1 exact duplicates" in details and "PII: 1 email" in details, details
    assert client.files.content(f.id).content == data  # byte for byte
    assert ctx.layout.file_path(f.id).read_bytes() == data


def test_audit_route_returns_the_inspect_report_without_server_paths(ctx, client, chat_file, url):
    f, _ = chat_file
    r = httpx.get(f"{url}/v1/files/{f.id}/audit", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    report = r.json()
    assert report == ctx.store.file(f.id)["audit"]
    assert report["records"]["total"] == 5 and report["records"]["by_format"] == {"messages": 5}
    assert report["invalid"][0]["where"] == "line 5"
    assert report["exact_duplicates"]["rows"] == 1 and report["exact_duplicates"]["examples"][0]["locations"] == [
        "line 1", "line 4"]
    assert report["pii"]["email"] == 1 and report["source"] == f.id and report["model"] == BASE
    text = json.dumps(report)
    assert str(ctx.layout.root.parent) not in text and ctx.base_spec not in text


def test_dpo_file_in_openai_preference_format_is_processed(ctx, client):
    row = {"input": {"messages": [{"role": "user", "content": "Say hi"}]},
           "preferred_output": [{"role": "assistant", "content": "Hi!"}],
           "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}
    f = client.files.create(file=("dpo.jsonl", jsonl([row, {**row, "input": {"messages": [
        {"role": "user", "content": "Say bye"}]}}])), purpose="fine-tune")
    assert jf.wait_for_audits(ctx, [f.id], timeout_s=180)
    got = client.files.retrieve(f.id)
    assert got.status == "processed" and got.status_details.startswith("2 valid rows (2 openai_preference)")
    assert ctx.store.file(f.id)["audit"]["preference"]["rows"] == 2


def test_a_file_without_one_usable_row_is_status_error(ctx, client, url):
    f = client.files.create(file=("bad.jsonl", jsonl([{"body": 1}, {"messages": [{"role": "user", "content": "x"}]}])),
                            purpose="fine-tune")
    assert jf.wait_for_audits(ctx, [f.id], timeout_s=180)
    got = client.files.retrieve(f.id)
    assert got.status == "error"
    assert "no usable records" in got.status_details and "line 1: cannot tell the format" in got.status_details
    assert str(ctx.layout.root) not in got.status_details and "/dev/null" not in got.status_details
    r = httpx.get(f"{url}/v1/files/{f.id}/audit", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "audit_failed"


@pytest.mark.parametrize("body, line, why", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "not UTF-8"),
    (b'{"text": "ok"}\n\n{"text": oops}\n', 3, "not valid JSON"),
    (b'[1, 2]\n', 1, "must be a JSON object, got list"),
    (b"\x1f\x8b\x08\x00gzipped", 1, "gzip-compressed"),
])
def test_content_that_is_not_utf8_json_lines_is_refused_naming_the_line(ctx, client, body, line, why):
    before = stored(ctx)
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", body), purpose="fine-tune")
    assert e.value.status_code == 400 and e.value.body["param"] == "file"
    assert f"line {line}: " in e.value.message and why in e.value.message, e.value.message
    assert stored(ctx) == before


@pytest.mark.parametrize("purpose, body, param, match", [
    ("assistants", b'{"text": "x"}\n', "purpose", "must be 'fine-tune'"),
    ("fine-tune", b"\n \n", "file", "holds no records"),
])
def test_bad_purpose_or_empty_file_is_a_400_naming_the_field(ctx, client, purpose, body, param, match):
    before = stored(ctx)
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", body), purpose=purpose)
    assert e.value.body["param"] == param and match in e.value.message
    assert stored(ctx) == before


def test_upload_over_the_limit_is_413_and_leaves_nothing(ctx, client, url):
    before, rows = stored(ctx), len(ctx.store.files())
    # Under the Guard's body limit (the form's overhead allowance): cut off while streaming.
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * (LIMIT + 1)), purpose="fine-tune")
    assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"
    # Far over it, declared: refused by the Guard before the body is read.
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("huge.jsonl", b"x" * (LIMIT + 2 * FORM_OVERHEAD)), purpose="fine-tune")
    assert e.value.status_code == 413

    # No Content-Length at all (chunked): counted while streaming.
    def body():
        yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n\r\n'
        for _ in range(LIMIT // 1024 + 2):
            yield b"y" * 1024
        yield b"\r\n--B--\r\n"

    r = httpx.post(f"{url}/v1/files", content=body(), headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413, r.text
    assert stored(ctx) == before and len(ctx.store.files()) == rows


def test_a_body_that_is_not_a_whole_multipart_form_is_refused(ctx, url):
    before, auth = stored(ctx), {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/files", content=b'{"text": "x"}\n', headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
    cut = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
           b'--B\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n\r\n{"text": "x"}\n')
    r = httpx.post(f"{url}/v1/files", content=cut, headers={**auth, "Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/files", headers=auth, data={"purpose": "fine-tune", "extra": "1"},
                   files={"file": ("a.jsonl", b'{"text": "x"}\n')})
    assert r.status_code == 400 and r.json()["error"]["param"] == "extra"
    assert stored(ctx) == before


def test_files_left_unaudited_by_a_stopped_server_are_audited_on_start(ctx, chat_file):
    """A server that died mid-audit leaves the file `uploaded`; the next one's routes() audits it
    again, so a job waiting on the file is not stuck."""
    from fastapi import FastAPI

    f, _ = chat_file
    first = ctx.store.file(f.id)
    ctx.store.update_file(f.id, status="uploaded", status_details=None, audit=None)
    assert f.id in jf.audit_pending(ctx)
    restarted = JobsContext(JobStore(ctx.layout.db), ctx.layout, base_name=BASE, base_spec=ctx.base_spec,
                            limits=ctx.limits, api_key=KEY)
    try:
        jf.routes(FastAPI(), restarted)
        assert jf.wait_for_audits(restarted, [f.id], timeout_s=180)
        again = restarted.store.file(f.id)
        assert (again["status"], again["status_details"], again["audit"]) == (
            "processed", first["status_details"], first["audit"])
    finally:
        restarted.auditor.close()
        restarted.store.close()


def test_client_filename_is_text_only_and_bytes_land_under_files_by_id(ctx, client):
    root = ctx.layout.root
    f = client.files.create(file=("../../etc/passwd", b'{"text": "hello"}\n'), purpose="fine-tune")
    assert f.filename == "../../etc/passwd"
    assert ctx.layout.file_path(f.id) == root / "files" / f"{f.id}.jsonl" and ctx.layout.file_path(f.id).is_file()
    assert not (root / "files" / "../../etc/passwd").exists() and not (root / "etc").exists()
    client.files.delete(f.id)  # also stops its audit


def test_display_name_drops_control_and_bidi_characters():
    assert display_name("a\nb\x00c\u202e.jsonl") == "abc.jsonl"
    assert display_name("\r\n") == "upload.jsonl" and len(display_name("x" * 1000)) == 255


def test_unknown_and_ill_formed_ids_are_404_on_every_route(client, url):
    auth = {"Authorization": f"Bearer {KEY}"}
    for ident in ("file-" + "0" * 24, "file-xyz", "ftjob-" + "0" * 24, "..", "file-" + "0" * 24 + ".audit.json"):
        for method, suffix in (("GET", ""), ("GET", "/content"), ("GET", "/audit"), ("DELETE", "")):
            r = httpx.request(method, f"{url}/v1/files/{ident}{suffix}", headers=auth)
            assert r.status_code == 404, (method, ident, suffix, r.text)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-" + "1" * 24)


def test_every_route_needs_the_api_key(ctx, url, chat_file):
    f, _ = chat_file
    rows = len(ctx.store.files())
    calls = [("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", f"/v1/files/{f.id}"),
             ("GET", f"/v1/files/{f.id}/content"), ("GET", f"/v1/files/{f.id}/audit"), ("DELETE", f"/v1/files/{f.id}")]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in calls:
            r = httpx.request(method, url + path, headers=headers,
                              files={"file": ("a.jsonl", b'{"text": "x"}\n')} if method == "POST" else None,
                              data={"purpose": "fine-tune"} if method == "POST" else None)
            assert r.status_code == 401, (method, path, headers)
    assert len(ctx.store.files()) == rows and ctx.store.file(f.id) is not None


def test_list_pages_in_both_orders_and_filters_by_purpose(ctx, client, chat_file, url):
    ids = [r["id"] for r in ctx.store.files(newest_first=False)]
    assert len(ids) >= 2
    # the openai client follows `after` page by page
    assert [f.id for f in client.files.list(limit=1, order="asc")] == ids
    assert [f.id for f in client.files.list(order="desc")] == ids[::-1]
    page = client.files.list(limit=1, order="asc")
    assert page.has_more and page.data[0].id == ids[0]
    assert [f.id for f in client.files.list(purpose="fine-tune", order="asc")] == ids
    assert list(client.files.list(purpose="batch")) == []
    auth = {"Authorization": f"Bearer {KEY}"}
    for query, param in (("limit=0", "limit"), ("limit=10001", "limit"), ("limit=x", "limit"),
                         ("order=up", "order"), ("after=../x", "after")):
        r = httpx.get(f"{url}/v1/files?{query}", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, query


def test_delete_is_refused_while_an_unfinished_job_uses_the_file(ctx, client):
    f = client.files.create(file=("d.jsonl", b'{"text": "to delete"}\n'), purpose="fine-tune")
    ctx.store.add_job(id="ftjob-" + "a" * 24, model=BASE, status="running", method={"type": "supervised"},
                      hyperparameters={}, training_file=f.id, seed=0)
    with pytest.raises(openai.ConflictError) as e:
        client.files.delete(f.id)
    assert "ftjob-" + "a" * 24 in e.value.message and e.value.body["code"] == "file_in_use"
    assert ctx.layout.file_path(f.id).is_file()
    assert jf.wait_for_audits(ctx, [f.id], timeout_s=180)
    ctx.store.set_status("ftjob-" + "a" * 24, "succeeded")
    gone = client.files.delete(f.id)
    assert (gone.id, gone.object, gone.deleted) == (f.id, "file", True)
    assert not ctx.layout.file_path(f.id).exists() and not ctx.layout.audit_path(f.id).exists()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    assert f.id not in [x.id for x in client.files.list()]


def test_max_files_refuses_more_uploads(ctx, client):
    old = ctx.limits.max_files
    ctx.limits.max_files = len(ctx.store.files())
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("m.jsonl", b'{"text": "x"}\n'), purpose="fine-tune")
        assert e.value.body["code"] == "too_many_files"
    finally:
        ctx.limits.max_files = old


def test_summary_reads_the_report():
    report = {"records": {"total": 3, "by_format": {"messages": 2, "alpaca": 1}},
              "invalid": [{"where": f"line {n}", "error": f"line {n}: bad"} for n in range(2, 9)],
              "exact_duplicates": {"rows": 2}, "near_duplicates": {"rows": 1},
              "pii": {"email": 0, "phone": 3}, "tokens": {"truncated_rows": 1, "max_length": 512}}
    assert jf.summary(report) == (
        "3 valid rows (2 messages, 1 alpaca). 7 invalid rows, skipped in training: line 2: bad; line 3: bad; "
        "line 4: bad; line 5: bad; line 6: bad; and 2 more. 2 exact duplicates, 1 near duplicates. PII: 3 phone. "
        "1 rows longer than 512 tokens.")
