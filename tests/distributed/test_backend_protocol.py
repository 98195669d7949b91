"""Every backend implements the Backend protocol (gentrain/distributed/backend.py), member by member:
each method with a signature the Trainer can call it by, each data member set by the backend. A
backend that loses a method, or renames a parameter of one, fails here naming the member."""
import ast
import inspect
import textwrap

import pytest

from gentrain.distributed.backend import Backend
from gentrain.distributed.ddp import DDPBackend
from gentrain.distributed.deepspeed import DeepSpeedBackend
from gentrain.distributed.fsdp2 import FSDP2Backend

BACKENDS = [DDPBackend, DeepSpeedBackend, FSDP2Backend]


def protocol_members(proto: type) -> tuple[list[str], list[str]]:
    """(data members, methods) the protocol declares."""
    data = list(proto.__annotations__)
    methods = [k for k, v in vars(proto).items() if inspect.isfunction(v) and not k.startswith("_")]
    return data, methods


def assigned_in_init(cls: type) -> set[str]:
    """The `self.X` a class's __init__ assigns (directly or as a tuple target)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    out = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                    out.add(e.attr)
    return out


def signature_problem(proto_fn, impl) -> str | None:
    """Why `impl` cannot stand for `proto_fn` when called as the protocol says, or None."""
    want = list(inspect.signature(proto_fn).parameters.values())
    have = list(inspect.signature(impl).parameters.values())
    for i, p in enumerate(want):
        if i >= len(have):
            return f"lacks parameter {p.name!r}"
        h = have[i]
        if (h.name, h.kind) != (p.name, p.kind):
            return f"parameter {i} is {h.name!r} ({h.kind.description}), the protocol has {p.name!r} ({p.kind.description})"
    extra = [h.name for h in have[len(want):] if h.default is inspect.Parameter.empty
             and h.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    return f"has required parameters the protocol does not pass: {extra}" if extra else None


def conformance(cls: type) -> list[str]:
    data, methods = protocol_members(Backend)
    problems = []
    for name in methods:
        impl = getattr(cls, name, None)
        if impl is None or not callable(impl):
            problems.append(f"{cls.__name__} has no method {name}")
        elif (why := signature_problem(getattr(Backend, name), impl)) is not None:
            problems.append(f"{cls.__name__}.{name} {why}")
    init = assigned_in_init(cls)
    for name in data:
        if not any(name in vars(k) for k in cls.__mro__[:-1]) and name not in init:
            problems.append(f"{cls.__name__} neither defines nor sets {name}")
    return problems


def test_the_protocol_names_what_the_trainer_calls():
    data, methods = protocol_members(Backend)
    assert set(data) == {"kind", "reads", "nets", "raw_nets", "optimizers"}
    assert set(methods) == {"micro_step", "loss_ok", "backward", "step", "zero_grad", "weight_tensors", "ema_params",
                            "full_ema", "local_ema", "sampling_nets", "save", "load"}


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
def test_each_backend_implements_the_protocol(cls):
    assert conformance(cls) == []


def test_the_check_fails_for_a_missing_method_a_renamed_parameter_or_a_missing_attribute():
    """The check itself: a backend with a method removed, a parameter renamed or a member unset fails."""
    gone = type("Gone", (DDPBackend,), {})
    gone.save = None   # as if DDPBackend had no save
    assert conformance(gone) == ["Gone has no method save"]
    renamed = type("Renamed", (DDPBackend,), {"step": lambda self, phase, params, loss, clip: None})
    assert conformance(renamed) == ["Renamed.step parameter 4 is 'clip' (positional or keyword), the protocol has "
                                    "'max_norm' (positional or keyword)"]

    class NoOptimizers(DDPBackend):
        def __init__(self):   # sets everything but optimizers
            self.nets, self.raw_nets = {}, {}

    assert "NoOptimizers neither defines nor sets optimizers" in conformance(NoOptimizers)


def test_a_ddp_backend_is_a_backend_at_runtime(tmp_path, fresh_accelerate_state):
    """runtime_checkable: a real one-process DDP backend (what make_backend gives the Trainer) is a Backend."""
    import torch

    from gentrain.distributed.core import make_accelerator
    from gentrain.config import TrainConfig

    acc = make_accelerator(TrainConfig(), tmp_path, [])
    net = torch.nn.Linear(2, 2)
    backend = DDPBackend(acc, {"net": net}, [("net",)], [torch.optim.SGD(net.parameters(), lr=0.1)])
    assert isinstance(backend, Backend)
    assert not isinstance(object(), Backend)
