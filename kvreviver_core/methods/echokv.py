"""``echokv``: keep the K/V of part of the heads and rebuild the others with a small trained linear network.

EchoKV (arXiv 2603.22910). The model's weights are never changed: the full cache is always one ``make_cache("full")``
away, and at a budget of 1.0 this method itself keeps every head exactly.

Which heads are kept (:class:`EchoPlan`, fixed at calibration): the KV heads of a layer are cut into groups of S
consecutive heads (``group_size``). In each group, layer l keeps c_l heads, spread evenly over the layers so that a
fraction ``keep`` of all heads is kept; the kept heads rotate through the group from one layer to the next, so a
dropped head usually has the same head of a neighbouring layer among its inputs.

Reconstruction: a dropped head of group g in layer l is an affine function of the kept heads of group g in the m
layers ``l-m+1 .. l`` (``local_size`` m): within a layer (intra-layer similarity, group size S) and across layers
(inter-layer similarity, local input size m). Keys enter and leave in the unrotated (pre-RoPE) frame, so one map
holds at every position. One matrix per (layer, K or V, group). A network reads only heads that are stored exactly,
so errors never compound from layer to layer, and every layer trains at once.

Training (:func:`fit_echokv`, through ``kvreviver calibrate --method echokv``): AdamW with a cosine schedule, as in
the paper, in two stages: (1) MSE of the reconstructed K/V; (2) MSE of the attention output of the query heads that
read a dropped head, with the model's true queries. Inputs are standardised and each layer's loss is divided by its
target's variance, so the reported losses are relative errors (1 = no better than predicting the mean).

Budget: the whole cache holds the kept heads' K/V plus the reconstruction weights in use (a head that is kept
exactly needs no weights). The budget is met by the cache as a whole, since layers keep different numbers of
heads (that is how half of SmolLM2's 3 heads per layer is kept), and as a fraction of the full cache at every
step: heads are dropped, not tokens, so the memory grows with the context like the full cache's. What the budget
leaves above ``keep`` goes to keeping dropped heads exactly, worst-reconstructed first (held-out error measured at
calibration). A budget that cannot pay for the kept heads and the weights is a ValueError that says what fits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from os import PathLike

import torch

from kvreviver_core.budget import Budget
from kvreviver_core.calibration import (
    Activations, ProgressFn, RopeFrame, calibrator, load_calibration, relative_error, sequence_positions,
)
from kvreviver_core.methods.base import CompressedLayer, Method, register, tensor_bytes

KINDS = ("k", "v")
STAGE2_QUERIES = 128  # query positions per stage-2 step: attention output on all 512 would cost 4x for little gain


@dataclass(frozen=True)
class EchoPlan:
    """Which heads each layer keeps and what each dropped head is rebuilt from (the same for K and V)."""

    layers: int
    heads: int
    keep: float
    group_size: int
    local_size: int

    def __post_init__(self) -> None:
        if not 0.0 < self.keep < 1.0:
            raise ValueError(f"echokv keep must be in (0, 1), got {self.keep}")
        if self.group_size < 1 or self.heads % self.group_size:
            raise ValueError(f"echokv group size must divide the {self.heads} KV heads, got {self.group_size}")
        if self.local_size < 1:
            raise ValueError(f"echokv local size must be >= 1, got {self.local_size}")
        for layer in range(self.layers):
            for group in range(self.groups):
                if self.outputs(layer, group) and not self.inputs(layer, group):
                    raise ValueError(
                        f"echokv: layer {layer} group {group} has no kept head within {self.local_size} layers; "
                        "raise keep, group size or local size"
                    )

    @property
    def groups(self) -> int:
        return self.heads // self.group_size

    def kept(self) -> torch.Tensor:
        """``(layers, heads)`` bool."""
        return self._kept.clone()

    @functools.cached_property
    def _kept(self) -> torch.Tensor:
        s = self.group_size
        half_up = lambda x: math.floor(x + 0.5)  # noqa: E731  (round half up, never banker's rounding)
        kept = torch.zeros(self.layers, self.heads, dtype=torch.bool)
        for layer in range(self.layers):
            before, after = half_up(layer * self.keep * s), half_up((layer + 1) * self.keep * s)
            for group in range(self.groups):
                for j in range(min(s, after - before)):
                    kept[layer, group * s + (before + j) % s] = True
        return kept

    def inputs(self, layer: int, group: int) -> list[tuple[int, int]]:
        """(layer, head) pairs kept in the window, in the order their features are concatenated."""
        heads = range(group * self.group_size, (group + 1) * self.group_size)
        return [(j, h) for j in range(max(0, layer - self.local_size + 1), layer + 1) for h in heads if self._kept[j, h]]

    def outputs(self, layer: int, group: int) -> list[int]:
        return [h for h in range(group * self.group_size, (group + 1) * self.group_size) if not self._kept[layer, h]]

    def settings(self) -> dict:
        return {"keep": self.keep, "group_size": self.group_size, "local_size": self.local_size}


def default_group_size(heads: int) -> int:
    """The largest divisor of ``heads`` not above 4: the matrices grow with S^2, the similarity gained flattens."""
    return max(s for s in range(1, min(4, heads) + 1) if heads % s == 0)


def _param(kind: str, layer: int, group: int) -> str:
    return f"{kind}.{layer}.{group}"


# -- calibration ----------------------------------------------------------------------------------------------------
def _features(acts: Activations, plan: EchoPlan, rope_cs, kind: str, layer: int, group: int):
    """Network input ``(chunks, T, in)`` and target ``(chunks, T, out)`` for one (kind, layer, group)."""
    source = acts.keys if kind == "k" else acts.values
    frame = (lambda x: RopeFrame.unrotate(x, *rope_cs)) if kind == "k" else (lambda x: x)  # noqa: E731
    x = torch.cat([frame(source[j][:, h]) for j, h in plan.inputs(layer, group)], dim=-1)
    y = torch.cat([frame(source[layer][:, h]) for h in plan.outputs(layer, group)], dim=-1)
    return x, y


class _Trainer:
    """The networks of every (kind, layer, group) being trained, with their data split into train and held-out."""

    def __init__(self, model, acts: Activations, plan: EchoPlan) -> None:
        self.plan = plan
        self.length = acts.shape[2]
        self.train, self.held = acts.split(max(1, acts.keys[0].shape[0] // 8))
        self.rope_cs = RopeFrame.of(model).cos_sin(torch.arange(self.length).view(1, -1), torch.float32)  # (1, T, D)
        self.scaling = [float(block.self_attn.scaling) for block in model.model.layers]
        self.slots = [(kind, layer, group) for kind in KINDS for layer in range(plan.layers)
                      for group in range(plan.groups) if plan.outputs(layer, group)]
        self.layers = sorted({layer for _, layer, _ in self.slots})
        self.data = {part: {s: _features(acts_part, plan, self.rope_cs, *s) for s in self.slots}
                     for part, acts_part in (("train", self.train), ("held", self.held))}
        train = self.data["train"]
        self.mean = {s: train[s][0].mean(dim=(0, 1)) for s in self.slots}
        self.std = {s: train[s][0].std(dim=(0, 1)).clamp_min(1e-6) for s in self.slots}
        self.target_var = {s: train[s][1].var(dim=(0, 1)).mean().clamp_min(1e-12) for s in self.slots}
        self.weight = {s: torch.zeros(train[s][0].shape[-1], train[s][1].shape[-1], requires_grad=True) for s in self.slots}
        self.bias = {s: train[s][1].mean(dim=(0, 1)).clone().requires_grad_(True) for s in self.slots}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.weight.values()) + list(self.bias.values())

    def predict(self, s, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean[s]) / self.std[s]) @ self.weight[s] + self.bias[s]

    def kv_loss(self, part: str, chunks: slice) -> torch.Tensor:
        """Stage 1: relative MSE of the rebuilt heads, averaged over every network."""
        data = self.data[part]
        return torch.stack([(self.predict(s, data[s][0][chunks]) - data[s][1][chunks]).pow(2).mean() / self.target_var[s]
                            for s in self.slots]).mean()

    def attention_loss(self, part: str, chunks: slice, positions: torch.Tensor) -> torch.Tensor:
        """Stage 2: relative MSE of the attention output of the query heads that read a dropped head."""
        return torch.stack([self._attention_error(part, chunks, layer, positions) for layer in self.layers]).mean()

    def _attention_error(self, part: str, chunks: slice, layer: int, positions: torch.Tensor) -> torch.Tensor:
        acts = self.train if part == "train" else self.held
        keys, values, queries = acts.keys[layer][chunks], acts.values[layer][chunks], acts.queries[layer][chunks]
        dropped = [h for g in range(self.plan.groups) for h in self.plan.outputs(layer, g)]
        share = queries.shape[1] // self.plan.heads
        q = queries[:, [h * share + i for h in dropped for i in range(share)]][:, :, positions]
        causal = torch.arange(self.length).view(1, -1) <= positions.view(-1, 1)
        rebuilt = {"k": keys.clone(), "v": values.clone()}
        for kind in KINDS:
            for group in range(self.plan.groups):
                s, heads = (kind, layer, group), self.plan.outputs(layer, group)
                if heads:
                    y = self.predict(s, self.data[part][s][0][chunks]).unflatten(-1, (len(heads), -1)).transpose(1, 2)
                    rebuilt[kind][:, heads] = RopeFrame.rotate(y, *self.rope_cs) if kind == "k" else y

        def attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k, v = k[:, dropped].repeat_interleave(share, 1), v[:, dropped].repeat_interleave(share, 1)
            logits = (q @ k.transpose(-1, -2) * self.scaling[layer]).masked_fill(~causal, float("-inf"))
            return torch.softmax(logits, dim=-1) @ v

        with torch.no_grad():
            target = attend(keys, values)
        return (attend(rebuilt["k"], rebuilt["v"]) - target).pow(2).mean() / target.var().clamp_min(1e-12)

    @torch.no_grad()
    def heldout_losses(self) -> dict:
        every = slice(None)
        return {"kv": round(float(self.kv_loss("held", every)), 4),
                "attention": round(float(self.attention_loss("held", every, torch.arange(self.length))), 4)}

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        """Weights with the standardisation folded in, the kept map, and each dropped unit's held-out error."""
        tensors = {"kept": self.plan.kept()}
        unit_error = torch.zeros(len(KINDS), self.plan.layers, self.plan.heads)
        for s in self.slots:
            kind, layer, group = s
            weight = self.weight[s] / self.std[s].view(-1, 1)
            bias = self.bias[s] - self.mean[s] @ weight
            tensors[_param(*s) + ".weight"], tensors[_param(*s) + ".bias"] = weight, bias
            x, y = self.data["held"][s]
            estimate = (x @ weight + bias).unflatten(-1, (-1, y.shape[-1] // len(self.plan.outputs(layer, group))))
            target = y.unflatten(-1, estimate.shape[-2:])
            for i, head in enumerate(self.plan.outputs(layer, group)):
                unit_error[KINDS.index(kind), layer, head] = relative_error(estimate[..., i, :], target[..., i, :])
        tensors["unit_error"] = unit_error
        return tensors


def calibration_plan(layers: int, heads: int, keep: float = 0.4, group_size: int | None = None,
                     local_size: int = 2) -> EchoPlan:
    """The plan calibration trains for ``layers`` layers of ``heads`` KV heads, from its options (checked, so that
    the command can reject them before it collects any activations)."""
    return EchoPlan(layers, heads, keep, group_size or default_group_size(heads), local_size)


@calibrator("echokv", with_queries=True, default_steps=200)
def fit_echokv(model, acts: Activations, steps: int, progress: ProgressFn | None, lr: float = 3e-3, seed: int = 0,
               **plan_options):
    """Train the reconstruction networks, ``steps`` AdamW steps per stage; returns (tensors, summary).
    ``plan_options``: :func:`calibration_plan`'s."""
    layers, heads, length, _ = acts.shape
    plan = calibration_plan(layers, heads, **plan_options)
    trainer = _Trainer(model, acts, plan)
    history = {"start": trainer.heldout_losses()}
    generator = torch.Generator().manual_seed(seed)
    chunks = trainer.train.keys[0].shape[0]
    for stage, name in ((1, "stage 1: K/V MSE"), (2, "stage 2: attention MSE")):
        optimizer = torch.optim.AdamW(trainer.parameters(), lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        for step in range(steps):
            c = int(torch.randint(chunks, (1,), generator=generator))
            chunk = slice(c, c + 1)  # batch size 1, as in the paper
            if stage == 1:
                loss = trainer.kv_loss("train", chunk)
            else:
                positions = torch.randperm(length, generator=generator)[:STAGE2_QUERIES].sort().values
                loss = trainer.attention_loss("train", chunk, positions)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress:
                progress(name, step + 1, steps, loss.item())
        history[f"stage{stage}"] = trainer.heldout_losses()
    summary = {**plan.settings(), "layers": layers, "heads": heads, "lr": lr, "heldout_loss": history}
    return trainer.export(), summary


# -- the cache ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadPlan:
    """Which (kind, head) units each layer stores exactly, for one cache; the others are rebuilt."""

    exact: dict[tuple[str, int], list[int]]  # (kind, layer) -> exact heads, ascending


class EchoKVLayer(CompressedLayer):
    """Stores the exact heads' K/V ``(B, exact_heads, N, D)`` per kind; rebuilds the other heads when attended.

    Until its first attention call (prefill) a layer stores every head: the prompt attends to the true K/V, and
    the budget (which needs the prompt lengths) is planned right after.
    """

    def __init__(self, layer_idx: int, budget: Budget, method: "EchoKVMethod") -> None:
        super().__init__(layer_idx, budget)
        self.method = method
        self.exact_heads: dict[str, list[int]] = {}
        # kind -> per group: (heads rebuilt, (layer, head) inputs, weight, bias)
        self.networks: dict[str, list[tuple[list[int], list[tuple[int, int]], torch.Tensor, torch.Tensor]]] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.exact_heads = {kind: list(range(self.heads)) for kind in KINDS}
        self.store = {"k": key_states[:, :, :0], "v": value_states[:, :, :0]}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.logical_len
        new = {"k": key_states, "v": value_states}
        self.store = {kind: torch.cat([self.store[kind], new[kind][:, self.exact_heads[kind]]], dim=2) for kind in KINDS}
        self.logical_len += key_states.shape[2]
        if not any(self.networks.values()):
            return self.store["k"], self.store["v"]
        return tuple(torch.cat([self.rebuild(kind, past), new[kind]], dim=2) for kind in KINDS)

    def stored(self, kind: str, head: int, length: int) -> torch.Tensor:
        """``(B, length, D)``: the first ``length`` slots of one exactly stored head."""
        return self.store[kind][:, self.exact_heads[kind].index(head), :length]

    def rebuild(self, kind: str, length: int) -> torch.Tensor:
        """``(B, H, length, D)``: every head of ``kind`` over the first ``length`` slots, exact or rebuilt."""
        out = self.store[kind].new_empty(self.batch, self.heads, length, self.head_dim)
        out[:, self.exact_heads[kind]] = self.store[kind][:, :, :length]
        if self.networks[kind]:
            cos, sin = self.method.rotation(self.offsets, length, self.dtype)  # (B, length, D)
        for heads, sources, weight, bias in self.networks[kind]:
            if not heads:
                continue
            # An input layer may sit on another GPU under a device map; the rebuilt heads stay on this layer's.
            inputs = [self.method.layers[j].stored(kind, h, length).to(self.device) for j, h in sources]
            if kind == "k":
                inputs = [RopeFrame.unrotate(x, cos, sin) for x in inputs]
            y = (torch.cat(inputs, dim=-1) @ weight + bias).unflatten(-1, (len(heads), self.head_dim)).transpose(1, 2)
            out[:, heads] = RopeFrame.rotate(y, cos.unsqueeze(1), sin.unsqueeze(1)) if kind == "k" else y
        return out

    def observe(self, scores: torch.Tensor | None, key_valid: torch.Tensor) -> None:
        first = self.offsets is None
        super().observe(scores, key_valid)
        if first and not self.budget.is_unlimited:
            self._apply(self.method.head_plan(self))

    def _apply(self, plan: HeadPlan) -> None:
        for kind in KINDS:
            exact = plan.exact[kind, self.layer_idx]
            self.store[kind] = self.store[kind][:, exact]
            self.exact_heads[kind] = exact
            self.networks[kind] = []
            for group in range(self.method.plan.groups):
                rebuilt = [h for h in self.method.plan.outputs(self.layer_idx, group) if h not in exact]
                weight, bias = self.method.network(kind, self.layer_idx, group, rebuilt, self.dtype, self.device)
                self.networks[kind].append((rebuilt, self.method.plan.inputs(self.layer_idx, group), weight, bias))

    def network_bytes(self) -> int:
        return tensor_bytes(*(t for nets in self.networks.values() for heads, _, w, b in nets if heads for t in (w, b)))

    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return tensor_bytes(self.store["k"], self.store["v"]) + self.network_bytes()


@register("echokv")
@dataclass
class EchoKVMethod(Method):
    """EchoKV.

    Args:
        weights: the calibration's safetensors file; None looks for ``kvreviver calibrate --method echokv``'s
            default file for this model.
    """

    weights: str | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and not isinstance(self.weights, (str, PathLike)):
            raise ValueError(f"weights must be a path, got {self.weights!r}")
        self._model = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self._rotation: dict[torch.device, tuple] = {}  # per device: the layers of a device map share it
        self._plans: dict[tuple, HeadPlan] = {}
        self.layers: list[EchoKVLayer] = []

    def prepare(self, model) -> None:
        """Loads the calibration: a missing or foreign weights file is a ValueError naming the calibrate command."""
        self._model = model
        self._load()

    def make_layer(self, layer_idx: int, budget: Budget) -> CompressedLayer:
        if budget.tokens is not None:
            raise ValueError("echokv drops heads, not tokens: give the budget as a fraction of the full cache")
        if layer_idx == 0:  # the first layer of a new cache
            self.layers, self._plans = [], {}
        layer = EchoKVLayer(layer_idx, budget, self)
        self.layers.append(layer)
        return layer

    def _load(self) -> None:
        if self._tensors is None:
            self._tensors, settings = load_calibration(self.weights, "echokv", self._model)
            config = self._model.config
            heads = config.num_key_value_heads
            self.plan = EchoPlan(config.num_hidden_layers, heads, settings["keep"], settings["group_size"], settings["local_size"])
            if not torch.equal(self.plan.kept(), self._tensors["kept"]):
                raise ValueError(f"echokv weights {self.weights} do not match their settings; calibrate again")

    def network(self, kind: str, layer: int, group: int, heads: list[int], dtype, device):
        """The weight ``(in, len(heads) * D)`` and bias rebuilding ``heads`` (a subset of the group's outputs)."""
        name = _param(kind, layer, group)
        if not heads:  # on the layer's device too: a cache layer holds no tensor elsewhere
            return torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device)
        outputs = self.plan.outputs(layer, group)
        dim = self._tensors[name + ".weight"].shape[1] // len(outputs)
        cols = torch.cat([torch.arange(outputs.index(h) * dim, (outputs.index(h) + 1) * dim) for h in heads])
        return (self._tensors[name + ".weight"][:, cols].to(device, dtype),
                self._tensors[name + ".bias"][cols].to(device, dtype))

    def rotation(self, offsets: torch.Tensor, length: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``(B, length, D)`` of every slot on ``offsets``' device; one computation per decode step and
        device, shared by the layers there."""
        key = (length, dtype, tuple(offsets.tolist()))
        held = self._rotation.get(offsets.device)
        if held is None or held[0] != key:
            rope = RopeFrame.of(self._model)
            cos, sin = rope.cos_sin(sequence_positions(offsets, length), dtype)
            held = self._rotation[offsets.device] = (key, (cos.to(offsets.device), sin.to(offsets.device)))
        return held[1]

    def head_plan(self, layer: EchoKVLayer) -> HeadPlan:
        """The exact units of every layer for this cache: the calibrated kept heads, then the dropped heads with
        the largest held-out error while the budget allows; the same answer for every layer of the cache."""
        lengths = tuple(layer.prompt_lengths.tolist())
        key = (lengths, layer.logical_len, layer.dtype)
        if key in self._plans:
            return self._plans[key]
        element = torch.empty((), dtype=layer.dtype).element_size()
        unit_bytes = layer.batch * layer.logical_len * layer.head_dim * element  # one kind of one head
        full = self.plan.layers * sum(lengths) * layer.token_bytes()
        allowed = layer.budget.fraction * full
        kept = self.plan.kept()
        exact = {(kind, j): [h for h in range(self.plan.heads) if kept[j, h]] for kind in KINDS for j in range(self.plan.layers)}

        def weight_bytes(kind: str, j: int, h: int) -> int:
            group = h // self.plan.group_size
            return (len(self.plan.inputs(j, group)) * layer.head_dim + 1) * layer.head_dim * element  # its columns

        dropped = [(kind, j, h) for kind in KINDS for j in range(self.plan.layers) for h in range(self.plan.heads) if not kept[j, h]]
        memory = kept.sum().item() * 2 * unit_bytes + sum(weight_bytes(*u) for u in dropped)
        if memory > allowed:
            raise ValueError(
                f"echokv: the calibrated kept heads ({self.plan.keep:g} of them) and the reconstruction weights need "
                f"{memory / full:.3f} of the full cache for this prompt, above the budget {layer.budget.fraction:g}; "
                "raise the budget or calibrate with a smaller --keep"
            )
        error = self._tensors["unit_error"]
        for kind, j, h in sorted(dropped, key=lambda u: -float(error[KINDS.index(u[0]), u[1], u[2]])):
            extra = unit_bytes - weight_bytes(kind, j, h)
            if memory + extra <= allowed:
                memory += extra
                exact[kind, j] = sorted(exact[kind, j] + [h])
        self._plans[key] = HeadPlan(exact)
        return self._plans[key]
