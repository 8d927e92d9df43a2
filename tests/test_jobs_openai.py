"""The jobs API driven by the official `openai` client against a real `tunesmith serve --jobs`:
upload, create (hyperparameters, seed, suffix, validation file, the tunesmith extension), list,
retrieve, events, checkpoints, cancel, errors; then the tuned model answers under its
fine_tuned_model name, exactly as the run directory's adapter does when loaded on its own."""
from __future__ import annotations

import io
import json

import httpx
import openai
import pytest

from conftest import write_jsonl
from jobs_server import KEY, Server, wait_for

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Deliver to Lyon: 3 scarves"}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tunesmith.demo.orders import make_splits

    root = tmp_path_factory.mktemp("jobs-data")
    splits = make_splits(5, {"train": 16, "validation": 4})
    return {k: write_jsonl(root / f"{k}.jsonl", v) for k, v in splits.items()}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs-openai")
    with Server(tiny_model_dir, root / "jobs") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def upload(client, path) -> str:
    f = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    wait_for(lambda: client.files.retrieve(f.id).status != "uploaded", 120, what=f"the audit of {f.id}")
    assert client.files.retrieve(f.id).status == "processed", client.files.retrieve(f.id).status_details
    return f.id


def finished(client, job_id: str, timeout: float = 400):
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in
                    ("succeeded", "failed", "cancelled") and j, timeout, 1, f"job {job_id} to finish")


@pytest.fixture(scope="module")
def job(client, data, server):
    train, valid = upload(client, data["train"]), upload(client, data["validation"])
    created = client.fine_tuning.jobs.create(
        model=server.model.name, training_file=train, validation_file=valid, suffix="orders", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4,
                                                                        "learning_rate_multiplier": 100}}},
        extra_body={"tunesmith": {"method": {"r": 4}, "train.eval_every": 2}})
    assert created.status in ("validating_files", "queued", "running")
    return {"created": created, "done": finished(client, created.id), "train": train, "valid": valid}


def test_a_job_runs_to_success_with_openai_shapes(job, server):
    created, done = job["created"], job["done"]
    assert done.status == "succeeded", done.error
    assert done.object == "fine_tuning.job" and done.id.startswith("ftjob-")
    assert done.fine_tuned_model == f"ft:{server.model.name}:orders:{done.id.removeprefix('ftjob-')}"
    assert done.training_file == job["train"] and done.validation_file == job["valid"]
    assert done.seed == 3 and done.user_provided_suffix == "orders"
    hp = done.method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (2, 4, 100)
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at
    config = (server.jobs / "jobs" / done.id / "config.yaml").read_text()
    assert "lr: 0.02" in config and "r: 4" in config and "seed: 3" in config  # 100 x the default 2e-4


def test_events_hold_the_metrics_of_every_step_and_validation(job, client):
    done = job["done"]
    events = list(client.fine_tuning.jobs.list_events(done.id, limit=100))
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)  # newest first
    metrics = [e for e in events if e.type == "metrics"]
    steps = sorted({e.data["step"] for e in metrics})
    assert steps == list(range(1, 9))  # 16 rows x 2 epochs / 4 per step
    assert any("valid_loss" in e.data for e in metrics)
    assert any("training loss" in e.message for e in metrics)
    messages = [e.message for e in events if e.type == "message"]
    assert any("succeeded" in m.lower() or "completed" in m.lower() for m in messages), messages
    page = client.fine_tuning.jobs.list_events(done.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    older = client.fine_tuning.jobs.list_events(done.id, limit=2, after=page.data[-1].id)
    assert older.data[0].id != page.data[-1].id and older.data[0].created_at <= page.data[-1].created_at


def test_checkpoints_list_steps_and_losses(job, client):
    done = job["done"]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(done.id).data
    assert checkpoints, "save_every is set for jobs, so checkpoints exist"
    assert all(c.fine_tuning_job_id == done.id and c.step_number > 0 for c in checkpoints)
    assert [c.step_number for c in checkpoints] == sorted((c.step_number for c in checkpoints), reverse=True)
    assert all(c.metrics.train_loss is not None for c in checkpoints)


def test_the_tuned_model_is_served_as_its_run_adapter_answers(job, client, server):
    from tunesmith.generation import generate, load_for_inference

    done = job["done"]
    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model=done.fine_tuned_model, messages=MSGS, max_tokens=12,
                                           temperature=0)
    assert reply.model == done.fine_tuned_model
    run = server.jobs / "jobs" / done.id / "runs" / "run"
    im = load_for_inference(run)
    expected = generate(im, [MSGS], max_new_tokens=12)[0]
    assert reply.choices[0].message.content == expected
    base = client.chat.completions.create(model=server.model.name, messages=MSGS, max_tokens=12, temperature=0)
    assert base.choices[0].message.content != reply.choices[0].message.content  # lr 0.02: the adapter matters
    adapters = httpx.get(server.url + "/v1/adapters", headers=server.headers, timeout=30).json()["data"]
    assert {"id": done.fine_tuned_model, "object": "adapter", "loaded": True} in adapters


def test_listing_pages_newest_first(job, client, data, server):
    second = client.fine_tuning.jobs.create(model=server.model.name, training_file=job["train"],
                                            method={"type": "supervised", "supervised": {
                                                "hyperparameters": {"n_epochs": 50}}})
    try:
        page = client.fine_tuning.jobs.list(limit=1)
        assert [j.id for j in page.data] == [second.id] and page.has_more
        rest = client.fine_tuning.jobs.list(limit=10, after=second.id)
        assert job["done"].id in [j.id for j in rest.data]
    finally:
        cancelled = client.fine_tuning.jobs.cancel(second.id)
    assert cancelled.status == "cancelled"
    assert finished(client, second.id, 60).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="cancel"):
        client.fine_tuning.jobs.cancel(second.id)
    assert client.fine_tuning.jobs.retrieve(job["done"].id).status == "succeeded"  # nothing finished was touched


@pytest.mark.parametrize("change, param", [
    ({"training_file": "file-000000000000000000000000"}, "training_file"),
    ({"model": "gpt-4o-mini"}, "model"),
    ({"extra_body": {"tunesmith": {"data": {"train": "/etc/passwd"}}}}, "tunesmith.data.train"),
    ({"extra_body": {"tunesmith": {"train.lrr": 1}}}, "tunesmith"),
    ({"extra_body": {"tunesmith": {"method.name": "full"}}}, "tunesmith.method.name"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}},
     "method.supervised.hyperparameters.beta"),
    ({"suffix": "../x"}, "suffix"),
])
def test_bad_requests_are_refused_naming_the_field(job, client, server, change, param):
    kwargs = {"model": server.model.name, "training_file": job["train"], **change}
    before = len(list((server.jobs / "jobs").iterdir()))
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(**kwargs)
    assert err.value.body["param"] == param, err.value.body
    assert len(list((server.jobs / "jobs").iterdir())) == before  # nothing written for a refused job


def test_every_route_needs_the_key(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.fine_tuning.jobs.list()
    with pytest.raises(openai.AuthenticationError):
        bad.files.create(file=io.BytesIO(b'{"messages": []}\n'), purpose="fine-tune")


def test_unknown_job_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("../../etc")


def test_pause_needs_a_running_job(job, client):
    with pytest.raises(openai.BadRequestError, match="only a running job"):
        client.fine_tuning.jobs.pause(job["done"].id)


def test_the_dpo_method_trains_on_openai_preference_rows(client, server, tmp_path):
    rows = [{"input": {"messages": [{"role": "user", "content": f"Ship {i} scarves to Lyon"}]},
             "preferred_output": [{"role": "assistant", "content": f'{{"qty": {i}, "city": "Lyon"}}'}],
             "non_preferred_output": [{"role": "assistant", "content": "I cannot help."}]} for i in range(8)]
    f = upload(client, write_jsonl(tmp_path / "prefs.jsonl", rows))
    created = client.fine_tuning.jobs.create(
        model=server.model.name, training_file=f,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}})
    done = finished(client, created.id)
    assert done.status == "succeeded", done.error
    assert done.method.dpo.hyperparameters.beta == 0.2
    config = json.dumps((server.jobs / "jobs" / done.id / "config.yaml").read_text())
    assert "dpo" in config and "beta: 0.2" in config
