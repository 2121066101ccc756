"""The released-checkpoint case of growth (kexue.fm/archives/8444): a small model trained to the end
of its own run exists; widen it and train the big model; how many of the big model's FLOPs does that save?

    python benchmarks/released_sweep.py --workdir runs/released_reduced --scale reduced [--workers 1]
    python benchmarks/released_sweep.py --workdir runs/released_default --scale default --only "A/combined"
        --seeds 0,1,2 --baselines runs/released/B_s{seed}      # B trained separately, one dir per seed
    python benchmarks/released_sweep.py --workdir DIR --scale reduced --analyze-only

Every run is a ``configs/upscale.py`` job (``upscale.scenario="released"``) in its own sub-directory, resumed run
by run when the sweep is killed and rerun. In order:
  1. arm B alone (the big model from scratch) at ``--b-lrs`` (seed 0): its best rate is the baseline;
  2. the small model alone at ``--small-lrs`` (seed 0, its own full schedule): the released checkpoint is the one
     at its best rate, tuned like B's (these runs *are* the cached small phase of the A runs: same config, same
     cache directory);
  3. arm A one factor at a time around a centre (seed 0): the big phase restarted over T/2 steps (T = B's steps)
     at B's best rate / 2 with the default warmup and -10 dB zero-sum noise; factors: the big phase's peak rate
     (x B's best rate), its length, its warmup (0 included), the noise (-20, -30 dB, none, fan-out), a WSD
     schedule instead of the cosine, and a small model trained twice as long (``small_x``: a released model
     may have trained longer than B will);
  4. ``combined``: the best level of every factor (by ``compute_saving_given_small``, ties to the centre), then
     ``--seeds`` of the centre and the combined setting (B and the small model at those seeds too).
Each A run is compared with B at B's best rate and the same seed through the job itself (``upscale.baseline``),
so every figure is the job's own: ``compute_saving_given_small`` (the headline: the small model exists),
``compute_saving`` (small counted), ``family_saving`` (both sizes wanted), ``forgetting`` (the rise of A's loss
after widening and the steps back), ``after_growth_efficiency`` and the loss gap at B's FLOPs. The tables go to
``sweep.md``, the rows (with every curve) to ``sweep.json``, the analysis to ``analysis.json``, the curves of
the centre, the combined and the best setting (seed 0) to ``curves.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repo root, for configs/
sys.path.insert(0, str(HERE))  # upscale_sweep: one run, the process pool, the scales

import upscale_sweep as us  # noqa: E402

from kexue_jax.reporting import figure, markdown_table, seed_stats, write_json_atomic  # noqa: E402

MODEL = "released"
#: the centre of the one-factor grid: multiples of B's best rate and fractions of B's steps
CENTRE = {"lr_x": 0.5, "steps_frac": 0.5, "warmup": None, "noise_db": -10.0, "symmetry": "zero_sum", "shape": None,
          "small_x": 1.0}
#: (factor, levels other than the centre's)
FACTORS = [("lr_x", [0.25, 1.0]), ("steps_frac", [1 / 3, 1.0]), ("warmup", [0, "x3"]),
           ("noise_db", [-20.0, -30.0, None]), ("symmetry", ["fan_out"]), ("shape", ["wsd"]), ("small_x", [2.0])]


def setting_overrides(setting: dict, b_lr: float, steps: int, warmup: int) -> dict:
    """A setting (the keys of :data:`CENTRE`) as job overrides, given B's best rate, B's steps and the job's warmup."""
    w = setting["warmup"]
    big_steps = max(1, round(setting["steps_frac"] * steps))
    w = None if w is None else (min(3 * warmup, big_steps) if w == "x3" else int(w))
    return {"upscale.scenario": "released", "upscale.schedule": "restart", "upscale.big_steps": big_steps,
            "upscale.small_steps": small_steps(setting, steps),
            "upscale.big_lr": setting["lr_x"] * b_lr, "upscale.big_warmup": w, "upscale.big_schedule": setting["shape"],
            "upscale.noise_db": setting["noise_db"], "upscale.symmetry": setting["symmetry"]}


def small_steps(setting: dict, steps: int) -> int:
    """The released small model's own run: ``small_x`` x B's steps (a released model may have trained longer)."""
    return max(1, round(setting.get("small_x", 1.0) * steps))


def label(setting: dict) -> str:
    """The setting's name: its levels that differ from the centre (``centre`` if none)."""
    diff = [f"{k}={_level(v)}" for k, v in setting.items() if v != CENTRE[k]]
    return ",".join(diff) or "centre"


def _level(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def parse_label(text: str) -> dict:
    """The levels a :func:`label` names (``centre``: none): the inverse of :func:`label` up to float formatting."""
    out = {}
    for part in ([] if text == "centre" else text.split(",")):
        key, _, value = part.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = None if value == "None" else value
    return out


def merged_rows(source: str, their_centre: dict) -> list[dict]:
    """The A rows of another sweep directory (run around ``their_centre``), renamed relative to this sweep's
    :data:`CENTRE` (``warmup=0`` around ``{"lr_x": 1}`` becomes ``lr_x=1,warmup=0``); its B and S rows are left
    out (``--baselines`` pointed its A runs at this sweep's B)."""
    with open(os.path.join(source, "sweep.json")) as f:
        rows = json.load(f)["rows"]
    out = []
    for r in rows:
        if not r["name"].startswith("A/"):
            continue
        _, lab, seed = r["name"].split("/")
        setting = {**CENTRE, **their_centre, **parse_label(lab)}
        out.append({**r, "name": f"A/{label(setting)}/{seed}", "setting": setting, "merged_from": source})
    return out


def run_small(spec: dict) -> dict:
    """The released small phase alone (in a worker process): exactly the cached phase an A run of the same small
    fields would train, in ``<small_cache>/<hash>``. Returns its row with its curve."""
    from kexue_jax import training  # noqa: PLC0415 (worker-side import)
    from kexue_jax.experiments import upscale as ux  # noqa: PLC0415
    t0 = time.time()
    try:
        c = us._config(spec)
        small_cfg, mesh = ux.validate(c)
        ux.check_small_phase(c, spec["workdir"])
        res = ux.run_small_phase(c, spec["workdir"], training.load_corpus(c.data), mesh, small_cfg)
    except Exception as e:  # noqa: BLE001 (a failed run is a row, not the end of the sweep)
        return {**spec, "error": f"{type(e).__name__}: {e}"[:300], "seconds": round(time.time() - t0, 1)}
    curve = [{"step": h["step"], "flops": h["flops"], "val_loss": h["val_loss"]} for h in res.history]
    return {**spec, "final_loss_small": curve[-1]["val_loss"], "curves": {"small": curve},
            "seconds": round(time.time() - t0, 1)}


def _spec(args, name: str, overrides: dict, seed: int) -> dict:
    """One job of the sweep; the released ones share ``<workdir>/small_cache``; ``--mup-base`` puts every model
    under muP with that base width (the small model, the widened one and B share it)."""
    ov = {**overrides, "seed": seed}
    if args.mup_base:
        ov.update({"model.parameterization": "mup", "model.mup_base_d_model": args.mup_base})
    if ov.get("upscale.scenario") == "released":
        ov["upscale.small_cache"] = os.path.join(args.workdir, "small_cache")
    return us.spec(args.workdir, args.scale, name, MODEL, ov)


def _scale_numbers(scale: str) -> tuple[int, int]:
    """(B's steps, the job's warmup) at this scale."""
    c = us._config(us.spec("/tmp", scale, "probe", MODEL, {}))
    return int(c.train.steps), int(c.optim.warmup_steps)


def baseline_dir(args, b_lr: float, seed: int) -> str:
    """Arm B at its best rate and ``seed``: ``--baselines`` (a pattern with {seed}) or this sweep's own B run."""
    if args.baselines:
        return args.baselines.format(seed=seed)
    return os.path.join(args.workdir, us._dirname(us.b_name(MODEL, b_lr, seed)))


def best_of(rows: list[dict], prefix: str, key: str, lrs: list[float]) -> float | None:
    """The rate of the lowest final loss among the seed-0 runs ``{prefix}/lr{lr}/s0``."""
    by = {r["name"]: r for r in rows}
    cands = [(by[f"{prefix}/lr{lr:g}/s0"][key], lr) for lr in lrs if f"{prefix}/lr{lr:g}/s0" in by]
    cands = [(v, lr) for v, lr in cands if v is not None]
    return min(cands)[1] if cands else None


def a_spec(args, setting: dict, b_lr: float, small_lr: float, seed: int, steps: int, warmup: int) -> dict:
    ov = {**setting_overrides(setting, b_lr, steps, warmup), "optim.lr": b_lr, "upscale.small_lr": small_lr,
          "upscale.arms": ("upscaled", "scratch"), "upscale.cap": args.cap,
          "upscale.baseline": baseline_dir(args, b_lr, seed)}
    sp = _spec(args, f"A/{label(setting)}/s{seed}", ov, seed)
    sp["setting"] = setting
    return sp


def combined(results: list[dict]) -> dict:
    """The best level of each factor by ``compute_saving_given_small`` at seed 0 (the centre where no other level
    beats it; a level that never reached the target counts as 0)."""
    by = {r["label"]: r for r in results if r["seed"] == 0}
    centre = by.get("centre", {}).get("compute_saving_given_small") or 0.0
    out = dict(CENTRE)
    for factor, levels in FACTORS:
        best, best_v = CENTRE[factor], centre
        for lv in levels:
            r = by.get(label({**CENTRE, factor: lv}))
            v = (r or {}).get("compute_saving_given_small") or 0.0
            if r is not None and v > best_v:
                best, best_v = lv, v
        out[factor] = best
    return out


FIGURES = ("compute_saving_given_small", "compute_saving", "family_saving", "after_growth_efficiency",
           "loss_gap_at_equal_flops", "final_loss_upscaled", "loss_after_widen", "loss_before_widen")


def analyze(rows: list[dict]) -> dict:
    """Every A row's figures (the job's own), grouped by setting with ``seed_stats`` over seeds."""
    results = []
    for r in rows:
        if not r["name"].startswith("A/") or r.get("target_loss") is None:
            continue
        f = r.get("forgetting") or {}
        results.append({"name": r["name"], "label": r["name"].split("/")[1], "seed": r["overrides"]["seed"],
                        "setting": r.get("setting"), "target_loss": r["target_loss"],
                        "big_lr": r["overrides"]["upscale.big_lr"], "big_steps": r["overrides"]["upscale.big_steps"],
                        "forgetting_rise": f.get("rise"), "recovery_steps": f.get("recovery_steps"),
                        "big_steps_run": r.get("big_steps_run"), "cap_hit": r.get("cap_hit"),
                        **{k: r.get(k) for k in FIGURES}})
    groups: dict[str, list[dict]] = {}
    for res in results:
        groups.setdefault(res["label"], []).append(res)
    seeded = {lab: {k: seed_stats([x[k] for x in rs]) for k in FIGURES + ("forgetting_rise", "target_loss")}
              for lab, rs in groups.items() if len(rs) > 1}
    b = {r["name"]: r.get("final_loss_scratch") for r in rows if r["name"].startswith("B/")}
    s = {r["name"]: r.get("final_loss_small") for r in rows if r["name"].startswith("S/")}
    return {"results": results, "seeds": seeded, "b_final": b, "small_final": s}


def other_b_curves(source: str) -> dict[int, list[dict]]:
    """Seed -> arm B's validation curve in another sweep directory (e.g. the same widths under the other
    parameterization), at that sweep's best seed-0 rate: a second baseline for this sweep's A runs."""
    with open(os.path.join(source, "sweep.json")) as f:
        bs = [r for r in json.load(f)["rows"] if r["name"].startswith(f"B/{MODEL}/") and r.get("curves")]
    s0 = [r for r in bs if r["name"].endswith("/s0")]
    if not s0:
        raise SystemExit(f"--other-b {source}: no finished arm B run at seed 0 in its sweep.json")
    rate = min(s0, key=lambda r: r["final_loss_scratch"])["name"].split("/")[2]
    return {r["overrides"]["seed"]: r["curves"]["scratch (B)"] for r in bs if r["name"].split("/")[2] == rate}


def against_other_b(results: list[dict], rows: list[dict], curves: dict[int, list[dict]]) -> None:
    """Add to each A result its savings against the other baseline of the same seed (``vs_other_b``:
    ``compute_saving_given_small``, ``compute_saving``, that B's final loss), computed by the job's own
    ``compute_saving`` on A's curve, the small phase's FLOPs being A's FLOPs at the widening."""
    from kexue_jax.experiments.upscale import compute_saving  # noqa: PLC0415 (jax only when asked)
    by = {r["name"]: r for r in rows}
    for res in results:
        b, row = curves.get(res["seed"]), by[res["name"]]
        if b is None:
            continue
        cs = compute_saving(row["curves"]["upscaled (A)"], b, small_flops=row["widen_flops"])
        res["vs_other_b"] = {"compute_saving_given_small": cs["compute_saving_given_small"],
                             "compute_saving": cs["compute_saving"], "target_loss": cs["target_loss"]}


def _f(v, nd=3) -> str:
    return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _ms(st: dict, nd=2) -> str:
    if st["mean"] is None:
        return "not reached"
    n = len(st["values"])
    core = f"{st['mean']:.{nd}f}" + ("" if st["std"] is None else f" ± {st['std']:.{nd}f}")
    return core + ("" if st["n"] == n else f" ({st['n']} of {n} reached)")


def tables(an: dict) -> str:
    out = ["## Arm B and the small model alone (final validation loss)", "",
           markdown_table(["run", "final loss"], [[k, _f(v, 4)] for k, v in {**an["b_final"], **an["small_final"]}
                                                   .items()]),
           "## Arm A, one factor at a time (seed 0 unless the name says otherwise)", "",
           markdown_table(["setting", "big lr", "big steps", "given small", "small counted", "family",
                           "after-growth eff.", "forgetting rise / steps back", "gap at B's FLOPs", "A final",
                           "target"],
                          [[r["name"], f"{r['big_lr']:.2g}", r["big_steps"], _f(r["compute_saving_given_small"], 2),
                            _f(r["compute_saving"], 2), _f(r["family_saving"], 2), _f(r["after_growth_efficiency"], 2),
                            f"{_f(r['forgetting_rise'], 3)} / "
                            f"{'never' if r['recovery_steps'] is None else round(r['recovery_steps'])}",
                            _f(r["loss_gap_at_equal_flops"], 4), _f(r["final_loss_upscaled"], 4),
                            _f(r["target_loss"], 4)] for r in an["results"]])]
    other = [r for r in an["results"] if "vs_other_b" in r]
    if other:
        out += ["## Arm A against the other sweep's B (--other-b), at its best rate and the same seed", "",
                markdown_table(["setting", "given small", "small counted", "target (other B)"],
                               [[r["name"], _f(r["vs_other_b"]["compute_saving_given_small"], 2),
                                 _f(r["vs_other_b"]["compute_saving"], 2), _f(r["vs_other_b"]["target_loss"], 4)]
                                for r in other])]
    if an["seeds"]:
        out += ["## Seeds (mean ± sample std)", "",
                markdown_table(["setting", "seeds", "given small", "small counted", "family", "forgetting rise",
                                "gap at B's FLOPs", "target (B)"] + (["given small vs other B"] if other else []),
                               [[lab, len(st["compute_saving"]["values"]), _ms(st["compute_saving_given_small"]),
                                 _ms(st["compute_saving"]), _ms(st["family_saving"]), _ms(st["forgetting_rise"], 3),
                                 _ms(st["loss_gap_at_equal_flops"], 4), _ms(st["target_loss"], 4)]
                                + ([_ms(st["given_small_vs_other_b"])] if other else [])
                                for lab, st in an["seeds"].items()])]
    return "\n".join(out)


def plot(rows: list[dict], labels: list[str], path: str) -> bool:
    """Validation loss against FLOPs: B, and A (small phase then big phase) for each of ``labels`` at seed 0."""
    fig = figure(figsize=(7, 4.5))
    if fig is None:
        return False
    ax = fig.add_subplot(1, 1, 1)
    drawn_b = False
    for r in rows:
        name = r["name"]
        if not name.startswith("A/") or not name.endswith("/s0") or name.split("/")[1] not in labels:
            continue
        curves = r["curves"]
        if not drawn_b:
            b = curves["scratch (B)"]
            ax.plot([p["flops"] for p in b], [p["val_loss"] for p in b], "k-", label="B: big model from scratch")
            drawn_b = True
        a = curves["upscaled (A)"]
        ax.plot([p["flops"] for p in a], [p["val_loss"] for p in a], label=f"A: {name.split('/')[1]}")
    if drawn_b:  # the part of the curves where the target is decided; B's final loss dashed
        low = min(p.get_ydata().min() for p in ax.get_lines())
        ax.axhline(b[-1]["val_loss"], color="k", ls=":", lw=1, label="target: B's final loss")
        ax.set_ylim(low - 0.05, low + 0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (A: the released small model's included)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--scale", default="reduced", choices=("default", "reduced", "tiny"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--b-lrs", default="3e-3,6e-3,1.2e-2", help="arm B's rates (seed 0)")
    ap.add_argument("--small-lrs", default="6e-3,1.2e-2,2.4e-2", help="the small model's rates (seed 0)")
    ap.add_argument("--baselines", default="", help="arm B trained elsewhere: a directory pattern with {seed} "
                    "(its rate is the first of --b-lrs); no B runs then")
    ap.add_argument("--only", default="", help="comma-separated: 'small' (the small model at every seed), "
                    "'grid', 'combined', 'seeds' (default: grid,combined,seeds)")
    ap.add_argument("--seeds", default="1,2", help="the seeds added to seed 0 for the centre and the combined setting")
    ap.add_argument("--cap", type=float, default=2.0, help="arm A's big-phase FLOPs cap in units of B's")
    ap.add_argument("--setting", default="", help="JSON: levels (keys of CENTRE) of the setting to run at the seeds "
                    "instead of the grid's combined best, e.g. '{\"lr_x\": 1.0}'")
    ap.add_argument("--mup-base", type=int, default=0, help="run every model under muP with this base width")
    ap.add_argument("--factors", default="", help="comma-separated factors of the grid (default: all of FACTORS)")
    ap.add_argument("--lr-x", default="", help="the levels of lr_x other than the centre's, e.g. 0.5,2")
    ap.add_argument("--centre", default="", help="JSON: levels of the centre that differ from CENTRE")
    ap.add_argument("--merge", action="append", default=[], help="DIR=JSON: add the A rows of the sweep in DIR, "
                    "run around the centre JSON (its --centre), to the analysis (repeatable; duplicates are dropped)")
    ap.add_argument("--other-b", default="", help="DIR: another sweep (e.g. the other parameterization); every A "
                    "row is also compared with its B at its best rate and the same seed")
    ap.add_argument("--analyze-only", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    CENTRE.update(json.loads(args.centre) if args.centre else {})
    if args.lr_x:
        FACTORS[:] = [(f, [float(x) for x in args.lr_x.split(",")] if f == "lr_x" else lv) for f, lv in FACTORS]
    if args.factors:
        FACTORS[:] = [(f, lv) for f, lv in FACTORS if f in args.factors.split(",")]
    b_lrs = [float(x) for x in args.b_lrs.split(",")]
    small_lrs = [float(x) for x in args.small_lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    stages = set(args.only.split(",")) if args.only else {"grid", "combined", "seeds"}
    path = os.path.join(args.workdir, "sweep.json")
    rows = json.load(open(path))["rows"] if os.path.exists(path) else []
    steps, warmup = _scale_numbers(args.scale)
    run = lambda specs, fn=us.run_one: us.execute(specs, args.workdir, args.workers, 0.0, fn=fn)  # noqa: E731

    if not args.analyze_only:
        all_seeds = sorted({0, *seeds})
        # 1-2: B and the small model alone at seed 0, over their rates
        if not args.baselines:
            rows = run([_spec(args, us.b_name(MODEL, lr, 0), {"optim.lr": lr, "upscale.arms": ("scratch",)}, 0)
                        for lr in b_lrs])
        b_lr = b_lrs[0] if args.baselines else best_of(rows, f"B/{MODEL}", "final_loss_scratch", b_lrs)
        if b_lr is None:
            raise SystemExit(f"no arm B run finished: see {args.workdir}/B-*/error.txt")

        def small_spec(lr, seed):
            return _spec(args, f"S/{MODEL}/lr{lr:g}/s{seed}", {"optim.lr": b_lr, "upscale.small_lr": lr,
                                                                "upscale.scenario": "released",
                                                                "upscale.small_steps": small_steps(CENTRE, steps),
                                                                "upscale.schedule": "restart"}, seed)
        rows = run([small_spec(lr, 0) for lr in small_lrs], fn=run_small)
        small_lr = best_of(rows, f"S/{MODEL}", "final_loss_small", small_lrs)
        if small_lr is None:
            raise SystemExit("no small-model run finished: see the sweep's log")
        print(json.dumps({"b_lr": b_lr, "small_lr": small_lr}), flush=True)
        A = lambda setting, seed: a_spec(args, setting, b_lr, small_lr, seed, steps, warmup)  # noqa: E731
        if "small" in stages:  # the small model at every seed first (e.g. before the setting is chosen)
            rows = run([small_spec(small_lr, s) for s in all_seeds if s != 0], fn=run_small)
        if "grid" in stages:
            grid = [dict(CENTRE)] + [{**CENTRE, f: lv} for f, levels in FACTORS for lv in levels]
            rows = run([A(s, 0) for s in grid])
        best = ({**CENTRE, **json.loads(args.setting)} if args.setting else combined(analyze(rows)["results"]))
        if "combined" in stages and best != CENTRE:
            rows = run([A(best, 0)])
        if "seeds" in stages and seeds:
            extra = [s for s in seeds if s != 0]
            if not args.baselines:
                rows = run([_spec(args, us.b_name(MODEL, b_lr, s), {"optim.lr": b_lr, "upscale.arms": ("scratch",)}, s)
                            for s in extra])
            rows = run([small_spec(small_lr, s) for s in extra], fn=run_small)
            settings = [CENTRE] + ([best] if best != CENTRE else [])
            rows = run([A(st, s) for st in settings for s in all_seeds])
    for item in args.merge:
        source, _, centre = item.partition("=")
        have = {r["name"] for r in rows}
        rows = rows + [r for r in merged_rows(source, json.loads(centre or "{}")) if r["name"] not in have]
    an = analyze(rows)
    if args.other_b:
        against_other_b(an["results"], rows, other_b_curves(args.other_b))
        for lab in an["seeds"]:
            vs = [r["vs_other_b"]["compute_saving_given_small"] for r in an["results"]
                  if r["label"] == lab and "vs_other_b" in r]
            an["seeds"][lab]["given_small_vs_other_b"] = seed_stats(vs)
    an["combined"] = combined(an["results"])
    md = f"# Growth from a released small model ({args.scale})\n\n" + tables(an)
    with open(os.path.join(args.workdir, "sweep.md"), "w") as f:
        f.write(md)
    seed0 = [r for r in an["results"] if r["seed"] == 0 and r["compute_saving_given_small"] is not None]
    an["best"] = max(seed0, key=lambda r: r["compute_saving_given_small"])["label"] if seed0 else None
    plot(rows, ["centre", label(an["combined"]), an["best"]], os.path.join(args.workdir, "curves.png"))
    write_json_atomic(os.path.join(args.workdir, "analysis.json"), an, indent=1)
    print(md)
    print(json.dumps({"benchmark": "released_sweep", "scale": args.scale, "runs": len(rows),
                      "compared": len(an["results"]), "combined": label(an["combined"])}))


if __name__ == "__main__":
    main()
