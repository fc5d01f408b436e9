"""Property tests (hypothesis): no input makes a reader or the config loader fail untyped.

Every input either parses or raises an ``LmtrainError`` subclass (DataError / ConfigError) with a
message; a KeyError, TypeError, RecursionError or ValueError escaping is a bug. Example counts
are bounded and derandomized so CI is fast and reproducible; raise LMTRAIN_FUZZ_EXAMPLES to fuzz
harder locally.
"""

from __future__ import annotations

import gzip
import json
import os
import string
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lmtrain.config import apply_overrides, base_config, load_config  # noqa: E402
from lmtrain.data import formats  # noqa: E402
from lmtrain.data.prepare_config import source_defaults  # noqa: E402
from lmtrain.data.sources import ErrorPolicy, FileSource  # noqa: E402
from lmtrain.errors import ConfigError, DataError, LmtrainError  # noqa: E402

N = int(os.environ.get("LMTRAIN_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=N,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# -- strategies ----------------------------------------------------------------------------------
KEYS = ["prompt", "response", "messages", "role", "content", "instruction", "input", "output",
        "instances", "system", "chosen", "rejected", "text", "id"]  # fmt: skip
ROLES = ["system", "user", "assistant", "tool", "", "User"]
HH = [
    "\n\nHuman:",
    "\n\nAssistant:",
    "\n\nHuman: hi",
    "\n\nAssistant: ok",
    " ",
    "x",
    "\n",
    "Human:",
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
    st.sampled_from(ROLES),
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), inner, max_size=6),
    ),
    max_leaves=20,
)
hh_text = st.lists(st.one_of(st.sampled_from(HH), st.text(max_size=8)), max_size=8).map("".join)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={k: st.one_of(json_values, hh_text) for k in KEYS}),
    st.fixed_dictionaries({"chosen": hh_text, "rejected": hh_text}),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "role": st.one_of(st.sampled_from(ROLES), json_values),
                        "content": st.one_of(st.text(max_size=10), json_values),
                    },
                ),
                max_size=4,
            )
        }
    ),  # fmt: skip
)

# Raw JSONL lines: valid JSON, mangled JSON, invalid UTF-8, deep nesting, huge numbers, NULs.
nasty_lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=40),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(4000, 6000).map(lambda n: b"1" * n),
    st.integers(4000, 6000).map(lambda n: b'{"text": ' + b"9" * n + b"}"),
    st.sampled_from([b"\xff\xfe", b'{"text": "\xc3\x28"}', b"\x00\x00", b'{"text": 1}', b"NaN",
                     b'{"prompt": "a", "response": "b"', b'"\\ud800"', b'{"text": "\\ud800"}']),
)  # fmt: skip
jsonl_files = st.lists(nasty_lines, max_size=6).map(lambda ls: b"\n".join(ls) + b"\n")


def _write(data: bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


# -- formats.py ----------------------------------------------------------------------------------
@FUZZ
@given(obj=records, layout=st.one_of(st.sampled_from(formats.SFT_LAYOUTS), st.text(max_size=6)))
def test_parse_sft_record_only_data_errors(obj, layout):
    try:
        convs = formats.parse_sft_record(obj, "rec", layout)
    except DataError as e:
        assert str(e)
        return
    assert convs and all(isinstance(c, formats.Conversation) for c in convs)
    assert all(any(t.role == "assistant" and t.content.strip() for t in c) for c in convs)


@FUZZ
@given(obj=records, allow_empty=st.booleans())
def test_parse_preference_record_only_data_errors(obj, allow_empty):
    try:
        pair = formats.parse_preference_record(obj, "rec", allow_empty)
    except DataError as e:
        assert str(e)
        return
    assert isinstance(pair, formats.PreferencePair)
    assert isinstance(pair.chosen, str) and isinstance(pair.rejected, str)
    assert any(t.content.strip() for t in pair.prompt)


@FUZZ
@given(chosen=hh_text, rejected=hh_text)
def test_hh_split_only_data_errors(chosen, rejected):
    try:
        pair = formats.split_hh_pair(chosen, rejected, "rec")
    except DataError as e:
        assert str(e)
        return
    assert chosen != rejected and pair.prompt.turns


@FUZZ
@given(data=jsonl_files, gz=st.booleans(), kind=st.sampled_from(["sft", "preferences"]),
       on_error=st.sampled_from(["stop", "skip"]), truncate=st.booleans())  # fmt: skip
def test_jsonl_readers_only_data_errors(data, gz, kind, on_error, truncate):
    if gz:
        data = gzip.compress(data)
        if truncate:
            data = data[: max(len(data) // 2, 1)]
    path = _write(data, ".jsonl.gz" if gz else ".jsonl")
    stats = formats.ReadStats()
    read = formats.read_sft if kind == "sft" else formats.read_preferences
    try:
        out = list(read(path, on_error=on_error, stats=stats))
        assert stats.records == len(out)
        assert stats.skipped == len(stats.errors) or len(stats.errors) == formats.MAX_KEPT_ERRORS
    except DataError as e:
        assert path in str(e)
    finally:
        os.remove(path)


# -- sources.py ----------------------------------------------------------------------------------
@FUZZ
@given(data=jsonl_files, suffix=st.sampled_from([".jsonl", ".jsonl.gz", ".txt", ".md"]),
       on_error=st.sampled_from(["stop", "skip"]), segment=st.sampled_from(["file", "paragraphs"]),
       invalid_utf8=st.sampled_from(["replace", "drop", "error"]), id_field=st.sampled_from(["", "id"]))  # fmt: skip
def test_file_source_only_data_errors(data, suffix, on_error, segment, invalid_utf8, id_field):
    if suffix == ".jsonl.gz":
        data = gzip.compress(data)[: None if len(data) % 3 else -3]  # sometimes truncated
    path = _write(data, suffix)
    spec = source_defaults() | {"name": "fuzz", "paths": (path,), "segment": segment,
                                "segment_chars": 16, "id_field": id_field}  # fmt: skip
    src = FileSource(spec, ErrorPolicy(on_error), invalid_utf8=invalid_utf8)
    try:
        docs = list(src)
        assert all(isinstance(d.data, (str, bytes)) for d in docs)
    except DataError as e:
        assert str(e)
    finally:
        os.remove(path)


# -- config.py -----------------------------------------------------------------------------------
def _flat_keys():
    from lmtrain.config import _flat_keys

    return sorted(_flat_keys(base_config()))


VALUES = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=string.digits + "()[]{},.-+eE:'\" TrueFalsNn", max_size=16),
    st.sampled_from(["{[]: 1}", "(" * 300 + ")" * 300, "[" * 300, "1" * 5000, "-" * 5000 + "1",
                     "1e999", "nan", "()", "(1,)", "None", "{1: 2}", "lambda: 0", "__import__('os')"]),
)  # fmt: skip
overrides = st.lists(
    st.one_of(
        st.tuples(st.one_of(st.sampled_from(_flat_keys()), st.text(max_size=10)), VALUES).map(
            lambda kv: f"{kv[0]}={kv[1]}"
        ),
        st.text(max_size=15),
    ),
    max_size=4,
)


@FUZZ
@given(items=overrides, prefix=st.sampled_from(["", "config.", "--config."]))
def test_apply_overrides_only_config_errors(items, prefix):
    cfg = base_config()
    try:
        apply_overrides(cfg, [prefix + i for i in items])
    except ConfigError as e:
        assert str(e)


@settings(FUZZ, max_examples=max(N // 2, 10))
@given(
    body=st.one_of(
        st.text(max_size=60),
        st.sampled_from([
            "def get_config(:", "get_config = 3", "def get_config():\n    return 1",
            "raise RuntimeError('boom')", "import does_not_exist_xyz", "def get_config():\n    return {}",
            "from lmtrain.config import base_config\ndef get_config():\n    c = base_config()\n    c.nope = 1\n    return c",
            "from lmtrain.config import base_config\ndef get_config():\n    c = base_config()\n    c.train.steps = 'x'\n    return c",
            "def get_config():\n    return get_config()",
        ]),
    ),
    items=overrides,
)  # fmt: skip
def test_load_config_only_config_errors(body, items):
    path = _write(body.encode("utf-8", "surrogatepass"), ".py")
    try:
        load_config(path, items)
    except ConfigError as e:
        assert str(e)
    except LmtrainError as e:  # pragma: no cover - a different typed error is still typed
        pytest.fail(f"expected ConfigError, got {type(e).__name__}: {e}")
    finally:
        os.remove(path)


def test_fuzz_found_inputs_are_typed_errors(tmp_path):
    """The inputs that crashed the readers before they were hardened (kept as regressions)."""
    cfg = base_config()
    for bad in ["train.steps={[]: 1}", "train.steps=" + "(" * 300 + ")" * 300, "mesh.shape=" + "[" * 300,
                "seed=" + "-" * 5000 + "1"]:  # fmt: skip
        with pytest.raises(ConfigError, match="cannot read"):
            apply_overrides(cfg, [bad])
    for line in [b"1" * 5000, b"[" * 5000 + b"]" * 5000, b'{"text": ' + b"9" * 5000 + b"}"]:
        path = tmp_path / "bad.jsonl"
        path.write_bytes(line + b"\n")
        with pytest.raises(DataError, match="bad.jsonl:1"):
            list(formats.read_sft(path))
        spec = source_defaults() | {"name": "t", "paths": (str(path),)}
        with pytest.raises(DataError, match="bad.jsonl:1"):
            list(FileSource(spec, ErrorPolicy("stop")))
    cfg_file = tmp_path / "broken.py"
    cfg_file.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="broken.py"):
        load_config(str(cfg_file))
