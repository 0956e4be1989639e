"""Delayed feedback with window heads ("Lattice Zipper") against pending-as-negative, waiting and the Oracle, on a
synthetic conversion stream with known truths and on the Taobao UserBehavior head (a benchmark, not a test).

Methods (``genrec.data.delayed``; one DLRM ranker with one task per window for all of them, same size, optimizer,
batch, passes and seeds; ``genrec.train.streaming`` runs the stream):

* Pretrain: the shared pretrained model, not trained further;
* Vanilla: pending-as-negative, each example trained once at its segment's end;
* Wait: each example trained once its longest window has closed, on the complete label;
* WindowHeads: each example hash-routed to one window head, trained once that window has closed, on that head only;
  the longest-window head serves;
* Oracle: each example trained at its segment's end on its true label (an upper bound: it reads the future).

Every segment is predicted before anything of it is trained on; all methods are evaluated on the true
longest-window labels. Metrics (seed means): calibration (Σ predicted / Σ true positives), AUC, PR-AUC (average
precision), log loss; paired user-bootstrap CIs (``genrec.eval.ranking_metrics.bootstrap_user_counts``: every
method, every seed, the same user draws) of each method against Vanilla and against Pretrain, for AUC, PR-AUC, log
loss and the calibration error |calibration − 1|; RI = (m − Pretrain) / (Oracle − Pretrain) for AUC, PR-AUC and log
loss (the log loss RI flips sign, so higher is better for all), with the same resamples for its interval.

    python bench/lattice_delay.py                                   # both sources, seeds 0 1, default sizes
    python bench/lattice_delay.py --sources synthetic --events 50000 --seeds 0 --resamples 100 --out /tmp/d.json
    python bench/lattice_delay.py --markdown                        # tables from results/lattice_delay.json

Windows: 1 h / 24 h / 72 h on the synthetic stream; 1 h / 6 h / 24 h on the 9-day Taobao head (``--taobao-windows-h``:
a 72 h window would leave 3 streamed days once the pretrain and the uncensored-label margin are taken). The Taobao
head is found through ``--data-dir``, else ``$GENREC_DATA_DIR``, else the cache directory. About 9 minutes at one
thread with the defaults (500k synthetic clicks, 2 seeds, 500 resamples).

Rows (``results/lattice_delay.json``; rows of the sources run are replaced, others kept): one per (dataset,
variant) with ``study`` "delay", ``task`` the longest window's task (``convert@72h`` synthetic, ``convert@24h`` Taobao), ``metrics`` {calibration, AUC, PR-AUC, LogLoss, each
per seed in ``per_seed``}, ``ci`` {"vs_vanilla", "vs_pretrain": {metric: {diff, low, high, excludes_zero}}, "RI":
{metric: {value, low, high}}} (null for Pretrain's own comparisons), ``seeds``, ``command``, ``protocol``,
``parameters``, ``seconds``, ``evaluated`` (examples) and ``positives``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genrec.data.delayed import (  # noqa: E402
    NEVER,
    WindowRouting,
    pretrain_plan,
    segment_boundaries,
    training_plan,
    window_labels,
)
from genrec.data.ranking.sources import find_dataset_folder, taobao_events  # noqa: E402
from genrec.data.ranking_batch import RankingSchema  # noqa: E402
from genrec.data.synthetic import SyntheticStreamConfig, generate_conversion_stream  # noqa: E402
from genrec.eval.ranking_metrics import bootstrap_user_counts  # noqa: E402
from genrec.io import write_json  # noqa: E402
from genrec.models.dlrm import DLRMRanker, DLRMRankerConfig  # noqa: E402
from genrec.models.hstu_ranker import HSTURanker, HSTURankerConfig  # noqa: E402
from genrec.train.streaming import (  # noqa: E402
    StreamConfig,
    StreamData,
    StreamHistory,
    pretrain,
    resampled_stream_metrics,
    run_stream,
    stream_metrics,
)

RESULTS = ROOT / "results" / "lattice_delay.json"
HOUR, DAY = 3600, 86400
SYNTHETIC_WINDOWS_H = (1, 24, 72)
TAOBAO_WINDOWS_H = (1, 6, 24)
METHODS = ("pretrain", "vanilla", "wait", "window_heads", "oracle")
LABELS = {"pretrain": "Pretrain", "vanilla": "Vanilla", "wait": "Wait", "window_heads": "WindowHeads",
          "oracle": "Oracle"}  # fmt: skip
METRICS = {"calibration": "calibration", "auc": "AUC", "pr_auc": "PR-AUC", "log_loss": "LogLoss"}
# TAOBAO: the official window 2017-11-25 .. 12-03 in Beijing time (UTC+8) starts at this Unix second
TAOBAO_START = 1511539200


# ------------------------------------------------------------------------------------------------ sources
def _tasks(windows_h) -> tuple[str, ...]:
    return tuple(f"convert@{h:g}h" for h in windows_h)


def synthetic_source(args) -> tuple[StreamData, np.ndarray, dict]:
    cfg = SyntheticStreamConfig(num_events=args.events, days=args.days, item_lifetime_days=args.item_lifetime_days,
                                seed=args.data_seed)  # fmt: skip
    s = generate_conversion_stream(cfg)
    windows_h = tuple(args.synthetic_windows_h)
    schema = RankingSchema(num_items=s.num_items, num_users=s.num_users, tasks=_tasks(windows_h), actions=("click",),
                           user_features=("context",), user_feature_sizes=(s.num_contexts,))  # fmt: skip
    data = StreamData(users=s.users, items=s.items, features=s.contexts[:, None], click=s.click_time,
                      convert=s.convert_time, schema=schema)  # fmt: skip
    b = segment_boundaries(int(args.pretrain_days * DAY), int(args.days * DAY), int(args.segment_minutes * 60))
    info = {"true_prob": s.window_prob(windows_h[-1] * HOUR), "windows_h": windows_h,
            "params": {"generator": repr(cfg)}}  # fmt: skip
    return data, b, info


def _count_before(keys: np.ndarray, times: np.ndarray, at_keys: np.ndarray, at_times: np.ndarray) -> np.ndarray:
    """For each (key, time) query, how many events of the same key happened strictly before that time."""
    shift = np.int64(1 << 32)  # times are Unix seconds < 2^32, keys < 2^31: key * 2^32 + time fits int64
    composite = np.sort(keys * shift + times)
    return np.searchsorted(composite, at_keys * shift + at_times, side="left") - np.searchsorted(
        composite, at_keys * shift, side="left")


def _history(eu: np.ndarray, et: np.ndarray, ei: np.ndarray, ea: np.ndarray, users: np.ndarray, click: np.ndarray,
             max_len: int) -> StreamHistory:  # fmt: skip
    """Each view's user's most recent ``max_len`` events strictly before the view, oldest first."""
    order = np.lexsort((et, eu))  # events by user, then time
    eu, et, ei, ea = eu[order], et[order], ei[order], ea[order]
    shift = np.int64(1 << 32)
    key = eu * shift + et
    start = np.searchsorted(eu, users, side="left")  # [N] first event of the view's user
    end = np.searchsorted(key, users * shift + click, side="left")  # [N] first event at or after the click
    lengths = np.minimum(end - start, max_len)
    slots = np.arange(max_len)[None, :]
    idx = (end - lengths)[:, None] + slots  # [N, L]
    real = slots < lengths[:, None]
    idx = np.where(real, idx, 0)
    return StreamHistory(items=np.where(real, ei[idx], 0), actions=np.where(real, ea[idx], 0),
                         times=np.where(real, et[idx], 0), lengths=lengths.astype(np.int64))  # fmt: skip


def taobao_source(args) -> tuple[StreamData, np.ndarray, dict]:
    """Head page views joined to the first buy of the same (user, item) at or after the view (GDFM-style), with
    count features read from the log strictly before each view."""
    folder = find_dataset_folder("taobao-userbehavior-head", args.data_dir)
    events, notes = taobao_events(Path(folder) / "UserBehavior_head.csv")
    ev = events[(events["timestamp"] >= TAOBAO_START) & (events["timestamp"] < TAOBAO_START + 9 * DAY)]
    n_user = ev.groupby("user")["item"].size()
    ev = ev[ev["user"].isin(n_user[n_user >= 10].index)].reset_index(drop=True)  # GDFM keeps users with >= 10 events
    ucode = pd.factorize(ev["user"], sort=True)[0].astype(np.int64)
    icode = pd.factorize(ev["item"], sort=True)[0].astype(np.int64)
    ev = ev.assign(u=ucode + 1, i=icode + 1)
    pv = ev[ev["candidate"]].sort_values("timestamp", kind="stable").drop_duplicates(["u", "i"], keep="first")
    buys = ev[ev["task:buy"] == 1][["u", "i", "timestamp"]].rename(columns={"timestamp": "buy"})
    joined = pv[["u", "i", "timestamp"]].merge(buys, on=["u", "i"], how="left")
    joined = joined[joined["buy"].isna() | (joined["buy"] >= joined["timestamp"])]
    first_buy = joined.groupby(["u", "i", "timestamp"], sort=False)["buy"].min().reset_index()
    views = pv[["u", "i", "timestamp"]].merge(first_buy, on=["u", "i", "timestamp"], how="left")
    views = views.sort_values("timestamp", kind="stable").reset_index(drop=True)
    users, items = views["u"].to_numpy(np.int64), views["i"].to_numpy(np.int64)
    click = views["timestamp"].to_numpy(np.int64)
    has_buy = views["buy"].notna().to_numpy()
    convert = np.full(click.size, NEVER, np.int64)
    convert[has_buy] = views["buy"].to_numpy(np.float64)[has_buy].astype(np.int64)
    # dense features: log1p of counts of events strictly before the view (all observed by then)
    et, eu, ei = ev["timestamp"].to_numpy(np.int64), ev["u"].to_numpy(np.int64), ev["i"].to_numpy(np.int64)
    kind = np.log2(ev["actions"].to_numpy(np.int64)).round().astype(np.int64)  # 0 pv, 1 cart, 2 fav, 3 buy
    feats = {
        "user_views_before": _count_before(eu[kind == 0], et[kind == 0], users, click),
        "user_buys_before": _count_before(eu[kind == 3], et[kind == 3], users, click),
        "user_carts_favs_before": _count_before(eu[(kind == 1) | (kind == 2)], et[(kind == 1) | (kind == 2)],
                                                users, click),
        "item_views_before": _count_before(ei[kind == 0], et[kind == 0], items, click),
    }
    dense = np.log1p(np.stack(list(feats.values()), axis=1)).astype(np.float32)
    hour = ((click + 8 * HOUR) // HOUR) % 24 + 1  # Beijing hour of day, 1..24
    windows_h = tuple(args.taobao_windows_h)
    schema = RankingSchema(num_items=int(ev["i"].max()), num_users=int(ev["u"].max()), tasks=_tasks(windows_h),
                           actions=("pv", "cart", "fav", "buy"), user_features=("hour",), user_feature_sizes=(24,),
                           dense_features=tuple(feats))  # fmt: skip
    history = None
    if args.model == "hstu-ranker":  # the user's earlier behaviours (views, carts, favs, buys), all observed by then
        history = _history(eu, et, ei, ev["actions"].to_numpy(np.int64), users, click, args.history_len)
    data = StreamData(users=users, items=items, features=hour[:, None], click=click, convert=convert, schema=schema,
                      dense=dense, history=history)  # fmt: skip
    # the stream ends when the longest window of its last click closes at the end of the log (labels uncensored)
    end = TAOBAO_START + 9 * DAY - int(windows_h[-1] * HOUR)
    b = segment_boundaries(TAOBAO_START + int(args.taobao_pretrain_days * DAY), end,
                           int(args.taobao_segment_minutes * 60))  # fmt: skip
    b = b[b <= end] if b[-1] > end else b
    return data, b, {"true_prob": None, "windows_h": windows_h,
                     "params": {"notes": notes, "views": len(views), "dense_features": list(feats)}}


# ------------------------------------------------------------------------------------------------ running
def run_source(data: StreamData, b: np.ndarray, windows_s: tuple[int, ...], args, batch_size: int
               ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, float]]:  # fmt: skip
    """{method: probs [S, M]}, eval_index [M], seconds per method (summed over seeds)."""
    routing = _routing(windows_s, args)
    pre = pretrain_plan(data.click, data.convert, int(b[0]), windows_s)
    rows = pre.at(0)
    rates = tuple(float(np.clip(pre.labels[rows, t].mean(), 1e-4, 0.5)) for t in range(len(windows_s)))
    if args.model == "dlrm":
        dlrm_cfg = DLRMRankerConfig(embedding_dim=16, bottom_mlp=(32,), top_mlp=(64, 32), task_base_rates=rates)

        def factory(schema):
            return DLRMRanker(schema, dlrm_cfg)
    else:
        hstu_cfg = HSTURankerConfig(embedding_dim=32, num_blocks=2, num_heads=2, attention_dim=16, linear_dim=16,
                                    max_history=args.history_len, task_base_rates=rates)  # fmt: skip

        def factory(schema):
            return HSTURanker(schema, hstu_cfg)
    plans = {m: training_plan(m, data.click, data.convert, b, routing, data.users, data.items)
             for m in METHODS[1:]}  # fmt: skip
    probs: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    seconds = dict.fromkeys(METHODS, 0.0)
    eval_index = None
    for seed in args.seeds:
        cfg = StreamConfig(batch_size=batch_size, lr=args.lr, passes=1, pretrain_epochs=args.pretrain_epochs,
                           head_weights=routing.probs, seed=seed)  # fmt: skip
        t0 = time.perf_counter()
        base = pretrain(factory, data, pre, cfg)
        seconds["pretrain"] += time.perf_counter() - t0
        for m in METHODS:
            t0 = time.perf_counter()
            plan = plans.get(m)
            res = run_stream(base, data, b, plan, cfg, head_weights=routing.probs if m == "window_heads" else None)
            seconds[m] += time.perf_counter() - t0
            probs[m].append(res.probs)
            eval_index = res.eval_index
            print(f"  seed {seed} {m:13s} {time.perf_counter() - t0:7.1f}s trained {res.trained:,} "
                  + " ".join(f"{k} {v:.4f}" for k, v in stream_metrics(res.probs, _labels(data, res.eval_index, windows_s[-1])).items()),
                  flush=True)  # fmt: skip
    return {m: np.stack(v) for m, v in probs.items()}, eval_index, seconds


def _routing(windows_s: tuple[int, ...], args) -> WindowRouting:
    """Uniform routing unless ``--routing-probs`` gives one probability per window."""
    if args.routing_probs is None:
        return WindowRouting.uniform(windows_s, salt=args.routing_salt)
    return WindowRouting(windows_s, tuple(args.routing_probs), salt=args.routing_salt)


def _labels(data: StreamData, idx: np.ndarray, longest_s: int) -> np.ndarray:
    return window_labels(data.click[idx], data.convert[idx], longest_s).astype(np.float64)


def _interval(samples: np.ndarray, point: float) -> dict:
    s = samples[np.isfinite(samples)]
    lo, hi = (float(x) for x in np.quantile(s, [0.025, 0.975])) if s.size else (float("nan"),) * 2
    return {"diff": point, "low": lo, "high": hi, "excludes_zero": bool(lo > 0 or hi < 0), "valid": int(s.size)}


def compare(probs: dict[str, np.ndarray], labels: np.ndarray, users: np.ndarray, resamples: int, seed: int
            ) -> tuple[dict, dict]:  # fmt: skip
    """Point metrics {method: {metric: (mean, per-seed)}} and CIs {method: {...}} from one set of user draws."""
    U = np.unique(users).size
    counts = bootstrap_user_counts(U, resamples, seed=seed)  # [R, U], shared by every method and seed
    full = np.ones((1, U), np.int64)
    point, boot = {}, {}
    for m, p in probs.items():
        per = [resampled_stream_metrics(ps, labels, users, full) for ps in p]
        point[m] = {k: float(np.mean([d[k][0] for d in per])) for k in METRICS}
        point[m]["per_seed"] = {k: [float(d[k][0]) for d in per] for k in METRICS}
        rs = [resampled_stream_metrics(ps, labels, users, counts) for ps in p]
        boot[m] = {k: np.mean([d[k] for d in rs], axis=0) for k in METRICS}  # [R] seed means
        boot[m]["cal_error"] = np.mean([np.abs(d["calibration"] - 1.0) for d in rs], axis=0)
        point[m]["cal_error"] = float(np.mean([abs(d["calibration"][0] - 1.0) for d in per]))
    cis = {}
    for m in probs:
        ci = {}
        for ref in ("vanilla", "pretrain"):
            if ref == m or ref not in probs:
                continue
            ci[f"vs_{ref}"] = {METRICS.get(k, k): _interval(boot[m][k] - boot[ref][k], point[m][k] - point[ref][k])
                               for k in ("auc", "pr_auc", "log_loss", "cal_error")}  # fmt: skip
        if "oracle" in probs and "pretrain" in probs and m not in ("pretrain",):
            ri = {}
            for k in ("auc", "pr_auc", "log_loss"):
                num, den = boot[m][k] - boot["pretrain"][k], boot["oracle"][k] - boot["pretrain"][k]
                pnum = point[m][k] - point["pretrain"][k]
                pden = point["oracle"][k] - point["pretrain"][k]
                with np.errstate(invalid="ignore", divide="ignore"):
                    r = num / den
                iv = _interval(r, pnum / pden if pden else float("nan"))
                gap = _interval(den, pden)
                ri[METRICS[k]] = {"value": iv["diff"], "low": iv["low"], "high": iv["high"],
                                  "oracle_gap_excludes_zero": gap["excludes_zero"],
                                  "oracle_gap": {kk: gap[kk] for kk in ("diff", "low", "high")}}  # fmt: skip
            ci["RI"] = ri
        cis[m] = ci or None
    return point, cis


def protocol_text(source: str, args, b: np.ndarray, data: StreamData, windows_h: tuple[float, ...]) -> str:
    wins = " / ".join(f"{h:g} h" for h in windows_h)
    W = f"{windows_h[-1]:g} h"
    probs = "uniform" if args.routing_probs is None else "/".join(f"{p:g}" for p in args.routing_probs)
    common = (f"Windows {wins}, hash routing of (user, item, click time) with probabilities {probs} "
              f"(salt {args.routing_salt}). Pretrain "
              f"({args.pretrain_epochs} epochs) on the clicks whose {W} window closed by the stream start, every head "
              f"on its window label; then {b.size - 1} segments, each predicted before training; every streamed "
              f"example trained once (1 pass, Adam lr {args.lr}); " + (
                  "DLRM (embedding 16, bottom MLP (32,), top (64, 32), one head per window; user id, item id, one "
                  "row categorical)" if args.model == "dlrm" else
                  f"HSTU ranker (summed variant, embedding 32, 2 blocks, 2 heads, one head per window; the user's "
                  f"last {args.history_len} behaviours before the view as history, the hour as a prefix token)") + (
              ". Evaluation on the true "
              f"{W} labels of every streamed click, the {W} head's prediction; paired user bootstrap "
              f"({args.resamples} resamples, the same draws for every method and seed), intervals of seed means."))
    if source == "synthetic":
        return (f"Synthetic conversion stream (genrec.data.synthetic, data seed {args.data_seed}): {len(data):,} "
                f"clicks over {args.days:g} days, item catalogue turning over every {args.item_lifetime_days:g} days (an "
                f"item lives that long), true p logistic in "
                f"user / item / context effects, item-dependent delay mixture (52% of conversions within 1 h, 81% "
                f"within 24 h, 96% within 72 h). Stream from day {args.pretrain_days:g} in "
                f"{args.segment_minutes:g}-minute segments. " + common)  # fmt: skip
    return ("Taobao UserBehavior head (users with >= 10 events in the official 9 days): first page view of each "
            "user-item pair joined to the first buy of the same user-item at or after it; delay = buy time - view "
            "time, raw (no GDFM x6 scaling). Dense features: log1p counts of the user's views, buys and carts/favs "
            "and of the item's views strictly before the view. GDFM-style stream in "
            f"{args.taobao_segment_minutes:g}-minute segments from day {args.taobao_pretrain_days:g} after 11-25 "
            "(Beijing time); GDFM pretrains on 2 days with complete labels, here the pretrain snapshot reads only "
            f"labels observed by the stream start. The stream stops {W} before the end of the log so every "
            f"evaluated {W} label is complete; the longest window is {W} (not 72 h) to keep enough streamed days "
            "on the 9-day head. With a few hundred streamed positives AUC cannot resolve these methods (its "
            "standard error is ~0.02); calibration can. " + common)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=["synthetic", "taobao"], choices=["synthetic", "taobao"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--events", type=int, default=500_000, help="synthetic clicks (10k .. 10M)")
    ap.add_argument("--days", type=float, default=14.0)
    ap.add_argument("--pretrain-days", type=float, default=5.0, help="synthetic stream start (day)")
    ap.add_argument("--segment-minutes", type=float, default=60.0)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--item-lifetime-days", type=float, default=3.0,
                    help="synthetic item lifetime (catalogue turnover); rows of another value get their own dataset")
    ap.add_argument("--taobao-pretrain-days", type=float, default=2.0, help="Taobao stream start (days after 11-25)")
    ap.add_argument("--taobao-segment-minutes", type=float, default=20.0)
    ap.add_argument("--taobao-windows-h", type=float, nargs="+", default=list(TAOBAO_WINDOWS_H))
    ap.add_argument("--synthetic-windows-h", type=float, nargs="+", default=list(SYNTHETIC_WINDOWS_H),
                    help="attribution windows of the synthetic stream, ascending; the longest is evaluated")
    ap.add_argument("--model", default="dlrm", choices=["dlrm", "hstu-ranker"],
                    help="hstu-ranker: Taobao only, each view with its user's earlier behaviours as history")
    ap.add_argument("--history-len", type=int, default=50, help="hstu-ranker: most recent events kept")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--routing-salt", type=int, default=0)
    ap.add_argument("--routing-probs", type=float, nargs="+", default=None,
                    help="window-heads routing probability per window, shortest first (default uniform)")
    ap.add_argument("--resamples", type=int, default=500)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--markdown", action="store_true", help="print the tables of --out and exit")
    args = ap.parse_args(argv)
    if args.model == "hstu-ranker" and "synthetic" in args.sources:
        ap.error("--model hstu-ranker runs on --sources taobao only (synthetic rows have no history)")
    if args.markdown:
        print(markdown_tables(args.out))
        return 0
    command = " ".join(["python bench/lattice_delay.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    rows = []
    for source in args.sources:
        print(f"[{source}]", flush=True)
        data, b, info = synthetic_source(args) if source == "synthetic" else taobao_source(args)
        windows_h = info["windows_h"]
        windows_s = tuple(int(h * HOUR) for h in windows_h)
        try:
            _routing(windows_s, args)
        except ValueError as e:
            ap.error(f"--routing-probs: {e}")
        probs, idx, seconds = run_source(data, b, windows_s, args, batch_size=512 if source == "synthetic" else 256)
        labels, users = _labels(data, idx, windows_s[-1]), data.users[idx]
        point, cis = compare(probs, labels, users, args.resamples, seed=0)
        dataset = "taobao-userbehavior-head"
        if source == "synthetic":
            dataset = "synthetic" if args.item_lifetime_days == 3.0 else f"synthetic-item-life-{args.item_lifetime_days:g}d"
        base = {"study": "delay", "dataset": dataset, "model": args.model, "task": data.schema.tasks[-1],
                "seeds": list(args.seeds), "command": command, "protocol": protocol_text(source, args, b, data, windows_h),
                "evaluated": int(idx.size), "positives": int(labels.sum()),
                "parameters": {"windows_s": list(windows_s), "routing_probs": list(_routing(windows_s, args).probs), "segments": int(b.size - 1),
                               "stream_start": int(b[0]), "lr": args.lr, "pretrain_epochs": args.pretrain_epochs,
                               "resamples": args.resamples, **info["params"]}}  # fmt: skip
        if info["true_prob"] is not None:
            tp = info["true_prob"][idx]
            ref = stream_metrics(tp, labels)
            rows.append({**base, "variant": "true-probability", "metrics": {METRICS[k]: v for k, v in ref.items()},
                         "ci": None, "seconds": 0.0})  # fmt: skip
        for m in METHODS:
            metrics = {METRICS.get(k, k): point[m][k] for k in (*METRICS, "cal_error")}
            metrics["per_seed"] = {METRICS[k]: v for k, v in point[m]["per_seed"].items()}
            rows.append({**base, "variant": LABELS[m], "metrics": metrics, "ci": cis[m], "seconds": seconds[m]})
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {_block_key(r) for r in rows}
    write_json(args.out, [r for r in old if _block_key(r) not in done] + rows)
    print(markdown_tables(args.out))
    return 0


def _block_key(row: dict) -> tuple[str, str, tuple[float, ...], tuple[int, ...]]:
    """One results block: a run's rows share the dataset, the model, the window-heads routing probabilities and
    the windows."""
    params = row.get("parameters", {})
    return (row["dataset"], row.get("model", "dlrm"), tuple(round(p, 6) for p in params.get("routing_probs", ())),
            tuple(params.get("windows_s", ())))  # fmt: skip


def _routing_text(probs: tuple[float, ...]) -> str:
    if probs and all(math.isclose(p, probs[0], rel_tol=1e-4) for p in probs):
        return "uniform"
    return " / ".join(f"{p:g}" for p in probs)


def _ci(c: dict | None, key: str, metric: str, digits: int = 4) -> str:
    if not c or key not in c or metric not in c[key]:
        return ""
    d = c[key][metric]
    star = "*" if d["excludes_zero"] else ""
    return f"{d['diff']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]{star}"


def markdown_tables(path: Path = RESULTS) -> str:
    """The study's tables from its results file (one block per dataset)."""
    rows = [r for r in json.loads(Path(path).read_text()) if r.get("study") == "delay"]
    out = []
    for key in dict.fromkeys(_block_key(r) for r in rows):
        rs = [r for r in rows if _block_key(r) == key]
        dataset, model, routing, _ = key
        r0 = rs[0]
        out.append(f"### {dataset}, {model}, window-heads routing {_routing_text(routing)}: {r0['evaluated']:,} "
                   f"evaluated clicks, {r0['positives']:,} positives ({r0['task']} labels), seeds {r0['seeds']}\n")
        out.append("| method | calibration | AUC | PR-AUC | LogLoss | RI-AUC | RI-PR-AUC | RI-LogLoss |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in rs:
            m, ri = r["metrics"], ((r["ci"] or {}).get("RI") or {})
            cells = [(f"{ri[k]['value']:.2f} [{ri[k]['low']:.2f}, {ri[k]['high']:.2f}]"
                      + ("" if ri[k]["oracle_gap_excludes_zero"] else " n.s.")) if k in ri else ""
                     for k in ("AUC", "PR-AUC", "LogLoss")]  # fmt: skip
            out.append(f"| {r['variant']} | {m['calibration']:.3f} | {m['AUC']:.4f} | {m['PR-AUC']:.4f} | "
                       f"{m['LogLoss']:.5f} | " + " | ".join(cells) + " |")  # fmt: skip
        out.append("\nRI = (method − Pretrain) / (Oracle − Pretrain), log loss sign-flipped (higher is better); "
                   "95% interval from the same user resamples; n.s. = the CI of Oracle − Pretrain includes 0, so "
                   "the RI has no meaning.")
        for key, title in (("vs_vanilla", "Vanilla"), ("vs_pretrain", "Pretrain")):
            out.append(f"\nDifference vs {title} (seed means; 95% paired user-bootstrap CI; * = CI excludes 0; "
                       "|cal−1| is the calibration error, lower is better):\n")  # fmt: skip
            out.append("| method | Δ calibration error | ΔAUC | ΔPR-AUC | ΔLogLoss |")
            out.append("|---|---|---|---|---|")
            for r in rs:
                if r["ci"] and key in r["ci"]:
                    out.append(f"| {r['variant']} | " + " | ".join(_ci(r["ci"], key, k) for k in
                               ("cal_error", "AUC", "PR-AUC", "LogLoss")) + " |")  # fmt: skip
        out.append(f"\nCommand: `{r0['command']}`\n")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
