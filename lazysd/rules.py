"""Model knowledge as data: rules that say how native tensors are built from HF tensors.

A :class:`Rule` names one native tensor pattern and the HF tensors (:class:`Part`) that fill
it. Patterns use named placeholders: ``{layer}`` and ``{expert}`` match decimal indices, any
other ``{name}`` matches one dotted component, and ``{name:a|b|c}`` matches one of the listed
alternatives, and ``{name:**}`` matches one or more dotted components (pass-through of a
whole sub-tree, e.g. a vision tower). ``{expert}`` is special: it may appear only in parts, and the per-expert HF
tensors it matches are stacked on the native dimension that the part's ``dims`` marks with
``None``.

``Part.dims`` says, for each native dimension, which source dimension feeds it: ``(0, 2, 1)``
is ``transpose(1, 2)``, ``(None, 1, 0)`` is "stack over experts, then transpose". Several
parts are concatenated along ``Rule.cat_dim`` in the order given (gate first, then up).

Example — Step3p5's grouped gate/up, stored ``[E, I, D]`` twice, native ``[E, D, 2I]``::

    Rule(
        "model.layers.{layer}.moe.experts.gate_and_up_projs",
        parts=(Part("model.layers.{layer}.moe.gate_proj.weight", dims=(0, 2, 1)),
               Part("model.layers.{layer}.moe.up_proj.weight", dims=(0, 2, 1))),
        cat_dim=2,
        kind="experts",
    )

Matching lives here with the rules: :func:`claim` says which part of which rule an HF key
is, :meth:`Adapter.unclaimed` lists the keys no rule claims (detection), and
:meth:`Adapter.native_rule` runs a native key backwards to its rule (export). The engine that
turns claimed keys into plan entries lives in :mod:`lazysd.plan`; adapters in
:mod:`lazysd.adapters` are nothing but these dataclasses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .errors import RuleError

_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^{}]*))?\}")
INDEX_NAMES = frozenset({"layer", "expert"})

#: Module kinds used to group keys when inspecting checkpoints.
KINDS = ("embedding", "attention", "norm", "mlp", "router", "experts", "shared_expert", "mtp", "head", "other")


@dataclass(frozen=True)
class Pattern:
    """A key pattern with named placeholders, compiled once."""

    text: str
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names: list[str] = []
        out, pos = [], 0
        for m in _PLACEHOLDER.finditer(self.text):
            name, choices = m.group(1), m.group(2)
            if name in names:
                raise RuleError(f"pattern {self.text!r}: placeholder {{{name}}} used twice")
            names.append(name)
            out.append(re.escape(self.text[pos : m.start()]))
            if choices == "**":
                body = r"[^.]+(?:\.[^.]+)*"
            elif choices is not None:
                body = "|".join(re.escape(c) for c in choices.split("|"))
            elif name in INDEX_NAMES:
                body = r"0|[1-9][0-9]*"
            else:
                body = r"[^.]+"
            out.append(f"(?P<{name}>{body})")
            pos = m.end()
        out.append(re.escape(self.text[pos:]))
        object.__setattr__(self, "regex", re.compile("".join(out)))
        object.__setattr__(self, "names", tuple(names))

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(key)
        return m.groupdict() if m else None

    def format(self, **values: object) -> str:
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), self.text)


@dataclass(frozen=True)
class Part:
    """One HF tensor, or one per-expert family of HF tensors, feeding a native tensor.

    Attributes:
        hf: HF key pattern; may contain ``{expert}`` for per-expert checkpoints.
        dims: for each native dimension, the source dimension it comes from; ``None``
            marks the dimension on which per-expert tensors are stacked. ``None`` here
            (the default) means the identity: same shape, same order.
    """

    hf: str
    dims: tuple[int | None, ...] | None = None

    @cached_property
    def pattern(self) -> Pattern:
        return Pattern(self.hf)

    @property
    def per_expert(self) -> bool:
        return "expert" in self.pattern.names


@dataclass(frozen=True)
class Rule:
    """How one native key pattern is built.

    Attributes:
        native: native key pattern.
        parts: HF sources, concatenated along ``cat_dim`` in order. Empty means the
            native key is also the HF key and the tensor passes through unchanged.
        cat_dim: native dimension the parts are concatenated on (when there are several).
        dtype: a dtype the native tensor always has (e.g. fp32 router correction bias),
            whatever the source or the user's requested cast.
        kind: module kind, one of :data:`KINDS`, for inspection and summaries.
    """

    native: str
    parts: tuple[Part, ...] = ()
    cat_dim: int = 0
    dtype: torch.dtype | None = None
    kind: str = "other"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RuleError(f"rule {self.native!r}: kind {self.kind!r} is not one of {KINDS}")
        native = set(self.native_pattern.names)
        if "expert" in native:
            raise RuleError(f"rule {self.native!r}: {{expert}} belongs in parts, where it is stacked")
        for part in self.sources:
            extra = set(part.pattern.names) - native
            if extra - {"expert"} or not native <= set(part.pattern.names):
                raise RuleError(
                    f"rule {self.native!r}: part {part.hf!r} must use exactly the native placeholders (plus {{expert}})"
                )
            if part.per_expert and (part.dims is None or part.dims.count(None) != 1):
                raise RuleError(
                    f"rule {self.native!r}: per-expert part {part.hf!r} needs dims with one None (the stacking dim)"
                )

    @cached_property
    def native_pattern(self) -> Pattern:
        return Pattern(self.native)

    @cached_property
    def sources(self) -> tuple[Part, ...]:
        """The parts, with the implicit pass-through part made explicit (one Part, so its
        pattern is compiled once, not at every key a claim tries it on)."""
        return self.parts or (Part(self.native),)


@dataclass(frozen=True)
class Claim:
    """Which part of which rule an HF key is.

    Attributes:
        rule: index of the rule in the rules tried.
        part: index of the part in that rule's :attr:`Rule.sources`.
        values: the native placeholders' values, sorted by name (``{expert}`` excluded):
            keys with equal ``(rule, values)`` build one native tensor.
        expert: the ``{expert}`` index of a per-expert part, else None.
    """

    rule: int
    part: int
    values: tuple[tuple[str, str], ...]
    expert: int | None


def claim(rules: Sequence[Rule], key: str, *, transforming_only: bool = False) -> Claim | None:
    """The first part of ``rules`` (in order) whose pattern matches HF ``key``, or None.

    With ``transforming_only``, pass-through rules (no explicit parts) are skipped.

    Example:
        >>> rules = (Rule("x.{layer}.w", parts=(Part("x.{layer}.e.{expert}.w", dims=(None, 0)),), kind="experts"),)
        >>> claim(rules, "x.3.e.7.w")
        Claim(rule=0, part=0, values=(('layer', '3'),), expert=7)
    """
    for ri, rule in enumerate(rules):
        if transforming_only and not rule.parts:
            continue
        for pi, part in enumerate(rule.sources):
            values = part.pattern.match(key)
            if values is not None:
                expert = values.pop("expert", None)
                return Claim(ri, pi, tuple(sorted(values.items())), None if expert is None else int(expert))
    return None


@dataclass(frozen=True)
class ConfigCheck:
    """A config.json field that must agree with a dimension of a native tensor.

    Attributes:
        fields: config fields to try, first present wins (dotted names reach nested objects).
        key: native key pattern whose tensors are checked (every match).
        dim: which dimension of those tensors must equal the config value.
    """

    fields: tuple[str, ...]
    key: str
    dim: int


@dataclass(frozen=True)
class Adapter:
    """Everything lazysd knows about one model family, as data.

    Attributes:
        name: short family name shown by ``lazysd inspect``.
        model_types: config.json ``model_type`` values this adapter handles.
        rules: tried in order; the first rule with a part matching an HF key claims it.
        ignore: HF key patterns deliberately not exposed (claimed, never silently dropped).
        layer_prefix: pattern of per-layer keys; used to tell MTP layers from main ones.
        mtp_prefix: where MTP layers go when the user asks for them (``{index}`` counts
            from 0 at the first MTP layer).
        num_layers: config fields holding the number of main decoder layers.
        checks: config fields that must agree with tensor shapes.
        text_config: config field holding a nested text config (multimodal families).
        scale_suffix: FP8 block-scale companions: an HF key ``K + scale_suffix`` next to an
            FP8 key ``K`` holds ``K``'s inverse scales, one per ``scale_block`` block
            (DeepSeek-V3: ``"_scale_inv"``). Companions are claimed with their weight, never
            exposed on their own; see :func:`lazysd.plan.resolve` for ``fp8=``.
        scale_block: default block shape of those scales (config.json's
            ``quantization_config.weight_block_size`` wins when present).
        refuse: ``(pattern, why)`` pairs: HF keys in a format lazysd does not convert
            (e.g. MXFP4 ``*_blocks``); a checkpoint holding one fails with
            :class:`~lazysd.errors.UnsupportedFormatError` naming the keys and ``why``.
    """

    name: str
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()
    layer_prefix: str = "model.layers.{layer}."
    mtp_prefix: str = "mtp.layers.{index}."
    num_layers: tuple[str, ...] = ("num_hidden_layers",)
    checks: tuple[ConfigCheck, ...] = ()
    text_config: str | None = None
    scale_suffix: str | None = None
    scale_block: tuple[int, int] = (128, 128)
    refuse: tuple[tuple[str, str], ...] = ()

    @cached_property
    def ignore_patterns(self) -> tuple[Pattern, ...]:
        return tuple(Pattern(p) for p in self.ignore)

    @cached_property
    def layer_pattern(self) -> Pattern:
        """:attr:`layer_prefix`, compiled once."""
        return Pattern(self.layer_prefix)

    @cached_property
    def mtp_pattern(self) -> Pattern:
        """:attr:`mtp_prefix`, compiled once."""
        return Pattern(self.mtp_prefix)

    @cached_property
    def scale_rules(self) -> tuple[Rule, ...]:
        """``fp8="keep"``: one rule per rule, building ``<native>_scale_inv`` from the scale
        companions with the same stacking, permutation and concatenation, block-wise."""
        suffix = self.scale_suffix or ""
        return tuple(
            Rule(
                rule.native + "_scale_inv",
                parts=tuple(Part(p.hf + suffix, p.dims) for p in rule.sources),
                cat_dim=rule.cat_dim,
                dtype=torch.float32,
                kind=rule.kind,
            )
            for rule in self.rules
        )

    def ignores(self, key: str) -> bool:
        """Whether HF ``key`` is deliberately not exposed (:attr:`ignore`)."""
        return any(p.match(key) is not None for p in self.ignore_patterns)

    def scale_companions(self, keys: Iterable[str]) -> dict[str, str]:
        """FP8 weight key -> its block-scale key (``K + scale_suffix`` next to ``K``)."""
        suffix = self.scale_suffix
        if not suffix:
            return {}
        keys = set(keys)
        return {k.removesuffix(suffix): k for k in keys if k.endswith(suffix) and k.removesuffix(suffix) in keys}

    def unclaimed(self, keys: Iterable[str]) -> list[str]:
        """HF keys no rule claims (nor :attr:`ignore`, nor takes as an FP8 scale companion).

        Used by detection to tell which registered family a checkpoint without a known
        ``model_type`` belongs to.
        """
        keys = list(keys)
        scales = set(self.scale_companions(keys).values())
        return [k for k in keys if k not in scales and claim(self.rules, k) is None and not self.ignores(k)]

    def mtp_index(self, key: str) -> tuple[int, str] | None:
        """``"mtp.layers.2.eh_proj.weight"`` -> ``(2, "eh_proj.weight")``: an exposed MTP key
        (:attr:`mtp_prefix`) split into its MTP index and the rest; None for other keys."""
        head, _, tail = self.mtp_prefix.partition("{index}")
        if not key.startswith(head):
            return None
        rest = key[len(head) :]
        digits = rest.split(".", 1)[0]
        if not digits.isdigit() or not rest[len(digits) :].startswith(tail):
            return None
        return int(digits), rest[len(digits) + len(tail) :]

    def native_rule(self, key: str, *, num_layers: int | None = None) -> tuple[Rule, dict[str, str]] | None:
        """The rule producing native ``key`` and its placeholder values, or None.

        With ``num_layers`` (main decoder layers), exposed MTP keys are mapped back to their
        layer first (``mtp.layers.0.*`` -> layer ``num_layers``).
        """
        if num_layers is not None:
            found = self.mtp_index(key)
            if found is not None:
                index, rest = found
                key = self.layer_pattern.format(layer=num_layers + index) + rest
        for rule in self.rules:
            values = rule.native_pattern.match(key)
            if values is not None:
                return rule, values
        return None
