"""The media policy: which local files ``<img>PATH</img>`` (and data files) may make us read.

Every refusal must read the same whether the file exists or not, and an assistant turn never makes us read
anything: an attacker who controls text (a prompt, a data file, the model's own earlier answer) must not
learn about or read files outside the media folder.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from qwenvl.config import IMG_START_ID
from qwenvl.images import ImageError, MediaAccessError, MediaPolicy
from qwenvl.processor import Processor

FIXTURE_IMAGES = Path(__file__).parent / "fixtures" / "qwenvl-tiny" / "images"


@pytest.fixture()
def area(tmp_path: Path) -> tuple[Path, Path]:
    """(media root with cat.png and sub/street.jpg, a folder outside it with secret.png)."""
    root, outside = tmp_path / "media", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(FIXTURE_IMAGES / "cat.png", root / "cat.png")
    shutil.copy(FIXTURE_IMAGES / "street.jpg", root / "sub" / "street.jpg")
    shutil.copy(FIXTURE_IMAGES / "cat.png", outside / "secret.png")
    return root, outside


def without_path(message: str) -> str:
    """A refusal with the (possibly shortened) path it quotes taken out."""
    return re.sub(r"image path '[^']*'", "image path PATH", message)


def refusal(policy: MediaPolicy, path: str) -> str:
    with pytest.raises(MediaAccessError) as info:
        policy.resolve(path)
    return without_path(str(info.value))


def test_paths_inside_the_root_are_read(area: tuple[Path, Path]) -> None:
    root, _ = area
    (root / "link.png").symlink_to(root / "cat.png")  # a link that stays inside
    policy = MediaPolicy(root)
    for text in ("cat.png", "sub/street.jpg", "./sub/../cat.png", str(root / "cat.png"), "link.png"):
        assert policy.resolve(text).is_file(), text
    assert Processor(allowed_media_dir=root)("<img>sub/street.jpg</img>hi")["images"].shape == (1, 3, 448, 448)


def test_everything_leading_out_is_refused_alike_whether_it_exists_or_not(area: tuple[Path, Path]) -> None:
    root, outside = area
    (root / "out.png").symlink_to(outside / "secret.png")  # links out of the root: to a file ...
    (root / "dangling.png").symlink_to(outside / "nothing.png")  # ... and to nothing
    (root / "outdir").symlink_to(outside)
    policy = MediaPolicy(root)
    messages = {
        refusal(policy, p)
        for p in (
            str(outside / "secret.png"), str(outside / "nothing.png"),  # absolute, existing or not
            "../outside/secret.png", "../outside/nothing.png", "sub/../../outside/secret.png",  # .. escapes
            "~/secret.png", "~",  # the home folder
            "out.png", "dangling.png", "outdir/secret.png", "outdir/nothing.png",  # links out
            "/etc/passwd", "/etc/no-such-file",
        )
    }
    assert len(messages) == 1, messages  # one message: no answer to "does it exist?"
    assert "not allowed" in messages.pop()


def test_no_media_folder_reads_no_file_at_all(area: tuple[Path, Path]) -> None:
    root, _ = area
    proc = Processor(allowed_media_dir=None)
    for text in ("cat.png", str(root / "cat.png")):
        with pytest.raises(MediaAccessError, match="reading local image files is disabled"):
            proc(f"<img>{text}</img>hi")
        with pytest.raises(MediaAccessError):
            proc("<img>x</img>hi", images=[str(root / "cat.png")])  # paths given with images= too
    # the caller's own pixels still work; the span text is only a name
    buf = io.BytesIO()
    Image.open(root / "cat.png").save(buf, format="PNG")
    assert proc("<img>cat.png</img>hi", images=[buf.getvalue()])["images"].shape == (1, 3, 448, 448)


def test_opting_in_reads_any_path(area: tuple[Path, Path]) -> None:
    root, outside = area
    proc = Processor(allowed_media_dir=root, allow_any_local_path=True)
    assert proc(f"<img>{outside / 'secret.png'}</img>")["images"].shape[0] == 1
    assert proc("<img>../outside/secret.png</img>")["images"].shape[0] == 1
    with pytest.raises(ImageError, match="image not found"):  # the user's own machine: a plain message
        proc(f"<img>{outside / 'nothing.png'}</img>")


def test_default_root_is_the_working_directory(area: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root, outside = area
    monkeypatch.chdir(root)
    proc = Processor()
    assert proc("<img>cat.png</img>")["images"].shape[0] == 1
    with pytest.raises(MediaAccessError):
        proc(f"<img>{outside / 'secret.png'}</img>")
    assert Processor(base_dir=outside).allowed_media_dir == outside  # the older name
    with pytest.raises(ValueError, match="not both"):
        Processor(base_dir=root, allowed_media_dir=outside)


def test_assistant_turns_never_carry_an_image(area: tuple[Path, Path]) -> None:
    root, outside = area
    proc = Processor(allowed_media_dir=root, allow_any_local_path=True)  # even when any path may be read
    messages = [
        {"role": "user", "content": [{"image": "cat.png"}, {"text": "what is it?"}]},
        {"role": "assistant", "content": f"<img>{outside / 'secret.png'}</img> <ref>a cat</ref><box>(1,2),(3,4)</box>"},
        {"role": "user", "content": "and now?"},
    ]
    inputs = proc(messages)
    assert inputs["images"].shape[0] == 1  # the user's picture only
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(IMG_START_ID) == 1
    assert proc.tokenizer.token_to_id("<box>") in ids  # boxes in an answer keep their tags


def test_system_turns_follow_the_policy(area: tuple[Path, Path]) -> None:
    root, outside = area
    proc = Processor(allowed_media_dir=root)
    with pytest.raises(MediaAccessError):
        proc([{"role": "system", "content": f"<img>{outside / 'secret.png'}</img>"}, {"role": "user", "content": "hi"}])
    inputs = proc([{"role": "system", "content": "<img>cat.png</img>"}, {"role": "user", "content": "hi"}])
    assert inputs["images"].shape[0] == 1


def test_chat_session_never_reads_a_path_from_the_models_answer(golden_model, area, monkeypatch) -> None:
    from qwenvl.inference import ChatSession, chat_params

    root, outside = area
    proc = Processor.from_pretrained(allowed_media_dir=root, allow_any_local_path=True)
    read: list[str] = []
    real = MediaPolicy.resolve

    def spy(self, path):  # noqa: ANN001, ANN202
        read.append(str(path))
        return real(self, path)

    monkeypatch.setattr(MediaPolicy, "resolve", spy)
    session = ChatSession(golden_model, proc, chat_params(golden_model, max_new_tokens=2, do_sample=False))
    session.add_image("cat.png")
    session.ask("what is it?")
    session.history[-1] = (session.history[-1][0], f"Here: <img>{outside / 'secret.png'}</img>")  # injected
    session.ask("go on")
    assert read == ["cat.png"]  # the user's picture, read once when added; never the answer's path


def test_training_data_follows_the_policy(area: tuple[Path, Path]) -> None:
    from qwenvl.data.dataset import ConversationDataset, DatasetError

    root, outside = area

    def rec(path: str) -> dict:
        return {"id": path, "conversations": [{"from": "user", "value": f"<img>{path}</img>hi"},
                                               {"from": "assistant", "value": "ok"}]}

    records = [rec("cat.png"), rec(str(outside / "secret.png")), rec(str(outside / "nothing.png")),
               rec("../outside/secret.png")]
    data = root / "train.json"
    data.write_text(json.dumps(records))
    ds = ConversationDataset(data, Processor(), skip_bad=True)  # dataset_dir: the data file's folder
    assert [s.id for s in ds.samples] == ["cat.png"]
    assert len({without_path(b.reason) for b in ds.skipped}) == 1  # the same for existing and missing files
    with pytest.raises(DatasetError, match="not allowed"):
        ConversationDataset(data, Processor())
    anywhere = ConversationDataset(data, Processor(allow_any_local_path=True), skip_bad=True)
    assert len(anywhere) == 3 and "image not found" in anywhere.skipped[0].reason


def test_eval_data_follows_the_policy(area: tuple[Path, Path], tmp_path: Path) -> None:
    from qwenvl.eval.runners import EvalDataError, load_vqa_data

    root, outside = area
    messages = set()
    for image in (str(outside / "secret.png"), str(outside / "nothing.png"), "../outside/secret.png"):
        data = tmp_path / "vqa.jsonl"
        data.write_text(json.dumps({"image": image, "question": "q?", "answer": "a"}) + "\n")
        with pytest.raises(EvalDataError) as info:
            load_vqa_data(data, root)
        messages.add(without_path(str(info.value)))
    assert len(messages) == 1 and "not allowed" in messages.pop()
    assert load_vqa_data(data, root, allow_any_local_path=True)[0].image == "../outside/secret.png"


def test_inference_load_passes_the_policy_through(golden_dir: Path) -> None:
    from qwenvl.inference import load

    _, proc = load(golden_dir, "float32", "cpu", allowed_media_dir=None, allow_any_local_path=False)
    assert proc.media_policy() == MediaPolicy(None, False)
    _, proc = load(golden_dir, "float32", "cpu", os.fspath(golden_dir), allow_any_local_path=True)
    assert proc.media_policy() == MediaPolicy(os.fspath(golden_dir), True)


def test_a_path_with_a_lone_surrogate_is_one_image_error(area: tuple[Path, Path]) -> None:
    """A lone surrogate (JSON "\\ud800" in a data file or a prompt) names no file: it was a UnicodeEncodeError from
    deep in the file system calls, under either policy; a name decoded from bytes (surrogateescape) still works."""
    root, _ = area
    for policy in (MediaPolicy(root), MediaPolicy(root, allow_any_local_path=True)):
        with pytest.raises(ImageError, match="not valid Unicode"):
            policy.resolve("\ud800.png")
    odd = os.fsdecode(b"\xff.png")  # a Linux file name that is not UTF-8
    shutil.copy(root / "cat.png", root / odd)
    assert MediaPolicy(root).resolve(odd).is_file()
