"""The noise schedules, from diffusers: the forward process training uses and the sampler
(DDIM, PNDM or DPM-Solver++) over the same schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.config import ExperimentConfig

if TYPE_CHECKING:
    from diffusers import DDPMScheduler


def _scheduler_kwargs(config: ExperimentConfig) -> dict:
    d = config.diffusion
    return dict(
        num_train_timesteps=d.num_train_timesteps,
        beta_schedule=d.beta_schedule,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        prediction_type=d.prediction_type,
    )


def build_noise_scheduler(config: ExperimentConfig) -> DDPMScheduler:
    """The forward process used for training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        **_scheduler_kwargs(config),
        rescale_betas_zero_snr=config.diffusion.rescale_zero_terminal_snr,
    )


def build_sampling_scheduler(config: ExperimentConfig):
    """The configured sampler (DDIM, PNDM or DPM-Solver++) over the training schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    kwargs = _scheduler_kwargs(config)
    if config.diffusion.rescale_zero_terminal_snr:
        # Trailing timesteps start sampling at the pure-noise step the rescale created.
        kwargs.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    sampler = config.sample.sampler
    if sampler == "ddim":
        return DDIMScheduler(**kwargs, clip_sample=False, set_alpha_to_one=False)
    if sampler == "pndm":
        return PNDMScheduler(**kwargs, skip_prk_steps=True, set_alpha_to_one=False)
    return DPMSolverMultistepScheduler(**kwargs, algorithm_type="dpmsolver++", solver_order=2)
