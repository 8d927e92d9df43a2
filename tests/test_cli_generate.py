import io

import pytest
import torch

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.tokenize import prompt_ids
from tunesmith.generation import generate, load_for_inference
from tunesmith.recipes.sft import run_sft


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    from conftest import write_jsonl
    from tunesmith.demo.orders import make_splits

    tmp = tmp_path_factory.mktemp("gen")
    train = write_jsonl(tmp / "train.jsonl", make_splits(7, {"train": 8})["train"])
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train}", f"run.output_dir={tmp}",
                             "run.name=g", "train.max_steps=3", "train.lr=5e-2", "train.batch_size=4"])
    return run_sft(cfg)


def test_run_loads_base_plus_adapter_with_training_template(tiny_run, tiny_model_dir):
    tuned = load_for_inference(tiny_run)
    base = load_for_inference(tiny_run, adapter=False)
    plain = load_for_inference(str(tiny_model_dir))
    conv = [{"role": "user", "content": "Order 2 mugs"}]
    assert tuned.tokenizer.chat_template == plain.tokenizer.chat_template
    ids = torch.tensor([prompt_ids(tuned.tokenizer, conv)])
    with torch.no_grad():
        t, b, p = (m.model(input_ids=ids).logits for m in (tuned, base, plain))
    assert torch.equal(b, p)            # adapter=False really is the base model
    assert (t - b).abs().max() > 1e-3   # and the adapter changes it


def test_generate_command_prints_the_runs_reply(tiny_run, capsys):
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Order 2 mugs"}]
    expected = generate(load_for_inference(tiny_run), [conv], max_new_tokens=10)[0]
    assert main(["generate", str(tiny_run), "--system", "S", "--prompt", "Order 2 mugs",
                 "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_chat_keeps_history_and_quits_on_empty_line(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nOrder 2 mugs\n\n"))
    assert main(["chat", str(tiny_run), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2
    first = generate(load_for_inference(tiny_run), [[{"role": "user", "content": "Hi"}]], max_new_tokens=6)[0]
    assert f"model> {first}\n" in out


def test_generate_on_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_named_template_and_eos_travel_with_the_run(tiny_model_dir, tmp_path):
    from conftest import write_jsonl
    from tunesmith.data.templates import ALPACA
    from tunesmith.demo.orders import make_splits

    train = write_jsonl(tmp_path / "train.jsonl", make_splits(8, {"train": 4})["train"])
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train}", f"run.output_dir={tmp_path}",
                             "run.name=alp", "train.max_steps=1", "data.template=alpaca"])
    run = run_sft(cfg)
    assert (run / "tokenizer" / "chat_template.jinja").read_text() == ALPACA
    im = load_for_inference(run)
    assert im.tokenizer.chat_template == ALPACA
    text = im.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True)
    assert text == "### Instruction:\nhi\n\n### Response:\n"
    import json

    assert json.loads((run / "manifest.json").read_text())["data"]["chat_template"] == "alpaca"
