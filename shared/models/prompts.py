"""Turning problems into token ids through the model's own chat template, and back."""
from __future__ import annotations

from typing import Any

from shared.models.tiny_model import CHAT_TEMPLATE
from shared.tasks.task import TaskProblem

END_OF_TURN = "<|im_end|>"


def ensure_chat_template(tokenizer: Any) -> Any:
    """Base models without a template get Qwen's turn format, so prompts look the same everywhere."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The Hugging Face tokenizer both backends use (mlx-lm wraps the same one), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ensure_chat_template(tokenizer)


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes the assistant's turn: <|im_end|> where the vocabulary has it."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
        return token_id
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer: Any) -> set[int]:
    return {end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None}


def chat_messages(problem: TaskProblem) -> list[dict[str, str]]:
    return [{"role": "user", "content": problem.prompt}]


def prompt_texts(tokenizer: Any, problems: list[TaskProblem]) -> list[str]:
    """Each problem through the chat template; rendered once around a placeholder (jinja is slow)."""
    placeholder = "\x00problem\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": placeholder}],
                                             add_generation_prompt=True, tokenize=False)
    if rendered.count(placeholder) != 1:  # a template that transforms the content: render each one
        return [tokenizer.apply_chat_template(chat_messages(p), add_generation_prompt=True, tokenize=False)
                for p in problems]
    prefix, suffix = rendered.split(placeholder)
    return [prefix + p.prompt + suffix for p in problems]


def encode_prompts(tokenizer: Any, problems: list[TaskProblem]) -> list[list[int]]:
    return tokenizer(prompt_texts(tokenizer, problems), add_special_tokens=False)["input_ids"]


def encode_targets(tokenizer: Any, problems: list[TaskProblem]) -> list[list[int]]:
    """SFT completions: the reasoning trace, then the end-of-turn token so the model learns to stop."""
    end = end_of_turn_id(tokenizer)
    encoded = tokenizer([p.completion for p in problems], add_special_tokens=False)["input_ids"]
    return [ids + [end] for ids in encoded]


Example = tuple[list[int], list[int]]


def encode_examples(tokenizer: Any, problems: list[TaskProblem]) -> list[Example]:
    """SFT's (prompt ids, target ids) of each problem."""
    if not problems:  # the tokenizer refuses an empty batch
        return []
    return list(zip(encode_prompts(tokenizer, problems), encode_targets(tokenizer, problems)))


def prompt_ids(tokenizer: Any, problem: TaskProblem) -> list[int]:
    return encode_prompts(tokenizer, [problem])[0]


def target_ids(tokenizer: Any, problem: TaskProblem) -> list[int]:
    return encode_targets(tokenizer, [problem])[0]


def decode_completion(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)
