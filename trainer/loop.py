"""The training loop: micro steps under one DeepSpeed engine, checkpoints, progress.

Noise, timesteps and VAE samples of micro step m on rank r come from a generator seeded
by (seed, m, r), and the data order is a function of (seed, m): a run resumed at any
step sees exactly what the uninterrupted run saw.
"""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from trainer import checkpoint
from trainer.conditioning import PromptEmbeddings, encode_prompt
from trainer.config import TrainerConfig, recipe
from trainer.data import Batch, DreamBoothData, derived_seed
from trainer.distributed import Runtime, any_ranks, barrier, mean_over_ranks
from trainer.engine import DTYPES, group_learning_rates
from trainer.metrics import PHASE_CHECKPOINTING, PHASE_TRAINING
from trainer.latents import LatentEncoder, batch_keys
from trainer.objective import LossTerms, add_noise, dreambooth_loss, min_snr_weights
from trainer.progress import Throughput, report_event, report_step

EVAL_SEED = 8191
EVAL_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # batches consumed (data position)
    samples: int = 0  # images trained on, all ranks, instance and class

    def state_dict(self) -> dict:
        return {checkpoint.STEP_KEY: self.step, checkpoint.MICRO_STEP_KEY: self.micro_step, checkpoint.SAMPLES_KEY: self.samples}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TrainState":
        return cls(step=state[checkpoint.STEP_KEY], micro_step=state[checkpoint.MICRO_STEP_KEY], samples=state[checkpoint.SAMPLES_KEY])


@dataclass
class PreparedBatch:
    """A batch and the cache keys of its images, both computed ahead of the step."""
    batch: Batch
    latent_keys: list[bytes] | None


class BatchPrefetcher:
    """Prepares the batch of micro step m+1 on a worker thread while step m trains:
    image cropping, flipping and hashing leave the training thread. Batches are a pure
    function of the micro step, so prefetching changes nothing but the timing."""

    def __init__(self, prepare: Callable[[int], PreparedBatch], *, enabled: bool):
        self.prepare = prepare
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if enabled else None
        self.pending: tuple[int, Future] | None = None

    def get(self, micro_step: int) -> PreparedBatch:
        if self.executor is None:
            return self.prepare(micro_step)
        if self.pending is not None and self.pending[0] == micro_step:
            prepared = self.pending[1].result()
        else:
            prepared = self.prepare(micro_step)
        self.pending = (micro_step + 1, self.executor.submit(self.prepare, micro_step + 1))
        return prepared

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


class DenoisingStep:
    """Turns a batch into losses through the engine; the frozen VAE (and text encoder,
    when it is not trained) run beside the engine with fp32 weights."""

    def __init__(self, engine, components, config: TrainerConfig, runtime: Runtime, precision: str):
        self.engine = engine
        self.components = components
        self.config = config
        self.runtime = runtime
        self.dtype = DTYPES[precision]
        self._embeddings: dict[tuple, PromptEmbeddings] = {}
        # A random crop makes nearly every view a new image: nothing to reuse.
        self.cache_latents = config.training.cache_latents and config.data.center_crop
        self.encoder = LatentEncoder(components.vae, cache=self.cache_latents)

    def _autocast(self):
        if self.runtime.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", self.dtype)
        return contextlib.nullcontext()

    def _frozen_embeddings(self, input_ids: torch.Tensor) -> PromptEmbeddings:
        # Frozen encoders map a prompt to the same tensors every step: compute each once.
        rows = []
        for ids in input_ids:
            key = tuple(ids.flatten().tolist())
            if key not in self._embeddings:
                with torch.no_grad(), self._autocast():
                    self._embeddings[key] = encode_prompt(self.components.text_encoders, ids[None].to(self.runtime.device))
            rows.append(self._embeddings[key])
        pooled = None if rows[0].pooled is None else torch.cat([row.pooled for row in rows])
        return PromptEmbeddings(torch.cat([row.hidden_states for row in rows]), pooled).to(self.dtype)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch) -> torch.Tensor:
        noisy, device = noisy.to(self.dtype), self.runtime.device
        time_ids = batch.time_ids.to(device) if self.components.is_sdxl else None
        if self.config.training.train_text_encoder:
            return self.engine(noisy, timesteps, input_ids=batch.input_ids.to(device), time_ids=time_ids)
        embeddings = self._frozen_embeddings(batch.input_ids)
        return self.engine(noisy, timesteps, encoder_hidden_states=embeddings.hidden_states,
                           pooled_embeds=embeddings.pooled, time_ids=time_ids)

    def prepare(self, batch: Batch) -> PreparedBatch:
        """What can be done before the step, off the training thread."""
        return PreparedBatch(batch, batch_keys(batch.pixel_values) if self.cache_latents else None)

    def latents(self, batch: Batch, generator: torch.Generator, keys: list[bytes] | None = None) -> torch.Tensor:
        # SDXL's VAE overflows in fp16 (generation.py): it encodes in fp32, as diffusers' SDXL script does.
        with contextlib.nullcontext() if self.components.is_sdxl else self._autocast():
            return self.encoder.latents(batch.pixel_values, generator, keys)

    def losses(self, batch: Batch | PreparedBatch, micro_step: int) -> LossTerms:
        prepared = batch if isinstance(batch, PreparedBatch) else self.prepare(batch)
        generator = torch.Generator().manual_seed(derived_seed(self.config.training.seed, micro_step, self.runtime.rank))
        latents = self.latents(prepared.batch, generator, prepared.latent_keys)
        training, scheduler, num_instance = self.config.training, self.components.noise_scheduler, prepared.batch.num_instance
        noised = add_noise(latents, scheduler, generator, noise_offset=training.noise_offset)
        prediction = self.predict(noised.noisy, noised.timesteps, prepared.batch)
        weights = None
        if training.snr_gamma is not None:
            weights = min_snr_weights(scheduler, noised.timesteps[:num_instance], training.snr_gamma)
        return dreambooth_loss(prediction, noised.target, num_instance, training.prior_loss_weight, weights)

    @torch.no_grad()
    def instance_eval_loss(self, batch: Batch) -> float:
        """Denoising loss on every instance image at fixed noise and timesteps: falls
        as the model learns its subject. Collective under ZeRO-3 (all ranks call it).
        Eager with training.compile: it runs before the first step, under no_grad and at
        another batch size, and compiled it would cost a graph of its own and make dynamo
        recompile the training step with a dynamic batch dimension."""
        generator = torch.Generator().manual_seed(EVAL_SEED)
        latents = self.latents(batch, generator)
        total = 0.0
        with eager():
            for timestep in EVAL_TIMESTEPS:
                timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long)
                noised = add_noise(latents, self.components.noise_scheduler, generator, timesteps=timesteps)
                prediction = self.predict(noised.noisy, noised.timesteps, batch)
                total += dreambooth_loss(prediction, noised.target, batch.num_instance, 0.0).instance_loss.item()
        return total / len(EVAL_TIMESTEPS)


def eager() -> contextlib.AbstractContextManager:
    """Compiled modules run as plain ones inside it. torch.compiler.set_stance is torch
    2.6+ (pyproject allows 2.4); before it the evaluation stays compiled, as it was."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


class LossScaleExhausted(Exception):
    """fp16 gradients overflowed although the loss scale was already at its minimum."""


# What DeepSpeed's DynamicLossScaler (ZeRO 1-3, DeepSpeed 0.19) raises, as a bare
# Exception, when fp16 gradients overflow at min_loss_scale. Every rank raises it in the
# same step: the overflow flag is reduced over the ranks first.
DEEPSPEED_SCALE_AT_MINIMUM = "Current loss scale already at minimum"


def step_optimizer(engine) -> None:
    """engine.step(), raising LossScaleExhausted for an fp16 overflow at the minimum loss
    scale: under ZeRO 1-3 DeepSpeed's own exception (else a traceback, exit 1, and gang
    restarts that fail the same way), under ZeRO 0 a step skipped at the minimum (its
    FP16 optimizers do not raise: they would skip every step to the end and export the
    weights unchanged)."""
    scaler = getattr(engine.optimizer, "loss_scale_config", None)  # ZeRO 0's FP16 optimizers only
    at_minimum = (scaler is not None and scaler.dynamic_loss_scale and engine.is_gradient_accumulation_boundary()
                  and scaler.cur_scale <= scaler.min_loss_scale)
    try:
        engine.step()
    except Exception as error:
        if type(error) is Exception and str(error).startswith(DEEPSPEED_SCALE_AT_MINIMUM):
            raise LossScaleExhausted() from error
        raise
    if at_minimum and not engine.was_step_applied():
        raise LossScaleExhausted()


def train_micro_step(engine, denoising_step: DenoisingStep, prepared: PreparedBatch, micro_step: int) -> LossTerms:
    """Forward, backward and (at an accumulation boundary, DeepSpeed decides) the update."""
    terms = denoising_step.losses(prepared, micro_step)
    engine.backward(terms.loss)
    step_optimizer(engine)
    return terms


def save_checkpoint(config: TrainerConfig, engine, runtime: Runtime, state: TrainState, metrics=None) -> None:
    """Collective: a checkpoint of the current step, timed and reported."""
    started = time.monotonic()
    if metrics is not None:
        metrics.set_phase(PHASE_CHECKPOINTING)
    checkpoint.save(engine, config.checkpoint, runtime, step=state.step,
                    state={**state.state_dict(), checkpoint.RECIPE_KEY: recipe(config)}, lora=config.lora)
    seconds = time.monotonic() - started
    if metrics is not None:
        metrics.record_checkpoint(step=state.step, seconds=seconds)
        metrics.set_phase(PHASE_TRAINING)
    if runtime.is_main:
        report_event("checkpoint saved", json_format=config.logging.format == "json",
                     step=state.step, seconds=round(seconds, 3))


class TrainingDiverged(Exception):
    """The loss stayed NaN or infinite: training on would only write broken weights."""


def stop_diverged(config: TrainerConfig, runtime: Runtime, first: int, last: int) -> None:
    """Collective. The checkpoint of the step before `first` holds the weights that gave
    the first bad loss: rank 0 retracts it, and the run ends with what to change (rank
    0's message is the one printed: it moved the folders)."""
    training = config.training
    retracted = config.checkpoint.dir / checkpoint.step_folder_name(first - 1)
    latest = None
    if runtime.is_main:
        was_saved = retracted.is_dir()
        latest = checkpoint.retract(config.checkpoint.dir, first - 1)
        retracted = retracted if was_saved else None
    barrier()
    limit = training.max_nonfinite_steps
    why = f"training.max_nonfinite_steps = {limit}" if last - first + 1 >= limit else "the last step: nothing to export"
    parts = [f"training diverged: the loss was NaN or infinite on every step from step {first} to step {last} ({why})"]
    if retracted is not None:
        parts.append(f"checkpoint {retracted.name}, whose weights gave the first one, was renamed "
                     f"{checkpoint.DIVERGED_PREFIX}{retracted.name}")
    parts.append(f"the next run resumes from {latest.name}" if latest is not None
                 else "no checkpoint from before it is left, so the next run starts at step 0")
    clipping = (f"or training.max_grad_norm (now {training.max_grad_norm:g})" if training.max_grad_norm > 0
                else "or clip gradients with training.max_grad_norm (now 0: off; e.g. 1.0)")
    raise TrainingDiverged("; ".join(parts) + f". Lower training.learning_rate (now {rate_now(config, runtime)}) "
                           f"{clipping}, and run again")


def rate_now(config: TrainerConfig, runtime: Runtime) -> str:
    """training.learning_rate as a message names it: with the rate it was scaled to, if it was."""
    rate = config.training.learning_rate
    if not config.training.scale_lr:
        return f"{rate:g}"
    return f"{rate:g}, {group_learning_rates(config, runtime.world_size)[0]:g} as training.scale_lr scaled it"


def stop_scale_exhausted(config: TrainerConfig, runtime: Runtime, step: int) -> None:
    """The fp16 loss scale cannot go lower: the gradients overflow fp16 even unscaled.
    The checkpoints stay: an overflowing step is skipped, not applied, so no checkpoint
    holds weights that the overflow broke (a NaN loss's do: stop_diverged retracts them)."""
    kept = checkpoint.complete_checkpoints(config.checkpoint.dir)
    resume = (f"the checkpoints are kept and the next run resumes from {kept[0].name}" if kept
              else "no checkpoint was written, so the next run starts at step 0")
    raise TrainingDiverged(
        f"training diverged: at step {step} the fp16 gradients overflowed although the loss scale was already at its "
        f"minimum, so no step could be applied; {resume}. Lower training.learning_rate (now {rate_now(config, runtime)}), "
        f"or set training.precision: bf16 where the GPU supports it (A100, H100 and newer; bf16 needs no loss "
        f"scale), and run again")


def train(
    config: TrainerConfig,
    engine,
    denoising_step: DenoisingStep,
    data: DreamBoothData,
    runtime: Runtime,
    state: TrainState,
    *,
    stop_requested,
    on_step=None,
    after_step=None,
    metrics=None,
) -> TrainState:
    """Runs until max_steps, or until a stop is requested on any rank (then returns
    early after a checkpoint). `on_step(values)` receives each step's figures;
    `after_step(step)` runs on every rank after each step and its checkpoint and returns
    true when it paused training; `metrics` (a TrainerMetrics) times steps and checkpoints."""
    training = config.training
    throughput = Throughput()
    throughput.mark(state.samples)
    samples_per_micro_step = runtime.world_size * training.batch_size * (2 if data.class_ids is not None else 1)
    # Not closed on an exception: the worker finishes its one batch and the process exits.
    batches = BatchPrefetcher(lambda micro_step: denoising_step.prepare(data.batch(micro_step)),
                              enabled=training.prefetch_batches)
    engine.train()
    first_nonfinite: int | None = None  # first step of the current run of NaN/Inf losses
    while state.step < training.max_steps:
        step_started = time.monotonic()
        # The rate this step trains at: after it, the schedule has moved on to the next one's.
        learning_rate = engine.get_lr()[0]
        sums = None
        for _ in range(training.gradient_accumulation):
            try:
                terms = train_micro_step(engine, denoising_step, batches.get(state.micro_step), state.micro_step)
            except LossScaleExhausted:
                batches.close()
                stop_scale_exhausted(config, runtime, state.step + 1)
            state.micro_step += 1
            state.samples += samples_per_micro_step
            # Summed where the losses are: an .item() per term and micro-step would make the
            # host wait for the GPU three times per micro-step instead of once per step.
            prior = terms.prior_loss if terms.prior_loss is not None else torch.zeros_like(terms.loss)
            micro = torch.stack([terms.loss.detach(), terms.instance_loss.detach(), prior.detach()]).double()
            sums = micro if sums is None else sums + micro
        state.step += 1
        throughput.mark(state.samples)
        if metrics is not None:
            metrics.record_step(step=state.step, samples=state.samples, seconds=time.monotonic() - step_started, engine=engine)
        if state.step % config.logging.every_steps == 0 or state.step == training.max_steps:
            loss, instance_loss, prior_loss = mean_over_ranks((sums / training.gradient_accumulation).tolist())
            values = dict(
                step=state.step, max_steps=training.max_steps, loss=loss, instance_loss=instance_loss,
                prior_loss=prior_loss if data.class_ids is not None else None,
                learning_rate=learning_rate, samples_per_second=throughput.samples_per_second,
                eta_seconds=throughput.eta_seconds(training.max_steps - state.step), samples=state.samples,
            )
            if runtime.is_main:
                report_step(values, json_format=config.logging.format == "json")
            if on_step is not None:
                on_step(values)
        # A NaN loss, not an fp16 overflow DeepSpeed skipped: those are routine while the loss
        # scale settles (from 2**16 over the first steps, and after each growth) and apply no
        # update, so their checkpoint is sound; the scale's minimum is their limit (step_optimizer).
        stopping, nonfinite = any_ranks(stop_requested(), not math.isfinite(sums[0].item()))
        if not nonfinite:
            first_nonfinite = None
        elif first_nonfinite is None:
            first_nonfinite = state.step
        watching = training.max_nonfinite_steps > 0
        # Weights that gave a NaN loss are not worth a checkpoint: retention would delete good ones for them.
        trusted = not (watching and nonfinite)
        if trusted and (stopping or state.step % config.checkpoint.every_steps == 0 or state.step == training.max_steps):
            save_checkpoint(config, engine, runtime, state, metrics)
            throughput.reset()  # the pause is not training throughput
            throughput.mark(state.samples)
        if stopping:
            break
        if watching and first_nonfinite is not None and (
                state.step - first_nonfinite + 1 >= training.max_nonfinite_steps or state.step == training.max_steps):
            batches.close()
            stop_diverged(config, runtime, first_nonfinite, state.step)
        if after_step is not None and after_step(state.step):
            throughput.reset()  # sampling is not training throughput either
            throughput.mark(state.samples)
    batches.close()
    return state
