"""Full (stage-3) fine-tuning on the tiny preset: learning, freezing, checkpoints, exact resume, atomic saves."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qwenvl.data.dataset import collate
from qwenvl.model import QwenVL
from qwenvl.outputs import MARKER_FILE
from qwenvl.train import TrainConfig, train
from qwenvl.train import trainer as T
from qwenvl.train.sharded_checkpoint import consolidate
from qwenvl.train.trainer import cosine_with_warmup, select_trainable


@pytest.fixture(scope="module")
def full_run(make_cfg, processor, module_tmp_path):
    cfg = make_cfg(module_tmp_path / "full", max_steps=6, save_steps=3)
    return cfg, train(cfg, processor=processor)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_lowers_the_loss(full_run) -> None:
    _cfg, result = full_run
    assert result.steps == 6 and len(result.losses) == 6
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses
    assert result.num_loss_tokens > 0 and result.tokens_per_second > 0
    assert result.learning_rates[0] == pytest.approx(1e-2)  # no warmup: full lr at step 1


def test_frozen_parameters_stay_bit_identical(full_run) -> None:
    cfg, result = full_run
    initial = QwenVL.from_config("tiny", seed=cfg.seed).state_dict()
    trained = result.model.state_dict()
    trainable = set(select_trainable(result.model, cfg))
    assert "transformer.visual.attn_pool.query" in trainable and "transformer.visual.proj" in trainable
    assert "transformer.visual.ln_post.weight" in trainable and "lm_head.weight" in trainable
    assert not any(n.startswith(("transformer.visual.transformer.", "transformer.visual.conv1")) for n in trainable)
    assert "transformer.visual.attn_pool.pos_embed" not in trainable
    for name, before in initial.items():
        if name in trainable:
            continue
        assert torch.equal(before, trained[name]), f"frozen {name} changed"
    changed = [n for n in trainable if not torch.equal(initial[n], trained[n])]
    assert "transformer.visual.attn_pool.query" in changed and "transformer.h.0.attn.c_attn.weight" in changed


def test_saved_checkpoints_load_with_the_trainers_logits(full_run, processor) -> None:
    cfg, result = full_run
    out = Path(cfg.output_dir)
    assert result.final_path == out and result.checkpoints == [out / "checkpoint-3"]
    # no staging leftovers and no lock: only our output marker is hidden
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [MARKER_FILE]
    loaded = QwenVL.from_pretrained(out)
    assert loaded.dtype == torch.float32
    ds = T.build_dataset(cfg, processor, loaded)
    batch = collate([ds[0], ds[1]])  # one with an image, one without
    model = result.model.eval()
    with torch.no_grad():
        want = model(batch["input_ids"], batch["attention_mask"], images=batch["images"]).logits
        got = loaded(batch["input_ids"], batch["attention_mask"], images=batch["images"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the periodic checkpoint is sharded (DCP); consolidated it is an official folder with the step-3 weights
    assert (out / "checkpoint-3" / ".metadata").is_file() and (out / "checkpoint-3" / "config.json").is_file()
    at_3 = QwenVL.from_pretrained(consolidate(out / "checkpoint-3", out.parent / "full-step3"))
    assert at_3.state_dict().keys() == model.state_dict().keys()
    assert not torch.equal(at_3.lm_head.weight, model.lm_head.weight)  # 3 steps before the end


def test_interrupted_then_resumed_run_is_exact(full_run, make_cfg, processor, tmp_path: Path, caplog) -> None:
    full_cfg, full = full_run
    cfg = make_cfg(tmp_path, max_steps=6, save_steps=0)
    # stop after step 3 (save_steps=0: stopping saves the checkpoint)
    stopped = train(cfg, processor=processor, callback=lambda info: info.step == 3)
    assert stopped.stopped_early and stopped.final_path is None and stopped.steps == 3
    assert not (tmp_path / "model.safetensors").exists()
    assert stopped.losses == full.losses[:3]

    resumed = train(cfg.replace(resume_training=True), processor=processor)
    assert resumed.resumed_from == tmp_path / "checkpoint-3"
    assert resumed.losses == full.losses  # bit-identical floats, history included
    want, got = full.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name

    # resuming the finished run trains nothing, writes nothing and says so
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and ".qwenvl-lock" not in p.name}
    with caplog.at_level("INFO", logger="qwenvl.train.trainer"):
        again = train(cfg.replace(resume_training=True), processor=processor)
    assert f"the run in {tmp_path} is complete (6 steps; final model in {tmp_path}): nothing to resume" in caplog.text
    assert "resumed from" not in caplog.text
    assert (again.steps, again.losses, again.final_path, again.resumed_from) == (6, full.losses, tmp_path, None)
    assert {p: p.stat().st_mtime_ns for p in files} == files
    # another run's settings: not this run's result, resuming goes on as before (here: refused, naming them)
    with pytest.raises(ValueError, match="learning_rate"):
        train(cfg.replace(resume_training=True, learning_rate=cfg.learning_rate / 2), processor=processor)


def test_a_failed_save_leaves_no_half_written_checkpoint(make_cfg, processor, tmp_path: Path, monkeypatch) -> None:
    cfg = make_cfg(tmp_path / "out", max_steps=2)
    model = T._prepare_model(cfg, None, torch.device("cpu"))
    run = T._setup_run(cfg, model, T.build_dataset(cfg, processor, model), torch.device("cpu"))

    def disk_full(*args, **kwargs) -> None:  # the sharded weights are already written when this fails
        raise OSError("No space left on device")

    monkeypatch.setattr("qwenvl.train.sharded_checkpoint.record_files", disk_full)
    with pytest.raises(OSError, match="No space left"):
        T._save_checkpoint(run)
    assert list((tmp_path / "out").iterdir()) == []  # neither checkpoint-0 nor a temporary folder


def test_gradient_accumulation_equals_one_big_batch(make_cfg, processor, tmp_path: Path) -> None:
    """4 samples as 1 x 4 or as 2 micro-batches x 2 give the same (token-weighted) loss and gradient."""
    grads = []
    losses = []
    for bs, accum in ((4, 1), (2, 2)):
        cfg = make_cfg(tmp_path, batch_size=bs, gradient_accumulation_steps=accum, bf16=False,
                       gradient_checkpointing=False)
        model = T._prepare_model(cfg, None, torch.device("cpu"))
        run = T._setup_run(cfg, model, T.build_dataset(cfg, processor, model), torch.device("cpu"))
        loss, _norm = T._train_step(run, T._next_micro_batches(run))
        losses.append(loss)
        # after one AdamW step exp_avg = (1 - beta1) * clipped gradient
        grads.append({n: run.optimizer.state[p]["exp_avg"] for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-9, msg=name)


def test_cosine_schedule_with_warmup() -> None:
    f = [cosine_with_warmup(s, warmup=10, total=110, min_ratio=0.1) for s in range(0, 121)]
    # the first step already trains (1/warmup), the warmup's last step reaches the peak
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1) and f[120] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_missing_model_or_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no model: set load_checkpoint"):
        train(TrainConfig(output_dir=str(tmp_path), max_steps=1))


def test_warmup_first_step_moves_the_weights(make_cfg, processor, tmp_path: Path, caplog) -> None:
    cfg = make_cfg(tmp_path, max_steps=2, warmup_steps=4, learning_rate=1e-2)
    model = T._prepare_model(cfg, None, torch.device("cpu"))
    before = _state(model)
    with caplog.at_level(logging.WARNING, logger="qwenvl.train.trainer"):
        result = train(cfg, model=model, processor=processor)
    assert result.learning_rates == pytest.approx([2.5e-3, 5e-3])
    assert not torch.equal(before["lm_head.weight"], model.state_dict()["lm_head.weight"])
    # a warmup as long as the run was not said (the 9.6B YAML's 300 steps with --max_steps 100, say)
    assert ("warmup_steps=4 is not shorter than the run's 2 steps: the learning rate never reaches "
            "learning_rate=0.01 (it ends at 0.005) and never decays" in caplog.text)


def test_lr_scales_give_vision_and_resampler_their_own_rates(make_cfg, processor, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, freeze_vision=False, vision_lr_scale=0.1, resampler_lr_scale=0.5, max_steps=3,
                   warmup_steps=0, learning_rate=1e-2, min_lr=1e-2)
    model = T._prepare_model(cfg, None, torch.device("cpu"))
    run = T._setup_run(cfg, model, T.build_dataset(cfg, processor, model), torch.device("cpu"))
    part = {id(p): T.part_of(n) for n, p in model.named_parameters()}
    expected = {"llm": 1e-2, "resampler": 5e-3, "vision": 1e-3}
    seen = set()
    for group in run.optimizer.param_groups:
        assert {part[id(p)] for p in group["params"]} == {next(part[id(p)] for p in group["params"])}
        kind = part[id(group["params"][0])]
        assert group["lr"] == pytest.approx(expected[kind])
        seen.add(kind)
    assert seen == {"llm", "resampler", "vision"}
    # the base rate is what the run reports
    result = train(cfg, model=model, processor=processor)
    assert result.learning_rates == pytest.approx([1e-2] * 3)


def test_default_scales_keep_the_two_optimizer_groups(make_cfg, processor, tmp_path: Path) -> None:
    """Multipliers of 1 give the two groups (decay, no decay) that checkpoints of earlier runs hold."""
    cfg = make_cfg(tmp_path, freeze_vision=False)
    model = T._prepare_model(cfg, None, torch.device("cpu"))
    run = T._setup_run(cfg, model, T.build_dataset(cfg, processor, model), torch.device("cpu"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [[id(p) for p in g["params"]] for g in run.optimizer.param_groups] == [
        [id(p) for _n, p in named if p.ndim >= 2], [id(p) for _n, p in named if p.ndim < 2]]


def test_freeze_embedding_freezes_only_the_input_embedding(make_cfg, processor, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, freeze_embedding=True, max_steps=2)
    model = T._prepare_model(cfg, None, torch.device("cpu"))
    before = _state(model)
    train(cfg, model=model, processor=processor)
    after = model.state_dict()
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert "transformer.wte.weight" not in select_trainable(model, cfg)
    assert "transformer.wte.weight" in select_trainable(model, cfg.replace(freeze_embedding=False))


def test_a_sample_that_stops_decoding_mid_run_is_skipped_and_reported(make_cfg, processor, broken_after_check,
                                                                       tmp_path: Path) -> None:
    from qwenvl.data.dataset import DatasetError

    data_path, dataset = broken_after_check
    cfg = make_cfg(tmp_path / "out", data_path=str(data_path), max_steps=2, skip_bad_samples=True)
    result = train(cfg, processor=processor, dataset=dataset)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(result.bad_samples) == 2 and all("street.jpg" in b for b in result.bad_samples)  # 2 use it
    with pytest.raises(DatasetError, match="street.jpg"):
        train(cfg.replace(skip_bad_samples=False, output_dir=str(tmp_path / "out2")), processor=processor,
              dataset=dataset)


def test_a_wholly_bad_micro_batch_on_one_rank_keeps_step_with_the_others() -> None:
    # under torchrun every rank must run the same forward passes (FSDP's collectives): a micro-batch none of whose
    # samples loads (skip_bad_samples) ended that rank's run with an error, and the job with it; now the rank runs a
    # micro-batch without a labelled token, which adds nothing to the step
    from types import SimpleNamespace

    good = collate([{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "images": None}])
    run = SimpleNamespace(cfg=SimpleNamespace(gradient_accumulation_steps=2, skip_bad_samples=True), batches=iter([(good, []),
                                                                                           (None, ["x.png: broken"])]),
                          bad_samples=[], progress=SimpleNamespace(step=3), env=SimpleNamespace(distributed=True, rank=1, world_size=2))
    micro = T._next_micro_batches(run)
    assert len(micro) == 2 and micro[0] is good and run.bad_samples == ["x.png: broken"]
    assert T._loss_tokens(micro[1]["labels"]) == 0 and micro[1]["images"] is None
    assert micro[1]["input_ids"].shape == micro[1]["labels"].shape == micro[1]["attention_mask"].shape
    run.env.distributed, run.batches = False, iter([(good, []), (None, ["x.png: broken"])])
    assert T._next_micro_batches(run) == [good]  # one process: the micro-batch is left out


@pytest.mark.parametrize(("save_dtype", "stored", "want"), [
    ("auto", "bfloat16", torch.bfloat16), ("auto", "float16", torch.float16), ("auto", "float32", torch.float32),
    ("auto", None, torch.float32), ("bfloat16", "float32", torch.bfloat16), ("float16", "bfloat16", torch.float16),
    ("float32", "bfloat16", torch.float32),
])
def test_the_final_weights_are_saved_in_save_dtype_or_the_models(save_dtype, stored, want) -> None:
    run = SimpleNamespace(cfg=SimpleNamespace(save_dtype=save_dtype),
                          model=SimpleNamespace(config=SimpleNamespace(torch_dtype=stored)))
    assert T._save_dtype(run) == want


def test_a_saved_input_path_that_is_not_text_is_said_to_differ(tmp_path: Path) -> None:
    # a checkpoint's recorded settings (trainer_state.json) are read back as JSON: a number where a path belongs
    # was a TypeError traceback on resume
    cfg = TrainConfig(data_path=str(tmp_path / "a.jsonl"), preset="tiny")
    assert T._other_inputs({"data_path": str(tmp_path / "." / "a.jsonl")}, cfg) == []
    assert T._other_inputs({"data_path": 5}, cfg) == [f"data_path 5 -> {cfg.data_path!r}"]


def test_a_global_batch_larger_than_the_data_and_an_unreached_save_step_are_said(make_cfg, processor, tmp_path: Path,
                                                                               caplog) -> None:
    # 8 samples in global batches of 16: "num_epochs 1" was one step over every sample twice, without a word; and
    # a save_steps past the last step kept no checkpoint to resume from, without a word either
    cfg = make_cfg(tmp_path, max_steps=0, num_epochs=1, batch_size=4, gradient_accumulation_steps=4, save_steps=5)
    model = T._prepare_model(cfg, None, torch.device("cpu"))
    dataset = T.build_dataset(cfg, processor, model)
    with caplog.at_level(logging.WARNING, logger="qwenvl.train.trainer"):
        run = T._setup_run(cfg, model, dataset, torch.device("cpu"))
    assert run.total_steps == 1
    assert ("the global batch of 16 samples (batch_size x gradient_accumulation_steps x ranks) is larger than the "
            "data's 8: every step trains on some samples more than once (num_epochs=1 makes 1 step(s), 2.0 passes "
            "over the data); lower batch_size or gradient_accumulation_steps" in caplog.text)
    assert "save_steps=5 is not smaller than the run's 1 steps: no checkpoint is saved before the final model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwenvl.train.trainer"):  # a batch the data fills: nothing said
        T._setup_run(cfg.replace(gradient_accumulation_steps=2, save_steps=0), model, dataset, torch.device("cpu"))
    assert "global batch" not in caplog.text and "save_steps" not in caplog.text


def test_a_max_length_beyond_the_models_seq_length_is_warned(make_cfg, processor, tmp_path: Path, caplog) -> None:
    # max_length=4096 on a model of seq_length 2048 trained positions it never learnt without a word: dynamic NTK and
    # LogN scaling, which stretch the official model past seq_length, apply only at inference
    model = T._prepare_model(make_cfg(tmp_path), None, torch.device("cpu"))
    for max_length, warned in ((4096, True), (2048, False)):
        cfg = make_cfg(tmp_path, max_length=max_length)
        dataset = T.build_dataset(cfg, processor, model)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qwenvl.train.trainer"):
            T._setup_run(cfg, model, dataset, torch.device("cpu"))
        assert ("max_length=4096 is beyond the model's seq_length=2048 (its config): tokens past position 2048 train "
                "RoPE positions the model was not trained on (dynamic NTK and LogN scaling apply only at inference); "
                "lower max_length to 2048 unless extending the context is the aim" in caplog.text) is warned
        assert ("seq_length" in caplog.text) is warned


def test_a_run_that_diverges_stops_before_the_update_and_saves_no_model(make_cfg, processor, tmp_path: Path) -> None:
    # a non-finite loss (too high a learning rate) went on into NaN weights, saved as the final model with exit 0
    cfg = make_cfg(tmp_path / "out", max_steps=4, save_steps=1, save_total_limit=0)

    def poison(info: T.StepInfo) -> None:  # after step 2 one weight is infinite: step 3's loss and gradient are NaN
        if info.step == 2:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if n == "lm_head.weight")[0, 0] = float("inf")

    model = T._prepare_model(cfg, None, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^step 3: the loss or its gradient is not finite \(gradient norm nan\): "
                                         r"the run diverged .*; nothing of step 3 was applied and no final model is "
                                         rf"saved; the newest checkpoint is {tmp_path / 'out' / 'checkpoint-2'}; "
                                         "lower learning_rate"):
        train(cfg, model=model, processor=processor, callback=poison)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "trainer_state.json").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_final_weights_are_written_as_a_cast_of_the_whole_state_writes_them(dtype, tmp_path: Path) -> None:
    from qwenvl.checkpoint import save_pretrained

    model = QwenVL.from_config("tiny", dtype=torch.float32, seed=0)
    save_pretrained({k: v.to(dtype) for k, v in model.state_dict().items()}, model.config, tmp_path / "whole")
    T.publish_weights(model, tmp_path / "published", dtype)
    written = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "published").iterdir()) and "model.safetensors" in written
    for name in written:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "published" / name).read_bytes(), name


def test_the_final_weights_are_cast_as_they_are_written(tmp_path: Path, monkeypatch) -> None:
    """publish_weights cast the whole state before writing a byte: on a single GPU those copies (2 bytes a parameter
    in bf16: 17.9 GiB for the 9.6B model) sat beside the fp32 weights and AdamW's moments, and a run that fit its
    GPU ran out of memory at the final save. Now each tensor is cast on the host as it is written, a block at a
    time: the cast copies alive at once are at most two blocks."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    import qwenvl.checkpoint

    block = 2**20
    monkeypatch.setattr(qwenvl.checkpoint, "CAST_BLOCK_BYTES", block)

    class Casts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.alive: list[tuple[StorageWeakRef, int]] = []
            self.most = self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype != args[0].dtype:
                self.count += 1
                self.alive = [(ref, n) for ref, n in self.alive if not ref.expired()]
                self.alive.append((StorageWeakRef(out.untyped_storage()), out.untyped_storage().nbytes()))
                self.most = max(self.most, sum(n for _, n in self.alive))
            return out

    model = QwenVL.from_config("tiny", dtype=torch.float32, seed=0)
    total = sum(t.numel() for t in model.state_dict().values()) * 2
    assert total > 8 * block
    with Casts() as casts:
        T.publish_weights(model, tmp_path / "out", torch.bfloat16)
    assert casts.most <= 2 * block and casts.count >= total // block, (casts.most, casts.count, total)


# ---- ranks that must agree (real 2-rank runs: tests/train/test_distributed.py) --------------------------------
def test_every_rank_resumes_the_checkpoint_rank_0_finds(make_cfg, tmp_path: Path) -> None:
    # each rank listed output_dir itself: rank 1's lagging listing (an NFS client's cache after a restart) resumed
    # checkpoint-2 while rank 0 resumed checkpoint-4, mixing the two into one model that trained on
    from qwenvl.train.state import STATE_FILE

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / STATE_FILE).write_bytes(b"")
    cfg = make_cfg(tmp_path, resume_training=True)
    rank_1 = SimpleNamespace(is_main=False, broadcast=lambda obj: str(tmp_path / "checkpoint-4"))
    assert T._resume_path(cfg, rank_1) == tmp_path / "checkpoint-4"  # rank 0's, not its own listing's
    rank_0 = SimpleNamespace(is_main=True, broadcast=lambda obj: obj)
    assert T._resume_path(cfg, rank_0) == tmp_path / "checkpoint-2"
    assert T._resume_path(make_cfg(tmp_path / "empty", resume_training="auto"), rank_0) is None
    assert T._resume_path(cfg.replace(resume_from="elsewhere/checkpoint-9"), rank_1) == Path("elsewhere/checkpoint-9")


def test_ranks_whose_data_differ_in_size_stop_in_one_line() -> None:
    # a rank that skipped samples only it could not read (skip_bad_samples) ordered the others' samples by its
    # own count: the job trained on other samples than documented, or planned other step counts and hung
    from qwenvl.data.dataset import DatasetError
    from qwenvl.train.distributed import ReportedByAnotherRank

    def rank(r: int) -> SimpleNamespace:
        return SimpleNamespace(gather=lambda n: [16, 12], is_main=r == 0, rank=r, world_size=2)

    said = r"the ranks' training data differ in size \(rank 0: 16, rank 1: 12 samples\): a rank skipped samples"
    with pytest.raises(DatasetError, match="^" + said):
        T._check_same_data_size(rank(0), 16)
    with pytest.raises(ReportedByAnotherRank, match="^rank 1 of 2: stopped because " + said):
        T._check_same_data_size(rank(1), 12)
    T._check_same_data_size(SimpleNamespace(gather=lambda n: [16, 16], is_main=True, rank=0, world_size=2), 16)
