"""Sampling rules: greedy, temperature, nucleus (top-p), EOS handling."""

import torch

from grpo_cli.generation import _finish, sample_next
from grpo_cli.models.tiny import build_tokenizer


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.5], [3.0, -1.0, 0.0]])
    assert sample_next(logits, 0.0, 1.0, None).tolist() == [1, 0]


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities [0.5, 0.3, 0.2]: top_p = 0.6 keeps {0, 1} (mass before token 1 is 0.5 < 0.6,
    # before token 2 it is 0.8 >= 0.6), so token 2 is never drawn; top_p = 0.4 keeps token 0 only.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(4000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, 0.6, g)
    assert set(draws.tolist()) == {0, 1}
    frac1 = (draws == 1).float().mean().item()
    assert abs(frac1 - 0.3 / 0.8) < 0.03  # renormalised over the kept set: 0.375
    assert set(sample_next(logits, 1.0, 0.4, g).tolist()) == {0}


def test_temperature_flattens_the_distribution():
    logits = torch.log(torch.tensor([[0.9, 0.1]])).expand(4000, 2)
    g = torch.Generator().manual_seed(0)
    cold = (sample_next(logits, 0.5, 1.0, g) == 1).float().mean().item()  # 0.1^2/(0.81+0.01) = 0.012
    hot = (sample_next(logits, 2.0, 1.0, g) == 1).float().mean().item()  # sqrt(.1)/(sqrt(.9)+sqrt(.1)) = 0.25
    assert cold < 0.03 and 0.2 < hot < 0.3


def test_finish_cuts_after_the_first_eos_and_keeps_it():
    tok = build_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = tok("7*2=14", add_special_tokens=False)["input_ids"]
    g = _finish(tok, [5], ids + [eos, pad, pad], eos)
    assert g.completion_ids == ids + [eos] and g.finished and g.text == "7*2=14"
    cut = _finish(tok, [5], ids, eos)  # no EOS within max_new_tokens: truncated
    assert cut.completion_ids == ids and not cut.finished
