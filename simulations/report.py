"""Outputs of a benchmark grid, read back from its run directories: results.csv (one row
per run and round), report.md (final accuracy as mean and std over seeds, rounds and
bytes to reach the target accuracy, seconds per round, the references) and plots."""

from __future__ import annotations

import csv
import datetime
import os
import platform
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from clients.attacks import ABSENT
from server.results import is_finished, read_jsonl, read_metrics, read_summary
from simulations.grid import CENTRALISED, Grid, attack_label, split_label
from simulations.tables import optional

CSV_COLUMNS = ["run", "setting", "strategy", "seed", "model", "split", "local_epochs", "round", "accuracy",
               "loss", "bytes_up", "bytes_down", "bytes_total", "round_s", "aggregate_s", "selected"]


def collect_rows(grid: Grid) -> list[dict]:
    """results.csv's rows of every finished run: round 0 (the initial model) first."""
    rows = []
    for run in grid.runs:
        run_dir = Path(run.settings.out)
        if not is_finished(run_dir):
            continue
        summary, task = read_summary(run_dir), run.settings.train_task()
        common = {"run": run.run_id, "setting": run.setting, "strategy": run.strategy, "seed": run.seed,
                  "model": task.model, "local_epochs": task.local_epochs,
                  "split": "union" if run.strategy == CENTRALISED else split_label(run.settings.federation)}
        rows.append({**common, "round": 0, "accuracy": summary["initial_accuracy"], "loss": "", "bytes_up": 0,
                     "bytes_down": 0, "bytes_total": 0, "round_s": "", "aggregate_s": "", "selected": ""})
        total = 0
        for m in read_metrics(run_dir):
            total += m["bytes_up"] + m["bytes_down"]
            rows.append({**common, "round": m["round"], "accuracy": m["accuracy"], "loss": m["loss"],
                         "bytes_up": m["bytes_up"], "bytes_down": m["bytes_down"], "bytes_total": total,
                         "round_s": m["round_s"], "aggregate_s": m["aggregate_s"], "selected": m.get("selected", "")})
    return rows


def _curves(rows: list[dict]) -> dict[tuple[str, str], dict[int, list[dict]]]:
    """(setting, strategy) -> seed -> that run's rows in round order."""
    curves: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        curves[(row["setting"], row["strategy"])][row["seed"]].append(row)
    return curves


def _reach(run_rows: list[dict], target: float) -> tuple[int | None, int | None]:
    """First round (and bytes so far) at which the run's accuracy reached the target."""
    for row in run_rows:
        if row["round"] > 0 and row["accuracy"] >= target:
            return row["round"], row["bytes_total"]
    return None, None


LAST_ROUNDS = 3


def _std(values: list[float]) -> float | None:
    """Sample standard deviation over seeds (None for one seed: there is no spread to show)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _mean_std(mean: float, std: float | None, digits: int = 4, scale: float = 1.0, signed: bool = False) -> str:
    text = f"{scale * mean:{'+' if signed else ''}.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def _last_rounds_mean(run_rows: list[dict]) -> float:
    """Mean accuracy of the run's last LAST_ROUNDS rounds: at high skew the accuracy of
    one round swings by 5 points or more from the next, and the last round alone is noisy."""
    trained = [row["accuracy"] for row in run_rows if row["round"] > 0] or [run_rows[-1]["accuracy"]]
    return float(np.mean(trained[-LAST_ROUNDS:]))


def summarise(rows: list[dict], target: float, ensembles: dict[str, float | None]) -> list[dict]:
    """One line per (setting, strategy): the report's main table."""
    lines = []
    for (setting, strategy), by_seed in sorted(_curves(rows).items()):
        finals = [runs[-1]["accuracy"] for runs in by_seed.values()]
        lasts = [_last_rounds_mean(runs) for runs in by_seed.values()]
        reached = [_reach(runs, target) for runs in by_seed.values()]
        rounds_hit = [r for r, _ in reached if r is not None]
        bytes_hit = [b for _, b in reached if b is not None]
        seconds = [row["round_s"] for runs in by_seed.values() for row in runs if row["round"] > 0]
        ens = [ensembles.get(runs[0]["run"]) for runs in by_seed.values()]
        ens = [e for e in ens if e is not None]
        lines.append({
            "setting": setting, "strategy": strategy, "seeds": len(finals),
            "final_mean": float(np.mean(finals)), "final_std": _std(finals),
            "last_mean": float(np.mean(lasts)), "last_std": _std(lasts),
            "reached": len(rounds_hit),
            "rounds_to_target": float(np.mean(rounds_hit)) if rounds_hit else None,
            "mb_to_target": float(np.mean(bytes_hit)) / 1e6 if bytes_hit else None,
            "s_per_round": float(np.mean(seconds)) if seconds else None,
            "ensemble_mean": float(np.mean(ens)) if ens else None,
        })
    return lines


def against_fedavg(rows: list[dict]) -> list[dict]:
    """Every strategy against FedAvg on the same setting, paired by seed (same partition):
    the difference of final accuracy, and the first round at which the strategy reached
    FedAvg's final accuracy of that seed (FedAvg itself needs all its rounds, or fewer)."""
    curves = _curves(rows)
    lines = []
    for (setting, strategy), by_seed in sorted(curves.items()):
        fedavg = curves.get((setting, "fedavg"))
        if strategy in ("fedavg", CENTRALISED) or not fedavg:
            continue
        seeds = sorted(set(by_seed) & set(fedavg))
        if not seeds:
            continue
        deltas = [by_seed[s][-1]["accuracy"] - fedavg[s][-1]["accuracy"] for s in seeds]
        last_deltas = [_last_rounds_mean(by_seed[s]) - _last_rounds_mean(fedavg[s]) for s in seeds]
        own = [_reach(by_seed[s], fedavg[s][-1]["accuracy"])[0] for s in seeds]
        base = [_reach(fedavg[s], fedavg[s][-1]["accuracy"])[0] for s in seeds]
        hit = [r for r in own if r is not None]
        lines.append({"setting": setting, "strategy": strategy, "seeds": len(seeds),
                      "delta_mean": float(np.mean(deltas)), "delta_std": _std(deltas),
                      "last_delta_mean": float(np.mean(last_deltas)), "last_delta_std": _std(last_deltas),
                      "wins": sum(d > 0 for d in deltas), "reached": len(hit),
                      "rounds_to_fedavg_final": float(np.mean(hit)) if hit else None,
                      "fedavg_rounds": float(np.mean(base))})
    return lines


# Grids of at most this many rounds (one-shot, few-round) get the round-by-round table.
FEW_ROUNDS = 5


def against_best_rival(rows: list[dict]) -> list[dict]:
    """In grids of few rounds, every fusion variant against the best of the other
    strategies, round by round: the rival with the highest mean accuracy in that round
    over the seeds that every one of them ran, and the difference paired by seed."""
    curves = _curves(rows)
    lines = []
    for setting in sorted({s for s, _ in curves}):
        by_strategy = {strategy: by_seed for (s, strategy), by_seed in curves.items()
                       if s == setting and strategy != CENTRALISED}
        if not by_strategy:  # the centralised reference's own setting
            continue
        rounds = max(row["round"] for by_seed in by_strategy.values() for runs in by_seed.values() for row in runs)
        rivals = [strategy for strategy in by_strategy if not strategy.startswith("fusion")]
        if rounds > FEW_ROUNDS or not rivals:
            continue
        for strategy in sorted(set(by_strategy) - set(rivals)):
            seeds = sorted(set.intersection(*(set(by_strategy[name]) for name in rivals + [strategy])))
            for number in range(1, rounds + 1):
                accuracy = {name: [next((row["accuracy"] for row in by_strategy[name][seed]
                                         if row["round"] == number), None) for seed in seeds]
                            for name in rivals + [strategy]}
                if not seeds or any(None in values for values in accuracy.values()):
                    continue
                best = max(rivals, key=lambda name: np.mean(accuracy[name]))
                deltas = [a - b for a, b in zip(accuracy[strategy], accuracy[best])]
                lines.append({"setting": setting, "strategy": strategy, "round": number, "seeds": len(seeds),
                              "rival": best, "rival_mean": float(np.mean(accuracy[best])),
                              "mean": float(np.mean(accuracy[strategy])),
                              "delta_mean": float(np.mean(deltas)), "delta_std": _std(deltas)})
    return lines


def under_attack(rows: list[dict], grid: Grid) -> list[dict]:
    """Every strategy under each attack against its own clean run (the same split and
    seed without attackers), paired by seed: final accuracy and last-rounds mean minus
    the clean run's; and where the grid has the `absent` reference (the attackers send
    nothing), final accuracy minus the reference's: what the strategy let the attack take
    beyond the attackers' data."""
    clean_of, absent_of, runs_in = {}, {}, {}
    for run in grid.runs:
        runs_in.setdefault(run.setting, set()).add(run.strategy)
        task = run.settings.train_task()
        suffix = attack_label(task)
        if suffix:
            clean_of[run.setting] = run.setting[:-len(suffix)]
            if task.attack != ABSENT:
                absent_of[run.setting] = clean_of[run.setting] + attack_label(replace(task, attack=ABSENT))
    curves = _curves(rows)
    lines = []
    for (setting, strategy), by_seed in sorted(curves.items()):
        clean = curves.get((clean_of.get(setting), strategy))
        seeds = sorted(set(by_seed) & set(clean)) if clean else []
        if not seeds:
            continue
        deltas = [by_seed[s][-1]["accuracy"] - clean[s][-1]["accuracy"] for s in seeds]
        last_deltas = [_last_rounds_mean(by_seed[s]) - _last_rounds_mean(clean[s]) for s in seeds]
        absent = curves.get((absent_of.get(setting), strategy), {})
        beyond = [by_seed[s][-1]["accuracy"] - absent[s][-1]["accuracy"] for s in seeds if s in absent]
        lines.append({"setting": setting, "strategy": strategy, "seeds": len(seeds), "reached": True,
                      "delta_mean": float(np.mean(deltas)), "delta_std": _std(deltas),
                      "last_delta_mean": float(np.mean(last_deltas)), "last_delta_std": _std(last_deltas),
                      "absent_seeds": len(beyond), "beyond_mean": float(np.mean(beyond)) if beyond else None,
                      "beyond_std": _std(beyond)})
    # A strategy the grid leaves out of an attacked setting ignores what that attack lies
    # about: its runs would repeat the clean ones, so it is listed at 0 with its clean seeds.
    # (The `absent` reference is not an attack: where a strategy has none, there is no row.)
    for setting, clean_setting in sorted(clean_of.items()):
        if setting not in absent_of:
            continue
        for strategy in sorted(runs_in[clean_setting] - runs_in[setting] - {CENTRALISED}):
            seeds = len(curves.get((clean_setting, strategy), {}))
            if seeds:
                lines.append({"setting": setting, "strategy": strategy, "seeds": seeds, "reached": False,
                              "delta_mean": 0.0, "delta_std": None, "last_delta_mean": 0.0, "last_delta_std": None})
    return lines


def write_report(grid: Grid, out_dir: Path, lines: list[dict], failures: list[dict],
                 comparisons: list[dict] = (), attacked: list[dict] = (), rivalry: list[dict] = ()) -> None:
    target = grid.target_accuracy
    text = [
        "# fedfuse benchmark report", "",
        f"Grid `{grid.source}`, written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on "
        f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), "
        f"command `fedfuse bench {grid.source} --out {out_dir}`.", "",
        f"Final test accuracy after the last round, and its mean over the last {LAST_ROUNDS} rounds (less "
        f"noisy): mean ± sample std over seeds (no std for one seed). Rounds and MB (up + down, all "
        f"clients) to reach {target:.0%} test accuracy: mean over the seeds that reached it (reached: how many). "
        "Ensemble: the output ensemble of the last round's client models (an upper bound for fusion). "
        "Centralised: one model trained on the union of the shards with the same budget "
        "(rounds x local epochs passes).", "",
        f"| setting | strategy | seeds | final accuracy | last {LAST_ROUNDS} rounds | reached | rounds to target "
        "| MB to target | s / round | ensemble |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for line in lines:
        text.append(
            f"| {line['setting']} | {line['strategy']} | {line['seeds']} | "
            f"{_mean_std(line['final_mean'], line['final_std'])} | {_mean_std(line['last_mean'], line['last_std'])} "
            f"| {line['reached']}/{line['seeds']} | {optional(line['rounds_to_target'], '{:.1f}')} "
            f"| {optional(line['mb_to_target'], '{:.1f}')} | {optional(line['s_per_round'], '{:.1f}')} "
            f"| {optional(line['ensemble_mean'])} |")
    if comparisons:
        text += [
            "", "## Against FedAvg", "",
            "Paired by seed (same partition, same sampled clients): final accuracy minus FedAvg's (mean ± std "
            f"over seeds; wins: seeds where it ended above), the same for the mean of the last {LAST_ROUNDS} "
            "rounds, and the first round at which the strategy reached "
            "FedAvg's final accuracy of that seed (mean over the seeds that did), beside the round at which FedAvg "
            "itself first reached it.", "",
            f"| setting | strategy | seeds | final - FedAvg (points) | wins | last {LAST_ROUNDS} rounds - FedAvg "
            "| reached FedAvg's final | in round | FedAvg's round |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in comparisons:
            text.append(
                f"| {c['setting']} | {c['strategy']} | {c['seeds']} "
                f"| {_mean_std(c['delta_mean'], c['delta_std'], 2, 100, signed=True)} | {c['wins']}/{c['seeds']} "
                f"| {_mean_std(c['last_delta_mean'], c['last_delta_std'], 2, 100, signed=True)} "
                f"| {c['reached']}/{c['seeds']} "
                f"| {optional(c['rounds_to_fedavg_final'], '{:.1f}')} | {c['fedavg_rounds']:.1f} |")
    if rivalry:
        text += [
            "", "## Against the best rival, round by round", "",
            "Each fusion variant against the best of the other strategies in each round (the highest mean "
            "accuracy in that round over the seeds every one of them ran), paired by seed: accuracy minus the "
            "rival's, in points (mean ± std over seeds).", "",
            "| setting | strategy | round | seeds | best rival | rival's accuracy | accuracy | - best rival |",
            "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        text += [f"| {r['setting']} | {r['strategy']} | {r['round']} | {r['seeds']} | {r['rival']} "
                 f"| {r['rival_mean']:.4f} | {r['mean']:.4f} "
                 f"| {_mean_std(r['delta_mean'], r['delta_std'], 2, 100, signed=True)} |" for r in rivalry]
    if attacked:
        text += [
            "", "## Under attack", "",
            "Each strategy under each attack against its own clean run (the same split, seed and strategy "
            f"without attackers): final accuracy and the mean of the last {LAST_ROUNDS} rounds minus the clean "
            "run's, in points (mean ± std over seeds). Not reached: the strategy ignores what the attack lies "
            "about (its runs would repeat the clean ones; not run). `absent` settings are the reference, not an "
            "attack: the attackers send nothing, as if a defence had caught them all, so their loss is what the "
            "attackers' data was worth; final - absent (over the seeds both ran): what the attack took beyond "
            "that.", "",
            f"| setting | strategy | seeds | final - clean | last {LAST_ROUNDS} rounds - clean | final - absent |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        text += [f"| {a['setting']} | {a['strategy']} | {a['seeds']} "
                 f"| {_mean_std(a['delta_mean'], a['delta_std'], 2, 100, signed=True)} "
                 f"| {_mean_std(a['last_delta_mean'], a['last_delta_std'], 2, 100, signed=True)} "
                 f"| {_beyond_absent(a)} |"
                 if a["reached"] else f"| {a['setting']} | {a['strategy']} | {a['seeds']} | not reached | not reached | - |"
                 for a in attacked]
    text += ["", "Plots: " + ", ".join(f"`{p.name}`" for p in sorted(out_dir.glob("*.png"))), ""]
    if failures:
        text += ["## Failed runs", ""] + [f"- {f['run']}: {f['error']}" for f in failures] + [""]
    (out_dir / "report.md").write_text("\n".join(text))


def _beyond_absent(line: dict) -> str:
    if line["beyond_mean"] is None:
        return "-"
    value = _mean_std(line["beyond_mean"], line["beyond_std"], 2, 100, signed=True)
    return value if line["absent_seeds"] == line["seeds"] else f"{value} ({line['absent_seeds']} seeds)"


def write_plots(rows: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(rows)
    for setting in sorted({s for s, _ in curves if not s.endswith("-union")}):
        union = next((key for key in curves if key[1] == CENTRALISED and setting.startswith(key[0][:-len("union")])),
                     None)
        fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
        for (s, strategy), by_seed in sorted(curves.items()):
            if s != setting:
                continue
            rounds = min(len(r) for r in by_seed.values())
            acc = np.array([[row["accuracy"] for row in runs[:rounds]] for runs in by_seed.values()])
            mb = np.array([[row["bytes_total"] / 1e6 for row in runs[:rounds]] for runs in by_seed.values()]).mean(0)
            x = np.arange(rounds)
            by_round.plot(x, acc.mean(0), label=strategy)
            by_round.fill_between(x, acc.min(0), acc.max(0), alpha=0.2)
            by_bytes.plot(mb, acc.mean(0), marker=".", label=strategy)
        if union is not None:
            finals = [runs[-1]["accuracy"] for runs in curves[union].values()]
            by_round.axhline(float(np.mean(finals)), color="grey", linestyle="--", label="centralised")
        by_round.set(xlabel="round", ylabel="test accuracy", title=f"{setting}: band = min..max over seeds")
        by_bytes.set(xlabel="MB communicated (up + down)", ylabel="test accuracy", title=f"{setting}: accuracy vs bytes")
        by_round.legend(fontsize=8)
        by_bytes.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{setting}.png", dpi=100)
        plt.close(fig)


def write_outputs(grid: Grid, out_dir: Path) -> list[dict]:
    rows = collect_rows(grid)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    ensembles = {}
    for run in grid.runs:
        if is_finished(run.settings.out):
            ensembles[run.run_id] = read_summary(run.settings.out).get("ensemble_accuracy")
    failures = read_jsonl(out_dir / "failures.jsonl") if (out_dir / "failures.jsonl").exists() else []
    finished = {r["run"] for r in rows}
    failures = [f for f in failures if f["run"] not in finished]  # a later retry succeeded
    lines = summarise(rows, grid.target_accuracy, ensembles)
    if rows:
        write_plots(rows, out_dir)
    write_report(grid, out_dir, lines, failures, against_fedavg(rows), under_attack(rows, grid),
                 against_best_rival(rows))
    return lines
