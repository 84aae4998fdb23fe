"""Lead check: a classifier that distinguishes the model's lead from the other recorded leads.

A beat recorded on another lead (V1 where the model learnt MLII, for example) has a plausible
shape, amplitude and spectrum, so the flow's statistics hardly tell it from a real beat of an
unusual patient. The training records themselves show what the other leads look like: most
WFDB records hold two or more leads, and the model uses only its configured ones. Export fits
a small network on z-normalised beats, the model's lead against every other lead of the
training records at the same beat positions, and its logit becomes the ``lead_match``
statistic of the pertinence score (``appliance.scoring``): low means "looks like another
lead". Beats of the other leads come from ``appliance.jobs.read_other_lead_beats``.

The check covers single-lead models. A model of several leads, or training records that give
fewer than ``MIN_OTHER_LEAD_BEATS`` beats of other leads, leave it out, and ``lead_match`` is
then 0 for every beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from appliance.scoring import z_normalise

HIDDEN_UNITS = 64
# On lead V1 of unseen MIT-BIH patients, 20 epochs on up to 50,000 beats a side separated better
# than 5 epochs on 20,000 (docs/benchmarks.md, section Gate).
EPOCHS = 20
BATCH_BEATS = 256
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
# Beats of each side the network is fitted on, drawn at random above this count.
MAX_BEATS_PER_SIDE = 50_000
# Fewer other-lead beats than this leave the check out.
# NOTE: 500 is a guess at the least data that generalises to new patients; it was not measured.
MIN_OTHER_LEAD_BEATS = 500


@dataclass
class LeadCheck:
    """A one-hidden-layer network on z-normalised beats; its output is a logit.

    Attributes:
        hidden_weight: Shape (HIDDEN_UNITS, leads * window_samples).
        hidden_bias: Shape (HIDDEN_UNITS,).
        output_weight: Shape (HIDDEN_UNITS,).
        output_bias: Shape (), the logit's offset.
    """

    hidden_weight: np.ndarray
    hidden_bias: np.ndarray
    output_weight: np.ndarray
    output_bias: np.ndarray

    def logit(self, beats: np.ndarray) -> np.ndarray:
        """Return the log-odds that each beat comes from the model's lead.

        Arguments:
            beats: Beats in any unit, shape (beats, leads, window_samples); each is
                z-normalised first, so amplitude and offset do not matter.

        Returns:
            Logits, shape (beats,), float64; a constant beat gives the network's value at 0.
        """
        vectors = z_normalise(beats)
        if vectors.shape[1] != self.hidden_weight.shape[1]:
            raise ValueError(
                f"lead check expects beats of {self.hidden_weight.shape[1]} values, got "
                f"{vectors.shape[1]}"
            )
        hidden = np.maximum(vectors @ self.hidden_weight.T + self.hidden_bias, 0.0)
        return np.asarray(hidden @ self.output_weight + self.output_bias, dtype=np.float64)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return arrays for ``numpy.savez``."""
        return {
            "hidden_weight": self.hidden_weight,
            "hidden_bias": self.hidden_bias,
            "output_weight": self.output_weight,
            "output_bias": self.output_bias,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LeadCheck:
        """Rebuild from ``to_arrays`` output."""
        return cls(
            hidden_weight=np.asarray(arrays["hidden_weight"], dtype=np.float64),
            hidden_bias=np.asarray(arrays["hidden_bias"], dtype=np.float64),
            output_weight=np.asarray(arrays["output_weight"], dtype=np.float64),
            output_bias=np.asarray(arrays["output_bias"], dtype=np.float64),
        )

    @classmethod
    def fit(cls, model_lead: np.ndarray, other_leads: np.ndarray, seed: int) -> LeadCheck:
        """Fit the network to tell beats of the model's lead from beats of other leads.

        Arguments:
            model_lead: Beats of the model's lead, shape (beats, leads, window_samples).
            other_leads: Beats of other leads, same window, shape (others, leads,
                window_samples).
            seed: Seed of the beat sample, the initial weights and the batch order.

        Returns:
            The fitted check; the same inputs and seed give the same weights.
        """
        # Imported here so that the server, which only scores, does not load PyTorch.
        import torch
        from torch import nn

        rng = np.random.default_rng(seed)
        sides = []
        for beats in (model_lead, other_leads):
            if beats.shape[0] > MAX_BEATS_PER_SIDE:
                beats = beats[np.sort(rng.choice(beats.shape[0], MAX_BEATS_PER_SIDE, False))]
            sides.append(torch.from_numpy(z_normalise(beats).astype(np.float32)))
        inputs = torch.cat(sides)
        targets = torch.cat([torch.ones(sides[0].shape[0]), torch.zeros(sides[1].shape[0])])
        # Each side weighs half of the loss, whatever its count.
        weights = torch.cat(
            [
                torch.full((sides[0].shape[0],), 0.5 * inputs.shape[0] / sides[0].shape[0]),
                torch.full((sides[1].shape[0],), 0.5 * inputs.shape[0] / sides[1].shape[0]),
            ]
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = nn.Sequential(
                nn.Linear(inputs.shape[1], HIDDEN_UNITS), nn.ReLU(), nn.Linear(HIDDEN_UNITS, 1)
            )
        optimiser = torch.optim.AdamW(
            network.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
        )
        for _ in range(EPOCHS):
            order = torch.randperm(inputs.shape[0], generator=generator)
            for start in range(0, inputs.shape[0], BATCH_BEATS):
                batch = order[start : start + BATCH_BEATS]
                loss = nn.functional.binary_cross_entropy_with_logits(
                    network(inputs[batch]).squeeze(1), targets[batch], weight=weights[batch]
                )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        hidden, output = network[0], network[2]
        assert isinstance(hidden, nn.Linear)
        assert isinstance(output, nn.Linear)
        return cls(
            hidden_weight=hidden.weight.detach().double().numpy(),
            hidden_bias=hidden.bias.detach().double().numpy(),
            output_weight=output.weight.detach().double().numpy()[0],
            output_bias=output.bias.detach().double().numpy()[0],
        )
