"""``deeplens-build``: the commands (package, verify, inspect, plugins, keygen, deploy, run, watch, cache); what they
print is :mod:`deeplens_build.render`'s.

User errors print one ``error:`` line and exit with the error's code; ``--debug`` shows the traceback.
Heavy modules (onnx, onnxruntime, the frameworks) are imported only by ``package``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from deeplens_build import __version__
from deeplens_build.errors import DeepLensBuildError, ExitCode

if TYPE_CHECKING:
    from deeplens_build.values import BuildResult

# pydantic looks for plugins of its own (observability hooks for applications) by reading the entry points of
# every installed distribution: 20-30 ms of each command's start, for plugins this tool has no use for
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

BROKEN_PIPE = 128 + 13
"""The exit status of a Unix tool that SIGPIPE ended, as a shell reports it."""
INTERRUPTED = 128 + 2
"""The exit status of a command that SIGINT (Ctrl-C) stopped before it did what it was asked."""


def _handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """One ``error:`` line and the error's exit code; anything unexpected is still one line, never a trace."""
    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:  # the reader of stdout is gone (`inspect B | head`): end quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor a complaint when Python exits
            sys.exit(BROKEN_PIPE)
        except DeepLensBuildError as exc:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"error: {' '.join(str(exc).split())}", err=True)  # one line, whatever a cause it quotes held
            sys.exit(int(exc.exit_code))
        except Exception as exc:  # the last resort: a bug of ours, reported without a traceback
            if click.get_current_context().find_root().params.get("debug"):
                raise
            message = " ".join(str(exc).split())[:500] or "(no message)"
            click.echo(f"error: internal error: {type(exc).__name__}: {message} (run with --debug for the "
                       "traceback; please report it)", err=True)
            sys.exit(int(ExitCode.INTERNAL))
    return wrapper


_SIGNER_HELP = ("The signer's trusted public key (PEM). Without it the bundle is refused, unless "
                "--allow-any-signer.")
_ANY_SIGNER_HELP = "Accept a bundle verified against its own embedded key only (anyone could have signed it)."


def _signer_options(command: Any) -> Any:
    """``--public-key`` and ``--allow-any-signer``, for the commands that execute or deploy a bundle's code."""
    command = click.option("--allow-any-signer", is_flag=True, help=_ANY_SIGNER_HELP)(command)
    return click.option("--public-key", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                        help=_SIGNER_HELP)(command)


class _Main(click.Group):
    """Usage errors (a bad option value, a missing argument) are one ``error:`` line too, like every other."""

    def main(self, args: list[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        args = list(sys.argv[1:] if args is None else args)
        if "--debug" in args[1:]:  # every message says "run with --debug": after the command name too
            args.remove("--debug")
            args.insert(0, "--debug")
        try:
            code = super().main(args, *rest, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare `deeplens-build`: the help, not an error
            click.echo(exc.format_message())
            sys.exit(0)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()} (see deeplens-build --help)", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(int(ExitCode.INTERNAL))
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Main)
@click.version_option(__version__, prog_name="deeplens-build")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Turn a SageMaker training output into a signed, parity-checked Greengrass bundle."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Project file [./deeplens.toml].")
@click.option("--source", help="Folder, model.tar.gz, s3://BUCKET/KEY or sagemaker-job:NAME [model.source].")
@click.option("--output", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the bundle [build.output].")
@click.option("--signing-key", help="PEM private key or kms:KEY_ID [$DEEPLENS_SIGNING_KEY].")
@click.option("--no-cache", is_flag=True, help="Rebuild every stage (and refresh the cache).")
@click.option("--cache", "shared_cache", help="A cache shared between machines, s3://BUCKET/PREFIX [build.cache].")
@click.option("--publish", is_flag=True, help="Publish the Lambda version first; the bundle records its ARN.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object describing the build.")
@_handle_errors
def package(config_path: Path | None, source: str | None, output: Path | None, signing_key: str | None,
            no_cache: bool, shared_cache: str | None, publish: bool, as_json: bool) -> None:
    """Build the bundle: fetch, convert, optimize, check parity, sign."""
    from deeplens_build import render, uptodate
    from deeplens_build.layout import read_document

    request = uptodate.Request.of(config=config_path, source=source, output=output, signing_key=signing_key,
                                  shared_cache=shared_cache)
    document = read_document(request.config)
    if (replay := uptodate.check(request, document, no_cache=no_cache, publish=publish)) is not None:
        click.echo(replay.stderr, err=True, nl=False)
        click.echo(replay.json if as_json else replay.text)
        return
    with uptodate.recording(request) as observed:
        result, warnings, work_dir = _build(config_path, document, source, output, signing_key, no_cache,
                                            shared_cache, publish)
        summary = render.summary(result, warnings)
        if result.local_inputs:
            stderr = "".join(f"{note}\n" for note in result.notes) + "".join(f"warning: {w}\n" for w in warnings)
            observed.save(request, work_dir=work_dir, bundle=result.bundle, replay=uptodate.Replay(
                text=render.package(summary, up_to_date=True, as_json=False),
                json=render.package(summary, up_to_date=True, as_json=True), stderr=stderr))
    click.echo(render.package(summary, up_to_date=False, as_json=as_json))


def _build(config_path: Path | None, document: dict[str, Any], source: str | None, output: Path | None,
           signing_key: str | None, no_cache: bool, shared_cache: str | None,
           publish: bool) -> tuple[BuildResult, list[str], Path]:
    """Run the pipeline; its result, the warnings it gave and the work folder."""
    from deeplens_build.build import BuildOptions
    from deeplens_build.cache import tool_cache_environment
    from deeplens_build.config import load_config
    from deeplens_build.errors import UsageError
    from deeplens_build.names import check_shared_cache
    from deeplens_build.pipeline import package as build
    from deeplens_build.plugins import build_plugin_manager
    from deeplens_build.report import Reporter

    config = load_config(config_path, document)
    if shared_cache is not None:
        try:
            check_shared_cache(shared_cache)
        except ValueError as exc:
            raise UsageError(f"--cache {exc}") from exc
    os.environ.update(tool_cache_environment(config.build.work_dir))  # before onnxruntime or keras is imported
    manager = build_plugin_manager()
    reporter = Reporter()
    for failure in manager.failures:
        reporter.warn(f"plugin {failure.name} was skipped: {failure.reason}")
    result = build(config, BuildOptions(source=source, output=output, signing_key=signing_key,
                                        use_cache=not no_cache, publish=publish, shared_cache=shared_cache),
                   manager=manager,
                   reporter=reporter)
    return result, reporter.warnings, config.build.work_dir


@main.command("publish-lambda")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Project file [./deeplens.toml].")
@click.option("--json", "as_json", is_flag=True, help="Print the published version as JSON.")
@_handle_errors
def publish_lambda_command(config_path: Path | None, as_json: bool) -> None:
    """Create or update the inference Lambda, publish a version and move its alias to it."""
    import tempfile

    from deeplens_build.aws.greengrass import lambda_environment
    from deeplens_build.aws.publish import publish_lambda
    from deeplens_build.config import load_config
    from deeplens_build.report import Reporter
    from deeplens_build.stages.lambda_package import package_lambda

    config = load_config(config_path)
    config.build.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lambda-", dir=config.build.work_dir) as scratch:
        package = package_lambda(config.lambda_, default_name=config.model.name, workdir=Path(scratch))
        published = publish_lambda(package, config.lambda_, environment=lambda_environment(config),
                                   reporter=Reporter())
    if as_json:
        click.echo(json.dumps({"name": published.name, "version": published.version, "arn": published.arn,
                               "alias": published.alias, "alias_arn": published.alias_arn,
                               "content_version": package.version}, indent=2))
    else:
        click.echo(f"published {published.arn} (alias {published.alias}, content {package.version})")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The signer's trusted public key (PEM).")
@_handle_errors
def verify(bundle: Path, public_key: Path | None) -> None:
    """Check the bundle's signature and every file's size and sha256."""
    from deeplens_build.bundle import verify_bundle

    result = verify_bundle(bundle, public_key)
    fingerprint = result.fingerprint
    if result.trusted:
        click.echo(f"verified: {bundle.name} is signed by the trusted key {fingerprint[:16]}… and every file "
                   "matches its manifest")
    else:
        click.echo(f"verified integrity only: every file matches the manifest and the signature matches the "
                   f"bundle's own key {fingerprint[:16]}…; pass --public-key to check who signed it")


@main.command("deploy")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", "target_text", required=True, help="thing:NAME or thing-group:NAME.")
@click.option("--format", "fmt", type=click.Choice(["v2", "v1"]), default="v2", show_default=True)
@_signer_options
@click.option("--rollout-rate", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="v2: devices per minute the IoT job rolls out to.")
@click.option("--abort-percent", type=click.FloatRange(0, 100), default=10.0, show_default=True,
              help="v2: cancel the rollout when this share of devices failed.")
@click.option("--wait", is_flag=True, help="Follow the deployment until every device is done; exit non-zero if one "
              "failed.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="With --wait: seconds to wait for every device.")
@click.option("--json", "as_json", is_flag=True, help="Print the deployment (and, with --wait, each device) as JSON.")
@_handle_errors
def deploy_command(bundle: Path, target_text: str, fmt: str, public_key: Path | None, allow_any_signer: bool,
                   rollout_rate: int, abort_percent: float, wait: bool, timeout: float, as_json: bool) -> None:
    """Verify the bundle, upload its artifacts to S3, register and deploy it with Greengrass."""
    from deeplens_build.aws.deploy import Clients, Rollout, deploy, parse_target
    from deeplens_build.aws.rollout import follow
    from deeplens_build.errors import RolloutError
    from deeplens_build.report import Reporter

    clients, reporter = Clients(), Reporter()
    result = deploy(bundle, parse_target(target_text), fmt=fmt, public_key=public_key,
                    allow_any_signer=allow_any_signer,
                    rollout=Rollout(maximum_per_minute=rollout_rate, abort_failure_percent=abort_percent),
                    clients=clients, reporter=reporter, workdir=Path.cwd() / ".deeplens")
    report = {"deployment_id": result.deployment_id, "format": result.format,
              "target": f"{result.target.kind}:{result.target.name}", "topic": result.topic,
              "component": result.component, "uploaded": list(result.uploaded), "skipped": list(result.skipped),
              **result.extra}
    if not as_json:
        click.echo(f"deployment {result.deployment_id} ({result.format}) to {result.target.kind} "
                   f"{result.target.name}")
        click.echo(f"  uploaded {len(result.uploaded)}, already there {len(result.skipped)}")
        click.echo(f"  results will appear on MQTT topic {result.topic}")
    failure = None
    if wait:
        try:
            outcome = follow(result, clients, timeout=timeout, interval=5.0, reporter=reporter)
        except RolloutError as exc:
            outcome, failure = exc.outcome, exc
        report["devices"] = [{"device": d.device, "status": d.status, "reason": d.reason} for d in outcome.devices]
        report["succeeded"] = failure is None
        if not as_json and failure is None:
            click.echo(f"  all {len(outcome.devices)} device(s) succeeded")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    if failure is not None:
        raise failure


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@_handle_errors
def inspect(bundle: Path, as_json: bool) -> None:
    """Show the bundle's manifest: interface, parity, sizes, runtime, Lambda, provenance."""
    from deeplens_build import render
    from deeplens_build.bundle import read_manifest

    m = read_manifest(bundle)
    if as_json:
        click.echo(json.dumps(m.to_dict(), indent=2, sort_keys=True))
        return
    for line in render.manifest(m):
        click.echo(line)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the plugins as JSON.")
@_handle_errors
def plugins(as_json: bool) -> None:
    """List the plugins found, built-in and third-party alike: frameworks, source kinds and target backends."""
    from deeplens_build import render
    from deeplens_build.plugins import build_plugin_manager

    manager = build_plugin_manager()
    if as_json:
        click.echo(render.plugins_json(manager))
        return
    for line in render.plugins(manager):
        click.echo(line)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("signing-key.pem"), show_default=True,
              help="Where to write the private key; the public key goes beside it as *.pub.pem.")
@_handle_errors
def keygen(out: Path) -> None:
    """Write a new ECDSA P-256 key pair for signing bundles."""
    from deeplens_build.signing import generate_keypair

    public = generate_keypair(out)
    click.echo(f"private key: {out} (keep it secret; pass it with --signing-key or $DEEPLENS_SIGNING_KEY)")
    click.echo(f"public key:  {public} (give it to whoever verifies: deeplens-build verify --public-key)")


@main.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--frames", help="A folder of frames (.npy or images) or a video file [generated frames].")
@click.option("--mqtt", "broker", default="127.0.0.1:1883", show_default=True, help="MQTT broker HOST:PORT.")
@click.option("--thing", default="deeplens", show_default=True, help="The thing name in the topic.")
@click.option("--max-frames", type=click.IntRange(1), help="Stop after this many inferences.")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), help="Pace frames like a camera would.")
@click.option("--buffer", type=click.IntRange(1), default=1000, show_default=True,
              help="Results kept while the broker is down (the oldest are dropped first).")
@click.option("--stream", "stream_port", type=click.IntRange(0, 65535),
              help="Serve the project stream (frames and results in a browser) on 127.0.0.1:PORT.")
@click.option("--kvs-record", type=click.Path(path_type=Path, dir_okay=False),
              help="Record what DeepLens_Kinesis_Video would stream to Kinesis Video to this video file (.avi).")
@click.option("--stall-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Seconds without a new result before the Lambda counts as stuck (stopped, then restarted).")
@click.option("--device-dir", type=click.Path(path_type=Path, file_okay=False), default=Path(".deeplens/device"),
              show_default=True)
@_signer_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
@_handle_errors
def run_command(bundle: Path, frames: str | None, broker: str, thing: str, max_frames: int | None,
                fps: float | None, buffer: int, stream_port: int | None, kvs_record: Path | None,
                stall_timeout: float, device_dir: Path, public_key: Path | None, allow_any_signer: bool,
                as_json: bool) -> None:
    """Run the bundle as a device would: the Lambda's loop over frames, results on MQTT."""
    from deeplens_build.device.mqtt import parse_broker
    from deeplens_build.device.run import DeviceOptions, run_device
    from deeplens_build.report import Reporter

    host, port = parse_broker(broker)
    options = DeviceOptions(device_dir=device_dir, mqtt_host=host, mqtt_port=port, thing=thing, frames=frames,
                            max_frames=max_frames, frame_interval=1 / fps if fps else 0.0, buffer=buffer,
                            stream_port=stream_port, kvs_record=kvs_record, stall_seconds=stall_timeout)
    stop = _stop_on_signals()
    summary = run_device(bundle, options, reporter=Reporter(), stop=stop, public_key=public_key,
                         allow_any_signer=allow_any_signer)
    if as_json:
        click.echo(json.dumps({"frames": summary.frames, "published": summary.published,
                               "dropped": summary.dropped, "reconnects": summary.reconnects,
                               "messages": summary.messages, "topic": summary.topic}, indent=2))
    else:
        click.echo(f"{summary.frames} inferences, {summary.published} published to {summary.topic}, "
                   f"{summary.messages} status messages, "
                   f"{summary.dropped} dropped, {summary.reconnects} reconnects")
    if stop.is_set() and max_frames is not None and summary.published < max_frames:
        click.echo(f"error: interrupted after {summary.published} of the {max_frames} results asked for", err=True)
        raise click.exceptions.Exit(INTERRUPTED)


@main.command("box")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--distribution", type=click.Choice(["bookworm", "trixie"]), default="bookworm", show_default=True,
              help="The Debian root file system: bookworm (Python 3.11, Raspberry Pi OS's base) or trixie (3.13).")
@click.option("--mqtt", "broker", default="127.0.0.1:1883", show_default=True,
              help="The MQTT broker the IPC stand-in forwards results to, HOST:PORT.")
@click.option("--thing", default="deeplens-box", show_default=True, help="The thing name ({iot:thingName}).")
@click.option("--results", type=click.IntRange(1), default=3, show_default=True,
              help="Stop once this many results were published.")
@click.option("--network", is_flag=True, help="Give the box this machine's network (an Install from an index).")
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False), default=Path(".deeplens/box"),
              show_default=True)
@_signer_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
@_handle_errors
def box_command(bundle: Path, distribution: str, broker: str, thing: str, results: int, network: bool,
                work_dir: Path, public_key: Path | None, allow_any_signer: bool, as_json: bool) -> None:
    """Install and run the bundle's recipe as a Greengrass nucleus would, as ggc_user in a Debian root file
    system (needs root; debootstrap builds it once)."""
    from deeplens_build.bundle import require_signer
    from deeplens_build.device.box import run_box
    from deeplens_build.device.mqtt import parse_broker
    from deeplens_build.report import Reporter

    reporter = Reporter()
    require_signer("box executes the bundle's code on this machine", public_key, allow_any_signer, reporter)
    host, port = parse_broker(broker)
    summary = run_box(bundle, suite=distribution, work=work_dir, host=host, port=port, thing=thing, results=results,
                      public_key=public_key, network=network, stop=_stop_on_signals(), reporter=reporter)
    if as_json:
        click.echo(json.dumps({"distribution": summary.suite, "installed": summary.installed.splitlines(),
                               "published": summary.published, "topic": summary.topic}, indent=2))
    else:
        click.echo(f"{summary.suite}: installed and ran as ggc_user; {summary.published} results published to "
                   f"{summary.topic} through IPC")


@main.command("watch")
@click.option("--mqtt", "broker", default="127.0.0.1:1883", show_default=True, help="MQTT broker HOST:PORT.")
@click.option("--thing", default="deeplens", show_default=True)
@click.option("--count", type=click.IntRange(1),
              help="Exit after this many inference results (status messages are shown, not counted).")
@click.option("--json", "as_json", is_flag=True, help="Print each result as a JSON line.")
@_handle_errors
def watch_command(broker: str, thing: str, count: int | None, as_json: bool) -> None:
    """Print results live as they arrive (top label, score, latency; DeepLens's {label: probability} maps and
    status messages too), like the DeepLens project output."""
    from deeplens_build.device.mqtt import parse_broker
    from deeplens_build.device.watch import describe, watch
    from deeplens_build.manifest import infer_topic

    host, port = parse_broker(broker)

    def emit(result: dict) -> None:
        if as_json:
            click.echo(json.dumps(result))
        else:
            click.echo(describe(result))

    if not as_json:
        click.echo(f"watching {infer_topic(thing)} on {host}:{port}", err=True)
    watch(host, port, thing, count=count, emit=emit, stop=_stop_on_signals())


@main.group("cache")
def cache_group() -> None:
    """Look at or trim the local stage cache (``<build.work_dir>/cache``)."""


@cache_group.command("info")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Project file [./deeplens.toml].")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@_handle_errors
def cache_info(config_path: Path | None, as_json: bool) -> None:
    """Entries and bytes per stage."""
    from deeplens_build.cache import entries
    from deeplens_build.config import load_config
    from deeplens_build.render import size

    root = load_config(config_path).build.work_dir / "cache"
    stages: dict[str, dict[str, int]] = {}
    for entry in entries(root):
        figures = stages.setdefault(entry.stage, {"entries": 0, "bytes": 0})
        figures["entries"] += 1
        figures["bytes"] += entry.size
    total = sum(f["bytes"] for f in stages.values())
    if as_json:
        click.echo(json.dumps({"cache": str(root), "bytes": total, "stages": stages}, indent=2, sort_keys=True))
        return
    click.echo(f"{root}: {size(total)} in {sum(f['entries'] for f in stages.values())} entries")
    for stage, figures in sorted(stages.items()):
        click.echo(f"  {stage:12} {figures['entries']:5} entries  {size(figures['bytes'])}")


@cache_group.command("prune")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Project file [./deeplens.toml].")
@click.option("--max-size", required=True, help="Keep at most this much, e.g. 2G, 500M, 100000 (bytes).")
@_handle_errors
def cache_prune(config_path: Path | None, max_size: str) -> None:
    """Remove the least recently used entries until the cache fits in --max-size."""
    from deeplens_build.cache import prune
    from deeplens_build.config import load_config
    from deeplens_build.errors import UsageError
    from deeplens_build.render import size

    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)i?B?", max_size.strip(), re.IGNORECASE)
    if not match:
        raise UsageError(f"--max-size {max_size!r} is not a size such as 2G, 500M or 100000")
    units = "KMGT".find(match[2].upper()) + 1 if match[2] else 0
    limit = int(float(match[1]) * 1024 ** units)
    removed = prune(load_config(config_path).build.work_dir / "cache", limit)
    click.echo(f"removed {len(removed)} entries ({size(sum(e.size for e in removed))}), least recently used first")


def _stop_on_signals():
    """An event set by SIGINT or SIGTERM, so long-running commands stop cleanly."""
    import signal
    import threading

    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    return stop


if __name__ == "__main__":
    sys.exit(main())
