"""A small byte-level BPE tokenizer in the STEP3-VL / Qwen layout, for generated test checkpoints.

Trained in-process on a built-in English + math corpus (deterministic, well under a second), with the
chat, thinking and image special tokens appended after the BPE vocabulary, as in Qwen's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from step3vl.processor.chat import CHATML_TEMPLATE

# (token, special). Qwen3 marks <think>/</think> as non-special so they survive skip_special_tokens.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<im_patch>", True),
    ("<im_start>", True),
    ("<im_end>", True),
    ("<patch_start>", True),
    ("<patch_end>", True),
    ("<patch_newline>", True),
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2/3's pre-tokenizer split: contractions, letter runs, single digits, punctuation, whitespace.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Look at the image and describe what you see. There is a red car parked next to a tall building.
The cat is sitting on the table near the window, and the sun is shining through the glass.
Please answer the question step by step. Let's think about this problem carefully before answering.
First, we need to understand what the question is asking. Then we can solve it one step at a time.
The answer is the number of apples that remain after she gives away three of them.
In the photograph, two people are walking along the beach while the waves roll onto the sand.
What color is the sky? The sky is blue during the day and dark at night, with stars and the moon.
The chart shows that sales increased every month from January to June, then decreased slightly.
Reading the text in the image, the sign says that the store opens at nine in the morning.
Scientists study the natural world by making observations, forming hypotheses and running experiments.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.
The user asked a question about geometry, so the assistant should reason about angles and lengths.
I think the correct option is B, because the triangle has two equal sides and two equal angles.
Therefore, the final answer is given below. Let me verify the result by substituting it back.
She walked to the market, bought some bread, cheese and fruit, and came home before it rained.
Every morning the children go to school by bus, and in the afternoon they play football in the park.
The table lists the population, area and capital city of each country in the region.
A function maps every input to exactly one output; a graph shows how the output changes with the input.
This is a simple sentence. This is another simple sentence, which is a little longer than the first one.
The museum opened a new exhibition about ancient history, with pottery, coins, tools and jewelry.
Our teacher explained photosynthesis: plants use sunlight, carbon dioxide and water to make sugar and oxygen.
The train departs from platform seven at quarter past eight and arrives in the city around noon.
He repaired the bicycle wheel, adjusted the brakes, and cleaned the chain before riding to work.
Weather forecast: cloudy with occasional showers, strong winds from the north, temperatures falling tonight.
The recipe needs flour, sugar, butter, eggs, milk and a pinch of salt; bake for twenty minutes.
Researchers measured the temperature, pressure and humidity at several locations across the valley.
The diagram illustrates the structure of a cell, including the nucleus, membrane and mitochondria.
Customers can return products within thirty days if they keep the original receipt and packaging.
The orchestra performed a symphony, and the audience applauded enthusiastically after the final movement.
Programming languages such as Python let developers write readable code with functions, classes and modules.
The detective examined every clue, interviewed witnesses, and finally discovered who had taken the painting.
Mountains, rivers, forests and deserts cover different parts of the continent, shaping its climate.
According to the screenshot, the button labeled settings is located in the upper right corner of the window.
The invoice shows the quantity, unit price, subtotal, tax and total amount due by the end of the month.
Birds migrate south during autumn because food becomes scarce and the days grow shorter and colder.
Engineers designed the bridge to withstand earthquakes, heavy traffic and powerful storms from the ocean.
Which of the following statements is true? Explain your reasoning briefly and then give the final answer.
"""

_MATH = """\
Let x be a real number such that 2x + 3 = 11. Subtracting 3 from both sides gives 2x = 8, so x = 4.
The area of a circle with radius r is \\pi r^2, and its circumference is 2 \\pi r.
If f(x) = x^2 - 5x + 6, then f(x) = (x - 2)(x - 3), so the roots are x = 2 and x = 3.
The sum of the interior angles of a triangle is 180 degrees. A right angle measures 90 degrees.
We compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}. The probability of heads is \\frac{1}{2}.
The derivative of \\sin(x) is \\cos(x), and the integral of 2x dx is x^2 + C.
By the Pythagorean theorem, a^2 + b^2 = c^2 for a right triangle with legs a and b and hypotenuse c.
The answer is \\boxed{42}. Hence the minimum value is \\boxed{-1} and the maximum value is \\boxed{7}.
Consider the sequence a_n = 3n + 1. Then a_1 = 4, a_2 = 7, and the sum of the first n terms is n(3n + 5)/2.
The matrix A has determinant det(A) = ad - bc, and it is invertible if and only if det(A) \\neq 0.
"""


def _corpus() -> list[str]:
    lines = (_ENGLISH + _MATH).splitlines()
    arithmetic = [f"{a} + {b} = {a + b} and {a} \\times {b} = {a * b}." for a in range(2, 30, 3) for b in range(3, 40, 7)]
    return lines + arithmetic


def build_tiny_tokenizer(vocab_size: int = 1024, corpus: list[str] | None = None) -> Tokenizer:
    """`vocab_size` counts the special tokens; a corpus too small for it yields fewer merges. corpus: the texts
    the BPE merges are learned from (default: a built-in English + math corpus)."""
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size must be at least {256 + n_special} (256 bytes + {n_special} specials)")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus if corpus is not None else _corpus(), trainer)
    for t, special in SPECIAL_TOKENS:  # one at a time keeps the listed id order
        added = AddedToken(t, special=special, normalized=False)
        if special:
            tok.add_special_tokens([added])
        else:  # add_special_tokens would force special=True
            tok.add_tokens([added])
    return tok


def _tokenizer_config(tok: Tokenizer, ids: dict[str, int]) -> dict:
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": s}
        for t, s in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t, s in SPECIAL_TOKENS if s and t not in (EOS_TOKEN, PAD_TOKEN)],
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 131072,
        "chat_template": CHATML_TEMPLATE,
    }


def write_tiny_tokenizer(path: str | Path, vocab_size: int = 1024, corpus: list[str] | None = None) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`.

    Returns {special token: id}. Special tokens come last, so the tokenizer's size is max(ids) + 1.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(vocab_size, corpus)
    ids = {t: tok.token_to_id(t) for t, _ in SPECIAL_TOKENS}
    tok.save(str(path / "tokenizer.json"))
    cfg = _tokenizer_config(tok, ids)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    special_map = {
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": cfg["additional_special_tokens"],
    }
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return ids
