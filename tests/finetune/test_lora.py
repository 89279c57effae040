"""LoRA fine-tuning from a pretrained base (the session's tiny run's export): only the adapter
trains and is checkpointed, and its diffusers export reloads in StableDiffusionPipeline at the
trained strength (alpha != rank), equal to the merged export and to the trained module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from finetune_runs import finetune_overrides, resumed_from_step_2
from safetensors import safe_open
from safetensors.torch import load_file

from train.cli.export import module_from_checkpoint
from train.config.compose import compose
from train.errors import ConfigError
from train.models import adapters
from train.tasks.pipelines import export_kohya

RANK, ALPHA = 4, 8  # alpha != rank: a reload that loses alpha comes back at half the strength


def lora_overrides(
    root: Path, base: Path, shards: Path, *extra: str, logger: str = "none"
) -> list[str]:
    rank = (f"model.backbone.adapter.r={RANK}", f"model.backbone.adapter.lora_alpha={ALPHA}")
    return finetune_overrides("lora", root, base, shards, *rank, *extra, logger=logger)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_run, demo_shards):
    from train.cli.train import main

    base = tiny_run[0] / "export"
    # With the adapter's EMA: every export below is of the EMA weights, not the raw ones.
    root = tmp_path_factory.mktemp("lora")
    # The store named, not taken from MLFLOW_TRACKING_URI (an earlier in-process run sets it).
    store = f"logger.mlflow.tracking_uri=sqlite:///{root}/mlflow.db"
    args = lora_overrides(root, base, demo_shards, "callbacks/ema=default", store, logger="mlflow")
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(compose(args).paths.run_dir), base


def unet_inputs(unet: UNet2DConditionModel, text_dim: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    return x, torch.tensor([10, 700]), torch.randn(2, 6, text_dim, generator=g)


def trained_outputs(run_dir: Path, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet prediction of the run's last checkpoint with its EMA adapter and its raw one."""
    module, ema = module_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        raw = module.trainable.eval()(*inputs).sample
        return module.model_from_state(ema)(*inputs).sample, raw


def test_checkpoint_holds_only_the_adapter(lora_run) -> None:
    run_dir, base = lora_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    base_unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    n_base = sum(p.numel() for p in base_unet.parameters())
    n_ckpt = sum(v.numel() for v in ckpt["state_dict"].values())
    assert n_ckpt < n_base / 10, (n_ckpt, n_base)
    # The EMA shadows the adapter alone: the frozen base is never averaged or stored twice.
    ema = ckpt["callbacks"]["EMA"]["state"]
    assert len(ema) == len(keys) and all(".lora_A." in k or ".lora_B." in k for k in ema)
    # The optimizer state covers the adapter only.
    state = ckpt["optimizer_states"][0]["state"]
    assert sum(s["exp_avg"].numel() for s in state.values()) == n_ckpt


def test_lora_export_reloads_at_the_trained_strength(lora_run) -> None:
    run_dir, base = lora_run
    lora_file = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(lora_file, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert meta["unet.r"] == RANK and meta["unet.lora_alpha"] == ALPHA
    assert keys and all(k.startswith("unet.") for k in keys)

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    inputs = unet_inputs(pipe.unet, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        before = pipe.unet(*inputs).sample
        pipe.load_lora_weights(run_dir / "lora")
        reloaded = pipe.unet(*inputs).sample
        merged = UNet2DConditionModel.from_pretrained(run_dir / "export", subfolder="unet")
        fused = merged(*inputs).sample
        trained, raw = trained_outputs(run_dir, inputs)
    assert (reloaded - before).abs().max() > 1e-3  # the LoRA changes the UNet
    assert (trained - raw).abs().max() > 1e-4  # the EMA is not the raw adapter
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused, trained, rtol=0, atol=1e-5)
    # The merged export is a plain UNet: no adapter weights left in it.
    assert not adapters.has_adapter(merged)
    assert not any("lora" in k for k in merged.state_dict())


def comfyui_lora_names(unet: UNet2DConditionModel) -> set[str]:
    """The LoRA module names ComfyUI maps onto a diffusers-layout UNet (comfy/lora.py,
    ``model_lora_keys_unet``): ``lora_unet_`` + each weight's key without ``.weight``, dots as
    underscores. A key outside this set is "lora key not loaded" there."""
    suffix = ".weight"
    return {"lora_unet_" + k[: -len(suffix)].replace(".", "_")
            for k in unet.state_dict() if k.endswith(suffix)}  # fmt: skip


def test_kohya_export_has_comfyui_names_and_reloads_at_the_trained_strength(lora_run) -> None:
    run_dir, base = lora_run
    state = load_file(run_dir / "lora_kohya" / "lora.safetensors")
    names = {k.split(".")[0] for k in state}
    base_unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    assert names and names <= comfyui_lora_names(base_unet), names - comfyui_lora_names(base_unet)
    assert all(state[f"{n}.alpha"].item() == ALPHA for n in names)  # not diffusers' alpha = rank
    assert all(state[f"{n}.lora_down.weight"].shape[0] == RANK for n in names)
    assert {k.split(".", 1)[1] for k in state} == {"alpha", "lora_down.weight", "lora_up.weight"}

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    inputs = unet_inputs(pipe.unet, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        pipe.load_lora_weights(run_dir / "lora_kohya")  # diffusers' kohya converter
        reloaded = pipe.unet(*inputs).sample
        trained, _ = trained_outputs(run_dir, inputs)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)


def test_mlflow_records_the_adapter_and_its_base_and_registers_the_lora(lora_run) -> None:
    from mlflow import MlflowClient

    from train.tracking.lineage import base_sha256

    run_dir, base = lora_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parents[1]}/mlflow.db")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    tags = run.data.tags
    assert tags["adapter.type"] == "LoraConfig" and tags["base_model"] == str(base)
    assert (tags["adapter.rank"], tags["adapter.alpha"]) == (str(RANK), str(ALPHA))
    assert tags["adapter.target_modules"] == str(sorted(["to_q", "to_k", "to_v", "to_out.0"]))
    digest = tags["base_model.sha256"]
    assert len(digest) == 64 and digest == base_sha256.__wrapped__(str(base))
    versions = {v.name: v for v in client.search_model_versions("name LIKE 'ldm-lora%'")}
    assert set(versions) == {"ldm-lora", "ldm-lora-lora"}
    lora = versions["ldm-lora-lora"]
    assert lora.run_id == run.info.run_id and lora.source.endswith("/lora/step_0000004")
    assert lora.tags["format"] == "diffusers-lora" and lora.tags["base_model.sha256"] == digest
    assert versions["ldm-lora"].tags["format"] == "diffusers"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"lora", "lora_kohya", "export"} <= artifacts


def test_base_hash_changes_with_any_file_of_the_base(tmp_path) -> None:
    from train.tracking.lineage import base_sha256

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"abc")
    (tmp_path / "model_index.json").write_text("{}")
    first = base_sha256.__wrapped__(str(tmp_path))
    assert first == base_sha256.__wrapped__(str(tmp_path))
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"abd")
    assert base_sha256.__wrapped__(str(tmp_path)) != first
    assert base_sha256.__wrapped__("no/such-model-here") == "unavailable"


def test_resume_from_an_adapter_checkpoint_matches_the_uninterrupted_run(
    lora_run, demo_shards, tmp_path
) -> None:
    run_dir, base = lora_run
    ref, got = resumed_from_step_2(run_dir, tmp_path, lambda step2: lora_overrides(
        tmp_path, base, demo_shards, "callbacks/ema=default", f"ckpt_path={step2}"))  # fmt: skip
    ref_ema, got_ema = (c["callbacks"]["EMA"] for c in (ref, got))
    assert got_ema["updates"] == ref_ema["updates"] == 4
    assert all(torch.equal(v, got_ema["state"][k]) for k, v in ref_ema["state"].items())


def perturbed_module(tmp_path: Path, base: Path, shards: Path, adapter: str, *extra: str):
    """The task with a fresh adapter whose weights are all moved off their init (peft starts
    LoRA's B at zero: an untouched adapter would round-trip trivially)."""
    from hydra.utils import instantiate

    overrides = lora_overrides(tmp_path, base, shards, f"model/backbone/adapter={adapter}")
    if adapter in ("loha", "lokr"):  # their own rank and alpha keys (conf/.../adapter/)
        overrides = [o for o in overrides if not o.startswith("model.backbone.adapter.")]
    replaced = {e.split("=", 1)[0] for e in extra}
    overrides = [o for o in overrides if o.split("=", 1)[0] not in replaced]
    cfg = compose([*overrides, *extra])
    module = instantiate(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.trainable.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


@pytest.mark.parametrize("alpha", [RANK, ALPHA], ids=["alpha=rank", "alpha!=rank"])
def test_perturbed_lora_reloads_the_same_whatever_its_alpha(alpha, tiny_run, demo_shards,
                                                            tmp_path) -> None:  # fmt: skip
    """Both files (diffusers with metadata, kohya with per-module alpha) restore the trained
    scale alpha / rank, so the reloaded UNet predicts what the trained one does."""
    base = tiny_run[0] / "export"
    module = perturbed_module(tmp_path, base, demo_shards, "lora",
                              f"model.backbone.adapter.lora_alpha={alpha}")  # fmt: skip
    assert adapters.adapter_config(module.trainable).lora_alpha == alpha
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    inputs = unet_inputs(pipe.unet, pipe.text_encoder.config.hidden_size)
    module.export_lora(tmp_path / "lora")
    export_kohya(module, tmp_path / "kohya")
    with torch.no_grad():
        trained = module.trainable(*inputs).sample
        for folder in ("lora", "kohya"):
            pipe.load_lora_weights(tmp_path / folder)
            torch.testing.assert_close(pipe.unet(*inputs).sample, trained, rtol=0, atol=1e-5)
            pipe.unload_lora_weights()


def lycoris_merged(unet: UNet2DConditionModel, file: Path) -> UNet2DConditionModel:
    """`unet` with the kohya / LyCORIS file merged in by LyCORIS' own kohya loader (the network
    module kohya's scripts load LoHa, LoKr and DoRA files with)."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # LyCORIS 4.1.3 builds a default network first, and on a diffusers UNet its targets meet
    # time_embedding twice (its class list and its name list): an assertion, not our file's.
    targets = [m for m in LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE
               if m != "TimestepEmbedding"]  # fmt: skip
    state = load_file(file)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_MODULE", targets)
        network, _ = create_network_from_weights(1.0, None, None, None, unet, weights_sd=state)
    assert len(network.unet_loras) == len({k.split(".")[0] for k in state})  # every module read
    network.merge_to(None, unet, state, torch.float32, "cpu")
    return unet


KOHYA_KEYS = {"lora": {"lora_down.weight", "lora_up.weight"},
              "dora": {"lora_down.weight", "lora_up.weight", "dora_scale"},
              "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
              # w2 whole in the small layers, low-rank (w2_a, w2_b) in the wider ones
              "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}}  # fmt: skip


@pytest.mark.parametrize("adapter", ["lora", "dora", "loha", "lokr"])
def test_adapter_variants_export(adapter, tiny_run, demo_shards, tmp_path) -> None:
    base = tiny_run[0] / "export"
    module = perturbed_module(tmp_path, base, demo_shards, adapter)
    model = module.trainable
    # The objective is the base's: its schedule and prediction type.
    saved = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    schedule = module.objective.scheduler.config
    assert (schedule.prediction_type, schedule.beta_end) == (saved["prediction_type"],
                                                             saved["beta_end"])  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    inputs = unet_inputs(pipe.unet, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        trained = model(*inputs).sample
        assert (trained - pipe.unet(*inputs).sample).abs().max() > 1e-3
        module.export(tmp_path / "merged")
        merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged", subfolder="unet")
        # Folding the update into the weights rounds differently from adding it after: 1e-4.
        torch.testing.assert_close(merged(*inputs).sample, trained, rtol=0, atol=1e-4)
        # The kohya / LyCORIS file: ComfyUI's names, the kind's keys, LyCORIS' reading of it.
        export_kohya(module, tmp_path / "kohya")
        file = tmp_path / "kohya" / "lora.safetensors"
        state = load_file(file)
        assert {k.split(".")[0] for k in state} <= comfyui_lora_names(pipe.unet)
        assert {k.split(".", 1)[1] for k in state} - {"alpha"} == KOHYA_KEYS[adapter]
        fresh = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
        reloaded = lycoris_merged(fresh, file)(*inputs).sample
        torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-4)
        if adapter in ("loha", "lokr"):
            with pytest.raises(ConfigError, match="LoRA and DoRA adapters only.*merged"):
                module.export_lora(tmp_path / "lora")
            return
        module.export_lora(tmp_path / "lora")
        pipe.load_lora_weights(tmp_path / "lora")
        torch.testing.assert_close(pipe.unet(*inputs).sample, trained, rtol=0, atol=1e-5)
        if adapter == "lora":  # every weight moved: the kohya file's A, B and alpha all count
            pipe.unload_lora_weights()
            pipe.load_lora_weights(tmp_path / "kohya")
            torch.testing.assert_close(pipe.unet(*inputs).sample, trained, rtol=0, atol=1e-5)


@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_lycoris_alpha_is_the_trained_scale_times_the_rank(adapter, tiny_run, demo_shards,
                                                           tmp_path) -> None:  # fmt: skip
    """At alpha != rank each module's alpha / rank is peft's scale, the rule ComfyUI's and
    A1111's LoHa / LoKr loaders apply (LyCORIS 4.1.3's own merge squares it, so its numeric
    check above runs at alpha = rank); a LoKr whose factors are both whole carries the scale
    in w1 (those tools then take scale 1)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = tiny_run[0] / "export"
    module = perturbed_module(tmp_path, base, demo_shards, adapter, "model.backbone.adapter.r=4")
    export_kohya(module, tmp_path / "kohya")
    state = load_file(tmp_path / "kohya" / "lora.safetensors")
    layers = {f"lora_unet_{n.replace('.', '_')}": m for n, m in module.trainable.named_modules()
              if isinstance(m, BaseTunerLayer)}  # fmt: skip
    for name, layer in layers.items():
        scale = layer.scaling["default"]
        weights = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".")[0] == name}
        assert scale == 2.0  # alpha 8, r 4
        if "hada_w1_b" in weights or "lokr_w2_a" in weights:
            rank = weights["hada_w1_b"] if "hada_w1_b" in weights else weights["lokr_w2_b"]
            assert weights["alpha"].item() == scale * rank.shape[0]
        else:  # LoKr with both factors whole
            assert weights["alpha"].item() == 1.0
            torch.testing.assert_close(weights["lokr_w1"], layer.lokr_w1["default"] * scale)


def test_ldm_export_writes_every_format_of_an_adapter_checkpoint(lora_run, tiny_run, tmp_path):
    from train.cli.export import main as ldm_export

    run_dir, _ = lora_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    formats = (("diffusers-lora", "l", "lora"), ("kohya", "k", "lora_kohya"),
               ("merged", "m", "export/unet"))  # fmt: skip
    for fmt, out, same_as in formats:
        proc = run_cli(ldm_export, ["ldm-export", str(ckpt), str(tmp_path / out), "--format", fmt])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        sub = "unet" if fmt == "merged" else ""
        got = load_file(next((tmp_path / out / sub).glob("*.safetensors")))
        want = load_file(next((run_dir / same_as).glob("*.safetensors")))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    full = tiny_run[0] / "checkpoints" / "last.ckpt"
    proc = run_cli(ldm_export, ["ldm-export", str(full), str(tmp_path / "x"), "--format",
                                "diffusers-lora"])  # fmt: skip
    assert proc.returncode != 0
    assert "not an adapter run's checkpoint" in proc.stderr and not (tmp_path / "x").exists()


def test_target_modules_the_model_lacks_are_refused_naming_the_setting(
    tiny_run, demo_shards, tmp_path
) -> None:
    from hydra.utils import instantiate

    cfg = compose(lora_overrides(tmp_path, tiny_run[0] / "export", demo_shards,
                                 "model.backbone.adapter.target_modules=[to_qkv]"))  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        try:
            instantiate(cfg.model)
        except Exception as e:  # Hydra wraps what a constructor raises
            raise e.__cause__ or e from None
    message = str(refused.value)
    assert "model.backbone.adapter.target_modules=['to_qkv'] matches no module" in message
    assert "to_q" in message and "to_out.0" in message  # what it could have named


def test_a_lora_run_without_a_base_is_refused_naming_it(tmp_path, demo_shards) -> None:
    from train.cli.train import main

    args = [f"paths.root={tmp_path}", "experiment=lora", f"data.urls={demo_shards}"]
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode != 0
    assert "model.base" in proc.stderr, proc.stderr


def test_ldm_sample_with_the_lora_matches_the_merged_export(lora_run, tmp_path) -> None:
    """--lora at scale 1 (either format) gives the merged export's images; scale 0 the base's;
    a LoRA for another family's denoiser (transformer keys) is refused naming the flag."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from train.cli.sample import main as ldm_sample

    run_dir, base = lora_run

    def sample(export: Path, *args: str) -> np.ndarray:
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        argv = ["ldm-sample", str(export), "--prompt", "a red circle at the top left on a white "
                "background", "--steps", "3", "--out", str(out), *args]  # fmt: skip
        proc = run_cli(ldm_sample, argv)
        assert proc.returncode == 0, proc.stderr
        with Image.open(out) as image:
            return np.asarray(image.convert("RGB")).astype(int)

    merged, plain = sample(run_dir / "export"), sample(base)
    for folder in ("lora", "lora_kohya"):
        # The merged weights round differently (1e-5 on the UNet): a level or two in 255.
        assert np.abs(sample(base, "--lora", str(run_dir / folder)) - merged).max() <= 2, folder
    assert np.abs(merged - plain).max() > 8  # the LoRA changes the images
    assert np.array_equal(sample(base, "--lora", str(run_dir / "lora"), "--lora-scale", "0"), plain)

    other = tmp_path / "other"
    other.mkdir()
    state = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    save_file({k.replace("unet.", "transformer.", 1): v for k, v in state.items()},
              str(other / "pytorch_lora_weights.safetensors"))  # fmt: skip
    proc = run_cli(ldm_sample, ["ldm-sample", str(base), "--prompt", "x", "--lora", str(other),
                                "--out", str(tmp_path / "no.png")])  # fmt: skip
    assert proc.returncode != 0 and not (tmp_path / "no.png").exists()
    assert f"--lora {other} holds no weights for {base}'s UNet2DConditionModel" in proc.stderr


@pytest.mark.parametrize(("adapter", "strategy"), [("dora", "fsdp"), ("loha", "fsdp"),
                                                   ("loha", "fsdp2")])  # fmt: skip
def test_an_adapter_fsdp_cannot_shard_is_refused_before_training(
    adapter, strategy, tiny_run, demo_shards, tmp_path
) -> None:
    from train.cli.train import main

    args = lora_overrides(tmp_path, tiny_run[0] / "export", demo_shards, f"strategy={strategy}",
                          "trainer.devices=2", f"model/backbone/adapter={adapter}")  # fmt: skip
    if adapter == "loha":  # its own rank and alpha keys
        args = [a for a in args if not a.startswith("model.backbone.adapter.")]
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 2, proc.stderr
    kind = {"dora": "DoRA (LoraConfig use_dora)", "loha": "LoHaConfig"}[adapter]
    name = strategy.upper()
    assert f"model.backbone.adapter is {kind} and the strategy is {name}, which shards a LoRA " \
        f"only: use model/backbone/adapter=lora with strategy={strategy}, or keep the " \
        "adapter with strategy=deepspeed_zero3" in proc.stderr  # fmt: skip
    # Refused before anything trains: the run folder holds only the log of the refusal.
    assert [p.name for p in (tmp_path / "runs" / "lora").iterdir()] == ["train.log"]


def test_the_eval_watchers_pipeline_of_an_adapter_checkpoint_is_the_merged_export(lora_run):
    """`ldm-eval --watch` scores an adapter checkpoint through `checkpoint_pipeline`: the base
    from model.base with the checkpoint's EMA adapter merged, the same UNet as the export."""
    from train.cli.export import checkpoint_pipeline, load_checkpoint

    run_dir, _ = lora_run
    pipe = checkpoint_pipeline(load_checkpoint(run_dir / "checkpoints" / "last.ckpt"))
    got = pipe.unet.state_dict()
    want = UNet2DConditionModel.from_pretrained(run_dir / "export", subfolder="unet").state_dict()
    assert got.keys() == want.keys() and not adapters.has_adapter(pipe.unet)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
