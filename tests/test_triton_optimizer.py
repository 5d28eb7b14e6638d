"""What is the Triton backend's own: it reads the user's tensors where they are (address
tables rebuilt only when a pointer changes, gradients set to None, replaced or laid out
unlike their parameters, parameters re-pointed), the aligned specialization, the
backend choice, a steady-state step that is kernel launches only (no host read, no
allocation), the launches under torch.compile, and on a GPU CUDA graphs and Inductor.
Its trajectories against the float64 reference are tests/test_parity.py's; each kernel
against its formula is tests/test_triton_kernels.py.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set by ``make test`` and ``conftest.py``) on CPU tensors.
"""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlbfgs_fused import MLBFGS
from mlbfgs_fused import backends
from mlbfgs_fused.backends import triton as _triton
from problems import build_params, make_optimizer, run_against_reference, run_scenario, set_grads, standard_scenario

pytestmark = pytest.mark.skipif(not _triton.available(), reason="Triton does not import")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _device():
    return "cpu" if _triton.interpreting() else "cuda"


def _scenario(blocks="group", steps=26, **overrides):
    return standard_scenario(blocks, steps=steps, **overrides)


def _pair_counts(opt, groups):
    return [int(b["pair_count"]) for params in groups for p in params for b in opt.block_states(p)]


# -- the user's tensors, in place ---------------------------------------------------------
def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(_device())


def _train_side_by_side(steps, before_step=None, set_to_none=True, seed=1, **kwargs):
    """The same model trained by the Triton and the foreach backend; ``before_step(step,
    model)`` may tamper with the model or its gradients after backward."""
    dev = _device()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 6, generator=gen).to(dev), torch.randn(8, 3, generator=gen).to(dev)) for _ in range(steps)]
    models, opts = [], []
    for backend in ("triton", "foreach"):
        model = _mlp(seed)
        model.initial_pointers = [p.data_ptr() for p in model.parameters()]
        models.append(model)
        opts.append(MLBFGS(model.parameters(), lr=0.05, history_size=2, update_period=3,
                           blocks="tensor", backend=backend, **kwargs))
    for step, (x, y) in enumerate(data):
        for model, opt in zip(models, opts):
            opt.zero_grad(set_to_none=set_to_none)
            torch.nn.functional.mse_loss(model(x), y).backward()
            if before_step is not None:
                before_step(step, model)
            opt.step()
        for p_t, p_f in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(p_t, p_f, rtol=1e-5, atol=1e-6)
    return models, opts


@pytest.mark.parametrize("set_to_none", [True, False])
def test_training_loop_with_gradients_none_and_replaced(set_to_none):
    """The kernels read the user's gradients where they are: a gradient set to None,
    replaced by a new tensor, or recreated by autograd is simply read there. The
    parameters stay the user's tensors (never re-pointed) and match the foreach backend."""

    def tamper(step, model):
        if step in (4, 5):  # the last layer's bias gets no gradient at all
            model[2].bias.grad = None
        if step == 8:  # replaced by a new tensor
            model[0].weight.grad = model[0].weight.grad.clone() * 2

    models, opts = _train_side_by_side(12, tamper, set_to_none)
    assert [p.data_ptr() for p in models[0].parameters()] == models[0].initial_pointers
    assert all(p.grad is not None and p.grad._base is None for p in models[0].parameters())


def test_address_table_uploaded_only_when_a_pointer_changes(monkeypatch):
    builds = []
    rebuild = _triton.TritonArena._rebuild
    monkeypatch.setattr(_triton.TritonArena, "_rebuild", lambda self, *a: (builds.append(1), rebuild(self, *a)))
    model = _mlp(7)
    opt = MLBFGS(model.parameters(), lr=0.05, backend="triton")
    x = torch.randn(4, 6, device=_device())
    for _ in range(3):  # gradients zeroed in place: the same tensors every step
        opt.zero_grad(set_to_none=False)
        model(x).sum().backward()
        opt.step()
    assert len(builds) == 1
    model[0].weight.grad = model[0].weight.grad.clone()  # a new gradient tensor
    opt.step()
    assert len(builds) == 2


def test_half_float_round_trip_after_a_step_keeps_training():
    """``model.half().float()`` replaces every parameter's and gradient's storage: the
    address tables follow, and zero_grad clears the gradients backward writes."""

    def round_trip(step, model):
        if step == 4:
            model.half().float()

    _train_side_by_side(9, round_trip, set_to_none=False)
    _train_side_by_side(9, round_trip, set_to_none=True)


def test_replaced_parameter_data_is_read_in_place():
    dev = _device()
    a, b = torch.nn.Parameter(torch.ones(5, device=dev)), torch.nn.Parameter(torch.ones(3, device=dev))
    opt = MLBFGS([a, b], lr=0.1, momentum=0.0, blocks="tensor", backend="triton", normalize=True)
    a.grad, b.grad = torch.ones(5, device=dev), torch.ones(3, device=dev)
    opt.step()
    a.data = torch.full((5,), 2.0, device=dev)  # the user re-points a parameter
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((5,), 1.9, device=dev))
    torch.testing.assert_close(b.detach(), torch.full((3,), 0.8, device=dev))
    a.data = torch.zeros(4, device=dev)
    a.grad = None
    with pytest.raises(RuntimeError, match="changed shape"):
        opt.step()
    a.data = torch.full((5,), 2.0, device=dev, dtype=torch.float64)  # its state follows it
    a.grad = torch.ones(5, device=dev, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((5,), 1.9, device=dev, dtype=torch.float64))


def test_aligned_specialization_when_every_tile_starts_on_16_elements():
    """Sizes that are multiples of 16 (and the allocator's aligned addresses) select the
    kernels' ALIGNED specialization (vector accesses on a GPU); the trajectory is the same."""
    dev = _device()
    runs = []
    for backend in ("triton", "foreach"):
        torch.manual_seed(6)
        params = [torch.nn.Parameter(torch.randn(16, 8, device=dev)), torch.nn.Parameter(torch.randn(32, device=dev))]
        opt = MLBFGS(params, lr=0.05, history_size=2, update_period=2, blocks="tensor", backend=backend)
        for step in range(7):
            for p in params:
                p.grad = p.detach() * (1 + 0.1 * step) - 0.3
            opt.step()
        runs.append((params, opt))
    (p_t, opt_t), (p_f, _) = runs
    (plan,) = opt_t.backend_plan(0).arenas
    assert plan.aligned
    for a, b in zip(p_t, p_f):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_saving_one_parameter_saves_only_it():
    import io

    model = _mlp(3)
    opt = MLBFGS(model.parameters(), backend="triton")
    model(torch.randn(2, 6, device=_device())).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(model[2].bias, buffer)
    assert len(buffer.getvalue()) < 2000  # 3 floats and the pickle, not the model


# -- backend choice ------------------------------------------------------------------------
def test_backend_selection():
    p = torch.nn.Parameter(torch.randn(3))
    if _triton.interpreting():  # the interpreter takes CPU tensors when asked
        opt = MLBFGS([p], backend="triton")
        assert backends.select(opt.param_groups[0]).name == "triton"
    for kwargs in (dict(fused=False), dict(foreach=True), dict(backend="foreach")):
        opt = MLBFGS([p], **kwargs)
        assert backends.select(opt.param_groups[0]).name == "foreach"
    # fused=None takes the Triton path when every parameter is a CUDA tensor.
    cuda, cpu = SimpleNamespace(is_cuda=True, grad=None), SimpleNamespace(is_cuda=False, grad=None)
    group = dict(backend=None, fused=None, foreach=None)
    assert backends.select({**group, "params": [cuda, cuda]}).name == "triton"
    assert backends.select({**group, "params": [cuda, cpu]}).name == "foreach"


def test_triton_on_a_device_it_does_not_take_raises_when_the_step_runs(monkeypatch):
    """As torch checks ``fused=True`` when the step runs (an optimizer of meta parameters
    is built before ``to_empty``), a backend is checked against the parameters' devices
    then, before anything is written."""
    monkeypatch.setattr(_triton, "interpreting", lambda: False)  # as without TRITON_INTERPRET
    p = torch.nn.Parameter(torch.randn(3))
    opt = MLBFGS([p], backend="triton")
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"the 'triton' backend takes tensors on \['cuda'\], got a parameter on cpu"):
        opt.step()
    assert not opt.state


# -- the step on the host -------------------------------------------------------------------
class _Recorder(TorchDispatchMode):
    """Every torch operation issued, with the sizes of its tensor results; a host read raises."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("step() read a tensor value on the host")
        out = func(*args, **(kwargs or {}))
        if func.namespace != "profiler":  # torch.optim's step wrapper records a profiler range
            results = out if isinstance(out, (tuple, list)) else (out,)
            self.ops.append((func, [r.numel() for r in results if isinstance(r, torch.Tensor)]))
        return out


@pytest.mark.parametrize("lr", [0.05, "tensor"])
def test_steady_state_step_is_only_kernel_launches(monkeypatch, lr):
    """Once the address tables are built, a step is: the five kernel launches per arena
    and one per group, and in between, the optimizer's combination of the arenas'
    finiteness probes into the step's ``ok`` (a few operations on tensors of at most
    one element per arena).
    Nothing of size N is allocated, nothing is read on the host."""
    from mlbfgs_fused.kernels import common

    model = _mlp(2)
    lr = torch.tensor(0.05, device=_device()) if lr == "tensor" else lr
    opt = MLBFGS(model.parameters(), lr=lr, blocks="tensor", backend="triton")
    x = torch.randn(4, 6, device=_device())
    model(x).sum().backward()
    opt.step()  # builds the plan and the address tables
    launches = []

    def launch(self, *args):
        launches.append((self.fn.__name__, len(rec.ops)))

    monkeypatch.setattr(common.Launcher, "__call__", launch)
    with _Recorder() as rec:
        opt.step()
    n_probes = 1  # one arena
    assert all(size <= n_probes for _, sizes in rec.ops for size in sizes), rec.ops
    assert [name for name, _ in launches] == [
        "_gradient_dots", "_two_loop", "_direction_scale", "_update", "_push", "_commit"
    ]
    # The optimizer's combination (stack, sum, isfinite: a handful of ops) happens
    # between the two halves; the backend itself issues none.
    assert launches[2][1] == 0 and launches[3][1] == len(rec.ops) <= 8, rec.ops


def test_no_host_reads_through_pair_updates():
    sc = _scenario("tensor", steps=10)
    groups = build_params(sc, torch.float32, _device())
    opt = make_optimizer(sc, groups, backend="triton")
    for step in range(sc.steps):  # warm-up, the first snapshot, a skipped pair, gathering
        set_grads(sc, groups, step)
        with _Recorder():
            opt.step()
    assert max(_pair_counts(opt, groups)) > 0


def test_launch_sequence_compiles_without_graph_breaks():
    """The five launches trace into one graph (``fullgraph=True``) and give the eager
    result bit for bit. With the interpreter the launches are opaque custom ops;
    on a GPU they are ``triton_op``s that Inductor sees through."""
    sc = _scenario("tensor", steps=10)
    dev = _device()
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        opt, groups = run_scenario(sc, torch.float32, dev, stop=2, backend="triton")
        plan = opt.backend_plan(0)
        launch = torch.compile(plan.launch, backend="aot_eager", fullgraph=True) if compiled else plan.launch
        for step in range(2, sc.steps):
            set_grads(sc, groups, step)
            for index, group in enumerate(opt.param_groups):
                group_plan = opt.backend_plan(index)
                group_plan.prepare(group)
                launch(group) if index == 0 else group_plan.launch(group)
        runs.append(groups)
    for g1, g2 in zip(*runs):
        for p1, p2 in zip(g1, g2):
            assert torch.equal(p1, p2)


def test_inductor_runs_the_launches_in_place():
    """Inductor re-inplaces the functionalized launches: its code calls each kernel on
    the optimizer's own buffers (no clone of the history or of any state per call);
    the only allocation is the 0-dim ``ok``. (``aot_eager`` does not re-inplace: it
    clones every mutated buffer and copies it back.)"""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    sc = _scenario("group", steps=3)
    opt, groups = run_scenario(sc, torch.float32, _device(), stop=2, backend="triton")
    set_grads(sc, groups, 2)
    group = opt.param_groups[0]
    plan = opt.backend_plan(0)
    plan.prepare(group)
    launch = torch.compile(plan.launch, backend="inductor", fullgraph=True)
    _, (code, *_) = run_and_get_code(launch, group)
    assert "clone" not in code and "copy_" not in code
    allocations = [line for line in code.splitlines() if "= empty_strided" in line]
    assert len(allocations) == 1 and "((), ()" in allocations[0], allocations
    if _triton.interpreting():  # opaque custom ops; on a GPU Inductor inlines the Triton kernels
        assert code.count("torch.ops.mlbfgs_fused.") >= 6
    else:
        assert "gradient_dots_kernel" in code and "commit_kernel" in code


# -- GPU only -----------------------------------------------------------------------------
@needs_cuda
def test_cuda_graph_capture_and_replay():
    if _triton.interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels run on the CPU")
    torch.manual_seed(0)
    static_x = torch.randn(16, 6, device="cuda")
    static_y = torch.randn(16, 3, device="cuda")
    models = [_mlp(5), _mlp(5)]
    opts = [
        MLBFGS(m.parameters(), lr=torch.tensor(0.05, device="cuda"), history_size=2,
               update_period=3, fused=True, capturable=True)
        for m in models
    ]

    def train_step(model, opt):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(static_x), static_y).backward()
        opt.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: builds the plans, binds the gradients, compiles
            train_step(models[1], opts[1])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(models[1], opts[1])
    for _ in range(3):
        train_step(models[0], opts[0])
    for _ in range(12):  # across pair updates (every 3 steps)
        train_step(models[0], opts[0])
        graph.replay()
    torch.cuda.synchronize()
    for p_eager, p_graph in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p_eager, p_graph, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "foreach"])
def test_captured_steps_replay_bit_for_bit_like_eager(backend):
    """Four steps captured in one CUDA graph (two of them pair steps, with different
    gradients each) and replayed three times: parameters and every state tensor equal
    to the bit to the same twelve steps taken eagerly."""
    if backend == "triton" and _triton.interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels run on the CPU")
    from problems import state_tensors

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(257, 33), (33,), (1000,)]
    init = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    warmup, per_graph, replays = 3, 4, 3
    grads = [[torch.randn(s, device="cuda", generator=gen) for s in shapes]
             for _ in range(warmup + per_graph * replays)]

    def make():
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p in params:
            p.grad = torch.zeros_like(p)  # static gradients: the graph reads these tensors
        opt = MLBFGS(params, lr=torch.tensor(0.05, device="cuda"), history_size=3, update_period=2,
                     weight_decay=1e-3, blocks="tensor", backend=backend, capturable=True)
        return params, opt

    def feed(params, step_grads):
        for p, g in zip(params, step_grads):
            p.grad.copy_(g)

    eager_params, eager_opt = make()
    graph_params, graph_opt = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: arenas, address tables, compiled kernels
        for k in range(warmup):
            feed(graph_params, grads[k])
            graph_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for k in range(warmup):
        feed(eager_params, grads[k])
        eager_opt.step()
    sources = [[torch.empty_like(p) for p in graph_params] for _ in range(per_graph)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(per_graph):
            feed(graph_params, sources[j])
            graph_opt.step()
    step = warmup
    for _ in range(replays):
        for j in range(per_graph):
            for source, g in zip(sources[j], grads[step + j]):
                source.copy_(g)
            feed(eager_params, grads[step + j])
            eager_opt.step()
        graph.replay()
        step += per_graph
        torch.cuda.synchronize()
        for a, b in zip(eager_params, graph_params):
            assert torch.equal(a, b)
        for a, b in zip(state_tensors(eager_opt), state_tensors(graph_opt)):
            assert a.dtype == b.dtype and torch.equal(a, b)
    pairs = [int(b["pair_count"]) for p in graph_params for b in graph_opt.block_states(p)]
    assert min(pairs) >= 5, pairs  # the replays pushed pairs (and the ring of three wrapped)


@needs_cuda
def test_inductor_compiled_step_matches_eager_on_the_gpu():
    """``torch.compile(opt.step, backend="inductor")`` on CUDA, the first step included,
    through pair steps: the same parameters as eager steps. (The host-side ``prepare``
    is a graph break by design: docs/design.md, "The fused backend".)"""
    if _triton.interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels run on the CPU")
    import warnings

    gen = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(64, 48), (48,), (300,)]
    init = [torch.randn(s, device="cuda", generator=gen) for s in shapes]

    def make():
        params = [torch.nn.Parameter(t.clone()) for t in init]
        return params, MLBFGS(params, lr=0.05, history_size=2, update_period=2, weight_decay=1e-3,
                              blocks="tensor", backend="triton")

    eager_params, eager = make()
    compiled_params, opt = make()
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="inductor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that it ignores the profiler's record_function
        for i in range(9):  # pairs form from step 4 on, and the ring of two wraps
            for p, q in zip(eager_params, compiled_params):
                g = torch.randn(p.shape, device="cuda", generator=gen)
                p.grad, q.grad = g.clone(), g.clone()
            eager.step()
            step()
            for p, q in zip(eager_params, compiled_params):
                torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"step {i}")
    assert min(int(b["pair_count"]) for p in compiled_params for b in opt.block_states(p)) > 0


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_parameters_on_another_gpu_launch_under_their_device():
    """A model on cuda:1 while cuda:0 is current: every launch runs under cuda:1."""
    if _triton.interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels run on the CPU")
    sc = _scenario("tensor", steps=10)
    with torch.cuda.device(0):
        opt, groups, _, errors = run_against_reference(sc, torch.float32, "cuda:1", backend="triton")
    assert max(errors) < 1e-4
    assert opt.state[groups[0][0]]["momentum_buffer"].device == torch.device("cuda:1")


@needs_cuda
def test_cuda_graph_capture_with_a_cpu_lr_raises():
    if _triton.interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels run on the CPU")
    p = torch.nn.Parameter(torch.randn(8, device="cuda"))
    opt = MLBFGS([p], lr=torch.tensor(0.1), fused=True)
    p.grad = torch.randn(8, device="cuda")
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CPU tensor lr"):
        with torch.cuda.graph(graph):
            opt.step()
