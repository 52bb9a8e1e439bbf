"""Tokenizer parity: golden ids, dashscope's Qwen tokenizer, and an independent re-statement of the official code."""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from qwenvl.config import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    IMG_END_ID,
    IMG_PAD_ID,
    IMG_START_ID,
    IMG_TOKEN_SPAN,
    TOKENIZER_SIZE,
)
from qwenvl.tokenizer import QwenTokenizer, _safe_chunks

FIXTURE = Path(__file__).parent / "fixtures" / "qwenvl-tiny"
VOCAB = Path(__file__).parents[1] / "src" / "qwenvl" / "vocab" / "qwen.tiktoken"
VL_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")


def golden_prompts() -> list[tuple[str, list[int]]]:
    data = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
    out = []
    for prompt, case in zip(data["prompts"], data["cases"], strict=True):
        text = prompt.replace("{0}", "images/cat.png").replace("{1}", "images/street.jpg")
        out.append((text, case["input_ids"]))
    return out


class OfficialRestatement:
    """The official Qwen-VL ``tokenize`` + ``convert_tokens_to_ids``, restated plainly and separately.

    Works on token *surfaces* (bytes for BPE tokens, str for special tokens) as the official code does.
    """

    def __init__(self, vocab: Path) -> None:
        ranks = {}
        for line in vocab.read_bytes().splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
        names += list(VL_TAGS)
        self.special = {n: len(ranks) + i for i, n in enumerate(names)}
        self.enc = tiktoken.Encoding(
            "ref",
            pat_str=r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
            mergeable_ranks=ranks,
            special_tokens=self.special,
        )
        self.ranks = ranks
        self.decoder: dict[int, bytes | str] = {v: k for k, v in ranks.items()}
        self.decoder.update({v: k for k, v in self.special.items()})

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        tokens = [self.decoder[t] for t in self.enc.encode(text, allowed_special="all", disallowed_special=())]
        out: list[bytes | str] = []
        end = 0
        while True:
            start = next((i for i in range(end, len(tokens)) if tokens[i] == "<img>"), -1)
            if start == -1:
                break
            out += tokens[end:start]
            end = next((i for i in range(start, len(tokens)) if tokens[i] == "</img>"), -1)
            if end == -1:
                raise ValueError("Unclosed image token")
            url = b"".join(tokens[start + 1 : end])
            body = [self.decoder[b] for b in url]
            assert len(body) <= 256
            out += ["<img>"] + body + ["<imgpad>"] * (256 - len(body)) + ["</img>"]
            end += 1
        out += tokens[end:]
        return [self.special[t] if isinstance(t, str) else self.ranks[t] for t in out]


CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you're right; they'll've done it. IT'S OK, WE'LL SEE.",
    "框出图中的蓝色方块",
    "你好，世界！今天天气很好。我们去公园散步吧？",
    "こんにちは、世界。カタカナとひらがな、そして漢字。",
    "안녕하세요 세계",
    "Привет, мир! Ёжик.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "👍🏽 thumbs, 👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, ❤️ heart, 🧑🏿‍💻 coder",
    "Cafe\u0301 cre\u0300me bru\u0302le\u0301e",
    "A\u030a\u0041\u0301 \u1100\u1161\u11a8 e\u0301\u0323",
    "ﬁ ligature stays (NFC, not NFKC): ½ ² Ⅻ",
    "1234567890 3.14159 1,000,000 -42 +7e-10 ٣٤٥ ১২৩",
    "a  b   c    d     e",
    "  leading spaces",
    "trailing spaces   ",
    "\t\ttabs\tand\t\t\tmore tabs\t",
    "line1\r\nline2\r\n\r\nline4\r",
    "\n\n\n",
    "a\n\n\nb\n \n \nc",
    " \u00a0non-breaking\u00a0space and\u3000ideographic space",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; } // C\n",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "<|endoftext|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "<|extra_0|> <|extra_1|>x<|extra_100|>\n<|extra_204|>",
    "<|endoftext <im_start> <|extra_205|> <|im_end| <img <ref",
    "'s 't 're 've 'm 'll 'd 'S 'T",
    "",
    " ",
    "\n",
    # Qwen-VL tags (not in dashscope's text tokenizer)
    "Picture 1: <img>demo.jpeg</img>\nDescribe the image in English:",
    "Picture 1: <img>a/b c.png</img>\nPicture 2: <img>/abs/路径/图片 1.jpg</img>\n两张图有什么不同？",
    "<ref>the dog</ref><box>(10,20),(300,400)</box> and <ref>猫</ref><box>(0,0),(999,999)</box>",
    "<quad>(1,2),(3,4),(5,6),(7,8)</quad>",
    "stray </img> and <imgpad> and </ref>",
    "<img></img>",
    "<img>Cafe\u0301.png</img>",
    "<img>" + "x" * 256 + "</img>",
    "<img>with\nnewline and  spaces .png</img> tail",
]
PLAIN = [t for t in CORPUS if not any(tag in t for tag in VL_TAGS)]


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def ref() -> OfficialRestatement:
    return OfficialRestatement(VOCAB)


@pytest.fixture(scope="module")
def dashscope_tok():
    from dashscope.tokenizers.qwen_tokenizer import QwenTokenizer as DashscopeQwenTokenizer

    return DashscopeQwenTokenizer(str(VOCAB))


def test_golden_ids(tok: QwenTokenizer) -> None:
    for text, expected in golden_prompts():
        assert tok.encode(text) == expected


def test_sizes_and_special_ids(tok: QwenTokenizer) -> None:
    assert len(tok) == tok.vocab_size == TOKENIZER_SIZE == 151860
    assert tok.eod_id == tok.eos_token_id == tok.pad_token_id == 151643
    assert (tok.im_start_id, tok.im_end_id) == (151644, 151645)
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (151857, 151858, 151859)
    assert tok.encode("<|extra_0|>") == [151646]
    assert tok.encode("<|extra_204|>") == [151850]
    for k, tag in enumerate(VL_TAGS):
        if tag != "<img>":  # a lone <img> is an unclosed span
            assert tok.encode(tag) == [151851 + k]
        assert tok.token_to_id(tag) == 151851 + k
        assert tok.convert_ids_to_tokens([151851 + k]) == [tag]
    assert tok.token_to_id(b"\n") == 198 and tok.convert_ids_to_tokens(198) == [b"\n"]
    with pytest.raises(ValueError, match="not a single token"):
        tok.token_to_id("not one token at all")


@pytest.mark.parametrize("text", PLAIN)
def test_parity_with_dashscope(tok: QwenTokenizer, dashscope_tok, text: str) -> None:
    assert tok.encode(text) == dashscope_tok.encode(text)


@pytest.mark.parametrize("text", CORPUS)
def test_parity_with_restatement_and_round_trip(tok: QwenTokenizer, ref: OfficialRestatement, text: str) -> None:
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_nfc_digits_and_whitespace(tok: QwenTokenizer) -> None:
    assert tok.encode("Cafe\u0301") == tok.encode("Café")
    digits = tok.encode("2024")
    assert len(digits) == 4 and [tok.decode([i]) for i in digits] == ["2", "0", "2", "4"]
    assert tok.encode("\n\n\n") == [1406]  # one token, as the pattern \s*[\r\n]+ keeps the run whole
    assert tok.decode(tok.encode("a\r\nb")) == "a\r\nb"


def test_image_span_layout(tok: QwenTokenizer) -> None:
    ids = tok.encode("x<img>猫.png</img>y")
    path = "猫.png".encode()
    s = ids.index(IMG_START_ID)
    assert ids[s : s + 1 + len(path)] == [IMG_START_ID] + list(path)
    assert ids[s + 1 + len(path) : s + 257] == [IMG_PAD_ID] * (IMG_TOKEN_SPAN - len(path))
    assert ids[s + 257] == IMG_END_ID and len(ids) == 258 + 2
    assert tok.image_paths(ids) == ["猫.png"]
    # NFC happens before the bytes are taken
    assert tok.image_paths(tok.encode("<img>Cafe\u0301.png</img>")) == ["Café.png"]
    # two spans, in order; exactly 256 bytes fills the span with no <imgpad> (the official decode crashes here)
    full = "p" * 256
    ids2 = tok.encode(f"<img>a.jpg</img><img>{full}</img>")
    assert tok.image_paths(ids2) == ["a.jpg", full]
    assert IMG_PAD_ID not in ids2[258:]
    assert tok.decode(ids2) == f"<img>a.jpg</img><img>{full}</img>"


def test_image_span_errors(tok: QwenTokenizer) -> None:
    with pytest.raises(ValueError, match="257 bytes long"):
        tok.encode("<img>" + "a" * 257 + "</img>")
    with pytest.raises(ValueError, match="258 bytes long"):  # 129 two-byte characters
        tok.encode("<img>" + "é" * 129 + "</img>")
    with pytest.raises(ValueError, match="unclosed <img>"):
        tok.encode("Picture 1: <img>a.jpg")
    with pytest.raises(ValueError, match="unclosed <img>"):
        tok.encode("<img>a.jpg</img><img>b.jpg")
    with pytest.raises(ValueError, match="inside <img>"):
        tok.encode("<img>a<img>b</img>")  # the official scan pairs the first <img> with the first </img>
    with pytest.raises(ValueError, match=r"<\|im_end\|> inside <img>"):
        tok.encode("<img>a<|im_end|>b</img>")
    # <img> that is not allowed as special is plain text: no span
    assert IMG_START_ID not in tok.encode("<img>a", allowed_special=set())
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode("<|im_end|>", allowed_special=set(), disallowed_special="all")


def test_decode_unused_embedding_rows_and_ranges(tok: QwenTokenizer) -> None:
    hello = tok.encode("Hello world")
    for i in range(TOKENIZER_SIZE, 151936):
        assert tok.decode([i]) == ""
    assert tok.decode(hello[:1] + list(range(151860, 151936)) + hello[1:]) == "Hello world"
    assert tok.convert_ids_to_tokens([151900]) == [""]
    with pytest.raises(ValueError, match="151936 is out of range"):
        tok.decode([151936])
    with pytest.raises(ValueError, match="-100 is out of range"):
        tok.decode([-100])


def test_decode_inputs_and_skip_special(tok: QwenTokenizer) -> None:
    text = "<|im_start|>user\nPicture 1: <img>a.png</img>\nhi<|im_end|><|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode(ids[0]) == "<|im_start|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nPicture 1: a.png\nhi"
    assert tok.batch_decode(torch.tensor([ids, ids])) == [text, text]
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode([ids])
    # a generation that stops inside a span, or writes non-byte ids in one, must not crash
    open_span = tok.encode("see <img>a.png</img>")[:-200]
    assert tok.decode(open_span).startswith("see <img>")
    assert tok.decode([IMG_START_ID, 9707, IMG_END_ID]) == "<img>Hello</img>"
    # invalid UTF-8 path bytes follow errors="replace"
    assert tok.decode([IMG_START_ID, 0xFF, IMG_PAD_ID, IMG_END_ID]) == "<img>\ufffd</img>"
    with pytest.raises(ValueError, match="not UTF-8"):
        tok.image_paths([IMG_START_ID, 0xFF, IMG_PAD_ID, IMG_END_ID])
    with pytest.raises(ValueError, match="must be bytes"):
        tok.image_paths([IMG_START_ID, 9707, IMG_END_ID])


def test_from_list_format(tok: QwenTokenizer) -> None:
    text = tok.from_list_format(
        [
            {"image": "a.jpg"},
            {"image": "b.png"},
            {"text": "Where is the dog?"},
            {"box": [[10, 20, 300, 400], (1.9, 2.2, 3.7, 999)], "ref": "dog"},
            {"box": [[0, 0, 1, 1]]},
        ]
    )
    assert text == (
        "Picture 1: <img>a.jpg</img>\nPicture 2: <img>b.png</img>\nWhere is the dog?"
        "<ref>dog</ref><box>(10,20),(300,400)</box><box>(1,2),(3,999)</box><box>(0,0),(1,1)</box>"
    )
    with pytest.raises(ValueError, match="unsupported list-format element"):
        tok.from_list_format([{"video": "x.mp4"}])
    with pytest.raises(ValueError, match="4 numbers"):
        tok.from_list_format([{"box": [[1, 2, 3]]}])
    with pytest.raises(ValueError, match="must be numbers"):
        tok.from_list_format([{"box": [["1", 2, 3, 4]]}])


def test_safe_chunks_do_not_change_tokens(tok: QwenTokenizer) -> None:
    text = unicodedata.normalize("NFC", "".join(CORPUS[:33]) * 3)
    whole = tok._enc.encode(text, allowed_special="all")
    for size in (5, 17, 64, 301):
        chunks = _safe_chunks(text, size)
        assert "".join(chunks) == text and len(chunks) > 3
        assert [i for c in chunks for i in tok._enc.encode(c, allowed_special="all")] == whole
    # the real path: a long text (> 100k characters) is cut and still encodes exactly as one piece
    long_text = ("Qwen-VL reads images, 文本 and boxes<|im_end|>\n\n" * 5000)[:150_000]
    assert len(_safe_chunks(long_text)) == 2
    assert tok.encode(long_text) == tok._enc.encode(long_text, allowed_special="all")


@pytest.mark.parametrize("text", [
    "", "plain text", "<|im_start|>", "<|im_start|><|im_end|>\n<|endoftext|>", "<|extra_204|>x<|extra_0|>",
    "a<ref>the red circle</ref><box>(1,2),(3,4)</box>b", "<|im_start", "<im_start|>", "< |im_end|>", "<<ref>>",
    "<|im_start|>user\n你好<|im_end|>", "  <quad>  </quad>  ", "</img><imgpad><img>",
])
def test_specials_are_encoded_as_tiktoken_encodes_them(tok: QwenTokenizer, text: str) -> None:
    # the fast path for allowed_special="all" (no special-token set handed to tiktoken on every call)
    assert tok._encode_all_special(text) == tok._enc.encode(text, allowed_special="all")


def test_huge_whitespace_run_is_a_clear_error(tok: QwenTokenizer) -> None:
    with pytest.raises(ValueError, match="Long runs of whitespace"):
        tok.encode(" " * 1_100_000)


def test_from_pretrained_locations(tmp_path: Path) -> None:
    assert QwenTokenizer.from_pretrained(FIXTURE).vocab_file == (FIXTURE / "qwen.tiktoken").resolve()
    assert QwenTokenizer.from_pretrained(tmp_path).vocab_file == VOCAB.resolve()  # folder without a vocabulary
    assert QwenTokenizer.from_pretrained(VOCAB).encode("hi") == [6023]
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        QwenTokenizer.from_pretrained(tmp_path / "missing")
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"YQ== 0\nYg== 1\n")
    with pytest.raises(ValueError, match="has 2 BPE ranks"):
        QwenTokenizer.from_pretrained(tmp_path)
    bad.write_bytes(b"not-a-line\n")
    with pytest.raises(ValueError, match="not a 'base64 rank' line"):
        QwenTokenizer.from_pretrained(tmp_path)


def test_chat_special_ids_in_text(tok: QwenTokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids == [IM_START_ID, 872, 198, 6023, IM_END_ID, 198]
    assert tok.encode("<|endoftext|>") == [ENDOFTEXT_ID]


def test_decode_refuses_ids_that_are_not_integers(tok: QwenTokenizer) -> None:
    # a float would be truncated into another token: logits.float() ids, a mean, a misread column
    with pytest.raises(ValueError, match="token ids must be integers, got 1.5"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="token ids must be integers"):
        tok.decode(torch.tensor([9707.0, 1879.0]))
    with pytest.raises(ValueError, match="int or a sequence of ints, got str"):
        tok.decode("Hello")
    with pytest.raises(ValueError, match="got NoneType"):
        tok.decode(None)
    assert tok.decode(np.array([9707, 1879])) == tok.decode([9707, 1879]) == "Hello world"


def test_from_list_format_refuses_malformed_elements(tok: QwenTokenizer) -> None:
    with pytest.raises(ValueError, match="text must be a str, got NoneType"):
        tok.from_list_format([{"text": None}])
    with pytest.raises(ValueError, match="image is a path or URL, got a NoneType"):
        tok.from_list_format([{"image": None}])  # was read as the file "None"
    with pytest.raises(ValueError, match="must be numbers"):
        tok.from_list_format([{"box": [[float("nan"), 2, 3, 4]]}])
    with pytest.raises(ValueError, match="must be numbers"):
        tok.from_list_format([{"box": [[float("inf"), 2, 3, 4]]}])  # was an OverflowError
    with pytest.raises(ValueError, match="list of boxes"):
        tok.from_list_format([{"box": [1, 2, 3, 4]}])  # one box, not wrapped in a list


def test_from_list_format_refuses_an_image_path_holding_the_closing_tag(tok: QwenTokenizer) -> None:
    # "Picture 1: <img>a</img>b.jpg</img>": the span ended early and the processor read the file "a" instead
    for path in ("a</img>b.jpg", Path("dir</img>") / "x.png"):
        with pytest.raises(ValueError, match="cannot hold '</img>'"):
            tok.from_list_format([{"image": path}, {"text": "what is it?"}])
    assert tok.image_paths(tok.encode(tok.from_list_format([{"image": "a<b>/c img.jpg"}]))) == ["a<b>/c img.jpg"]


def test_encode_refuses_one_token_as_disallowed_special(tok: QwenTokenizer) -> None:
    # a str other than "all" was read as a set of one-character tokens: "hello" failed on the token 'e'
    with pytest.raises(ValueError, match=re.escape("disallowed_special must be 'all' or a set of tokens, got '<|")):
        tok.encode("hello world", allowed_special=set(), disallowed_special="<|endoftext|>")
    assert tok.encode("hello world", allowed_special=set(), disallowed_special={"<|endoftext|>"}) == tok.encode(
        "hello world")
