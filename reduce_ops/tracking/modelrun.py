"""A child run that logs a model: open while its metrics, files and model are logged (by the
logging process of `fat`), spanning the time its work took; a logged model shown on another
run's page (an eFAT group's, on its members' runs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from reduce_ops import names
from reduce_ops.tracking import layout
from reduce_ops.tracking.runs import StageRun, _RunLog, millis


@dataclass(frozen=True)
class LoggedModel:
    """A model logged in a run: its URI, MLflow's model id and the format it was saved in."""

    model_uri: str
    model_id: str | None
    serialization_format: str      # "pt2" (torch.export) or "pickle" (the fallback)
    fallback_reason: str = ""      # why pt2 export failed, when it did
    seconds: float = 0.0



# Models of one architecture and input already logged in pt2 by this process. MLflow checks a
# logged model by loading it back and serving its input example; every chip's model of a `fat`
# stage has the same graph (only its weights differ), so the check runs for the first of each
# (23 % of a LeNet model's logging here, which bounds `fat` on a small model).
_SERVED: set[tuple[str, str, tuple, str]] = set()


def _served_key(model: Any, input_example: Any) -> tuple[str, str, tuple, str]:
    return (type(model).__qualname__, repr(model), tuple(getattr(input_example, "shape", ())),
            str(getattr(input_example, "dtype", type(input_example).__name__)))


# The first torch.export of each architecture and input in a process (49 % of a LeNet model's
# logging was torch.export): a later model of the same key is saved as that program's graph
# with its own parameters and buffers: the graph and weights a fresh export of it saves
# (the archive's random id and the call stack noted with each node aside). A model exports
# afresh where that cannot be shown: in training mode or with hooks or parametrizations (what
# its repr does not show), tensors other than the program's (names, shapes, dtypes, devices),
# or a reused program that answers its input other than the model itself does.
_EXPORTED: dict[tuple, Any] = {}
_EXPORT_LOCK = threading.Lock()     # torch.export.export is replaced while a model is saved


def _with_weights(program: Any, model: Any, args: tuple, kwargs: dict) -> Any | None:
    """`program` (an ExportedProgram of another model of the same key) holding `model`'s own
    parameters and buffers, or None where that cannot be shown to be `model`."""
    import copy

    import torch
    from torch.export import ExportedProgram
    from torch.nn.utils import parametrize

    if model.training or program.graph_signature.buffers_to_mutate or any(
            m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m)
            for m in model.modules()):
        return None
    own = {**dict(model.named_parameters(remove_duplicate=False)),
           **dict(model.named_buffers(remove_duplicate=False))}
    held = {**program.state_dict, **program.constants}
    if set(held) != set(own) or any(
            not isinstance(t, torch.Tensor) or (t.shape, t.dtype, t.device)
            != (own[k].shape, own[k].dtype, own[k].device) for k, t in held.items()):
        return None                 # a lifted constant, a script object: not the model's own
    state = {k: torch.nn.Parameter(own[k].detach(), requires_grad=own[k].requires_grad)
             if isinstance(v, torch.nn.Parameter) else own[k].detach()
             for k, v in program.state_dict.items()}
    try:
        # the graph is shared (a copy renames its nodes); torch's constructor re-applies only
        # what it applied to it already. What a pass may edit besides is copied.
        reused = ExportedProgram(
            root=program.graph_module, graph=program.graph,
            graph_signature=copy.deepcopy(program.graph_signature), state_dict=state,
            range_constraints=copy.copy(program.range_constraints),
            module_call_graph=copy.deepcopy(program.module_call_graph),
            example_inputs=(args, kwargs),
            constants={k: own[k].detach() for k in program.constants},
            verifiers=program.verifiers)
        with torch.no_grad():
            same = torch.equal(reused.module()(*args, **kwargs), model(*args, **kwargs))
    except Exception:  # noqa: BLE001 - whatever fails here, a fresh export decides
        return None
    return reused if same else None


@contextmanager
def _export_once(model: Any, key: tuple) -> Iterator[None]:
    """While MLflow saves `model` in the block, its torch.export.export reuses the program of
    the first model of `key` (see _EXPORTED); every other export is torch's own. One block
    at a time in a process."""
    import torch.export

    def export(mod: Any, args: tuple, kwargs: dict | None = None, **options: Any) -> Any:
        if mod is not model:
            return real(mod, args, kwargs, **options)
        at = (key, repr(options))
        program = _EXPORTED.get(at)
        reused = (None if program is None
                  else _with_weights(program, mod, tuple(args), dict(kwargs or {})))
        if reused is not None:
            return reused
        _EXPORTED[at] = program = real(mod, args, kwargs, **options)
        return program

    with _EXPORT_LOCK:
        real = torch.export.export
        torch.export.export = export
        try:
            yield
        finally:
            torch.export.export = real


@dataclass
class ModelChildRun(_RunLog):
    """A child run kept open while its metrics and model are logged; it ends at `end` (when
    its work ended) once they are. Its tracking time counts towards the stage's."""

    run_id: str
    stage: StageRun
    end: float | None = None       # time.time() its work ended; None: when it is closed

    @property
    def client(self) -> Any:
        return self.stage.client

    def _timed(self) -> Any:
        return self.stage._timed()

    def log_pytorch_model(self, model: Any, input_example: Any, pip_requirements: Sequence[str],
                          name: str = "model") -> LoggedModel:
        """mlflow.pytorch.log_model in the pt2 (torch.export) format; pickle if export fails.
        `name` is the logged model's name on the experiment's Models page.

        pt2 needs `input_example` (it traces forward on it); explicit `pip_requirements` skip
        MLflow's slow requirement inference. A pt2 model loads back as a GraphModule.
        """
        import mlflow.pytorch

        t0 = time.perf_counter()
        fallback = ""
        served = _served_key(model, input_example)

        def log(fmt: str) -> Any:
            # the logged model is made here, in the run's experiment (MLflow would put it in
            # the active experiment of this process, which is none: Default)
            made = self.client.create_logged_model(
                self.stage.children_experiment, name=name, source_run_id=self.run_id,
                params=self.client.get_run(self.run_id).data.params)
            with _export_once(model, served):
                return mlflow.pytorch.log_model(
                    model, name=name, input_example=input_example, run_id=self.run_id,
                    model_id=made.model_id, pip_requirements=list(pip_requirements),
                    serialization_format=fmt,
                    **({"validate_serving_input": False}
                       if fmt == "pt2" and served in _SERVED else {}))

        with self.stage._timed():
            try:
                info, fmt = log("pt2"), "pt2"
            except Exception as exc:  # noqa: BLE001 - any export failure: fall back, say why
                fallback = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                info, fmt = log("pickle"), "pickle"
        if fmt == "pt2":
            _SERVED.add(served)
        return LoggedModel(info.model_uri, getattr(info, "model_id", None), fmt, fallback,
                           time.perf_counter() - t0)


def link_logged_model(stage: StageRun, run_id: str, model_id: str) -> None:
    """Show a model logged by another run (an eFAT group's) among run `run_id`'s models."""
    from mlflow.entities import LoggedModelOutput

    with stage._timed():
        stage.client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])


@contextmanager
def model_child_run(stage: StageRun, name: str, params: Mapping[str, Any],
                    tags: Mapping[str, Any] | None = None, start: float | None = None,
                    description: str = "") -> Iterator[ModelChildRun]:
    """A child run of `stage` (in its children's experiment) that stays open while a model is
    logged; it started at `start` (time.time() its work started; None: now).

    Ends FINISHED at the child's `end`, or KILLED on Ctrl-C / FAILED on an error (now).
    """
    with stage._timed():
        run = stage.client.create_run(
            stage.children_experiment, start_time=millis(start), run_name=name,
            tags={names.TAG_PARENT: stage.run_id, **{k: str(v) for k, v in (tags or {}).items()},
                  **({layout.TAG_DESCRIPTION: layout.clip(description)} if description else {})})
    child = ModelChildRun(run.info.run_id, stage)
    try:
        if params:
            child.log_params(params)
        yield child
    except KeyboardInterrupt:
        stage.client.set_terminated(child.run_id, "KILLED")
        raise
    except BaseException:
        stage.client.set_terminated(child.run_id, "FAILED")
        raise
    with stage._timed():
        stage.client.set_terminated(child.run_id, "FINISHED", end_time=millis(child.end))
