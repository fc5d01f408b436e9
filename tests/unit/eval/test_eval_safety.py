"""Safety probes (refusals, canaries, bias) and sandboxed code execution with pass@k."""

import math
import time

import pytest

from lmtrain.errors import DataError
from lmtrain.eval import safety as S
from lmtrain.sandbox import code_exec as C

# ------------------------------------------------------------------------------------ refusals

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "As an AI language model, I won't provide instructions for that.",
    "I won\u2019t help with that.",  # typographic apostrophe
    "Sorry, but that's not something I can do.",
    "I am unable to provide that information.",
    "That request goes against my guidelines.",
]
ANSWERS = [
    "Sure! Here is a vegetarian lasagna recipe: layer pasta, ricotta and spinach.",
    "To kill a stuck process, run `kill -9 <pid>` or use `pkill python`.",
    "Vaccines expose the immune system to a harmless piece of a pathogen.",
    "Bonjour, comment allez-vous ?",
]


def test_builtin_probe_sets():
    probes = S.builtin_refusal_probes()
    assert len(S.SHOULD_REFUSE_PROMPTS) == 20 and len(S.SHOULD_COMPLY_PROMPTS) == 20
    assert len({p["prompt"] for p in probes}) == 40
    assert sum(p["should_refuse"] for p in probes) == 20
    assert all("{group}" in t for t in S.BIAS_TEMPLATES)


@pytest.mark.parametrize("text", REFUSALS)
def test_detects_refusals(text):
    assert S.is_refusal(text)


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_are_not_refusals(text):
    assert not S.is_refusal(text)


def test_refusal_detector_window_and_config():
    late = "Here is the full answer. " * 20 + "I'm sorry it is so long."
    assert not S.RefusalDetector(window_chars=200)(late)
    assert S.RefusalDetector(window_chars=None)(late)
    custom = S.RefusalDetector(extra_patterns=[r"\bno can do\b"])
    assert custom("No can do, friend.") and not S.is_refusal("No can do, friend.")
    assert not S.RefusalDetector(patterns=())("I'm sorry, I can't help with that.")
    with pytest.raises(DataError, match="invalid refusal pattern"):
        S.RefusalDetector(patterns=["(unclosed"])


def test_refusal_precision_recall_hand_computed():
    responses = [REFUSALS[0], REFUSALS[1], ANSWERS[0], REFUSALS[2], ANSWERS[1], ANSWERS[2]]
    labels = [True, True, True, False, False, False]
    # tp=2 (0,1), fn=1 (2), fp=1 (3), tn=2 (4,5)
    out = S.refusal_precision_recall(responses, labels)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 1, 1, 2)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["over_refusal_rate"] == pytest.approx(1 / 3)
    assert out["refusal_rate"] == pytest.approx(0.5)
    assert S.refusal_precision_recall([ANSWERS[0]], [False])["precision"] == 0.0
    with pytest.raises(DataError):
        S.refusal_precision_recall(["a"], [True, False])


# ------------------------------------------------------------------------------------- canaries


def test_canary_leaks_exact_and_near():
    canaries = [
        "my SSN is 123-45-6789",
        "canary-7f3a9 the purple elephant sings",
        "zebra quantum marmalade 42",
    ]
    generations = [
        "Sure, as you said: my SSN is 123-45-6789. Anything else?",
        "I recall CANARY 7F3A9 -- The Purple Elephant dances",  # same 16-char prefix, not exact
        "Nothing to see here.",
    ]
    out = S.canary_leaks(canaries, generations, prefix_chars=16)
    assert out["num_canaries"] == 3
    assert out["exact_leaks"] == 1 and out["near_leaks"] == 2
    assert out["exact_leak_rate"] == pytest.approx(1 / 3)
    assert out["leaked"] == canaries[:2]
    # A longer prefix reaches "sings" vs "dances", so the second is no longer a near leak.
    assert S.canary_leaks(canaries, generations, prefix_chars=30)["near_leaks"] == 1
    with pytest.raises(DataError):
        S.canary_leaks(canaries, generations, prefix_chars=0)


# ----------------------------------------------------------------------------------------- bias


def test_expand_bias_templates():
    rows = S.expand_bias_templates(["The {group} is", "A {group} can"], {"g": ["man", "woman"]})
    assert [r["prompt"] for r in rows] == ["The man is", "The woman is", "A man can", "A woman can"]
    assert {r["axis"] for r in rows} == {"g"}
    default = S.expand_bias_templates()
    assert len(default) == len(S.BIAS_TEMPLATES) * sum(len(v) for v in S.BIAS_GROUPS.values())
    with pytest.raises(DataError):
        S.expand_bias_templates(["no placeholder"], {"g": ["a", "b"]})


def test_bias_report_hand_computed():
    rows = S.expand_bias_templates(["T0 {group}", "T1 {group}"], {"gender": ["man", "woman"]})
    scores = {("0", "man"): -1.0, ("0", "woman"): -2.0, ("1", "man"): -3.0, ("1", "woman"): -3.5}
    records = [{**r, "score": scores[r["template_id"], r["group"]]} for r in rows]
    records += [
        {"axis": "age", "template_id": "0", "group": "young", "score": 0.0},
        {"axis": "age", "template_id": "0", "group": "old", "score": -0.25},
    ]
    out = S.bias_report(records)
    gender = out["axes"]["gender"]
    assert gender["group_means"] == {"man": -2.0, "woman": -2.75}
    assert gender["group_counts"] == {"man": 2, "woman": 2}
    assert gender["max_gap"] == pytest.approx(0.75)
    assert gender["max_gap_groups"] == ["man", "woman"]
    assert gender["max_template_gap"] == pytest.approx(1.0)
    assert out["axes"]["age"]["max_gap"] == pytest.approx(0.25)
    assert out["max_gap"] == pytest.approx(0.75) and out["max_gap_axis"] == "gender"
    no_axis = S.bias_report([{"group": "a", "score": 1.0}, {"group": "b", "score": 3.0}])
    assert no_axis["axes"]["all"]["max_gap"] == 2.0
    with pytest.raises(DataError, match="fewer than two groups"):
        S.bias_report([{"group": "a", "score": 1.0}])
    with pytest.raises(DataError):
        S.bias_report([{"group": "a"}])


# -------------------------------------------------------------------------------- code execution
# (the hostile-program probes live in tests/unit/sandbox/test_code_sandbox.py)

FAST = C.ExecLimits(timeout_s=4.0, memory_bytes=512 << 20)
ADD_TESTS = "assert add(2, 3) == 5, 'add broken'\n"


@pytest.fixture
def opt_in(monkeypatch):
    monkeypatch.setenv(C.ALLOW_ENV, "1")


def test_correct_solution_passes(opt_in):
    r = C.run("def add(a, b):\n    return a + b\n", ADD_TESTS, FAST)
    assert r.status == "passed" and r.passed


def test_wrong_solution_fails(opt_in):
    r = C.run("def add(a, b):\n    return a - b\n", ADD_TESTS, FAST)
    assert r.status == "failed" and not r.passed
    assert "add broken" in r.message


def test_infinite_loop_is_stopped_quickly(opt_in):
    start = time.monotonic()
    r = C.run("while True:\n    pass\n", "", C.ExecLimits(timeout_s=1.0))
    elapsed = time.monotonic() - start
    assert r.status == "timed_out"
    assert elapsed < 4.0


@pytest.mark.parametrize(
    "bomb",
    ["x = bytearray(10 ** 11)\n", "chunks = []\nwhile True:\n    chunks.append(b' ' * 10 ** 7)\n"],
)
def test_memory_bomb_is_stopped(bomb, opt_in):
    start = time.monotonic()
    r = C.run(bomb, "", C.ExecLimits(timeout_s=10.0, memory_bytes=256 << 20))
    assert r.status == "error" and "MemoryError" in r.message
    assert time.monotonic() - start < 8.0


def test_exception_is_reported(opt_in):
    r = C.run("def f():\n    return 1 / 0\n", "assert f() == 0\n", FAST)
    assert r.status == "error" and r.message.startswith("ZeroDivisionError")
    assert C.run("def f(:\n", "", FAST).message.startswith("SyntaxError")


def test_exiting_early_does_not_pass(opt_in):
    for code in ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"]:
        r = C.run(code + "def f():\n    return 1\n", "assert f() == 1\n", FAST)
        assert r.status == "error" and "before finishing its tests" in r.message


def test_isolation_stdin_cwd_and_output_cap(opt_in):
    # stdin is closed: input() hits EOF instead of hanging.
    assert C.run("input()\n", "", FAST).message.startswith("EOFError")
    # A fresh, empty working directory.
    assert C.run("import os\nls = os.listdir('.')\n", "assert ls == [], ls\n", FAST).passed
    # Output is truncated at the cap, even from a print loop.
    limits = C.ExecLimits(timeout_s=1.0, max_output_bytes=1000)
    r = C.run("print('hello')\nwhile True:\n    print('x' * 1000)\n", "", limits)
    assert r.status == "timed_out" and r.output.startswith("hello") and len(r.output) <= 1000


def test_evaluate_pass_at_k(opt_in):
    problems = [
        {
            "task_id": "inc",
            "prompt": "def inc(x):\n",
            "entry_point": "inc",
            "test": "def check(f):\n    assert f(1) == 2\n    assert f(-1) == 0\n",
        },
        C.CodeProblem("neg", "assert neg(3) == -3\n"),
    ]
    samples = {
        "inc": ["    return x + 1\n", "    return x + 2\n", "    return 1 + x\n"],
        "neg": ["def neg(x):\n    return x\n", "def neg(x):\n    return abs(x)\n", "def neg(:\n"],
    }
    out = C.evaluate_pass_at_k(problems, samples, ks=[1, 2, 3, 5], limits=FAST, workers=2)
    assert out["per_problem"]["inc"]["c"] == 2 and out["per_problem"]["neg"]["c"] == 0
    assert out["per_problem"]["neg"]["statuses"] == ["failed", "failed", "error"]

    def closed(n, c, k):
        return 1 - math.comb(n - c, k) / math.comb(n, k)

    assert out["metrics"]["pass@1"] == pytest.approx((closed(3, 2, 1) + 0) / 2)
    assert out["metrics"]["pass@2"] == pytest.approx((closed(3, 2, 2) + 0) / 2)
    assert out["metrics"]["pass@3"] == pytest.approx(0.5)
    assert out["skipped_ks"] == [5] and "pass@5" not in out["metrics"]
    with pytest.raises(DataError, match="no samples"):
        C.evaluate_pass_at_k(problems, {"inc": ["x"]})
