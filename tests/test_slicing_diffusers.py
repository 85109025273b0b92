"""The slicing core on diffusers' SVD models: exact, removable, and a one-call wrap of a pipeline."""
import numpy as np
import pytest
import torch

from devkit import model_fixtures

TOLERANCE = 1e-5  # fp32, relative to the output's scale


def relative_error(output, reference):
    return ((output - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def slicing(pack):
    from comfyui_streamline.core import slicing
    return slicing


@pytest.fixture(scope="module")
def unet():
    return model_fixtures.build_diffusers_svd_unet("tiny")


@pytest.fixture(scope="module")
def vae():
    return model_fixtures.build_diffusers_svd_vae("tiny")


def unet_inputs(frames, height, width):
    generator = torch.Generator().manual_seed(frames)
    return (torch.randn(2, frames, 8, height, width, generator=generator), torch.tensor(10.0),
            torch.randn(2, 1, 32, generator=generator), torch.randn(2, 3, generator=generator))


@pytest.mark.parametrize("frames, height, width, settings", [
    (1, 8, 8, dict()),
    (14, 12, 20, dict(group_ops=True)),
    (14, 12, 20, dict(frame_chunks=5, strip_chunks=7)),
    (25, 10, 14, dict(frame_chunks=4, strip_chunks=3, group_ops=True)),
])
def test_diffusers_unet_sliced_equals_stock_and_removes(slicing, unet, frames, height, width, settings):
    inputs = unet_inputs(frames, height, width)
    with torch.no_grad():
        reference = unet(*inputs).sample
        slicing.apply_slicing(unet, slicing.SliceSettings(**settings))
        assert "forward" in unet.down_blocks[0].resnets[0].__dict__
        sliced = unet(*inputs).sample
        slicing.remove_slicing(unet)
        restored = unet(*inputs).sample
    assert relative_error(sliced, reference) <= TOLERANCE
    assert torch.equal(restored, reference)
    assert not any("forward" in module.__dict__ for module in unet.modules())


@pytest.mark.parametrize("frames, settings", [(1, dict()), (14, dict(group_ops=True)),
                                              (25, dict(frame_chunks=6, strip_chunks=5))])
def test_diffusers_temporal_decoder_sliced_equals_stock(slicing, vae, frames, settings):
    latent = torch.randn(frames, 4, 10, 14, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        reference = vae.decode(latent, num_frames=frames).sample
        slicing.apply_slicing(vae, slicing.SliceSettings(**settings))
        sliced = vae.decode(latent, num_frames=frames).sample
        slicing.remove_slicing(vae)
    assert relative_error(sliced, reference) <= TOLERANCE


def test_one_call_wrap_of_a_stable_video_diffusion_pipeline(slicing, unet, vae):
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=224, patch_size=32))  # the pipeline resizes its input to 224 px
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=EulerDiscreteScheduler(),
                                        feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype("uint8"))

    def generate():
        return pipe(image, height=32, width=48, num_frames=5, num_inference_steps=2, decode_chunk_size=5,
                    generator=torch.Generator().manual_seed(0), output_type="pt").frames
    reference = generate()
    classes = [type(module) for module in pipe.unet.modules()]
    slicing.apply_slicing(pipe, slicing.SliceSettings(group_ops=True))
    sliced = generate()
    slicing.remove_slicing(pipe)
    assert relative_error(sliced, reference) <= TOLERANCE
    assert torch.equal(generate(), reference)
    assert [type(module) for module in pipe.unet.modules()] == classes  # no class swapping, unlike FME


def test_a_pipeline_without_video_models_is_refused_untouched(slicing):
    class ImagePipeline:
        components = {"unet": torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)), "tokenizer": object()}
    with pytest.raises(slicing.UnsupportedModelError, match="diffusers SVD"):
        slicing.apply_slicing(ImagePipeline(), slicing.SliceSettings())
    assert "forward" not in ImagePipeline.components["unet"][0].__dict__
