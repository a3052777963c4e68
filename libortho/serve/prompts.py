"""A request's prompt as token ids: a completion's prompt as it is, chat messages through the
tokenizer's chat template.

Tokenizing costs time in proportion to the text, so a prompt that cannot fit the context is
refused before it is tokenized: no tokenizer yields fewer than one token per
`config.prompt_chars_per_token` characters in practice, so longer text cannot fit. The functions
here block (tokenizing, rendering the template): the HTTP side runs them off the event loop.

The chat template is tried once at start-up on a one-message conversation (`chat_template_problem`):
a template that fails there would fail every chat request, so chat is refused (400) from the start,
with the reason logged once. A template that refuses only some conversations (e.g. a system
message) gets a 400 naming its reason for those.
"""
from __future__ import annotations

from .config import ServeConfig
from .errors import APIError, one_line
from .schema import ChatRequest, CompletionRequest

PROBE_CONVERSATION = [{"role": "user", "content": "Hello"}]


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text of a conversation, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def chat_template_problem(tokenizer, model_name: str) -> str | None:
    """Why this tokenizer cannot serve chat (no template, or one that fails on a one-message
    conversation), as one line; None when it can."""
    if not getattr(tokenizer, "chat_template", None):
        return f"the model {model_name!r} has no chat template; use /v1/completions"
    try:
        text = render_chat(tokenizer, PROBE_CONVERSATION)
        if not isinstance(text, str):
            raise TypeError(f"it rendered a {type(text).__name__}, not text")
    except Exception as err:  # whatever the template does, chat cannot work with it
        return (f"the chat template of the model {model_name!r} fails on a one-message conversation "
                f"({type(err).__name__}: {one_line(err)}); use /v1/completions")
    return None


def prompt_ids(req: CompletionRequest | ChatRequest, endpoint: str, tokenizer, context_len: int,
               config: ServeConfig, chat_problem: str | None) -> list[int]:
    """The prompt's token ids; APIError 400 if it is empty, cannot fit the context, or (chat) the
    template cannot render it. Blocks: call it off the event loop."""
    if endpoint == "completions":
        text, param = req.prompt_text(), "prompt"
        _check_chars(len(text), param, context_len, config)
        ids = tokenizer(text)["input_ids"]
    else:
        text, param = _chat_text(req, tokenizer, context_len, config, chat_problem), "messages"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    if len(ids) >= context_len:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context holds {context_len} "
                            "(prompt plus completion)", param=param, code="context_length_exceeded")
    return list(ids)


def _chat_text(req: ChatRequest, tokenizer, context_len: int, config: ServeConfig, chat_problem: str | None) -> str:
    """The conversation rendered by the chat template, checked for length before and after."""
    if chat_problem is not None:
        raise APIError(400, chat_problem, param="messages", code="chat_unavailable")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    _check_chars(sum(len(m["content"]) for m in messages), "messages", context_len, config)
    try:
        text = render_chat(tokenizer, messages)
    except Exception as err:  # the template refuses this conversation (e.g. "system role not supported")
        raise APIError(400, f"the chat template refused these messages: {type(err).__name__}: {one_line(err)}",
                       param="messages") from None
    _check_chars(len(text), "messages", context_len, config)
    return text


def _check_chars(chars: int, param: str, context_len: int, config: ServeConfig) -> None:
    """APIError 400 (context_length_exceeded) for text too long to fit the context, before tokenizing it."""
    limit = config.prompt_chars_per_token * context_len
    if chars > limit:
        raise APIError(400, f"the prompt has {chars} characters; this model's context holds {context_len} tokens, "
                            f"so at most {limit} characters ({config.prompt_chars_per_token} per token) are read",
                       param=param, code="context_length_exceeded")

