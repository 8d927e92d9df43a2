"""Reward functions of objective.name=rl (training/rewards.py, training/reward_builtins.py): each
built-in on cases a naive implementation gets wrong, the config-time refusals, 'module:function'
imports, TRL's calling convention (a reward function of TRL's own works unchanged), the reward
model as one more function (a fake: no model loads here)."""
import json
import math
import sys
import textwrap

import pytest

from tunesmith.config import RewardSpec, load_config
from tunesmith.errors import ConfigError
from tunesmith.eval.metrics import Context, json_scores
from tunesmith.training.rewards import REWARD_FUNCTIONS, Rewards, build_rewards, check_spec

ORDER = {"customer": "Lena Novak", "item": "notebook", "quantity": 5, "color": "blue", "city": "Boston",
         "shipping": "express"}
SCHEMA = {"type": "object", "required": ["customer", "quantity"],
          "properties": {"customer": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}}}


def score(function: str, completions: list[str], reference: list | None = None, column: str = "answer", **options):
    """One built-in through build_rewards and Rewards.__call__, as the RL recipe calls it."""
    spec = {"function": function, "options": options}
    if reference is not None:
        spec["column"] = column
    rewards = build_rewards([RewardSpec(**spec)])
    columns = {column: reference} if reference is not None else {}
    return rewards(["q"] * len(completions), completions, columns)[0]


# -- built-ins ----------------------------------------------------------------------------------------

def test_exact_collapses_whitespace_keeps_case_and_extracts_the_last_answer():
    assert score("exact", ["  Paris\n", "paris", "Paris.", "New  York"], ["Paris", "Paris", "Paris", "New York"]) \
        == [1.0, 0.0, 0.0, 1.0]
    assert score("exact", ["paris"], ["Paris"], case_sensitive=False) == [1.0]
    # the group of the last match: the first "Answer:" restates a wrong guess
    replies = ["Answer: Lyon? No. Answer: Paris", "Paris", "Answer:  Paris "]
    assert score("exact", replies, ["Paris"] * 3, extract=r"Answer:\s*(\w+)") == [1.0, 0.0, 1.0]


def test_exact_none_reference_is_nan_not_zero():
    out = score("exact", ["Paris", "Paris"], ["Paris", None])
    assert out[0] == 1.0 and math.isnan(out[1])


def test_numeric_reads_gsm8k_answers_and_numbers_in_text():
    gsm8k_ref = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                 "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18")  # test.jsonl's first answer
    replies = [
        "She sells 9 eggs at $2, so she makes 18.",       # trailing full stop: 18, not "18." or 18.0 mismatch
        "9 * 2 = 18 dollars, i.e. 18.00",                 # decimals written out
        "16-3-4 = 9 eggs ... the answer is 9",            # wrong answer (the last number)
        "In 2 days she makes 36; per day 18 (about 1 week's 126)",  # the last number is 126: wrong
    ]
    assert score("numeric", replies, [gsm8k_ref] * 4) == [1.0, 1.0, 0.0, 0.0]
    # with the marker: the number after it, whatever follows; a reply without it scores 0
    marked = ["18 eggs? no: #### 18\nThat is $18 per day, 7 days", "so 18", "#### $1,080.", "#### -3"]
    assert score("numeric", marked, [gsm8k_ref, gsm8k_ref, "x\n#### 1,080", -3], marker="####") == [1, 0, 1, 1]
    # "16-3" is a subtraction (3), not -3; a thousands comma is not a list separator
    assert score("numeric", ["16-3", "1,000,000", "items 1,2,3"], [3, 1e6, 3]) == [1.0, 1.0, 1.0]
    assert score("numeric", ["0.3333", "0.34"], [1 / 3, 1 / 3], tolerance=1e-3) == [1.0, 0.0]
    assert score("numeric", ["no number here"], ["5"]) == [0.0]
    with pytest.raises(ValueError, match="reference of completion 0 has no number"):
        score("numeric", ["5"], ["five"])


def test_json_is_the_eval_reading_of_the_reply_and_partial_credit_matches_eval_field_accuracy():
    obj = json.dumps(ORDER)
    fenced = f"```json\n{obj}\n```"
    trailing = f"{obj}\nHope this helps!"        # eval cuts past the object (answer_end json): valid
    prose = f"Here you go: {obj}"                # eval scores a reply opening with prose 0
    replies = [obj, fenced, trailing, prose, '["not", "an object"]', '{"customer": "Lena"']
    assert score("json", replies) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    wrong_two = json.dumps({**ORDER, "quantity": "5", "city": "Austin"})  # "5" is not 5
    refs = [obj] * 3
    got = score("json", [wrong_two, fenced, prose], refs)
    assert got == pytest.approx([4 / 6, 1.0, 0.0])
    # the same replies, cut as eval cuts them, scored by eval's json metric: the same per-row values
    assert json_scores([wrong_two, fenced, prose], refs, Context()).per_example["field_accuracy"] == pytest.approx(got)
    assert score("json", [wrong_two], [ORDER], fields=["customer", "quantity"]) == [0.5]  # a dict reference too


def test_json_schema_validates_types_and_reads_a_schema_file(tmp_path, monkeypatch):
    replies = ['{"customer": "Lena", "quantity": 5}',
               '{"customer": "Lena", "quantity": "5"}',      # type mismatch: a string
               '{"customer": "Lena", "quantity": 0}',        # below the minimum
               '{"customer": "Lena"}',                       # a required field missing
               f"```json\n{json.dumps(ORDER)}\n```",         # fenced, extra fields allowed
               "quantity: 5"]
    want = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert score("json_schema", replies, schema=SCHEMA) == want
    (tmp_path / "order.schema.json").write_text(json.dumps(SCHEMA))
    monkeypatch.chdir(tmp_path)  # a path is relative to the working directory
    assert score("json_schema", replies, schema="order.schema.json") == want
    with pytest.raises(ValueError, match=r"option 'schema' .*missing.json.*no such file"):
        build_rewards([RewardSpec(function="json_schema", options={"schema": "missing.json"})])


def test_regex_search_and_fullmatch():
    replies = ["<think>a\nb</think>42", "x <think>a</think>42", "<think>a</think>"]
    assert score("regex", replies, pattern=r"<think>.*</think>\d+") == [0.0, 1.0, 0.0]  # '.' stops at a newline
    assert score("regex", replies, pattern=r"(?s)<think>.*</think>\d+", mode="fullmatch") == [1.0, 0.0, 0.0]


def test_length_penalty_in_characters_with_a_cap():
    assert score("length", ["", "abcde", "abcdefghij", "a" * 30], target=10) == [-1.0, -0.5, 0.0, -2.0]
    assert score("length", ["a" * 30, "a" * 12], target=10, cap=1.0) == pytest.approx([-1.0, -0.2])


# -- config-time refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("rewards,expected", [
    ("[{function: regex}]", r"objective\.rewards\.0.*'regex' needs option 'pattern'"),
    ("[{function: numerik, column: answer}]", r"unknown reward function 'numerik': did you mean 'numeric'\?.*exact, "),
    ("[{function: my_rewards.fmt}]", r"'my_rewards:fmt'"),
    ("[{function: 'a:b:c'}]", r"'a:b:c' is not 'module:function'"),
    ("[{function: 'my_rewards:fmt', column: answer}]", r"`column` does nothing for a Python function"),
    ("[{function: regex, options: {pattern: x, mdoe: search}}]", r"no option 'mdoe' \(did you mean 'mode'\?\)"),
    ("[{function: regex, options: {pattern: '(x'}}]", r"option 'pattern'.*not a valid regular expression"),
    ("[{function: regex, options: {pattern: x, mode: match}}]", r"option 'mode' must be one of search, fullmatch"),
    ("[{function: regex, column: answer, options: {pattern: x}}]", r"'regex' reads no column: remove column"),
    ("[{function: exact}]", r"'exact' compares with a reference: set `column`"),
    ("[{function: exact, column: a, options: {extract: 'a(b)(c)'}}]",
     r"option 'extract'.*2 groups; it needs exactly 1"),
    ("[{function: length, options: {target: 0}}]", r"option 'target' must be a number > 0"),
    ("[{function: numeric, column: a, options: {tolerance: -1}}]", r"option 'tolerance' must be a number >= 0"),
    ("[{function: json_schema, options: {schema: {type: objekt}}}]", r"option 'schema' is not a valid JSON Schema"),
    ("[{function: json_schema, options: {schema: order.yaml}}]", r"path of a .json file"),
])
def test_config_refuses_bad_reward_specs_naming_the_field(rewards, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(None, ["objective.name=rl", f"objective.rewards={rewards}"])
    assert "objective.rewards.0" in str(e.value)


def test_every_builtin_accepts_its_documented_options():
    """Each registry entry's options are accepted by check_spec and by the function itself."""
    samples = {"extract": "(.*)", "case_sensitive": False, "marker": "####", "tolerance": 0.5, "fields": ["a"],
               "schema": {"type": "object"}, "pattern": "a", "mode": "fullmatch", "target": 3, "cap": 1.0}
    for name, rf in REWARD_FUNCTIONS.items():
        spec = RewardSpec(function=name, column="ref" if rf.reads_column else None,
                          options={k: samples[k] for k in rf.options})
        check_spec(spec)
        out = build_rewards([spec])(["q"], ['{"a": 1}'], {"ref": ['{"a": 1}']} if rf.reads_column else {})
        assert len(out[0]) == 1 and isinstance(out[0][0], float), name


# -- custom functions, TRL's convention ----------------------------------------------------------------

@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(textwrap.dedent("""
        CALLS = []
        NOT_A_FUNCTION = 3

        def starts_with_answer(prompts, completions, answer, **kwargs):
            CALLS.append({"prompts": prompts, "completions": completions, "answer": answer, **kwargs})
            return [1.0 if c.startswith(a) else None for c, a in zip(completions, answer)]

        def too_few(prompts, completions, **kwargs):
            return [1.0]

        def strings(prompts, completions, **kwargs):
            return ["1"] * len(completions)

        def make_bonus(value):
            return lambda prompts, completions, **kw: [value] * len(completions)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_rewards_mod", None)


def test_custom_function_gets_prompts_completions_and_every_column(custom_module):
    rewards = build_rewards([RewardSpec(function="my_rewards_mod:starts_with_answer", weight=2.0),
                             RewardSpec(function="length", options={"target": 4})])
    assert rewards.names == ["starts_with_answer", "length"]
    out = rewards(["p1", "p1"], ["yes sir", "no"], {"answer": ["yes", "yes"], "id": [7, 7]}, completion_ids=[[1], [2]])
    assert out[0][0] == 1.0 and math.isnan(out[0][1])
    import my_rewards_mod

    call = my_rewards_mod.CALLS[-1]
    assert call == {"prompts": ["p1", "p1"], "completions": ["yes sir", "no"], "answer": ["yes", "yes"],
                    "id": [7, 7], "completion_ids": [[1], [2]]}
    assert rewards.total(out) == pytest.approx([2.0 - 0.75, -0.5])  # NaN term left out of the sum
    assert set(rewards.seconds) == {"starts_with_answer", "length"} and all(s >= 0 for s in rewards.seconds.values())
    rewards(["p1"] * 2, ["a", "b"], {"answer": ["a", "b"], "id": [1, 2]})
    assert len(my_rewards_mod.CALLS) == 2  # seconds accumulate over calls; the function ran twice


def test_custom_function_errors_name_the_function_and_the_fix(custom_module):
    def build(name, **options):
        return build_rewards([RewardSpec(function=name, options=options)])

    with pytest.raises(ValueError, match=r"objective.rewards\[0\].*cannot import module 'no_such_mod'.*PYTHONPATH"):
        build("no_such_mod:f")
    with pytest.raises(ValueError, match=r"module 'my_rewards_mod' \(.*my_rewards_mod.py\) has no attribute 'nope'"):
        build("my_rewards_mod:nope")
    with pytest.raises(ValueError, match="is not a function: it is int 3"):
        build("my_rewards_mod:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match=r"returned 1 values for 2 completions"):
        build("my_rewards_mod:too_few")(["p", "p"], ["a", "b"], {})
    with pytest.raises(ValueError, match=r"'my_rewards_mod:strings' returned '1' \(str\) for completion 0"):
        build("my_rewards_mod:strings")(["p"], ["a"], {})
    assert build("my_rewards_mod:make_bonus", value=0.5)(["p"], ["a"], {}) == [[0.5]]  # options: a factory's
    with pytest.raises(ValueError, match="options are passed to it once"):
        build("my_rewards_mod:make_bonus", valeu=0.5)


def test_rewards_checks_lengths_and_reserved_columns():
    rewards = build_rewards([RewardSpec(function="length", options={"target": 2})])
    with pytest.raises(ValueError, match="1 prompts for 2 completions"):
        rewards(["p"], ["a", "b"], {})
    with pytest.raises(ValueError, match="column 'x' has 1 values for 2 completions"):
        rewards(["p", "p"], ["a", "b"], {"x": [1]})
    with pytest.raises(ValueError, match="'completions' would shadow"):
        rewards(["p"], ["a"], {"completions": ["a"]})
    with pytest.raises(ValueError, match=r"column 'answer' is not in the data \(columns: prompt, solution\)"):
        build_rewards([RewardSpec(function="exact", column="answer")], columns={"prompt", "solution"})
    with pytest.raises(ValueError, match="set objective.rewards"):
        build_rewards([])


def test_a_trl_reward_function_works_unchanged():
    """TRL's own think_format_reward (conversational completions) and soft overlong punishment
    (a factory reading completion_ids), called by Rewards as GRPOTrainer calls them."""
    from trl.rewards import get_soft_overlong_punishment, think_format_reward

    prompts = [[{"role": "user", "content": "2+2?"}]] * 2
    texts = ["<think>\nadd\n</think>\n4", "4"]
    rewards = build_rewards([
        RewardSpec(function="trl.rewards:think_format_reward"),
        RewardSpec(function="trl.rewards:get_soft_overlong_punishment",
                   options={"max_completion_len": 10, "soft_punish_cache": 4}),
        RewardSpec(function="regex", options={"pattern": r"\d$"}),  # a built-in reads the message's text
    ])
    ids = [[1] * 8, [1] * 3]
    out = rewards(prompts, texts, {}, completion_ids=ids)
    as_trl = [[{"role": "assistant", "content": t}] for t in texts]
    assert out[0] == think_format_reward(as_trl) == [1.0, 0.0]
    assert out[1] == get_soft_overlong_punishment(10, 4)(ids) == [-0.5, 0.0]
    assert out[2] == [1.0, 1.0]
    # and a built-in is itself a TRL reward function (plain-text prompts: plain completions)
    builtin = rewards.functions[2]
    assert builtin(prompts=["a"], completions=["7"], completion_ids=[[1]], trainer_state=None) == [1.0]


def test_reward_model_scores_prompt_plus_completion(monkeypatch):
    import tunesmith.training.reward_model as rm

    seen = {}

    class FakeModel:
        def score(self, conversations):
            seen["conversations"] = conversations
            return [float(len(c[-1]["content"])) for c in conversations]

    def fake_load(path):
        seen["path"] = path
        return FakeModel()

    monkeypatch.setattr(rm, "load_reward_model", fake_load)
    rewards = build_rewards([RewardSpec(function="length", options={"target": 1}, weight=0.5)], reward_model="runs/rm")
    assert rewards.names == ["length", "reward_model"] and rewards.weights == [0.5, 1.0]
    out = rewards(["hi", [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]], ["abc", "de"], {})
    assert seen["path"] == "runs/rm" and out[1] == [3.0, 2.0]
    assert seen["conversations"] == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abc"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "de"}]]
