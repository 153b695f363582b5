"""``grpo export``: a run's policy as a plain Hugging Face model directory (LoRA merged, or the adapter
alone) that transformers, peft and vLLM load without grpo_cli, with the run's logits, tokenizer, chat
template and stop tokens."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_cli.cli import main
from grpo_cli.config.schema import ModelConfig
from grpo_cli.models.load import load_model_and_tokenizer

TEXT = "12+3*4 = 24\n#### 24 (x)"
"""Digits, spaces, a newline and brackets: what the character tokenizer must keep through the export."""


def _train(out: Path, *overrides: str) -> Path:
    from grpo_cli.trainer.loop import train

    train(
        compose(
            "sft_arithmetic",
            "trainer.batch_size=4",
            "trainer.steps=2",
            "trainer.lr=1e-2",
            f"output_dir={out}",
            *overrides,
        )
    )
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lora") / "run", "lora.enabled=true", "trainer.save_every=1")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("full") / "run")


def _export(run, out, *overrides):
    main(["export", f"run={run}", f"output_dir={out}", *overrides])
    return out


def _error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _logits(model, tok, text=TEXT) -> torch.Tensor:
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def _policy(ckpt: Path):
    """The run's policy as training left it: a LoRA adapter on its base unmerged (peft), else the weights."""
    from peft import PeftModel

    model, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(ckpt)))
    if (ckpt / "adapter_config.json").exists():
        base = json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(ckpt))
    return model, tok


def _gen_eos(out: Path):
    return json.loads((out / "generation_config.json").read_text())["eos_token_id"]


@pytest.mark.slow
def test_a_lora_run_exports_merged_with_the_runs_logits_tokenizer_and_stop_tokens(lora_run, tmp_path):
    out = _export(lora_run, tmp_path / "parent" / "merged", "export.dtype=fp32")
    assert not (out / "adapter_config.json").exists() and list(out.glob("*.safetensors"))
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    policy, run_tok = _policy(lora_run / "checkpoints" / "final")
    assert tok(TEXT)["input_ids"] == run_tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT
    base = AutoModelForCausalLM.from_pretrained(lora_run / "base_model")
    assert not torch.allclose(_logits(base, tok), _logits(policy, run_tok), atol=1e-4)  # the adapter trained
    torch.testing.assert_close(_logits(model, tok), _logits(policy, run_tok), atol=1e-5, rtol=1e-5)
    assert _gen_eos(out) == run_tok.eos_token_id  # the tiny model has no chat template: EOS alone
    record = json.loads((out / "export.json").read_text())
    assert record["lora_merged"] and record["source"] == str((lora_run / "checkpoints" / "final").resolve())


@pytest.mark.slow
def test_a_full_fine_tune_exports_in_bf16_by_default_and_loads_without_grpo_cli(full_run, tmp_path):
    out = _export(full_run, tmp_path / "bf16")
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    fp32 = _export(full_run, tmp_path / "fp32", "export.dtype=fp32")
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = torch.tensor([t(sys.argv[2])['input_ids']])\n"
        "torch.save((ids, m(input_ids=ids).logits.detach()), sys.argv[3])\n"
        "assert 'grpo_cli' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-c", script, str(fp32), TEXT, str(tmp_path / "l.pt")], check=True, env=env, cwd=tmp_path
    )
    ids, logits = torch.load(tmp_path / "l.pt")
    policy, tok = _policy(full_run / "checkpoints" / "final")
    assert ids[0].tolist() == tok(TEXT, add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(logits, _logits(policy, tok), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_adapter_alone_loads_with_peft_on_its_base(lora_run, full_run, tmp_path, capsys):
    from peft import PeftModel

    out = _export(lora_run, tmp_path / "adapter", "export.adapter_only=true", "export.dtype=fp32")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((lora_run / "base_model").resolve())
    assert not (out / "config.json").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), str(out))
    policy, tok = _policy(lora_run / "checkpoints" / "final")
    torch.testing.assert_close(_logits(model, tok), _logits(policy, tok), atol=1e-5, rtol=1e-5)
    err = _error(capsys, ["export", f"run={full_run}", f"output_dir={tmp_path / 'x'}", "export.adapter_only=true"])
    assert "is a full fine-tune, it has no LoRA adapter" in err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_step_checkpoint_and_a_latest_link_export(lora_run, tmp_path):
    step = lora_run / "checkpoints" / "step_000001"
    out = _export(step, tmp_path / "step", "export.dtype=fp32")
    assert json.loads((out / "export.json").read_text())["source"] == str(step.resolve())
    policy, tok = _policy(step)
    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(out), tok), _logits(policy, tok), atol=1e-5, rtol=1e-5
    )
    (tmp_path / "latest").symlink_to(lora_run)
    again = _export(tmp_path / "latest", tmp_path / "step", "export.dtype=fp32")  # an earlier export is replaced
    assert json.loads((again / "export.json").read_text())["source"] == str(
        (lora_run / "checkpoints" / "final").resolve()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step"]  # no temporary directory left


def test_a_chat_model_keeps_its_template_and_stops_at_the_end_of_turn(real_model, tmp_path):
    src = AutoTokenizer.from_pretrained(real_model)
    src.eos_token = "<|endoftext|>"  # a base-style EOS, so the end of turn is a second stop token
    src.save_pretrained(tmp_path / "src")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / "src" / name).write_bytes((real_model / name).read_bytes())
    out = _export(tmp_path / "src", tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(out)
    assert _gen_eos(out) == [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    chat = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
    assert tok.apply_chat_template(chat, tokenize=False) == src.apply_chat_template(chat, tokenize=False)
    assert tok.chat_template == src.chat_template


def test_push_to_hub_offline_is_one_line_and_the_local_export_is_complete(real_model, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "hub"
    err = _error(capsys, ["export", f"run={real_model}", f"output_dir={out}", "export.push_to_hub=me/model"])
    assert err.startswith("error: export.push_to_hub: uploading to 'me/model' failed (") and str(out) in err
    assert AutoModelForCausalLM.from_pretrained(out) is not None and (out / "export.json").is_file()


def test_export_errors_are_one_line_and_write_nothing(real_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert "run: no such directory" in _error(capsys, ["export", f"run={tmp_path / 'nope'}", f"output_dir={out}"])
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["export", f"run={tmp_path / 'empty'}", f"output_dir={out}"])
    assert "is a directory with no model, adapter or checkpoint" in err
    assert "pass output_dir=" in _error(capsys, ["export", f"run={real_model}"])
    assert "pass run=" in _error(capsys, ["export", f"output_dir={out}"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    err = _error(capsys, ["export", f"run={real_model}", f"output_dir={tmp_path / 'mine'}"])
    assert "is a non-empty directory that is not an earlier export" in err
    assert "did you mean run=" in _error(capsys, ["export", str(real_model)])
    (tmp_path / "rm").mkdir()
    for name in ("config.json", "score_head.safetensors"):
        (tmp_path / "rm" / name).write_text("{}")
    assert "is a reward model" in _error(capsys, ["export", f"run={tmp_path / 'rm'}", f"output_dir={out}"])
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"] and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "rm"]


@pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("vllm")), reason="needs a CUDA GPU and the vllm package"
)
@pytest.mark.slow
def test_vllm_loads_the_export_and_decodes_our_greedy_tokens(tmp_path, monkeypatch):
    from vllm import LLM, SamplingParams

    from grpo_cli.generation import generate_ids

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: CUDA is already up
    heads = ("model.tiny.hidden_size=128", "model.tiny.num_heads=4", "model.tiny.intermediate_size=256")
    run = _train(tmp_path / "run", "lora.enabled=true", *heads)  # heads of 32: vLLM's Triton attention's smallest
    out = _export(run, tmp_path / "vllm", "export.dtype=fp32")
    policy, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(run)))[:2]
    texts = ["1+2*3=", "4*5-6\n", "7 - 8 * 9 =", "12+34\n"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    options = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=24, temperature=0.0)
    ours = generate_ids(policy.cuda().eval(), prompts, engine="fast", **options)
    llm = LLM(
        model=str(out),
        dtype="float32",
        attention_backend="TRITON_ATTN",
        enforce_eager=True,
        seed=0,
        gpu_memory_utilization=0.1,
        max_model_len=256,
    )
    params = SamplingParams(temperature=0.0, max_tokens=24)
    by_ids = [list(r.outputs[0].token_ids) for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    by_text = [list(r.outputs[0].token_ids) for r in llm.generate(texts, params)]
    assert by_text == by_ids  # vLLM's own tokenizer (AutoTokenizer on the export) gives our prompt ids
    stopped = [row[: next((i + 1 for i, t in enumerate(row) if t == tok.eos_token_id), len(row))] for row in ours]
    pairs = [(a, b) for x, y in zip(stopped, by_ids) for a, b in zip(x, y)]
    assert sum(a == b for a, b in pairs) / len(pairs) >= 0.9  # greedy argmax agrees up to the kernels' rounding
