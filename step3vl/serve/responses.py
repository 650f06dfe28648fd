"""Engine outputs → OpenAI response bodies and server-sent-event chunks (chat and completions)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from step3vl.engine.outputs import CompletionOutput, RequestOutput
from step3vl.serve.protocol import ChatChoice, ChatMessage, CompletionChoice, Usage
from step3vl.serve.reasoning import ReasoningDeltas, split_reasoning
from step3vl.serve.tool_calls import NO_TOOLS, ToolDeltas, ToolPlan, answer_finish_reason


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def usage_of(outs: list[RequestOutput], think_end_id: int | None = None) -> Usage:
    """think_end_id: with the reasoning split on, also count the reasoning tokens (up to and including the first
    `</think>`; all of them when it never came)."""
    usage = Usage.of(sum(len(o.prompt_token_ids) for o in outs),
                     sum(len(c.token_ids) for o in outs for c in o.outputs),
                     sum(o.num_cached_tokens for o in outs))
    if think_end_id is not None:
        usage.completion_tokens_details = {"reasoning_tokens": sum(
            _reasoning_tokens(c.token_ids, think_end_id) for o in outs for c in o.outputs)}
    return usage


def _reasoning_tokens(ids: list[int], think_end_id: int) -> int:
    return ids.index(think_end_id) + 1 if think_end_id in ids else len(ids)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _top(entries: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely alternatives; tokens a rule masked out (-inf) are not alternatives (and -inf is not
    JSON)."""
    return sorted(((t, v) for t, v in entries.items() if math.isfinite(v)), key=lambda kv: -kv[1])[:k]


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int) -> dict:
    """OpenAI chat format: one entry per sampled token with its log-prob and the `top_n` most likely ones."""
    def entry(t: int, lp: float) -> dict:
        s = _token_text(tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**entry(t, d[t]), "top_logprobs": [entry(i, v) for i, v in _top(d, top_n)]}
                        for t, d in zip(token_ids, logprobs)]}


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int,
                        text_offset: int = 0) -> dict:
    """OpenAI (legacy) completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [_token_text(tokenizer, t) for t in token_ids]
    offsets, pos = [], text_offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [d[t] for t, d in zip(token_ids, logprobs)],
            "top_logprobs": [{_token_text(tokenizer, i): v for i, v in _top(d, top_n)} for d in logprobs],
            "text_offset": offsets}


def chat_choice(c: CompletionOutput, tokenizer, reasoning: bool, top_n: int | None,
                tools: ToolPlan = NO_TOOLS) -> ChatChoice:
    thought, content = split_reasoning(c.text, finished=True) if reasoning else ("", c.text)
    calls = ToolDeltas(tools)
    content, deltas = calls.delta(content, finished=True)
    if deltas and not content:  # vLLM's: text before a call (even whitespace) stays content, as it streamed
        content = None
    message = ChatMessage(content=content, reasoning_content=thought or None,
                          tool_calls=[{k: v for k, v in d.items() if k != "index"} for d in deltas] or None)
    lp = chat_logprobs(tokenizer, c.token_ids, c.logprobs, top_n) if top_n is not None and c.logprobs else None
    return ChatChoice(index=c.index, message=message, logprobs=lp,
                      finish_reason=answer_finish_reason(tools, calls.called, c.finish_reason),
                      stop_reason=c.stop_reason)


def echo_logprobs(tokenizer, out: RequestOutput, top_n: int) -> dict:
    """The legacy completions format for an echoed prompt: the first token has no log-prob (null)."""
    ids, plp = out.prompt_token_ids, out.prompt_logprobs
    first = _token_text(tokenizer, ids[0])
    head = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    return join_logprobs(head, completion_logprobs(tokenizer, ids[1:], plp[1:], top_n, len(first)))


def join_logprobs(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


def vllm_prompt_logprobs(tokenizer, out: RequestOutput) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, decoded_token}}."""
    if out.prompt_logprobs is None:
        return None
    return [None if d is None else {str(t): {"logprob": v, "decoded_token": _token_text(tokenizer, t)}
                                    for t, v in d.items() if math.isfinite(v)} for d in out.prompt_logprobs]


def completion_choices(base: int, out: RequestOutput, tokenizer, top_n: int | None, echo: str,
                       echo_lp: bool) -> list[CompletionChoice]:
    """One prompt's choices (index base + sample index); the prompt's own log-probs are formatted once for all."""
    prompt_lp = echo_logprobs(tokenizer, out, top_n) if echo_lp else None
    prompt_logprobs = vllm_prompt_logprobs(tokenizer, out)
    choices = []
    for c in out.outputs:
        lp = (completion_logprobs(tokenizer, c.token_ids, c.logprobs, top_n, len(echo))
              if top_n is not None and c.logprobs else None)
        choices.append(CompletionChoice(index=base + c.index, text=echo + c.text, logprobs=join_logprobs(prompt_lp, lp),
                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                        prompt_logprobs=prompt_logprobs))
    return choices


@dataclass(slots=True)
class ChoiceStream:
    """What one choice of a stream has sent so far."""
    deltas: ReasoningDeltas
    calls: ToolDeltas | None = None
    tokens_sent: int = 0
    text_offset: int = 0  # completions' logprobs: characters before the next token
    started: bool = False
    done: bool = False


@dataclass
class StreamState:
    """Turns successive cumulative outputs into delta chunks, per choice index."""
    reasoning: bool
    tools: ToolPlan = NO_TOOLS
    choices: dict[int, ChoiceStream] = field(default_factory=dict)
    echo_lp: dict[int, dict] = field(default_factory=dict)  # completions: a prompt's echoed log-probs, by base index

    def chat_deltas(self, out: RequestOutput, tokenizer, top_n: int | None) -> list[dict]:
        chunks = []
        for c in out.outputs:
            st = self.choices.setdefault(c.index, ChoiceStream(ReasoningDeltas(self.reasoning), ToolDeltas(self.tools)))
            if st.done:
                continue
            finished = c.finish_reason is not None
            thought, text = st.deltas.delta(c.text, finished)
            text, calls = st.calls.delta(text, finished)
            if not (thought or text or calls or finished or not st.started):
                continue
            delta: dict[str, Any] = {} if st.started else {"role": "assistant", "content": ""}
            if thought:
                delta["reasoning_content"] = thought
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
            new = slice(st.tokens_sent, len(c.token_ids))
            lp = (chat_logprobs(tokenizer, c.token_ids[new], c.logprobs[new], top_n)
                  if top_n is not None and c.logprobs and c.token_ids[new] else None)
            st.tokens_sent, st.started, st.done = len(c.token_ids), True, c.finish_reason is not None
            chunks.append({"index": c.index, "delta": delta, "logprobs": lp,
                           "finish_reason": answer_finish_reason(self.tools, st.calls.called, c.finish_reason),
                           "stop_reason": c.stop_reason})
        return chunks

    def text_deltas(self, out: RequestOutput, tokenizer, top_n: int | None, base: int, echo: str,
                    echo_lp: bool = False) -> list[dict]:
        """Completions: choice index = base + sample index; `echo` (the prompt) leads each choice's first chunk,
        with the prompt's log-probs when `echo_lp`."""
        chunks = []
        for c in out.outputs:
            st = self.choices.setdefault(base + c.index, ChoiceStream(ReasoningDeltas(False), text_offset=len(echo)))
            if st.done:
                continue
            _, text = st.deltas.delta(c.text, c.finish_reason is not None)
            if not st.started:
                text = echo + text
            if not (text or c.finish_reason):
                continue
            new = slice(st.tokens_sent, len(c.token_ids))
            lp = (completion_logprobs(tokenizer, c.token_ids[new], c.logprobs[new], top_n, st.text_offset)
                  if top_n is not None and c.logprobs and c.token_ids[new] else None)
            if lp is not None:
                st.text_offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
            if echo_lp and not st.started:
                if base not in self.echo_lp:  # once per prompt, whichever of its choices starts first
                    self.echo_lp[base] = echo_logprobs(tokenizer, out, top_n)
                lp = join_logprobs(self.echo_lp[base], lp)
            st.tokens_sent, st.started, st.done = len(c.token_ids), True, c.finish_reason is not None
            chunks.append({"index": base + c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                           "stop_reason": c.stop_reason})
        return chunks
