"""The `reduce-ops` command: argument parsing and dispatch to reduce_ops.stages."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from reduce_ops.config import load_config, split_overrides
from reduce_ops.errors import ReduceOpsError
from reduce_ops.execution import keep_freed_memory, start_pool_server
from reduce_ops.stages import POOLED, STAGES, check_tracking, runner


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", metavar="FILE",
                        help="parameters file (default: params.yaml)")
    common.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set train.max_epochs=3 (repeatable)")
    common.add_argument("--overrides", default="", metavar="'K=V K=V'",
                        help="several overrides in one string (used by MLproject entry points)")
    parser = argparse.ArgumentParser(
        prog="reduce-ops",
        description="Plan, run and track fault-aware retraining of one DNN for a fleet of faulty "
                    "systolic-array chips. Every stage reads params.yaml; --set KEY=VALUE "
                    "overrides any key.")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    parsers = {name: sub.add_parser(name, parents=[common], help=text, description=text)
               for name, text in STAGES.items()}
    fm = parsers["faultmaps"]
    fm.add_argument("action", nargs="?", choices=["generate", "import"], default="generate",
                    help="run as params.yaml says (default), or import a test floor's maps and "
                         "record the folder in the params file")
    fm.add_argument("src", nargs="?", help="import: folder of <chip_id>.npy / <chip_id>.csv maps")
    parsers["fat"].add_argument("--force", action="store_true",
                                help="retrain chips already registered for the current plan")
    fetch = parsers["fetch"]
    fetch.add_argument("chip_id", help="chip id as in the fleet, e.g. chip-007")
    fetch.add_argument("--out", metavar="DIR", type=Path,
                       help="download the champion's MLflow model and chip_model.pt into DIR")
    ui = parsers["ui"]
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    server = parsers["server"]
    server.add_argument("--dir", type=Path, default=Path(".server"),
                        help="PostgreSQL cluster, artifacts and logs (default: .server)")
    server.add_argument("--port", type=int, default=5000, help="MLflow port (default: 5000)")
    server.add_argument("--pg-port", type=int, default=5433,
                        help="PostgreSQL port on 127.0.0.1 (default: 5433)")
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, [*split_overrides(args.overrides), *args.sets])
    if args.stage in POOLED:   # its imports overlap the tracking check and the stage's reading
        start_pool_server(cfg.execution)
    check_tracking(cfg, args.stage)
    if args.stage == "faultmaps" and args.action == "import":
        from reduce_ops.stages.faultmaps import import_maps

        if not args.src:
            raise ReduceOpsError("faultmaps import: give the folder of .npy/.csv maps, "
                                 "e.g. reduce-ops faultmaps import floor/maps")
        import_maps(cfg, Path(args.params), Path(args.src))
    elif args.stage == "fat":
        runner("fat")(cfg, force=args.force)
    elif args.stage == "fetch":
        runner("fetch")(cfg, args.chip_id, args.out)
    elif args.stage == "server":
        runner("server")(cfg, args.dir, args.port, args.pg_port)
    elif args.stage == "ui":
        runner("ui")(cfg, args.host, args.port)
    else:
        runner(args.stage)(cfg)


@contextmanager
def _stop_on_sigterm() -> Iterator[list[int]]:
    """While a stage runs, SIGTERM raises KeyboardInterrupt in the main thread (only there can
    a handler be set); the yielded list gets an entry once it came. The handler before is
    restored after."""
    import signal
    import threading

    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return

    def stop(signum: int, frame: object) -> None:
        came.append(signum)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield came
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; bad input ends with one line on stderr and exit code 2, never a traceback.
    SIGTERM (a scheduler's stop, `kill`, `timeout`) ends it the way Ctrl-C does: runs end
    KILLED, temporaries are removed; the exit code is then 143."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    with _stop_on_sigterm() as terminated:
        return _main(args, terminated)


def _main(args: argparse.Namespace, terminated: list[int]) -> int:
    try:
        _dispatch(args)
    except ReduceOpsError as exc:
        print(f"reduce-ops {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"reduce-ops {args.stage}: {'terminated' if terminated else 'interrupted'}",
              file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # noqa: BLE001 - the store or the disk failing: one line too
        from reduce_ops.tracking.store import store_failure

        line = store_failure(exc)
        if line is None or os.environ.get("REDUCE_OPS_TRACEBACK"):
            raise                                   # a bug: shown in full
        print(f"reduce-ops {args.stage}: error: {line}", file=sys.stderr)
        return 2
    return 0


def exit_now(code: int) -> NoReturn:
    """End this process with exit status `code` as Python's own exit does (its threads
    finished, its atexit functions run, stdout and stderr flushed), less the teardown of every
    imported module, which a stage process has no use for: 0.5-1 s of each stage here (torch,
    MLflow, pandas, matplotlib loaded; `reduce-ops plan` 4.0 -> 3.3 s, three runs each). Files
    are closed by the stages themselves (every write is atomic and complete before a stage
    returns)."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:            # what Python's exit runs first: the exit hooks of
        shutdown()                      # concurrent.futures, then joins non-daemon threads
    else:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()             # MLflow's, logging's, multiprocessing's, tempfile's
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe or stream: nothing left to say there
            pass
    os._exit(code)


def run() -> NoReturn:
    """The `reduce-ops` command and `python -m reduce_ops`: main(), then exit_now. A bug's
    traceback leaves through Python's own exit, and so does everything under a profiler, a
    debugger or coverage (`python -m cProfile -o F -m reduce_ops ...` writes F after main)."""
    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    exit_now(code)


if __name__ == "__main__":
    run()
