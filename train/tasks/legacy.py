"""Checkpoints written before the parts spec and the backbone/conditioner/objective seams.

Their saved config builds `train.ldm_module.LatentDiffusion(unet, vae, text_encoder,
noise_scheduler, ...)` and their weights are named `unet.*`. `upgrade` rewrites both into
today's layout, keeping the order in which the config builds its parts, so random-init frozen
parts (rebuilt from the saved seed) come out with the same weights as in that run.
"""

from __future__ import annotations

from typing import Any

OLD_TASK = "train.ldm_module.LatentDiffusion"
RENAMED = {
    "train.text.FrozenTextEncoder": "train.models.conditioners.text.FrozenTextEncoder",
    "train.autoencoder_module.AutoencoderTraining": "train.tasks.autoencoder.AutoencoderTraining",
}


def upgrade(ckpt: dict) -> dict:
    """`ckpt` with its config and weights in today's layout (in place; returned)."""
    model = ckpt["ldm_config"].get("model", {})
    if model.get("_target_") in RENAMED:
        model["_target_"] = RENAMED[model["_target_"]]
    if model.get("_target_") != OLD_TASK:
        return ckpt
    ckpt["ldm_config"]["model"] = upgrade_model_config(model)
    ckpt["state_dict"] = {
        ("backbone.model." + k[len("unet.") :] if k.startswith("unet.") else k): v
        for k, v in ckpt["state_dict"].items()
    }
    return ckpt


def upgrade_model_config(old: dict[str, Any]) -> dict[str, Any]:
    """The old LatentDiffusion node as today's: backbone, vae, conditioner first, in the order
    the old one built unet, vae, text_encoder."""
    text = dict(old["text_encoder"])
    text["_target_"] = RENAMED.get(text["_target_"], text["_target_"])
    new: dict[str, Any] = {
        "_target_": "train.tasks.latent_diffusion.LatentDiffusion",
        "backbone": {
            "_target_": "train.models.backbones.unet.UNetBackbone",
            "model": old["unet"],
            "gradient_checkpointing": bool(old.get("gradient_checkpointing", False)),
        },
        "vae": old["vae"],
        "conditioner": text,
        "objective": {
            "_target_": "train.objectives.ddpm.DDPM",
            "scheduler": old["noise_scheduler"],
            "snr_gamma": old.get("snr_gamma"),
        },
    }
    for key in ("optimizer", "lr_scheduler", "caption_dropout", "noise_seed"):
        if key in old:
            new[key] = old[key]
    return new
