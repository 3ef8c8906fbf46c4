"""The ``lazysd`` command (also ``python -m lazysd``).

    lazysd --version                         the installed version
    lazysd inspect PATH [--all] [--mtp]      native keys, shapes, dtypes, bytes, HF sources
        [--adapter NAME] [--revision REV]    family (default: from config.json); hub cache revision
                                             (PATH may be s3://, gs://, https://, hf:// ...;
                                             --storage-option KEY=VALUE for its filesystem)
        [--match GLOB] [--layer L]           only keys matching a glob / in layer(s) L
        [--summary]                          bytes per module kind and per layer instead of keys
        [--ep N [--ep-shard M] [--fsdp]]     dry-run load plan: bytes each rank reads
    lazysd demo [--keep DIR]                 generate a checkpoint, load it lazily, run a forward pass
    lazysd convert SRC DST                   re-shard / convert a checkpoint, streaming (see cmd_convert)
        [--max-shard-size 5GB] [--overwrite] [--from hf|native] [--to hf|native]

PATH and SRC take every form ``VirtualStateDict`` does: a directory, ``~/...``, a single
``model.safetensors`` file, a Hugging Face cache repository or a hub id (``org/name``) resolved
from the local cache (``--revision`` picks a branch, tag or commit there).

Ctrl-C stops a command promptly: exit status 130 and one line on stderr, no traceback.
``convert`` writes under hidden temporary names and commits at the end, so an interrupted
conversion leaves nothing that looks like a checkpoint.

Each subcommand is a function ``cmd_<name>(args) -> int`` registered in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .adapters import resolve_adapter
from .checkpoint import config_value
from .errors import LazySDError
from .export import NATIVE, save_hf, save_native
from .inspect import key_table, summarize, summary_lines
from .testing import Step3p5Model, Step3p5Spec, make_checkpoint
from .virtual import VirtualStateDict


def cmd_inspect(args: argparse.Namespace) -> int:

    with VirtualStateDict(
        args.path,
        adapter=args.adapter,
        include_mtp=args.mtp,
        revision=args.revision,
        storage_options=_storage_options(args.storage_option),
    ) as vsd:
        keys = list(vsd)
        if args.match is not None or args.layer is not None:
            keys = list(vsd.select(args.match, layer=args.layer))
        # Plan (and so validate the layout) before printing anything.
        plan = None if args.ep is None else vsd.rank_plan(args.ep, ep_shard=args.ep_shard, fsdp=args.fsdp, keys=keys)
        for line in summary_lines(vsd):
            print(line)
        print()
        if len(keys) != len(vsd):
            print(
                f"{len(keys)} of {len(vsd)} keys match"
                + "".join(
                    f" {name}={value!r}"
                    for name, value in (("--match", args.match), ("--layer", args.layer))
                    if value is not None
                )
            )
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

    spec = Step3p5Spec.tiny()
    if (
        args.keep
        and Path(args.keep).expanduser().exists()
        and (not Path(args.keep).expanduser().is_dir() or any(Path(args.keep).expanduser().iterdir()))
    ):
        print(
            f"lazysd: error: {args.keep} exists and is not an empty directory; give --keep a new or empty directory "
            f"(to look at a kept demo checkpoint: lazysd inspect {args.keep})",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep).expanduser() if args.keep else Path(tmp) / "step3p5-tiny"
        t0 = time.perf_counter()
        make_checkpoint(path, spec, layout="split")
        print(f"generated a synthetic Step3p5 checkpoint in {path} ({time.perf_counter() - t0:.2f}s)")
        with VirtualStateDict(path) as vsd:
            print(repr(vsd))
            model = Step3p5Model(spec, layout="native")
            t0 = time.perf_counter()
            result = model.load_state_dict(vsd)
            print(f"\nmodel.load_state_dict(vsd): {result} in {time.perf_counter() - t0:.3f}s")
            print(
                f"  read {vsd.bytes_read} tensor bytes in {vsd.checkpoint.read_calls} reads; staging peak "
                f"{vsd.stats.staging_peak} bytes"
            )
            tokens = torch.randint(0, spec.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                logits = model(tokens)
            print(
                f"forward pass: tokens {list(tokens.shape)} -> logits {list(logits.shape)}, next token "
                f"{int(logits[0, -1].argmax())}"
            )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """HF -> HF (re-shard, read through the rules, so it validates too), HF -> native, native -> HF.

    "native" on disk is lazysd's only native format: config.json plus safetensors files of
    native keys (MTP layers as ``mtp.layers.{i}``), as ``--to native`` writes them.
    """
    import json

    src, dst = args.src, Path(args.dst).expanduser()
    args.interrupted_dst = (dst, _snapshot(dst))  # what "nothing was written" is checked against
    options = {"max_shard_size": args.max_shard_size, "overwrite": args.overwrite, "progress": not args.quiet}
    t0 = time.perf_counter()
    if args.from_ == "native" and args.to == "native":
        print("lazysd: error: --from native --to native: nothing to convert", file=sys.stderr)
        return 2
    if args.from_ == "hf":
        with VirtualStateDict(src, adapter=args.adapter, include_mtp=not args.no_mtp, revision=args.revision) as vsd:
            for key, why in list(vsd.plan.ignored.items())[:20]:
                print(f"lazysd: not written: {key} ({why})", file=sys.stderr)
            config = args.config or vsd.checkpoint.path / "config.json"
            if args.to == "hf":
                out = save_hf(vsd, dst, config=config, **options)
            else:
                out = save_native(vsd, dst, config=config, **options)
    else:
        src = Path(src).expanduser()
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


def _snapshot(path: Path) -> dict[str, tuple[int, int, int]] | None:
    """Visible entries of a directory with (inode, size, mtime_ns); None if it does not exist."""
    if not path.is_dir():
        return None
    out = {}
    for p in path.iterdir():
        if not p.name.startswith("."):
            st = p.lstat()
            out[p.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _interrupted(args: argparse.Namespace | None) -> str:
    """The one line for Ctrl-C; for convert, whether DST is untouched (an empty DST it made is removed)."""
    target: tuple[Path, Any] | None = getattr(args, "interrupted_dst", None) if args is not None else None
    if target is None:
        return "lazysd: interrupted"
    dst, before = target
    if before is None and dst.is_dir():
        try:
            dst.rmdir()  # made by this run and still empty (export removes its temporary files)
        except OSError:
            pass
    if _snapshot(dst) == before:
        return f"lazysd: interrupted; nothing was written to {dst}"
    return f"lazysd: interrupted while committing to {dst}; check it before use"


def _adapter_names() -> list[str]:
    from .adapters import known

    return sorted(known())


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lazysd", description="Lazy native-key views of Hugging Face MoE checkpoints."
    )
    parser.add_argument("--version", action="version", version=f"lazysd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    names = _adapter_names()
    adapter_help = f"model family, one of {', '.join(names)} (default: detected from config.json)"
    _add_inspect(sub, names, adapter_help)

    p = sub.add_parser(
        "demo", help="generate a small checkpoint, load it through a VirtualStateDict, run a forward pass"
    )
    p.add_argument("--keep", metavar="DIR", help="write the checkpoint here instead of a temporary directory")
    p.set_defaults(func=cmd_demo)

    _add_convert(sub, names, adapter_help)
    return parser


def _add_inspect(sub: Any, names: list[str], adapter_help: str) -> None:
    """The ``lazysd inspect`` subcommand and its options."""
    p = sub.add_parser(
        "inspect", help="list native keys with shape, dtype, bytes and HF sources (reads no tensor data)"
    )
    p.add_argument(
        "path", help="checkpoint directory, model.safetensors file, HF cache repository or hub id (org/name)"
    )
    p.add_argument("--adapter", choices=names, metavar="NAME", help=adapter_help)
    p.add_argument("--revision", help="branch, tag or commit of a Hugging Face cache repository (default main)")
    p.add_argument("--all", action="store_true", help="list every key")
    p.add_argument("--limit", type=int, default=40, help="keys to list (default 40)")
    p.add_argument("--mtp", action="store_true", help="include MTP layers")
    p.add_argument("--match", metavar="GLOB", help="only keys matching this shell glob, e.g. '*.experts.*'")
    p.add_argument(
        "--layer", action="append", metavar="L", help="only keys of layer L (repeatable; '-' = outside layers, 'mtp.0')"
    )
    p.add_argument("--summary", action="store_true", help="bytes per module kind and per layer instead of the key list")
    p.add_argument(
        "--ep", type=int, metavar="N", help="dry-run load plan for N expert-parallel ranks (experts Shard(0))"
    )
    p.add_argument(
        "--ep-shard", type=int, default=1, metavar="M", help="also shard experts on native dim 1 over M ranks"
    )
    p.add_argument(
        "--fsdp", action="store_true", help="with --ep: non-expert tensors Shard(0) over all ranks, not replicated"
    )
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="for a URL (s3://, gs://, https://, hf://): an fsspec storage option, "
        "e.g. anon=true or endpoint_url=http://... (repeatable)",
    )
    p.set_defaults(func=cmd_inspect)


def _add_convert(sub: Any, names: list[str], adapter_help: str) -> None:
    """The ``lazysd convert`` subcommand and its options."""
    p = sub.add_parser(
        "convert", help="re-shard or convert a checkpoint (HF <-> native), streaming one tensor slice at a time"
    )
    p.add_argument(
        "src",
        help="HF checkpoint directory (or, with --from native, a directory of native-key safetensors + config.json)",
    )
    p.add_argument("dst", help="output directory (new or empty, or --overwrite)")
    p.add_argument(
        "--max-shard-size", default="5GB", help="bytes per output file, e.g. 5GB (10**9), 2GiB (default 5GB)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the weights in a non-empty DST")
    p.add_argument("--from", dest="from_", choices=("hf", "native"), default="hf", help="layout of SRC (default hf)")
    p.add_argument("--to", choices=("hf", "native"), default="hf", help="layout to write (default hf)")
    p.add_argument("--adapter", choices=names, metavar="NAME", help=adapter_help)
    p.add_argument("--revision", help="branch, tag or commit of a Hugging Face cache repository SRC (default main)")
    p.add_argument("--config", help="config.json to use and copy (default SRC/config.json)")
    p.add_argument("--no-mtp", action="store_true", help="leave out MTP layers (default: keep them)")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=cmd_convert)


def main(argv: Sequence[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130
    except LazySDError as e:
        print(f"lazysd: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lazysd inspect ... | head`
        return 0
