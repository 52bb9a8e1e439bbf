"""LoRA through peft: what trains, what stays frozen, adapter save/resume, merge into an official checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import peft  # noqa: F401 -- a dev dependency: the LoRA tests run, never skip
import pytest
import torch

from qwenvl.data.dataset import collate
from qwenvl.model import QwenVL
from qwenvl.train import merge_lora, train
from qwenvl.train import trainer as T

RESAMPLER = ("transformer.visual.attn_pool.", "transformer.visual.ln_post.", "transformer.visual.proj")


@pytest.fixture(scope="module")
def lora_run(make_cfg, processor, module_tmp_path):
    root = module_tmp_path
    QwenVL.from_config("tiny", seed=0).save_pretrained(root / "base")
    cfg = make_cfg(root / "out", preset="", load_checkpoint=str(root / "base"), use_lora=True, lora_r=4,
                   lora_alpha=8, lora_dropout=0.1, lora_train_resampler=True, max_steps=3, save_steps=2)
    return root, cfg, train(cfg, processor=processor)


def _batch(cfg, processor, model) -> dict:
    ds = T.build_dataset(cfg, processor, model)
    return collate([ds[0], ds[1]])


def test_only_adapters_and_the_resampler_get_gradients(lora_run, processor) -> None:
    root, cfg, result = lora_run
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_names = {n for n in trainable if ".lora_" in n}
    assert lora_names and trainable - lora_names == {
        n for n, _ in model.named_parameters() if n.startswith(RESAMPLER) and not n.endswith("pos_embed")}
    # adapters on the LM's c_attn, attn.c_proj, w1, w2 only: never in the vision tower
    targets = {n.split(".lora_")[0].split(".", 3)[-1] for n in lora_names}
    assert targets == {"attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"}
    assert not any(n.startswith("transformer.visual") for n in lora_names)

    batch = _batch(cfg, processor, model)
    model.train()
    model.zero_grad(set_to_none=True)
    model(batch["input_ids"], images=batch["images"], labels=batch["labels"]).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    model.zero_grad(set_to_none=True)

    # the base weights did not move; the adapters did
    base = QwenVL.from_pretrained(root / "base").state_dict()
    state = model.state_dict()
    for name, before in base.items():
        if name.startswith(RESAMPLER):
            continue
        key = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(before, state[key if key in state else name]), name
    assert any(state[n].abs().sum() > 0 for n in state if "lora_B" in n)


def test_adapter_folder_and_resume(lora_run, processor) -> None:
    root, cfg, result = lora_run
    adapter = root / "out" / "adapter"
    assert result.final_path == adapter
    assert {p.name for p in adapter.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors", "base_model.json"}
    assert (root / "out" / "checkpoint-2" / "adapter" / "adapter_model.safetensors").is_file()
    # the weights as readable as every other output (safetensors' save_file made them 0o600: a teammate on a
    # shared cluster could not read the adapter)
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in adapter.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~mask), modes
    # the run is finished (resume_training alone would say so and train nothing): resume its checkpoint by name
    resumed = train(cfg.replace(resume_training=True, resume_from=str(root / "out" / "checkpoint-2"),
                                output_dir=str(root / "out")), processor=processor)
    assert resumed.resumed_from == root / "out" / "checkpoint-2"
    assert resumed.losses == result.losses  # dropout RNG restored too
    want, got = result.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_merged_checkpoint_gives_the_adapted_logits(lora_run, processor) -> None:
    root, cfg, result = lora_run
    merged_dir = merge_lora(root / "base", result.final_path, root / "merged")
    merged = QwenVL.from_pretrained(merged_dir)
    base = QwenVL.from_pretrained(root / "base")
    assert set(merged.state_dict()) == set(base.state_dict())  # official names, nothing extra
    model = result.model.eval()
    batch = _batch(cfg, processor, model)
    with torch.no_grad():
        want = model(batch["input_ids"], batch["attention_mask"], images=batch["images"]).logits
        got = merged(batch["input_ids"], batch["attention_mask"], images=batch["images"]).logits
        plain = base(batch["input_ids"], batch["attention_mask"], images=batch["images"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (plain - want).abs().max() > 1e-3  # the adapters did change the model


def test_bad_lora_target_is_a_clear_error(make_cfg, processor, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, use_lora=True, lora_target=r"nothing\.matches")
    with pytest.raises(ValueError, match="matches no module"):
        train(cfg, processor=processor)


def test_a_missing_adapter_fails_at_once_without_going_online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import socket

    from qwenvl.checkpoint import CheckpointError

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to open a network connection")

    # peft takes a name that is not a local folder for a Hub id (a 35 s wait for the network, offline)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for name in ("org/name", str(tmp_path / "nothing")):  # a hub id, a missing folder: the same to us
        with pytest.raises(CheckpointError, match="adapter folder .* not found .*nothing is downloaded"):
            merge_lora(tmp_path / "base-that-is-not-read", name, tmp_path / "merged")
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="adapter .*adapter.safetensors is a file; give the adapter folder"):
        merge_lora(tmp_path / "base-that-is-not-read", tmp_path / "adapter.safetensors", tmp_path / "merged")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        merge_lora(tmp_path / "base", tmp_path / "empty", tmp_path / "merged")
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set when peft is imported by us, unless the user set it


def test_a_bad_adapter_file_is_a_clear_error(lora_run, tmp_path: Path) -> None:
    import shutil

    from qwenvl.checkpoint import CheckpointError

    root, _cfg, result = lora_run
    bad = tmp_path / "adapter"
    shutil.copytree(result.final_path, bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="cannot merge the adapter .*") as info:
        merge_lora(root / "base", bad, tmp_path / "merged")
    assert "\n" not in str(info.value)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json: not valid JSON: Expecting property name"):
        merge_lora(root / "base", bad, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"peft_type": None}, "does not describe a LoRA adapter: its peft_type is 'missing'"),  # peft: KeyError 'peft_type'
    ({"peft_type": "IA3"}, "does not describe a LoRA adapter: its peft_type is 'IA3'"),
    ({"r": "8"}, "r must be a positive integer, got '8'"),  # peft: '<=' not supported between 'str' and 'int'
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"lora_alpha": "16"}, "lora_alpha must be a positive number, got '16'"),  # peft: unsupported operand type(s)
])
def test_an_adapter_config_with_bad_fields_names_the_field(tmp_path: Path, change: dict, message: str) -> None:
    import json

    from qwenvl.checkpoint import CheckpointError

    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["c_attn"]} | change
    (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:  # said before the base is read
        merge_lora(tmp_path / "base-that-is-not-read", folder, tmp_path / "merged")
    msg = str(info.value)
    assert msg.startswith(str(folder / "adapter_config.json")) and message in msg and "\n" not in msg, msg
    assert not (tmp_path / "merged").exists()


def test_an_adapter_with_nan_weights_is_refused_before_writing(lora_run, tmp_path: Path) -> None:
    """A diverged run's adapter was merged and saved: the merged checkpoint then failed to load ("holds NaN")."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qwenvl.checkpoint import CheckpointError

    root, _cfg, result = lora_run
    bad = Path(shutil.copytree(result.final_path, tmp_path / "adapter"))
    weights = load_file(str(bad / "adapter_model.safetensors"))
    name = next(k for k in sorted(weights) if ".h.1.mlp.w2.lora_B" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"cannot merge the adapter {bad} into {root / 'base'}: "
                                              r"transformer\.h\.1\.mlp\.w2\.weight holds NaN or infinite values"):
        merge_lora(root / "base", bad, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_an_adapter_for_another_model_is_refused(lora_run, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from qwenvl.checkpoint import CheckpointError

    root, _cfg, result = lora_run
    weights = load_file(str(Path(result.final_path) / "adapter_model.safetensors"))

    def adapter(name: str, tensors: dict[str, torch.Tensor]) -> Path:
        folder = Path(shutil.copytree(result.final_path, tmp_path / name))
        save_file({k: v.clone() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
        return folder

    # a deeper model's adapter: peft would ignore its extra layers; a shallower one's: merge only some layers
    deeper = adapter("deeper", {**weights, **{k.replace(".h.1.", ".h.7."): v for k, v in weights.items() if ".h.1." in k}})
    shallower = adapter("shallower", {k: v for k, v in weights.items() if ".h.1." not in k})
    wider = adapter("wider", {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else v
                              for k, v in weights.items()})
    for folder, match in ((deeper, r"unexpected .*transformer\.h\.7\."), (shallower, r"missing .*transformer\.h\.1\."),
                          (wider, r"size mismatch for .*lora_A")):
        with pytest.raises(CheckpointError, match=match) as info:
            merge_lora(root / "base", folder, tmp_path / "merged")
        assert "\n" not in str(info.value)
    assert not (tmp_path / "merged").exists()


def test_the_command_says_an_adapter_for_another_model_in_one_line(lora_run, tmp_path: Path, capsys) -> None:
    # peft's own warning listing every key it missed (two lines, the keys in a Python list) came before our error
    import shutil
    import warnings

    from safetensors.torch import load_file, save_file

    from qwenvl.cli import main

    root, _cfg, result = lora_run
    shallower = Path(shutil.copytree(result.final_path, tmp_path / "shallower"))
    weights = load_file(str(shallower / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".h.1." not in k}, str(shallower / "adapter_model.safetensors"))
    with warnings.catch_warnings(record=True) as caught:  # what the command line prints on stderr
        warnings.simplefilter("always")
        assert main(["convert", "--merge_lora", "--adapter", str(shallower), str(root / "base"),
                     str(tmp_path / "out")]) == 2
    assert [str(w.message)[:60] for w in caught] == []
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qwenvl convert: error: the adapter {shallower} is not for the model") and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_merge_writes_the_shards_and_format_asked_for(lora_run, tmp_path: Path) -> None:
    from qwenvl.cli import main

    root, _cfg, result = lora_run
    out = tmp_path / "merged"
    assert main(["convert", "--merge_lora", "--load_checkpoint", str(root / "base"), "--adapter",
                 str(result.final_path), "--output_dir", str(out), "--max_shard_size", "20MB", "--format", "bin"]) == 0
    assert (out / "pytorch_model.bin.index.json").is_file() and not list(out.glob("*.safetensors"))
    assert len(list(out.glob("pytorch_model-*-of-*.bin"))) > 1
    merged = QwenVL.from_pretrained(out)
    assert set(merged.state_dict()) == set(QwenVL.from_pretrained(root / "base").state_dict())


def test_resuming_an_adapter_on_another_base_is_warned(lora_run, processor, tmp_path, caplog) -> None:
    # a LoRA checkpoint holds the adapter only: the frozen base comes from load_checkpoint, so an adapter
    # continued on another base (same shapes: Qwen-VL instead of Qwen-VL-Chat, say) went on silently
    root, cfg, _result = lora_run
    QwenVL.from_config("tiny", seed=1).save_pretrained(tmp_path / "other-base")
    resume = {"resume_from": str(root / "out" / "checkpoint-2"), "resume_training": True}
    with caplog.at_level("WARNING", logger="qwenvl.train.trainer"):
        train(cfg.replace(output_dir=str(tmp_path / "same"), **resume), processor=processor)
    assert "base" not in caplog.text, caplog.text
    with caplog.at_level("WARNING", logger="qwenvl.train.trainer"):
        train(cfg.replace(output_dir=str(tmp_path / "other"), load_checkpoint=str(tmp_path / "other-base"), **resume),
              processor=processor)
    assert (f"trained on the base {root / 'base'}; the weights this run loads ({tmp_path / 'other-base'}) are not that "
            "base's") in caplog.text
    caplog.clear()  # the same weights moved: told by their fingerprint, not by the path (it warned before)
    shutil.copytree(root / "base", tmp_path / "moved-base")
    with caplog.at_level("WARNING", logger="qwenvl.train.trainer"):
        train(cfg.replace(output_dir=str(tmp_path / "moved"), load_checkpoint=str(tmp_path / "moved-base"), **resume),
              processor=processor)
    assert "base" not in caplog.text, caplog.text
    caplog.clear()  # an adapter that records no fingerprint (older, peft's): by the path, as before
    shutil.copytree(root / "out" / "checkpoint-2", tmp_path / "unrecorded")
    (tmp_path / "unrecorded" / "adapter" / "base_model.json").unlink()
    with caplog.at_level("WARNING", logger="qwenvl.train.trainer"):
        train(cfg.replace(output_dir=str(tmp_path / "moved2"), load_checkpoint=str(tmp_path / "moved-base"),
                          resume_from=str(tmp_path / "unrecorded"), resume_training=True), processor=processor)
    assert f"was trained on the base {root / 'base'}; this run loads {tmp_path / 'moved-base'}" in caplog.text


def test_a_merge_into_float16_that_would_overflow_is_refused(lora_run, tmp_path: Path) -> None:
    """The merged float32 weights were cast to float16 unchecked: a weight beyond 65504 was saved as inf, and the
    merged checkpoint then failed to load ("holds NaN or infinite values")."""
    from qwenvl.checkpoint import CheckpointError

    root, _cfg, result = lora_run
    base = QwenVL.from_config("tiny", seed=0)
    with torch.no_grad():
        base.transformer.ln_f.weight[0] = 1e5
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(CheckpointError, match=r"cannot merge into float16: transformer\.ln_f\.weight: 1 of \d+ "
                                              r"values \(largest magnitude 100000\) are beyond the range of float16"):
        merge_lora(tmp_path / "base", result.final_path, tmp_path / "merged", dtype="float16")
    assert not (tmp_path / "merged").exists()
    merge_lora(tmp_path / "base", result.final_path, tmp_path / "merged", dtype="bfloat16")  # fits there


def test_a_rank_beyond_a_layers_width_is_warned(make_cfg, tmp_path: Path, caplog) -> None:
    # lora_r=200 on layers 128 wide was taken without a word: an adapter's update B @ A has a rank of at most
    # min(in, out), so the rest of r is parameters that add nothing (and a smaller lora_alpha / lora_r scale)
    from qwenvl.train.lora import apply_lora

    for r, warned in ((200, True), (128, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="qwenvl.train.lora"):
            apply_lora(QwenVL.from_config("tiny", seed=0), make_cfg(tmp_path, use_lora=True, lora_r=r))
        assert (f"lora_r={r} is larger than min(in, out) of 8 layer(s) with an adapter (smallest: "
                "transformer.h.0.attn.c_attn, 128 in, 384 out): an adapter's update cannot have a rank above that, so "
                "the rest adds parameters but no capacity; lower lora_r to 128 or less" in caplog.text) is warned, r


def test_a_lora_runs_output_folder_given_as_the_adapter_names_its_adapter_folder(tmp_path):
    # `convert BASE OUT --merge_lora --adapter runs/lora` said "not an adapter folder" and no more
    from qwenvl.checkpoint import CheckpointError
    from qwenvl.train.lora import adapter_folder

    run = tmp_path / "lora"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"not an adapter folder: .* \(the adapter of a LoRA run is in its "
                                              rf"adapter/ folder: --adapter {run / 'adapter'}\)$"):
        adapter_folder(run)
    with pytest.raises(CheckpointError, match=r"it has no adapter_config.json$"):  # no adapter inside: no hint
        adapter_folder(tmp_path)


def test_an_adapter_records_its_base_as_peft_does_and_by_fingerprint(lora_run, make_cfg, tmp_path: Path) -> None:
    # adapter_config.json said "base_model_name_or_path": null, and nothing told the base's weights apart
    import json

    from qwenvl.train.lora import base_fingerprint, lora_config_from

    root, _cfg, result = lora_run
    adapter = Path(result.final_path)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(root / "base")
    recorded = json.loads((adapter / "base_model.json").read_text())
    assert recorded == {"base_model_fingerprint": base_fingerprint(QwenVL.from_pretrained(root / "base"))}
    assert recorded["base_model_fingerprint"] == base_fingerprint(result.model)  # with its LoRA layers
    assert lora_config_from(make_cfg(tmp_path, use_lora=True)).base_model_name_or_path == "tiny"  # a random preset


def test_a_merge_into_another_base_of_the_same_shapes_is_refused(lora_run, tmp_path: Path, capsys) -> None:
    # `convert --merge_lora` merged an adapter into any base of the same shapes (Qwen-VL's into Qwen-VL-Chat, a
    # random preset's into a real checkpoint), exit 0, no word
    from qwenvl.checkpoint import CheckpointError
    from qwenvl.cli import main

    root, _cfg, result = lora_run
    chat = QwenVL.from_pretrained(root / "base")  # the same model fine-tuned further
    with torch.no_grad():
        chat.transformer.h[0].attn.c_attn.weight.mul_(1.01)
    chat.save_pretrained(tmp_path / "chat")
    QwenVL.from_config("tiny", seed=1).save_pretrained(tmp_path / "other")
    for base in (tmp_path / "chat", tmp_path / "other"):
        with pytest.raises(CheckpointError, match=rf"^the adapter {result.final_path} was trained on the base "
                                                  rf"{root / 'base'}, not on the weights in {base} \(") as info:
            merge_lora(base, result.final_path, tmp_path / "merged")
        assert "\n" not in str(info.value) and "--ignore_mismatched_base" in str(info.value)
        assert not (tmp_path / "merged").exists()
    command = ["convert", "--merge_lora", "--adapter", str(result.final_path), str(tmp_path / "chat"),
               str(tmp_path / "merged")]
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qwenvl convert: error: the adapter {result.final_path} was trained on") and "\n" not in err
    assert not (tmp_path / "merged").exists()
    assert main([*command, "--ignore_mismatched_base"]) == 0  # said on purpose: merged
    assert set(QwenVL.from_pretrained(tmp_path / "merged").state_dict()) == set(chat.state_dict())
    assert main(["convert", str(root / "base"), str(tmp_path / "copy"), "--ignore_mismatched_base"]) == 2
    assert "--ignore_mismatched_base is for --merge_lora" in capsys.readouterr().err
    # trained on the folder merged into, whose weights changed since: said so ("trained on the base X, not on X")
    moved = Path(shutil.copytree(result.final_path, tmp_path / "adapter"))
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "chat")}))
    with pytest.raises(CheckpointError, match=rf"^the adapter {moved} was trained on the weights {tmp_path / 'chat'} "
                                              r"held then, not on those it holds now \("):
        merge_lora(tmp_path / "chat", moved, tmp_path / "merged2")


def test_the_fingerprint_is_the_same_in_bfloat16_and_float32(lora_run, tmp_path: Path) -> None:
    # a float32 base, its bfloat16 copy, and either loaded in the other dtype are the same model: merged without a word
    from qwenvl.train.lora import base_fingerprint

    root, _cfg, result = lora_run
    QwenVL.from_pretrained(root / "base", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    want = base_fingerprint(QwenVL.from_pretrained(root / "base"))
    for folder in (root / "base", tmp_path / "bf16"):
        for dtype in (torch.float32, torch.bfloat16):
            assert base_fingerprint(QwenVL.from_pretrained(folder, dtype=dtype)) == want, (folder, dtype)
    merge_lora(tmp_path / "bf16", result.final_path, tmp_path / "merged")
    assert QwenVL.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16


def test_the_fingerprint_is_the_same_for_a_bfloat16_base_and_its_float16_copy(tmp_path: Path) -> None:
    # float16 keeps values below 2**-14 with fewer bits than bfloat16: a float16 copy of a bfloat16 checkpoint (for
    # GPUs without bfloat16) was taken for another model whenever a fingerprinted row held one (most rows at scale)
    from qwenvl.train.lora import base_fingerprint

    model = QwenVL.from_config("tiny", seed=0).to(torch.bfloat16)
    with torch.no_grad():
        for weight in (model.transformer.wte.weight, model.lm_head.weight):
            weight[0, :4] = torch.tensor([1.001e-6, -3.3e-7, 2.0**-15 * 1.37, 0.5])
    fp16 = QwenVL.from_config("tiny", seed=0)
    fp16.load_state_dict({k: v.to(torch.float16) for k, v in model.state_dict().items()})
    assert base_fingerprint(fp16.to(torch.float16)) == base_fingerprint(model)
    with torch.no_grad():
        model.lm_head.weight[0, 3] = 0.5078125  # one bfloat16 step away: another model
    assert base_fingerprint(fp16) != base_fingerprint(model)


def test_an_adapter_without_a_fingerprint_merges_with_a_warning(lora_run, tmp_path: Path, caplog) -> None:
    # peft's own adapters, and ours from before: the base cannot be checked, so it is said, not refused
    import shutil

    root, _cfg, result = lora_run
    old = Path(shutil.copytree(result.final_path, tmp_path / "old"))
    (old / "base_model.json").unlink()
    QwenVL.from_config("tiny", seed=1).save_pretrained(tmp_path / "other")
    with caplog.at_level("WARNING", logger="qwenvl.train.lora"):
        merge_lora(tmp_path / "other", old, tmp_path / "merged")
    assert (f"the adapter {old} does not record the base model it was trained on (no base_model.json): make sure "
            f"{tmp_path / 'other'} is that model") in caplog.text
    assert (tmp_path / "merged" / "config.json").is_file()
    caplog.clear()
    with caplog.at_level("WARNING", logger="qwenvl.train.lora"):
        merge_lora(root / "base", result.final_path, tmp_path / "merged-again")
    assert "base" not in caplog.text, caplog.text  # with one, the matching base is merged without a word


def test_an_unreadable_base_record_is_a_one_line_error(lora_run, tmp_path: Path) -> None:
    import shutil

    from qwenvl.checkpoint import CheckpointError

    root, _cfg, result = lora_run
    for i, (text, said) in enumerate((("{", "^{}: not valid JSON: "), ("[]", '^{} holds no "base_model_fingerprint" string'),
                                      ('{"other": 1}', '^{} holds no "base_model_fingerprint" string'))):
        bad = Path(shutil.copytree(result.final_path, tmp_path / f"bad{i}"))
        (bad / "base_model.json").write_text(text)
        with pytest.raises(CheckpointError, match=said.format(re.escape(str(bad / "base_model.json"))) + "[^\n]+$"):
            merge_lora(root / "base", bad, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(("name", "load_adapter_says"), [
    ("adapter_config.json", "the adapter {} was trained on another base"),  # read there only to name the base
    ("base_model.json", "{}: JSON nested too deeply to parse$"),
])
def test_a_record_nested_too_deeply_is_a_one_line_error(lora_run, tmp_path: Path, name: str,
                                                        load_adapter_says: str) -> None:
    # json.loads raised RecursionError: a traceback from `qwenvl convert --merge_lora`
    from qwenvl.checkpoint import CheckpointError
    from qwenvl.train.lora import load_adapter

    root, cfg, result = lora_run
    bad = Path(shutil.copytree(result.final_path, tmp_path / "bad"))
    (bad / name).write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)  # deeper than Python's recursion limit
    shown = bad if name == "adapter_config.json" else bad / name
    with pytest.raises(CheckpointError, match=load_adapter_says.format(re.escape(str(shown)))):
        load_adapter(_with_adapters(cfg, seed=1), bad)  # another base: the fingerprints differ
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(bad / name))}: JSON nested too deeply to parse$"):
        merge_lora(root / "base", bad, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def _with_adapters(cfg, seed: int = 0) -> QwenVL:
    """A tiny model (``seed``: its base weights) with the adapters of ``cfg``, untrained, as load_adapter wants."""
    from qwenvl.train.lora import apply_lora

    model = QwenVL.from_config("tiny", seed=seed)
    apply_lora(model, cfg)
    return model


def test_an_adapter_loads_into_the_base_it_was_trained_on(lora_run) -> None:
    from qwenvl.train.lora import base_fingerprint, load_adapter

    root, cfg, result = lora_run
    model = _with_adapters(cfg)
    params = dict(model.named_parameters())
    # peft renames the wrapped Linears' weights: the fingerprint reads them as the base's
    assert "transformer.h.0.attn.c_attn.base_layer.weight" in params
    assert "transformer.h.0.attn.c_attn.weight" not in params
    assert base_fingerprint(model) == base_fingerprint(QwenVL.from_pretrained(root / "base"))
    load_adapter(model, result.final_path)
    want, got = result.model.state_dict(), model.state_dict()
    assert set(got) == set(want) and all(torch.equal(want[k], got[k]) for k in want)  # adapters and resampler


def test_an_adapter_is_not_loaded_into_another_base_unless_asked(lora_run, caplog) -> None:
    # load_adapter loaded an adapter into any model of the same shapes, without a word (merge_lora refused it)
    from qwenvl.checkpoint import CheckpointError
    from qwenvl.train.lora import load_adapter

    root, cfg, result = lora_run
    other = _with_adapters(cfg, seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"^the adapter {result.final_path} was trained on the base "
                                              rf"{root / 'base'}, not on this model's base weights \(") as info:
        load_adapter(other, result.final_path)
    assert "\n" not in str(info.value) and str(info.value).endswith(
        "load it into the base it was trained on, or pass ignore_mismatched_base=True to load it all the same")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # refused before loading anything
    with caplog.at_level("WARNING", logger="qwenvl.train.lora"):
        load_adapter(other, result.final_path, ignore_mismatched_base=True)  # said on purpose: loaded
    assert not caplog.records
    want, got = result.model.state_dict(), other.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want if "lora_" in k or k.startswith(RESAMPLER))


def test_an_adapter_without_a_fingerprint_loads_with_a_warning(lora_run, tmp_path: Path, caplog) -> None:
    # peft's own adapters, and ours from before: the base cannot be checked, so it is said (as merge_lora says it)
    from qwenvl.train.lora import load_adapter

    root, cfg, result = lora_run
    old = Path(shutil.copytree(result.final_path, tmp_path / "old"))
    (old / "base_model.json").unlink()
    model = _with_adapters(cfg, seed=1)
    with caplog.at_level("WARNING", logger="qwenvl.train.lora"):
        load_adapter(model, old)
    assert (f"the adapter {old} does not record the base model it was trained on (no base_model.json): make sure "
            "the model it is loaded into is that model") in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in result.model.state_dict().items() if "lora_" in k)


def test_an_adapter_loads_into_an_int8_model_with_a_warning(lora_run, caplog) -> None:
    # adapters injected, then int8 (optimize_for_inference): the base's weights are int8 buffers, which the
    # fingerprint cannot read; load_adapter raised a bare KeyError ('transformer.h.0.attn.c_attn.weight')
    from qwenvl.quantize import optimize_for_inference
    from qwenvl.train.lora import load_adapter

    root, cfg, result = lora_run
    model = optimize_for_inference(_with_adapters(cfg, seed=0), "int8")
    with caplog.at_level("WARNING", logger="qwenvl.train.lora"):
        load_adapter(model, result.final_path)
    assert (f"the model's weights are quantized (int8): whether the adapter {result.final_path} was trained on them "
            "cannot be checked; load it before quantizing to check it") in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in result.model.state_dict().items() if "lora_" in k)


def test_converting_a_lora_checkpoint_says_a_merge_command_that_works(lora_run, tmp_path, capsys) -> None:
    # it said `qwenvl convert --merge_lora --load_checkpoint BASE --adapter DIR OUT`, which failed as written:
    # "SOURCE is given twice: --load_checkpoint BASE and OUT"
    import re
    import shlex

    from qwenvl.cli import main

    root, _cfg, _result = lora_run
    assert main(["convert", str(root / "out" / "checkpoint-2"), str(tmp_path / "consolidated")]) == 2
    said = re.search(r"merge it with `(qwenvl convert [^`]+)`", capsys.readouterr().err)
    assert said is not None
    argv = shlex.split(said.group(1).replace("BASE", str(root / "base")).replace("OUT", str(tmp_path / "merged")))
    assert main(argv[1:]) == 0, capsys.readouterr().err
    assert (tmp_path / "merged" / "config.json").is_file()
