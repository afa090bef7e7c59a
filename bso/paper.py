"""The paper's methods and numbers, each written once: Table 2's methods as train.py overrides,
every number of Tables 2-5 and Figures 4-5 tied to the command that reproduces it. The benchmarks
(scripts/bench/methods_digits.py, memory_vs_T.py), the tests and the report (bso.report) read them
from here; the experiment files (configs/experiment/) spell the same methods out per dataset, and a
test checks that they agree.

A ``Method`` is one row label of Table 2: its overrides on top of any dataset (on the digits these
are the whole method), and whether it trains online and keeps 1-bit weights (Table 2's columns).

A ``Cell`` is one number of one artefact (Table 2, 3, 4, 5, Figure 4, Figure 5): the paper's value,
the experiment file and the overrides that train it (``Cell.command``), and the swept quantity it
sits at (``x``: T, gamma, or the (1 - beta1, 1 - beta2) pair). ``bso-report`` matches run
directories to cells by the configuration those overrides compose (bso.report.matching), so a run
counts for a cell however it was launched. ``Cell.on_digits`` maps a cell onto the embedded digits
(same method and swept value, vgg_tiny) for the mini reproduction (``make reproduce-mini``).

Table 3's gammas are in the paper's units of 1e-5 (0.005 -> 5e-8); Table 4's pairs are
(1 - beta1, 1 - beta2) of T-BSO -> optimizer.binary.beta1 / beta2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Method:
    """A method of Table 2 (or a baseline beside it) and the overrides that train it."""

    name: str  # its label in tables and figures
    overrides: tuple[str, ...]  # train.py overrides on any dataset; () = not implemented in bso
    online: bool  # Table 2's "online" column: trained online through time, no BPTT
    binary: bool  # Table 2's "binary" column: 1-bit weights at inference


METHODS: dict[str, Method] = {
    "fp_snn": Method(
        "FP-SNN (BPTT)",
        overrides=("engine=bptt", "optimizer=sgd", "model.weights=full"),
        online=False,
        binary=False,
    ),
    # OTTT and NDOT: the T time steps' gradients summed, one SGD step per batch
    "ottt": Method(
        "OTTT",
        overrides=(
            "engine=online",
            "engine.trace=ottt",
            "engine.update=accumulate",
            "optimizer=sgd",
            "model.weights=full",
        ),
        online=True,
        binary=False,
    ),
    "ndot": Method(
        "NDOT",
        overrides=(
            "engine=online",
            "engine.trace=ndot",
            "engine.update=accumulate",
            "optimizer=sgd",
            "model.weights=full",
        ),
        online=True,
        binary=False,
    ),
    "qsnn": Method(
        "Q-SNN (BPTT, latent)",
        overrides=("engine=bptt", "optimizer=adam", "model.weights=latent"),
        online=False,
        binary=True,
    ),
    # AGMM (Liang et al., AAAI 2025): Q-SNN's recipe plus the adaptive gradient modulation gate;
    # not a row of Table 2 (its paper reports ImageNet ResNet-18 only)
    "agmm": Method(
        "AGMM (BPTT, latent)",
        overrides=("engine=bptt", "optimizer=adam", "model.weights=latent", "model.agmm=true"),
        online=False,
        binary=True,
    ),
    # CBP: Table 2's ImageNet baseline (constrained binary parameters, BPTT); not implemented here
    "cbp": Method("CBP", overrides=(), online=False, binary=True),
    "bso": Method(
        "BSO",
        overrides=("engine=online", "optimizer=bso", "model.weights=binary"),
        online=True,
        binary=True,
    ),
    "tbso": Method(
        "T-BSO",
        overrides=("engine=online", "optimizer=tbso", "model.weights=binary"),
        online=True,
        binary=True,
    ),
}
# Views of METHODS: the methods bso trains, their labels, Table 2's online / binary columns.
METHOD_OVERRIDES: dict[str, tuple[str, ...]] = {
    key: m.overrides for key, m in METHODS.items() if m.overrides
}
METHOD_NAMES: dict[str, str] = {key: m.name for key, m in METHODS.items()}
ONLINE = tuple(key for key, m in METHODS.items() if m.online)
BINARY = tuple(key for key, m in METHODS.items() if m.binary)
DATASET_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "dvs_cifar10": "DVS-CIFAR10",
    "imagenet": "ImageNet",
    "gsc": "Speech Commands",
    "digits": "digits",
}
ARTEFACTS = ("table2", "table3", "table4", "table5", "fig4", "fig5")
TITLES = {
    "table2": "Table 2: top-1 accuracy (%) and model size",
    "table3": "Table 3: T-BSO, CIFAR-100, T=2, accuracy (%) vs gamma",
    "table4": "Table 4: T-BSO, CIFAR-100, T=2, gamma 5e-7, accuracy (%) vs (1 - beta1, 1 - beta2)",
    "table5": "Table 5: Google Speech Commands, VGG-11, T=4",
    "fig4": "Figure 4: training memory vs T (CIFAR-10, VGG-11)",
    "fig5": "Figure 5: CIFAR-100, VGG-11, accuracy (%) vs T",
}
# One multirun per artefact (configs/sweep/<name>.yaml): `python train.py -m +sweep=<name>`.
SWEEPS = {
    "table2": ("table2", "table2_T"),
    "table3": ("table3",),
    "table4": ("table4",),
    "table5": ("table5",),
    "fig5": ("fig5",),
}


@dataclass(frozen=True)
class Cell:
    """One paper number and the run that reproduces it."""

    artefact: str
    dataset: str  # cfg.dataset.name
    method: str  # key of METHODS
    T: int
    value: float  # top-1 % (memory: GB)
    experiment: str | None  # configs/experiment/<name>.yaml; None: not reproducible here
    overrides: tuple[str, ...] = ()  # on top of the experiment
    x: float | tuple[float, float] | None = None  # the swept value (T, gamma, (1-b1, 1-b2))
    size_mb: float | None = None  # the paper's model size (Table 2, 5)
    arch: str = "VGG-11"
    before: str | None = None  # a command that must run first (ImageNet pre-training)
    note: str = ""  # why a cell is not reproducible here
    paper_dataset: str | None = None  # on_digits: the dataset the paper's value was measured on

    @property
    def reproducible(self) -> bool:
        return bool(self.experiment) or bool(self.overrides and self.dataset == "digits")

    def train_overrides(self) -> tuple[str, ...]:
        """The overrides train.py needs (experiment first)."""
        exp = (f"experiment={self.experiment}",) if self.experiment else ()
        return (*exp, *self.overrides)

    @property
    def command(self) -> str:
        if not self.reproducible:
            return f"not reproducible here: {self.note}"
        cmd = " ".join(("python train.py", *self.train_overrides()))
        return f"{self.before} && {cmd}" if self.before else cmd

    def on_digits(self) -> Cell:
        """The same method and swept value on the embedded digits (vgg_tiny)."""
        if self.method not in METHOD_OVERRIDES:
            return replace(
                self,
                dataset="digits",
                paper_dataset=self.dataset,
                experiment=None,
                overrides=(),
                before=None,
            )
        own = self.overrides
        if not any(o.startswith("engine.T=") for o in own):  # the experiment's T, said explicitly
            own = (f"engine.T={self.T}", *own)
        return replace(
            self,
            dataset="digits",
            paper_dataset=self.dataset,
            experiment=None,
            overrides=(*METHOD_OVERRIDES[self.method], *own),
            arch="vgg_tiny",
            before=None,
        )

    def with_overrides(self, *extra: str) -> Cell:
        """Extra overrides on every command (e.g. ``dataset.epochs=3`` for a short run)."""
        return replace(self, overrides=(*self.overrides, *extra)) if extra else self


def _T(T: int) -> tuple[str, ...]:
    return (f"engine.T={T}",)


def _table2() -> list[Cell]:
    cells: list[Cell] = []

    def add(dataset, method, T, value, size, default_T, **kw):
        overrides = () if T == default_T else _T(T)
        kw.setdefault("experiment", f"{dataset}_{method}")
        cells.append(
            Cell("table2", dataset, method, T, value, overrides=overrides, x=T, size_mb=size, **kw)
        )

    baselines = {
        "cifar10": (36.91, 1.20, {"fp_snn": 93.23, "ottt": 93.73, "ndot": 94.90, "qsnn": 93.20}),
        "cifar100": (37.10, 1.39, {"fp_snn": 71.15, "ottt": 71.11, "ndot": 76.61, "qsnn": 73.48}),
    }
    ours = {  # BSO, T-BSO at T = 6 / 4 / 2
        "cifar10": ((92.98, 93.45, 93.30), (94.70, 94.86, 94.32)),
        "cifar100": ((72.57, 72.34, 72.15), (74.27, 73.82, 73.40)),
    }
    for dataset, (full, binary, rows) in baselines.items():  # the paper's order: dataset by dataset
        for method, acc in rows.items():
            add(dataset, method, 6, acc, binary if method == "qsnn" else full, 6)
        for method, accs in zip(("bso", "tbso"), ours[dataset], strict=True):
            for T, acc in zip((6, 4, 2), accs, strict=True):
                add(dataset, method, T, acc, binary, 6)
    cells.append(
        Cell(
            "table2",
            "imagenet",
            "cbp",
            4,
            54.34,
            None,
            x=4,
            size_mb=4.22,
            arch="ResNet-18",
            note="CBP (constrained binary parameters, BPTT) is not implemented in bso",
        )
    )
    # a fixed directory: the fine-tuning names its best.pt
    pretrain_dir = "outputs/imagenet_tbso_pretrain"
    pretrain = f"python train.py experiment=imagenet_tbso_pretrain hydra.run.dir={pretrain_dir}"
    for T, acc in ((6, 58.86), (4, 57.76)):
        cells.append(
            Cell(
                "table2",
                "imagenet",
                "tbso",
                T,
                acc,
                "imagenet_tbso_finetune",
                overrides=(*(() if T == 4 else _T(T)), f"init_from={pretrain_dir}/best.pt"),
                x=T,
                size_mb=4.22,
                arch="ResNet-18",
                before=pretrain,
            )
        )
    for method, acc, size in (
        ("fp_snn", 73.90, 36.91),
        ("ndot", 77.50, 36.91),
        ("qsnn", 79.10, 1.20),
        ("bso", 80.60, 1.20),
        ("tbso", 81.00, 1.20),
    ):
        add("dvs_cifar10", method, 10, acc, size, 10)
    return cells


def _fig5() -> list[Cell]:
    accs = {
        "tbso": (73.40, 73.82, 74.27, 74.64, 74.88, 75.20),
        "bso": (72.15, 72.34, 72.57, 72.71, 72.61, 72.85),
    }
    return [
        Cell("fig5", "cifar100", m, T, acc, f"cifar100_{m}", overrides=_T(T), x=T, size_mb=1.39)
        for m, values in accs.items()
        for T, acc in zip((2, 4, 6, 8, 10, 12), values, strict=True)
    ]


def _table3() -> list[Cell]:
    paper = {
        0.005: 73.75,
        0.02: 73.33,
        0.05: 73.40,
        0.08: 73.24,
        0.1: 73.38,
        0.15: 73.34,
        0.2: 73.41,
        5.0: 72.83,
    }
    cells = []
    for units, acc in paper.items():
        gamma = float(f"{units * 1e-5:.3g}")  # 0.005 (x 1e-5) -> 5e-08
        cells.append(
            Cell(
                "table3",
                "cifar100",
                "tbso",
                2,
                acc,
                "cifar100_tbso",
                overrides=("engine.T=2", f"optimizer.binary.gamma={gamma:g}"),
                x=gamma,
            )
        )
    return cells


def _table4() -> list[Cell]:
    paper = {
        (1.5e-4, 1.5e-6): 73.22,
        (1.5e-4, 1e-5): 73.31,
        (1.5e-4, 1.5e-5): 73.29,
        (1e-3, 1.5e-6): 73.17,
        (1e-3, 1e-5): 73.40,
        (1e-3, 1.5e-5): 73.34,
    }
    cells = []
    for (d1, d2), acc in paper.items():
        beta1, beta2 = float(f"{1 - d1:.10g}"), float(f"{1 - d2:.10g}")
        cells.append(
            Cell(
                "table4",
                "cifar100",
                "tbso",
                2,
                acc,
                "cifar100_tbso",
                overrides=(
                    "engine.T=2",
                    "optimizer.binary.gamma=5e-7",
                    f"optimizer.binary.beta1={beta1}",
                    f"optimizer.binary.beta2={beta2}",
                ),
                x=(d1, d2),
            )
        )
    return cells


def _table5() -> list[Cell]:
    return [Cell("table5", "gsc", "tbso", 4, 96.12, "gsc_tbso", x=4, size_mb=1.26)]


@dataclass(frozen=True)
class MemoryPoint:
    """Figure 4: the paper's training memory (GB, CIFAR-10 VGG-11, batch as the paper's)."""

    method: str  # key of FIG4_METHODS
    T: int | None  # None: the same at every T
    gb: float


# Figure 4's methods (scripts/bench/memory_vs_T.py measures them under these names) and labels
FIG4_METHODS = {"bptt_latent": "BPTT (latent weights)", "bso": "BSO", "tbso": "T-BSO"}
FIG4: tuple[MemoryPoint, ...] = (
    MemoryPoint("bptt_latent", 1, 2.86),
    MemoryPoint("bptt_latent", 35, 58.18),
    MemoryPoint("bso", None, 2.9),
    MemoryPoint("tbso", None, 3.1),
)
FIG4_COMMAND = (
    "make fig4   # python scripts/bench/memory_vs_T.py -> benchmarks/results/memory_vs_T.json"
)


def fig4_paper_gb() -> dict[str, dict[int | str, float]]:
    """Figure 4's paper points per method: {T: GB}, or {"all": GB} where one value holds at every
    T (the memory benchmark writes this into its JSON)."""
    out: dict[str, dict[int | str, float]] = {}
    for mp in FIG4:
        out.setdefault(mp.method, {})["all" if mp.T is None else mp.T] = mp.gb
    return out


CELLS: dict[str, list[Cell]] = {
    "table2": _table2(),
    "table3": _table3(),
    "table4": _table4(),
    "table5": _table5(),
    "fig5": _fig5(),
}


def cells(artefact: str) -> list[Cell]:
    if artefact not in CELLS:
        raise ValueError(f"unknown artefact {artefact!r}; choose one of {sorted(CELLS)}")
    return list(CELLS[artefact])
