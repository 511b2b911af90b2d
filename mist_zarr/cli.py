"""The ``mist-zarr`` command line.

Each verb imports what it uses inside its handler, so that ``--help`` and the
light verbs do not pay for the heavy ones (docs/architecture.md, "Imports").
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mist_zarr.layout import DEFAULT_ALPHA

__all__ = ["main"]


def _level_table(info, index) -> list[str]:
    # against the caller's / source's samples, not the (possibly wider) stored integers
    raw = math.prod(info.shape) * info.dtype.itemsize
    full = int(index[..., 0].sum())
    rows = [f"{'level':>5}  {'shape':<22} {'spacing (mm)':<22} {'bytes':>12} {'% of s0':>8}"]
    for k in range(info.levels + 1):
        nbytes = int(index[..., k].sum())
        shape = "x".join(map(str, info.level_shape(k)))
        spacing = ", ".join(f"{s:g}" for s in info.level_spacing(k))
        rows.append(f"{'s' + str(k):>5}  {shape:<22} {spacing:<22} {nbytes:>12,} "
                    f"{100 * nbytes / max(full, 1):>7.1f}%")
    kind = "ratio, quantized (lossy)" if info.values.kind == "quantized" else "lossless ratio"
    rows.append(f"raw {raw:,} bytes ({info.dtype}) -> stored {full:,} bytes ({kind} "
                f"{raw / max(full, 1):.2f} against the {info.dtype} source)")
    return rows


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    import mist_zarr
    from mist_zarr.phantom import ct_phantom

    out = Path(args.out)
    volume = ct_phantom((args.slices, args.size, args.size))
    t0 = time.perf_counter()
    info = mist_zarr.write_image(out, volume, spacing=(2.0, 0.7, 0.7), overwrite=True)
    dt = time.perf_counter() - t0
    print(f"wrote {out} from a generated CT phantom {volume.shape} {volume.dtype} "
          f"in {dt:.2f} s ({volume.nbytes / dt / 1e6:.0f} MB/s)")
    group, _ = mist_zarr.open_image(out)
    for row in _level_table(info, mist_zarr.read_index(group)):
        print(row)
    back = mist_zarr.read_image(out)
    if not np.array_equal(back, volume):
        print("ERROR: level 0 does not equal the input", file=sys.stderr)
        return 1
    low = mist_zarr.open(out, scale=info.levels).values
    print(f"level 0 read back bit-exact; level {info.levels} read as {low.shape} "
          f"via the multiscale store")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from mist_zarr.format import allowed_exports
    from mist_zarr.localread import read_local_image

    found = read_local_image(args.store)  # a local image, read without zarr (start-up)
    if found is None:  # a URL or store; or an error, which zarr's path names
        import mist_zarr

        group, info = mist_zarr.open_image(args.store)
        index = mist_zarr.read_index(group)
    else:
        info, index = found
    print(f"{args.store}")
    print(f"  source format : {info.source_format}")
    print(f"  dims, shape   : {info.dims} {info.shape}")
    print(f"  dtype         : {info.dtype} (stored as {info.stored_dtype}, {info.values.kind})")
    print(f"  spacing       : {info.spacing}")
    print(f"  chunks        : {info.chunks} ({math.prod(info.grid)} chunks)")
    print(f"  exports to    : {', '.join(allowed_exports(info.source_format))}")
    for row in _level_table(info, index):
        print("  " + row)
    warnings = info.metadata.get("warnings", []) if isinstance(info.metadata, dict) else []
    print(f"  warnings      : {len(warnings) or 'none'}")
    for w in warnings:
        print(f"    - {w}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from mist_zarr.convert import convert
    from mist_zarr.tables import dumps

    report = convert(args.src, args.dest, overwrite=args.overwrite,
                     skip_existing=args.skip_existing, alpha=args.alpha, quantize=args.quantize,
                     threads=args.threads, workers=args.workers, scheduler=args.scheduler,
                     batch_bytes=int(args.batch_mb * 2**20) if args.batch_mb > 0 else None,
                     split_bytes=int(args.split_mb * 2**20) if args.split_mb > 0 else None,
                     progress=not args.quiet, labels=args.labels)
    print(report.summary())
    if args.report:
        Path(args.report).write_text(dumps(report.to_json()) + "\n")
    return 0 if report.ok else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from mist_zarr.export import export

    result = export(args.store, args.out, format=args.format, scale=args.scale, size=args.size,
                    window=args.window, bits=args.bits, uncompressed=args.uncompressed,
                    colour=args.colour, philips_scaling=args.philips_scaling)
    print(f"wrote {len(result.files)} {result.format} file(s) at level {result.level} to {args.out}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from mist_zarr.tables import dumps
    from mist_zarr.verify import verify

    report = verify(args.path, levels=args.levels, source=args.source, workers=args.workers)
    print(dumps(report.to_json()) if args.json else report.summary())
    return 0 if report.ok else 1


def _cmd_catalog(args: argparse.Namespace) -> int:
    from mist_zarr.catalog import catalog_table
    from mist_zarr.tables import CATALOG

    table = catalog_table(args.dest, refresh=True, write=True)
    print(f"{len(table.rows)} image(s), {sum(table.column('bytes')):,} bytes -> "
          f"{args.dest}/{CATALOG}")
    return 0


def _ls_table(args: argparse.Namespace):
    """The table ``ls`` prints: read straight from a local dataset's files when it can
    (no zarr, no pandas: start-up), else through the catalog module."""
    from mist_zarr.tables import local_catalog, local_failures

    if args.failures:
        table = local_failures(args.dest)
        if table is None:
            from mist_zarr.catalog import read_failures_table

            table = read_failures_table(args.dest)
        return table
    table = None if args.refresh else local_catalog(args.dest)
    if table is None:  # a URL, no (current) catalog.parquet yet, or --refresh
        from mist_zarr.catalog import catalog_table

        table = catalog_table(args.dest, refresh=args.refresh)
    return table


def _cmd_ls(args: argparse.Namespace) -> int:
    from mist_zarr.tables import Table, dumps

    table = _ls_table(args)
    if args.warnings and not args.failures:
        rows = [(r["path"], w) for r in table.rows for w in (r.get("warnings") or [])]
        if args.json:
            print(dumps([{"path": p, "warning": w} for p, w in rows]))
        else:
            print("\n".join(f"{p}: {w}" for p, w in rows) if rows
                  else f"{args.dest}: no image has warnings")
        return 0
    if args.columns and not args.failures:
        wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in table.columns]
        if unknown:
            raise SystemExit(f"mist-zarr ls: unknown column(s) {unknown}; the catalog has "
                             f"{table.columns}")
        table = Table(wanted, table.rows)
    if args.json:
        print(dumps([{c: r.get(c) for c in table.columns} for r in table.rows]))
    elif not table.rows:
        print("no failures recorded" if args.failures else f"{args.dest}: no images")
    else:
        print(_catalog_table(table, all_columns=bool(args.columns) or args.failures))
    return 0


_LS_COLUMNS = ["path", "modality", "body_part", "shape", "dtype", "spacing", "levels",
               "bytes", "bytes_per_level", "source_format", "complete", "warnings"]


def _catalog_table(table, *, all_columns: bool) -> str:
    """The catalog as text: lists joined, sizes in kB, the main columns unless chosen."""
    shown = table.columns if all_columns else [c for c in _LS_COLUMNS if c in table.columns]

    def cell(column: str, value) -> str:
        if hasattr(value, "tolist"):  # a numpy value (a frame a user wrote)
            value = value.tolist()
        if column == "warnings":  # the count; `ls --warnings` prints them
            return str(0 if value is None else len(value))
        if isinstance(value, (list, tuple)):
            if column == "shape":
                return "x".join(str(int(v)) for v in value)
            if column == "bytes_per_level":
                return "/".join(f"{v / 1e3:.0f}" for v in value) + " kB"
            return ",".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
        if column == "bytes" and value is not None:
            return f"{int(value):,}"
        return "" if value is None else str(value)

    columns = {c: [cell(c, r.get(c)) for r in table.rows] for c in shown}
    widths = {c: max([len(c), *map(len, cells)]) for c, cells in columns.items()}
    right = {"bytes", "levels", "n_chunks"}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(v.rjust(widths[c]) if c in right else v.ljust(widths[c])
                         for c, v in cells.items()).rstrip()

    rows = [line({c: c for c in columns})]
    rows += [line({c: columns[c][i] for c in columns}) for i in range(len(table.rows))]
    return "\n".join(rows)


def _cmd_refs(args: argparse.Namespace) -> int:
    from mist_zarr.refs import write_refs

    levels = None if args.level is None else [args.level]
    written = write_refs(args.image, args.out, levels=levels, url=args.url,
                         zarr_format=args.zarr_format)
    for path in written:
        print(f"wrote {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from mist_zarr.serve import run

    run(args.root, host=args.host, port=args.port, listing=args.listing,
        delay=args.delay_ms / 1000, viewer=not args.no_viewer)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # One declaration per verb, in the order `--help` lists them: long, but a
    # flat list reads as the reference it is (docs/cli.md is generated from it).
    parser = argparse.ArgumentParser(
        prog="mist-zarr",
        description="Store medical images once, losslessly (HTJ2K in Zarr v3); read any resolution.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="write a generated CT phantom and print every level's size")
    p.add_argument("--out", default="demo-output/phantom.zarr", help="where to write (default: %(default)s)")
    p.add_argument("--slices", type=int, default=32, help="number of slices (default: %(default)s)")
    p.add_argument("--size", type=int, default=512, help="slice edge in pixels (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="describe a stored image: shape, levels, bytes per level")
    p.add_argument("store", help="path or URL of a mist-zarr image group")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert DICOM / NIfTI / PNG / JPEG / TIFF into a dataset root")
    p.add_argument("src", nargs="+", help="files or folders (searched recursively)")
    p.add_argument("dest", help="dataset root, a path or URL (created if missing)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace images already converted")
    group.add_argument("--skip-existing", action="store_true",
                       help="keep images already completely converted (resume)")
    p.add_argument("--alpha", type=int, default=DEFAULT_ALPHA,
                   help="smallest level edge: levels = ceil(log2(min(Y, X) / alpha)) (default: %(default)s)")
    p.add_argument("--labels", nargs="?", const=True, metavar="GLOB",
                   help="store integer sources as label maps (true labels at every level, beside "
                        "the image on their grid): all non-DICOM sources, or the file names "
                        "matching GLOB (NIfTI files with intent label are always label maps)")
    p.add_argument("--quantize", metavar="DTYPE",
                   help="store non-integral float data quantised to this integer dtype (lossy, recorded)")
    p.add_argument("--threads", type=int,
                   help="encoder threads per image (default: all cores; 1 with --workers)")
    p.add_argument("--workers", type=int,
                   help="convert series in parallel on a local dask cluster of N processes; "
                        "a series larger than --split-mb is written in slice ranges by N "
                        "processes")
    p.add_argument("--batch-mb", type=float, default=256,
                   help="read and write DICOM stacks larger than this in slice batches of at most "
                        "this size, bounding memory per worker; 0 reads every image whole "
                        "(default: %(default)s)")
    p.add_argument("--split-mb", type=float, default=256,
                   help="with --workers or --scheduler, write a DICOM stack larger than this in "
                        "slice ranges by several workers; 0 never splits (default: %(default)s)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="use an existing dask.distributed scheduler (e.g. tcp://host:8786)")
    p.add_argument("--report", metavar="FILE", help="also write the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (scan and convert)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="export an image down the format hierarchy at any level")
    p.add_argument("store", help="path or URL of a mist-zarr image or label map")
    p.add_argument("out", help="output file (NIfTI) or folder (DICOM, DICOM SEG, PNG, JPEG)")
    p.add_argument("--format", required=True, choices=["dicom", "nifti", "png", "jpeg"])
    level = p.add_mutually_exclusive_group()
    level.add_argument("--scale", type=int, help="level k (2**k times smaller in y and x)")
    level.add_argument("--size", type=int, help="the level whose shorter edge is closest >= N")
    p.add_argument("--bits", type=int, choices=[8, 16], help="PNG bit depth (default: native)")
    p.add_argument("--window", type=float, nargs=2, metavar=("CENTRE", "WIDTH"),
                   help="window for 8-bit pictures (default: the DICOM window, else min-max)")
    p.add_argument("--uncompressed", action="store_true",
                   help="DICOM: write uncompressed pixel data instead of the HTJ2K chunks")
    p.add_argument("--philips-scaling", choices=["precise", "display"], default="precise",
                   help="NIfTI of Philips MR with the private scale slope (2005,100E): "
                        "floating-point values (RS*SV+RI)/(RS*SS), as dcm2niix (default), or "
                        "the DICOM display values RS*SV+RI (dcm2niix -p n)")
    p.add_argument("--colour", action="store_true",
                   help="label map to PNG: false colour (one fixed colour per label)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("verify", help="decode every chunk and check it against its checksum")
    p.add_argument("path", help="an image or a dataset root")
    p.add_argument("--levels", action="store_true",
                   help="also check that every level's prefix decodes like the full stream")
    p.add_argument("--source", help="also compare with the source files (as given to convert)")
    p.add_argument("--workers", type=int, help="processes for a dataset (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("ls", help="print the dataset's catalog (one row per image)")
    p.add_argument("dest", help="dataset root (a path or URL; over plain HTTP it needs catalog.parquet)")
    p.add_argument("--columns", help="comma-separated catalog columns to print (default: the main ones)")
    p.add_argument("--refresh", action="store_true", help="rebuild the catalog by scanning the dataset")
    p.add_argument("--failures", action="store_true",
                   help="print the failure report (failures.csv) instead")
    p.add_argument("--warnings", action="store_true",
                   help="print every image's conversion warnings instead (path: warning)")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser("catalog", help="(re)build the dataset's catalog.parquet")
    p.add_argument("dest", help="dataset root (a path or a URL that can be listed)")
    p.set_defaults(func=_cmd_catalog)

    p = sub.add_parser("refs", help="write fsspec reference files (kerchunk JSON): each level as a "
                                    "virtual Zarr for static hosting")
    p.add_argument("image", help="path or URL of a mist-zarr image")
    p.add_argument("out", help="folder for s{K}.json per level, or a .json file with --level")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--level", type=int, metavar="K", help="only level K")
    level.add_argument("--all", action="store_true", help="every level (the default)")
    p.add_argument("--url", help="URL the image will be served at; chunk references are "
                                 "{URL}/image/c/... (default: the image's own location)")
    p.add_argument("--zarr-format", type=int, choices=[2, 3], default=3,
                   help="Zarr v3, or v2 with the numcodecs codec (default: %(default)s)")
    p.set_defaults(func=_cmd_refs)

    p = sub.add_parser("serve", help="serve a directory read-only over HTTP with Range support, "
                                     "each image's levels as OME-Zarr at <image>/ome/, and a web "
                                     "viewer at /")
    p.add_argument("root", help="directory to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--listing", action="store_true", help="allow directory listings")
    # simulated latency per request, for benchmarks: not a user feature
    p.add_argument("--delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--no-viewer", action="store_true",
                   help="no web viewer: / is the root directory (listed with --listing)")
    p.set_defaults(func=_cmd_serve)
    return parser


def _version() -> str:
    from mist_zarr import __version__

    return f"mist-zarr {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader left (`mist-zarr info ... | head`): not an error to print
        # Python flushes stdout again at exit; point it at devnull so that flush is silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a tool that SIGPIPE ended
    except (ValueError, OSError, TypeError) as exc:
        print(f"mist-zarr {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``mist-zarr`` command: :func:`main`, then exit with its status."""
    code = main()
    # The interpreter's last collections walk every object of the stack a command loaded
    # (zarr, pydicom, pyarrow), a noticeable part of a small convert's time
    # (docs/architecture.md, "Imports"). Everything a command writes is closed and flushed
    # by now, and nothing it leaves needs a collection to be finalized, so the objects are
    # frozen out of those passes.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
