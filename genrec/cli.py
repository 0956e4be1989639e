"""The ``genrec`` command: a thin layer over the library.

    genrec train --config configs/ml-1m/hstu.yaml [--set train.lr=0.002 --set train.epochs=50 ...] [--resume|--overwrite]
    genrec train --config ... --nproc 4                    (data-parallel on 4 processes of this machine)
    torchrun --nproc_per_node 4 [--nnodes ...] -m genrec train --config ...      (the same, any torchrun setup)
    genrec train-ranker --config configs/ml-1m/ranking-hstu.yaml [--nproc 4]   (ranking; data-parallel likewise)
    genrec evaluate --checkpoint runs/ml-1m/hstu [--target test] [--candidates sampled]
    genrec recommend --checkpoint runs/ml-1m/hstu --history 1193,661,914 -k 10
    genrec serve --checkpoint runs/ml-1m/hstu [--host 127.0.0.1 --port 8000] [--workers 2]
    genrec serve --checkpoint runs/ml-1m/hstu --ranker runs/ranking/ml-1m/hstu [--retrieve-k 200]
                 [--task-weights like=1,love=0.5]
    genrec export --checkpoint runs/ml-1m/hstu --format torch-export --output exports/ml-1m-hstu
    genrec data fetch ml-1m [--cache-dir DIR]
    genrec data list
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from genrec import __version__


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, then ``--data-dir`` and ``--output-dir`` as the overrides they stand for."""
    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return overrides


def _check_nproc(args: argparse.Namespace) -> bool:
    """Whether ``--nproc N`` asks this command to start N > 1 processes under torchrun (ValueError when it is out of
    range, or given to a process torchrun already started)."""
    from genrec.train import distributed

    if args.nproc is None:
        return False
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if distributed.launched_by_torchrun():
        raise ValueError("--nproc starts torchrun itself; under torchrun, leave it out (torchrun sets the processes)")
    return args.nproc > 1


def _cmd_train(args: argparse.Namespace) -> int:
    from genrec.config import load_config
    from genrec.train import distributed

    if _check_nproc(args):
        return _launch_torchrun(args.nproc, _without_nproc(args.argv))
    config = load_config(args.config, _overrides(args))
    from genrec.train.loop import train

    info = distributed.init_from_env(config.train.device)
    if info is not None and not info.is_main:  # one process reports: the others log warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    try:
        results = train(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, dist=info)
    except BaseException:
        distributed.shutdown(info, wait=False)
        raise
    distributed.shutdown(info)
    if info is None or info.is_main:
        _print_results(results)
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line without its ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``genrec <argv>`` on ``nproc`` processes of this machine under torchrun (``torch.distributed.run``,
    standalone: a local rendezvous on a free port); the exit status of the run."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "genrec", *argv]  # fmt: skip
    logging.getLogger("genrec.train").info("starting %d processes: %s", nproc, " ".join(command))
    return subprocess.call(command)


def _cmd_train_ranker(args: argparse.Namespace) -> int:
    from genrec.config import load_ranking_config
    from genrec.train import distributed

    if _check_nproc(args):
        return _launch_torchrun(args.nproc, _without_nproc(args.argv))
    config = load_ranking_config(args.config, _overrides(args))
    from genrec.train.ranking import train_ranker

    info = distributed.init_from_env(config.train.device)
    if info is not None and not info.is_main:  # one process reports: the others log warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    try:
        results = train_ranker(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                               dist=info)  # fmt: skip
    except BaseException:
        distributed.shutdown(info, wait=False)
        raise
    distributed.shutdown(info)
    if info is not None and not info.is_main:
        return 0
    print(f"\n{results['dataset']} ({results['split']}) / {results['model']}: best validation epoch "
          f"{results['best_epoch']} of {results['epochs_run']}; selection: {results['selection']['rule']}")  # fmt: skip
    for note in results["data"]["notes"]:
        print(f"data note: {note}")
    print(f"test ({results['test']['protocol'].get('part', 'test')}):")
    for task, metrics in results["test"]["metrics"].items():
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"  {task:>10} {shown}")
    return 0


def _print_results(results: dict) -> None:
    from genrec.eval.evaluate import INTEGER_METRICS

    test = results["test"]
    print(f"\n{results['dataset']} / {results['model']}: best validation epoch {results['best_epoch']} "
          f"of {results['epochs_run']} ({results['seconds_per_epoch'] or 0:.1f} s/epoch)")  # fmt: skip
    print(f"protocol: {test['protocol']['name']}")
    for k, v in test["metrics"].items():
        print(f"  {k:>9} {int(v)}" if k in INTEGER_METRICS else f"  {k:>9} {v:.4f}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from genrec.api import Recommender

    rec = Recommender.load(args.checkpoint, data_dir=args.data_dir)
    protocol, metrics = rec.evaluate(
        target=args.target, candidates=args.candidates, num_negatives=args.num_negatives, users=args.users
    )
    print(protocol.describe())
    print(json.dumps({"protocol": protocol.to_dict(), "metrics": metrics}, indent=2))
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from genrec.api import Recommender

    rec = Recommender.load(args.checkpoint)
    history = [h.strip() for h in args.history.split(",") if h.strip()]
    (result,) = rec.recommend_batch([history], k=args.k, exclude_seen=not args.include_seen)
    if result.unknown:
        shown = ", ".join(result.unknown)
        print(f"warning: ignored {len(result.unknown)} unknown item id(s): {shown}", file=sys.stderr)
    if result.fallback:
        print(f"warning: no known item in the history: {result.fallback} fallback", file=sys.stderr)
    titles = rec.titles_ or {}
    for rank, (item, score) in enumerate(zip(result.items, result.scores), start=1):
        title = titles.get(item, "")
        print(f"{rank:>3}  {item:>8}  {score:8.4f}  {title}")
    return 0


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_task_weights(text: str) -> dict[str, float]:
    """``"like=1,love=0.5"`` -> ``{"like": 1.0, "love": 0.5}`` (finite numbers, each task once); ``ValueError`` naming
    the bad part otherwise."""
    import math

    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = (x.strip() for x in part.partition("="))
        if not part.strip():
            continue
        if not sep or not name:
            raise ValueError(f"--task-weights: expected TASK=WEIGHT, got {part.strip()!r} (e.g. like=1,love=0.5)")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--task-weights: the weight of {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weight):
            raise ValueError(f"--task-weights: the weight of {name!r} must be finite, got {value!r}")
        if name in weights:
            raise ValueError(f"--task-weights: {name!r} is given twice")
        weights[name] = weight
    if not weights:
        raise ValueError("--task-weights: no TASK=WEIGHT given (e.g. like=1,love=0.5)")
    return weights


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    import torch

    from genrec.api import Recommender
    from genrec.serve.app import create_app
    from genrec.serve.two_stage import DEFAULT_RETRIEVE_K, TwoStage
    from genrec.serve.workers import run_server, serve_workers

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.ranker is None and (args.retrieve_k is not None or args.task_weights is not None):
        raise ValueError("--retrieve-k and --task-weights apply to two-stage serving: add --ranker DIR")
    retrieve_k = DEFAULT_RETRIEVE_K if args.retrieve_k is None else args.retrieve_k
    task_weights = parse_task_weights(args.task_weights) if args.task_weights is not None else None
    threads = args.threads
    if threads == 0 and args.workers > 1:  # N processes share the cores: PyTorch's default would oversubscribe them
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    if threads > 0:
        torch.set_num_threads(threads)
    ranker = None
    try:
        rec = Recommender.load(args.checkpoint)  # in the supervisor too: a bad checkpoint fails here, before workers
        if args.ranker is not None:
            from genrec.ranking_api import Ranker

            ranker = Ranker.load(args.ranker)
            # unknown task names, a retrieve_k out of bounds: refused here, before any worker starts
            TwoStage(rec, ranker, retrieve_k=retrieve_k, task_weights=task_weights)
    except KeyboardInterrupt:  # Ctrl-C while the models load, before the server handles signals
        return 130
    if args.host not in LOOPBACK_HOSTS:
        logging.getLogger("genrec.serve").warning(
            "binding to %s: the service is reachable from other machines and has no authentication", args.host
        )
    app_settings = {
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "model_thread": args.model_thread,
        "max_queue": args.max_queue,
        "max_body_bytes": args.max_body_bytes,
    }
    if ranker is not None:
        app_settings.update(retrieve_k=retrieve_k, task_weights=task_weights)
    if args.workers == 1:  # until SIGINT / SIGTERM, then a graceful shutdown
        run_server(create_app(rec, ranker=ranker, **app_settings), host=args.host, port=args.port,
                   log_level=args.log_level, access_log=args.access_log)  # fmt: skip
        return 0
    # N worker processes, each with its own model copies, batcher and SO_REUSEPORT socket (genrec.serve.workers).
    del rec, ranker
    settings = {"checkpoint": str(args.checkpoint), "ranker": None if args.ranker is None else str(args.ranker),
                "threads": threads, "app": app_settings}  # fmt: skip
    return serve_workers(args.workers, args.host, args.port, settings, args.log_level, args.access_log)


def _cmd_export(args: argparse.Namespace) -> int:
    from genrec.api import Recommender
    from genrec.export import check_parity, export_recommender, load_exported

    rec = Recommender.load(args.checkpoint)
    out = export_recommender(rec, args.output, args.format, max_batch=args.max_batch)
    diff = check_parity(rec, load_exported(out))
    print(f"exported {rec.model_id_} to {out} ({args.format}); max |exported - eager| = {diff:.2e}")
    if diff > 1e-5:
        print(f"genrec: error: parity check failed ({diff:.2e} > 1e-5)", file=sys.stderr)
        return 1
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from genrec.data.registry import fetch_dataset

    path = fetch_dataset(args.name, args.cache_dir, force=args.force)
    print(f"{args.name}: files in {path}")
    return 0


def _cmd_data_list(args: argparse.Namespace) -> int:
    from genrec.data.registry import DATASETS

    for name, spec in DATASETS.items():
        print(f"{name:<18} {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genrec", description="Generative recommendation (HSTU) on interaction logs.")
    p.add_argument("--version", action="version", version=f"genrec {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", required=True, help="YAML run config, e.g. configs/ml-1m/hstu.yaml")
    t.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", default=[],
                   help="override config values, e.g. --set train.lr=0.002 train.epochs=50; may be repeated, "
                        "every value applies (later ones win for the same key)")  # fmt: skip
    t.add_argument("--data-dir", help="directory holding the dataset files (else $GENREC_DATA_DIR, the cache dir)")
    t.add_argument("--output-dir", help="run directory (overrides output_dir)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in the output directory from its checkpoint.pt (same model and data)")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the run in the output directory (its run files are removed first); without this "
                           "or --resume, a directory that already holds a run is refused")  # fmt: skip
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none anyway when stderr is not a terminal)")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="data-parallel training on N processes of this machine (starts torchrun; one per GPU with "
                        "train.device=cuda). train.batch_size stays the global batch and must divide by N. For "
                        "several machines run `torchrun ... -m genrec train` instead")  # fmt: skip
    t.set_defaults(func=_cmd_train)

    tr = sub.add_parser("train-ranker", help="train a ranking model (HSTU ranker, DLRM, DIN, floors) from a YAML config")
    tr.add_argument("--config", required=True, help="YAML ranking run config, e.g. configs/ml-1m/ranking-hstu.yaml")
    tr.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", default=[],
                    help="override config values, e.g. train.lr=0.002 (may be repeated; every value applies)")
    tr.add_argument("--data-dir", help="directory holding the dataset files (else $GENREC_DATA_DIR, the cache dir)")
    tr.add_argument("--output-dir", help="run directory (overrides output_dir)")
    run_mode = tr.add_mutually_exclusive_group()
    run_mode.add_argument("--resume", action="store_true", help="continue the run in OUTPUT_DIR from its checkpoint")
    run_mode.add_argument("--overwrite", action="store_true", help="replace the run that OUTPUT_DIR already holds")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars (there are none unless stderr is a terminal)")
    tr.add_argument("--nproc", type=int, default=None, metavar="N",
                    help="data-parallel training on N processes of this machine (starts torchrun; one per GPU with "
                         "train.device=cuda). train.batch_size stays the global batch and must divide by N; "
                         "train.task_balancing must be fixed. For several machines run `torchrun ... -m genrec "
                         "train-ranker` instead")  # fmt: skip
    tr.set_defaults(func=_cmd_train_ranker)

    e = sub.add_parser("evaluate", help="evaluate a trained run directory")
    e.add_argument("--checkpoint", required=True, help="run directory written by genrec train")
    e.add_argument("--data-dir", help="directory holding the dataset files, if not where the run found them")
    e.add_argument("--target", choices=["valid", "test"], default="test",
                   help="which held-out item to rank: the validation item or the test item (default)")
    e.add_argument("--candidates", choices=["full", "sampled"], default=None,
                   help="rank against the full catalogue or sampled negatives (default: the run's protocol)")
    e.add_argument("--num-negatives", type=int, default=None,
                   help="negatives per user with --candidates sampled (default: the run's eval.num_negatives)")
    e.add_argument("--users", choices=["all", "with-timestamps", "without-timestamps"], default="all",
                   help="evaluate every user (default), or only those with / without timestamps")
    e.set_defaults(func=_cmd_evaluate)

    r = sub.add_parser("recommend", help="top-k items for a history of raw item ids")
    r.add_argument("--checkpoint", required=True, help="run directory written by genrec train")
    r.add_argument("--history", required=True, help="comma-separated raw item ids, oldest first")
    r.add_argument("-k", type=int, default=10, help="how many items to recommend (default 10)")
    r.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    r.set_defaults(func=_cmd_recommend)

    s = sub.add_parser("serve", help="serve a trained model over HTTP (FastAPI + uvicorn)")
    s.add_argument("--checkpoint", required=True,
                   help="retrieval model: run directory written by genrec train (read only)")
    s.add_argument("--ranker", metavar="DIR",
                   help="ranking model (a Ranker.save directory or a genrec train-ranker run): POST /v1/recommend "
                        "then retrieves --retrieve-k items and re-ranks them; POST /v1/rank answers its per-task "
                        "probabilities")  # fmt: skip
    s.add_argument("--retrieve-k", type=int, default=None, metavar="N",
                   help="with --ranker: items retrieved and re-ranked per request (default 200, at most 1000; a "
                        "request's retrieve_k overrides it)")  # fmt: skip
    s.add_argument("--task-weights", metavar="TASK=W,...",
                   help="with --ranker: weight of each task's probability in the combined score, e.g. "
                        "like=1,love=0.5 (tasks not named: 1; a request's task_weights overrides them)")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--max-batch", type=int, default=64, help="most requests per forward pass")
    s.add_argument("--max-wait-ms", type=float, default=0.0, help="batch wait (0: take the queue)")
    s.add_argument("--model-thread", action="store_true",
                   help="run forward passes in a worker thread instead of on the event loop")
    s.add_argument("--max-queue", type=int, default=1024, help="waiting requests beyond this get 503")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    s.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads per worker (0 = PyTorch's default; with --workers N, cores / N)")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes on the port, each with its own model, batcher and socket (metrics summed)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level")
    s.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    s.set_defaults(func=_cmd_serve)

    x = sub.add_parser("export", help="export the encoder and scorer (torch.export .pt2) with a parity check")
    x.add_argument("--checkpoint", required=True, help="run directory written by genrec train")
    x.add_argument("--format", default="torch-export", choices=["torch-export"],
                   help="export format (torch-export: torch.export programs, .pt2)")
    x.add_argument("--output", required=True, help="new directory for encoder.pt2, scorer.pt2, manifest.json")
    x.add_argument("--max-batch", type=int, default=4096, help="largest batch the exported programs accept")
    x.set_defaults(func=_cmd_export)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download and verify a dataset into the cache dir")
    f.add_argument("name", help="registry name of the dataset (see `genrec data list`)")
    f.add_argument("--cache-dir", help="where to put the files (default $GENREC_CACHE_DIR, else ~/.cache/genrec)")
    f.add_argument("--force", action="store_true", help="download again even if the files are already there")
    f.set_defaults(func=_cmd_data_fetch)
    ls = dsub.add_parser("list", help="known datasets")
    ls.set_defaults(func=_cmd_data_list)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line itself, for `train --nproc`, which runs it again under torchrun
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, FloatingPointError) as exc:
        # Bad input (config, data file, checkpoint, ids), a failed download or a diverged training run: one line
        # naming what and which file, no traceback.
        message = " ".join(str(exc).split()) if not isinstance(exc, KeyError) else str(exc)
        print(f"genrec: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
