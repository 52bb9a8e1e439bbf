"""The Python API as transformers users (and users of the official Qwen-VL remote code) call it from habit: their
keywords are taken where they mean the same here, and are otherwise one-line errors saying what to use instead,
never silently ignored."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from qwenvl import Processor, QwenVL
from qwenvl.config import ENDOFTEXT_ID, IM_END_ID
from qwenvl.generation import SamplingParams
from qwenvl.inference import ChatSession, iter_predict, predict, stream_text


@pytest.fixture(scope="module")
def chat_model(golden_dir):
    """The golden checkpoint answering as a chat (chatml) one: a model of its own, the config is changed."""
    model = QwenVL.from_pretrained(golden_dir, dtype=torch.float32)
    model.config.generation.chat_format = "chatml"
    return model


def _ids(n=8, seed=1):
    return torch.randint(1000, 50000, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- from_pretrained ----------------------------------------------------------------------------------------------
def test_from_pretrained_takes_the_transformers_and_official_keywords_that_mean_the_same(golden_dir):
    assert QwenVL.from_pretrained(golden_dir, torch_dtype=torch.float32).dtype == torch.float32
    assert QwenVL.from_pretrained(golden_dir, torch_dtype="auto").dtype == torch.float16  # as stored
    assert QwenVL.from_pretrained(golden_dir, bf16=True).dtype == torch.bfloat16  # the official config switches
    assert QwenVL.from_pretrained(golden_dir, fp32=True, fp16=False).dtype == torch.float32
    model = QwenVL.from_pretrained(golden_dir, device_map="cpu", trust_remote_code=True, low_cpu_mem_usage=True)
    assert model.device == torch.device("cpu") and not model.training
    assert QwenVL.from_pretrained(golden_dir, device_map="auto").device.type == ("cuda" if torch.cuda.is_available()
                                                                                 else "cpu")
    assert QwenVL.from_pretrained(golden_dir, device="auto").device.type in ("cuda", "cpu")
    assert QwenVL.from_pretrained(golden_dir, device_map={"": "cpu"}).device == torch.device("cpu")
    if not torch.cuda.is_available():  # device_map=0 is cuda:0, as in transformers
        with pytest.raises(ValueError, match="device .cuda:0.: CUDA is not available"):
            QwenVL.from_pretrained(golden_dir, device_map=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"revision": "main"}, TypeError, "loads a local folder"),
        ({"load_in_8bit": True}, TypeError, r"quantize='int8'"),
        ({"dtype": torch.int8}, ValueError, r"floating dtype .* quantize='int8'"),
        ({"dtype": torch.float32, "torch_dtype": torch.float16}, TypeError, "dtype and torch_dtype: give one dtype"),
        ({"torch_dtype": torch.float32, "bf16": True}, TypeError, "give one dtype"),
        ({"device_map": {"transformer": 0, "lm_head": 1}}, TypeError, "device_map naming one device"),
        ({"device": "cuda:0", "device_map": "cpu"}, TypeError, "device and device_map"),
        ({"device": "gpu"}, ValueError, "^device 'gpu' is not a device"),  # Python's keyword, not the CLI's --device
        ({"dtyp": torch.float32}, TypeError, "unexpected keyword argument 'dtyp'"),
    ],
)
def test_from_pretrained_refuses_what_it_does_not_do_in_one_line(golden_dir, kwargs, error, message):
    with pytest.raises(error, match=message):
        QwenVL.from_pretrained(golden_dir, **kwargs)


def test_a_hub_id_is_named_as_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not Hugging Face Hub ids: download it first"):
        QwenVL.from_pretrained("Qwen/Qwen-VL-Chat")
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found: nothing$"):
        QwenVL.from_pretrained("nothing")


# ---- generate ------------------------------------------------------------------------------------------------------
def test_max_length_counts_the_prompt_as_in_transformers(tiny_model):
    ids = _ids(8)
    out = tiny_model.generate(ids, max_length=12, min_new_tokens=4)
    assert out.shape == (1, 12) and torch.equal(out, tiny_model.generate(ids, max_new_tokens=4, min_new_tokens=4))
    with pytest.raises(ValueError, match="max_length=8 leaves no room for new tokens after the prompt's 8"):
        tiny_model.generate(ids, max_length=8)
    with pytest.raises(TypeError, match="max_new_tokens and max_length"):
        tiny_model.generate(ids, max_length=12, max_new_tokens=4)
    stop = int(tiny_model.generate(ids, max_new_tokens=1)[0, -1])
    held = tiny_model.generate(ids, max_new_tokens=3, min_length=10, eos_token_id=stop)  # 2 new tokens at least
    assert torch.equal(held, tiny_model.generate(ids, max_new_tokens=3, min_new_tokens=2, stop_token_ids=[stop]))
    assert held.shape[1] >= 10 and held[0, 8] != stop


def test_eos_and_pad_token_ids_as_in_transformers(tiny_model):
    ids, other = _ids(8), _ids(8, seed=2)
    first = int(tiny_model.generate(ids, max_new_tokens=1)[0, -1])
    assert first not in tiny_model.generate(other, max_new_tokens=3)[0, 8:].tolist()  # the other row goes on
    for eos in (first, [IM_END_ID, first]):  # an id or a list, as transformers takes it
        assert tiny_model.generate(ids, max_new_tokens=4, eos_token_id=eos)[0, 8:].tolist() == [first]
    out = tiny_model.generate(torch.cat([ids, other]), max_new_tokens=3, eos_token_id=first, pad_token_id=7)
    assert out.shape == (2, 11) and out[0, 8:].tolist() == [first, 7, 7]  # padded with pad_token_id after its stop
    with pytest.raises(TypeError, match="stop_token_ids and eos_token_id"):
        tiny_model.generate(ids, max_new_tokens=2, eos_token_id=first, stop_token_ids=[first])


def test_transformers_options_that_change_nothing_are_taken(tiny_model):
    ids = _ids(8)
    want = tiny_model.generate(ids, max_new_tokens=3)
    same = tiny_model.generate(inputs=ids, max_new_tokens=3, num_beams=1, num_return_sequences=1, use_cache=True,
                               return_dict_in_generate=False, output_scores=False, streamer=None)
    assert torch.equal(same, want)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 4}, "num_beams=4: beam search is not implemented"),
        ({"num_return_sequences": 2, "do_sample": True}, r"processor\(\[prompt\] \* n\)"),
        ({"use_cache": False}, "always decodes over a KV cache"),
        ({"return_dict_in_generate": True}, "stream_tokens"),
        ({"output_scores": True}, "logits"),
        ({"stop_words_ids": [[151643]]}, "stop_token_ids"),
        ({"generation_config": object()}, "generation_config=.*: pass its settings as keywords"),
        ({"streamer": object()}, "stream_text"),
        ({"num_beams": True}, "num_beams=True"),  # a flag in the wrong place
        ({"max_lenght": 9}, "unexpected keyword argument 'max_lenght'"),
    ],
)
def test_transformers_options_that_ask_for_what_is_not_done_say_what_to_use(tiny_model, kwargs, message):
    with pytest.raises(TypeError, match=message):
        tiny_model.generate(_ids(8), max_new_tokens=2, **kwargs)


def test_forward_refuses_keywords_it_would_ignore(tiny_model):
    ids = _ids(6)
    want = tiny_model(ids).logits
    assert torch.equal(tiny_model(ids, return_dict=True, use_cache=False, output_hidden_states=False,
                                  token_type_ids=torch.zeros_like(ids)).logits, want)
    with pytest.raises(TypeError, match="unexpected keyword argument 'atention_mask'"):
        tiny_model(ids, atention_mask=torch.ones_like(ids))  # was ignored: a batch ran unmasked
    with pytest.raises(TypeError, match="use_cache=True: pass past_key_values=model.new_cache"):
        tiny_model(ids, use_cache=True)
    with pytest.raises(TypeError, match="output_hidden_states=True"):
        tiny_model(ids, output_hidden_states=True)


# ---- processor and tokenizer ---------------------------------------------------------------------------------------
def test_processor_takes_padding_and_refuses_truncation(golden_dir):
    processor = Processor.from_pretrained(golden_dir)
    want = processor(["a", "b c d"])
    for padding in (True, "longest"):
        got = processor(["a", "b c d"], return_tensors="pt", padding=padding)
        assert torch.equal(got["input_ids"], want["input_ids"])
    assert processor(["a b", "c d"], padding=False, truncation=False)["input_ids"].shape == (2, 2)
    with pytest.raises(ValueError, match="padding=False, but the prompts are 1 to 3 tokens long"):
        processor(["a", "b c d"], padding=False)
    with pytest.raises(ValueError, match="padding='max_length' is not supported"):
        processor(["a"], padding="max_length")
    with pytest.raises(ValueError, match="truncation=True is not supported: prompts are never cut"):
        processor(["a"], truncation=True)


def test_processor_inputs_move_as_transformers_batches_do(golden_dir, golden_model):
    from qwenvl.tokenizer import QwenTokenizer

    processor = Processor.from_pretrained(golden_dir, trust_remote_code=True)  # the official snippet's habit
    assert QwenTokenizer.from_pretrained(golden_dir, trust_remote_code=True).encode("hi") == processor.tokenizer.encode(
        "hi")
    inputs = processor("Picture 1: <img>cat.png</img>\nHi", images=[golden_dir / "images" / "cat.png"],
                       base_dir=golden_dir)
    moved = inputs.to(golden_model.device)  # was: 'dict' object has no attribute 'to'
    assert torch.equal(moved["input_ids"], inputs["input_ids"]) and moved["images"].dtype == torch.float32
    half = inputs.to(torch.float16)  # the pixels only: ids and mask stay integers
    assert half["images"].dtype == torch.float16 and half["input_ids"].dtype == torch.long
    assert half["attention_mask"].dtype == torch.long
    assert torch.equal(golden_model.generate(**moved, max_new_tokens=2), golden_model.generate(**inputs, max_new_tokens=2))
    assert processor("Hi").to("cpu")["images"] is None


def test_tokenizer_habits_say_what_to_use(golden_dir):
    tokenizer = Processor.from_pretrained(golden_dir).tokenizer
    with pytest.raises(TypeError, match=r"not callable: processor\(text\) gives the model's inputs"):
        tokenizer("hello", return_tensors="pt")
    with pytest.raises(AttributeError, match="no draw_bbox_on_latest_picture: qwenvl.grounding.parse_grounding"):
        tokenizer.draw_bbox_on_latest_picture("<ref>a</ref><box>(1,2),(3,4)</box>", [])
    with pytest.raises(AttributeError, match="object has no attribute 'nothing'"):
        tokenizer.nothing  # noqa: B018
    assert not hasattr(tokenizer, "eos_token") and tokenizer.eos_token_id == ENDOFTEXT_ID


# ---- model.chat (the official remote code's) ------------------------------------------------------------------------
def test_chat_answers_as_the_chat_prompt_and_grows_the_history(chat_model, golden_dir):
    processor = Processor.from_pretrained(golden_dir)
    processor.chat_format = "chatml"
    tokenizer = processor.tokenizer
    response, history = chat_model.chat(tokenizer, query="Hello", history=None, max_new_tokens=6, do_sample=False)
    params = SamplingParams(max_new_tokens=6)
    assert response == "".join(stream_text(chat_model, processor, [{"role": "user", "content": "Hello"}], params))
    assert history == [("Hello", response)]
    again, history2 = chat_model.chat(tokenizer, "More", history, max_new_tokens=6, do_sample=False)
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": response},
            {"role": "user", "content": "More"}]
    assert again == "".join(stream_text(chat_model, processor, msgs, params))
    assert history2 == [("Hello", response), ("More", again)] and history == [("Hello", response)]
    grown = list(chat_model.chat_stream(tokenizer, "Hello", max_new_tokens=6, do_sample=False))
    assert grown[-1] == response and all(b.startswith(a) for a, b in zip(grown, grown[1:], strict=False))


def test_generation_config_is_the_checkpoints_defaults(golden_dir):
    model = QwenVL.from_pretrained(golden_dir, dtype="float32")
    ids = _ids(8)
    model.generation_config.max_new_tokens = 3  # as users of the official remote code set it
    assert model.generation_config is model.config.generation
    assert model.generate(ids, min_new_tokens=3).shape == (1, 11)


def test_chat_refuses_a_base_checkpoint_and_another_tokenizer(golden_model, chat_model, golden_dir):
    tokenizer = Processor.from_pretrained(golden_dir).tokenizer
    with pytest.raises(ValueError, match=r"needs a chat checkpoint .* model.generate"):
        golden_model.chat(tokenizer, "Hello")
    with pytest.raises(TypeError, match="takes qwenvl's tokenizer"):
        chat_model.chat(object(), "Hello")


# ---- qwenvl.inference ----------------------------------------------------------------------------------------------
def test_predict_and_stream_text_without_params_use_generates_defaults(chat_model, golden_dir):
    processor = Processor.from_pretrained(golden_dir)
    chat_model.config.generation.max_new_tokens = 5  # the checkpoint's default (512) would take long
    inputs = processor("Hello")
    want = chat_model.generate(**inputs)[0, inputs["input_ids"].shape[1]:]
    [got] = predict(chat_model, processor, ["Hello"])  # was: AttributeError on None.stop_token_ids
    assert got.num_tokens == len(want) and processor.decode(want).startswith(got.response)
    assert [p.text for p in iter_predict(chat_model, processor, ["Hello"])] == [got.text]
    assert "".join(stream_text(chat_model, processor, "Hello")) == got.response
    with pytest.raises(TypeError, match="params must be a SamplingParams .* got a dict"):
        predict(chat_model, processor, ["Hello"], {"max_new_tokens": 3})


def test_stream_text_refuses_a_list_of_prompts(golden_model, golden_dir):
    processor = Processor.from_pretrained(golden_dir)
    with pytest.raises(ValueError, match="stream_text takes one prompt .* got a list of 1 prompt"):
        list(stream_text(golden_model, processor, ["Hello"], SamplingParams(max_new_tokens=2)))


def test_chat_session_takes_pictures_as_bytes_pil_and_data_urls(chat_model, golden_dir):
    processor = Processor.from_pretrained(golden_dir, allowed_media_dir=None)  # no local file may be read
    processor.chat_format = "chatml"
    raw = (golden_dir / "images" / "cat.png").read_bytes()
    picture = Image.open(io.BytesIO(raw))
    url = "data:image/png;base64," + base64.b64encode(raw).decode()  # 100 kB: no <img>URL</img> can hold it
    params = SamplingParams(max_new_tokens=3, do_sample=False)
    answers = []
    for source in (raw, picture, url):
        session = ChatSession(chat_model, processor, params)
        assert session.add_image(source) == "<image 1>" and session.last_image == "<image 1>"
        answers.append(session.ask("What is it?"))
        assert session.history[0][0] == [{"image": "<image 1>"}, {"text": "What is it?"}]
    assert answers[0] == answers[1] == answers[2]
    session = ChatSession(chat_model, processor, params)
    assert [session.add_image(raw), session.add_image(raw)] == ["<image 1>", "<image 2>"]


def test_chat_session_refuses_a_path_too_long_for_a_prompt_when_added(chat_model, golden_dir):
    session = ChatSession(chat_model, Processor.from_pretrained(golden_dir), SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="is 300 bytes long .* a prompt cannot show it"):
        session.add_image("x" * 296 + ".png")  # was added, and then every question failed (until :clear)
    assert session.pending_images == [] and session.images == {}


def test_optimize_for_inference_takes_a_dtype_by_name(golden_dir):
    from qwenvl.quantize import optimize_for_inference

    by_name = optimize_for_inference(QwenVL.from_pretrained(golden_dir, dtype="float32"), "int8", dtype="bfloat16")
    by_dtype = optimize_for_inference(QwenVL.from_pretrained(golden_dir, dtype="float32"), "int8", dtype=torch.bfloat16)
    assert by_name.dtype == torch.bfloat16  # was: TypeError deep inside the int8 layers
    assert torch.equal(by_name.lm_head.weight, by_dtype.lm_head.weight)
