"""MindFormers checkpoints: import of the MindSpore-written fixtures gives the golden weights exactly, export of the
golden checkpoint gives the fixtures byte for byte, fp32 round trips are bit-identical, configs come from
MindFormers YAMLs, and bad inputs fail with one line naming the tensor and leave nothing behind."""

from __future__ import annotations

import json
import logging
import re
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenvl import mindformers as mf
from qwenvl.checkpoint import load_state_dict, save_pretrained
from qwenvl.cli import main
from qwenvl.config import QwenVLConfig
from qwenvl.mindspore_ckpt import CkptWriter, read_tensor, scan

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "qwenvl-tiny"
MANIFEST = json.loads((FIXTURES / "mindformers" / "manifest.json").read_text())
# fixture -> (dtype of its weights, export options that reproduce it)
EXPORTS = {
    "tiny_fp32": (torch.float32, {"dtype": torch.float32}),
    "tiny_fp16": (torch.float16, {}),
    "tiny_bf16": (torch.bfloat16, {"dtype": torch.bfloat16}),
    "tiny_fp16_qkv_concat_emb_opt": (torch.float16, {"use_qkv_concat": True, "emb_strategy": 1}),
}


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "model.safetensors")


@pytest.fixture(scope="module")
def config() -> QwenVLConfig:
    return QwenVLConfig.from_pretrained(GOLDEN)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- import ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*EXPORTS, "tiny_trainer"])
def test_import_gives_the_golden_weights(name, mindformers_ckpt, golden, config, tmp_path):
    out = tmp_path / "official"
    summary = mf.import_checkpoint(mindformers_ckpt(name), out, config)
    dtype = EXPORTS.get(name, (torch.float16,))[0]  # the trainer's weights are fp16 (norms fp32: cast, exact)
    got = load_state_dict(out)
    assert set(got) == set(golden)
    for key, want in golden.items():
        assert got[key].dtype == dtype and torch.equal(got[key], want.to(dtype)), key
    assert QwenVLConfig.from_pretrained(out).torch_dtype == str(dtype).removeprefix("torch.")
    assert summary.tensors == 61 and "\n" not in str(summary)
    if name == "tiny_trainer":
        assert len(summary.ignored) == 93 and "adam_m.* x42" in str(summary) and "global_step" in str(summary)
    assert _leftovers(tmp_path) == []


def test_imported_folder_loads_and_computes_like_the_golden(mindformers_ckpt, golden_model, tmp_path):
    from qwenvl import QwenVL

    assert main(["convert", str(mindformers_ckpt("tiny_fp16")), str(tmp_path / "m"), "--config", str(GOLDEN),
                 "--dtype", "float32"]) == 0
    model = QwenVL.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[151644, 872, 198, 9707, 151645]])
    assert torch.equal(model(input_ids=ids).logits, golden_model(input_ids=ids).logits)


def test_import_with_a_mindformers_yaml(mindformers_ckpt, golden, config, tmp_path):
    yaml_file = tmp_path / "predict_qwenvl_tiny.yaml"
    yaml_file.write_text(_TINY_YAML)
    cfg = mf.load_config(yaml_file)
    assert cfg.lm == config.lm and cfg.visual == config.visual
    mf.import_checkpoint(mindformers_ckpt("tiny_fp16_qkv_concat_emb_opt"), tmp_path / "o", cfg, dtype=torch.float32)
    got = load_state_dict(tmp_path / "o")
    assert all(torch.equal(got[k], v.float()) for k, v in golden.items())


def test_an_import_writes_the_generation_settings_it_is_told_or_the_base_models(mindformers_ckpt, tmp_path, caplog):
    # was: a MindFormers YAML (which says nothing of them) gave Qwen-VL-Chat's settings (chat_format chatml, top_p
    # 0.3), also for the README's own example, a base model: `qwenvl predict` then wrapped its prompts in ChatML
    caplog.set_level(logging.INFO, logger="qwenvl.mindformers")
    yaml_file = tmp_path / "predict_qwenvl_tiny.yaml"
    yaml_file.write_text(_TINY_YAML)
    ckpt = str(mindformers_ckpt("tiny_fp16"))

    def generation(out: Path) -> dict:
        return json.loads((out / "generation_config.json").read_text())

    assert main(["convert", ckpt, str(tmp_path / "yaml"), "--config", str(yaml_file)]) == 0
    assert generation(tmp_path / "yaml")["chat_format"] == "raw"
    base, chat = mf.official_generation("raw"), mf.official_generation("chatml")
    assert (base.chat_format, chat.chat_format, chat.top_p) == ("raw", "chatml", 0.3)
    assert generation(tmp_path / "yaml") == base.to_dict()
    assert f"{tmp_path / 'yaml'}/generation_config.json: chat_format raw, top_p {base.top_p} (the base model's, as " \
        f"--config {yaml_file} does not say; choose with --chat_format raw|chatml)" in caplog.messages
    assert mf.load_config(yaml_file).generation == base  # the Python API too

    mf.convert(ckpt, str(tmp_path / "chat"), config=str(yaml_file), chat_format="chatml")
    assert generation(tmp_path / "chat") == chat.to_dict()
    assert caplog.messages[-1].endswith("chat_format chatml, top_p 0.3 (--chat_format; choose with --chat_format "
                                        "raw|chatml)")
    # a folder's own generation_config.json comes along (the golden one is raw), unless --chat_format says
    mf.convert(ckpt, str(tmp_path / "folder"), config=str(GOLDEN))
    assert generation(tmp_path / "folder").items() >= json.loads((GOLDEN / "generation_config.json").read_text()).items()
    assert f"(from --config {GOLDEN}; choose" in caplog.messages[-1]
    mf.convert(ckpt, str(tmp_path / "folder_chat"), config=str(GOLDEN), chat_format="chatml")
    assert generation(tmp_path / "folder_chat") == chat.to_dict()
    # a config.json without a generation_config.json beside it says nothing either
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_bytes((GOLDEN / "config.json").read_bytes())
    mf.convert(ckpt, str(tmp_path / "bare_out"), config=str(tmp_path / "bare"), chat_format=None)
    assert generation(tmp_path / "bare_out")["chat_format"] == "raw"

    with pytest.raises(ValueError, match=r"^--chat_format must be raw \(a base model.*got 'ChatML'$"):
        mf.convert(ckpt, str(tmp_path / "x"), config=str(yaml_file), chat_format="ChatML")
    with pytest.raises(ValueError, match="--chat_format is for importing a .ckpt"):
        mf.convert(str(GOLDEN), str(tmp_path / "x.ckpt"), chat_format="raw")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.ckpt").exists()


def test_the_real_mindformers_yamls_map_to_the_9_6b_model(tmp_path):
    yaml_file = tmp_path / "predict_qwenvl_9.6b.yaml"
    yaml_file.write_text(_REAL_YAML)
    cfg = mf.load_config(yaml_file)
    preset = QwenVLConfig.from_preset("qwen-vl-9.6b")
    assert cfg.lm == preset.lm and cfg.visual == preset.visual  # mlp_ratio 4.9231, intermediate 2 x 11008
    assert mf.load_config("tiny").lm.hidden_size == 128
    assert mf.load_config(GOLDEN / "config.json").visual.width == 64


def _flipped(src: Path, dst: Path, name: str, at: int, new: bytes) -> Path:
    """``src`` with the bytes at ``at`` of tensor ``name``'s data replaced by ``new`` (its trailer intact)."""
    (t,) = [t for t in scan(src) if t.name == name]
    data = bytearray(src.read_bytes())
    data[t.pieces[0][0] + at:t.pieces[0][0] + at + len(new)] = new
    dst.write_bytes(data)
    return dst


def test_an_import_checks_a_crc_trailer(mindformers_ckpt, golden, tmp_path, capsys):
    # was: the trailer was skipped unchecked, so a damaged file (a bit flipped in a copy) imported silently
    good = tmp_path / "crc.ckpt"
    summary = mf.export_checkpoint(GOLDEN, good, crc_check=True)
    fixture = mindformers_ckpt("tiny_fp16").read_bytes()
    assert good.read_bytes() == fixture + b"crc_num" + zlib.crc32(fixture).to_bytes(10, "big")  # save_checkpoint's
    assert str(summary).endswith("; CRC32 trailer written")
    assert main(["convert", str(good), str(tmp_path / "ok"), "--config", str(GOLDEN)]) == 0
    assert capsys.readouterr().out.strip().endswith("; CRC32 verified")
    got = load_state_dict(tmp_path / "ok")
    assert all(torch.equal(got[k], v.half()) for k, v in golden.items())
    summary = mf.import_checkpoint(mindformers_ckpt("tiny_fp16"), tmp_path / "plain", mf.load_config(GOLDEN))
    assert "CRC" not in str(summary)  # no trailer, nothing said

    wq = "llm_model.transformer.layers.1.attention.wq.weight"
    at = next(t for t in scan(good) if t.name == wq).pieces[0][0] + 10
    # the lowest bit of one float16 weight: a finite value, only the CRC tells
    for bad, new in (("bit.ckpt", bytes([good.read_bytes()[at] ^ 1])),
                     ("nan.ckpt", b"\x00\x7e")):  # a NaN: said as a damaged file, not as NaN weights
        _flipped(good, tmp_path / bad, wq, 10, new)
        err = _fails([str(tmp_path / bad), str(tmp_path / "out"), "--config", str(GOLDEN)], capsys,
                     f"{tmp_path / bad}: corrupt file: its crc_num trailer says CRC32 {zlib.crc32(fixture)}, its "
                     "bytes give ")
        assert "NaN" not in err
    # a trainer checkpoint: a flip in an optimizer moment, which the import skips, is found all the same
    trainer = _rewrite(mindformers_ckpt("tiny_trainer"), tmp_path / "trainer.ckpt", lambda n, t: [(n, t)], crc=True)
    assert main(["convert", str(trainer), str(tmp_path / "t_ok"), "--config", str(GOLDEN)]) == 0
    capsys.readouterr()
    _flipped(trainer, tmp_path / "adam.ckpt", "adam_m." + wq, 100, b"\x55")
    _fails([str(tmp_path / "adam.ckpt"), str(tmp_path / "out"), "--config", str(GOLDEN)], capsys,
           "adam.ckpt: corrupt file: its crc_num trailer says CRC32")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="--crc_check is for an export"):
        mf.convert(str(good), str(tmp_path / "out"), config=str(GOLDEN), crc_check=True)


# ---- export ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_equals_the_mindspore_written_fixture(name, mindformers_ckpt, tmp_path):
    out = tmp_path / "out.ckpt"
    summary = mf.export_checkpoint(GOLDEN, out, **EXPORTS[name][1])
    assert out.read_bytes() == mindformers_ckpt(name).read_bytes()  # names, order, shapes, dtypes, values, framing
    assert summary.tensors == len(MANIFEST["fixtures"][name]["tensors"])
    assert mf.ms_names(QwenVLConfig.from_pretrained(GOLDEN), "qkv" in name) == \
        [n for n, _dtype, _shape in MANIFEST["fixtures"][name]["tensors"]]


def test_an_export_never_replaces_a_file_that_appears_during_the_run(tmp_path, capsys, monkeypatch):
    # checked absent at the start, the .ckpt was then written with a replacing rename over whatever came meanwhile
    out, read = tmp_path / "qwenvl.ckpt", mf.check_finite

    def user_writes(*args, **kwargs):  # the user's file appears while the tensors are written
        if not out.exists():
            out.write_text("my notes")
        return read(*args, **kwargs)

    monkeypatch.setattr(mf, "check_finite", user_writes)
    assert main(["convert", str(GOLDEN), str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"qwenvl convert: error: the output file {out} was created by "
                                               "something else during the run and is left as it is; nothing was "
                                               "written (pass --overwrite to replace it)")
    assert out.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["qwenvl.ckpt"]
    assert main(["convert", str(GOLDEN), str(out), "--overwrite"]) == 0 and out.stat().st_size > 1000


def test_export_by_the_command(mindformers_ckpt, tmp_path, capsys):
    assert main(["convert", str(GOLDEN), str(tmp_path / "qwenvl.ckpt")]) == 0  # float16, as convert_weight.py
    assert (tmp_path / "qwenvl.ckpt").read_bytes() == mindformers_ckpt("tiny_fp16").read_bytes()
    line = capsys.readouterr().out.strip()
    assert line.endswith("81 tensors (Float16 x81), 79.01 MB") and "\n" not in line


def test_the_commands_chat_format_and_crc_check_flags(mindformers_ckpt, tmp_path, capsys):
    # convert's parser had neither: --chat_format (the generation settings an import writes) and --crc_check (an
    # export with MindSpore's CRC32 trailer) were reachable from Python alone
    ckpt = str(mindformers_ckpt("tiny_fp16"))
    assert main(["convert", ckpt, str(tmp_path / "chat"), "--config", str(GOLDEN), "--chat_format", "chatml"]) == 0
    assert json.loads((tmp_path / "chat" / "generation_config.json").read_text())["chat_format"] == "chatml"
    assert main(["convert", str(GOLDEN), str(tmp_path / "crc.ckpt"), "--crc_check"]) == 0
    assert capsys.readouterr().out.strip().endswith("; CRC32 trailer written")
    plain = mindformers_ckpt("tiny_fp16").read_bytes()
    data = (tmp_path / "crc.ckpt").read_bytes()
    assert data[:-17] == plain and data[-17:] == b"crc_num" + zlib.crc32(plain).to_bytes(10, "big")
    assert main(["convert", str(tmp_path / "crc.ckpt"), str(tmp_path / "back"), "--config", str(GOLDEN)]) == 0
    assert capsys.readouterr().out.strip().endswith("; CRC32 verified")


def test_ckpt_flags_on_a_folder_to_folder_convert_are_refused_rather_than_ignored(tmp_path, capsys):
    for flags in (["--config", str(GOLDEN)], ["--use_qkv_concat"], ["--emb_strategy", "2"], ["--crc_check"],
                  ["--chat_format", "raw"]):
        _fails([str(GOLDEN), str(tmp_path / "out"), *flags], capsys,
               f"{flags[0]}: for converting to or from a MindSpore .ckpt")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [{}, {"use_qkv_concat": True, "emb_strategy": 2}])
def test_fp32_round_trip_is_bit_identical(options, config, tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = mf.official_shapes(config)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}  # full fp32 mantissas
    save_pretrained(state, config, tmp_path / "a")
    mf.export_checkpoint(tmp_path / "a", tmp_path / "a.ckpt", dtype=torch.float32, **options)
    mf.import_checkpoint(tmp_path / "a.ckpt", tmp_path / "b", config)
    back = load_state_dict(tmp_path / "b")
    assert set(back) == set(state)
    for k, t in state.items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], t), k


def test_vit_qkv_is_regrouped_per_head():
    # in_proj rows are [head0: q k v][head1: q k v]; dense1 (q) takes head0's q then head1's q
    r = mf.rule("transformer.visual.transformer.resblocks.0.attn.in_proj.weight")
    t = torch.arange(12).reshape(12, 1)  # 2 heads x (q, k, v) x head_dim 2
    (q,), (k,), (v,) = mf._split(r, t, heads=2, pad_rows=0)
    assert q.flatten().tolist() == [0, 1, 6, 7] and k.flatten().tolist() == [2, 3, 8, 9]
    assert torch.equal(mf._join(r, [q, k, v], heads=2, vocab=0), t)
    assert r.ms_names[0] == "vision_encoder.transformer.resblocks.0.attn.dense1.weight"


# ---- bad inputs -----------------------------------------------------------------------------------------------
def _fails(args: list[str], capsys, *expected: str) -> str:
    assert main(["convert", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("qwenvl convert: error:"), err
    for e in expected:
        assert e in err, err
    return err


def _rewrite(src: Path, dst: Path, edit, crc: bool = False) -> Path:
    with open(src, "rb") as f, open(dst, "wb") as out:
        w = CkptWriter(out, crc_check=crc)
        for t in scan(src):
            for name, data in edit(t.name, read_tensor(f, t)):
                w.write(name, data)
        w.finish()
    return dst


def test_bad_checkpoints_fail_with_one_line_and_no_output(mindformers_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = ["--config", str(GOLDEN)]
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    _fails([str(tmp_path / "notes.ckpt"), str(out), *cfg], capsys, "not a MindSpore checkpoint")

    raw = mindformers_ckpt("tiny_fp16").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(raw[:-1000])  # inside the last tensor
    _fails([str(tmp_path / "cut.ckpt"), str(out), *cfg], capsys, "truncated", "'llm_model.lm_head.weight'")

    (tmp_path / "code.ckpt").write_bytes(raw.replace(b"Float16", b"Float08", 1))
    _fails([str(tmp_path / "code.ckpt"), str(out), *cfg], capsys, "'llm_model.transformer.wte.embedding_weight'",
           "'Float08'")

    def extra(name, t):
        yield name, t
        if name.endswith("ffn_norm.weight"):
            yield name.replace("ffn_norm", "ffn_norm_extra"), t

    _rewrite(mindformers_ckpt("tiny_fp16"), tmp_path / "extra.ckpt", extra)
    _fails([str(tmp_path / "extra.ckpt"), str(out), *cfg], capsys, "neither MindFormers Qwen-VL weights",
           "'llm_model.transformer.layers.0.ffn_norm_extra.weight' [128]")

    def drop(name, t):
        if "wk" not in name:
            yield name, t

    _rewrite(mindformers_ckpt("tiny_fp16"), tmp_path / "drop.ckpt", drop)
    _fails([str(tmp_path / "drop.ckpt"), str(out), *cfg], capsys, "missing",
           "'llm_model.transformer.layers.0.attention.wk.weight'")

    wide = json.loads((GOLDEN / "config.json").read_text()) | {"intermediate_size": 640}
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    _fails([str(mindformers_ckpt("tiny_fp16")), str(out), "--config", str(tmp_path / "wide.json")], capsys,
           "'llm_model.transformer.layers.0.feed_forward.w1.weight' has shape [256, 128], the config needs [320, 128]")

    # a config of fewer layers than the file (a smaller preset, another model's --config): the counts, not "not a
    # Qwen-VL checkpoint?"
    shallow = json.loads((GOLDEN / "config.json").read_text()) | {"num_hidden_layers": 1}
    (tmp_path / "shallow.json").write_text(json.dumps(shallow))
    err = _fails([str(mindformers_ckpt("tiny_fp16")), str(out), "--config", str(tmp_path / "shallow.json")], capsys,
                 "'llm_model.transformer.layers.1.")
    assert err.endswith("(the file holds 2 language-model layers where the config has 1: does --config describe "
                        "this checkpoint?)"), err
    _fails([str(tmp_path / "extra.ckpt"), str(out), *cfg], capsys, "(not a Qwen-VL checkpoint?)")
    _fails([str(mindformers_ckpt("tiny_fp16")), str(out)], capsys, "needs --config")
    _fails([str(mindformers_ckpt("tiny_fp16")), str(out), "--config", "no-such-preset"], capsys, "neither a folder")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bad_export_sources_fail_with_one_line_and_no_output(tmp_path, capsys, golden, config):
    state = dict(golden)
    del state["transformer.h.1.mlp.w1.weight"]
    save_pretrained(state, config, tmp_path / "partial")
    _fails([str(tmp_path / "partial"), str(tmp_path / "x.ckpt")], capsys, "transformer.h.1.mlp.w1.weight is missing")
    _fails([str(tmp_path / "nowhere"), str(tmp_path / "x.ckpt")], capsys, "nowhere")
    _fails([str(GOLDEN), str(tmp_path / "x.ckpt"), "--config", "tiny"], capsys, "--config is for importing")
    assert not (tmp_path / "x.ckpt").exists() and _leftovers(tmp_path) == []


def test_format_bin_and_shard_size_are_refused_rather_than_ignored(mindformers_ckpt, tmp_path, capsys):
    # an import streams tensors into safetensors; an export writes one .ckpt: neither can honour --format bin
    _fails([str(mindformers_ckpt("tiny_fp16")), str(tmp_path / "out"), "--config", str(GOLDEN), "--format", "bin"],
           capsys, "--format bin")
    _fails([str(GOLDEN), str(tmp_path / "x.ckpt"), "--format", "bin"], capsys, "--format bin")
    _fails([str(GOLDEN), str(tmp_path / "x.ckpt"), "--max_shard_size", "1GB"], capsys,
           "--max_shard_size does not apply: a MindSpore .ckpt is written as one file")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.ckpt").exists()

_TINY_YAML = """\
model:
  model_config:
    type: QwenVLConfig
    num_queries: 256
    proj_output_dim: 128
    vision_model:
      arch:
        type: QwenVLVisionModel
      model_config:
        type: QwenVLVisionConfig
        hidden_size: 64
        intermediate_size: 128
        num_hidden_layers: 2
        num_attention_heads: 2
        image_size: &image_size 448
        patch_size: 14
    llm_model:
      arch:
        type: QwenForCausalLM
      model_config:
        type: QwenConfig
        seq_length: 2048
        hidden_size: 128
        num_layers: 2
        num_heads: 2
        vocab_size: 151936
        intermediate_size: 256
        rms_norm_eps: 1.0e-6
        enable_emb_opt: True
        qkv_concat: True
        rotary_pct: 1.0
        rotary_emb_base: 10000
        kv_channels: 64
  arch:
    type: QwenVL
"""

# the model section of MindFormers' research/qwenvl/qwenvl_9.6b/predict_qwenvl_9.6b.yaml (abridged)
_REAL_YAML = """\
model:
  model_config:
    type: QwenVLConfig
    freeze_vision: True
    compute_dtype: "float16"
    param_init_type: "float16"
    vision_model:
      arch:
        type: QwenVLVisionModel
      model_config:
        type: QwenVLVisionConfig
        hidden_size: 1664
        intermediate_size: 8192
        num_hidden_layers: 48
        num_attention_heads: 16
        image_size: 448
        patch_size: 14
        gelu_dtype: "float32"
    llm_model:
      arch:
        type: QwenForCausalLM
      model_config:
        type: QwenConfig
        batch_size: 1
        seq_length: 2048
        hidden_size: 4096
        num_layers: 32
        num_heads: 32
        vocab_size: 151936
        intermediate_size: 11008
        rms_norm_eps: 1.0e-6
        enable_emb_opt: True
        qkv_concat: False
        rotary_pct: 1.0
        rotary_emb_base: 10000
        kv_channels: 128
  arch:
    type: QwenVL
"""


def test_float16_overflow_fails_with_one_line_and_no_output(golden, config, tmp_path, capsys):
    # float16 (the export's default, or --dtype float16 on import) holds at most 65504: a larger weight would
    # become inf (the folder would then not load), so the conversion says so and writes nothing
    state = {k: v.float() for k, v in golden.items()}
    state["transformer.h.0.mlp.w1.weight"][0, 0] = 1e6
    save_pretrained(state, config, tmp_path / "big")
    _fails([str(tmp_path / "big"), str(tmp_path / "big16.ckpt")], capsys,
           "llm_model.transformer.layers.0.feed_forward.w1.weight", "float16", "--dtype")
    assert not (tmp_path / "big16.ckpt").exists()
    assert main(["convert", str(tmp_path / "big"), str(tmp_path / "big32.ckpt"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    _fails([str(tmp_path / "big32.ckpt"), str(tmp_path / "imported"), "--config", str(GOLDEN), "--dtype", "float16"],
           capsys, "'llm_model.transformer.layers.0.feed_forward.w1.weight'", "float16")
    assert not (tmp_path / "imported").exists() and _leftovers(tmp_path) == []


def test_an_integer_tensor_in_the_export_source_is_refused(golden, config, tmp_path, capsys):
    # was: the int32 tensor was cast to float16 and written as if it were weights (loading the folder refuses it)
    state = dict(golden)
    state["transformer.h.0.attn.c_attn.weight"] = golden["transformer.h.0.attn.c_attn.weight"].to(torch.int32)
    save_pretrained(state, config, tmp_path / "ints")
    _fails([str(tmp_path / "ints"), str(tmp_path / "ints.ckpt")], capsys,
           "transformer.h.0.attn.c_attn.weight holds torch.int32, not floating-point weights")
    assert not (tmp_path / "ints.ckpt").exists() and _leftovers(tmp_path) == []


def test_non_finite_weights_are_refused_both_ways(golden, config, tmp_path, capsys):
    # were: converted as they were, into a .ckpt or a folder that `qwenvl` then refuses to load ("holds NaN")
    state = {k: v.float() for k, v in golden.items()}
    state["transformer.h.1.mlp.w2.weight"][3, 4] = float("nan")
    save_pretrained(state, config, tmp_path / "nan")
    _fails([str(tmp_path / "nan"), str(tmp_path / "nan.ckpt")], capsys,
           "transformer.h.1.mlp.w2.weight", "NaN or infinite values (1 of 32768 values (1 NaN))")
    assert not (tmp_path / "nan.ckpt").exists()
    with open(tmp_path / "nan.ckpt", "wb") as f:  # written directly: the export refuses it
        writer = CkptWriter(f)
        for r in mf.rules(config):
            for name, parts in zip(r.ms_names, mf._split(r, state[r.official], config.visual.heads, 0)):
                writer.write(name, parts)
    _fails([str(tmp_path / "nan.ckpt"), str(tmp_path / "imported"), "--config", str(GOLDEN)], capsys,
           "'llm_model.transformer.layers.1.feed_forward.w3.weight'", "NaN or infinite values")
    assert not (tmp_path / "imported").exists() and _leftovers(tmp_path) == []


def test_a_folder_named_like_a_ckpt_is_said_to_be_a_folder(tmp_path, capsys):
    (tmp_path / "run.ckpt").mkdir()
    _fails([str(tmp_path / "run.ckpt"), str(tmp_path / "out"), "--config", str(GOLDEN)], capsys, "is a folder")


@pytest.mark.parametrize(("line", "bad", "message"), [
    # were: ZeroDivisionError tracebacks (hidden_size // num_heads; the ViT's intermediate_size / hidden_size)
    ("num_heads: 2", "num_heads: 0", "llm_model.model_config.num_heads must be positive, got 0"),
    ("hidden_size: 64", "hidden_size: 0", "vision_model.model_config.hidden_size must be positive, got 0"),
    # were: "intermediate_size must be an integer, got '256256'" (the string doubled) and "got 513.0"
    ("intermediate_size: 256", "intermediate_size: '256'",
     "llm_model.model_config.intermediate_size must be an integer, got '256'"),
    ("intermediate_size: 256", "intermediate_size: 256.5",
     "llm_model.model_config.intermediate_size must be an integer, got 256.5"),
    # was: "unsupported operand type(s) for //: 'str' and 'int'", naming no key
    ("hidden_size: 128", "hidden_size: '128'", "llm_model.model_config.hidden_size must be an integer, got '128'"),
    # was taken as an epsilon of 1.0
    ("rms_norm_eps: 1.0e-6", "rms_norm_eps: true", "llm_model.model_config.rms_norm_eps must be a number, got True"),
    # were: OverflowError tracebacks (an integer beyond any float: float(), the ViT's intermediate_size / hidden_size)
    ("rms_norm_eps: 1.0e-6", "rms_norm_eps: 1" + "0" * 400,
     "llm_model.model_config.rms_norm_eps must be a number of float range, got an integer of 401 digits"),
    ("intermediate_size: 128", "intermediate_size: 1" + "0" * 400,
     "vision_model.model_config.intermediate_size is too large: an integer of 401 digits"),
    ("hidden_size: 64", "hidden_size: 2" + "0" * 400, "vision_model.model_config.hidden_size is too large: an integer "
     "of 401 digits"),
])
def test_bad_values_of_a_mindformers_yaml_name_the_key(tmp_path, line, bad, message):
    from qwenvl.config import ConfigError

    assert line in _TINY_YAML
    yaml_file = tmp_path / "predict_qwenvl_tiny.yaml"
    yaml_file.write_text(_TINY_YAML.replace(line, bad, 1))
    with pytest.raises(ConfigError, match=re.escape(f"{yaml_file}: {message}")):
        mf.load_config(yaml_file)


def test_a_yaml_epsilon_written_1e_6_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-6 (no dot) as a string; MindFormers' YAMLs may write it so."""
    yaml_file = tmp_path / "predict_qwenvl_tiny.yaml"
    yaml_file.write_text(_TINY_YAML.replace("rms_norm_eps: 1.0e-6", "rms_norm_eps: 1e-6"))
    assert mf.load_config(yaml_file).lm.layer_norm_epsilon == 1e-6


def test_an_emb_strategy_padding_beyond_the_vocabulary_is_refused(tmp_path):
    # --emb_strategy 1000000000 went on to allocate the padded embedding ("can't allocate memory"); a large but
    # allocatable value would have written a file many times the model's size
    vocab = QwenVLConfig.from_pretrained(GOLDEN).lm.vocab_size
    with pytest.raises(ValueError, match=rf"--emb_strategy 1000000000 pads wte and lm_head to a multiple of "
                                         rf"512000000000 rows, more than their {vocab}: .* \(at most {vocab // 512} here\)"):
        mf.export_checkpoint(GOLDEN, tmp_path / "x.ckpt", emb_strategy=10**9)
    assert not (tmp_path / "x.ckpt").exists()
    mf.export_checkpoint(GOLDEN, tmp_path / "y.ckpt", emb_strategy=vocab // 512)


def test_a_mindformers_finetune_yaml_with_section_aliases_is_mapped(tmp_path):
    # MindFormers' finetune_qwenvl_9.6b_bf16.yaml names its dataset with "dataset_config: *train_dataset" (an
    # alias of a whole section), which the YAML reader refused: the README's `convert --config` with it failed
    f = tmp_path / "finetune_qwenvl_9.6b_bf16.yaml"
    f.write_text("train_dataset: &train_dataset\n  batch_size: 1\ntrain_dataset_task:\n  dataset_config: *train_dataset\n"
                 "model:\n  model_config:\n    vision_model:\n      model_config:\n        image_size: &image_size 448\n"
                 "    llm_model:\n      model_config:\n        hidden_size: 4096\n        num_layers: 32\n"
                 "        num_heads: 32\n        intermediate_size: 11008\n"
                 "processor:\n  image_processor:\n    image_size: *image_size\n")
    config = mf.config_from_yaml(f)
    assert (config.lm.hidden_size, config.lm.intermediate_size, config.visual.image_size) == (4096, 22016, 448)


@pytest.mark.parametrize("run_config", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_this_repositorys_run_configs_as_config_are_named_as_such(run_config, mindformers_ckpt, tmp_path, capsys):
    # configs/predict_qwenvl_9.6b.yaml bears the name of MindFormers' own; was: "no model.model_config.llm_model.
    # model_config section (a MindFormers Qwen-VL YAML?)", which left the user sure it was one
    run_mode = re.search(r"^run_mode: (\w+)", run_config.read_text(), re.M).group(1)
    _fails([str(mindformers_ckpt("tiny_fp16")), str(tmp_path / "out"), "--config", str(run_config)], capsys,
           f"{run_config} is a qwenvl run config (run_mode: {run_mode}), not a MindFormers model YAML",
           "a checkpoint folder with config.json, or a preset")
    assert not (tmp_path / "out").exists()


def test_a_float64_ckpt_names_the_file_and_the_dtype_flag(mindformers_ckpt, tmp_path, capsys):
    # was: "cannot write torch.float64 weights: use float32, float16 or bfloat16" (which file? use how?)
    f64 = _rewrite(mindformers_ckpt("tiny_fp16"), tmp_path / "f64.ckpt", lambda n, t: [(n, t.double())])
    _fails([str(f64), str(tmp_path / "out"), "--config", str(GOLDEN)], capsys,
           f"{f64}: most of its weights are Float64, which a checkpoint folder does not hold: choose --dtype float32")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert main(["convert", str(f64), str(tmp_path / "out"), "--config", str(GOLDEN), "--dtype", "float32"]) == 0
    assert load_state_dict(tmp_path / "out")["lm_head.weight"].dtype == torch.float32
