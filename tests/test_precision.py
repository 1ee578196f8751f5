"""``precision: auto``: bf16 only where the hardware computes it natively."""

import json
import logging

import pytest
import torch

from lmsmith import config as C
from lmsmith import precision as P
from lmsmith.distill.config import DistillConfig
from lmsmith.distill.trainer import run
from lmsmith.evaluate import EvalConfig
from lmsmith.models import tiny_causal_lm, tiny_tokenizer

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd\n"


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [(X86_AVX2, False), (X86_AMX, True), (ARM_BF16, True), (ARM_PLAIN, False), ("", None)],
)
def test_cpuinfo_flags_tell_native_bf16(cpuinfo, expected):
    assert P.cpu_bf16_flags(cpuinfo) is expected


@pytest.fixture
def fake_cpu(monkeypatch):
    """Fake the CPU: set('flags', ratio) gives the cpuinfo verdict and the benchmark's ratio."""
    calls = []

    def set_cpu(flags, ratio):
        P.cpu_has_fast_bf16.cache_clear()
        P._warn_slow_bf16.cache_clear()
        monkeypatch.setattr(P, "cpu_bf16_flags", lambda cpuinfo=None: flags)
        monkeypatch.setattr(P, "bf16_matmul_ratio", lambda *a, **k: calls.append(1) or ratio)
        monkeypatch.setattr(P, "default_device", lambda: torch.device("cpu"))

    yield set_cpu, calls
    P.cpu_has_fast_bf16.cache_clear()
    P._warn_slow_bf16.cache_clear()


def test_auto_is_fp32_on_a_cpu_without_bf16_and_skips_the_benchmark(fake_cpu):
    set_cpu, calls = fake_cpu
    set_cpu(False, 0.5)  # flags say no: the benchmark is not even run
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert calls == []


def test_auto_is_bf16_where_flags_and_benchmark_agree(fake_cpu):
    set_cpu, calls = fake_cpu
    set_cpu(True, 0.6)
    assert P.resolve_precision("auto", "cpu") == "bf16"
    assert P.resolve_precision("auto") == "bf16"  # default device faked to cpu
    assert len(calls) == 1  # one micro-benchmark per process


@pytest.mark.parametrize("flags", [True, None])
def test_auto_is_fp32_when_bf16_measures_slower(fake_cpu, flags):
    set_cpu, _ = fake_cpu
    set_cpu(flags, 40.0)  # emulated bf16: 40x slower than fp32
    assert P.resolve_precision("auto", "cpu") == "fp32"


def test_explicit_precisions_stay_and_slow_bf16_warns_once(fake_cpu, caplog):
    set_cpu, _ = fake_cpu
    set_cpu(False, 50.0)
    assert P.resolve_precision("fp32", "cpu") == "fp32"
    with caplog.at_level(logging.WARNING, logger="lmsmith.precision"):
        assert P.resolve_precision("bf16", "cpu") == "bf16"
        assert P.resolve_precision("bf16", "cpu") == "bf16"
    warnings = [r for r in caplog.records if "without native bf16" in r.message]
    assert len(warnings) == 1
    set_cpu(True, 0.5)
    with caplog.at_level(logging.WARNING, logger="lmsmith.precision"):
        caplog.clear()
        P.resolve_precision("bf16", "cpu")
    assert not caplog.records


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        P.resolve_precision("fp16")


def test_defaults_are_auto_everywhere():
    assert DistillConfig().train.precision == "auto"
    assert EvalConfig().precision == "auto"
    from pathlib import Path

    import yaml

    for path in Path(__file__).resolve().parents[1].glob("configs/distill/*.yaml"):
        assert yaml.safe_load(path.read_text())["train"]["precision"] == "auto", path


def test_hf_engine_refuses_an_explicit_bf16():
    with pytest.raises(ValueError, match="engine 'lean'"):
        EvalConfig(data="x.jsonl", engine="hf", precision="bf16")


@pytest.mark.parametrize("flags, ratio, expected", [(False, 50.0, "fp32"), (True, 0.5, "bf16")])
def test_a_run_records_the_resolved_precision(fake_cpu, tmp_path, flags, ratio, expected):
    set_cpu, _ = fake_cpu
    set_cpu(flags, ratio)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    cfg = C.load(
        DistillConfig,
        None,
        {
            "method": "sft",
            "data": str(data),
            "max_steps": 1,
            "batch_size": 1,
            "output_dir": str(tmp_path / "run"),
            "progress": False,
        },
    )
    s = run(cfg, tiny_causal_lm(), tiny_causal_lm(layers=1), tiny_tokenizer())
    assert s["precision"] == expected
    assert s["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["train"]["precision"] == expected


def test_import_sets_passive_omp_waiting_unless_the_user_chose():
    import os
    import subprocess
    import sys

    code = "import os, lmsmith; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE", out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE", out.stderr
