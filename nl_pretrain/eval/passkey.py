"""S-NIAH-1 (RULER's single needle, passkey): a number hidden in repeated filler text, asked for at the end.

The haystack repeats the filler until the prompt reaches the requested length in tokens; the needle
sentence is inserted at a depth drawn per trial; the model continues the question greedily and a
trial counts when the generated text starts with the passkey's digits (leading spaces ignored).
"""
from __future__ import annotations

import random
from typing import List

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def minimum_length(tokenizer) -> int:
    """Tokens of BOS + needle + question (5-digit keys): the shortest prompt there is."""
    return 1 + len(tokenizer.encode(NEEDLE.format(key="12345"))) + len(tokenizer.encode(QUESTION))


def check_lengths(tokenizer, lengths: List[int]) -> None:
    low = minimum_length(tokenizer)
    short = [n for n in lengths if n < low]
    if short:
        raise ValueError(f"--passkey-lengths {','.join(map(str, short))}: too short for the needle and question "
                         f"({low} tokens with this tokenizer); use lengths >= {low}")


def passkey_prompt(tokenizer, length: int, key: str, depth: float) -> List[int]:
    """Token ids (BOS first) of ``length`` tokens: filler with the needle at ``depth`` in [0, 1]."""
    filler = tokenizer.encode(FILLER)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    check_lengths(tokenizer, [length])
    room = length - 1 - len(needle) - len(question)
    hay = (filler * (room // max(1, len(filler)) + 1))[:room]
    at = int(round(depth * room))
    return [tokenizer.bos_id] + hay[:at] + needle + hay[at:] + question


def run_passkey(session, lengths: List[int], trials: int, seed: int = 0) -> dict:
    """Accuracy per length (``trials`` prompts each, one batch per length)."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        keys = [str(rng.randint(10000, 99999)) for _ in range(trials)]
        depths = [rng.random() for _ in range(trials)]
        prompts = [passkey_prompt(session.tokenizer, n, k, d) for k, d in zip(keys, depths)]
        gen = session.generate(prompts, max_new_tokens=len(session.tokenizer.encode(" " + keys[0])) + 2,
                               temperature=0.0, stop_at_eos=True)
        hits = [t.lstrip().startswith(k) for t, k in zip(gen.texts, keys)]
        out.append({"length": n, "prompt_tokens": max(gen.prompt_tokens), "trials": trials,
                    "accuracy": sum(hits) / trials, "answers": gen.texts, "keys": keys})
    return {"task": "s-niah-1", "lengths": out}
