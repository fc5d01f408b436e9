"""Serving a model imported from Hugging Face prompts chat with the model's own template,
exactly as ``transformers``' ``apply_chat_template`` does."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")
import transformers  # noqa: E402

from lmtrain.errors import DataError  # noqa: E402
from lmtrain.interop.hf_import import import_hf  # noqa: E402
from lmtrain.serve.hf_chat import HFChatTemplate  # noqa: E402
from lmtrain.serve.request import RequestError  # noqa: E402
from lmtrain.serve.server import load_service  # noqa: E402
from tests.support.hf_tiny import save_model  # noqa: E402

# Uses the special-token strings, a loop, trim_blocks/lstrip_blocks whitespace rules and
# raise_exception, as real templates do.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}\n"
    "  {% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}\n"
    "{{ m['role'] }}: {{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "It was the age of wisdom."},
    {"role": "user", "content": " it was the epoch of belief "},
    {"role": "assistant", "content": "It was the best of times"},
    {"role": "user", "content": "it was the worst of times"},
]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_chat")
    hf_dir = str(root / "hf")
    save_model("llama", hf_dir)
    cfg_path = os.path.join(hf_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = TEMPLATE
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    workdir = str(root / "lm")
    import_hf(hf_dir, workdir, compute_dtype="float32")
    return hf_dir, workdir


def test_chat_prompt_ids_equal_transformers_apply_chat_template(imported):
    hf_dir, workdir = imported
    want = transformers.AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True
    )
    if hasattr(want, "keys"):  # newer transformers return a BatchEncoding
        want = want["input_ids"]
    service = load_service(workdir, drift_reference=False)
    try:
        assert service.hf_template is not None
        ids, extra_stops = service.chat_prompt_ids(MESSAGES)
        assert ids == list(want) and extra_stops == ()
        assert ids[0] == service.tokenizer.bos_id  # "<s>" in the text became the special id
        with pytest.raises(RequestError, match="unknown role robot"):
            service.chat_prompt_ids([{"role": "robot", "content": "x"}])
    finally:
        service.engine.close()


def test_template_read_from_chat_template_jinja_and_errors(tmp_path):
    src = tmp_path / "hf_source"
    src.mkdir()
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert HFChatTemplate.from_workdir(str(tmp_path)) is None  # no template: lmtrain's own
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}{{ eos_token }}")
    t = HFChatTemplate.from_workdir(str(tmp_path))
    assert t.render([{"role": "user", "content": "hi"}]) == "hi</s>"
    with pytest.raises(DataError, match="chat template refused"):
        t.render([])
