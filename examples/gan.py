"""A GAN on a ring of eight Gaussians: two models and two optimizers in one state, one custom step.

The generator is the state's own model (`params`, `opt_state`, `tx`); the discriminator is a
second `TrainState` held in a field of the first. States are pytrees, so the nested one is
compiled, checkpointed and restored with the rest. The step updates the discriminator, then
the generator against the updated discriminator, and `ftrain.compile_step` compiles the whole
thing as one region, as `make_train_step` does for the usual case.

    python examples/gan.py
    python examples/gan.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim


@dataclasses.dataclass(frozen=True, eq=False)
class GANState(ftrain.TrainState):
    """The generator's state, plus the discriminator's (its params, optimizer state and optimizer)."""

    disc: ftrain.TrainState = None


def mlp(n_in: int, width: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n_out))


def ring(key: torch.Tensor, n: int, modes: int = 8, radius: float = 2.0, std: float = 0.05) -> torch.Tensor:
    """``n`` points from a mixture of ``modes`` Gaussians evenly spaced on a circle."""
    k_mode, k_noise = ftrain.random.split(key)
    angle = ftrain.random.randint(k_mode, 0, modes, (n,)).float() * (2 * math.pi / modes)
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + std * ftrain.random.normal(k_noise, (n, 2))


def make_gan_step(latent: int):
    def gan_step(state: GANState, batch: tuple[torch.Tensor]) -> tuple[GANState, dict[str, torch.Tensor]]:
        (real,) = batch
        k_d, k_g = ftrain.random.split(ftrain.random.fold_in(state.key, state.step))
        disc = state.disc

        # Discriminator: real -> 1, fake -> 0. The fakes are constants here (no generator gradient).
        fake, _ = state.apply_fn(state.params, state.buffers, ftrain.random.normal(k_d, (real.shape[0], latent)))

        def d_loss_fn(d_params):
            logits_real, _ = disc.apply_fn(d_params, disc.buffers, real)
            logits_fake, _ = disc.apply_fn(d_params, disc.buffers, fake)
            ones, zeros = torch.ones_like(logits_real), torch.zeros_like(logits_fake)
            return F.binary_cross_entropy_with_logits(logits_real, ones) + F.binary_cross_entropy_with_logits(
                logits_fake, zeros
            )

        d_grads, d_loss = torch.func.grad_and_value(d_loss_fn)(disc.params)
        disc = disc.apply_gradients(d_grads)

        # Generator: make the updated discriminator say 1 (the non-saturating loss).
        z = ftrain.random.normal(k_g, (real.shape[0], latent))

        def g_loss_fn(g_params):
            fake, _ = state.apply_fn(g_params, state.buffers, z)
            logits, _ = disc.apply_fn(disc.params, disc.buffers, fake)
            return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

        g_grads, g_loss = torch.func.grad_and_value(g_loss_fn)(state.params)
        return state.apply_gradients(g_grads, disc=disc), {"loss": g_loss + d_loss, "g_loss": g_loss, "d_loss": d_loss}

    return gan_step


def mode_coverage(samples: torch.Tensor, modes: int = 8, radius: float = 2.0, std: float = 0.05) -> tuple[int, float]:
    """(modes hit by >= 2% of the samples, fraction of samples within 4 std of a mode)."""
    angle = torch.arange(modes) * (2 * math.pi / modes)
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    dist = torch.cdist(samples, centers)
    nearest = dist.argmin(1)
    good = dist.min(1).values < 4 * std
    counts = torch.bincount(nearest[good], minlength=modes)
    return int((counts >= 0.02 * len(samples)).sum()), float(good.float().mean())


def main(argv: list[str] | None = None) -> tuple[int, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="run the step eagerly")
    parser.add_argument("--smoke", action="store_true", help="a few steps, tiny models, eager")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.width, args.no_compile = 5, 16, True
    torch.manual_seed(args.seed)
    k_data, k_state, k_eval = ftrain.random.split(ftrain.random.key(args.seed), 3)

    data = torch.utils.data.TensorDataset(ring(k_data, 16_384))
    loader = ftrain.data.Loader(data, args.batch_size, seed=args.seed)

    adam = optim.adam(args.lr, b1=0.5, b2=0.999)  # the usual GAN betas
    disc = ftrain.TrainState.create(mlp(2, args.width, 1), adam)
    state = GANState.create(mlp(args.latent, args.width, 2), adam, key=k_state, disc=disc)

    step = make_gan_step(args.latent)
    train_step = step if args.no_compile else ftrain.compile_step(step)
    state = ftrain.fit(state, train_step, loader, num_steps=args.steps, log=ftrain.writers.Console())

    with torch.no_grad():
        samples, _ = state.apply_fn(state.params, state.buffers, ftrain.random.normal(k_eval, (4096, args.latent)))
    hit, good = mode_coverage(samples)
    print(f"generator covers {hit} of 8 modes; {good:.0%} of its samples lie within 4 std of a mode")
    return hit, good


if __name__ == "__main__":
    main()
