"""The GPU check's Markdown report (scripts/bench/gpu_check.py): the latest record of every item,
the device and versions named, and the speed, Figure 4 and roofline tables."""

from __future__ import annotations

import json


def record_key(record: dict) -> tuple:
    return (
        record["item"],
        json.dumps(record["params"], sort_keys=True),
        record["env"]["device_name"],
    )


def latest_records(records: list[dict]) -> list[dict]:
    latest: dict = {}
    for r in records:
        latest[record_key(r)] = r
    return list(latest.values())


def _env_line(env: dict) -> str:
    parts = [
        f"{env['device_name']} ({env['device']})",
        f"driver {env.get('driver') or '-'}",
        f"CUDA {env.get('cuda') or '-'}",
        f"cuDNN {env.get('cudnn') or '-'}",
        f"torch {env.get('torch')}",
        f"Triton {env.get('triton') or '-'}",
        f"spikingjelly {env.get('spikingjelly') or '-'}",
    ]
    return ", ".join(parts)


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def _summary(r: dict) -> str:
    res = r.get("result") or {}
    if r["status"] in ("error", "timeout", "skipped"):
        return (r.get("error") or "").splitlines()[0][:160] if r.get("error") else ""
    bad = sorted(k for k, v in r.get("checks", {}).items() if not v)
    if bad:
        ops = {op for x in [res, *res.get("rows", [])] for op in x.get("nondeterministic_ops", [])}
        suspects = f" (ops without a deterministic kernel: {', '.join(sorted(ops))})" if ops else ""
        return "failed: " + ", ".join(bad) + suspects
    kind = r["kind"]
    if kind == "train":
        return (
            f"{res['train_images']} images, train loss {res['train_loss']:.4f}, resumed bit for bit "
            f"(straight / cut / resumed {res['seconds']['straight']:.0f} / "
            f"{res['seconds']['cut']:.0f} / {res['seconds']['resumed']:.0f} s)"
        )
    if kind == "flips":
        return "; ".join(
            f"{x['method']}: {x['batches']} batches, flips {x['flips_per_batch']}, same in every mode"
            for x in res["rows"]
        )
    if kind == "ddp":
        return f"{res['ranks']} ranks, {res['backend']}, SyncBatchNorm {res['sync_batchnorm']}"
    if kind == "nccl":
        return f"{res['backend']}, world size {res['world_size']}, DDP flips as the bare model"
    if kind == "speed":
        return "; ".join(
            f"{x['method']} {x['mode']}{' bf16' if x['autocast'] else ''}"
            f"{' compiled' if x['compile'] else ''} T={x['T']}: {x['samples_per_s']:.0f} samples/s"
            for x in res["rows"]
        )
    if kind == "fig4":
        return "; ".join(
            f"{x['method']}: {x['activation_peak_bytes'] / 1e6:.1f} MB activations"
            for x in res["points"]
        )
    if kind == "roofline":
        return "; ".join(
            f"b{x['batch']} T={x['T']} {x['mode']}: share {x['conv_share']:.2f}"
            for x in res["rows"]
        )
    if kind == "loader":
        return "; ".join(f"{x['workers']} workers: {x['samples_per_s']:.0f}/s" for x in res["rows"])
    return ""


def _table(title: str, header: str, rows: list[tuple]) -> list[str]:
    """A titled Markdown table; nothing without rows."""
    if not rows:
        return []
    head = [title, "", f"| {header} |", "|" + "---|" * (header.count("|") + 1)]
    return ["", *head, *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def render(records: list[dict], items: list) -> str:
    """The Markdown report of the latest record of every item (device and versions named)."""
    latest = latest_records(records)
    order = {i.name: n for n, i in enumerate(items)}
    latest.sort(key=lambda r: (order.get(r["item"], len(order)), r["env"]["device_name"]))
    lines = ["# GPU check (`make gpu-check`, scripts/bench/gpu_check.py)", ""]
    for env_line in dict.fromkeys(_env_line(r["env"]) for r in latest):
        lines.append(f"- {env_line}")
    lines += ["", "| item | status | s | result |", "|---|---|---|---|"]
    lines += [
        f"| {r['group']}. {r['item']} | {r['status']} | {r['seconds']:.0f} | {_summary(r)} |"
        for r in latest
    ]
    ok = [r for r in latest if r["status"] in ("ok", "failed")]

    def rows_of(kind: str, key: str) -> list[dict]:
        return [x for r in ok if r["kind"] == kind for x in r["result"][key]]

    lines += _table(
        "Training speed (channels_last + cudnn.benchmark on CUDA; peak = CUDA allocated):",
        "method | mode | T | batch | autocast | compile | samples/s | ms per time step | peak MB",
        [
            (x["method"], x["mode"], x["T"], x["batch"], "bf16" if x["autocast"] else "off")
            + (x["compile"], f"{x['samples_per_s']:.1f}", f"{x['ms_per_time_step']:.2f}")
            + (_mb(x["peak_cuda_allocated_mb"]),)
            for x in rows_of("speed", "rows")
        ],
    )
    lines += _table(
        "Figure 4 (BSO/T-BSO lean, as trained; peak: CUDA allocated, or RSS on a CPU):",
        "method | T | batch | activation MB | peak MB",
        [
            (x["method"], x["T"], x["batch"], f"{x['activation_peak_bytes'] / 1e6:.1f}")
            + (_mb(x.get("cuda_peak_allocated_bytes", x.get("peak_rss_bytes", 0)) / 1e6),)
            for x in sorted(rows_of("fig4", "points"), key=lambda x: (x["method"], x["T"]))
        ],
    )
    lines += _table(
        "Roofline (T-BSO; iteration against its convolutions alone):",
        "batch | T | mode | iteration ms | conv ms | conv share | x plain | same flips",
        [
            (x["batch"], x["T"], x["mode"], f"{x['iteration_ms']:.1f}", f"{x['conv_ms']:.1f}")
            + (f"{x['conv_share']:.3f}", f"{x.get('over_plain', 1):.3f}")
            + (x["same_flips_as_other_modes"],)
            for x in rows_of("roofline", "rows")
        ],
    )
    return "\n".join(lines) + "\n"
