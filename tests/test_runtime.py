"""Runtime pieces other features build on: templates, log-probs, control vectors."""

from __future__ import annotations

import numpy as np

from edge.generation import LLAMA2_TEMPLATE
from edge.runtime import Runtime
from edge.sampling import Sampling


def test_chat_template_of_the_gguf_is_used(runtime: Runtime) -> None:
    text = runtime.format_chat([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    toks = runtime.chat_tokens([{"role": "user", "content": "Hi"}])
    # Special tokens are parsed as single tokens, not spelled out.
    assert runtime.tokenize("<|im_start|>", add_bos=False, special=True) == [toks[0]]


def test_llama2_fallback_template(runtime: Runtime) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    f = Jinja2ChatFormatter(LLAMA2_TEMPLATE, eos_token="</s>", bos_token="<s>")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert f(messages=msgs).prompt == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]"
    )


def test_logprobs_prefer_natural_text(runtime: Runtime) -> None:
    good = runtime.tokenize("The cat sat on the mat and purred quietly.")
    bad = runtime.tokenize("Mat the quietly on purred cat and the sat.")
    lp_good, lp_bad = runtime.token_logprobs(good), runtime.token_logprobs(bad)
    assert lp_good.shape == (len(good) - 1,) and np.all(lp_good <= 0)
    assert lp_good.sum() > lp_bad.sum() + 5


def test_logprobs_agree_with_greedy_generation(runtime: Runtime) -> None:
    prompt = runtime.tokenize("One, two, three, four,", add_bos=True)
    # no repeat penalty: greedy is then the argmax (with it, a second "," loses to a rarer token)
    runtime.generate("One, two, three, four,", max_tokens=6, sampling=Sampling(temp=0, repeat_penalty=1.0))
    gen = runtime.last.token_ids
    lp = runtime.token_logprobs(prompt + gen)[len(prompt) - 1 :]
    from edge.logprobs import log_softmax

    best = log_softmax(runtime.logits(prompt + gen, first=len(prompt) - 1)[: len(gen)]).max(axis=1)
    # Greedy picked each token as the most likely one, token by token; scored in one batch the
    # log-probs move by the kernels' row effect (≤ 0.2 nats, bias/scorer.py), never by more.
    assert len(lp) == len(gen) == 6 and np.all(lp >= best - 0.2)


def test_control_vector_changes_and_restores_logits(runtime: Runtime) -> None:
    toks = runtime.tokenize("The weather in Paris is")
    base = runtime.token_logprobs(toks)
    n_layers, n_embd = runtime.info.n_layers, runtime.info.n_embd
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((n_layers, n_embd)).astype(np.float32)
    runtime.set_control_vector(vec, scale=0.5)
    steered = runtime.token_logprobs(toks)
    runtime.set_control_vector(None)
    restored = runtime.token_logprobs(toks)
    assert np.abs(steered - base).max() > 0.1
    np.testing.assert_allclose(restored, base, atol=1e-4)
