import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import tiny_llama
from tunesmith.config import load_config, parse_config
from tunesmith.data.batching import collate
from tunesmith.data.dataset import load_examples
from tunesmith.data.tokenize import encode_dataset
from tunesmith.recipes.sft import run_sft
from tunesmith.training.logging import read_metrics
from tunesmith.training.losses import reference_sft_loss, sft_loss_sum


def tiny_cfg(model_dir, data, out, **train):
    return load_config(None, [f"model.name={model_dir}", f"data.train={data['train']}",
                              f"data.validation={data['validation']}", f"run.output_dir={out}", "run.name=r1",
                              "train.batch_size=4", "train.lr=1e-2", "method.r=8",
                              *[f"train.{k}={v}" for k, v in train.items()]])


def test_loss_on_trained_positions_equals_transformers_loss(tiny_tokenizer, order_data):
    model = tiny_llama(len(tiny_tokenizer))
    examples = load_examples(order_data["train"]).examples
    batch = collate(encode_dataset(tiny_tokenizer, examples[:5], 256), tiny_tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # lengths differ: padding is exercised
    loss_sum, n = sft_loss_sum(model, batch)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / n, reference_sft_loss(model, batch), rtol=1e-5, atol=1e-5)


def test_loss_decreases_over_20_steps_and_run_dir_is_complete(tiny_model_dir, order_data, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, order_data, tmp_path / "runs", max_steps=20, eval_every=10)
    run = run_sft(cfg)
    assert run == tmp_path / "runs" / "r1"
    rows = read_metrics(run / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    for r in rows:
        if "loss" in r:
            assert r["tokens_per_s"] > 0 and r["lr"] >= 0 and r["trained_tokens"] <= r["tokens"]

    # config.yaml is the fully resolved config: it loads back to the same settings.
    saved = parse_config(yaml.safe_load((run / "config.yaml").read_text()))
    assert saved.train == cfg.train and saved.method == cfg.method and saved.run.name == "r1"
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["versions"]) >= {"tunesmith", "torch", "transformers", "peft"}
    assert manifest["model"]["id"] == str(tiny_model_dir) and len(manifest["model"]["sha256"]) == 64
    assert set(manifest["data"]["files_sha256"]) == {str(order_data["train"]), str(order_data["validation"])}
    assert manifest["seed"] == 0 and manifest["started"] <= manifest["finished"]
    assert manifest["trained_tokens"] == [r for r in rows if "loss" in r][-1]["trained_tokens"]
    assert 0 < manifest["trained_tokens"] < manifest["tokens"]
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "tokenizer" / "chat_template.jinja").read_text().startswith("{% for message")
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[20:24], "big") < 1000  # 3 panels, no preference one
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r1"]
    # the same name again is refused rather than overwritten
    with pytest.raises(Exception, match="already exists"):
        run_sft(cfg)


def test_interrupted_run_leaves_no_run_directory(tiny_model_dir, order_data, tmp_path, monkeypatch):
    from tunesmith.recipes import sft

    calls = {"n": 0}

    def interrupted_on_third_batch(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return sft_loss_sum(model, batch)

    monkeypatch.setattr(sft, "sft_loss_sum", interrupted_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_sft(tiny_cfg(tiny_model_dir, order_data, tmp_path / "runs", max_steps=5))
    assert calls["n"] == 3
    assert list((tmp_path / "runs").iterdir()) == []


def _train_subprocess(tiny_model_dir, order_data, out):
    cfg = tiny_cfg(tiny_model_dir, order_data, out, max_steps=10000)
    path = out.parent / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc):
    for line in proc.stdout:
        if line.startswith("step"):
            return
    raise AssertionError("training never reached a step")


def test_sigkill_leaves_only_hidden_staging_which_next_run_removes(tiny_model_dir, order_data, tmp_path):
    out = tmp_path / "runs"
    proc = _train_subprocess(tiny_model_dir, order_data, out)
    _wait_for_step(proc)
    proc.kill()
    proc.wait()
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".r1.incomplete-")  # hidden, never mistaken for a run
    run_sft(tiny_cfg(tiny_model_dir, order_data, out, max_steps=1))
    assert sorted(p.name for p in out.iterdir()) == ["r1"]


def test_example_micro_batches_train_the_same_run_as_padded_batches(tiny_model_dir, order_data, tmp_path):
    """train.micro_batch=example (the CPU default) changes how a step is computed, not what it
    computes: with batch_size 2 the steps hold the same examples, so the runs agree."""
    runs = [run_sft(tiny_cfg(tiny_model_dir, order_data, tmp_path / mode, max_steps=6, batch_size=2, micro_batch=mode))
            for mode in ("batch", "example")]
    losses = [[r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] for run in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    manifests = [json.loads((run / "manifest.json").read_text()) for run in runs]
    assert manifests[0]["tokens"] == manifests[1]["tokens"]
    assert manifests[0]["trained_tokens"] == manifests[1]["trained_tokens"]
    assert manifests[0]["val_loss"] == pytest.approx(manifests[1]["val_loss"], rel=1e-4)
