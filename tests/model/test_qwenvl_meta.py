"""QwenVL.on_meta: the model's names and shapes on the meta device, built without the layers' own init."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from qwenvl.model import QwenVL
from qwenvl.model.qwenvl import _INIT_FUNCTIONS


def test_on_meta_has_the_models_names_and_shapes_and_restores_torch_init() -> None:
    before = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    model = QwenVL.on_meta("tiny")
    want = QwenVL.from_config("tiny", seed=0).state_dict()
    got = model.state_dict()
    assert list(got) == list(want)
    assert all(t.shape == want[n].shape for n, t in got.items())
    fixed = "transformer.visual.attn_pool.pos_embed"  # the resampler's fixed sin-cos table is computed as it is
    assert all(p.is_meta for n, p in model.named_parameters() if n != fixed)
    assert {name: getattr(nn.init, name) for name in before} == before
    assert torch.nn.Linear(2, 3).weight.abs().sum() > 0  # init works again after the block


def test_loading_a_checkpoint_does_not_import_the_compiler(tmp_path) -> None:
    # a random normal_ on a meta tensor runs a reference kernel that imports torch._dynamo (~2.3 s on 2 AVX2 cores)
    QwenVL.from_config("tiny", seed=0).save_pretrained(tmp_path)
    code = ("import sys; from qwenvl.model import QwenVL; QwenVL.from_pretrained(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
