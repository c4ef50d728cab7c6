"""Chat templates, SFT tokenization with assistant-only labels, and DPO prompt templating.

:func:`tokenize_sft` renders a conversation with the tokenizer's chat template (or a
configured one), tokenizes it once, and marks the tokens of every assistant turn. Where an
assistant turn sits in the text is found by rendering the conversation's prefixes: the
turn starts where ``messages[:i]`` rendered *with* the generation prompt ends, and ends
where ``messages[:i+1]`` ends (trailing whitespace excluded), so the masks are exact for
any template whose renderings of prefixes are prefixes of the whole (ChatML, Llama, Mistral,
Gemma, Phi...). A template that breaks that rule gives the row a ``template_error``.
Tokens are assigned by their character offsets (fast tokenizers' ``offset_mapping``).

Labels are the input ids on assistant tokens and -100 everywhere else (the system prompt,
user turns, role headers), as TRL's ``assistant_only_loss`` does; models shift them.
"""

from __future__ import annotations

from typing import Any

from solar_ray.config import ConfigError
from solar_ray.data.normalize import RowError

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "NAMED_TEMPLATES",
    "assistant_spans",
    "ensure_chat_template",
    "template_prompt",
    "tokenize_sft",
]

IGNORE_INDEX = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: templates a config can name instead of spelling out Jinja
NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE}


def ensure_chat_template(
    tokenizer: Any, template: str | None, field: str = "prepare.chat_template"
) -> None:
    """Install ``template`` (a name from :data:`NAMED_TEMPLATES` or Jinja) on the tokenizer.

    Without one, the tokenizer must already have a chat template; otherwise a ConfigError
    names ``field``.
    """
    if template:
        tokenizer.chat_template = NAMED_TEMPLATES.get(template, template)
    elif not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{field}: the tokenizer has no chat template; set {field} to 'chatml' or a "
            "Jinja template"
        )


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja raise_exception() for role orders it refuses, etc.
        raise RowError("template_error", f"{type(e).__name__}: {str(e)[:200]}") from None


def assistant_spans(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(head)):
            raise RowError("template_error", f"rendering of turn {i} is not a prefix of the whole")
        end = len(upto.rstrip())
        if end > len(head):
            spans.append((len(head), end))
    return text, spans


def tokenize_sft(
    messages: list[dict],
    tokenizer: Any,
    seq_len: int,
    overflow: str = "reject",
) -> dict[str, list[int]]:
    """Tokenize one conversation for SFT: ``input_ids``, ``assistant_masks``, ``labels``.

    ``assistant_masks`` is 1 on the tokens of assistant turns (their text and end-of-turn
    token), 0 elsewhere; ``labels`` equal ``input_ids`` where the mask is 1 and -100
    elsewhere. A conversation longer than ``seq_len`` tokens raises
    ``RowError("too_long_tokens")`` when ``overflow="reject"`` and is cut to ``seq_len``
    when ``"truncate"``; one left with no assistant token raises
    ``RowError("no_assistant_tokens")``. Plain function: no Ray.
    """
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    mask = [0] * len(ids)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > start and spans[k][0] <= start < spans[k][1]:
            mask[t] = 1
    if len(ids) > seq_len:
        if overflow != "truncate":
            raise RowError("too_long_tokens", f"{len(ids)} tokens > seq_len {seq_len}")
        ids, mask = ids[:seq_len], mask[:seq_len]
    if not any(mask):
        raise RowError("no_assistant_tokens", f"{len(ids)} tokens, none from the assistant")
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "assistant_masks": mask, "labels": labels}


def template_prompt(prompt: str, tokenizer: Any, system: str = "") -> str:
    """A DPO prompt as the model sees it: chat-templated, ending with the generation prompt."""
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": prompt}
    ]
    return _render(tokenizer, messages, generation_prompt=True)
