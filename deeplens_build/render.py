"""What the commands print: the build's report, the manifest, the plugins, sizes. Plain values in, text out;
no command logic here, and nothing heavy imported (``inspect`` renders a manifest in a fresh process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deeplens_build.manifest import Manifest
    from deeplens_build.plugins import PluginManager
    from deeplens_build.values import BuildResult


def size(n: float) -> str:
    """Bytes for people, in powers of 1024 with three significant digits, as the progress bars (tqdm's
    ``format_sizeof``) show them; written out because importing tqdm is 30 ms of a 0.14 s ``inspect``."""
    for unit in ("", "k", "M", "G", "T", "P", "E", "Z"):
        if abs(n) < 999.5:
            digits = 2 if abs(n) < 9.995 else 1 if abs(n) < 99.95 else 0
            return f"{n:.{digits}f}{unit}B"
        n /= 1024
    return f"{n:3.1f}YB"


def summary(result: BuildResult, warnings: list[str]) -> dict[str, Any]:
    """What ``package`` reports of a build (``--json`` prints it), and an up-to-date one repeats."""
    parity = result.parity
    return {
        "bundle": str(result.bundle),
        "sha256": result.sha256,
        "name": result.name,
        "version": result.version,
        "framework": result.framework,
        "parity": {"max_abs_diff": parity.max_abs_diff, "max_rel_diff": parity.max_rel_diff,
                   "tolerance": parity.tolerance, "rtol": parity.rtol, "passed": parity.passed,
                   "samples": parity.samples, "top1_agreement": parity.top1_agreement,
                   "detection_agreement": parity.detection_agreement}
        if parity else None,
        "sizes": {"source": result.sizes.source, "artifact": result.sizes.artifact, "bundle": result.sizes.bundle},
        "stages": list(result.stages),
        "cached_stages": list(result.cached_stages),
        "notes": list(result.notes),
        "warnings": warnings,
    }


def package(summary: dict[str, Any], *, up_to_date: bool, as_json: bool) -> str:
    """What ``package`` prints on stdout; up to date, every stage the build went through counts as reused."""
    cached = summary["stages"] if up_to_date else summary["cached_stages"]
    if as_json:
        return json.dumps({**summary, "cached_stages": cached, "up_to_date": up_to_date}, indent=2)
    bundle = summary["bundle"]
    lines = [f"\nup to date {bundle} (nothing it was built from has changed)" if up_to_date else f"\nbuilt {bundle}",
             f"  sha256    {summary['sha256']}",
             f"  model     {summary['name']} {summary['version']} ({summary['framework']})"]
    if p := summary["parity"]:
        lines.append(f"  parity    max abs diff {p['max_abs_diff']:.3g}, within {p['tolerance']:.3g} + "
                     f"{p['rtol']:.3g} × |original|{_agreement(p['top1_agreement'], p['detection_agreement'])}, "
                     f"over {p['samples']} samples")
    s = summary["sizes"]
    lines.append(f"  sizes     source {size(s['source'])}, artifact {size(s['artifact'])}, "
                 f"bundle {size(s['bundle'])}")
    if cached:
        lines.append(f"  cache     reused {', '.join(cached)}")
    return "\n".join(lines)


def manifest(m: Manifest) -> Iterator[str]:
    """``inspect``'s lines: interface, parity, sizes, target, runtime, Lambda, provenance."""
    model = m.model
    yield f"{m.name} {m.version}  ({m.framework}, {model.format}, {model.precision})"
    for kind, specs in (("input", model.inputs), ("output", model.outputs)):
        for spec in specs:
            layout = f" {spec.layout}" if spec.layout else ""
            yield f"  {kind:6} {spec.name} {list(spec.shape)} {spec.dtype}{layout}"
    if parity := m.parity:
        yield (f"  parity  max abs diff {parity.max_abs_diff:.3g} (tolerance {parity.tolerance:.3g} + rtol "
               f"{parity.rtol:.3g} × |original|), "
               f"max rel diff {parity.max_rel_diff:.3g}"
               f"{_agreement(parity.top1_agreement, parity.detection_agreement)}, {parity.samples} samples, seed "
               f"{parity.seed}, on {parity.runtime}")
    opt = m.optimization
    yield f"  sizes   {size(opt.size_before)} → {size(opt.size_after)} ({', '.join(opt.passes)})"
    if opt.fp32_nodes:
        yield f"  fp32    {len(opt.fp32_nodes)} node(s) kept in FP32 for parity: {', '.join(opt.fp32_nodes)}"
    if calibrated := opt.calibration:
        yield (f"  int8    calibrated ({calibrated.method}) on {calibrated.calibration} samples, gated on "
               f"{calibrated.validation} held out; samples sha256 {calibrated.sha256}")
    if target := m.target:
        ceiling = f", ONNX opset ≤ {target.max_opset}" if target.max_opset else ""
        yield (f"  target  {target.backend} (compiled on: {target.compiled_on}{ceiling}; "
               f"{target.distribution or target.plugin} {target.version or ''})".replace(" )", ")"))
    for latency in m.profile:
        yield (f"  latency {latency.runtime}: median {latency.median_ms:.3f} ms, p95 {latency.p95_ms:.3f} ms "
               f"(batch 1, {latency.runs} runs)")
    yield f"  runtime {m.runtime.name} on {m.runtime.platform}: {', '.join(m.runtime.requirements)}"
    from deeplens_build.manifest import MODEL_SIGNATURE, PROVENANCE  # pydantic's: not for an up-to-date package

    listed = {f.path for f in m.files}
    kinds = {MODEL_SIGNATURE: "OpenSSF model signing", PROVENANCE: "SLSA v1 provenance"}
    if shown := [f"{name} ({kind})" for name, kind in kinds.items() if name in listed]:
        yield f"  attest  {', '.join(shown)}"
    published = f", published {m.lambda_.arn}" if m.lambda_.arn else ", not published"
    yield f"  lambda  {m.lambda_.name} {m.lambda_.version} ({m.lambda_.handler}{published})"
    yield f"  greengrass {m.greengrass.format}: {m.greengrass.component} ({', '.join(m.greengrass.documents)})"
    src, plugin = m.source, m.provenance.plugin
    yield f"  source  {src.origin} ({src.kind}, sha256 {src.sha256[:16]}…): {', '.join(src.model_files)}"
    yield (f"  built   by deeplens-build {m.provenance.tools.get('deeplens-build', '?')}, plugin {plugin.name} "
           f"({plugin.distribution} {plugin.version})")
    yield f"  files   {len(m.files)}, signed by {m.signing.fingerprint[:16]}… (unverified: run verify)"


def plugins_json(manager: PluginManager) -> str:
    return json.dumps({
        "plugins": [{"name": p.name, "framework": p.framework.name, "summary": p.framework.summary,
                     "distribution": p.distribution, "version": p.version, "builtin": p.builtin,
                     "tools": dict(p.tool_versions)} for p in manager.plugins],
        "sources": [{"name": s.kind.name, "prefixes": list(s.kind.prefixes), "summary": s.kind.summary,
                     "plugin": s.plugin, "distribution": s.distribution, "version": s.version,
                     "builtin": s.builtin} for s in manager.sources],
        "targets": [{"name": t.backend.name, "summary": t.backend.summary, "plugin": t.plugin,
                     "accelerators": list(t.backend.accelerators), "platforms": list(t.backend.platforms),
                     "max_opset": t.backend.max_opset, "compiles_on": "device" if t.backend.device_build else
                     "build" if t.backend.compile else "nothing", "distribution": t.distribution,
                     "version": t.version, "builtin": t.builtin, "tools": dict(t.tool_versions)}
                    for t in manager.targets],
        "failed": [{"name": f.name, "distribution": f.distribution, "reason": f.reason} for f in manager.failures],
    }, indent=2)


def plugins(manager: PluginManager) -> Iterator[str]:
    if not manager.plugins:
        yield "no framework plugins installed; pip install deeplens-build-onnx"
    for p in manager.plugins:
        origin = "built-in" if p.builtin else "third-party"
        tools = ", ".join(f"{k} {v}" for k, v in p.tool_versions.items())
        yield (f"{p.framework.name:12} {p.distribution} {p.version} ({origin}) — {p.framework.summary}"
               + (f" [{tools}]" if tools else ""))
    for s in manager.sources:
        origin = "built-in" if s.builtin else "third-party"
        yield f"source {s.kind.name:12} {s.kind.summary} ({s.distribution or s.plugin}, {origin})"
    for t in manager.targets:
        origin = "built-in" if t.builtin else "third-party"
        yield f"target {t.backend.name:12} {t.backend.summary} ({t.distribution or t.plugin}, {origin})"
    for f in manager.failures:
        yield f"skipped {f.name} ({f.distribution or 'unknown distribution'}): {f.reason}"


def _agreement(top1: float | None, detections: float | None) -> str:
    return ((f", top-1 agreement {top1:.1%}" if top1 is not None else "")
            + (f", detections agreeing {detections:.1%}" if detections is not None else ""))
