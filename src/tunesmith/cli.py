"""Command line: a table of command name -> typed function. No logic lives here."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

from tunesmith.errors import TunesmithError

TEMPLATES = {"sft-lora": {}}  # template name -> overrides of the defaults


def cmd_init(path: str, template: str, force: bool) -> int:
    from tunesmith.config import commented_template, parse_config

    out = Path(path)
    if out.exists() and not force:
        raise TunesmithError(f"{out} already exists; pass --force to overwrite it")
    out.write_text(commented_template(parse_config(TEMPLATES[template], template)), encoding="utf-8")
    print(f"wrote {out} (template {template}); edit it, then: tunesmith train {out}")
    return 0


def cmd_train(config: str, overrides: list[str]) -> int:
    from tunesmith.config import load_config
    from tunesmith.recipes.sft import run_sft

    run_sft(load_config(config, overrides))
    return 0


def cmd_models_list() -> int:
    from tunesmith.models.registry import list_models, tunesmith_home

    print(f"cache: {tunesmith_home() / 'models'}")
    for row in list_models():
        print(f"  {row['name']:<24} {row['description']}\n  {'':<24} {row['state']}")
    return 0


def _conversation(system: str | None, prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def cmd_generate(model: str, prompt: list[str], system: str | None, max_new_tokens: int,
                 temperature: float, no_adapter: bool) -> int:
    from tunesmith.generation import generate, load_for_inference

    im = load_for_inference(model, adapter=not no_adapter)
    replies = generate(im, [_conversation(system, p) for p in prompt], max_new_tokens, temperature=temperature)
    for p, reply in zip(prompt, replies):
        if len(prompt) > 1:
            print(f"> {p}")
        print(reply)
    return 0


def cmd_chat(model: str, system: str | None, max_new_tokens: int, temperature: float) -> int:
    from tunesmith.generation import generate, load_for_inference

    im = load_for_inference(model)
    history = [{"role": "system", "content": system}] if system else []
    print(f"chatting with {im.label}; empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = generate(im, [history], max_new_tokens, temperature=temperature)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
    return 0


def cmd_demo(model: str, output_dir: str, name: str | None, train_size: int, epochs: float) -> int:
    from tunesmith.demo.run import run_demo

    run_demo(model=model, output_dir=output_dir, name=name, train_size=train_size, epochs=epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tunesmith import __version__
    from tunesmith.models.registry import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune language models end to end.")
    p.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="write a commented starter config")
    s.add_argument("path", nargs="?", default="tunesmith.yaml")
    s.add_argument("--template", choices=sorted(TEMPLATES), default="sft-lora")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("train", help="train from a config: tunesmith train CONFIG [key.sub=value ...]")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="e.g. train.lr=1e-4 method.r=8")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("models", help="models: list aliases and the conversion cache")
    msub = s.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="aliases and cached models").set_defaults(fn=cmd_models_list)

    for name, helptext in (("generate", "generate replies from a run or model"),
                           ("chat", "chat interactively with a run or model")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("model", help="run directory, alias, model directory, .gguf file or hub id")
        if name == "generate":
            s.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
            s.add_argument("--no-adapter", action="store_true", help="use a run's base model only")
        s.add_argument("--system", default=None, help="system message")
        s.add_argument("--max-new-tokens", type=int, default=256)
        s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        s.set_defaults(fn=cmd_generate if name == "generate" else cmd_chat)

    s = sub.add_parser("demo", help="the main job: base eval -> LoRA fine-tune -> tuned eval, on a generated task")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--output-dir", default="runs")
    s.add_argument("--name", default=None)
    s.add_argument("--train-size", type=int, default=240)
    s.add_argument("--epochs", type=float, default=1.0)
    s.set_defaults(fn=cmd_demo)
    return p


def quiet_upstream() -> None:
    """Upstream deprecation chatter and per-tensor progress bars hide our own progress lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: staged run folders are removed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_upstream()
    signal.signal(signal.SIGTERM, _interrupt)
    kwargs = {k: v for k, v in vars(args).items() if k not in {"fn", "command", "models_command"}}
    try:
        return args.fn(**kwargs)
    except TunesmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
