"""The demo: synthetic data, the report figures, the eval prompt, and a short end-to-end run."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.demo.report import GridItem, draw_loss_curve, draw_prediction_grid, smooth
from qwenvl.demo.synthetic import COLORS, SyntheticConfig, make_dataset, render_sample
from qwenvl.grounding import NORM_GRID, parse_grounding


def test_rendered_boxes_are_tight_and_disjoint() -> None:
    rng = random.Random(0)
    cfg = SyntheticConfig(image_size=224, min_shapes=3, max_shapes=3)
    for _ in range(20):
        image, specs = render_sample(rng, cfg)
        pixels = np.asarray(image)
        assert len({s.color for s in specs}) == 3
        for s in specs:
            x1, y1, x2, y2 = s.box
            assert 0 <= x1 < x2 <= 224 and 0 <= y1 < y2 <= 224
            mask = np.all(pixels == COLORS[s.color], axis=-1)
            ys, xs = np.nonzero(mask)
            # every pixel of that colour lies in the box, and the painted extent is the box
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == s.box


def test_grid_puts_shapes_on_the_grid() -> None:
    cfg = SyntheticConfig(min_shapes=2, max_shapes=2, min_size=0.3, max_size=0.5, grid=14)
    rng = random.Random(0)
    sizes = set()
    for _ in range(30):
        image, specs = render_sample(rng, cfg)
        pixels = np.asarray(image)
        for s in specs:
            assert all(v % 14 == 0 for v in s.box), s.box
            sizes.add(s.box[2] - s.box[0])
            ys, xs = np.nonzero(np.all(pixels == COLORS[s.color], axis=-1))
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == s.box
    assert sizes <= {70, 84, 98, 112} and len(sizes) > 1  # 30-50% of 224 px in steps of 14
    # the default (grid 1) places shapes anywhere
    free = [render_sample(rng, SyntheticConfig(min_shapes=2, max_shapes=2, min_size=0.3, max_size=0.5))[1]
            for _ in range(5)]
    assert any(v % 14 for specs in free for s in specs for v in s.box)


def test_dataset_formats_and_determinism(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", 6, 3, seed=7)
    b = make_dataset(tmp_path / "b", 6, 3, seed=7)
    assert a.train_json.read_bytes() == b.train_json.read_bytes()
    assert (a.root / a.train[0].image).read_bytes() == (b.root / b.train[0].image).read_bytes()
    records = json.loads(a.train_json.read_text())
    assert len(records) == 6
    user, assistant = records[0]["conversations"]
    assert user["from"] == "user" and assistant["from"] == "assistant"
    assert re.fullmatch(r"Picture 1: <img>images/train/000000\.png</img>\nBox the \w+ \w+", user["value"])
    (obj,) = parse_grounding(assistant["value"])
    assert obj.ref == a.train[0].expression and len(obj.boxes) == 1
    sample = a.train[0]
    box = sample.target_shape.box
    assert obj.boxes[0].as_tuple() == tuple(min(int(v / 224 * NORM_GRID), 999) for v in box)
    lines = [json.loads(line) for line in a.eval_jsonl.read_text().splitlines()]
    assert len(lines) == 3 and set(lines[0]) == {"image", "sent", "bbox", "height", "width"}
    assert (a.root / lines[0]["image"]).is_file()
    # held-out images are not training images
    train_imgs = {(a.root / s.image).read_bytes() for s in a.train}
    assert all((a.root / s.image).read_bytes() not in train_imgs for s in a.eval)


def test_synthetic_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="min_shapes"):
        SyntheticConfig(min_shapes=0)
    with pytest.raises(ValueError, match="min_size"):
        SyntheticConfig(min_size=0.5, max_size=0.4)
    with pytest.raises(ValueError, match="unknown colours"):
        SyntheticConfig(colors=("teal",))
    with pytest.raises(ValueError, match="without overlap"):
        render_sample(random.Random(0), SyntheticConfig(min_shapes=6, max_shapes=6, min_size=0.6, max_size=0.9))
    with pytest.raises(ValueError, match="grid must be"):
        SyntheticConfig(grid=0)
    with pytest.raises(ValueError, match="under one grid step"):
        SyntheticConfig(min_size=0.05, max_size=0.5, grid=28)


def test_report_figures(tmp_path: Path) -> None:
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    curve = draw_loss_curve([12.0 * 0.97**i + 0.3 for i in range(150)], tmp_path / "loss.png")
    one = draw_loss_curve([2.0], tmp_path / "one.png")
    with Image.open(curve) as im:
        assert im.format == "PNG" and im.size == (900, 520)
    Image.open(one).verify()
    with pytest.raises(ValueError, match="no finite"):
        draw_loss_curve([float("nan")], tmp_path / "bad.png")
    img = Image.new("RGB", (224, 224), "white")
    items = [GridItem(img, "the red circle", (10, 10, 80, 80), (12, 8, 85, 70), True),
             GridItem(img, "the blue square", (100, 100, 200, 200), None, False)] * 3
    grid = draw_prediction_grid(items, tmp_path / "grid.png", columns=4)
    with Image.open(grid) as im:
        assert im.width == 4 * (224 + 8) + 8
        arr = np.asarray(im.convert("RGB"))
    assert (np.all(arr == (255, 255, 255), axis=-1)).any() and (np.all(arr == (0, 0xE5, 0xFF), axis=-1)).any()


@pytest.mark.parametrize("style", ["ask", "ref", "ref_first", "ref_both"])
def test_eval_prompt_matches_training_tokens(tmp_path: Path, style: str) -> None:
    """The held-out prompt must be the exact prefix the model was trained on, up to and including <box>."""
    from qwenvl.demo.run import DEMO_PROMPTS
    from qwenvl.processor import Processor

    data = make_dataset(tmp_path, 2, 1, seed=0, style=style)
    proc = Processor(image_size=224, chat_format="chatml")
    record = json.loads(data.train_json.read_text())[0]
    train_ids = proc.encode_conversation(record["conversations"])["input_ids"]
    sample = data.train[0]
    prompt_ids = proc.tokenizer.encode(DEMO_PROMPTS[style].format(image=sample.image, expression=sample.expression))
    assert train_ids[: len(prompt_ids)] == prompt_ids
    assert re.fullmatch(r"\(\d+,\d+\),\(\d+,\d+\)</box><\|im_end\|>\n", proc.tokenizer.decode(train_ids[len(prompt_ids) :]))


def test_each_shape_asks_for_every_shape_of_a_training_image(tmp_path: Path) -> None:
    cfg = SyntheticConfig(min_shapes=2, max_shapes=3)
    one = make_dataset(tmp_path / "one", 5, 2, seed=3, config=cfg, style="ref_both")
    each = make_dataset(tmp_path / "each", 5, 2, seed=3, config=cfg, style="ref_both", each_shape=True)
    records = json.loads(each.train_json.read_text())
    assert [s.shapes for s in each.train] == [s.shapes for s in one.train]  # the same images
    assert len(records) == sum(len(s.shapes) for s in each.train)
    first = [r for r in records if r["id"].startswith("shapes-000000-")]
    asked = {r["conversations"][1]["value"].split("</ref>")[0] for r in first}
    assert asked == {f"<ref>{shape.expression}" for shape in each.train[0].shapes}
    assert each.eval_jsonl.read_text() == one.eval_jsonl.read_text()  # held-out: one request per image


def test_local_resampler_init_makes_image_tokens_local() -> None:
    import torch

    from qwenvl.demo.run import demo_model_config, local_resampler_init
    from qwenvl.model import QwenVL

    model = QwenVL.from_config(demo_model_config(), seed=0)
    pixels = torch.randn(1, 3, 224, 224)

    def spread() -> float:
        with torch.no_grad():
            feats = model.encode_images(pixels)[0]  # (256, hidden)
        return float(feats.std(0).mean())  # how much the 256 tokens differ from each other

    uniform = spread()
    local_resampler_init(model)
    assert spread() > 5 * uniform  # with the default init all tokens are nearly the same average


def _colour_probe_accuracy(kv_gain: float) -> float:
    """Held-out accuracy of a linear probe reading a shape token's colour from the untrained image features."""
    import torch

    from qwenvl.demo.run import demo_model_config, local_resampler_init
    from qwenvl.images import preprocess
    from qwenvl.model import QwenVL

    rng = random.Random(5)
    cfg = SyntheticConfig(image_size=224, min_shapes=2, max_shapes=2, min_size=0.3, max_size=0.5)
    pixels, labels = [], []
    for _ in range(80):
        image, _specs = render_sample(rng, cfg)
        centres = np.asarray(image)[7::14, 7::14]  # the pixel at the centre of each of the 16x16 patches
        lab = np.full((16, 16), -1)
        for i, rgb in enumerate(COLORS.values()):
            lab[(centres == np.array(rgb)).all(-1)] = i
        pixels.append(preprocess(image, 224))
        labels.append(lab.reshape(-1))
    model = QwenVL.from_config(demo_model_config(), seed=0).eval()
    local_resampler_init(model, kv_gain=kv_gain)
    with torch.no_grad():
        feats = model.encode_images(torch.stack(pixels)).reshape(-1, 128).float()
    y = torch.from_numpy(np.concatenate(labels))
    x = torch.cat([feats, torch.ones(len(feats), 1)], 1)
    on_shape = y >= 0
    train = on_shape & (torch.arange(len(y)) < 60 * 256)
    test = on_shape & ~train
    w = torch.linalg.lstsq(x[train], torch.nn.functional.one_hot(y[train], len(COLORS)).float()).solution
    return float((x[test] @ w).argmax(-1).eq(y[test]).float().mean())


def test_resampler_kv_gain_keeps_the_colour_in_the_image_tokens() -> None:
    low, default = _colour_probe_accuracy(0.1), _colour_probe_accuracy(1.0)
    assert low > 0.85 and low > default + 0.15, (low, default)  # measured: 0.91 vs 0.69


def test_run_demo_small_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from qwenvl.demo import run_demo

    with caplog.at_level("INFO"):
        result = run_demo(tmp_path / "out", steps=3, seed=0)
    # the trainer counts the embedding's and lm_head's trained rows only: the demo says so, with their full size
    # (a log of "training 669185 of 1719297 parameters" beside a report of a 40.6M-parameter model read as a bug)
    assert "the embedding and lm_head (38.9M parameters) train as the rows of the tokens the data uses" in caplog.text
    out = tmp_path / "out"
    for name in ("loss_curve.png", "predictions.png"):
        with Image.open(out / name) as im:
            im.verify()
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "steps", "final_loss", "train_seconds", "total_seconds",
                "eval_prompt", "losses", "demo_config", "model_config"):
        assert key in metrics
    assert metrics["steps"] == 3 and len(metrics["losses"]) == 3
    assert 0.0 <= result.accuracy_before <= 1.0 and 0.0 <= result.accuracy_after <= 1.0
    assert result.losses[-1] < result.losses[0]
    assert "Acc@0.5" in (out / "report.md").read_text()
    # the prompt the model is measured with, and the command that measures it again (run by tests/test_readme.py)
    assert (out / "eval_prompt.txt").read_text(encoding="utf-8") == metrics["eval_prompt"]
    assert ("```bash\nqwenvl eval grounding --model model --data data/eval.jsonl --image_dir data \\\n    "
            "--chat_format chatml --prompt_file eval_prompt.txt --dtype float32\n```") in (out / "report.md").read_text()
    landing = metrics["where_boxes_land"]
    assert landing == result.landing and sum(landing[k] for k in ("asked", "other", "neither", "unparsed")) == 8
    assert landing["asked"] == round(8 * result.accuracy_after)
    assert "where the final boxes land" in (out / "report.md").read_text()
    assert (out / "model" / "config.json").is_file()
    # the folder's marker lists what the demo wrote there (README, "Safety": the command and the files it wrote)
    from qwenvl.outputs import MARKER_FILE, read_marker

    assert read_marker(out) == {"written_by": "qwenvl", "command": "demo",
                                "files": sorted(p.name for p in out.iterdir() if p.name != MARKER_FILE)}
    assert len(read_marker(out)["files"]) == 9
    # lm_head trained as a shared row outside the answers' tokens (demo.vocab) is saved whole: a plain model
    # whose other rows are all equal, and they moved from their start at 0
    from qwenvl.data.dataset import ConversationDataset
    from qwenvl.demo.run import DEMO_ROTARY_BASE
    from qwenvl.demo.vocab import label_ids
    from qwenvl.model import QwenVL
    from qwenvl.processor import Processor

    saved = QwenVL.from_pretrained(out / "model", dtype=torch.float32)
    assert type(saved.lm_head) is torch.nn.Linear
    # the ViT's position table started at 0 (vit_position_init) and stayed there: the tower is frozen
    assert not saved.transformer.visual.positional_embedding.any()
    assert saved.config.lm.rotary_emb_base == DEMO_ROTARY_BASE  # saved with the model: `qwenvl eval` reads it back
    answers = label_ids(ConversationDataset(out / "data" / "train.json", Processor(chat_format="chatml"), out / "data"))
    assert 10 < len(answers) < 40  # digits, punctuation, </box>, <|im_end|>, ...
    others = torch.ones(saved.lm_head.out_features, dtype=torch.bool)
    others[answers] = False
    rest = saved.lm_head.weight[others]
    assert torch.equal(rest, rest[:1].expand_as(rest)) and rest.abs().sum() > 0
    assert len(json.loads((out / "eval_after.json").read_text())["predictions"]) == 8
    # the default data: shapes on the 14-px patch grid, every training image asked about each of its shapes
    boxes = [json.loads(line)["bbox"] for line in (out / "data" / "eval.jsonl").read_text().splitlines()]
    assert all(v % 14 == 0 for box in boxes for v in box)
    train = json.loads((out / "data" / "train.json").read_text())
    assert len(train) == 2 * metrics["demo_config"]["n_train"]
    report = (out / "report.md").read_text()
    assert "on a 14 px grid" in report and "(RoPE base 1757)" in report and "position table started as zero" in report
    # ... in the default colours only
    sents = [json.loads(line)["sent"] for line in (out / "data" / "eval.jsonl").read_text().splitlines()]
    assert all(s.split()[1] in ("red", "green", "blue", "yellow") for s in sents)
    assert "from red, green, blue, yellow" in (out / "report.md").read_text()


def test_demo_cli_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from qwenvl.demo.cli import add_parser, run

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--steps", "1", "--output_dir", str(tmp_path / "d"), "--seed", "1",
                              "--colors", "purple, orange"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "held-out Acc@0.5" in out
    d = tmp_path / "d"
    assert (f"measure it again: qwenvl eval grounding --model {d}/model --data {d}/data/eval.jsonl --image_dir "
            f"{d}/data --chat_format chatml --prompt_file {d}/eval_prompt.txt --dtype float32") in out
    assert (tmp_path / "d" / "report.md").is_file()
    sents = [json.loads(line)["sent"] for line in (tmp_path / "d" / "data" / "eval.jsonl").read_text().splitlines()]
    assert {s.split()[1] for s in sents} <= {"purple", "orange"}
    args = parser.parse_args(["demo", "--steps", "1", "--output_dir", str(tmp_path / "e"), "--colors", "red,teal"])
    with pytest.raises(ValueError, match="unknown colours"):
        run(args)


def test_demo_config_validation() -> None:
    from qwenvl.demo.run import DemoConfig

    with pytest.raises(ValueError, match="frozen_vision_steps"):
        DemoConfig(steps=10, frozen_vision_steps=11)
    assert DemoConfig(steps=10, frozen_vision_steps=10).frozen_vision_steps == 10  # all steps LM-only
    with pytest.raises(ValueError, match="style"):
        DemoConfig(style="chat")
    with pytest.raises(ValueError, match="lm_init_std"):
        DemoConfig(lm_init_std=-0.1)
    with pytest.raises(ValueError, match="position_init must be one of zero, sincos, random"):
        DemoConfig(position_init="learned")
    small = DemoConfig.small(20)
    assert small.steps == 20 and 0 <= small.frozen_vision_steps <= 20 and small.n_eval == 8


def test_recency_attention_init_makes_the_first_layer_look_back_a_few_tokens() -> None:
    import torch

    from qwenvl.demo.run import demo_model_config, recency_attention_init
    from qwenvl.model import QwenVL
    from qwenvl.model.llm import apply_rope, rope_cos_sin

    model = QwenVL.from_config(demo_model_config(), seed=0)
    lm = model.config.lm
    t, heads, hd = 300, lm.num_attention_heads, lm.kv_channels
    ids = torch.randint(0, 150_000, (1, t), generator=torch.Generator().manual_seed(0))

    def last_position_attention() -> torch.Tensor:  # (heads, t): where the last token looks in layer 0
        with torch.no_grad():
            block = model.transformer.h[0]
            qkv = block.attn.c_attn(block.ln_1(model.transformer.wte(ids))).view(1, t, 3, heads, hd)
            cos, sin = rope_cos_sin(torch.arange(t)[None], torch.ones(1), hd, lm.rotary_emb_base)
            q, k = apply_rope(qkv.permute(2, 0, 3, 1, 4)[:2], cos, sin)
            return (q[0, :, -1:] @ k[0].transpose(-1, -2) / hd**0.5).softmax(-1)[:, 0]

    assert float(last_position_attention()[:, -16:].sum(-1).max()) < 0.15  # ~uniform over 300 tokens
    recency_attention_init(model, layers=1)
    recent = last_position_attention()
    assert float(recent[:, -16:].sum(-1).min()) > 0.6
    assert float(recent[:, -11].min()) > 5 / t  # a token 10 back: several times its uniform share
    assert model.transformer.h[1].attn.c_attn.bias.abs().max() == 0  # later layers untouched


def test_demo_rotary_base_turns_one_pair_once_per_image_row() -> None:
    import math

    import torch

    from qwenvl.demo.run import demo_model_config
    from qwenvl.model.llm import rope_inv_freq

    lm = demo_model_config().lm
    side = 16  # the demo's 224-px images in 14-px patches: 16 x 16 image tokens, read row by row
    # the rotary pairs' angles per token, as the model computes them (no NTK scaling: alpha 1)
    theta = rope_inv_freq(torch.ones(1), lm.kv_channels, lm.rotary_emb_base)[0].tolist()
    assert abs(theta[2] * side / (2 * math.pi) - 1) < 0.002  # one turn per row of image tokens
    assert abs(theta[8] * side * side / (2 * math.pi) - 1) < 0.03  # ... and one over the whole image
    official = rope_inv_freq(torch.ones(1), lm.kv_channels, 10_000.0)[0].tolist()
    assert min(abs(t * side / (2 * math.pi) - 1) for t in official) > 0.15  # no official pair has the period


def test_where_boxes_land_tells_locating_from_choosing(tmp_path: Path) -> None:
    from qwenvl.demo.run import where_boxes_land

    data = make_dataset(tmp_path / "d", 1, 6, seed=3, config=SyntheticConfig(min_shapes=2, max_shapes=2))

    def record(s, box, correct):  # noqa: ANN001, ANN202
        return {"image": s.image, "pred_bbox": None if box is None else list(box), "correct": correct}

    asked = [record(s, s.target_shape.box, True) for s in data.eval]
    assert where_boxes_land(asked, data.eval) == {"asked": 6, "other": 0, "neither": 0, "unparsed": 0,
                                                  "nearer_asked": 6, "nearer_other": 0}
    other = [record(s, s.shapes[1 - s.target].box, False) for s in data.eval]
    assert where_boxes_land(other, data.eval) == {"asked": 0, "other": 6, "neither": 0, "unparsed": 0,
                                                  "nearer_asked": 0, "nearer_other": 6}
    mixed = [record(data.eval[0], None, False), record(data.eval[1], (0, 0, 1, 1), False), *asked[2:]]
    counts = where_boxes_land(mixed, data.eval)
    assert (counts["unparsed"], counts["neither"], counts["asked"]) == (1, 1, 4)
    with pytest.raises(ValueError, match="does not belong"):
        where_boxes_land(asked[::-1], data.eval)
    with pytest.raises(ValueError, match="5 predictions for 6"):
        where_boxes_land(asked[:5], data.eval)


def test_lm_block_init_redraws_only_the_block_matrices() -> None:
    import torch

    from qwenvl.demo.run import demo_model_config, lm_block_init
    from qwenvl.model import QwenVL

    model = QwenVL.from_config(demo_model_config(), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm_block_init(model, 0.09)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    blocks = {k for k, v in before.items() if k.startswith("transformer.h.") and v.dim() == 2}
    assert changed == blocks and blocks
    for k in blocks:
        assert abs(float(model.state_dict()[k].std()) - 0.09) < 0.01, k


def test_vit_position_init_sets_only_the_position_table() -> None:
    from qwenvl.demo.run import demo_model_config, vit_position_init
    from qwenvl.model import QwenVL
    from qwenvl.model.vision import sincos_pos_embed_2d

    model = QwenVL.from_config(demo_model_config(), seed=0)
    name = "transformer.visual.positional_embedding"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert before[name].abs().sum() > 0  # the model's own init is random
    vit_position_init(model, "random")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    vit_position_init(model, "sincos", scale=2.0)
    assert torch.allclose(model.state_dict()[name], 2.0 * sincos_pos_embed_2d(before[name].shape[1], 16))
    vit_position_init(model, "zero")
    after = model.state_dict()
    assert not after[name].any()
    assert all(torch.equal(v, before[k]) for k, v in after.items() if k != name)
    with pytest.raises(ValueError, match="position init must be one of"):
        vit_position_init(model, "learned")


def test_repeated_colours_are_refused() -> None:
    # each shape of a picture has its own colour, so that "the red circle" names one shape: a colour given
    # twice would draw two red shapes and ask for one of them
    from qwenvl.demo.run import DemoConfig

    with pytest.raises(ValueError, match=r"colours must differ \(each shape of a picture has its own\), got red twice"):
        SyntheticConfig(colors=("red", "blue", "red"), min_shapes=2, max_shapes=2)
    with pytest.raises(ValueError, match="colours must differ"):
        DemoConfig(colors=("red", "red"))
    # the demo's data settings are checked when its config is made, before run_demo claims the output folder
    with pytest.raises(ValueError, match=r"unknown colours \['pink'\]"):
        DemoConfig.small(1, colors=("red", "pink"))


def test_eval_command_quotes_paths_for_the_shell() -> None:
    import shlex

    from qwenvl.demo.run import eval_command

    args = shlex.split(eval_command("my demo's out/"))
    assert args[args.index("--model") + 1] == "my demo's out/model"
    assert args[args.index("--data") + 1] == "my demo's out/data/eval.jsonl"
    assert args[args.index("--prompt_file") + 1] == "my demo's out/eval_prompt.txt"
    assert eval_command("runs/demo") == ("qwenvl eval grounding --model runs/demo/model --data runs/demo/data/eval.jsonl "
                                         "--image_dir runs/demo/data --chat_format chatml --prompt_file "
                                         "runs/demo/eval_prompt.txt --dtype float32")  # plain paths stay plain


def test_report_figures_replace_a_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    # a foreign folder used with --overwrite may hold links named like the figures: the link is replaced by
    # the figure, and the file it points to keeps its bytes (the figures appear whole, never half-written)
    elsewhere = tmp_path / "precious.png"
    elsewhere.write_bytes(b"not ours")
    img = Image.new("RGB", (224, 224), "white")
    for name, draw in [("loss_curve.png", lambda p: draw_loss_curve([3.0, 2.0], p)),
                       ("predictions.png", lambda p: draw_prediction_grid([GridItem(img, "x", (1, 1, 9, 9), None, False)], p))]:
        link = tmp_path / name
        link.symlink_to(elsewhere)
        assert draw(link) == link
        assert not link.is_symlink()
        with Image.open(link) as im:
            assert im.format == "PNG"
        assert elsewhere.read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curve.png", "precious.png", "predictions.png"]


@pytest.mark.parametrize("entry", ["data", "model", "report.md", "loss_curve.png", "link:model"])
def test_an_output_entry_of_the_wrong_kind_is_refused_before_any_work(tmp_path: Path, entry: str) -> None:
    # with overwrite, a foreign folder's own entries under the demo's names: a file where the demo writes a
    # folder, a folder where it writes a file, or a link (the demo would write into the folder it leads to)
    from qwenvl.demo import run_demo
    from qwenvl.outputs import OutputDirError

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    kind, _, name = entry.rpartition(":")
    if kind == "link":
        (out / name).symlink_to(tmp_path / "elsewhere")
    elif "." in name:
        (out / name).mkdir()
    else:
        (out / name).write_text("mine", encoding="utf-8")
    with pytest.raises(OutputDirError, match=rf"{re.escape(str(out / name))} .*; the demo writes its"):
        run_demo(out, steps=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing written, not even our marker
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_second_dataset_keeps_none_of_the_first_ones_pictures(tmp_path: Path) -> None:
    """A second run with fewer pictures left the first run's extra ones in data/images; files that the demo did
    not write stay."""
    make_dataset(tmp_path, 5, 3, seed=1)
    (tmp_path / "images" / "train" / "000007.png").write_bytes(b"mine")  # not written by make_dataset
    (tmp_path / "images" / "eval" / "notes.txt").write_text("mine")
    second = make_dataset(tmp_path, 2, 1, seed=2)

    def pictures(split: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / "images" / split).iterdir() if not p.name.startswith("."))

    assert pictures("train") == ["000000.png", "000001.png", "000007.png"]
    assert pictures("eval") == ["000000.png", "notes.txt"]
    assert (tmp_path / "images" / "train" / "000007.png").read_bytes() == b"mine"
    assert [s.image for s in second.train] == ["images/train/000000.png", "images/train/000001.png"]
    # the marker lists the latest run's pictures only: a name the first run wrote, now the user's file, stays
    (tmp_path / "images" / "train" / "000004.png").write_bytes(b"mine too")
    make_dataset(tmp_path, 1, 1, seed=3)
    assert pictures("train") == ["000000.png", "000004.png", "000007.png"]
