"""Which checkpoint a resume trusts: every file verified first, the newest loadable one wins, another adapter
shape is refused. Checkpoints here are built from real torch.save / safetensors files (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from peftplan.runtime.checkpoints import CheckpointMismatch, check_matches_plan, last_checkpoint, problem  # noqa: E402

LORA = {"name": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}


def make_checkpoint(root: Path, step: int, rank: int = 8, dora: bool = False) -> Path:
    from safetensors.torch import save_file

    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 100}))
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank, "use_dora": dora,
                                                          "target_modules": ["q_proj", "v_proj"]}))
    save_file({"a": torch.randn(rank, 16), "b": torch.randn(16, rank)}, str(ckpt / "adapter_model.safetensors"))
    params = [torch.nn.Parameter(torch.randn(64, 64))]
    opt = torch.optim.AdamW(params)
    params[0].grad = torch.randn(64, 64)
    opt.step()
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    torch.save(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).state_dict(), ckpt / "scheduler.pt")
    torch.save({"python": list(range(600)), "cpu": torch.get_rng_state()}, ckpt / "rng_state.pth")
    return ckpt


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors",
                                  "trainer_state.json"])
def test_truncated_file_falls_back_to_the_previous_checkpoint(tmp_path, capsys, name):
    make_checkpoint(tmp_path, 4)
    newest = make_checkpoint(tmp_path, 6)
    truncate(newest / name)
    assert problem(newest) is not None
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    err = capsys.readouterr().err
    assert str(newest) in err and "trying an older checkpoint" in err


def test_a_flipped_byte_inside_an_archive_is_found(tmp_path):
    ckpt = make_checkpoint(tmp_path, 2)
    data = bytearray((ckpt / "rng_state.pth").read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a stored member: only the CRC check sees it
    (ckpt / "rng_state.pth").write_bytes(bytes(data))
    assert "rng_state.pth" in (problem(ckpt) or "")
    assert last_checkpoint(tmp_path) is None


def test_complete_checkpoint_is_trusted(tmp_path):
    make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 10)
    assert problem(newest) is None
    assert last_checkpoint(tmp_path) == newest


@pytest.mark.parametrize("change,words", [({"rank": 16}, "rank 8 (plan: 16)"),
                                          ({"name": "dora"}, "DoRA False (plan: True)"),
                                          ({"name": "full"}, "fine-tunes every weight"),
                                          ({"target_modules": ["q_proj", "k_proj"]}, "target_modules")])
def test_checkpoint_of_another_adapter_shape_is_refused(tmp_path, change, words):
    ckpt = make_checkpoint(tmp_path, 4)
    plan = {**LORA, "alpha": 16.0, **change}
    if plan["name"] != "full" and "rank" in change:
        plan["alpha"] = 16.0
    with pytest.raises(CheckpointMismatch, match="cannot be resumed|fine-tunes") as info:
        check_matches_plan(ckpt, plan)
    assert words in str(info.value)
    check_matches_plan(ckpt, {**LORA, "target_modules": ["v_proj", "q_proj"]})  # same set, any order: fine
