"""Reading every value of a checkpoint: ``qwenvl.checkpoint.verify_weights`` and ``qwenvl info --verify``."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qwenvl.checkpoint import save_pretrained, verify_weights
from qwenvl.cli import main
from qwenvl.config import QwenVLConfig
from qwenvl.model import QwenVL

BAD = "transformer.h.0.attn.c_attn.weight"  # in the second of three shards at max_shard_size 20MB


@pytest.fixture(scope="module")
def config() -> QwenVLConfig:
    """The tiny preset with one layer each: 39M parameters, nearly all of them the embedding and lm_head (each a shard
    of its own at max_shard_size 20MB)."""
    tiny = QwenVLConfig.from_preset("tiny")
    return replace(tiny, lm=replace(tiny.lm, num_hidden_layers=1), visual=replace(tiny.visual, layers=1))


def _save(config: QwenVLConfig, out: Path, bad: dict[str, list[float]] | None = None, safe: bool = True) -> Path:
    """A random bf16 checkpoint in three shards; ``bad``: tensor name -> values written at its first positions."""
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g).to(torch.bfloat16)
             for k, v in QwenVL.on_meta(config).state_dict().items()}
    for name, values in (bad or {}).items():
        state[name].view(-1)[: len(values)] = torch.tensor(values)
    save_pretrained(state, config, out, max_shard_size="20MB", safe_serialization=safe)
    return out


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def _truncate(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def test_info_verify_says_a_clean_checkpoint_is_clean(config: QwenVLConfig, tmp_path: Path, capsys) -> None:
    ckpt = _save(config, tmp_path / "ckpt")
    assert len(_shards(ckpt)) == 3
    assert main(["info", str(ckpt), "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"checkpoint: {ckpt}\n") and "\nparameters:\n" in out  # the info as without --verify
    n = len(QwenVL.on_meta(config).state_dict())
    assert out.endswith(f"\n\nverify: OK: every value finite ({n} tensors, 0.08 GB read from 3 file(s))\n")
    assert main(["info", str(ckpt), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["verify"]
    assert report["ok"] and report["non_finite"] == report["unreadable"] == [] and report["tensors"] == n


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_info_verify_names_non_finite_tensors_and_exits_2(config: QwenVLConfig, safe: bool, tmp_path: Path,
                                                          capsys) -> None:
    ckpt = _save(config, tmp_path / "ckpt", {BAD: [float("nan"), float("nan"), float("inf")],
                                             "lm_head.weight": [-float("inf")]}, safe=safe)
    assert main(["info", str(ckpt)]) == 0  # info alone reads no weight
    capsys.readouterr()
    assert main(["info", str(ckpt), "--verify"]) == 2
    lines = capsys.readouterr().out.splitlines()
    name = "model-0000{}-of-00003.safetensors" if safe else "pytorch_model-0000{}-of-00003.bin"
    assert lines[-3:] == [
        f"NaN/inf in {BAD} ({name.format(2)}): 3 of 49152 values (2 NaN, 1 infinite)",
        f"NaN/inf in lm_head.weight ({name.format(3)}): 1 of 19447808 values (1 infinite)",
        "verify: FAILED: 2 tensor(s) with NaN or infinite values (41 tensors, 0.08 GB read from 3 file(s))",
    ]
    assert main(["info", str(ckpt), "--verify", "--json"]) == 2
    report = json.loads(capsys.readouterr().out)["verify"]
    assert not report["ok"] and report["unreadable"] == []
    assert report["non_finite"][0] == {"name": BAD, "file": str(ckpt / name.format(2)), "count": 3, "nan": 2,
                                       "numel": 49152}


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_info_verify_reports_every_unreadable_shard_and_reads_the_others(config: QwenVLConfig, safe: bool,
                                                                         tmp_path: Path, capsys) -> None:
    ckpt = _save(config, tmp_path / "ckpt", {BAD: [float("nan")]}, safe=safe)
    first, second, third = _shards(ckpt)
    _truncate(first)
    _truncate(third)
    assert main(["info", str(ckpt), "--verify"]) == 2
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"checkpoint: {ckpt}"  # config.json's counts are not said of weights that cannot be read
    assert lines[2] == f"NaN/inf in {BAD} ({second.name}): 1 of 49152 values (1 NaN)"  # the readable shard: read
    for line, file in zip(lines[3:5], (first, third)):
        assert line.startswith(f"unreadable: cannot read {file}: ") and line.endswith("(truncated or corrupt file?)")
    assert lines[5].startswith("verify: FAILED: 1 tensor(s) with NaN or infinite values, 2 of 3 file(s) unreadable (")
    assert lines[5].endswith(" read from 1 of 3 file(s))")  # not "from 3 file(s)": two were not read
    assert len(lines) == 6
    report = verify_weights(ckpt)
    assert [u["file"] for u in report.unreadable] == [str(first), str(third)]
    assert main(["info", str(ckpt)]) == 2  # without --verify: the first one, as before
    assert capsys.readouterr().err.startswith(f"qwenvl info: error: cannot read {first}: ")


def test_info_verify_still_says_what_else_is_wrong(config: QwenVLConfig, tmp_path: Path, capsys) -> None:
    # readable weights that config.json does not describe: the report, then the error as without --verify
    ckpt = _save(config, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(ckpt), "--verify"]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].startswith("verify: OK: every value finite")
    assert err.startswith(f"qwenvl info: error: checkpoint {ckpt} does not match the model")


def test_info_verify_needs_a_checkpoint(capsys) -> None:
    assert main(["info", "--preset", "tiny", "--verify"]) == 2
    assert capsys.readouterr().err.strip() == ("qwenvl info: error: --verify reads a checkpoint's weights: give a "
                                               "checkpoint folder, not --preset")


def test_verify_weights_lists_a_diverged_run_in_full_but_shows_20(config: QwenVLConfig, tmp_path: Path) -> None:
    names = list(QwenVL.on_meta(config).state_dict())
    ckpt = _save(config, tmp_path / "ckpt", dict.fromkeys(names, [float("nan")]))
    report = verify_weights(ckpt)
    assert len(report.non_finite) == len(names) == 41
    lines = report.lines()
    assert len(lines) == 22 and lines[20] == "... and 21 more tensors" and lines[21].startswith("verify: FAILED: 41 ")


def test_verify_weights_reports_a_read_error_past_the_header(config: QwenVLConfig, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # a disk that fails under the data (EIO) while the header read fine: that file is unreadable, the others read
    from qwenvl import checkpoint

    ckpt = _save(config, tmp_path / "ckpt")
    real = checkpoint.all_finite

    def failing(t: torch.Tensor) -> bool:
        if t.numel() == 49152:  # BAD's shape, in the second file
            raise OSError(5, "Input/output error")
        return real(t)

    monkeypatch.setattr(checkpoint, "all_finite", failing)
    report = verify_weights(ckpt)
    second = _shards(ckpt)[1]
    assert report.unreadable == [{"file": str(second), "problem": f"cannot read {second}: [Errno 5] Input/output error"}]
    assert report.non_finite == [] and not report.ok and report.files == 3
    assert report.verdict().startswith("verify: FAILED: 1 of 3 file(s) unreadable (")


def test_info_verify_reports_a_missing_shard_and_reads_the_others(config: QwenVLConfig, tmp_path: Path,
                                                                   capsys) -> None:
    # an incomplete download: the index names a shard the folder lacks. --json still prints the report (a script
    # reads stdout as JSON); the other shards are read
    ckpt = _save(config, tmp_path / "ckpt", {BAD: [float("nan")]})
    first, second, third = _shards(ckpt)
    first.unlink()
    assert main(["info", str(ckpt), "--verify", "--json"]) == 2
    out, err = capsys.readouterr()
    report = json.loads(out)["verify"]
    assert not report["ok"] and report["files"] == 3
    assert report["unreadable"] == [{"file": str(first), "problem": f"{first} is missing: the index names it (an "
                                                                    "incomplete download?)"}]
    assert [t["name"] for t in report["non_finite"]] == [BAD]
    assert report["verdict"].endswith(" read from 2 of 3 file(s))")
    assert main(["info", str(ckpt), "--verify"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [f"unreadable: {first} is missing: the index names it (an incomplete download?)",
                          report["verdict"]]
    assert main(["info", str(ckpt)]) == 2  # without --verify: the error, as loading says it
    assert "references shard(s) missing from" in capsys.readouterr().err
