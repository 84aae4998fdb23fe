"""Command line: ``python -m appliance COMMAND``.

Commands: train, export, serve, health, info, generate, validate, report, run and
quality-report. ``quality-report`` fetches the report that ``report`` attached to the store
from a server.

Heavy modules (PyTorch among them) are imported inside the subcommands that need them, so that
``serve`` runs without PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import (
    ACTIVATIONS,
    DEFAULT_DATA_DIR,
    ApplianceConfig,
    DataConfig,
    GateConfig,
    ModelConfig,
    TrainConfig,
)
from appliance.errors import ApplianceError, StoppedAtOnce
from appliance.serve_config import MAX_TEMPERATURE
from appliance.v1 import GeneratedCodeMissingError

if TYPE_CHECKING:
    import numpy as np

    from appliance.client import Generated
    from appliance.store import ModelVersion

logger = logging.getLogger("appliance")

# Beats that generate fetches when neither --count nor --classes is given.
DEFAULT_GENERATE_COUNT = 100
# Default deadlines of the client commands, in seconds.
CALL_TIMEOUT_S = 300.0
HEALTH_TIMEOUT_S = 10.0

EXIT_USAGE = 2
# Seconds a stopped server's process may take to exit before it ends without its call threads.
STUCK_CALL_EXIT_S = 5.0

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# gRPC target schemes whose addresses have no TCP port to check.
PORTLESS_SCHEMES = ("unix:", "unix-abstract:", "vsock:")
# gRPC target schemes followed by HOST:PORT addresses. Without a port, gRPC 1.85 dials port 443
# for a plain or dns: address and fails with an unclear message for ipv4: and ipv6:.
PORTED_SCHEMES = ("dns:", "ipv4:", "ipv6:")

PARSER_DESCRIPTION = (
    "Train a class-conditional normalizing flow on WFDB ECG records, publish it as ONNX graphs, "
    "serve it over gRPC, and generate or score beats through that server."
)


class UsageError(ApplianceError):
    """A command-line value that cannot be used."""


def _tcp_port(text: str) -> int:
    """Parse a ``serve --port`` value.

    gRPC 1.85 binds a port outside 0..65535 modulo 65536 instead of failing, so the range is
    checked here.
    """
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a TCP port; pass a number from 0 to 65535 (0 lets the system choose)"
        )
    return port


def _unknown_class_reason(name: str, info: Any) -> str:
    """Say why the model does not know class ``name``, from its GetModelInfo reply."""
    from appliance.classes import AAMI_CLASSES

    if name not in AAMI_CLASSES:
        return f"{name} is not an AAMI class: {', '.join(AAMI_CLASSES)}"
    beats = int(info.train_class_counts.get(name, 0))
    return f"{name} had {beats} training beats, too few to learn"


# Longest accepted time option. A call with a timeout of 1e10 s failed at once with
# DEADLINE_EXCEEDED, while 1e9 s worked (grpcio 1.85, loopback).
MAX_SECONDS = 1e6


def _positive_seconds(text: str) -> float:
    """Parse a time option such as ``--timeout-s``: seconds above 0, at most ``MAX_SECONDS``."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a number of seconds greater than 0 and at most {MAX_SECONDS:g} "
            "(11.6 days), e.g. 300"
        )
    return seconds


def _server_address(text: str) -> str:
    """Check a client ``--address`` value and return it unchanged.

    Plain addresses are ``HOST:PORT`` or ``[IPV6]:PORT``. gRPC target URIs pass through:
    ``unix:``, ``unix-abstract:`` and ``vsock:`` as they are, and ``dns:``, ``ipv4:`` and
    ``ipv6:`` once every address after the scheme has a port.
    """
    if text.startswith(PORTLESS_SCHEMES):
        return text
    web_scheme, separator, rest = text.partition("://")
    if separator and web_scheme.lower() in ("http", "https", "grpc", "grpcs"):
        raise argparse.ArgumentTypeError(
            f"{text!r} starts with the scheme {web_scheme}://, which gRPC does not take; pass "
            f"HOST:PORT, e.g. {rest.rstrip('/')}, and --tls-ca for a TLS server"
        )
    targets = [text]
    for scheme in PORTED_SCHEMES:
        if text.startswith(scheme):
            rest = text.removeprefix(scheme)
            if scheme == "dns:" and rest.startswith("//"):
                # dns://AUTHORITY/HOST:PORT names the DNS server first.
                rest = rest[2:].partition("/")[2]
            targets = rest.split(",") if scheme != "dns:" else [rest]
            break
    for target in targets:
        _check_host_port(target, text)
    return text


def _check_host_port(target: str, address: str) -> None:
    """Raise ``ArgumentTypeError`` unless ``target`` is ``HOST:PORT`` or ``[IPV6]:PORT``."""
    example = "pass HOST:PORT, e.g. 127.0.0.1:50051, or [IPV6]:PORT, e.g. [::1]:50051"
    if target.startswith("["):
        host, bracket, rest = target[1:].partition("]")
        if not bracket:
            raise argparse.ArgumentTypeError(f"{address!r} has no closing ']'; {example}")
        # Text after the bracket that does not start with ':' counts as a missing port.
        colon, port = (":", rest[1:]) if rest.startswith(":") else ("", "")
    else:
        host, colon, port = target.rpartition(":")
        if ":" in host:
            raise argparse.ArgumentTypeError(
                f"{address!r} is an IPv6 address without brackets; {example}"
            )
    if not colon or not port:
        raise argparse.ArgumentTypeError(f"{address!r} has no port; {example}")
    if not host:
        raise argparse.ArgumentTypeError(f"{address!r} has no host; {example}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(
            f"{address!r} has port {port!r}; a port is a number from 1 to 65535"
        )


def _data_options(parser: argparse.ArgumentParser) -> None:
    defaults, train, model = DataConfig(), TrainConfig(), ModelConfig()
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="folder of WFDB records (default: the bundled MIT-BIH records)",
    )
    parser.add_argument(
        "--leads",
        default=",".join(defaults.leads),
        help="lead names in preference order, comma-separated "
        f"(default: {','.join(defaults.leads)})",
    )
    parser.add_argument(
        "--annotation-extension",
        default=defaults.annotation_extension,
        help="extension of the reference beat annotation files "
        f"(default: {defaults.annotation_extension})",
    )
    parser.add_argument(
        "--split",
        default=defaults.split,
        choices=("auto", "file", "de-chazal", "random"),
        help="split by record: a SPLITS file, the de Chazal inter-patient split "
        "of MIT-BIH, or a seeded random split; auto picks in that order "
        "(default: auto)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=train.max_minutes,
        help=(
            "training time budget in minutes: training stops at the first step past it, then "
            f"validates and saves (default: {train.max_minutes})"
        ),
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=train.max_epochs,
        help=f"maximum training epochs (default: {train.max_epochs})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=train.batch_size,
        help=f"beats per optimiser step (default: {train.batch_size})",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=train.learning_rate,
        help=f"Adam learning rate (default: {train.learning_rate})",
    )
    parser.add_argument(
        "--max-beats-per-class",
        type=int,
        default=train.max_beats_per_class,
        help=f"cap on training beats per class (default: {train.max_beats_per_class})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=train.seed,
        help=f"seed of every random draw (default: {train.seed})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=train.threads,
        help="PyTorch threads (default: 0, PyTorch's own choice)",
    )
    parser.add_argument(
        "--bottleneck-dims",
        type=int,
        default=model.bottleneck_dims,
        help="leading latent dimensions that carry the beat's shape and get a full-covariance "
        f"generation prior (default: {model.bottleneck_dims})",
    )
    parser.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default=model.activation,
        help="nonlinearity of the coupling subnetworks; gelu resumes checkpoints of models "
        f"trained before relu became the default (default: {model.activation})",
    )
    parser.add_argument(
        "--tail-scale",
        type=float,
        default=GateConfig.tail_scale,
        help="spread of the latent values after the bottleneck relative to the fitted prior, "
        f"from 0 (fixed at their mean) to 2 (default: {GateConfig.tail_scale})",
    )
    parser.add_argument(
        "--device",
        default=train.device,
        choices=("auto", "cpu", "cuda"),
        help="training device: auto takes CUDA when available, else the CPU (default: auto)",
    )
    parser.add_argument(
        "--mixed-precision",
        default=train.mixed_precision,
        choices=("no", "bf16"),
        help="bf16 autocast of the training forward pass, CUDA only (default: no)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder for preprocessed beat windows, reused while the records "
        "and settings are unchanged (default: no cache)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the training progress bar"
    )


def _config(args: argparse.Namespace) -> ApplianceConfig:
    leads = tuple(name.strip() for name in args.leads.split(",") if name.strip())
    if not leads:
        raise UsageError("--leads is empty; name at least one lead, for example MLII")
    for name, value in (
        ("--max-minutes", args.max_minutes),
        ("--epochs", args.epochs),
        ("--batch-size", args.batch_size),
        ("--learning-rate", args.learning_rate),
        ("--max-beats-per-class", args.max_beats_per_class),
    ):
        if not value > 0:
            raise UsageError(f"{name}={value} must be greater than 0")
    if not 0.0 <= args.tail_scale <= 2.0:
        raise UsageError(f"--tail-scale={args.tail_scale} must be between 0 and 2")
    if not math.isfinite(args.learning_rate):
        raise UsageError(
            f"--learning-rate={args.learning_rate} must be a finite number, such as 1e-3"
        )
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed={args.seed} is out of range; use 0 to 2^32 - 1")
    if args.threads < 0:
        raise UsageError(
            f"--threads={args.threads} must be 0 (PyTorch's own choice) or a positive count"
        )
    extension = args.annotation_extension
    if not extension or not all(c.isalnum() or c in "_-" for c in extension):
        raise UsageError(
            f"--annotation-extension={extension!r} must be letters, digits, '_' or '-', such "
            "as atr; it is the suffix of the annotation files next to each record"
        )
    return ApplianceConfig(
        data=dataclasses.replace(
            DataConfig(),
            leads=leads,
            split=args.split,
            annotation_extension=args.annotation_extension,
            cache_dir=str(args.cache_dir or ""),
        ),
        model=dataclasses.replace(
            ModelConfig(), bottleneck_dims=args.bottleneck_dims, activation=args.activation
        ),
        train=dataclasses.replace(
            TrainConfig(),
            max_minutes=args.max_minutes,
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            threads=args.threads,
            max_beats_per_class=args.max_beats_per_class,
            device=args.device,
            mixed_precision=args.mixed_precision,
        ),
        gate=dataclasses.replace(GateConfig(), tail_scale=args.tail_scale),
    )


def _command_train(args: argparse.Namespace) -> int:
    from appliance import distributed
    from appliance.jobs import train_and_export
    from appliance.train import stop_on_signals

    config = _config(args)
    _check_data_folder(args.data)
    work_dir = args.work_dir or (args.store / "training")
    # Checked before ingest and training, which take minutes. The created folders are kept,
    # because under torchrun every rank runs this check at once and one rank's cleanup could
    # remove the folder another rank is probing.
    _check_output_folder("--store", args.store, keep_created=True)
    work_dir_option = "--work-dir" if args.work_dir is not None else "--work-dir (STORE/training)"
    _check_output_folder(work_dir_option, work_dir, keep_created=True)
    _check_cache_dir(args)
    single_process = os.environ.get("WORLD_SIZE", "1") in ("", "1")
    try:
        with stop_on_signals(enabled=single_process):
            job = train_and_export(
                args.data,
                args.store,
                config,
                work_dir,
                progress=not args.no_progress and distributed.is_rank_zero(),
                resume=args.resume,
            )
    finally:
        distributed.shutdown()
    if job.version is not None:
        sys.stdout.write(job.dataset.report.summary_line() + "\n")
        sys.stdout.write(_publication_line(job.version, args.store))
    return 0


def _publication_line(version: ModelVersion, store: Path) -> str:
    """Return the line that ends train and export: what the store now serves."""
    model_id = version.manifest["model_id"]
    if version.newly_published:
        return f"published model {model_id} to {store}\n"
    return (
        f"model {model_id} is unchanged: the store's current version {version.path.name} "
        f"already contains it, so nothing new was published to {store}\n"
    )


def _command_export(args: argparse.Namespace) -> int:
    import numpy as np

    from appliance.classes import AAMI_CLASSES
    from appliance.dataset import ingest
    from appliance.errors import TrainingError
    from appliance.export import export_model
    from appliance.flow import ConditionalFlow
    from appliance.holdout import concatenate, split_holdout
    from appliance.jobs import data_facts, read_other_lead_beats, train_records
    from appliance.train import (
        TrainResult,
        export_weights,
        load_checkpoint,
        select_training_beats,
    )

    if not args.checkpoint.is_file():
        raise UsageError(
            f"checkpoint {args.checkpoint} does not exist or is not a file; pass the best.pt "
            "that `train` wrote"
        )
    try:
        state = load_checkpoint(args.checkpoint)
    except TrainingError as exc:
        raise UsageError(str(exc)) from exc
    # Checked before ingest, which takes minutes.
    _check_output_folder("--store", args.store)
    advice = "pass the best.pt that `train` wrote"
    try:
        config = ApplianceConfig.from_dict(state["config"])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise UsageError(
            f"checkpoint {args.checkpoint} has invalid settings under 'config' ({exc}); {advice}"
        ) from exc
    model = ConditionalFlow(
        config.model, config.data.n_leads, config.data.window_samples, len(AAMI_CLASSES)
    )
    try:
        weights = export_weights(state, args.checkpoint)
    except TrainingError as exc:
        raise UsageError(str(exc)) from exc
    try:
        # Both sets of weights must fit, though only the best validated ones are exported.
        model.load_state_dict(state["model"])
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"checkpoint {args.checkpoint} has weights that do not fit its own model settings "
            f"({first_line}); {advice}"
        ) from exc
    trained_records = state.get("train_records")
    if trained_records is not None and not (
        isinstance(trained_records, dict)
        and all(isinstance(v, int) for v in trained_records.values())
    ):
        raise UsageError(
            f"checkpoint {args.checkpoint} has an invalid 'train_records' entry; {advice}"
        )
    dataset = ingest(args.data, config.data)
    fit, holdout = split_holdout(dataset.splits["train"])
    _check_export_data(args, trained_records, fit.beats_per_record())
    _, learnt = select_training_beats(
        fit.labels, config.train.max_beats_per_class, config.train.seed
    )
    result = TrainResult(
        model=model,
        scale_mv=float(state["scale_mv"]),
        classes_known=list(state["classes_known"]),
        # The checkpoint does not store the final validation figure, so it is unknown (null).
        # The beat counts come from the training beats read again, as train counts them.
        summary={
            "validation_bpd": None,
            "train_beats": int(fit.labels[learnt].size),
            "train_class_counts": fit.class_counts(),
            "learnt_class_counts": {
                name: int(count)
                for name, count in zip(
                    AAMI_CLASSES,
                    np.bincount(fit.labels[learnt], minlength=len(AAMI_CLASSES)),
                    strict=True,
                )
            },
            "steps": state["step"],
            "finished_at": datetime.fromtimestamp(args.checkpoint.stat().st_mtime, UTC).isoformat(
                timespec="seconds"
            ),
        },
    )
    version = export_model(
        config,
        result,
        fit,
        concatenate(dataset.splits["validation"], holdout),
        args.store,
        data_facts(dataset),
        other_lead_beats=read_other_lead_beats(
            args.data, train_records(dataset), config.data, config.train.seed
        ),
    )
    sys.stdout.write(_publication_line(version, args.store))
    return 0


def _check_export_data(
    args: argparse.Namespace, trained: dict[str, int] | None, found: dict[str, int]
) -> None:
    """Raise ``UsageError`` unless ``--data`` gives the beats the checkpoint was trained on.

    The privacy guard compares generated beats with these beats, so beats of other records
    would leave training records unguarded.
    """
    if trained is None:
        logger.warning(
            "checkpoint=%s has no list of its training records (written by an older version), "
            "so export cannot check that --data=%s contains the records it was trained on",
            args.checkpoint,
            args.data,
        )
        return
    from appliance.train import record_differences

    differences = record_differences(dict(trained), found)
    if not differences:
        return
    raise UsageError(
        f"--data {args.data} does not give the training beats of checkpoint {args.checkpoint} "
        f"({'; '.join(differences)}). The privacy guard must see every training beat, so pass "
        "the WFDB folder, split and settings the checkpoint was trained with"
    )


def _serve_config(args: argparse.Namespace) -> object:
    from appliance.serve_config import TlsFiles

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together; pass both")
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
    elif args.tls_client_ca:
        raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
    try:
        return _serve_settings(args, tls)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _serve_settings(args: argparse.Namespace, tls: object) -> object:
    from appliance.serve_config import ServeConfig, TlsFiles

    assert tls is None or isinstance(tls, TlsFiles)
    return ServeConfig(
        host=args.host,
        port=args.port,
        workers=args.workers,
        intra_op_threads=args.intra_op_threads,
        tls=tls,
        allow_insecure_remote=args.allow_insecure_remote,
        require_gpu=args.require_gpu,
        max_beats_per_request=args.max_beats_per_request,
        grace_s=args.grace_s,
        drain_s=args.drain_s,
        stalled_send_s=args.stalled_send_s,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_message_bytes=args.max_message_bytes,
    )


def _command_serve(args: argparse.Namespace) -> int:
    from appliance.errors import ModelStoreError
    from appliance.server import (
        ServeConfig,
        StoppedWhileLoading,
        install_signal_handlers,
        start_server,
    )
    from appliance.store import current_version_id

    config = _serve_config(args)
    assert isinstance(config, ServeConfig)
    if args.port_file and not args.port_file.parent.is_dir():
        raise UsageError(
            f"--port-file {args.port_file}: folder {args.port_file.parent} does not exist; "
            "create it or pass a file in an existing folder"
        )
    # A store with no published model fails before the port opens.
    current_version_id(args.store)
    try:
        # The port opens first and reports NOT_SERVING until the model is loaded and checked.
        running = start_server(config)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    # The handlers go in before the port file, so that a signal cannot end the process
    # between writing the file and the cleanup below.
    install_signal_handlers(running)
    try:
        if args.port_file:
            temporary = args.port_file.with_suffix(".tmp")
            try:
                temporary.write_text(f"{running.port}\n")
                temporary.replace(args.port_file)
            except OSError as exc:
                running.server.stop(0)
                temporary.unlink(missing_ok=True)
                raise UsageError(
                    f"--port-file {args.port_file}: writing it failed ({exc.strerror}); pass "
                    "a file in a folder this user can write to"
                ) from exc
        running.load(args.store)
    except StoppedWhileLoading as exc:
        logger.info("stopped before the model was loaded signal=%s", exc)
        running.server.stop(0)
    # RuntimeError: --require-gpu without a GPU, or the warm up of the engine slots failed.
    except (ModelStoreError, RuntimeError) as exc:
        running.server.stop(0)
        raise UsageError(str(exc)) from exc
    else:
        running.wait()
        exit_if_threads_outlive(STUCK_CALL_EXIT_S)
    finally:
        if args.port_file:
            _remove_port_file(args.port_file, running.port)
    return 0


def exit_if_threads_outlive(timeout_s: float) -> None:
    """End the process ``timeout_s`` seconds from now if it has not exited by then.

    At exit Python joins the call threads of the stopped server, so a call blocked in a read
    that never returns would keep the process alive past its grace period. A daemon timer
    logs that and ends the process with status 0.
    """

    def force_exit() -> None:
        logger.warning(
            "calls still running %.1f s after the server stopped; exiting without them",
            timeout_s,
        )
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(timeout_s, force_exit)
    timer.daemon = True
    timer.start()


def _remove_port_file(path: Path, port: int) -> None:
    """Delete the port file unless another process has written its own port there since."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    except OSError as exc:
        logger.warning("port file not removed path=%s error=%s", path, exc)
        return
    if text.strip() != str(port):
        logger.info(
            "port file kept path=%s port=%d reason=other_content content=%r",
            path,
            port,
            text.strip()[:32],
        )
        return
    try:
        path.unlink()
    except OSError as exc:
        logger.warning("port file not removed path=%s error=%s", path, exc)
        return
    logger.info("port file removed path=%s port=%d", path, port)


def _client(args: argparse.Namespace) -> object:
    from appliance.client import ApplianceClient

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together; pass both")
    if args.tls_cert is not None and args.tls_ca is None:
        raise UsageError("--tls-cert needs --tls-ca, the CA certificate of the server")
    try:
        return ApplianceClient(
            args.address,
            root_certificate=args.tls_ca,
            client_certificate=args.tls_cert,
            client_key=args.tls_key,
            timeout_s=args.timeout_s,
        )
    except ValueError as exc:
        raise UsageError(f"{exc}; check --tls-ca, --tls-cert and --tls-key") from exc


def _command_health(args: argparse.Namespace) -> int:
    from appliance.client import ApplianceClient

    client = _client(args)
    assert isinstance(client, ApplianceClient)
    # A failed call is reported by main, in the same words as for the other client commands.
    with client:
        status = client.health()
    sys.stdout.write(status + "\n")
    return 0 if status == "SERVING" else 1


def _command_info(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from appliance.client import ApplianceClient, describe_model_info

    client = _client(args)
    assert isinstance(client, ApplianceClient)
    with client:
        info = client.model_info()
    if args.json:
        fields = json_format.MessageToDict(
            info,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
        # The proto3 JSON mapping writes 64-bit integers as strings; beat counts are numbers.
        fields["train_class_counts"] = {
            name: int(count) for name, count in fields["train_class_counts"].items()
        }
        text = json.dumps(fields, indent=2, sort_keys=True)
    else:
        text = describe_model_info(info)
    sys.stdout.write(text + "\n")
    return 0


def _command_generate(args: argparse.Namespace) -> int:
    from appliance.client import ApplianceClient, GenerateInterruptedError, class_name

    if args.out.is_symlink() and not args.out.exists():
        raise UsageError(
            f"--out {args.out} is a symbolic link to a missing path; pass a folder, which is "
            "created if missing"
        )
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; pass a folder, which is created if missing")
    # A link or folder in the place of an output file would redirect or block the write.
    from appliance.outputs import FORMATS, GENERATE_FILES

    for name in GENERATE_FILES[args.format]:
        path = args.out / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            kind = "a symbolic link" if path.is_symlink() else "not a regular file"
            raise UsageError(
                f"--out {args.out}: {path} is {kind}, which generate does not write through; "
                "remove it or pass another folder"
            )
    if args.classes is not None and not args.classes.strip():
        raise UsageError(
            "--classes is empty; pass beats per class as NAME=COUNT pairs, e.g. N=100,V=50, "
            "or leave --classes out to use --count"
        )
    if args.count is not None and args.classes is not None:
        raise UsageError(
            f"--count={args.count} and --classes={args.classes} are both set; --classes gives "
            "the beats of each class, so leave --count out"
        )
    if args.count is None:
        args.count = DEFAULT_GENERATE_COUNT
    if args.count < 1 and args.classes is None:
        raise UsageError(f"--count={args.count} must be at least 1 (or use --classes)")
    # Checked before the call, so that an unusable folder does not waste the generation.
    _check_writable_folder(args.out)
    client = _client(args)
    assert isinstance(client, ApplianceClient)
    class_counts = None
    if args.classes is not None:
        class_counts = {}
        for item in args.classes.split(","):
            name, _, count = item.partition("=")
            # AAMI class names are single capital letters, so n=5 means N=5.
            name = name.strip().upper()
            if not name or not count.strip().lstrip("-").isdigit():
                raise UsageError(f"--classes item {item!r} is not NAME=COUNT, e.g. N=100,V=50")
            if int(count) < 1:
                raise UsageError(f"--classes count {name}={count} must be at least 1")
            if name in class_counts:
                raise UsageError(f"--classes names class {name} twice; give each class once")
            class_counts[name] = int(count)
    with client:
        info = client.model_info()
        known = [class_name(value) for value in info.classes_known]
        unknown = [name for name in class_counts or {} if name not in known]
        if unknown:
            raise UsageError(
                f"--classes names {', '.join(unknown)}, which the model does not know "
                f"({'; '.join(_unknown_class_reason(name, info) for name in unknown)}); "
                f"use {', '.join(known)}"
            )
        requested_beats = sum(class_counts.values()) if class_counts else args.count
        limit = int(info.max_beats_per_request)
        # Checked here so that the message gives the server's limit, not the wider range of
        # the request's uint32 field.
        if limit and requested_beats > limit:
            option = f"--classes={args.classes}" if class_counts else f"--count={args.count}"
            raise UsageError(
                f"{option} requests {requested_beats} beats, over this server's limit of "
                f"{limit} beats per request; request 1 to {limit} and split a larger set into "
                "several calls"
            )
        try:
            result = client.generate(
                count=args.count,
                class_counts=class_counts,
                temperature=args.temperature,
                margin=args.margin,
                seed=args.seed,
                max_draws_per_beat=args.max_draws_per_beat,
            )
        except GenerateInterruptedError as exc:
            # The beats that arrived passed the gate; keep them, then report the failure.
            paths = _write_generated(args, exc.received, info)
            sys.stdout.write(
                f"wrote the {len(exc.received.classes)} beats that arrived before the stream "
                f"failed: {', '.join(str(p) for p in paths)}\n"
            )
            raise
    stats = result.stats
    requested = sum(class_counts.values()) if class_counts else args.count
    counts_text = (
        f"{stats.draws} draws (pertinence rejections {stats.pertinence_rejections}, privacy "
        f"rejections {stats.privacy_rejections}, invalid {stats.invalid_rejections}, accepted "
        f"beyond the request and dropped {stats.surplus_dropped})"
    )
    fix = no_beat_fix(stats, args.temperature)
    if stats.accepted == 0:
        earlier = _generate_files_in(args.out, list(FORMATS))
        earlier_note = (
            f"; the files {', '.join(earlier)} there are from an earlier run" if earlier else ""
        )
        raise ApplianceError(
            f"no beat of the {requested} requested was accepted, from {counts_text}; {fix}. "
            f"Nothing was written to {args.out}{earlier_note}"
        )
    paths = _write_generated(args, result, info)
    sys.stdout.write(
        f"accepted {stats.accepted} of {requested} requested beats from {counts_text}; wrote "
        f"{', '.join(str(p) for p in paths)}\n"
    )
    sys.stdout.write(f"per class: {_class_tally(result.classes, class_counts, known)}\n")
    if stats.budget_exhausted:
        first = "lower --temperature, " if stats.invalid_rejections * 2 > stats.draws else ""
        sys.stdout.write(
            "the draw budget ran out before every requested beat was accepted; "
            f"{first}raise --max-draws-per-beat, lower --margin or retrain with a longer "
            "--max-minutes\n"
        )
    return 0


def _generate_files_in(out: Path, formats: list[str]) -> list[str]:
    """Return the names of generate's files of ``formats`` that exist in ``out``."""
    from appliance.outputs import GENERATE_FILES

    return [name for fmt in formats for name in GENERATE_FILES[fmt] if (out / name).exists()]


def _write_generated(args: argparse.Namespace, result: Generated, info: Any) -> list[Path]:
    """Write generated beats to ``--out`` in ``--format``, warning about earlier files there.

    Raises:
        ApplianceError: If writing fails, naming the folder.
    """
    from appliance.outputs import FORMATS, write_beats

    replaced = _generate_files_in(args.out, [args.format])
    if replaced:
        logger.warning(
            "replacing files of an earlier generate in out=%s files=%s",
            args.out,
            ",".join(replaced),
        )
    other_format = _generate_files_in(args.out, [fmt for fmt in FORMATS if fmt != args.format])
    if other_format:
        logger.warning(
            "files of an earlier generate in another format stay in out=%s files=%s; they "
            "are not from this run, so remove them or pass another --out",
            args.out,
            ",".join(other_format),
        )
    try:
        paths = write_beats(
            args.out,
            result.beats,
            result.classes,
            result.scores,
            result.fs_hz,
            info.pre_r_samples,
            list(info.leads),
            args.format,
        )
    except OSError as exc:
        # The folder passed the check before the call, so this is a later failure such as a
        # full disk.
        raise ApplianceError(
            f"--out {args.out}: writing the {len(result.classes)} generated beats failed "
            f"({exc}); free space or pass another folder, then generate again"
        ) from exc
    return paths


def no_beat_fix(stats: Any, temperature: float | None) -> str:
    """Return the advice for a generate that accepted no beat.

    Arguments:
        stats: The call's ``GenerateStats``.
        temperature: The requested ``--temperature``; None when the server's default was used.
    """
    fix = f"lower --margin (the call used {stats.margin:.3f}) or raise --max-draws-per-beat"
    if stats.invalid_rejections * 2 <= stats.draws:
        return fix
    # Invalid draws (outside the amplitude range, or not invertible) come from latent values
    # far from the training beats', which a high temperature produces.
    used = "the server's default, 1.0" if temperature is None else f"{temperature:g}"
    return (
        f"most draws were invalid, so lower --temperature (the call used {used}); otherwise {fix}"
    )


def _class_tally(
    classes: Sequence[str], class_counts: dict[str, int] | None, known: Sequence[str]
) -> str:
    """Return the accepted beats per class, each with its requested count when one was set.

    Without per-class counts, every class of the model is listed, so a class that got no
    beat shows as 0 instead of being left out.
    """
    accepted = Counter(classes)
    if class_counts:
        return ", ".join(
            f"{name} {accepted.get(name, 0)} of {count}" for name, count in class_counts.items()
        )
    names = list(known) + [name for name in accepted if name not in known]
    return ", ".join(f"{name} {accepted.get(name, 0)}" for name in names)


def _check_output_folder(option: str, folder: Path, keep_created: bool = False) -> None:
    """Raise ``UsageError`` unless ``folder``, the value of ``option``, can be written to.

    Arguments:
        option: Option name that error messages start with, e.g. ``--store``.
        folder: Folder that the command writes into; it may be missing.
        keep_created: Keep the folders that the check creates, for commands that write into
            them anyway.
    """
    if folder.exists() and not folder.is_dir():
        raise UsageError(
            f"{option} {folder} is a file; pass a folder, which is created if missing"
        )
    _check_writable_folder(folder, option, keep_created)


def _check_job_out(out: Path, data_dir: Path) -> None:
    """Check the main job's ``--out`` and the folders it writes there, before ingest."""
    from appliance.pipeline import BEATS_FOLDER

    resolved_out, resolved_data = out.resolve(), data_dir.resolve()
    if resolved_out == resolved_data or resolved_out.is_relative_to(resolved_data):
        raise UsageError(
            f"--out {out} is inside --data {data_dir}; the job writes a WFDB record of synthetic "
            "beats there, which does not belong beside the real records. Pass an --out outside "
            "the data folder"
        )
    _check_output_folder("--out", out)
    for name in (BEATS_FOLDER, "model-store", "training"):
        path = out / name
        if path.exists() and not path.is_dir():
            raise UsageError(
                f"--out {out}: {path} is a file where the job writes a folder; move it away or "
                "pass another --out"
            )


def _check_data_folder(data_dir: Path) -> None:
    """Raise ``UsageError`` unless ``--data`` names a folder, before any output folder exists."""
    if not data_dir.exists():
        raise UsageError(f"data folder {data_dir} does not exist; pass --data with a WFDB folder")
    if not data_dir.is_dir():
        raise UsageError(f"data path {data_dir} is not a folder; pass --data with a WFDB folder")


def _check_cache_dir(args: argparse.Namespace) -> None:
    """Check ``--cache-dir`` before ingest, which would fail on its first cache entry."""
    if args.cache_dir is not None:
        # The cache folder is created on the first entry anyway, so it is kept.
        _check_output_folder("--cache-dir", args.cache_dir, keep_created=True)


def _check_writable_folder(
    folder: Path,
    option: str = "--out",
    keep_created: bool = False,
    advice: str = "pass a folder that this user can create and write to, e.g. under the home "
    "or current folder",
) -> None:
    """Create ``folder`` and a file in it, then remove both, or raise ``UsageError``.

    Unless ``keep_created`` is set, the check leaves no folder or file behind. It tries the
    write instead of asking ``os.access``, because ``os.access`` reports success to root on
    folders such as ``/proc`` where creating a folder fails. ``advice`` ends the message.
    """
    created = []
    missing = folder
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    step = "creating the folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        step = "writing a file in the folder"
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"{option} {folder}: {step} failed ({reason}); {advice}") from exc
    finally:
        # Deepest first, so each folder is empty when it is removed.
        for path in [] if keep_created else created:
            if not path.exists():
                continue  # mkdir failed before it reached this folder
            try:
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("probe folder not removed path=%s error=%s", path, exc)


def _command_validate(args: argparse.Namespace) -> int:
    import numpy as np

    from appliance.baseline import check_baseline
    from appliance.client import ApplianceClient
    from appliance.outputs import read_lead_names, read_r_position, read_sampling_rate

    if args.input.is_dir():
        candidates = sorted(
            path.name
            for path in args.input.iterdir()
            if path.suffix.lower() in (".npy", ".csv", ".hea")
        )
        found = f"; it contains {', '.join(candidates[:5])}" if candidates else ""
        example = f", e.g. {args.input / candidates[0]}" if candidates else ""
        raise UsageError(
            f"--input {args.input} is a folder{found}. Pass one .npy, .csv or WFDB file{example}"
        )
    if not args.input.exists() and not args.input.with_suffix(".hea").exists():
        raise UsageError(
            f"--input {args.input} does not exist; pass a .npy file of shape "
            "(beats, leads, window_samples) in mV, or a .csv or WFDB file written by generate"
        )
    if args.recording:
        return _validate_recording(args)
    beats, classes = _read_validate_input(args.input)
    try:
        fs_hz = read_sampling_rate(args.input)
    except ValueError as exc:
        raise UsageError(f"--input {exc}") from exc
    if beats.ndim != 3:
        raise UsageError(
            f"--input {args.input} has shape {beats.shape}; expected (beats, leads, "
            "window_samples), e.g. (n, 1, 256)"
        )
    if beats.shape[0] == 0:
        raise UsageError(
            f"--input {args.input} is empty: it contains 0 beats; pass a file with at least one"
        )
    _check_float32_range(args.input, beats)
    # Beats that still carry baseline wander or an offset score low; warn, then score anyway.
    check_baseline(beats)
    if args.best_class:
        classes = None
    if classes is not None:
        _check_input_classes(args.input, classes)
    client = _client(args)
    assert isinstance(client, ApplianceClient)
    with client:
        info = client.cached_model_info()
        r_position = read_r_position(args.input)
        if r_position is not None and r_position != info.pre_r_samples:
            logger.warning(
                "input=%s beat annotations mark sample %d of each window, but the model's "
                "windows have their R peak at sample %d; beats cut around another point "
                "score low, so cut each window %d samples before its R peak",
                args.input,
                r_position,
                info.pre_r_samples,
                info.pre_r_samples,
            )
        # Lead names vary between sources (MLII, II), so other names are a warning only.
        model_leads = list(info.leads)
        input_leads = read_lead_names(args.input)
        if input_leads is not None and input_leads != model_leads:
            logger.warning(
                "input=%s leads=%s differ from the model's leads=%s; beats of another lead "
                "score low, so pass the model's leads in its order",
                args.input,
                ",".join(input_leads),
                ",".join(model_leads),
            )
        # With the input's sampling rate, the server rejects beats at another rate than the
        # model's instead of scoring them as if they were at its rate.
        reply = client.validate(beats.astype(np.float32), classes, margin=args.margin, fs_hz=fs_hz)
    _write_scores(reply)
    if not classes or all(name is None for name in classes):
        scored_under = "the best-fitting class of each beat"
    elif args.input.suffix.lower() == ".npy":
        # A classes file left beside a user's own array would otherwise apply unnoticed.
        scored_under = f"the classes in {_classes_file(args.input)}"
    else:
        scored_under = "the classes of the input"
    if classes and None in classes and not all(name is None for name in classes):
        scored_under += " (the best-fitting class where a beat has none)"
    sys.stdout.write(
        f"accepted {int(reply.accepted.sum())} of {reply.scores.size} at margin "
        f"{reply.margin:.3f}, scored under {scored_under}\n"
    )
    return 0


def _write_scores(reply: Any) -> None:
    """Print one tab-separated line per beat of a Validate reply, after a header line."""
    sys.stdout.write("index\tscore\tresult\tclass\n")
    for i, (score, accepted, name) in enumerate(
        zip(reply.scores, reply.accepted, reply.classes, strict=True)
    ):
        # Six significant digits keep the order of scores far below 1e-4.
        sys.stdout.write(f"{i}\t{score:.6g}\t{'accepted' if accepted else 'rejected'}\t{name}\n")


def _validate_recording(args: argparse.Namespace) -> int:
    """Cut the beats of a continuous WFDB recording as ingest does, then validate them."""
    import numpy as np

    from appliance.classes import AAMI_CLASSES
    from appliance.client import ApplianceClient
    from appliance.config import DataConfig
    from appliance.ecg import read_record
    from appliance.errors import RecordError

    suffix = args.input.suffix.lower()
    record = args.input.with_suffix("") if suffix in (".hea", ".dat", ".atr") else args.input
    header = record.with_name(f"{record.name}.hea")
    if suffix in (".npy", ".csv"):
        raise UsageError(
            f"--input {args.input}: --recording reads a continuous WFDB recording; pass its "
            f".hea file, or leave out --recording to score the beats of a {suffix} file"
        )
    if not header.is_file():
        raise UsageError(
            f"--input {args.input}: --recording reads a WFDB recording, and {header} is not a "
            "file; pass the recording's .hea file"
        )
    client = _client(args)
    assert isinstance(client, ApplianceClient)
    with client:
        info = client.cached_model_info()
        leads = list(info.leads)
        preference = list(leads)
        if len(leads) == 1:
            # A one-lead model also takes the other usual lead names, as training did.
            preference += list(DataConfig().leads)
        config = DataConfig(
            fs_hz=float(info.fs_hz),
            window_samples=int(info.window_samples),
            pre_r_samples=int(info.pre_r_samples),
            leads=tuple(dict.fromkeys(preference)),
            n_leads=len(leads),
        )
        try:
            beats = read_record(record, record.name, config)
        except RecordError as exc:
            raise UsageError(f"--input {args.input}: {exc.reason}") from exc
        for warning in beats.warnings:
            logger.warning("input=%s %s", args.input, warning)
        if len(beats.labels) == 0:
            raise UsageError(
                f"--input {args.input}: no beat window could be cut (skipped: "
                f"{beats.skipped or 'no beat found'}); pass a recording with beat annotations "
                "at least one window from its ends"
            )
        # Beats found by the detector have no class of their own.
        detected = beats.beat_source.startswith("detector")
        classes = None if detected else [AAMI_CLASSES[int(i)] for i in beats.labels]
        reply = client.validate(
            beats.windows.astype(np.float32), classes, margin=args.margin, fs_hz=config.fs_hz
        )
    _write_scores(reply)
    skipped = sum(beats.skipped.values())
    source = "the best-fitting class of each beat" if classes is None else "their annotations"
    sys.stdout.write(
        f"accepted {int(reply.accepted.sum())} of {reply.scores.size} beats cut from "
        f"{args.input} (leads {', '.join(beats.leads)}, {skipped} skipped at the edges or "
        f"unusable), at margin {reply.margin:.3f}, scored under {source}\n"
    )
    return 0


def _check_float32_range(path: Path, beats: np.ndarray) -> None:
    """Raise UsageError if a finite value would overflow float32, the wire format of samples."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        too_large = np.isfinite(beats) & (np.abs(beats) > np.finfo(np.float32).max)
    if too_large.any():
        beat = int(np.argwhere(too_large)[0][0])
        value = float(beats[too_large][0])
        raise UsageError(
            f"--input {path}: beat {beat} has the value {value:.3g}, beyond the float32 range "
            "that samples are sent in; beats are in mV, so check the file's unit"
        )


def _classes_file(path: Path) -> Path:
    """Return the classes file that ``read_beats`` reads beside a ``.npy`` input."""
    return path.with_name(f"{path.stem}_classes.json")


def _read_validate_input(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """Read a validate ``--input`` file, naming the file at fault in every error."""
    from appliance.outputs import read_beats

    try:
        return read_beats(path)
    except json.JSONDecodeError as exc:
        # Only the classes file beside a .npy input is JSON.
        raise UsageError(
            f"--input {path}: the classes file {_classes_file(path)} is not valid JSON ({exc}); "
            "fix it, or move it away to score each beat under its best-fitting class"
        ) from exc
    except (KeyError, TypeError) as exc:
        if path.suffix.lower() != ".npy":
            raise
        raise UsageError(
            f"--input {path}: the classes file {_classes_file(path)} has no list of class "
            'names under the key \'classes\', such as {"classes": ["N", "V", null]}; '
            "fix it, or move it away to score each beat under its best-fitting class"
        ) from exc
    except ValueError as exc:
        raise UsageError(f"--input {exc}") from exc
    except OSError as exc:
        raise UsageError(
            f"--input {path}: reading it failed ({exc.strerror or exc}); pass a readable .npy, "
            ".csv or WFDB file"
        ) from exc


def _check_input_classes(path: Path, classes: Sequence[object]) -> None:
    """Reject a class name that is not an AAMI class, naming the file and the beat index."""
    from appliance.classes import AAMI_CLASSES

    for index, name in enumerate(classes):
        # An empty name, or null in JSON, leaves the beat to its best-fitting class.
        if name is None or name == "" or name in AAMI_CLASSES:
            continue
        source = _classes_file(path) if path.suffix.lower() == ".npy" else path
        raise UsageError(
            f"--input {path}: {source} gives beat index {index} the class {name!r}, which is "
            f"not an AAMI class ({', '.join(AAMI_CLASSES)}); use a class that the model knows, "
            "as `python -m appliance info` lists them, or pass --best-class"
        )


def _command_report(args: argparse.Namespace) -> int:
    from appliance.quality.report import build_report, embedded_html
    from appliance.report_store import attach_report, report_warnings
    from appliance.store import current_version_id

    # Checked before the evaluation, which takes minutes.
    _check_report_temperature(args.temperature)
    _check_output_folder("--out", args.out)
    _check_cache_dir(args)
    _check_report_margin(args.store, args.margin)
    # After the store's manifest is read, but before build_report loads the ONNX graphs.
    _check_data_folder(args.data)
    if not args.no_attach:
        _check_reports_folder(args.store)
    figures = build_report(
        args.store,
        args.data,
        args.out,
        baselines=not args.no_baselines,
        temperature=args.temperature,
        margin=args.margin,
        cache_dir=str(args.cache_dir or ""),
    )
    sys.stdout.write(
        f"wrote {args.out / 'quality.html'} and {args.out / 'quality.json'} "
        f"({len(figures)} sections)\n"
    )
    for warning in report_warnings(figures):
        sys.stderr.write(f"warning: {warning}\n")
    if not args.no_attach:
        folder = attach_report(args.store, figures, embedded_html(figures, args.out))
        try:
            current: str | None = current_version_id(args.store)
            unreadable = ""
        except ApplianceError as exc:
            current, unreadable = None, str(exc)
        if current == figures["model_version"]:
            served = "; GetQualityReport returns it"
        elif current is None:
            served = f", but the store's current version cannot be read now ({unreadable})"
        else:
            # Another model was published while the report ran. A running server keeps the
            # model it loaded, so it still returns this report.
            served = (
                f", but the store's current version is now {current}: a server started from "
                "now on serves that version and returns its report, if it has one, while a "
                "server that is running keeps this model and returns this report"
            )
        sys.stdout.write(
            f"attached the report of model {figures['model_id']} to {folder}{served}\n"
        )
    return 0


def _check_reports_folder(store: Path) -> None:
    """Raise ``UsageError`` unless the report can be attached to ``STORE/reports``."""
    from appliance.report_store import REPORTS_DIR

    reports = store / REPORTS_DIR
    if reports.exists() and not reports.is_dir():
        raise UsageError(
            f"--store {store}: {reports} is a file, but reports are attached in a folder of "
            "that name; move the file away, or pass --no-attach to write the report to --out "
            "only"
        )
    # The folder is created on attach anyway, so it is kept. Moving the store is not the fix.
    _check_writable_folder(
        reports,
        "--store",
        keep_created=True,
        advice="give this user write access to it, or pass --no-attach to write the report to "
        "--out only",
    )


def _check_report_temperature(temperature: float) -> None:
    """Raise ``UsageError`` unless the server would accept ``temperature`` in a request."""
    if not (math.isfinite(temperature) and 0.0 < temperature <= MAX_TEMPERATURE):
        raise UsageError(
            f"--temperature={temperature:g} is out of range; use a value above 0 and at most "
            f"{MAX_TEMPERATURE:g}, as the server requires"
        )


def _check_report_margin(store: Path, margin: float | None) -> None:
    """Raise ``UsageError`` unless ``margin`` is within the current model's gate range.

    Raises:
        ModelStoreError: If the store has no valid current version.
    """
    from appliance.errors import ModelStoreError
    from appliance.store import load_current

    version = load_current(store)
    if margin is None:
        return
    gate = version.manifest.get("gate", {})
    try:
        low, high = float(gate["min_margin"]), float(gate["max_margin"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelStoreError(
            f"manifest of model version {version.path} has no valid gate min_margin and "
            f"max_margin ({exc!r}); retrain with this version of the appliance"
        ) from exc
    if not (math.isfinite(margin) and low <= margin <= high):
        raise UsageError(
            f"--margin={margin:g} is out of range for model {version.manifest.get('model_id')}; "
            f"use {low:g} to {high:g}, the model's min_margin to max_margin"
        )


def _command_quality_report(args: argparse.Namespace) -> int:
    from appliance.client import QUALITY_HTML, ApplianceClient, write_quality_report
    from appliance.report_store import (
        mismatch_warning,
        missing_records_warning,
        shortfall_warnings,
    )

    # Checked before the call, so that an unusable folder does not waste the transfer.
    _check_output_folder("--out", args.out)
    client = _client(args)
    assert isinstance(client, ApplianceClient)
    with client:
        try:
            reply = client.quality_report(include_html=not args.no_html)
        except _rpc_error_type() as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            # Only the server's page-size rejection names include_html; a busy server and the
            # client's own receive limit give the same status for other reasons.
            page_too_large = "include_html=false" in (details or "")
            if code is None or code.name != "RESOURCE_EXHAUSTED" or not page_too_large:
                raise
            raise UsageError(
                f"the server returned RESOURCE_EXHAUSTED: {details}. Rerun with --no-html to "
                "fetch quality.json only"
            ) from exc
    paths = write_quality_report(reply, args.out)
    stale_page = args.out / QUALITY_HTML
    if stale_page not in paths and stale_page.exists():
        logger.warning(
            "page of an earlier quality report kept path=%s; it may not match the new %s, so "
            "remove it or pass another --out",
            stale_page,
            paths[0].name,
        )
    sys.stdout.write(
        f"quality report of model {reply.model_id}, computed {reply.created_at}: wrote "
        f"{', '.join(str(p) for p in paths)}\n"
    )
    matches = (
        reply.matches_training_records if reply.HasField("matches_training_records") else None
    )
    try:
        stored = json.loads(reply.report_json)
        missing = stored.get("protocol", {}).get("missing_records")
        shortfalls = shortfall_warnings(stored.get("generators", {}))
    except (ValueError, AttributeError):
        # The figures above came from the reply's own fields, so an unreadable JSON copy
        # only hides these warnings.
        missing, shortfalls = None, []
    for warning in (missing_records_warning(missing), mismatch_warning(matches), *shortfalls):
        if warning is not None:
            sys.stderr.write(f"warning: {warning}\n")
    return 0


def _command_run(args: argparse.Namespace) -> int:
    from appliance.pipeline import run_main_job

    _check_data_folder(args.data)
    _check_job_out(args.out, args.data)
    _check_cache_dir(args)
    summary = run_main_job(
        args.data,
        args.out,
        _config(args),
        progress=not args.no_progress,
        train_options=_given_training_options(args),
    )
    sys.stdout.write(summary.table + "\n")
    return 0


def _given_training_options(args: argparse.Namespace) -> list[str]:
    """Return the options of a ``run`` that differ from their defaults, as ``train`` takes them.

    ``run`` and ``train`` share their data and training options, so ``train --resume`` with
    these options continues the run's training; ``--data`` and ``--out`` are left out.
    """
    defaults = vars(build_parser().parse_args(["run"]))
    left_out = {"data", "out", "command", "handler", "command_parser", "log_level"}
    options: list[str] = []
    for name, value in vars(args).items():
        if name in left_out or name not in defaults or value == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        # The boolean options are store_true flags.
        options += [flag] if isinstance(value, bool) else [flag, str(value)]
    return options


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every subcommand."""
    from appliance.serve_config import MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES
    from appliance.serve_config import ServeConfig as ServeDefaults

    parser = argparse.ArgumentParser(prog="python -m appliance", description=PARSER_DESCRIPTION)
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help=f"logging level, in any case: {', '.join(LOG_LEVELS)} (default: INFO)",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="COMMAND"
    )

    train = commands.add_parser("train", help="ingest, train, export and publish a model")
    _data_options(train)
    train.add_argument(
        "--store",
        type=Path,
        default=Path("model-store"),
        help="model store folder (default: ./model-store)",
    )
    train.add_argument(
        "--work-dir", type=Path, default=None, help="checkpoint folder (default: STORE/training)"
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in the work folder"
    )
    train.set_defaults(handler=_command_train)

    export = commands.add_parser("export", help="export a training checkpoint to the store")
    export.add_argument("--checkpoint", type=Path, required=True, help="best.pt written by train")
    export.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="the WFDB folder the checkpoint was trained on, read again for calibration "
        "(default: the bundled MIT-BIH records)",
    )
    export.add_argument(
        "--store",
        type=Path,
        default=Path("model-store"),
        help="model store folder (default: ./model-store)",
    )
    export.set_defaults(handler=_command_export)

    serve = commands.add_parser("serve", help="serve the store's current model over gRPC")
    serve.add_argument(
        "--store",
        type=Path,
        default=Path("model-store"),
        help="model store folder (default: ./model-store)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=_tcp_port,
        default=50051,
        help="TCP port from 0 to 65535; 0 lets the system choose (default: 50051)",
    )
    serve.add_argument(
        "--port-file",
        type=Path,
        default=None,
        help="write the bound port to this file once the port is open; the file is removed "
        "when serve exits, unless it then contains another port (default: no file)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=0,
        help="gRPC worker threads (default: 0, one per call --max-concurrent-rpcs admits)",
    )
    serve.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime threads per call, at most the CPUs available (default: 0, half "
        "of them)",
    )
    serve.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="CA certificate (PEM); when set, clients must present a certificate",
    )
    serve.add_argument(
        "--allow-insecure-remote",
        action="store_true",
        help="allow an insecure port on a non-loopback address",
    )
    serve.add_argument(
        "--require-gpu",
        action="store_true",
        help="refuse to start without the CUDA execution provider",
    )
    serve.add_argument(
        "--max-beats-per-request",
        type=int,
        default=100_000,
        help="most beats one request may ask for or carry (default: 100000)",
    )
    serve.add_argument(
        "--grace-s",
        type=float,
        default=ServeDefaults.grace_s,
        help=f"seconds calls in flight may take after SIGTERM (default: {ServeDefaults.grace_s})",
    )
    serve.add_argument(
        "--drain-s",
        type=float,
        default=ServeDefaults.drain_s,
        help="seconds, within the grace period, that health reports NOT_SERVING before the "
        f"port closes (default: {ServeDefaults.drain_s})",
    )
    serve.add_argument(
        "--stalled-send-s",
        type=_positive_seconds,
        default=ServeDefaults.stalled_send_s,
        help="seconds a Generate response may wait for the client to read it before the call "
        f"is cancelled, greater than 0 (default: {ServeDefaults.stalled_send_s})",
    )
    serve.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=ServeDefaults.max_concurrent_rpcs,
        help="calls accepted at once; more get RESOURCE_EXHAUSTED "
        f"(default: {ServeDefaults.max_concurrent_rpcs})",
    )
    serve.add_argument(
        "--max-message-bytes",
        type=int,
        default=ServeDefaults.max_message_bytes,
        help=f"largest request or reply message in bytes, {MIN_MESSAGE_BYTES} to "
        f"{MAX_MESSAGE_BYTES} (default: {ServeDefaults.max_message_bytes})",
    )
    serve.set_defaults(handler=_command_serve)

    for name, handler, text in (
        ("health", _command_health, "check the server's gRPC health status"),
        (
            "info",
            _command_info,
            "print the served model's data contract, classes, margins and graph hashes",
        ),
        ("generate", _command_generate, "generate synthetic beats through a server"),
        (
            "validate",
            _command_validate,
            "score beats from a .npy, .csv or WFDB file through a server",
        ),
        (
            "quality-report",
            _command_quality_report,
            "fetch the served model's quality report through a server",
        ),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "--address",
            type=_server_address,
            default="127.0.0.1:50051",
            help="server HOST:PORT, or [IPV6]:PORT (default: 127.0.0.1:50051)",
        )
        sub.add_argument(
            "--tls-ca",
            type=Path,
            default=None,
            help="CA certificate (PEM) of the server; enables TLS",
        )
        sub.add_argument(
            "--tls-cert", type=Path, default=None, help="client certificate (PEM) for mutual TLS"
        )
        sub.add_argument(
            "--tls-key", type=Path, default=None, help="client private key (PEM) for mutual TLS"
        )
        # A health probe should fail fast, while the other commands may wait for long calls.
        timeout_s = HEALTH_TIMEOUT_S if name == "health" else CALL_TIMEOUT_S
        sub.add_argument(
            "--timeout-s",
            type=_positive_seconds,
            default=timeout_s,
            help=(
                f"deadline of each call in seconds, greater than 0 (default: {timeout_s:g}); "
                "generate waits this long for each chunk of beats, not for the whole stream"
                if name == "generate"
                else f"deadline of each call in seconds, greater than 0 (default: {timeout_s:g})"
            ),
        )
        sub.set_defaults(handler=handler)
        if name == "info":
            sub.add_argument(
                "--json",
                action="store_true",
                help="print the GetModelInfo reply as JSON with the proto's field names and "
                "every field, the class counts as numbers (default: aligned text)",
            )
        if name == "generate":
            sub.add_argument(
                "--count",
                type=int,
                default=None,
                help=f"beats spread over the known classes; leave it out with --classes "
                f"(default: {DEFAULT_GENERATE_COUNT})",
            )
            sub.add_argument(
                "--classes",
                default=None,
                help="beats per class instead of --count, as NAME=COUNT pairs, e.g. N=100,V=50 "
                "(default: --count spread over the known classes)",
            )
            sub.add_argument(
                "--temperature",
                type=float,
                default=None,
                help=f"latent temperature, above 0 and at most {MAX_TEMPERATURE:g} (default: "
                "the server's, 1.0)",
            )
            sub.add_argument(
                "--margin",
                type=float,
                default=None,
                help="lowest accepted pertinence score, within the model's min_margin to "
                "max_margin (0 to 0.99 by default; default: the model's default margin)",
            )
            sub.add_argument(
                "--seed", type=int, default=None, help="seed of the draws (default: random)"
            )
            sub.add_argument(
                "--max-draws-per-beat",
                type=int,
                default=0,
                help="candidate draws allowed per requested beat before the server returns "
                "what it has (default: 0, the server's 20)",
            )
            sub.add_argument("--out", type=Path, required=True, help="output folder")
            sub.add_argument(
                "--format",
                choices=("npy", "csv", "wfdb"),
                default="npy",
                help="output format (default: npy)",
            )
        if name == "quality-report":
            sub.add_argument(
                "--out",
                type=Path,
                required=True,
                help="output folder for quality.html and quality.json",
            )
            sub.add_argument(
                "--no-html",
                action="store_true",
                help="fetch quality.json only, for a page over the server's message limit",
            )
        if name == "validate":
            sub.add_argument(
                "--input",
                type=Path,
                required=True,
                help=".npy of beats, shape (beats, leads, window_samples), in mV, or a .npy, "
                ".csv or WFDB record written by generate, whose classes are used; beside "
                'NAME.npy, a NAME_classes.json of {"classes": ["N", ...]} (one AAMI class '
                "per beat) gives the classes of your own beats",
            )
            sub.add_argument(
                "--recording",
                action="store_true",
                help="--input is a continuous WFDB recording: cut one window per annotated beat "
                "at the model's sampling rate, window and leads, after the same baseline filter "
                "as training, and score each beat under its annotation's AAMI class (default: "
                "the input contains beat windows)",
            )
            sub.add_argument(
                "--best-class",
                action="store_true",
                help="ignore the input's classes and score each beat under its best-fitting "
                "class; output: one tab-separated line per beat (index, score, result, class)",
            )
            sub.add_argument(
                "--margin",
                type=float,
                default=None,
                help="lowest accepted pertinence score, within the model's min_margin to "
                "max_margin (0 to 0.99 by default; default: the model's default margin)",
            )

    report = commands.add_parser(
        "report", help="write the quality and privacy report of the store's current model"
    )
    report.add_argument(
        "--store",
        type=Path,
        default=Path("model-store"),
        help="model store folder (default: ./model-store)",
    )
    report.add_argument(
        "--data",
        type=Path,
        required=True,
        help="MIT-BIH folder with every record of the de Chazal split",
    )
    report.add_argument(
        "--out",
        type=Path,
        default=Path("runs/report"),
        help="output folder (default: runs/report)",
    )
    report.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help=f"latent temperature of generation, above 0 and at most {MAX_TEMPERATURE:g} "
        "(default: 1.0)",
    )
    report.add_argument(
        "--margin",
        type=float,
        default=None,
        help="pertinence margin of generation (default: the model's)",
    )
    report.add_argument(
        "--no-baselines", action="store_true", help="skip the PCA Gaussian and RealNVP baselines"
    )
    report.add_argument(
        "--cache-dir", type=Path, default=None, help="ingest cache folder (default: no cache)"
    )
    report.add_argument(
        "--no-attach",
        action="store_true",
        help="do not store the report in STORE/reports for GetQualityReport "
        "(default: store it beside the model version it describes)",
    )
    report.set_defaults(handler=_command_report)

    run = commands.add_parser("run", help="the main job: train, serve, generate, validate")
    _data_options(run)
    run.add_argument(
        "--out",
        type=Path,
        default=Path("runs/latest"),
        help="output folder (default: runs/latest)",
    )
    run.set_defaults(handler=_command_run)
    # Each command's parser reports its own unknown options, with its own usage line.
    for command_parser in commands.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
        # --log-level is accepted after the command too; given there, it wins.
        command_parser.add_argument(
            "--log-level",
            type=str.upper,
            choices=LOG_LEVELS,
            default=argparse.SUPPRESS,
            help=f"logging level, in any case: {', '.join(LOG_LEVELS)} (default: INFO)",
        )
    return parser


def _rpc_error_type() -> type[Exception]:
    """Return ``grpc.RpcError`` if gRPC is loaded, else a class no exception matches."""
    grpc = sys.modules.get("grpc")
    return grpc.RpcError if grpc is not None else _NeverRaised


class _NeverRaised(Exception):
    """Placeholder for ``except`` when gRPC was never imported."""


def _report_rpc_error(exc: Exception, args: argparse.Namespace) -> int:
    """Print a failed call's status and message in one line; bad requests exit with 2."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    hint = ""
    uses_tls = getattr(args, "tls_ca", None) is not None
    # Nothing listens at the address, so no TLS setting is the cause.
    refused = "connection refused" in details.lower()
    if name in ("UNAVAILABLE", "UNAUTHENTICATED") and uses_tls and not refused:
        hint = _handshake_hint(details)
    if (
        not hint
        and name == "UNAVAILABLE"
        and uses_tls
        and not refused
        and getattr(args, "tls_cert", None) is None
    ):
        # A server that requires mutual TLS closes the handshake of a client without a
        # certificate, which gRPC reports as UNAVAILABLE with a transport message.
        hint = (
            "; if the server requires client certificates (mutual TLS), pass --tls-cert and "
            "--tls-key"
        )
    address = getattr(args, "address", "the server")
    # A stream that delivered beats had reached the server; the address and TLS are fine.
    received = getattr(exc, "received", None)
    if received is not None and name in ("UNAVAILABLE", "CANCELLED"):
        missing = int(getattr(exc, "requested", 0)) - len(received.classes)
        sys.stderr.write(
            f"error: {address} ended the stream: {name}: {details}; the server may be "
            f"shutting down or restarting. When it serves again, generate the {missing} "
            "missing beats with another --out, so that the beats written are kept, and "
            "another --seed or none, so that they are new beats\n"
        )
    elif name == "UNAVAILABLE":
        if not hint:
            hint = "; check --address and that `python -m appliance serve` is running there"
            if not uses_tls and not refused:
                # A TLS server closes a plain-text connection, which gRPC also reports as
                # UNAVAILABLE.
                hint += ", and pass --tls-ca if that server uses TLS"
            elif getattr(args, "tls_cert", None) is not None and not refused:
                # A server that requires mutual TLS closes the handshake of a client whose
                # certificate its CA did not sign or that has expired, with the same status.
                hint += (
                    ", and that --tls-cert is signed by the CA the server trusts and has not "
                    "expired"
                )
        sys.stderr.write(f"error: cannot reach {address}: {name}: {details}{hint}\n")
    elif name == "DEADLINE_EXCEEDED" and hasattr(args, "timeout_s"):
        sys.stderr.write(
            f"error: the call to {address} did not finish within --timeout-s={args.timeout_s:g} "
            f"s ({name}: {details}); raise --timeout-s\n"
        )
    else:
        sys.stderr.write(f"error: the server returned {name}: {details}{hint}\n")
    request_errors = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
    return EXIT_USAGE if name in request_errors else 1


def _handshake_hint(details: str) -> str:
    """Return the fix for a TLS handshake failure that this client detected, else ``""``.

    gRPC's C core puts OpenSSL's reason into the status details, for example
    ``CERTIFICATE_VERIFY_FAILED: certificate has expired``.
    """
    text = details.lower()
    if "wrong_version_number" in text or "wrong version number" in text:
        return (
            "; the server at --address does not use TLS, so leave out --tls-ca, --tls-cert and "
            "--tls-key"
        )
    if "hostname verification" in text or "is not in peer certificate" in text:
        return (
            "; the server's certificate does not list the host of --address, so connect with a "
            "host name or IP address that its subject alternative names list"
        )
    if "certificate_verify_failed" in text:
        if "expired" in text or "not yet valid" in text:
            return (
                "; the server's certificate is outside its validity period, so renew it on the "
                "server or check the clocks of both hosts"
            )
        return (
            "; --tls-ca does not contain the CA that signed the server's certificate, so pass "
            "that CA's certificate"
        )
    return ""


def _quiet_grpc_core(log_level: str) -> None:
    """Keep gRPC's C core to its errors unless ``GRPC_VERBOSITY`` is set.

    The core writes one INFO line to standard error for every failed TLS handshake, with no
    rate limit: a client would print it next to the command's own hint, and a server's log
    would grow with every probe. ``--log-level DEBUG`` lets the core's INFO lines through. The
    core reads the variable when grpc is imported, which every command does after this.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "INFO" if log_level.upper() == "DEBUG" else "ERROR")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; bad input exits with status 2 and a one-line message."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logger.setLevel(args.log_level.upper())
    _quiet_grpc_core(args.log_level)
    try:
        return int(args.handler(args))
    except _rpc_error_type() as exc:
        return _report_rpc_error(exc, args)
    except ApplianceError as exc:
        from appliance.errors import DataError, ModelStoreError, TrainingStoppedError

        if isinstance(exc, TrainingStoppedError):
            sys.stderr.write(f"error: {exc}\n")
            return 128 + exc.signum
        if isinstance(exc, DataError | ModelStoreError | UsageError):
            sys.stderr.write(f"error: {exc}\n")
            return EXIT_USAGE
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except ValueError as exc:  # client-side checks, e.g. an unknown class name
        logger.debug("command failed", exc_info=True)
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    except GeneratedCodeMissingError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except StoppedAtOnce as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
