"""The chat template a Hugging Face model shipped with, for serving models brought in by
``lmtrain import hf``.

``import hf`` keeps the model's ``tokenizer_config.json`` and ``chat_template.jinja`` under
``<workdir>/hf_source/``; the template is rendered here as ``transformers`` renders it in
``apply_chat_template`` (a sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks``,
the ``loopcontrols`` extension, ``raise_exception`` and the tokenizer's special-token strings)
and the text is tokenized without adding specials, so the model sees the prompt it was tuned on.
"""

from __future__ import annotations

import json
import os

from lmtrain.errors import ConfigError, DataError

HF_SOURCE = "hf_source"  # the folder lmtrain.interop.hf_import writes


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken serialised by transformers
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_template(workdir: str) -> tuple[str, dict] | None:
    """(template source, special-token strings) recorded by ``import hf``, or None."""
    src = os.path.join(workdir, HF_SOURCE)
    cfg_path = os.path.join(src, "tokenizer_config.json")
    cfg: dict = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    template = None
    jinja_path = os.path.join(src, "chat_template.jinja")
    if os.path.isfile(jinja_path):  # newer transformers save it beside the config
        with open(jinja_path) as f:
            template = f.read()
    elif isinstance(cfg.get("chat_template"), str):
        template = cfg["chat_template"]
    elif isinstance(cfg.get("chat_template"), list):  # named templates: the "default" one
        named = {t.get("name"): t.get("template") for t in cfg["chat_template"]}
        template = named.get("default")
    if not template:
        return None
    specials = {
        k: _token_text(cfg.get(k))
        for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")
    }
    return template, {k: v for k, v in specials.items() if v is not None}


class HFChatTemplate:
    """Renders OpenAI-style messages with a model's own Jinja chat template."""

    def __init__(self, source: str, specials: dict[str, str]):
        try:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise ConfigError(
                f"this model ships a Jinja chat template and serving it needs jinja2 ({e}); "
                "pip install jinja2"
            ) from None

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                sort_keys=sort_keys,
            )  # fmt: skip

        def strftime_now(fmt):
            import datetime

            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self._jinja_error = jinja2.exceptions.TemplateError
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"the model's chat template does not parse: {e}") from None
        self.specials = specials

    @classmethod
    def from_workdir(cls, workdir: str) -> HFChatTemplate | None:
        found = find_template(workdir)
        return None if found is None else cls(*found)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.specials
            )
        except self._jinja_error as e:
            raise DataError(f"the model's chat template refused these messages: {e}") from None
        except Exception as e:  # noqa: BLE001 - user data reaching template code: name it
            raise DataError(
                f"the model's chat template failed on these messages: {type(e).__name__}: {e}"
            ) from None

    def encode(self, messages: list[dict], tokenizer) -> list[int]:
        return tokenizer.encode(self.render(messages))
