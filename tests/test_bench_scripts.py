"""The benchmark scripts' new options at tiny sizes (scripts/bench_*.py): they run, print their
tables, and the GRPO loss through our fused log-probs equals the naive one (and Liger's, where
Liger-Kernel is installed), loss for loss and gradient for gradient. Numbers are never timed here."""

import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))  # the scripts import their shared _bench module by name

import bench_logprob  # noqa: E402


def test_fused_grpo_loss_equals_the_naive_one_loss_and_gradients():
    res = bench_logprob.compare_grpo(h=32, v=300, n=2 * bench_logprob.ROW, methods=("fused-torch",))
    r = res["fused-torch"]
    assert r["loss"] == pytest.approx(r["naive"], rel=1e-5) and r["loss"] != 0.0
    assert r["dh"] < 1e-6 and r["dw"] < 1e-6


def test_liger_grpo_loss_equals_ours():
    pytest.importorskip("liger_kernel")
    res = bench_logprob.compare_grpo(h=32, v=300, n=2 * bench_logprob.ROW, methods=("fused-torch", "liger"))
    assert res["liger"]["loss"] == pytest.approx(res["fused-torch"]["loss"], rel=1e-5)
    assert res["liger"]["dh"] < 1e-6 and res["liger"]["dw"] < 1e-6


def test_grpo_loss_is_the_sequence_mean_of_eq_3():
    # one row of 2 tokens, logp = old = ref: ratio 1, KL 0, so the loss is -mean_t(A) / B = -A
    logp = torch.tensor([[-1.0, -2.0]])
    extra = dict(adv=torch.tensor([0.5]), old=logp.clone(), ref=logp.clone())
    assert bench_logprob.grpo_loss(logp, extra).item() == pytest.approx(-0.5)


def test_gemm_floor_leaves_gradients_of_the_right_shapes():
    hidden, weight, ids, adv = bench_logprob._make_inputs(100, 8, 50, torch.float32, "cpu", True)
    bench_logprob._gemm_floor(hidden, weight, ids, adv, rows=32)
    # dh = (h W^T) W and dW = (h W^T)^T h, slice by slice
    logits = hidden.detach() @ weight.detach().T
    torch.testing.assert_close(hidden.grad, logits @ weight.detach())
    torch.testing.assert_close(weight.grad, logits.T @ hidden.detach(), rtol=1e-4, atol=1e-4)


def test_shape_sets_h_and_v_of_a_real_model(capsys):
    args = type("A", (), dict(shape="qwen2.5-0.5b", tokens=512, shapes=None, quick=False))()
    assert bench_logprob.parse_shapes(args) == [(512, 896, 151936)]
    args.shape = "qwen2.5-1.5b"
    assert bench_logprob.parse_shapes(args) == [(512, 1536, 151936)]


@pytest.mark.slow
def test_bench_logprob_grpo_table_at_a_tiny_shape(capsys):
    assert (
        bench_logprob.main(
            ["--shapes", "512x32x300", "--loss", "grpo", "--repeats", "1", "--methods", "naive,fused-torch,gemm"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "check fused-torch at 512x32x300 float32: GRPO loss" in out
    rows = [line for line in out.splitlines() if line.startswith("| 512x32x300 |")]
    assert [r.split(" | ")[2] for r in rows] == ["naive", "fused-torch", "gemm"]
    assert all("n/a" not in r for r in rows)


def test_naive_past_its_memory_bound_is_skipped_with_the_reason(capsys):
    assert bench_logprob.naive_gib(4096, 151936) == pytest.approx(9.27, abs=0.01)
    bench_logprob.main(
        ["--shapes", "512x32x300", "--repeats", "1", "--methods", "naive,gemm", "--naive-max-gib", "0.0001"]
    )
    out = capsys.readouterr().out
    assert "skipped: needs ~0.0 GiB" in out and "| gemm |" in out


@pytest.mark.slow
def test_bench_rollout_at_a_real_shape_with_one_layer(capsys):
    import bench_rollout

    args = ["--shape", "qwen2.5-0.5b", "--layers", "1", "--batch", "2", "--new-tokens", "3", "--repeats", "1"]
    assert bench_rollout.main([*args, "--modes", "greedy", "--engines", "hf,fast"]) == 0
    out = capsys.readouterr().out
    assert "model: qwen2.5-0.5b" in out and "vocabulary 151936" in out
    assert "| greedy | 2x3 | fast |" in out and out.count("| yes |") == 2  # same tokens as HF's generate


@pytest.mark.slow
def test_bench_grpo_step_at_a_real_shape_with_lora_and_a_token_budget(capsys):
    import bench_grpo_step

    args = ["--shape", "qwen2.5-0.5b", "--layers", "1", "--prompts", "1", "--group", "2", "--new-tokens", "2"]
    assert bench_grpo_step.main([*args, "--steps", "1", "--lora", "--fixed-length", "--sides", "ours:8"]) == 0
    out = capsys.readouterr().out
    assert "random qwen2.5-0.5b, 1 layers, LoRA r=16" in out
    row = next(line for line in out.splitlines() if line.startswith("| ours:8 |"))
    assert "n/a" not in row


def test_bench_grpo_step_sides_parse():
    import bench_grpo_step

    m = bench_grpo_step.SIDE.match("ours-ckpt@4:2048+bf16")
    assert (m["name"], m["accum"], m["tokens"], m["precision"]) == ("ours-ckpt", "4", "2048", "bf16")
    assert bench_grpo_step.SIDE.match("trl+bf16")["name"] == "trl" and bench_grpo_step.SIDE.match("ours:0")
    assert bench_grpo_step.SIDE.match("ours:x") is None
