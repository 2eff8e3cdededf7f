"""Command line: ``stream-detector run | replay | generate | demo | evaluate | backtest | config``.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from stream_detector.errors import ConfigError, StreamDetectorError

if TYPE_CHECKING:  # the config (pydantic) is imported only once a command needs it
    from stream_detector.config import Settings

log = logging.getLogger("stream_detector")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-detector", description="Streaming anomaly detection for sales events on Kafka.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume the input topic, publish anomalies, serve metrics (the daemon)")
    _config_arg(run)

    replay = sub.add_parser("replay", help="score JSON-lines events without a broker; one JSON line out per line in")
    _config_arg(replay)
    replay.add_argument("--input", default="-", help="JSON-lines file of sale events, or - for stdin (default)")
    replay.add_argument("--output", default="-", help="where to write the scored lines, or - for stdout (default)")

    gen = sub.add_parser("generate", help="a synthetic sales stream with labelled anomalies")
    gen.add_argument("--count", type=_positive_int, required=True, help="number of events")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--anomaly-rate", type=_fraction, default=0.01, help="share of injected point anomalies (default 0.01)")
    gen.add_argument("--rate", type=_positive_float, default=None, help="events per second (default: as fast as possible)")
    target = gen.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="JSON-lines file, or - for stdout")
    target.add_argument("--bootstrap-servers", help="produce to Kafka at HOST:PORT instead (needs --topic)")
    gen.add_argument("--topic", help="topic to produce to, with --bootstrap-servers")
    gen.add_argument("--labels", help="write labels (event_id -> kind, and store-stopped windows) to this JSON-lines file")
    _drift_args(gen)

    demo = sub.add_parser("demo", help="embedded broker + synthetic stream + detector, anomalies printed")
    _config_arg(demo)
    demo.add_argument("--rate", type=_positive_float, default=2000.0, help="generated events per second (default 2000)")
    demo.add_argument("--count", type=_positive_int, default=None, help="stop generating after this many events")
    demo.add_argument("--duration", type=_positive_float, default=None, help="stop after this many seconds")
    demo.add_argument("--metrics-port", type=int, default=None, help="metrics port (default: metrics.port)")
    demo.add_argument("--seed", type=int, default=0)

    evaluate = sub.add_parser("evaluate", help="detection quality on labelled events, or ROC AUC on a public data set")
    _config_arg(evaluate)
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--events", help="JSON-lines file of sale events (needs --labels)")
    source.add_argument("--generate", type=_positive_int, metavar="N", help="evaluate on N generated events")
    source.add_argument("--dataset", choices=("shuttle", "waterflow"), help="a public labelled data set shipped with River")
    evaluate.add_argument("--labels", help="JSON-lines labels for --events (as written by generate --labels)")
    evaluate.add_argument("--seed", type=int, default=0, help="generator seed, with --generate (default 0)")
    evaluate.add_argument("--anomaly-rate", type=_fraction, default=0.01, help="share of injected point anomalies, with --generate (default 0.01)")
    _drift_args(evaluate, " with --generate")
    evaluate.add_argument("--skip-warmup", type=int, default=0, metavar="N", help="score but do not count the first N records (default 0)")
    evaluate.add_argument(
        "--partitions",
        type=_positive_int,
        metavar="P",
        help="score as a daemon does a topic of P partitions: a pipeline per partition, records keyed by schema.key_fields (default: one pipeline, as replay)",
    )
    evaluate.add_argument("--instances", type=_positive_int, metavar="I", help="with --partitions: spread over I instances (default 1)")
    evaluate.add_argument(
        "--restart-every",
        type=_positive_int,
        metavar="N",
        help="with --partitions: restart every instance after each N records (state through its snapshot, calibration from the population topic)",
    )
    evaluate.add_argument("--plot", metavar="FILE.png", help="save a plot of the fused score and recall by kind")
    evaluate.add_argument("--json", metavar="FILE", help="write the report as JSON")

    backtest = sub.add_parser("backtest", help="score the input topic from an offset or time, producing nothing")
    _config_arg(backtest)
    start = backtest.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-offset", type=int, metavar="N", help="start at offset N in every partition")
    start.add_argument("--from-timestamp", metavar="ISO", help="start at the first record at or after this time in every partition")
    backtest.add_argument("--until-offset", type=int, metavar="M", help="stop before offset M in every partition (default: the end)")
    backtest.add_argument("--limit", type=_positive_int, metavar="K", help="read at most K records in all")
    backtest.add_argument("--json", metavar="FILE", help="write the summary as JSON")

    config = sub.add_parser("config", help="show or validate configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective configuration (secrets masked)")
    _config_arg(show)
    validate = config_sub.add_parser("validate", help="check a configuration file (and build the pipeline it describes)")
    validate.add_argument("file")
    return parser


def _drift_args(parser: argparse.ArgumentParser, scope: str = "") -> None:
    parser.add_argument(
        "--drift",
        action="store_true",
        help=f"add lasting changes (re-priced best sellers, a new store, a new product, a store changing format), labelled as change points{scope}",
    )
    parser.add_argument("--drift-at", type=int, metavar="N", help=f"the changes start at event N (implies --drift; default: half the events){scope}")


def _drift_at(args: argparse.Namespace, count: int) -> int | None:
    """The drift start position from --drift / --drift-at, or None without drift."""
    if args.drift_at is not None:
        if args.drift_at < 0:
            raise ConfigError(f"--drift-at must be >= 0, got {args.drift_at}")
        return int(args.drift_at)
    return count // 2 if args.drift else None


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: built-in defaults, as in config/detector.yaml)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args, parser)
    except ConfigError as exc:
        print(f"stream-detector: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # e.g. `stream-detector config show | head`
        sys.stderr.close()
        return EXIT_OK
    except StreamDetectorError as exc:
        log.error("%s", exc)
        print(f"stream-detector: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from stream_detector.config import load_settings
    from stream_detector.logs import setup_logging

    if args.command == "generate":
        setup_logging("INFO", "auto")
        return _generate(args, parser)
    if args.command == "config":
        return _config(args)
    settings = load_settings(args.config)
    setup_logging(settings.logging.level, settings.logging.format)
    if args.command == "run":
        from stream_detector.runtime.daemon import Daemon
        from stream_detector.runtime.preflight import check_kafka_settings

        # librdkafka's verdict on the client settings now, not in the daemon's retry loop.
        check_kafka_settings(settings)
        daemon = Daemon(settings)
        daemon.install_signal_handlers()
        return daemon.run()
    if args.command == "replay":
        from stream_detector.runtime.replay import replay

        with _open_in(args.input) as src, _open_out(args.output) as dst:
            replay(settings, src, dst)
        return EXIT_OK
    if args.command == "demo":
        from stream_detector.runtime.demo import run_demo

        return run_demo(settings, rate=args.rate, count=args.count, duration=args.duration, metrics_port=args.metrics_port, seed=args.seed)
    if args.command == "evaluate":
        return _evaluate(settings, args)
    if args.command == "backtest":
        return _backtest(settings, args)
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _evaluate(settings: Settings, args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """``stream-detector evaluate``: check the flags, pick the source, print (and save) the report."""
    from stream_detector.evaluation import (
        Labels,
        evaluate,
        evaluate_dataset,
        file_events,
        format_dataset_report,
        format_report,
        generated_events,
        plot_report,
    )
    from stream_detector.reporting import Progress, write_json
    from stream_detector.scoring.factory import build_pipeline, event_schema

    out = out if out is not None else sys.stdout
    if args.skip_warmup < 0:
        raise ConfigError(f"--skip-warmup must be >= 0, got {args.skip_warmup}")
    if args.plot and not args.dataset:
        _require_extra("matplotlib", "plot", "--plot")
    if (args.instances is not None or args.restart_every is not None) and args.partitions is None:
        raise ConfigError("--instances and --restart-every go with --partitions")
    if args.partitions is not None and args.dataset:
        raise ConfigError("--partitions applies to sales-event evaluations, not to --dataset")
    if (args.drift or args.drift_at is not None) and not args.generate:
        raise ConfigError("--drift and --drift-at go with --generate (a --labels file carries its own change labels)")
    if args.dataset:
        if args.plot:
            raise ConfigError("--plot applies to sales-event evaluations, not to --dataset")
        dataset_report = evaluate_dataset(args.dataset, settings, progress=Progress(f"evaluate {args.dataset}"))
        print(format_dataset_report(dataset_report), file=out)
        if args.json:
            write_json(dataset_report.to_dict(), args.json)
        return EXIT_OK
    labels = Labels()
    if args.events:
        if not args.labels:
            raise ConfigError("--events needs --labels")
        labels = Labels.load(args.labels)
        events, total = file_events(args.events)
        source = args.events
    else:
        if args.labels:
            raise ConfigError("--labels goes with --events; --generate makes its own labels")
        drift_at = _drift_at(args, args.generate)
        events = generated_events(args.generate, args.seed, args.anomaly_rate, labels, drift_at=drift_at)
        total = args.generate
        source = f"generated: {args.generate:,} events, seed {args.seed}, anomaly rate {args.anomaly_rate}"
        if drift_at is not None:
            source += f", drift from event {drift_at:,}"
    pipeline, schema = build_pipeline(settings), event_schema(settings)
    scorer = None
    if args.partitions is not None:
        from stream_detector.evaluation.shape import Deployment, DeploymentScorer

        try:
            deployment = Deployment(args.partitions, args.instances or 1, restart_every=args.restart_every)
        except ValueError as exc:
            raise ConfigError(f"--partitions / --instances: {exc}") from None
        scorer = DeploymentScorer(pipeline, settings, schema, deployment)
        sharing = "calibration shared" if scorer.pools else "each partition calibrated alone (scaling.share_calibration: false)"
        source += f"; scored as {deployment.describe()}, {sharing}"
    report = evaluate(
        events,
        labels,
        pipeline,
        schema,
        settings.processing.batch_size,
        skip_warmup=args.skip_warmup,
        progress=Progress("evaluate", total=total),
        deployment=scorer,
    )
    print(format_report(report, source), file=out)
    if scorer is not None and scorer.restarts:
        print(f"restarts: {scorer.restarts}, state parts not restored: {scorer.restore_failures}", file=out)
    if args.json:
        write_json({"source": source, **report.to_dict()}, args.json)
    if args.plot:
        path = plot_report(report, args.plot, title=f"stream-detector evaluate ({source})")
        print(f"plot written to {path}", file=out)
    return EXIT_OK


def _require_extra(module: str, extra: str, option: str) -> None:
    """ConfigError (exit 2) naming the extra to install when ``option`` needs a missing module."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{option} needs {module}, which is not installed: pip install 'stream-detector[{extra}]'") from None


def _backtest(settings: Settings, args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """``stream-detector backtest``; bad offsets or times raise ConfigError (exit 2)."""
    from stream_detector.reporting import Progress, write_json
    from stream_detector.runtime.backtest import backtest
    from stream_detector.runtime.preflight import check_kafka_settings

    check_kafka_settings(settings, roles=("consumer",))
    out = out if out is not None else sys.stdout
    progress = Progress("backtest", total=args.limit)
    summary = backtest(
        settings,
        from_offset=args.from_offset,
        from_timestamp=args.from_timestamp,
        until_offset=args.until_offset,
        limit=args.limit,
        progress=lambda n: progress(n, "records"),
    )
    print(summary.format(), file=out)
    if args.json:
        write_json(summary.to_dict(), args.json)
    return EXIT_OK


def _config(args: argparse.Namespace) -> int:
    import yaml

    from stream_detector.config import load_settings, masked_dump

    if args.config_command == "validate":
        from stream_detector.runtime.preflight import check_kafka_settings
        from stream_detector.scoring.factory import build_pipeline

        # Build the pipeline too: the detectors check their own parameters, and numba compiles
        # (or loads) their kernels, so `make install` and the Docker build run this once. The
        # Kafka clients are built as the daemon builds them (nothing is connected to).
        settings = load_settings(args.file)
        check_kafka_settings(settings)
        build_pipeline(settings)
        print(f"{args.file}: ok")
        return EXIT_OK
    settings = load_settings(args.config)
    yaml.safe_dump(masked_dump(settings), sys.stdout, sort_keys=False)
    return EXIT_OK


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from stream_detector.generator import GeneratorConfig, SalesGenerator, produce_to_kafka, write_jsonl, write_labels

    if args.bootstrap_servers and not args.topic:
        parser.error("--bootstrap-servers needs --topic")
    generator = SalesGenerator(GeneratorConfig(seed=args.seed, anomaly_rate=args.anomaly_rate, drift_at=_drift_at(args, args.count)))
    labels = []

    def events():
        for event, label in generator.generate(args.count):
            if label is not None:
                labels.append(label)
            yield event

    if args.output is not None:
        stream = _paced(events(), args.rate) if args.rate else events()
        with _open_out(args.output, binary=True) as out:
            write_jsonl(stream, out)
    else:
        produce_to_kafka(events(), args.bootstrap_servers, args.topic, rate=args.rate, log=log)
    if args.labels:
        write_labels([*labels, *generator.window_labels, *generator.change_labels], args.labels)
    return EXIT_OK


def _paced(events, rate: float):
    import time

    started = time.monotonic()
    for n, event in enumerate(events):
        ahead = n / rate - (time.monotonic() - started)
        if ahead > 0.01:
            time.sleep(ahead)
        yield event


class _open_in:
    def __init__(self, name: str) -> None:
        self.name = name
        self.handle: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        if self.name == "-":
            return sys.stdin.buffer
        try:
            self.handle = open(self.name, "rb")
        except OSError as exc:
            raise ConfigError(f"--input {self.name}: {exc.strerror}") from None
        return self.handle

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()


class _open_out:
    def __init__(self, name: str, binary: bool = True) -> None:
        self.name = name
        self.handle: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        if self.name == "-":
            return sys.stdout.buffer
        try:
            Path(self.name).parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.name, "wb")
        except OSError as exc:
            raise ConfigError(f"--output {self.name}: {exc.strerror}") from None
        return self.handle

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()
        else:
            sys.stdout.buffer.flush()
