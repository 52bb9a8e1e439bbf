"""Generation: batch invariance, streaming, sampling, stop tokens, bad arguments, compiled decode."""

from __future__ import annotations

import shutil

import pytest
import torch

from qwenvl import Processor
from qwenvl.config import ENDOFTEXT_ID, IM_END_ID, IM_START_ID
from qwenvl.generation import SamplingParams, TextStream, compiled_decode_step, stream_tokens
from qwenvl.inference import ChatSession, predict, stream_text

PROMPTS = [
    "Hello, how are you today? Tell me about the weather in Hangzhou.",
    "Picture 1: <img>images/cat.png</img>\nDescribe the image in English:",
    "Picture 1: <img>images/cat.png</img>\nPicture 2: <img>images/street.jpg</img>\nWhat differs between them?",
    "Picture 1: <img>images/street.jpg</img>\n<ref>the car</ref>",
]


def _greedy(model, processor, prompts, base_dir, n=10):
    inputs = processor(prompts, base_dir=base_dir)
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n, stop_token_ids=(ENDOFTEXT_ID,))
    steps = list(stream_tokens(model, inputs["input_ids"], inputs["attention_mask"], inputs["images"], params))
    return torch.stack(steps, 1).tolist()


@pytest.mark.parametrize("which", ["golden_model", "tiny_model"])
def test_batch_equals_one_by_one(which, request, golden_dir):
    model = request.getfixturevalue(which)
    processor = Processor.from_pretrained(golden_dir)
    batched = _greedy(model, processor, PROMPTS, golden_dir)
    alone = [_greedy(model, processor, [p], golden_dir)[0] for p in PROMPTS]
    assert batched == alone


def test_batch_near_the_context_equals_one_by_one(golden_dir):
    # a batch's new tokens were capped at what fitted its longest prompt: a short prompt batched with a long
    # one was cut short (3 tokens of 8 here); and a long row padded after its last token read as stopped
    import dataclasses

    from qwenvl import QwenVL

    model = QwenVL.from_pretrained(golden_dir, dtype=torch.float32)
    model.config = dataclasses.replace(model.config, lm=dataclasses.replace(model.config.lm, max_position_embeddings=16))
    processor = Processor.from_pretrained(golden_dir)
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(ENDOFTEXT_ID,))
    prompts = ["word " * 12, "Hi"]  # 13 and 1 tokens: room for 3 and 15 new ones
    alone = [predict(model, processor, [p], params)[0] for p in prompts]
    assert [(p.num_tokens, p.stopped) for p in alone] == [(3, False), (8, False)]
    assert predict(model, processor, prompts, params, batch_size=2) == alone


def test_streaming_text_equals_non_streaming(golden_model, golden_dir):
    processor = Processor.from_pretrained(golden_dir)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(ENDOFTEXT_ID,))
    streamed = "".join(stream_text(golden_model, processor, PROMPTS[1], params, base_dir=golden_dir))
    (pred,) = predict(golden_model, processor, [PROMPTS[1]], params, base_dir=golden_dir)
    assert streamed == pred.response
    assert pred.text.startswith(pred.prompt) and pred.text.endswith(pred.response)


def test_text_stream_never_splits_utf8():
    processor = Processor()
    ids = processor.tokenizer.encode("框出图中的蓝色方块 🐱‍👤 done")
    # feed one token at a time; many of these tokens are partial UTF-8 sequences
    stream = TextStream(processor.decode)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == "框出图中的蓝色方块 🐱‍👤 done"
    assert all("\ufffd" not in p for p in pieces)


def test_seeded_sampling_is_reproducible(tiny_model):
    ids = torch.randint(1000, 50000, (2, 16), generator=torch.Generator().manual_seed(0))
    a = tiny_model.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.9, top_k=50, temperature=1.3, seed=7)
    b = tiny_model.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.9, top_k=50, temperature=1.3, seed=7)
    c = tiny_model.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.9, top_k=50, temperature=1.3, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# sampled with the whole distribution: no top-k/top-p cut that padding's rounding could move
SAMPLED = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
           "stop_token_ids": ()}


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), ENDOFTEXT_ID)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


def test_a_seeded_sample_does_not_depend_on_the_batch(tiny_model):
    # one generator drew the tokens of the whole batch: a prompt's seeded answer changed with the prompts batched
    # with it and its place among them (vLLM's seed gives a request the same answer whatever runs beside it)
    g = torch.Generator().manual_seed(4)
    prompt, other, another = (torch.randint(1000, 50000, (n,), generator=g) for n in (9, 12, 5))

    def answer(prompts: list[torch.Tensor], row: int) -> list[int]:
        ids, mask = _left_padded(prompts)
        return tiny_model.generate(ids, attention_mask=mask, seed=11, **SAMPLED)[row, ids.shape[1] :].tolist()

    alone = answer([prompt], 0)
    assert answer([prompt, other, another], 0) == alone
    assert answer([other, another, prompt], 2) == alone


def test_one_seed_per_sequence(tiny_model):
    ids = torch.randint(1000, 50000, (1, 10), generator=torch.Generator().manual_seed(6))
    copies = ids.repeat(2, 1)
    same = tiny_model.generate(copies, seed=3, **SAMPLED)
    assert torch.equal(same[0], same[1])  # one seed: the same prompt gets the same answer
    each = tiny_model.generate(copies, seed=[3, 4], **SAMPLED)
    assert torch.equal(each[0], same[0]) and torch.equal(each[1], tiny_model.generate(ids, seed=4, **SAMPLED)[0])
    assert not torch.equal(each[0], each[1])
    with pytest.raises(ValueError, match="seed has 3 values for 2 sequences"):
        tiny_model.generate(copies, seed=[1, 2, 3], **SAMPLED)
    with pytest.raises(ValueError, match="seed must be an integer, got 2.5"):
        tiny_model.generate(copies, seed=[1, 2.5], **SAMPLED)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\), got -9223372036854775809"):
        tiny_model.generate(copies, seed=[1, -(2**63) - 1], **SAMPLED)


def test_top_k_one_equals_greedy(tiny_model):
    ids = torch.randint(1000, 50000, (1, 16), generator=torch.Generator().manual_seed(1))
    greedy = tiny_model.generate(ids, max_new_tokens=6)
    sampled = tiny_model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, seed=3)
    assert torch.equal(greedy, sampled)


def test_stop_token_ends_sequence_and_pads_the_rest(tiny_model):
    ids = torch.randint(1000, 50000, (2, 10), generator=torch.Generator().manual_seed(2))
    free = tiny_model.generate(ids, max_new_tokens=6, stop_token_ids=())
    stop_at = int(free[0, 11])  # make row 0's second new token a stop token
    out = tiny_model.generate(ids, max_new_tokens=6, stop_token_ids=(stop_at,))
    assert out[0, 11] == stop_at
    assert (out[0, 12:] == ENDOFTEXT_ID).all()  # padded after its stop


def test_min_new_tokens_suppresses_stop(tiny_model):
    ids = torch.randint(1000, 50000, (1, 10), generator=torch.Generator().manual_seed(2))
    first = int(tiny_model.generate(ids, max_new_tokens=1)[0, -1])
    out = tiny_model.generate(ids, max_new_tokens=4, min_new_tokens=4, stop_token_ids=(first,))
    assert out.shape[1] == 14 and first not in out[0, 10:].tolist()


def test_min_new_tokens_masks_the_stops_without_a_host_index_a_step():
    # logits[:, list(stop_ids)] = -inf copied the list to the device on every step of min_new_tokens (a stream
    # wait on a GPU); the index tensor is made once per stop ids and device
    from torch.overrides import TorchFunctionMode

    from qwenvl.generation import SamplingParams, process_logits

    class ListIndexes(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.__setitem__, torch.Tensor.__getitem__) and any(
                    isinstance(a, list) for a in (args[1] if isinstance(args[1], tuple) else (args[1],))):
                self.count += 1
            return func(*args, **(kwargs or {}))

    p = SamplingParams(min_new_tokens=3, stop_token_ids=(2, 5))
    with ListIndexes() as seen:
        out = [process_logits(torch.zeros(2, 8), None, step, p) for step in range(4)]
    assert seen.count == 0
    for step, row in enumerate(out):
        assert (row[:, [2, 5]] == (float("-inf") if step < 3 else 0)).all() and (row[:, [0, 1, 3, 4, 6, 7]] == 0).all()


def test_stop_tokens_follow_the_chat_format(golden_model):
    from qwenvl.generation import sampling_params

    assert golden_model.config.generation.chat_format == "raw"  # the fixture is a base-model checkpoint
    assert sampling_params(golden_model).stop_token_ids == (ENDOFTEXT_ID,)
    assert set(sampling_params(golden_model, chat_format="chatml").stop_token_ids) == {IM_END_ID, IM_START_ID, ENDOFTEXT_ID}
    assert sampling_params(golden_model).top_p == 0.5  # from generation_config.json


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be > 0"),
        ({"max_new_tokens": -3}, "max_new_tokens must be > 0"),
        ({"do_sample": True, "top_p": 0.0}, "top_p"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 2, "min_new_tokens": 5}, "min_new_tokens"),
    ],
)
def test_bad_generation_arguments(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(torch.tensor([[1, 2, 3]]), **kwargs)


def test_prompt_longer_than_context_fails_before_work(tiny_model):
    with pytest.raises(ValueError, match="does not fit the context of 8 tokens"):
        tiny_model.generate(torch.ones(1, 9, dtype=torch.long), max_new_tokens=2, max_context=8)
    with pytest.raises(ValueError, match="empty prompt"):
        tiny_model.generate(torch.ones(1, 0, dtype=torch.long), max_new_tokens=2)


def test_a_budget_past_int64_means_up_to_the_context(tiny_model):
    # `--max_new_tokens 99999999999999999999999` (or max_context=10**30) was an OverflowError traceback: a limit
    # that large is no limit, and the other one ends the answer
    ids = torch.randint(1000, 50000, (2, 5), generator=torch.Generator().manual_seed(4))
    out = tiny_model.generate(ids, max_new_tokens=10**30, min_new_tokens=3, max_context=8)
    assert out.shape == (2, 8)
    out = tiny_model.generate(ids, max_new_tokens=3, min_new_tokens=3, max_context=10**30)
    assert out.shape == (2, 8)


@pytest.mark.parametrize("batch", [1, 2])  # batch 1: the one-row products are reductions inside the graph
def test_compiled_decode_step_gives_the_same_tokens(tiny_model, batch):
    ids = torch.randint(1000, 50000, (batch, 12), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6)
    eager = torch.stack(list(stream_tokens(tiny_model, ids, params=params)), 1)
    compiled = torch.stack(list(stream_tokens(tiny_model, ids, params=params, step_fn=compiled_decode_step())), 1)
    assert torch.equal(eager, compiled)


def test_compilation_is_logged_once_when_it_starts_and_ends(caplog):
    from qwenvl.generation import _log_first_call

    calls = []
    step = _log_first_call(lambda *a: calls.append(a) or len(calls), "the decode step (cpu)")
    with caplog.at_level("INFO", logger="qwenvl.generation"):
        assert [step(1), step(2), step(3)] == [1, 2, 3]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("compiling the decode step (cpu) with torch.compile, once per process: usually "
                                  "20 s to a few minutes")
    assert messages[1].startswith("compiled the decode step (cpu) in ") and messages[1].endswith(" s")
    assert calls == [(1,), (2,), (3,)]


def test_generate_rejects_unknown_options_and_takes_sampling_params(tiny_model):
    ids = torch.randint(1000, 50000, (1, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(TypeError, match="max_new_token"):
        tiny_model.generate(ids, max_new_token=3)  # misspelt: must not silently generate 512 tokens
    out = tiny_model.generate(ids, params=SamplingParams(max_new_tokens=3, min_new_tokens=3))
    assert out.shape == (1, 11) and torch.equal(out, tiny_model.generate(ids, max_new_tokens=3, min_new_tokens=3))
    with pytest.raises(TypeError, match="params= and max_new_tokens"):
        tiny_model.generate(ids, params=SamplingParams(max_new_tokens=3), max_new_tokens=4)


def test_predict_records_a_bad_prompt_and_answers_the_others(golden_model, golden_dir, tmp_path):
    processor = Processor.from_pretrained(golden_dir)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG broken")
    good = [PROMPTS[1], PROMPTS[3]]
    bad = "Picture 1: <img>../../etc/hostname</img>\nWhat is it?"  # refused by the policy
    broken = "Picture 1: <img>images/broken.png</img>\nWhat is it?"
    shutil.copytree(golden_dir / "images", tmp_path / "images", dirs_exist_ok=True)
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(ENDOFTEXT_ID,))
    want = predict(golden_model, processor, good, params, batch_size=2, base_dir=tmp_path)
    got = predict(golden_model, processor, [good[0], bad, broken, good[1]], params, batch_size=2,
                  base_dir=tmp_path, on_error="record")
    assert [p.error is None for p in got] == [True, False, False, True]
    assert "not allowed" in got[1].error and "cannot decode image" in got[2].error
    assert got[1].prompt == bad and got[1].response == ""
    assert [p.response for p in (got[0], got[3])] == [p.response for p in want]  # same as without the bad ones
    with pytest.raises(ValueError, match="cannot decode image"):
        predict(golden_model, processor, [good[0], broken], params, batch_size=2, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"do_sample": True, "temperature": float("nan")}, "temperature must be a finite number"),  # was RuntimeError
        ({"do_sample": True, "temperature": float("inf")}, "temperature must be a finite number"),  # was uniform
        ({"repetition_penalty": float("nan")}, "repetition_penalty must be a finite number"),
        ({"do_sample": True, "top_k": 2.5}, "top_k must be an integer"),
        ({"max_new_tokens": 2.7}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": float("nan")}, "max_new_tokens must be an integer"),
        ({"min_new_tokens": float("nan")}, "min_new_tokens must be an integer"),  # was ignored
        ({"stop_token_ids": "abc"}, "stop_token_ids must be a sequence of token ids, got 'abc'"),  # read as ids a, b, c
        ({"stop_token_ids": 5}, "stop_token_ids must be a sequence of token ids, got 5"),  # was "'int' object is not iterable"
        ({"eos_token_id": 2.5}, "eos_token_id must be a token id or a list of token ids, got 2.5"),  # was a TypeError
        ({"eos_token_id": True}, "eos_token_id must be an integer, got True"),  # a flag in the wrong place
        ({"stop_token_ids": [-1]}, "stop token id must be >= 0"),
        ({"min_new_tokens": 1, "stop_token_ids": [10**9]}, "stop token id 1000000000 is out of range"),  # IndexError
        ({"do_sample": True, "seed": 2**70}, "seed must be an integer in"),
        ({"max_context": 0}, "max_context must be > 0"),  # was the model's context
        ({"do_sample": "no"}, "do_sample must be True or False, got 'no'"),  # a string from a config: sampled
    ],
)
def test_bad_generation_values_name_the_argument(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match="stop_token_ids must be a sequence of token ids"):
        SamplingParams(stop_token_ids=151643).validate()


@pytest.mark.parametrize("pad", [10**6, -1])
def test_a_pad_token_out_of_range_is_refused_before_work(tiny_model, pad):
    # it is fed to the model for a row that stopped while others go on: IndexError in the embedding, mid-batch
    params = SamplingParams(max_new_tokens=2, pad_token_id=pad)
    with pytest.raises(ValueError, match=f"pad_token_id {pad} is out of range: the model has ids 0..151935"):
        tiny_model.generate(torch.tensor([[1, 2, 3]]), params=params)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input_ids": torch.tensor([[1, 151936]])}, "token id 151936 in input_ids is out of range"),  # IndexError
        ({"input_ids": torch.tensor([[1, -1]])}, "token id -1 in input_ids is out of range"),
        ({"input_ids": torch.tensor([[1.0, 2.0]])}, "input_ids must be an integer tensor"),
        ({"input_ids": torch.tensor([1, 2])}, "input_ids must be an integer tensor"),
        ({"input_ids": torch.zeros(0, 3, dtype=torch.long)}, "empty batch"),
        ({"input_ids": torch.tensor([[1, 2], [3, 4]]), "attention_mask": torch.tensor([[1, 0], [1, 1]])},
         "pad on the left"),  # right padding generated after the pad silently
        ({"input_ids": torch.tensor([[1, 2], [3, 4]]), "attention_mask": torch.tensor([[0, 0], [1, 1]])},
         "pad on the left"),  # was "math domain error"
        ({"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[2, 2]])}, "only 0 .padding. and 1"),
        ({"input_ids": torch.tensor([[1, 2]]), "images": torch.zeros(3, 448, 448)}, "images must be float pixels"),
        ({"input_ids": torch.tensor([[1, 2]]), "images": torch.zeros(1, 3, 448, 448, dtype=torch.uint8)},
         "images must be float pixels"),  # raw pixels were taken as normalized ones
    ],
)
def test_bad_generation_inputs_name_the_problem(tiny_model, inputs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(**inputs, max_new_tokens=2)


@pytest.mark.parametrize(("bad", "message"), [
    ({1: float("nan")}, r"^images\[1\] holds NaN or infinite pixel values: pass finite pixels"),
    ({0: float("inf"), 1: -float("inf")}, r"^images\[0\] holds NaN or infinite pixel values \(so do 1 other image"),
])
def test_nan_or_infinite_pixels_are_refused_naming_the_image(golden_model, golden_dir, bad, message):
    # were taken as they were: the vision tower turned them into NaN features and the answer was garbage
    from qwenvl import generation

    inputs = Processor.from_pretrained(golden_dir)([PROMPTS[2]], base_dir=golden_dir)
    for k, value in bad.items():
        inputs["images"][k, 1, 200, 300] = value
    with pytest.raises(ValueError, match=message):
        golden_model.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        generation.generate(golden_model, inputs["input_ids"], inputs["attention_mask"], inputs["images"],
                            max_new_tokens=2)


@pytest.mark.parametrize("kwargs", [{"temperature": 1e-40}, {"repetition_penalty": 1e-45},
                                    {"temperature": 1e-40, "repetition_penalty": 1e-45},
                                    # 0 in float32: NaN probabilities
                                    {"repetition_penalty": 1e-50}, {"repetition_penalty": 5e-324}])
def test_extreme_but_valid_sampling_values_never_make_nan_probabilities(tiny_model, kwargs):
    # logits / 1e-40 overflowed to inf (and a logit / 1e-45 penalty too): softmax gave NaN, and multinomial
    # failed with "probability tensor contains either inf, nan or element < 0"
    from qwenvl.generation import process_logits

    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    seen = torch.tensor([[1, 2]])
    probs = process_logits(logits, seen, 0, SamplingParams(do_sample=True, **kwargs)).softmax(-1)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))  # all on the largest
    ids = torch.randint(1000, 50000, (1, 8), generator=torch.Generator().manual_seed(5))
    sampled = tiny_model.generate(ids, max_new_tokens=3, do_sample=True, seed=0, **kwargs)
    if "repetition_penalty" not in kwargs:  # a tiny temperature samples as greedy decoding picks
        assert torch.equal(sampled, tiny_model.generate(ids, max_new_tokens=3))


def test_a_penalty_beyond_float32_acts_as_the_largest_float32():
    # 1e300 is inf in float32: a seen logit of 0 became 0 * inf = NaN
    from qwenvl.generation import process_logits

    logits = torch.tensor([[1.0, 2.0, -1.0, 0.0]])
    out = process_logits(logits, torch.tensor([[1, 2, 3]]), 0, SamplingParams(do_sample=True, repetition_penalty=1e300))
    assert not out.isnan().any()
    assert torch.equal(out.softmax(-1), torch.tensor([[1.0, 0.0, -float("inf"), 0.0]]).softmax(-1))


def test_repetition_penalty_ignores_padding(golden_model, golden_dir):
    """Left padding is <|endoftext|>: counted as seen, it was penalized (here: boosted) in padded rows only."""
    processor = Processor.from_pretrained(golden_dir)
    prompts = [PROMPTS[0], "Hi"]
    inputs = processor(prompts)
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(), repetition_penalty=0.01)
    batched = torch.stack(list(stream_tokens(golden_model, **inputs, params=params)), 1).tolist()
    alone = [torch.stack(list(stream_tokens(golden_model, **processor([p]), params=params)), 1)[0].tolist()
             for p in prompts]
    assert batched == alone


def test_text_stream_holds_an_open_image_span():
    """An <img> span decodes token by token until </img> closes it, then as a path: streamed text must not differ."""
    processor = Processor()
    ids = processor.tokenizer.encode("a <img>ab</img> done")
    stream = TextStream(processor.decode)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == processor.decode(ids) == "a <img>ab</img> done"


def test_predict_and_chat_refuse_a_prompt_where_a_list_belongs(golden_model, golden_dir):
    processor = Processor.from_pretrained(golden_dir)
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="goes in a list of its own"):
        predict(golden_model, processor, "Hello", params)  # was 5 predictions, one per character
    with pytest.raises(ValueError, match="goes in a list of its own"):
        predict(golden_model, processor, [{"role": "user", "content": "Hi"}], params)
    with pytest.raises(TypeError, match="ask expects the message as a str, got NoneType"):
        ChatSession(golden_model, processor, params).ask(None)


def test_chat_session_keeps_its_pictures_when_the_files_go(golden_model, golden_dir, tmp_path):
    # a picture is read once, at :image; moving or deleting the file later changes nothing in the conversation
    shutil.copy(golden_dir / "images" / "cat.png", tmp_path / "cat.png")
    processor = Processor.from_pretrained(golden_dir)
    processor.chat_format = "chatml"  # as `qwenvl chat` (a raw prompt would drop the turn with the picture)
    params = SamplingParams(max_new_tokens=4, do_sample=False)
    kept = ChatSession(golden_model, processor, params, base_dir=tmp_path)
    kept.add_image("cat.png")
    first = kept.ask("what is it?")
    (tmp_path / "cat.png").unlink()
    second = kept.ask("and its colour?")
    shutil.copy(golden_dir / "images" / "cat.png", tmp_path / "cat.png")
    again = ChatSession(golden_model, processor, params, base_dir=tmp_path)
    again.add_image("cat.png")
    assert again.ask("what is it?") == first and again.ask("and its colour?") == second
    kept.clear()
    (tmp_path / "cat.png").unlink()
    with pytest.raises(ValueError, match="image not found"):  # a picture named in a new message is read then
        kept.ask("<img>cat.png</img> now?")


def test_chat_session_keeps_a_picture_typed_in_a_message_when_the_file_goes(golden_model, golden_dir, tmp_path):
    # a picture named by <img>PATH</img> in a message is read once too: deleting the file later made every
    # following message of the conversation fail with "image not found" (until :clear)
    shutil.copy(golden_dir / "images" / "cat.png", tmp_path / "cat.png")
    processor = Processor.from_pretrained(golden_dir)
    processor.chat_format = "chatml"
    params = SamplingParams(max_new_tokens=4, do_sample=False)
    kept = ChatSession(golden_model, processor, params, base_dir=tmp_path)
    first = kept.ask("<img>cat.png</img> what is it?")
    (tmp_path / "cat.png").unlink()
    second = kept.ask("and its colour?")
    shutil.copy(golden_dir / "images" / "cat.png", tmp_path / "cat.png")
    again = ChatSession(golden_model, processor, params, base_dir=tmp_path)
    assert again.ask("<img>cat.png</img> what is it?") == first and again.ask("and its colour?") == second


def test_chat_session_last_image_is_the_latest_picture_shown_also_when_typed(golden_model, golden_dir, tmp_path):
    # chat --draw draws the answer's boxes on last_image: a picture typed as <img>PATH</img> was never it, so
    # "<img>street.jpg</img> frame the car" drew nothing, or drew on an older :image picture
    for name in ("cat.png", "street.jpg"):
        shutil.copy(golden_dir / "images" / name, tmp_path / name)
    processor = Processor.from_pretrained(golden_dir)
    processor.chat_format = "chatml"
    session = ChatSession(golden_model, processor, SamplingParams(max_new_tokens=2, do_sample=False),
                          base_dir=tmp_path)
    session.ask("<img>street.jpg</img> where is the car?")
    assert session.last_image == "street.jpg" and session.images["street.jpg"].size == (200, 360)
    session.add_image("cat.png")
    session.ask("and here?")
    assert session.last_image == "cat.png"
    session.ask("<img>street.jpg</img> again?")
    assert session.last_image == "street.jpg"
    session.ask("thanks")  # no new picture: the latest one shown stays the one to draw on
    assert session.last_image == "street.jpg"
    session.clear()
    session.ask("hello")
    assert session.last_image is None


def test_chat_picture_whose_path_cannot_be_shown_is_refused_when_added(golden_model, golden_dir, tmp_path):
    # a path holding '</img>' cannot go in a prompt: it was added, and then every message failed (until :clear)
    (tmp_path / "x</img>").mkdir(parents=True)  # folders "x<" and "img>"
    shutil.copy(golden_dir / "images" / "cat.png", tmp_path / "x</img>" / "cat.png")
    processor = Processor.from_pretrained(golden_dir)
    processor.chat_format = "chatml"
    session = ChatSession(golden_model, processor, SamplingParams(max_new_tokens=2, do_sample=False),
                          base_dir=tmp_path)
    with pytest.raises(ValueError, match="holds the special token </img>: a prompt cannot show it"):
        session.add_image("x</img>/cat.png")
    assert session.pending_images == [] and session.last_image is None and not session.images
    assert isinstance(session.ask("hello"), str)


def test_the_checkpoints_temperature_and_repetition_penalty_are_the_defaults(golden_dir):
    import dataclasses

    from qwenvl import QwenVL
    from qwenvl.generation import sampling_params
    from qwenvl.inference import chat_params

    model = QwenVL.from_pretrained(golden_dir, dtype=torch.float32)
    model.config = dataclasses.replace(model.config, generation=dataclasses.replace(
        model.config.generation, temperature=0.7, repetition_penalty=1.3))
    for params in (sampling_params(model), chat_params(model)):
        assert (params.temperature, params.repetition_penalty) == (0.7, 1.3)
    given = sampling_params(model, temperature=0.2, repetition_penalty=1.0)
    assert (given.temperature, given.repetition_penalty) == (0.2, 1.0)
    assert chat_params(model, repetition_penalty=1.0).repetition_penalty == 1.0
    ids = torch.tensor([[785, 6722, 315, 9625, 374, 12095, 13]])
    assert torch.equal(model.generate(ids, max_new_tokens=12), model.generate(ids, max_new_tokens=12,
                                                                               repetition_penalty=1.3))
    assert not torch.equal(model.generate(ids, max_new_tokens=12), model.generate(ids, max_new_tokens=12,
                                                                                   repetition_penalty=1.0))


def test_temperature_zero_is_greedy_where_decoding_is_greedy(tiny_model):
    # OpenAI's and vLLM's "temperature 0" was refused even with do_sample=False (predict --temperature 0)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(tiny_model.generate(ids, max_new_tokens=3, temperature=0.0),
                       tiny_model.generate(ids, max_new_tokens=3))
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0.0 \(use do_sample=False for greedy\)"):
        tiny_model.generate(ids, max_new_tokens=3, temperature=0.0, do_sample=True)
    with pytest.raises(ValueError, match="temperature must be > 0, got -1.0"):
        tiny_model.generate(ids, max_new_tokens=3, temperature=-1.0)


def test_text_stream_holds_an_image_span_that_a_later_img_leaves_open():
    """``<img>`` ``<imgpad>`` ``<img>`` ... ``</img>`` (a random model's answer): the first ``<img>`` is the span that
    ``</img>`` closes, not the last one. The stream sent ``<img><imgpad>`` where the whole decodes ``<img></img>``."""
    from qwenvl.config import IMG_END_ID, IMG_PAD_ID, IMG_START_ID

    processor = Processor()
    word = processor.tokenizer.encode("cat")
    for ids in ([IMG_START_ID, IMG_PAD_ID, IMG_START_ID, *word, IMG_END_ID, *word],
                [*word, IMG_START_ID, 99, 97, 116, IMG_PAD_ID, IMG_START_ID, *word, IMG_END_ID, *word]):
        stream = TextStream(processor.decode)
        pieces = [stream.push(t) for t in ids] + [stream.flush()]
        assert "".join(pieces) == processor.decode(ids)
    assert processor.decode(ids) == "cat<img>cat</img>cat"  # the bytes up to <imgpad> are the path


def test_a_tiny_top_p_keeps_only_the_most_likely_token(golden_model, golden_dir):
    """The nucleus of a tiny top_p is the most likely token alone, so sampling is greedy. A random model's next-token
    distribution is nearly flat over 151,936 ids, and its float32 softmax summed ~1e-4 off: 2-4 tokens were kept."""
    from qwenvl.generation import generate, process_logits

    processor = Processor.from_pretrained(golden_dir)
    for text, temperature in [("Hello", 2.0), ("1 2 3", 2.0), ("The cat", 4.0), ("框出图中的蓝色方块", 2.0)]:
        ids = processor([text])["input_ids"]
        with torch.no_grad():
            logits = golden_model(ids).logits[:, -1].float()
        kept = process_logits(logits, None, 0, SamplingParams(do_sample=True, top_p=1e-6, temperature=temperature))
        assert torch.isfinite(kept).sum() == 1 and int(kept.argmax()) == int(logits.argmax()), text
    greedy = generate(golden_model, ids, max_new_tokens=4, stop_token_ids=())
    for seed in range(3):
        assert torch.equal(generate(golden_model, ids, max_new_tokens=4, stop_token_ids=(), do_sample=True, top_p=1e-6,
                                    temperature=2.0, seed=seed), greedy)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_text_stream_pieces_join_to_the_decoded_text_of_random_ids(seed):
    """Whatever a model emits (image tags in any order, path bytes, partial UTF-8, special and unused ids), the
    streamed pieces join to ``decode`` of the whole and never end inside a UTF-8 character."""
    import random

    from qwenvl.config import IMG_END_ID, IMG_PAD_ID, IMG_START_ID

    rng = random.Random(seed)
    processor = Processor()
    for _ in range(300):
        ids = []
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            ids.append(rng.choice([IMG_START_ID, IMG_END_ID, IMG_PAD_ID]) if r < 0.1 else rng.randint(0, 255) if r < 0.3
                       else rng.randint(ENDOFTEXT_ID, 151935) if r < 0.35 else rng.randint(0, ENDOFTEXT_ID - 1))
        stream = TextStream(processor.decode)
        pieces = [stream.push(t) for t in ids]
        assert "".join(pieces) + stream.flush() == processor.decode(ids), ids
        assert not any(p.endswith("\ufffd") for p in pieces), ids


def test_greedy_answers_grow_by_prefix_and_min_new_tokens_only_holds_back_a_stop(tiny_model):
    """Metamorphic relations of greedy decoding on random prompts: ``max_new_tokens=k`` is a prefix of ``k+m``;
    with ``min_new_tokens=k`` no stop comes before k tokens, and an answer whose stop came at or after k is unchanged."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ENDOFTEXT_ID, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    mask[2, :7] = 0
    free = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=8, stop_token_ids=())[:, 9:]
    for k in (1, 3, 5):
        assert torch.equal(tiny_model.generate(ids, attention_mask=mask, max_new_tokens=k, stop_token_ids=())[:, 9:], free[:, :k])
    for row in range(3):
        for k in (0, 2, 5):
            stop = int(free[row, 3])  # a token this row emits, maybe earlier too
            out = tiny_model.generate(ids[row : row + 1, mask[row].bool()], max_new_tokens=8, min_new_tokens=k,
                                      stop_token_ids=(stop,))[0, int(mask[row].sum()):].tolist()
            assert stop not in out[:k]
            first = free[row].tolist().index(stop)
            if first >= k:
                assert out == free[row, : first + 1].tolist()  # alone: it ends at its stop
