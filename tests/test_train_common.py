"""huabi.train.common: data order, LR shape, EMA, config validation, state files."""

from __future__ import annotations

import math

import pytest
import torch

from huabi.errors import HuabiError
from huabi.train.common import (
    EMA,
    DataOrder,
    LoopConfig,
    LoopParts,
    LRShape,
    atomic_torch_save,
    autocast,
    load_loop_state,
    load_torch_file,
    make_optimizer,
    resolve_precision,
    save_loop_state,
    step_generator,
)


def test_data_order_is_seeded_and_covers_each_epoch_once():
    order = DataOrder(10, 4, seed=3)
    again = DataOrder(10, 4, seed=3)
    seen = torch.cat([order.batch(step) for step in range(5)])  # 20 samples = 2 epochs
    assert torch.equal(seen, torch.cat([again.batch(step) for step in range(5)]))
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # each epoch is reshuffled
    # any step can be asked for directly (resumption needs no history)
    assert torch.equal(DataOrder(10, 4, seed=3).batch(3), seen[12:16])
    assert not torch.equal(DataOrder(10, 4, seed=4).batch(0), seen[:4])


def test_empty_data_order_is_an_error():
    with pytest.raises(HuabiError, match="the training set is empty"):
        DataOrder(0, 4, seed=0)


def test_step_generator_depends_on_seed_salt_and_step_only():
    a = torch.rand(3, generator=step_generator(1, 2, 3))
    assert torch.equal(a, torch.rand(3, generator=step_generator(1, 2, 3)))
    for other in (step_generator(2, 2, 3), step_generator(1, 3, 3), step_generator(1, 2, 4)):
        assert not torch.equal(a, torch.rand(3, generator=other))


def test_lr_shape_warmup_constant_and_cosine():
    constant = LRShape("constant", warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert [constant(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert constant(19) == 1.0
    cosine = LRShape("cosine", warmup_steps=0, total_steps=10, min_ratio=0.1)
    assert cosine(0) == pytest.approx(1.0)
    assert cosine(5) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert cosine(10) == pytest.approx(0.1)
    assert cosine(50) == pytest.approx(0.1)


def test_ema_tracks_the_average_with_warmup():
    module = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(module.weight)
    ema = EMA(module, decay=0.5)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module)  # decay min(0.5, 2/11) = 2/11
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(1 - 2 / 11, abs=1e-7)
    ema.update(module)  # decay min(0.5, 3/12) = 0.25
    expected = (1 - 2 / 11) * 0.25 + 0.75
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(expected, abs=1e-7)
    target = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])
    restored = EMA(target, decay=0.1)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.5 and restored.updates == 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps must be an integer >= 1, got 0"),
        ("batch_size", 2.5, "batch_size must be an integer >= 1, got 2.5"),
        ("lr", -1.0, "lr must be > 0, got -1.0"),
        ("lr", math.nan, "lr must be a number, got nan"),
        ("lr_schedule", "linear", "lr_schedule must be one of constant, cosine, got 'linear'"),
        ("precision", "int8", "precision must be one of fp32, bf16, fp16, auto, got 'int8'"),
        ("min_lr_ratio", 1.5, r"min_lr_ratio must be in \[0, 1\), got 1.5"),
        ("warmup_steps", -1, "warmup_steps must be >= 0, got -1"),
    ],
)
def test_loop_config_validation_names_the_field(field, value, message):
    config = LoopConfig(**{"steps": 1, "batch_size": 1, "lr": 1e-3, field: value})
    with pytest.raises(HuabiError, match=f"^{message}$"):
        config.validate()


def test_autocast_rejects_unknown_precision():
    with pytest.raises(HuabiError, match="precision must be one of fp32, bf16, fp16, auto, got 'half'"):
        autocast("cpu", "half")
    with pytest.raises(HuabiError, match=r"^precision 'auto' must be resolved \(resolve_precision\) before autocast$"):
        autocast("cpu", "auto")


def test_auto_precision_is_the_inference_choice_of_this_machine(monkeypatch):
    """'auto' asks huabi.service.device_choice (HUABI_AUTO_DTYPE pins its CPU answer, as tests do);
    a named precision stays what it is on any machine."""
    from huabi.service.device_choice import CpuInfo, choose_cpu_dtype

    assert resolve_precision("bf16", "cpu") == ("bf16", "as configured")
    monkeypatch.setenv("HUABI_AUTO_DTYPE", "fp32")
    assert resolve_precision("auto", "cpu")[0] == "fp32"
    monkeypatch.setenv("HUABI_AUTO_DTYPE", "bf16")
    assert resolve_precision("auto", "cpu") == ("bf16", "bf16: pinned by HUABI_AUTO_DTYPE")
    # what it decides from, unpinned: no native bf16 (this AVX2-only Zen 3) -> fp32, AMX -> bf16
    assert choose_cpu_dtype(CpuInfo("zen3", frozenset({"avx2", "fma"}), 2, 2)).dtype == torch.float32
    assert choose_cpu_dtype(CpuInfo("spr", frozenset({"avx512f", "amx_bf16"}), 2, 2)).dtype == torch.bfloat16


def _parts(seed: int) -> tuple[LoopParts, LoopConfig]:
    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 2)
    config = LoopConfig(steps=4, batch_size=2, lr=1e-2, warmup_steps=2, lr_schedule="cosine")
    optimizer, scheduler = make_optimizer(module.parameters(), config)
    return LoopParts({"m": module}, optimizer, scheduler, EMA(module, 0.9), "m"), config


def test_loop_state_round_trip(tmp_path):
    parts, config = _parts(0)
    module = parts.modules["m"]
    module(torch.ones(1, 3)).sum().backward()
    parts.optimizer.step()
    parts.scheduler.step()
    parts.ema.update(module)
    path = tmp_path / "state.pt"
    save_loop_state(path, parts, 1, {"lr": 1e-2})
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed into place
    fresh, _ = _parts(1)
    assert load_loop_state(path, fresh, {"lr": 1e-2}) == 1
    assert torch.equal(fresh.modules["m"].weight, module.weight)
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg"], parts.optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh.scheduler.state_dict()["last_epoch"] == 1
    assert torch.equal(fresh.ema.shadow["weight"], parts.ema.shadow["weight"])


def test_resuming_with_other_settings_names_the_setting(tmp_path):
    parts, _ = _parts(0)
    path = tmp_path / "state.pt"
    save_loop_state(path, parts, 1, {"lr": 1e-2, "save_every_s": 300})
    # save/log intervals may change between runs; anything that changes the result may not
    load_loop_state(path, _parts(0)[0], {"lr": 1e-2, "save_every_s": 10})
    with pytest.raises(HuabiError, match=r"was made with lr=0.01, now lr=0.02; use a fresh state dir or the same settings$"):
        load_loop_state(path, _parts(0)[0], {"lr": 2e-2, "save_every_s": 300})
    # a setting added after the state was saved resumes when it is off, not when it is on
    load_loop_state(path, _parts(0)[0], {"lr": 1e-2, "save_every_s": 300, "chroma_weight": 0.0})
    with pytest.raises(HuabiError, match=r"was made with chroma_weight=None, now chroma_weight=1.0;"):
        load_loop_state(path, _parts(0)[0], {"lr": 1e-2, "save_every_s": 300, "chroma_weight": 1.0})


def test_corrupt_or_foreign_state_files_are_named(tmp_path):
    bad = tmp_path / "state.pt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(HuabiError, match=r"^training state .*state.pt cannot be read: "):
        load_torch_file(bad, what="training state")
    with pytest.raises(HuabiError, match=r"^training state .*missing.pt does not exist$"):
        load_torch_file(tmp_path / "missing.pt", what="training state")
    atomic_torch_save({"something": 1}, bad)
    with pytest.raises(HuabiError, match=r"is not a huabi state file \(format 1\)$"):
        load_loop_state(bad, _parts(0)[0], {})


def test_resuming_with_more_steps_keeps_state_and_uses_the_new_lr_curve(tmp_path):
    parts, config = _parts(0)
    path = tmp_path / "state.pt"
    for _ in range(3):
        parts.optimizer.step()
        parts.scheduler.step()
    save_loop_state(path, parts, 3, {"lr": 1e-2, "steps": 4})
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    longer = LoopConfig(steps=10, batch_size=2, lr=1e-2, warmup_steps=2, lr_schedule="cosine")
    optimizer, scheduler = make_optimizer(module.parameters(), longer)
    fresh = LoopParts({"m": module}, optimizer, scheduler)
    assert load_loop_state(path, fresh, {"lr": 1e-2, "steps": 10}) == 3
    fresh.scheduler.step()
    expected = 1e-2 * LRShape("cosine", 2, 10, 0.1)(4)
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
