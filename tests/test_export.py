"""`ldm export`: the folder loads in diffusers' own StableDiffusionPipeline, offline, in a
fresh interpreter that cannot import this project, and generates an image from a prompt.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import ldm, ok, one_line_error

pytestmark = pytest.mark.slow

# Runs with `python -I` in tmp_path: no repo on sys.path; the editable install's import hook
# is still there, so project packages are also blocked outright.
GENERATE = """
import sys

PROJECT = {"core", "models", "data_pipeline", "training", "orchestrator", "tests"}

class NoProject:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in PROJECT:
            raise ImportError(f"exported pipeline imported project module {name}")

sys.meta_path.insert(0, NoProject())
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
image = pipe(
    "an emoji of red heart", num_inference_steps=4, generator=torch.Generator().manual_seed(0)
).images[0]
image.save(sys.argv[2])
assert not PROJECT & set(sys.modules), sys.modules.keys()
"""


@pytest.fixture(scope="module")
def tag(pipeline):
    work, _, _ = pipeline
    tags = sorted((work / "runs" / "tiny" / "checkpoints").glob("step_*/COMMITTED.json"))
    return tags[-1].parent


@pytest.fixture(scope="module")
def exported(tag, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "pipe"
    ok(ldm("export", str(tag), str(out)))
    return out


def test_export_loads_and_generates_without_the_project(exported, tmp_path):
    assert {p.name for p in exported.iterdir()} >= {
        "model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "README.md"
    }  # fmt: skip
    files = [p for p in exported.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 3
    png = tmp_path / "heart.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", GENERATE, str(exported), str(png)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    image = np.asarray(Image.open(png))
    assert image.shape == (32, 32, 3)  # the tiny preset's data.resolution
    assert image.std() > 1.0


def test_exported_vae_decodes_like_training(exported, pipeline):
    work, _, _ = pipeline
    original = AutoencoderKL.from_pretrained(work / "runs" / "tiny" / "autoencoder")
    vae = AutoencoderKL.from_pretrained(exported / "vae")
    scale, shift = original.config.scaling_factor, original.config.shift_factor
    assert shift and vae.config.scaling_factor == scale and not vae.config.shift_factor
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original.decode(latents / scale + shift).sample
        got = vae.decode(latents / scale).sample  # what StableDiffusionPipeline does
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_raw_export_differs_and_nonempty_out_is_refused(tag, exported, tmp_path):
    ok(ldm("export", str(tag), str(tmp_path / "raw"), "--raw"))
    ema = load_file(next((exported / "unet").glob("*.safetensors")))
    raw = load_file(next((tmp_path / "raw" / "unet").glob("*.safetensors")))
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    one_line_error(ldm("export", str(tag), str(exported)), "not empty", "--overwrite")
