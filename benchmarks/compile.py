"""torch.compile and BatchNorm: compile time, latency and error of seven ways to run a network.

For each network (``models.build``: eval mode, trained-looking BatchNorm statistics; ResNet-18
and MobileNetV2 by default), all in one worker process:

- ``eager``: the network as it is; ``eager folded``: ``bnfold.fold(model)``;
- ``inductor``: ``torch.compile(model)``, Inductor's defaults;
- ``inductor freezing``: Inductor with ``freezing=True`` (weights become constants, Inductor
  folds Conv+BatchNorm itself);
- ``bnfold backend``: ``torch.compile(model, backend=bnfold.torch.Backend())`` (what
  ``backend="bnfold"`` runs), which folds every captured graph, then hands it to Inductor;
- ``pre-grad pass``: Inductor with ``pre_grad_custom_pass = bnfold.torch.FoldPass()``, which
  folds in the graph (the weights are scaled by graph operations on each call);
- ``pass + freezing``: the pass under freezing, where Inductor constant-folds that scaling.

Every variant runs under ``torch.inference_mode`` (``--grad``). *compile s* is the time from
``torch.compile`` to the first output (compiling is lazy: the first call compiles); for
``eager folded`` it is ``bnfold.fold`` plus the first call. Compile times are honest: Inductor's
FX graph, AOT autograd and autotuning caches are off, each variant compiles with a fresh
``TORCHINDUCTOR_CACHE_DIR`` and emptied in-memory code caches (``torch._inductor.utils.
fresh_cache``), and a tiny network is compiled first so that the process's one-time costs
(importing Inductor, starting its compile workers, precompiling its C++ header) go to no
variant.

A variant's Inductor settings (``freezing``, ``pre_grad_custom_pass``) are patched into the
global config around its ``torch.compile`` and first call (dynamo reads ``freezing`` while it
traces: given only as an option, freezing silently does nothing) *and* given as
``torch.compile(options=...)``: two ``torch.compile`` calls on one model with equal options
share dynamo's compiled code, so without the options the freezing variant would run the
default one's. ``torch._dynamo.reset()`` runs before each network, not between variants: it
would throw away the variants already compiled, which the interleaved rounds still run.

Latency: every variant warmed up, then ``--rounds`` rounds of one forward pass each, in turn;
the median per variant. *max rel err* is ``max|a - b| / max|a|`` against eager's output on the
same input.

Run ``python -m benchmarks.compile`` (``--models``, ``--rounds``, ``--batch``, ``--size``,
``--grad``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import common

VARIANTS = [
    "eager",
    "eager folded",
    "inductor",
    "inductor freezing",
    "bnfold backend",
    "pre-grad pass",
    "pass + freezing",
]
MODELS = ["resnet18", "mobilenet_v2"]
ROUNDS, BATCH, SIZE = 30, 1, 224
GRAD = "inference_mode"


def _grad(mode: str) -> Callable[[], Any]:
    import torch

    return {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}[mode]


def _no_caches() -> None:
    """No compile reuses a previous one's work through Inductor's or AOT autograd's caches."""
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.fx_graph_remote_cache = False
    torch._inductor.config.autotune_local_cache = False
    torch._inductor.config.autotune_remote_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._functorch.config.enable_remote_autograd_cache = False


def _settings(name: str) -> tuple[dict[str, Any], Any, Callable[[], str]]:
    """Variant ``name``'s Inductor settings, its backend, and what bnfold did (after the call)."""
    import bnfold.torch

    settings: dict[str, Any] = {}
    fold_pass = None
    backend: Any = "inductor"
    if name in ("inductor freezing", "pass + freezing"):
        settings["freezing"] = True
    if name in ("pre-grad pass", "pass + freezing"):
        fold_pass = bnfold.torch.FoldPass()
        settings["pre_grad_custom_pass"] = fold_pass
    if name == "bnfold backend":
        backend = bnfold.torch.Backend()  # what backend="bnfold" runs, with its own reports

    def notes() -> str:
        if fold_pass is not None:
            kept = len(fold_pass.decisions) - fold_pass.matches
            return f"pass: {fold_pass.matches} folded" + (f", {kept} kept" if kept else "")
        if name == "bnfold backend":
            reports = backend.reports
            folded = sum(len(r.report.folded) for r in reports)
            seen = sum(len(r.report) for r in reports)
            skipped = [r.skipped for r in reports if r.skipped]
            text = f"backend: {folded} of {seen} folded, {len(reports)} graph(s)"
            return text + (f"; not folded: {skipped[0][:60]}" if skipped else "")
        return ""

    return settings, backend, notes


def _warm_up(tmp: str, grad: Callable[[], Any]) -> float:
    """Compile a tiny Conv+BatchNorm network once: the process's one-time compile costs."""
    import torch
    from torch._inductor.utils import fresh_cache

    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    start = time.perf_counter()
    with fresh_cache(dir=tmp, delete=False), grad():
        torch.compile(tiny, dynamic=False)(torch.randn(1, 3, 16, 16))
    return time.perf_counter() - start


def work(job: dict[str, Any]) -> dict[str, Any]:
    """Every model of the job in this one process: one warm-up compile, then per model the
    variants compiled one after another and timed in interleaved rounds."""
    import torch

    torch.set_num_threads(2)
    _no_caches()
    grad = _grad(job["grad"])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-inductor-") as tmp:
        warm_up_s = _warm_up(tmp, grad)
        for name in job["models"]:
            torch._dynamo.reset()  # the previous model's variants are done with
            start = time.perf_counter()
            results[name] = {k: job[k] for k in ("batch", "size", "rounds", "grad")}
            results[name]["variants"] = _measure(name, job, grad, tmp)
            results[name]["wall_s"] = time.perf_counter() - start
            results[name]["warm_up_s"] = warm_up_s
    return results


def _measure(
    model_name: str, job: dict[str, Any], grad: Callable[[], Any], tmp: str
) -> dict[str, Any]:
    import torch
    import torch._inductor.config
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    import bnfold

    from . import models

    net = models.build(model_name)
    shape = (job["batch"], 3, job["size"], job["size"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with grad():
        want = net(x)
    variants: dict[str, Any] = {}
    runners: dict[str, Callable[[], Any]] = {}
    for name in job["variants"]:
        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        try:
            notes: Callable[[], str] = str
            if name in ("eager", "eager folded"):
                model = bnfold.fold(net) if name == "eager folded" else net
                with grad():
                    model(x)
            else:
                settings, backend, notes = _settings(name)
                # Dynamo reads the global flags while it traces (freezing: whether parameters
                # are constants), Inductor while it compiles: set them for both, which happen
                # on the first call. As options too, so that no variant shares another's
                # compiled code (dynamo reuses it for an equal backend).
                with (
                    torch._inductor.config.patch(settings),
                    fresh_cache(dir=tmp, delete=False),
                    grad(),
                ):
                    opts = settings or None
                    model = torch.compile(net, backend=backend, dynamic=False, options=opts)
                    model(x)
            first_s = time.perf_counter() - start
            with grad():
                out = model(x)  # the steady state's output, not the compiling call's
        except Exception as e:  # noqa: BLE001 - reported in the table, the others go on
            variants[name] = {"error": _describe(e)}
            continue
        error = float((out.float() - want).abs().max() / want.abs().max())
        variants[name] = {
            "first_s": first_s,
            "error": None,
            "max_rel_err": error,
            "graphs": counters["stats"]["unique_graphs"] - graphs,
            "notes": notes(),
            "times": [],
        }

        def forward(model: Any = model) -> Any:
            with grad():
                return model(x)

        runners[name] = forward
    for forward in runners.values():
        forward()
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(job["rounds"]):
        for name, forward in runners.items():
            start = time.perf_counter()
            forward()
            variants[name]["times"].append(time.perf_counter() - start)
    if counters["stats"]["unique_graphs"] != graphs:  # a variant recompiled: its times lie
        for v in variants.values():
            v["notes"] = (v.get("notes", "") + " (a variant recompiled during the rounds)").strip()
    return variants


def _describe(e: BaseException) -> str:
    """The exception in one line, with the innermost bnfold frame (else the innermost one)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/bnfold/" in f.filename] or frames[-1:]
    where = f" ({ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno})" if ours else ""
    message = (str(e).strip().splitlines() or [""])[-1][:100]
    return f"{type(e).__name__}: {message}{where}"


def run(model_names: list[str], rounds: int, batch: int, size: int, grad: str) -> dict[str, Any]:
    """results[model] = {"variants": {variant: {"times": [s, ...], ...} or {"error": ...}}, ...}"""
    job = {
        "models": model_names,
        "variants": VARIANTS,
        "rounds": rounds,
        "batch": batch,
        "size": size,
        "grad": grad,
    }
    r = common.run_worker("compile", job, timeout=3600)
    if "error" in r:
        print(f"worker: {r['error']}")
        return {name: r for name in model_names}
    return r


def report(results: dict[str, Any]) -> str:
    out = []
    for name, r in results.items():
        if "variants" not in r:
            out.append(f"**{name}**: not run: {r.get('error', '')[:200]}\n")
            continue
        eager = r["variants"].get("eager", {}).get("times")
        base = statistics.median(eager) * 1e3 if eager else None
        rows = []
        for variant, v in r["variants"].items():
            if v.get("error"):
                rows.append([variant, f"failed: {v['error']}", "", "", "", "", ""])
                continue
            ms = [t * 1e3 for t in v["times"]]
            median = statistics.median(ms)
            notes = v["notes"]
            if v["graphs"] > 1:
                notes = f"{notes}; {v['graphs']} graphs" if notes else f"{v['graphs']} graphs"
            rows.append(
                [
                    variant,
                    f"{v['first_s']:.1f}" if v["first_s"] >= 1 else f"{v['first_s']:.2f}",
                    common.fmt_ms(median),
                    f"{common.fmt_ms(min(ms))}–{common.fmt_ms(max(ms))}",
                    common.fmt_ratio(base / median if base else None),
                    f"{v['max_rel_err']:.1e}",
                    notes,
                ]
            )
        out.append(
            f"**{name}** (batch {r['batch']} at {r['size']}×{r['size']}, "
            f"{r['rounds']} rounds; {r['wall_s']:.0f} s for its {len(r['variants'])} variants)\n"
        )
        headers = ["variant", "compile s", "median ms", "range ms", "÷ eager", "max rel err"]
        out.append(common.table([*headers, "notes"], rows, right=[1, 2, 3, 4, 5]))
        out.append("")
    warm = [r["warm_up_s"] for r in results.values() if "warm_up_s" in r]
    out.append(
        "compile s: torch.compile to first output, no caches (eager folded: bnfold.fold plus "
        "the first call). ÷ eager: eager's median over this one (above 1: faster)."
        + (f" The process's one-time compile costs (warm-up): {warm[0]:.1f} s." if warm else "")
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__, models=False)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--grad", choices=["inference_mode", "no_grad"], default=GRAD)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(args.models.split(","), args.rounds, args.batch, args.size, args.grad)
    common.publish("compile", "torch.compile", results, report, grad=args.grad)
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__" and not common.worker_main(work):
    main()
