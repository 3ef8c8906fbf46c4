"""The ``lazysd`` command (also ``python -m lazysd``).

    lazysd inspect PATH [--all] [--mtp]      native keys, shapes, dtypes, bytes, HF sources
                                             (PATH may be s3://, gs://, https://, hf:// ...;
                                             --storage-option KEY=VALUE for its filesystem)
        [--match GLOB] [--layer L]           only keys matching a glob / in layer(s) L
        [--summary]                          bytes per module kind and per layer instead of keys
        [--ep N [--ep-shard M] [--fsdp]]     dry-run load plan: bytes each rank reads
    lazysd demo [--keep DIR]                 generate a checkpoint, load it lazily, run a forward pass
    lazysd convert SRC DST                   re-shard / convert a checkpoint, streaming (see cmd_convert)
        [--max-shard-size 5GB] [--overwrite] [--from hf|native] [--to hf|native]

Each subcommand is a function ``cmd_<name>(args) -> int`` registered in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import LazySDError


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import key_table, summarize, summary_lines
    from .virtual import VirtualStateDict

    with VirtualStateDict(args.path, include_mtp=args.mtp, storage_options=_storage_options(args.storage_option)) as vsd:
        keys = list(vsd)
        if args.match is not None or args.layer is not None:
            keys = list(vsd.select(args.match, layer=args.layer))
        # Plan (and so validate the layout) before printing anything.
        plan = None if args.ep is None else vsd.rank_plan(args.ep, ep_shard=args.ep_shard, fsdp=args.fsdp, keys=keys)
        for line in summary_lines(vsd):
            print(line)
        print()
        if len(keys) != len(vsd):
            print(f"{len(keys)} of {len(vsd)} keys match" + "".join(
                f" {name}={value!r}" for name, value in (("--match", args.match), ("--layer", args.layer)) if value is not None
            ))
        if args.summary:
            print(summarize(vsd, by="kind", keys=keys))
            print()
            print(summarize(vsd, by="layer", keys=keys))
        else:
            for line in key_table(vsd, None if args.all else args.limit, keys=keys):
                print(line)
        if plan is not None:
            print()
            print(plan)
        print(f"\ntensor bytes read: {vsd.bytes_read}")
    return 0


def _storage_options(pairs: list[str] | None) -> dict[str, object] | None:
    """``KEY=VALUE`` pairs; a VALUE that parses as JSON (true, 3, {...}) is taken as such."""
    import json

    if not pairs:
        return None
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LazySDError(f"--storage-option takes KEY=VALUE, got {pair.split('=')[0]!r}...")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .testing import Step3p5Model, Step3p5Spec, make_checkpoint
    from .virtual import VirtualStateDict

    spec = Step3p5Spec.tiny()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "step3p5-tiny"
        t0 = time.perf_counter()
        make_checkpoint(path, spec, layout="split")
        print(f"generated a synthetic Step3p5 checkpoint in {path} ({time.perf_counter() - t0:.2f}s)")
        with VirtualStateDict(path) as vsd:
            print(repr(vsd))
            model = Step3p5Model(spec, layout="native")
            t0 = time.perf_counter()
            result = model.load_state_dict(vsd)
            print(f"\nmodel.load_state_dict(vsd): {result} in {time.perf_counter() - t0:.3f}s")
            print(f"  read {vsd.bytes_read} tensor bytes in {vsd.checkpoint.read_calls} reads; staging peak {vsd.stats.staging_peak} bytes")
            tokens = torch.randint(0, spec.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                logits = model(tokens)
            print(f"forward pass: tokens {list(tokens.shape)} -> logits {list(logits.shape)}, next token {int(logits[0, -1].argmax())}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """HF -> HF (re-shard, read through the rules, so it validates too), HF -> native, native -> HF.

    "native" on disk is lazysd's only native format: config.json plus safetensors files of
    native keys (MTP layers as ``mtp.layers.{i}``), as ``--to native`` writes them.
    """
    import json

    from .adapters import resolve_adapter
    from .checkpoint import config_value
    from .export import NATIVE, save_hf, save_native
    from .virtual import VirtualStateDict

    src, dst = Path(args.src), Path(args.dst)
    options = {"max_shard_size": args.max_shard_size, "overwrite": args.overwrite, "progress": not args.quiet}
    t0 = time.perf_counter()
    if args.from_ == "native" and args.to == "native":
        print("lazysd: error: --from native --to native: nothing to convert", file=sys.stderr)
        return 2
    if args.from_ == "hf":
        with VirtualStateDict(src, adapter=args.adapter, include_mtp=not args.no_mtp) as vsd:
            for key, why in list(vsd.plan.ignored.items())[:20]:
                print(f"lazysd: not written: {key} ({why})", file=sys.stderr)
            config = args.config or src / "config.json"
            if args.to == "hf":
                out = save_hf(vsd, dst, config=config, **options)
            else:
                out = save_native(vsd, dst, config=config, **options)
    else:
        config_path = Path(args.config) if args.config else src / "config.json"
        config = json.loads(config_path.read_text())
        adapter = resolve_adapter(args.adapter, config, keys=(), where=str(config_path))
        text = config.get(adapter.text_config, config) if adapter.text_config else config
        num_layers = config_value(text, *adapter.num_layers)
        with VirtualStateDict(src, adapter=NATIVE) as files:  # native keys, read slice by slice
            out = save_hf(files, dst, adapter=adapter, num_layers=num_layers, config=config_path, **options)
    names = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"wrote {len(names)} safetensors file(s) to {out} in {time.perf_counter() - t0:.2f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazysd", description="Lazy native-key views of Hugging Face MoE checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list native keys with shape, dtype, bytes and HF sources (reads no tensor data)")
    p.add_argument("path")
    p.add_argument("--all", action="store_true", help="list every key")
    p.add_argument("--limit", type=int, default=40, help="keys to list (default 40)")
    p.add_argument("--mtp", action="store_true", help="include MTP layers")
    p.add_argument("--match", metavar="GLOB", help="only keys matching this shell glob, e.g. '*.experts.*'")
    p.add_argument("--layer", action="append", metavar="L", help="only keys of layer L (repeatable; '-' = outside layers, 'mtp.0')")
    p.add_argument("--summary", action="store_true", help="bytes per module kind and per layer instead of the key list")
    p.add_argument("--ep", type=int, metavar="N", help="dry-run load plan for N expert-parallel ranks (experts Shard(0))")
    p.add_argument("--ep-shard", type=int, default=1, metavar="M", help="also shard experts on native dim 1 over M ranks")
    p.add_argument("--fsdp", action="store_true", help="with --ep: non-expert tensors Shard(0) over all ranks, not replicated")
    p.add_argument(
        "--storage-option", action="append", metavar="KEY=VALUE",
        help="for a URL (s3://, gs://, https://, hf://): an fsspec storage option, e.g. anon=true or endpoint_url=http://... (repeatable)",
    )
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="generate a small checkpoint, load it through a VirtualStateDict, run a forward pass")
    p.add_argument("--keep", metavar="DIR", help="write the checkpoint here instead of a temporary directory")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="re-shard or convert a checkpoint (HF <-> native), streaming one tensor slice at a time")
    p.add_argument("src", help="HF checkpoint directory (or, with --from native, a directory of native-key safetensors + config.json)")
    p.add_argument("dst", help="output directory (new or empty, or --overwrite)")
    p.add_argument("--max-shard-size", default="5GB", help="bytes per output file, e.g. 5GB (10**9), 2GiB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace the weights in a non-empty DST")
    p.add_argument("--from", dest="from_", choices=("hf", "native"), default="hf", help="layout of SRC (default hf)")
    p.add_argument("--to", choices=("hf", "native"), default="hf", help="layout to write (default hf)")
    p.add_argument("--adapter", help="model family (default: detected from config.json)")
    p.add_argument("--config", help="config.json to use and copy (default SRC/config.json)")
    p.add_argument("--no-mtp", action="store_true", help="leave out MTP layers (default: keep them)")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LazySDError as e:
        print(f"lazysd: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lazysd inspect ... | head`
        return 0
