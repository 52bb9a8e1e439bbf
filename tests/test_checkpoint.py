"""Checkpoint folders: layout detection, strict loading, clear errors, atomic saving."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qwenvl import checkpoint
from qwenvl.checkpoint import (
    BUNDLED_VOCAB,
    CheckpointError,
    find_weights,
    load_state_dict,
    load_weights,
    parse_size,
    save_pretrained,
)
from qwenvl.config import QwenVLConfig
from qwenvl.model import QwenVL
from qwenvl.outputs import MARKER_FILE

FIXTURE = Path(__file__).parent / "fixtures" / "qwenvl-tiny"


# ---- a small module whose names mimic the official ones -------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d, bias=False)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.Parameter(torch.ones(d))
        self.attn = _Attn(d)


class _AttnPool(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 1)
        self.pos_embed = nn.Parameter(torch.zeros(4, d), requires_grad=False)  # frozen, as the official one


class _Visual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, d, 2, 2, bias=False)
        self.attn_pool = _AttnPool(d)


class _Transformer(nn.Module):
    def __init__(self, d: int, vocab: int, layers: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(_Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.visual = _Visual(d)


class Mini(nn.Module):
    def __init__(self, d: int = 8, vocab: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.transformer = _Transformer(d, vocab, layers)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def _random_state(model: nn.Module, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).to(dtype) for k, v in model.state_dict().items()}


def _meta_mini(**kw: int) -> Mini:
    with torch.device("meta"):
        return Mini(**kw)


@pytest.fixture
def config() -> QwenVLConfig:
    return QwenVLConfig.from_preset("tiny")


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return _random_state(Mini())


def _files(path: Path) -> set[str]:
    """The entries of ``path`` but our output marker (tests/test_outputs.py checks it)."""
    return {p.name for p in path.iterdir()} - {MARKER_FILE}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ---- sizes -----------------------------------------------------------------------------------------------
def test_parse_size() -> None:
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("300MB") == 300_000_000
    assert parse_size("1.5 kb") == 1500
    assert parse_size(4096) == 4096
    assert parse_size("100") == 100
    for bad in ("5 parsecs", "", "-1GB", "0", "GB"):
        with pytest.raises(ValueError):
            parse_size(bad)


# ---- round trips -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_round_trip_single_file(tmp_path: Path, config: QwenVLConfig, state: dict, safe: bool) -> None:
    out = save_pretrained(state, config, tmp_path / "ckpt", safe_serialization=safe)
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    assert _files(out) == {"config.json", "generation_config.json", "qwen.tiktoken", weights}
    assert find_weights(out) == [out / weights]
    _assert_same(load_state_dict(out), state)
    assert (out / "qwen.tiktoken").read_bytes() == BUNDLED_VOCAB.read_bytes()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"  # the weights' dtype
    if safe:
        with safe_open(str(out / weights), framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"  # what transformers checks
        assert json.loads(meta["qwenvl.unseen_config"])["num_attention_heads"] == config.lm.num_attention_heads
        _assert_same(load_file(out / weights), state)  # readable by the reference reader
    else:
        _assert_same(torch.load(out / weights, weights_only=True), state)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_round_trip_sharded(tmp_path: Path, config: QwenVLConfig, state: dict, safe: bool) -> None:
    out = save_pretrained(state, config, tmp_path / "ckpt", max_shard_size="600B", safe_serialization=safe)
    stem, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    files = find_weights(out)
    n = len(files)
    assert n >= 3
    assert [f.name for f in files] == [f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)]
    assert _files(out) == {"config.json", "generation_config.json", "qwen.tiktoken",
                           f"{stem}.{ext}.index.json", *(f.name for f in files)}
    index = json.loads((out / f"{stem}.{ext}.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert sorted(index["weight_map"]) == sorted(state)
    assert set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:  # every shard is within the limit unless it holds one oversized tensor
        tensors = load_state_dict(f)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 600 or len(tensors) == 1
        assert all(index["weight_map"][k] == f.name for k in tensors)
    _assert_same(load_state_dict(out), state)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_round_trip_dtypes_views_and_shared_storage(tmp_path: Path, config: QwenVLConfig, safe: bool) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "a.view_rows": base[1:3],                   # a view into a larger storage
        "a.transposed": base.t(),                   # non-contiguous
        "a.alias": base,                            # two keys, one storage
        "a.alias2": base,
        "b.half": torch.randn(3, 5).half(),
        "b.bf16": torch.randn(7).bfloat16(),
        "c.long": torch.arange(5),
        "c.bool": torch.tensor([True, False, True]),
        "c.scalar": torch.tensor(3.5),
        "c.empty": torch.zeros(0, 4),
    }
    out = save_pretrained(state, config, tmp_path / "ckpt", max_shard_size="64B", safe_serialization=safe)
    loaded = load_state_dict(out)
    _assert_same(loaded, {k: v.contiguous() for k, v in state.items()})
    if not safe:  # each shard holds only its own tensors' bytes, not a whole shared storage
        for f in find_weights(out):
            assert f.stat().st_size < 4096


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_model_round_trip_into_meta_module(tmp_path: Path, config: QwenVLConfig, safe: bool) -> None:
    src = Mini()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    out = save_pretrained(src, config, tmp_path / "ckpt", max_shard_size="1KB", safe_serialization=safe)
    model = load_weights(_meta_mini(), out)
    _assert_same(model.state_dict(), src.state_dict())
    assert not any(t.is_meta for t in model.state_dict().values())
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert model.transformer.visual.attn_pool.pos_embed.requires_grad is False  # frozen stays frozen
    assert model.lm_head.weight.requires_grad is True


def test_loaded_params_are_safe_to_modify_in_place(tmp_path: Path, config: QwenVLConfig, state: dict) -> None:
    out = save_pretrained(state, config, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()
    model = load_weights(_meta_mini(), out)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"] + 1.0)
    assert (out / "model.safetensors").read_bytes() == before  # copy-on-write mapping: the file is untouched
    _assert_same(load_state_dict(out), state)


def test_dtype_cast_and_default_dtype(tmp_path: Path, config: QwenVLConfig, state: dict) -> None:
    out = save_pretrained(state, config, tmp_path / "ckpt", max_shard_size="1KB")
    kept = load_weights(_meta_mini(), out)  # dtype=None: the stored dtype
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    cast = load_weights(_meta_mini(), out, dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    for k, v in cast.state_dict().items():
        assert torch.equal(v, state[k].float()), k


def test_default_dtype_of_mixed_checkpoint_is_the_majority(tmp_path: Path, config: QwenVLConfig) -> None:
    state = _random_state(Mini(), torch.float16)
    state["transformer.ln_f.weight"] = state["transformer.ln_f.weight"].float()
    state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"].bfloat16()
    out = save_pretrained(state, config, tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    model = load_weights(_meta_mini(), out)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_integer_tensors_are_never_cast(tmp_path: Path, config: QwenVLConfig) -> None:
    class WithBuffer(Mini):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("step", torch.zeros((), dtype=torch.long))

    state = _random_state(Mini())
    state["step"] = torch.tensor(7)
    out = save_pretrained(state, config, tmp_path / "ckpt")
    with torch.device("meta"):
        model = WithBuffer()
    load_weights(model, out, dtype=torch.float32)
    assert model.step.dtype == torch.long and int(model.step) == 7


def test_safetensors_preferred_over_bin(tmp_path: Path, config: QwenVLConfig) -> None:
    a, b = _random_state(Mini(), seed=1), _random_state(Mini(), seed=2)
    out = save_pretrained(a, config, tmp_path / "ckpt")
    save_pretrained(b, config, tmp_path / "bin", safe_serialization=False)
    shutil.copy(tmp_path / "bin" / "pytorch_model.bin", out / "pytorch_model.bin")
    assert find_weights(out) == [out / "model.safetensors"]
    _assert_same(load_state_dict(out), a)


def test_python_files_in_the_folder_are_never_run(tmp_path: Path, config: QwenVLConfig, state: dict) -> None:
    out = save_pretrained(state, config, tmp_path / "ckpt")
    marker = tmp_path / "executed"
    for name in ("modeling_qwen.py", "configuration_qwen.py", "__init__.py"):
        (out / name).write_text(f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(1)\n")
    load_weights(_meta_mini(), out)
    assert not marker.exists()


def test_save_replaces_an_existing_folder_completely(tmp_path: Path, config: QwenVLConfig) -> None:
    a, b = _random_state(Mini(), seed=1), _random_state(Mini(), seed=2)
    out = save_pretrained(a, config, tmp_path / "ckpt", max_shard_size="1KB")
    assert (out / "model.safetensors.index.json").exists()
    # the model is still mapped from the old files while the folder is replaced
    model = load_weights(_meta_mini(), out)
    save_pretrained(b, config, out)
    assert _files(out) == {"config.json", "generation_config.json", "qwen.tiktoken", "model.safetensors"}
    _assert_same(load_state_dict(out), b)
    _assert_same(model.state_dict(), a)
    assert _files(tmp_path) == {"ckpt"}


# ---- atomic saving -----------------------------------------------------------------------------------------
def test_failed_save_leaves_nothing(tmp_path: Path, config: QwenVLConfig, state: dict,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = checkpoint._write_safetensors
    calls = []

    def flaky(file: Path, shard: dict, metadata: dict) -> None:
        calls.append(file.name)
        if len(calls) == 2:
            file.write_bytes(b"half a shard")
            raise OSError("disk full")
        real(file, shard, metadata)

    monkeypatch.setattr(checkpoint, "_write_safetensors", flaky)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(state, config, tmp_path / "new", max_shard_size="1KB")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no out_dir, no temporary sibling


def test_failed_save_keeps_the_existing_folder(tmp_path: Path, config: QwenVLConfig, state: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = save_pretrained(state, config, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(file: Path, shard: dict, metadata: dict) -> None:
        file.write_bytes(b"garbage")
        raise RuntimeError("writer crashed")

    monkeypatch.setattr(checkpoint, "_write_safetensors", broken)
    with pytest.raises(RuntimeError, match="writer crashed"):
        save_pretrained(_random_state(Mini(), seed=5), config, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _files(tmp_path) == {"ckpt"}


def test_saving_a_meta_model_is_refused(tmp_path: Path, config: QwenVLConfig) -> None:
    with pytest.raises(CheckpointError, match="meta device"):
        save_pretrained(_meta_mini(), config, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# ---- errors ------------------------------------------------------------------------------------------------
def _truncate(file: Path, keep: float = 0.6) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_truncated_shard(tmp_path: Path, config: QwenVLConfig, state: dict, safe: bool) -> None:
    out = save_pretrained(state, config, tmp_path / "ckpt", max_shard_size="1KB", safe_serialization=safe)
    shard = find_weights(out)[1]
    _truncate(shard)
    with pytest.raises(CheckpointError, match=f"cannot read .*{shard.name}.*truncated or corrupt"):
        load_state_dict(out)
    with pytest.raises(CheckpointError, match=shard.name):
        load_weights(_meta_mini(), out)


def test_garbage_shard(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_state_dict(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_state_dict(tmp_path)


def test_missing_key(tmp_path: Path, config: QwenVLConfig, state: dict) -> None:
    del state["transformer.h.1.attn.c_attn.bias"]
    out = save_pretrained(state, config, tmp_path / "ckpt")
    model = _meta_mini()
    with pytest.raises(CheckpointError) as e:
        load_weights(model, out)
    assert "missing from the checkpoint: transformer.h.1.attn.c_attn.bias (expected shape [24])" in str(e.value)
    assert all(p.is_meta for p in model.parameters())  # nothing assigned before the check
    with pytest.raises(CheckpointError, match="still on the meta device"):  # non-strict cannot invent it either
        load_weights(_meta_mini(), out, strict=False)


def test_extra_key(tmp_path: Path, config: QwenVLConfig, state: dict) -> None:
    state["transformer.h.2.attn.c_attn.weight"] = torch.zeros(24, 8)
    out = save_pretrained(state, config, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint: transformer\.h\.2\.attn\.c_attn\.weight "
                                              r"\(shape \[24, 8\]\)"):
        load_weights(_meta_mini(), out)
    model = load_weights(_meta_mini(), out, strict=False)  # non-strict ignores it
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


def test_wrong_shape(tmp_path: Path, config: QwenVLConfig, state: dict) -> None:
    state["transformer.wte.weight"] = torch.zeros(33, 8)
    out = save_pretrained(state, config, tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as e:
        load_weights(_meta_mini(), out, strict=False)  # shapes are checked even when not strict
    msg = str(e.value)
    assert "shape mismatch for transformer.wte.weight: the model expects [32, 8], the checkpoint has [33, 8]" in msg
    assert "config.json may not match the weights" in msg


def test_all_problems_in_one_capped_message(tmp_path: Path, config: QwenVLConfig) -> None:
    out = save_pretrained(_random_state(Mini(d=8, layers=2)), config, tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as e:
        load_weights(_meta_mini(d=16, layers=12), out)
    msg = str(e.value)
    lines = msg.splitlines()
    n = len(_meta_mini(d=16, layers=12).state_dict())
    assert f"({n} problem(s))" in lines[0]
    assert sum(line.startswith("  - ") for line in lines) == checkpoint.MAX_LISTED_PROBLEMS
    assert f"  ... and {n - checkpoint.MAX_LISTED_PROBLEMS} more" in lines
    assert "shape mismatch" in msg and "missing from the checkpoint" in msg and lines[-1].startswith("hint:")


def test_mindformers_names_get_a_hint(tmp_path: Path, config: QwenVLConfig, state: dict) -> None:
    state = {"llm_model." + k: v for k, v in state.items()}
    out = save_pretrained(state, config, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="MindFormers"):
        load_weights(_meta_mini(), out)


def test_index_naming_a_missing_shard(tmp_path: Path, config: QwenVLConfig, state: dict) -> None:
    out = save_pretrained(state, config, tmp_path / "ckpt", max_shard_size="1KB")
    gone = find_weights(out)[-1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=f"missing .*{gone.name}"):
        find_weights(out)
    with pytest.raises(CheckpointError, match=gone.name):
        load_weights(_meta_mini(), out)


def test_index_outside_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="plain file names"):
        find_weights(tmp_path)


def test_index_disagreeing_with_shards(tmp_path: Path, config: QwenVLConfig, state: dict) -> None:
    out = save_pretrained(state, config, tmp_path / "ckpt", max_shard_size="1KB")
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first, second = find_weights(out)[:2]
    moved = next(k for k, f in index["weight_map"].items() if f == first.name)
    index["weight_map"][moved] = second.name
    dropped = next(k for k, f in index["weight_map"].items() if f == second.name and k != moved)
    del index["weight_map"][dropped]
    index["weight_map"]["transformer.ghost.weight"] = first.name
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_state_dict(out)
    msg = str(e.value)
    assert f"the index puts {moved} in {second.name}, but it is in {first.name}" in msg
    assert f"{second.name} contains {dropped}, which the index does not list" in msg
    assert f"the index puts transformer.ghost.weight in {first.name}, which does not contain it" in msg


def test_key_in_two_shards(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2), "y": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"x": torch.ones(2)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"x": "model-00002-of-00002.safetensors",
                                            "y": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="x is in both model-00001-of-00002.safetensors and "
                                              "model-00002-of-00002.safetensors"):
        load_state_dict(tmp_path)


def test_empty_or_absent_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weights in .*model.safetensors"):
        find_weights(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_weights(tmp_path / "nope")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="need their index"):
        load_state_dict(tmp_path)


class _Payload:
    """Pickles as a call to os.system: weights_only must refuse to run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _pickled_function_reference() -> None:  # module-level, so pickle stores it as a GLOBAL reference
    raise AssertionError("must never be called")


@pytest.mark.parametrize("payload", ["os.system", "function"])
def test_bin_with_code_is_refused(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    bad = _Payload(marker) if payload == "os.system" else _pickled_function_reference
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"lm_head.weight": torch.zeros(2), "evil": bad}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refusing to load .*pytorch_model\.bin.*weights_only.*GLOBAL"):
        load_state_dict(ckpt)
    assert not marker.exists()


def test_bin_that_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict(tmp_path)


def _damaged_bin(file: Path, how: str) -> None:
    """A torch.save zip with one defect (each was a traceback: TypeError, AssertionError, BadZipFile)."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"lm_head.weight": torch.zeros(2)}, buf)
    if how == "zip64 locator names disk 1":  # zipfile.is_zipfile raises BadZipFile ("span multiple disks")
        raw = bytearray(buf.getvalue())
        raw[raw.rfind(b"PK\x06\x07") + 4] = 1
        file.write_bytes(raw)
        return
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(file, "w") as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl") and how == "size is an int":  # (2,) -> 2: TypeError in set_()
                data = data.replace(b"K\x02\x85", b"K\x02")
            z.writestr(info.filename, data)


@pytest.mark.parametrize(("how", "message"), [
    ("size is an int", r"cannot read .*pytorch_model\.bin: set_\(\) received an invalid combination of arguments"),
    ("zip64 locator names disk 1", r"cannot read .*pytorch_model\.bin: zipfiles that span multiple disks"),
])
def test_a_damaged_bin_is_one_line(tmp_path: Path, how: str, message: str) -> None:
    _damaged_bin(tmp_path / "pytorch_model.bin", how)
    with pytest.raises(CheckpointError, match=message) as err:
        load_state_dict(tmp_path)
    assert "\n" not in str(err.value)


def test_a_bin_with_a_sparse_tensor_is_refused(tmp_path: Path) -> None:
    """weights_only loads sparse tensors; load_weights then failed with "reshape is not implemented for sparse"."""
    state = _random_state(Mini())
    state["transformer.ln_f.weight"] = state["transformer.ln_f.weight"].to_sparse()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"not dense: transformer\.ln_f\.weight \(torch\.sparse_coo\)"):
        load_weights(_meta_mini(), tmp_path)


def test_an_index_python_cannot_parse_is_one_line(tmp_path: Path) -> None:
    """Nesting deeper than the recursion limit was a RecursionError traceback; a 5000-digit number a ValueError
    naming no file."""
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "x.safetensors"}, "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: JSON nested too deeply"):
        find_weights(tmp_path)
    index.write_text('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: a JSON number Python cannot read"):
        find_weights(tmp_path)


def test_unparsable_config_metadata_is_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    """Our metadata key holding JSON nested too deeply was a RecursionError traceback from check_config."""
    from qwenvl.checkpoint import CONFIG_METADATA_KEY, check_config

    shutil.copy(FIXTURE / "config.json", tmp_path)
    save_file(load_file(FIXTURE / "model.safetensors"), tmp_path / "model.safetensors",
              metadata={"format": "pt", CONFIG_METADATA_KEY: "[" * 100_000 + "]" * 100_000})
    with caplog.at_level("WARNING", logger="qwenvl.checkpoint"):
        check_config(QwenVLConfig.from_pretrained(tmp_path), tmp_path)
    assert f"unreadable {CONFIG_METADATA_KEY} metadata, ignored" in caplog.text


def test_a_cast_that_overflows_is_not_called_a_corrupt_checkpoint(tmp_path: Path, config: QwenVLConfig,
                                                                  state: dict) -> None:
    """A finite 1e5 in a float32 file loaded as float16 was reported as the checkpoint holding infinities
    ("a corrupt file, or a training run that diverged")."""
    state = {k: v.float() for k, v in state.items()}
    state["lm_head.weight"][0, 0] = 1e5
    out = save_pretrained(state, config, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"cannot load .*ckpt as float16: lm_head\.weight: 1 of 256 values "
                                              r"\(largest magnitude 100000\) are beyond the range of float16") as err:
        load_weights(_meta_mini(), out, dtype=torch.float16)
    assert "corrupt" not in str(err.value)
    load_weights(_meta_mini(), out, dtype=torch.bfloat16)  # fits


def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    """A config.json given as the checkpoint was "checkpoint folder .../config.json does not exist"; a
    model.safetensors given to QwenVL.from_pretrained was read as JSON ("not UTF-8 text")."""
    from qwenvl.config import ConfigError

    with pytest.raises(CheckpointError, match=r"config\.json is a file, not a checkpoint folder"):
        find_weights(FIXTURE / "config.json")
    with pytest.raises(ConfigError, match=r"model\.safetensors is a weights file: give the checkpoint folder"):
        QwenVL.from_pretrained(FIXTURE / "model.safetensors")


def test_legacy_bin_format_loads(tmp_path: Path, state: dict) -> None:
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _assert_same(load_state_dict(tmp_path), state)


# ---- the real model ------------------------------------------------------------------------------------------
def test_golden_fixture_loads_strictly() -> None:
    model = QwenVL.from_pretrained(FIXTURE)
    stored = load_file(FIXTURE / "model.safetensors")
    assert set(model.state_dict()) == set(stored)
    _assert_same(model.state_dict(), stored)
    assert model.dtype == torch.float16  # the stored dtype (config.json says float16 too)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    fp32 = QwenVL.from_pretrained(FIXTURE, dtype=torch.float32)
    assert fp32.dtype == torch.float32
    assert torch.equal(fp32.transformer.wte.weight, stored["transformer.wte.weight"].float())


def test_qwenvl_save_and_reload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = QwenVL.from_pretrained(FIXTURE)
    out = tmp_path / "saved"
    with caplog.at_level("WARNING", logger="qwenvl.checkpoint"):
        model.save_pretrained(out, max_shard_size="20MB")
    assert len(find_weights(out)) > 1
    assert QwenVLConfig.from_pretrained(out) == QwenVLConfig.from_pretrained(FIXTURE)
    _assert_same(QwenVL.from_pretrained(out).state_dict(), model.state_dict())
    # wte and lm_head (151936 x 128 fp16, 38.9 MB each) do not fit a 20 MB shard: one line says so
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["max_shard_size 20MB is smaller than transformer.wte.weight (38.9 MB) and 1 more: a tensor "
                        "is never split, so each is written alone in a shard over the limit"]

    # the official keys we do not use are written back as read (auto_map: the official remote code loads it)
    official, saved = (json.loads((d / "config.json").read_text()) for d in (FIXTURE, out))
    assert saved["auto_map"] == official["auto_map"]
    derived = {"fp16"}  # ours says what the weights are (the fixture's flags are all false)
    assert {k: v for k, v in saved.items() if k not in derived} == {k: v for k, v in official.items() if k not in derived}
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["transformers_version"] == "4.31.0"


def test_no_shard_warning_when_every_tensor_fits(tmp_path: Path, config: QwenVLConfig,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="qwenvl.checkpoint"):
        save_pretrained({"a": torch.zeros(8), "b": torch.zeros(8)}, config, tmp_path / "ckpt", max_shard_size="40B")
    assert not caplog.records
    assert len(find_weights(tmp_path / "ckpt")) == 2


def test_config_that_disagrees_with_the_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.symlink(FIXTURE / "model.safetensors", ckpt / "model.safetensors")
    cfg = json.loads((FIXTURE / "config.json").read_text())
    cfg.update(hidden_size=256, num_attention_heads=4)
    cfg["visual"]["output_dim"] = 256
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        QwenVL.from_pretrained(ckpt)
    msg = str(e.value)
    assert ("shape mismatch for transformer.wte.weight: the model expects [151936, 256], "
            "the checkpoint has [151936, 128]") in msg
    assert "config.json may not match the weights" in msg


# ---- what the shapes do not catch ------------------------------------------------------------------------
def test_an_integer_tensor_where_weights_belong_is_refused(tmp_path: Path, config: QwenVLConfig, state: dict) -> None:
    state = dict(state)
    state["lm_head.weight"] = state["lm_head.weight"].to(torch.int32)
    out = save_pretrained(state, config, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"dtype mismatch for lm_head.weight: .* torch.int32"):
        load_weights(_meta_mini(), out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path: Path, config: QwenVLConfig, state: dict, bad: float) -> None:
    state = {k: v.clone() for k, v in state.items()}
    state["transformer.h.1.attn.c_attn.weight"][3, 2] = bad
    out = save_pretrained(state, config, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"NaN or infinite .* transformer.h.1.attn.c_attn.weight: 1 of"):
        load_weights(_meta_mini(), out)
    load_weights(_meta_mini(), out, check_finite=False)  # the check can be skipped knowingly


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("visual."):
            cfg["visual"][key.removeprefix("visual.")] = value
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes", [
    {"num_attention_heads": 4, "kv_channels": 32},  # 4 x 32 = 2 x 64: the same shapes, other heads
    {"layer_norm_epsilon": 1e-5},
    {"rotary_emb_base": 1000000},
    {"visual.heads": 4},
])
def test_a_config_that_fits_the_shapes_but_not_the_weights_is_caught(tmp_path: Path, changes: dict) -> None:
    QwenVL.from_config("tiny", seed=0).save_pretrained(tmp_path / "ckpt")
    QwenVL.from_pretrained(tmp_path / "ckpt")  # as saved: fine
    _edit_config(tmp_path / "ckpt", **changes)
    with pytest.raises(CheckpointError, match="does not describe the model") as info:
        QwenVL.from_pretrained(tmp_path / "ckpt")
    for key in changes:
        assert f"{key}: config.json says" in str(info.value)


def test_an_official_checkpoint_with_unusual_settings_is_warned_about(tmp_path: Path, caplog) -> None:
    shutil.copytree(FIXTURE, tmp_path / "ckpt")  # official layout, no metadata of ours
    with caplog.at_level("WARNING", logger="qwenvl.checkpoint"):
        QwenVL.from_pretrained(tmp_path / "ckpt")
    assert not caplog.records
    _edit_config(tmp_path / "ckpt", num_attention_heads=4, kv_channels=32)
    with caplog.at_level("WARNING", logger="qwenvl.checkpoint"):
        QwenVL.from_pretrained(tmp_path / "ckpt")
    assert "shapes of tiny" in caplog.text and "num_attention_heads=4 (the preset has 2)" in caplog.text


@pytest.mark.parametrize(("change", "message"), [
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer, got 2.5"),
    ({"hidden_size": "abc"}, "hidden_size must be an integer, got 'abc'"),
    ({"num_attention_heads": True}, "num_attention_heads must be an integer, got True"),
    ({"use_dynamic_ntk": "yes"}, "use_dynamic_ntk must be true or false, got 'yes'"),
    ({"layer_norm_epsilon": "1e-6"}, "layer_norm_epsilon must be a number, got '1e-6'"),
    ({"visual": {"width": [64]}}, "visual.width must be an integer, got [64]"),
])
def test_config_values_of_the_wrong_type_name_the_field_and_file(tmp_path: Path, config: QwenVLConfig,
                                                                  change: dict, message: str) -> None:
    # were: 2.5 layers passed int() and failed later with a TypeError traceback; "abc" said only "invalid literal"
    from qwenvl.config import ConfigError

    config.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    if "visual" in change:
        d["visual"].update(change["visual"])
    else:
        d.update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=re.escape(f"config.json: {message}")):
        QwenVLConfig.from_pretrained(tmp_path)


def test_saving_an_int8_quantized_model_is_refused(tmp_path: Path) -> None:
    """The int8 layers hold interleaved int8 weights and extra ``scales``: the folder was written as an official
    checkpoint that neither we nor the official code could load."""
    from qwenvl.quantize import optimize_for_inference

    model = optimize_for_inference(QwenVL.from_pretrained(FIXTURE, dtype=torch.float32), "int8")
    with pytest.raises(CheckpointError, match=r"int8-quantized model .*transformer\.h\.0\.attn\.c_attn"):
        model.save_pretrained(tmp_path / "q8")
    assert not (tmp_path / "q8").exists()
    plain = optimize_for_inference(QwenVL.from_pretrained(FIXTURE, dtype=torch.float32))  # RowLinear: same keys
    plain.save_pretrained(tmp_path / "fp32")
    assert QwenVL.from_pretrained(tmp_path / "fp32").state_dict().keys() == plain.state_dict().keys()


def test_saving_unmerged_lora_adapters_is_refused(tmp_path: Path) -> None:
    import peft  # a dev dependency: the tests never skip for want of it
    model = QwenVL.from_pretrained(FIXTURE, dtype=torch.float32)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=r".*\.attn\.c_attn", bias="none"), model)
    with pytest.raises(CheckpointError, match="unmerged LoRA adapters .*base_layer"):
        model.save_pretrained(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize(("shard", "message"), [(5, "plain file names"), (["a.safetensors"], "plain file names"),
                                                ("config.json", "must be .safetensors files"),
                                                ("model.safetensors.index.json", "must be .safetensors files")])
def test_index_naming_what_is_not_a_shard(tmp_path: Path, shard: object, message: str) -> None:
    """A shard name that is not a string was a TypeError from sorting; another file of the folder was read as
    weights (config.json through torch.load: "refusing to load config.json: it may reference code")."""
    (tmp_path / "config.json").write_text("{}")
    save_file({"b": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"a": shard, "b": "model-00001-of-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(tmp_path)


def test_a_weight_file_without_tensors_is_one_line(tmp_path: Path) -> None:
    save_file({}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors holds no tensors") as err:
        load_weights(_meta_mini(), tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"rotary_emb_base": 0}, "rotary_emb_base must be a positive number, got 0"),  # loaded, then NaN logits
    ({"layer_norm_epsilon": -1.0}, "layer_norm_epsilon must be a finite number >= 0, got -1.0"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be positive, got 0"),
    ({"visual": {"mlp_ratio": -2.0}}, "visual.mlp_ratio must be a positive number, got -2.0"),
    ({"visual": {"layer_norm_eps": -1e-6}}, "visual.layer_norm_eps must be a finite number >= 0, got -1e-06"),
    ({"torch_dtype": [1]}, "torch_dtype must be \"bfloat16\", \"float16\" or \"float32\", got [1]"),  # merge_lora: TypeError
    # merge_lora: "unknown dtype 'garbage'", naming no file; a finetune saved it as float32
    ({"torch_dtype": "garbage"}, "torch_dtype must be \"bfloat16\", \"float16\" or \"float32\", got 'garbage'"),
    # read and ignored: the official model finds pictures by this id, ours by <img>'s fixed one
    ({"visual": {"image_start_id": 5}}, "visual.image_start_id 5 is not supported: the tokenizer's <img> is 151857"),
    # read and ignored: the official attention then leaves its scores unscaled
    ({"scale_attn_weights": False}, "scale_attn_weights False is not supported"),
])
def test_config_values_no_shape_shows_must_make_sense(tmp_path: Path, config: QwenVLConfig, change: dict,
                                                      message: str) -> None:
    test_config_values_of_the_wrong_type_name_the_field_and_file(tmp_path, config, change, message)


@pytest.mark.parametrize("key", ["heads", "width", "mlp_ratio"])
def test_a_visual_section_without_a_required_key_is_refused(tmp_path: Path, key: str) -> None:
    """The official vision tower has no default for these; a missing ``heads`` loaded here as the 9.6B model's 16
    (no shape shows a head count: other answers, at most a warning for the shapes of a preset)."""
    from qwenvl.config import ConfigError

    shutil.copytree(FIXTURE, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del cfg["visual"][key]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=re.escape(f"config.json: 'visual' has no {key} (the official")):
        QwenVL.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("key", ["pad_token_id", "eos_token_id"])
def test_generation_ids_beyond_the_vocabulary_are_refused(tmp_path: Path, config: QwenVLConfig, key: str) -> None:
    # a pad_token_id of 10**6 loaded and failed mid-batch (IndexError) when a finished row was fed it
    from qwenvl.config import ConfigError

    config.save_pretrained(tmp_path)
    for bad in (config.lm.vocab_size, -1):
        (tmp_path / "generation_config.json").write_text(json.dumps({key: bad}))
        with pytest.raises(ConfigError, match=re.escape(f"generation_config.json: {key} {bad} is out of range: the "
                                                        f"model has ids 0..{config.lm.vocab_size - 1}")):
            QwenVLConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(("gen", "message"), [
    ({"do_sample": "no"}, "do_sample must be true or false, got 'no'"),  # was taken as true: sampling
    ({"max_window_size": "6144"}, "max_window_size must be an integer, got '6144'"),  # failed later, unnamed
    ({"top_p": None, "top_k": "5"}, "top_k must be an integer, got '5'"),
    ({"eos_token_id": []}, "eos_token_id must be a token id or a non-empty list of them, got []"),  # IndexError
    ({"chat_format": "llama"}, "chat_format must be 'raw' or 'chatml', got 'llama'"),  # blamed config.json
    ([], "expected a JSON object, got list"),  # Processor.from_pretrained: AttributeError
])
def test_generation_config_problems_name_that_file(tmp_path: Path, config: QwenVLConfig, gen: object,
                                                    message: str) -> None:
    from qwenvl import Processor
    from qwenvl.config import ConfigError

    config.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(ConfigError, match=re.escape(f"generation_config.json: {message}")):
        QwenVLConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()  # the processor of a folder with a generation_config.json alone
    with pytest.raises(ConfigError, match=re.escape(f"generation_config.json: {message}")):
        Processor.from_pretrained(tmp_path)


def test_a_sharded_training_checkpoint_names_the_convert_that_makes_it_loadable(tmp_path: Path) -> None:
    # predict --model RUN/checkpoint-N said "no weights ... found rng-0.pt", not what to do
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    for name in (".metadata", "__0_0.distcp", "rng-0.pt", "trainer_state.json"):
        (ckpt / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(f"(a sharded training checkpoint: `qwenvl convert {ckpt} "
                                                        "OUT` writes it in the official layout)")):
        find_weights(ckpt)


def test_a_training_checkpoint_copied_without_its_hidden_metadata_says_so(tmp_path: Path) -> None:
    # `cp -r checkpoint-2/* elsewhere/` leaves out .metadata: convert then said "no weights ... found rng-0.pt"
    ckpt = tmp_path / "copied"
    ckpt.mkdir()
    for name in ("__0_0.distcp", "__1_0.distcp", "rng-0.pt", "config.json"):
        (ckpt / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape("it holds the shards of a sharded training checkpoint "
                                                        "(__0_0.distcp) but not their .metadata: copy the whole "
                                                        "checkpoint-STEP folder, hidden files included")):
        find_weights(ckpt)


def test_tensors_sharing_storage_in_a_bin_load_as_separate_parameters(tmp_path: Path, caplog) -> None:
    """A .bin whose lm_head is the very storage of wte (torch.save of a tied model) loaded both parameters onto one
    memory: an in-place update of one (a training step) silently changed the other too."""
    state = _random_state(Mini(vocab=8), torch.float32)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with caplog.at_level("WARNING", logger="qwenvl.checkpoint"):
        model = load_weights(_meta_mini(vocab=8), tmp_path)
    assert "lm_head.weight shares its storage with transformer.wte.weight" in caplog.text
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    assert torch.equal(model.lm_head.weight, state["transformer.wte.weight"])


@pytest.mark.parametrize(("obj", "message"), [
    ({"lm_head.weight": torch.zeros(2), "step": 5}, r"'step' is int, not a tensor"),
    ({"state_dict": {"lm_head.weight": torch.zeros(2)}}, r"'state_dict' is dict, not a tensor \(the weights may be nested under it"),
    ({3: torch.zeros(2)}, r"the key 3 is not a tensor name"),
])
def test_a_bin_with_a_non_tensor_value_names_it(tmp_path: Path, obj: dict, message: str) -> None:
    torch.save(obj, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin does not hold a state dict .*" + message) as err:
        load_state_dict(tmp_path)
    assert "\n" not in str(err.value)


def test_a_plain_pickle_bin_is_refused_without_torch_warnings(tmp_path: Path, recwarn) -> None:
    """pickle.dump's protocol 4 made torch warn (two lines on stderr) before our one-line refusal."""
    import pickle

    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"lm_head.weight": 1}, f, protocol=4)
    with pytest.raises(CheckpointError, match=r"refusing to load .*pytorch_model\.bin"):
        load_state_dict(tmp_path)
    assert [str(w.message) for w in recwarn] == []


def test_loading_a_folder_reads_its_config_once(golden_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``qwenvl.inference.load`` read and parsed config.json twice (the memory check, then the model's loader); a
    config the caller already read is not read again, and is still checked against the weights."""
    from qwenvl import fileio, hardware
    from qwenvl.inference import load

    reads: list[str] = []
    read_json = fileio.read_json

    def counting(file, *args, **kwargs):
        reads.append(Path(file).name)
        return read_json(file, *args, **kwargs)

    monkeypatch.setattr(fileio, "read_json", counting)
    monkeypatch.setattr(hardware, "available_memory", lambda: 2**40)  # the memory check runs, and passes
    model, _ = load(golden_dir, dtype="float32", device="cpu")
    assert reads.count("config.json") == 1
    reads.clear()
    config = QwenVLConfig.from_pretrained(golden_dir)
    load(golden_dir, dtype="float32", device="cpu", config=config)
    assert reads.count("config.json") == 1  # the caller's read alone
    with pytest.raises(CheckpointError, match="num_hidden_layers|shape|missing|unexpected"):
        QwenVL.from_pretrained(golden_dir, config=QwenVLConfig.from_preset("mid"))
    with pytest.raises(TypeError, match="config must be a QwenVLConfig"):
        QwenVL.from_pretrained(golden_dir, config=config.to_official())


def test_a_lora_adapter_given_as_the_model_says_how_to_use_it(tmp_path, golden_dir, capsys, monkeypatch):
    # peft's output folder (adapter_config.json + adapter_model.safetensors) given as the model was "no config.json
    # in DIR", which said neither what the folder is nor what to do with it
    from qwenvl import cli, inference

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(8, 128)},
              str(adapter / "adapter_model.safetensors"))
    said = (f"{adapter} is a LoRA adapter (adapter_config.json, no model weights), not a checkpoint: merge it into the "
            f"checkpoint it was trained from with `qwenvl convert BASE OUT --merge_lora --adapter {adapter}` "
            "(qwenvl.train.lora.merge_lora in Python), then use OUT")
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "g.jsonl"
    data.write_text('{"image": "images/cat.png", "sent": "a cat", "bbox": [0, 0, 1, 1], "height": 8, "width": 8}\n')
    for argv in (["predict", "--model", str(adapter), "--predict_data", "hi", "--modal_type", "text"],
                 ["chat", "--model", str(adapter)], ["info", str(adapter)], ["convert", str(adapter), "out"],
                 ["eval", "grounding", "--model", str(adapter), "--data", str(data), "--image_dir", str(golden_dir)]):
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.strip() == f"qwenvl {argv[0]}: error: {said}", argv
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError) as e:
        inference.load(adapter)
    assert str(e.value) == said
    with pytest.raises(CheckpointError) as e:  # the transformers habit: was "no config.json in DIR"
        QwenVL.from_pretrained(adapter)
    assert str(e.value) == said
    # with a config.json beside it (copied from the base): the weights are what it lacks
    shutil.copy(golden_dir / "config.json", adapter / "config.json")
    with pytest.raises(CheckpointError) as e:
        QwenVL.from_pretrained(adapter)
    assert str(e.value) == said
    # a checkpoint folder that also holds an adapter's files is a checkpoint
    both = tmp_path / "both"
    shutil.copytree(golden_dir, both)
    shutil.copy(adapter / "adapter_config.json", both)
    checkpoint.refuse_adapter_folder(both)
    assert find_weights(both) == [both / "model.safetensors"]
